"""The config a run was trained with, read back from `{workdir}/config.json`, for evaluation and export.

The trainer writes `config.to_json_best_effort()` into the run's workdir. JSON has no tuples, so
the file is read against a template ConfigDict (the scripts' --config, configs/default.py unless
given): a JSON array becomes a tuple or a list as the template's field is, a tuple where the
template has no such field (the configs' leaf sequences: sharding rules, axis names, GDQA kinds);
an integer stored for a float field becomes a float. Everything else is the run's value as stored,
so the model, tokenizer and prompts rebuild exactly as trained.

`config_from_flags` is what scripts/evaluate.py and scripts/export_hf.py call: without an explicit
--config they use the saved config of the run(s) among their checkpoints, with the command line's
--config.FIELD=VALUE overrides applied on top.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import ml_collections

from anatomy_r1_jax.evaluation.checkpoints import resolve_checkpoint

log = logging.getLogger(__name__)

RUN_CONFIG = "config.json"


def _typed(value: Any, like: Any) -> Any:
    """`value` (parsed JSON) with the container and number types of `like` (the template's field)."""
    if isinstance(value, dict):
        like = like if isinstance(like, (dict, ml_collections.ConfigDict)) else {}
        return {k: _typed(v, like.get(k)) for k, v in value.items()}
    if isinstance(value, list):
        items = [_typed(v, like[i] if isinstance(like, (list, tuple)) and i < len(like) else None)
                 for i, v in enumerate(value)]
        return items if isinstance(like, list) else tuple(items)
    if isinstance(like, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def read_run_config(workdir: str, template: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """The ConfigDict saved in `workdir/config.json`, typed against `template` (see the module docstring)."""
    path = os.path.join(workdir, RUN_CONFIG)
    try:
        with open(path) as f:
            stored = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no saved config (train.py writes it at the start of a run); "
                                "pass --config FILE with the run's config instead") from None
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); pass --config FILE with the run's config "
                         "instead") from None
    if not isinstance(stored, dict):
        raise ValueError(f"{path}: expected a JSON object of config fields, found {type(stored).__name__}")
    return ml_collections.ConfigDict(_typed(stored, template if template is not None else {}))


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {k: v for key, child in node.items() for k, v in _flat(child, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def _model_fields(config) -> dict:
    """The fields that must agree for one model build to serve several runs (evaluation_config
    without the seed, which only picks the tiny base model's initial weights)."""
    from anatomy_r1_jax.evaluation.sweep import evaluation_config

    fields = evaluation_config(config)
    fields.pop("seed")
    return _flat(fields)


def run_workdirs(checkpoints: Sequence[str]) -> list[str]:
    """The distinct run workdirs (holding a saved config) among checkpoint specs, in order."""
    found = []
    for spec in checkpoints:
        workdir = resolve_checkpoint(spec).workdir
        if workdir and workdir not in found and os.path.exists(os.path.join(workdir, RUN_CONFIG)):
            found.append(workdir)
    return found


def config_for_checkpoints(checkpoints: Sequence[str], fallback: ml_collections.ConfigDict, *,
                           overrides: dict | None = None) -> ml_collections.ConfigDict:
    """The saved config of the run(s) among `checkpoints`, `overrides` ({"a.b": value}) applied and
    locked; `fallback` when no checkpoint belongs to a run with a saved config ("base" alone, a
    step folder outside a run). Several runs must agree on the model, tokenizer, prompts and
    sampler (`_model_fields`); the first one's config is used."""
    workdirs = run_workdirs(checkpoints)
    if not workdirs:
        log.info("no run with a saved %s among %s: using the --config file", RUN_CONFIG, list(checkpoints))
        return fallback
    configs = [read_run_config(w, template=fallback) for w in workdirs]
    first = _model_fields(configs[0])
    for workdir, other in zip(workdirs[1:], configs[1:]):
        theirs = _model_fields(other)
        for key in sorted(first.keys() | theirs.keys()):
            if first.get(key) != theirs.get(key):
                raise ValueError(
                    f"{workdirs[0]} and {workdir} were trained with different {key} ({first.get(key)!r} vs "
                    f"{theirs.get(key)!r}): evaluate them in separate commands, or pass --config FILE to use one "
                    "config for all")
    config = configs[0]
    if overrides:
        config.update_from_flattened_dict(dict(overrides))
    config.lock()
    log.info("config: %s%s", os.path.join(workdirs[0], RUN_CONFIG),
             f" with {', '.join(f'{k}={v!r}' for k, v in overrides.items())}" if overrides else "")
    return config


def config_from_flags(config_flag, checkpoints: Sequence[str]) -> ml_collections.ConfigDict:
    """A script's config: the --config file when given on the command line, else the saved config
    of the run(s) among `checkpoints` with the command line's --config.FIELD=VALUE overrides
    (config_flag: the FlagHolder of config_flags.DEFINE_config_file, flags parsed)."""
    from absl import flags
    from ml_collections import config_flags

    flag = flags.FLAGS[config_flag.name]
    if flag.present:
        return config_flag.value
    # The flag's value is the default file with the overrides applied: the template for types.
    return config_for_checkpoints(checkpoints, config_flag.value, overrides=config_flags.get_override_values(flag))
