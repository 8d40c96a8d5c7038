"""The runtime requirements check: one line naming a missing package and how to install it."""

import glob
import os
import subprocess
import sys

import pytest

from anatomy_r1_jax import requirements

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_runtime_pins_are_the_runtime_section():
    pins = requirements.runtime_pins()
    assert pins["jinja2"] == "3.1.6"  # transformers' chat templates; no library depends on it
    assert pins["jax"] == pins["jaxlib"]
    assert "torch" not in pins and "pytest" not in pins and "pytest-xdist" not in pins
    assert requirements.missing(pins) == []


def test_missing_package_stops_with_one_line(tmp_path, monkeypatch, capsys):
    req = tmp_path / "requirements.txt"
    req.write_text("numpy==2.4.6\nno-such-package-xyz==1.2\n# Tests\nanother-missing-one==1.0\n")
    monkeypatch.setattr(requirements, "REQUIREMENTS", str(req))
    with pytest.raises(SystemExit) as e:
        requirements.check_installed()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no-such-package-xyz==1.2" in err and "pip install no-such-package-xyz==1.2" in err
    assert "another-missing-one" not in err  # the tests' section is not a runtime requirement


def test_every_entry_point_checks_before_its_libraries():
    """train.py and every script call the check before importing a third-party library, so a
    missing package is named before any import of it can fail."""
    third_party = ("import jax", "import numpy", "from absl", "from ml_collections", "import torch",
                   "import transformers", "from flax", "from PIL")
    for path in [os.path.join(ROOT, "train.py")] + sorted(glob.glob(os.path.join(ROOT, "scripts", "*.py"))):
        lines = open(path).read().splitlines()
        calls = [i for i, line in enumerate(lines) if line.startswith(("check_installed()", "require_torch()"))]
        assert calls, f"{path} never checks its requirements"
        first = next((i for i, line in enumerate(lines) if line.startswith(third_party)), len(lines))
        assert calls[0] < first, f"{path} imports a library before checking requirements"


def test_entry_point_names_missing_package(tmp_path):
    """A script run in a Python where a pinned package is absent exits 2 with the one line (the
    check reads a requirements file that pins a package this environment lacks)."""
    shadow = tmp_path / "anatomy_r1_jax"
    shadow.mkdir()
    for name in ("__init__.py", "requirements.py"):
        (shadow / name).write_text(open(os.path.join(ROOT, "anatomy_r1_jax", name)).read())
    (tmp_path / "requirements.txt").write_text("absl-py==2.5.1\nmissing-runtime-dep==9.9\n")
    script = tmp_path / "train.py"
    script.write_text(open(os.path.join(ROOT, "train.py")).read())
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 2
    assert out.stderr.startswith("error: missing Python package missing-runtime-dep==9.9;")
    assert "Traceback" not in out.stderr
