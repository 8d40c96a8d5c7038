"""The `--config` flag of the commands (train.py, scripts): an ml_collections config file whose
fields are overridden as `--config.section.field=value`, and one short line for a mistyped field.

ml_collections raises a misspelt override (`--config.train.stepz=3`) as an AttributeError from
inside absl's flag parsing (at flag definition when the default file is used, at parse time
otherwise): a 50-line traceback. Here it ends the command with

    train.py: unknown config field --config.train.stepz (train has no 'stepz'; nearest: steps)

    _CONFIG = command_line.define_config(default_path, "ml_collections config file")
    ...
    if __name__ == "__main__":
        command_line.run(main)
"""

from __future__ import annotations

import difflib
import os
import sys

from absl import app, flags
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

FLAG = "config"


def _argv_value(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def unknown_field_message(config, argv: list[str]) -> str | None:
    """The first `--config.a.b=...` override in argv that names no field of `config`, as one line
    with the nearest existing names (None when every override names a field)."""
    for arg in argv:
        if not arg.startswith(f"--{FLAG}."):
            continue
        path = arg[len(FLAG) + 3:].split("=", 1)[0]
        node, parts = config, path.split(".")
        for depth, part in enumerate(parts):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                where = ".".join(parts[:depth]) or "the config"
                nearest = difflib.get_close_matches(part, keys, n=3, cutoff=0.5) or sorted(keys)[:8]
                return (f"unknown config field --{FLAG}.{path} ({where} has no {part!r}; nearest: "
                        f"{', '.join(nearest)})")
            node = node[part]
    return None


def _exit_on_unknown_field(error: Exception, argv: list[str], default: str) -> None:
    """Exits with one line when `error` came from a misspelt override; returns otherwise."""
    try:
        config = ConfigFileFlagParser(name=FLAG).parse(_argv_value(argv, FLAG) or default)
    except Exception:  # the config file itself is broken: let the original error speak
        return
    message = unknown_field_message(config, argv)
    if message:
        sys.exit(f"{os.path.basename(argv[0])}: {message}")


def define_config(default: str, help_text: str = "ml_collections config file"):
    """DEFINE_config_file("config", default, lock_config=True), misspelt overrides ending in one line."""
    try:
        return config_flags.DEFINE_config_file(FLAG, default, help_text, lock_config=True)
    except (AttributeError, KeyError) as error:
        _exit_on_unknown_field(error, sys.argv, default)
        raise


def run(main) -> None:
    """absl.app.run(main), a misspelt config override ending in one line."""
    default = flags.FLAGS[FLAG].default_as_str if FLAG in flags.FLAGS else ""

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except (AttributeError, KeyError) as error:
            _exit_on_unknown_field(error, argv, (default or "").strip("'"))
            raise
        except flags.Error as error:  # what app.run prints for any other bad flag
            sys.exit(f"FATAL Flags parsing error: {error}\nPass --helpshort or --helpfull to see help on flags.")

    app.run(main, flags_parser=parse)
