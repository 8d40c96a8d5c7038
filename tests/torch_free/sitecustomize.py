"""Imported at start-up by the train.py and script processes the tests start (`conftest.subprocess_env`
puts this folder first on PYTHONPATH): torch, installed for the tests' reference only, is hidden
from them, so they run as in a user's environment without it (transformers then neither imports
it, about 4 s a process, nor lets the package lean on it unnoticed)."""

import sys

sys.modules["torch"] = None  # `import torch` raises ImportError; importlib.util.find_spec("torch") is None
