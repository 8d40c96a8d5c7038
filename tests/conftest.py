"""Test set-up: 8 simulated CPU devices and exact fp32 matmuls (set before jax is imported)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The end-to-end tests (train.py and the scripts as subprocesses, 0.5-2.5 minutes each) run first, so that
# under pytest-xdist the suite does not end with one worker finishing a long test while the other idles.
SLOW_FIRST = ("test_train_e2e.py", "test_multihost.py", "test_real_path.py", "test_lora.py", "test_export_hf.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: the rest keep their order
