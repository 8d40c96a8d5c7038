"""Test set-up: 8 simulated CPU devices and exact fp32 matmuls (set before jax is imported), a quicker
XLA:CPU compile, one compilation cache for the whole session, and `slow` tests.

    python -m pytest -q -n 2 -m "not slow" tests    # the fast lane (development)
    python -m pytest -q -n 2 tests                  # everything (CI)

Compiling, not running, is most of the suite's time (the tiny models' update programs take XLA:CPU
5-20 s each at its default optimisation level), so the tests compile with the LLVM backend at -O0 and
XLA:CPU's older elemental fusion emitter instead of its MLIR fusion emitters (TEST_XLA_FLAGS: the same
HLO passes; -O0 halves the compile time, the emitter takes another ~40% off the rest, measured on
test_rollout_step.py + test_lora.py cold: 346 s -> 265 s, 139 s of it not compiling; slower code that these tiny programs
hardly notice). A run of train.py or a script that a test starts gets the same flags
and the session's compilation cache through `subprocess_env` / `XLA_CACHE`.
"""

import os
import shutil
import tempfile

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import filelock  # noqa: E402
import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# One folder per pytest session, shared by its xdist workers (made by the controller before they
# start, inherited through the environment): jax's persistent compilation cache of the tests and of
# the processes they start, and the artifacts made once per session (`shared_run`).
_SESSION_ENV = "ANATOMY_R1_TEST_SESSION_DIR"
_MADE_SESSION_DIR = False
if not os.environ.get(_SESSION_ENV):
    os.environ[_SESSION_ENV] = tempfile.mkdtemp(prefix="anatomy_r1_tests_")
    _MADE_SESSION_DIR = True
SESSION_DIR = os.environ[_SESSION_ENV]
XLA_CACHE = os.path.join(SESSION_DIR, "xla_cache")
RUN_CACHE = os.path.join(SESSION_DIR, "xla_cache_runs")  # the train.py runs' (one device), copied by a test
for _folder in (XLA_CACHE, RUN_CACHE):
    os.makedirs(_folder, exist_ok=True)
# In process too: a program compiled by one test (or the other worker) is loaded by the next that
# compiles the same one. Every program is kept (jax's default keeps those over 1 s to compile only).
jax.config.update("jax_compilation_cache_dir", XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


TORCH_FREE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_free")  # its sitecustomize hides torch


def subprocess_env(devices: int = 1, torch: bool = False, **extra: str) -> dict:
    """The environment of a train.py / script process a test starts: `devices` CPU devices, the
    tests' compile flags, jax's persistent cache keeping every program (pass XLA_CACHE as the
    process's --config.compilation_cache, or RUN_CACHE for train.py), and no torch (as a user's
    environment: torch is the tests' reference, never the package's; torch=True for a benchmark)."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}",
           "JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **extra}
    if not torch:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (TORCH_FREE, env.get("PYTHONPATH", "")) if p)
    return env


def shared_run(name: str, make) -> str:
    """The folder SESSION_DIR/name, made once per session by `make(folder)` whichever xdist worker
    asks first (the other waits on a file lock): a run several tests read or copy. A `make` that
    fails leaves nothing behind, and the next test to ask tries again."""
    folder = os.path.join(SESSION_DIR, name)
    with filelock.FileLock(folder + ".lock"):
        if not os.path.exists(os.path.join(folder, ".made")):
            shutil.rmtree(folder, ignore_errors=True)
            try:
                make(folder)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            open(os.path.join(folder, ".made"), "w").close()
    return folder


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test that starts processes (train.py, a script, data workers, "
                                       "two-process training, kills and restarts) or runs whole updates on 8 "
                                       "devices; the fast lane (-m 'not slow') keeps one train.py run and every "
                                       "in-process test")


def pytest_unconfigure(config):
    if _MADE_SESSION_DIR and not hasattr(config, "workerinput"):  # the process that made it (controller)
        shutil.rmtree(SESSION_DIR, ignore_errors=True)


# The end-to-end tests (train.py and the scripts as subprocesses, 0.5-2.5 minutes each) run first, so that
# under pytest-xdist the suite does not end with one worker finishing a long test while the other idles.
SLOW_FIRST = ("test_faults.py", "test_train_e2e.py", "test_multihost.py", "test_length_aware_update.py",
              "test_real_path.py", "test_lora.py", "test_export_hf.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    # slow-marked first, then the slow files, the rest in their order (a stable sort)
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, rank.get(item.path.name, len(SLOW_FIRST))))


def pytest_collection_finish(session):
    from anatomy_r1_jax.runtime.programs import collect_garbage_less

    collect_garbage_less()  # the test modules are imported: tracing runs quicker (docs/benchmarks.md "Start-up")
