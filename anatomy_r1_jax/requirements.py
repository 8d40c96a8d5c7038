"""Are the packages a command needs installed? Checked once at the start of every command a user runs.

`requirements.txt` (at the checkout's root) is the one list: its lines before `# Tests` are what
`train.py` and the scripts need at run time, including packages that libraries import lazily
(transformers renders chat templates with jinja2 but does not depend on it). A missing one stops the
command with one line naming it and the command that installs it, instead of an ImportError from
deep inside a library minutes into a run. torch is never a runtime requirement: only the tests and
the side-by-side benchmarks ask for it (`require_torch`).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIREMENTS = os.path.join(ROOT, "requirements.txt")
TORCH = "torch==2.13.0"  # the CPU reference of tests and benchmarks (scripts/env.sh --torch)


def runtime_pins(path: str | None = None) -> dict[str, str]:
    """{distribution name: pinned version} of the runtime section (the lines before `# Tests`)."""
    pins = {}
    with open(path or REQUIREMENTS) as f:
        for line in f:
            line = line.strip()
            if line.lower().startswith("# tests"):
                break
            m = re.match(r"^([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)", line)
            if m:
                pins[m.group(1)] = m.group(2)
    return pins


def missing(pins: dict[str, str]) -> list[str]:
    """The `name==version` of every pinned distribution that is not installed."""
    out = []
    for name, version in pins.items():
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{name}=={version}")
    return out


def install_hint(packages: list[str]) -> str:
    return (f"install with: {sys.executable} -m pip install {' '.join(packages)}   "
            f"(or all pinned requirements: {sys.executable} -m pip install -r {REQUIREMENTS}; "
            "scripts/env.sh does this on first use)")


def check_installed(extra: tuple[str, ...] = ()) -> None:
    """Exits with one line on stderr when a runtime requirement (or an `extra` pin such as TORCH) is
    missing. Without a requirements.txt (the package copied elsewhere) only the extras are checked."""
    pins = runtime_pins() if os.path.exists(REQUIREMENTS) else {}
    pins.update(dict(p.split("==", 1) for p in extra))
    lost = missing(pins)
    if lost:
        sys.stderr.write(f"error: missing Python package{'s' if len(lost) > 1 else ''} {', '.join(lost)}; "
                         f"{install_hint(lost)}\n")
        raise SystemExit(2)


def require_torch() -> None:
    """For the benchmarks that time the PyTorch reference beside ours."""
    check_installed(extra=(TORCH,))
