"""Finding trained checkpoints and rebuilding the model they hold, for evaluation and export.

A checkpoint is what train/checkpoint.py writes: `{workdir}/checkpoints/<step>/` with the Orbax
items `state` (TrainState: step, params, frozen, ref_params, opt_state) and `meta`. Only `params`
and `frozen` are read (a partial restore: the optimizer moments and the reference copy are never
loaded), directly onto the shardings the config's rules give on the mesh. The model is then
`nnx.merge(graphdef, params, frozen)` with the graphdef the run's config builds. A LoRA run's
checkpoint may hold its adapters alone (`frozen` empty): the base weights are then the config's base
model (model.path or the tiny model of config.seed) or, after a full warm-up, the warm-up's last
checkpoint of the same run (runtime/builders.adapter_base, as its meta says).

Checkpoint specs (command lines): "base" (the model as the config builds it: model.path, or the
tiny model made from config.seed), a run workdir (its latest step), its `checkpoints` folder, or
one step folder; "NAME=SPEC" names it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tempfile

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from anatomy_r1_jax import sharding
from anatomy_r1_jax.models import QwenVL, QwenVLConfig, lora, model_options
from anatomy_r1_jax.runtime import builders
from anatomy_r1_jax.runtime.placement import place_state, rollout_layout, split_model

log = logging.getLogger(__name__)

BASE = "base"
_USE_THE_RUN_CONFIG = "use the run's config: the scripts read the run's config.json unless --config is given"


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    """name: how results call it; path: the step folder (None for the base model); step;
    workdir: the run's workdir when the layout shows it."""

    name: str
    path: str | None = None
    step: int | None = None
    workdir: str | None = None


def _steps(directory: str) -> list[int]:
    """Finished steps of an Orbax CheckpointManager folder (unfinished saves are temporary folders)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory)
                  if n.isdigit() and os.path.isdir(os.path.join(directory, n, "state")))


def resolve_checkpoint(spec: str) -> CheckpointRef:
    """A CheckpointRef from "base", "NAME=PATH" or PATH (run workdir / checkpoints folder / step folder)."""
    name, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
    if path == BASE:
        return CheckpointRef(name or BASE)
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(os.path.join(path, "state")) and os.path.basename(path).isdigit():
        step_dir, step = path, int(os.path.basename(path))
    else:
        folder = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
        steps = _steps(folder)
        if not steps:
            raise FileNotFoundError(f"{spec!r}: no finished checkpoint in {folder} (expected <step>/state folders)")
        step, step_dir = steps[-1], os.path.join(folder, str(steps[-1]))
    parent = os.path.dirname(step_dir)
    workdir = os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None
    run = os.path.basename(workdir) if workdir else os.path.basename(parent)
    return CheckpointRef(name or f"{run}-step{step}", step_dir, step, workdir)


def safe_name(name: str) -> str:
    """A file-name-safe form of a checkpoint or dataset name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "unnamed"


@dataclasses.dataclass
class ModelSetup:
    """Everything to run one model family on a mesh. params / frozen: abstract nnx States
    (ShapeDtypeStructs carrying the shardings the rules give)."""

    config: object
    tokenizer: object
    image_processor: object
    model_cfg: QwenVLConfig
    mesh: jax.sharding.Mesh
    rules: list
    graphdef: object
    params: object
    frozen: object
    freeze_vision: bool


def _abstract(state, mesh, rules):
    """ShapeDtypeStructs (with the rules' NamedShardings) in place of a State's arrays."""
    shardings = sharding.state_shardings(state, mesh, rules)
    return jax.tree.map(lambda s, var: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), var), shardings, state)


def _tokenizer_and_image_processor(config, workdir: str | None):
    """The run's tokenizer and image processor. The tiny tokenizer (no tokenizer.path / model.path)
    is read from `workdir/tokenizer`, where training saved it; when that folder is missing it is
    built in a scratch folder: evaluation and export never write into a run."""
    if config.tokenizer.path or config.model.path or (
            workdir and os.path.exists(os.path.join(workdir, "tokenizer", "tokenizer.json"))):
        tokenizer = builders.build_tokenizer(config, workdir)
        return tokenizer, builders.build_image_processor(config, tokenizer)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = builders.build_tokenizer(config, scratch)
        return tokenizer, builders.build_image_processor(config, tokenizer)


def build_setup(config, workdir: str | None, *, mesh=None, rollout: bool = False) -> ModelSetup:
    """Tokenizer, image processor, mesh and the model of `config`, built abstractly (no memory,
    nothing loaded); `base_state` or `restore_model_state` then give it values.

    workdir: the run whose tiny tokenizer to use (None: none; nothing is written there).
    rollout: the weights on the rollout's layout (config.rollout_mesh, rollout_sharding_rules), as
    the trainer answers with them (evaluation), instead of the training layout (export)."""
    c = config
    mesh = mesh if mesh is not None else sharding.make_mesh([tuple(a) for a in c.mesh])
    rules = [tuple(r) for r in c.sharding_rules]
    if rollout:
        mesh, rules = rollout_layout(c, mesh)
    tokenizer, image_processor = _tokenizer_and_image_processor(c, workdir)
    if c.model.path:
        dtypes = builders.DTYPES
        model = nnx.eval_shape(lambda: builders.with_adapters(c, QwenVL(
            QwenVLConfig.from_dir(c.model.path), dtype=dtypes[c.model.dtype], param_dtype=dtypes[c.model.param_dtype],
            rngs=nnx.Rngs(0), **model_options(c.model))))
    else:
        model = nnx.eval_shape(lambda: builders.build_model(c, tokenizer))
    graphdef, params, frozen = split_model(model, c.model.freeze_vision)
    return ModelSetup(c, tokenizer, image_processor, model.config, mesh, rules, graphdef,
                      _abstract(params, mesh, rules), _abstract(frozen, mesh, rules), bool(c.model.freeze_vision))


def base_state(setup: ModelSetup):
    """(params, frozen) of the base model (model.path, or the tiny model made from config.seed:
    what training starts from), placed on the setup's mesh."""
    with sharding.use_rules(setup.mesh, setup.rules):
        model = builders.build_model(setup.config, setup.tokenizer, setup.mesh, setup.rules)
    _, params, frozen = split_model(model, setup.freeze_vision)
    return place_state(params, setup.mesh, setup.rules), place_state(frozen, setup.mesh, setup.rules)


def load_model_state(setup: ModelSetup, ref: CheckpointRef):
    """(params, frozen) of a CheckpointRef: the base model or a restored checkpoint."""
    return base_state(setup) if ref.path is None else restore_model_state(setup, ref.path)


def _parameter_names(params, frozen) -> set[str]:
    """'language.layers.0.mlp.up.kernel'-style names of the leaves of params and frozen together
    (nnx States and Orbax tree metadata alike: a Variable's trailing 'value' key is dropped)."""
    def name(path):
        parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        return ".".join(parts[:-1] if parts[-1] == "value" else parts)

    return {name(path) for tree in (params, frozen) for path, _ in jax.tree_util.tree_leaves_with_path(tree or {})}


def _stored_tree(path: str) -> dict:
    """The tree metadata of an Orbax `state` item (its structure, no arrays read)."""
    stored = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path))
    return getattr(stored, "tree", stored) or {}


def _check_parameter_names(setup: ModelSetup, stored: dict, step_dir: str, frozen: bool = True) -> None:
    """Raises when the checkpoint's parameters are not the model's: Orbax's partial restore would
    leave missing ones unrestored and skip extra ones (e.g. a 1-layer run read with a 2-layer config).
    frozen=False: the checkpoint holds the trainable part alone (a LoRA run's adapters)."""
    found = _parameter_names(stored.get("params"), stored.get("frozen"))
    expected = _parameter_names(setup.params, setup.frozen if frozen else None)
    if found != expected:
        missing, extra = sorted(expected - found), sorted(found - expected)
        raise ValueError(
            f"{step_dir}: the checkpoint does not hold this config's model: {len(missing)} of its parameters are "
            f"not in the checkpoint{' (' + ', '.join(missing[:3]) + ', ...)' if missing else ''} and {len(extra)} "
            f"checkpoint parameters are not in the model{' (' + ', '.join(extra[:3]) + ', ...)' if extra else ''}; "
            f"{_USE_THE_RUN_CONFIG}")


def restore_model_state(setup: ModelSetup, step_dir: str):
    """(params, frozen) of the checkpoint in `step_dir`, split and placed like the setup's model
    (so they fit `setup.graphdef` and every program compiled for it).

    The run may have split trainable and frozen parameters differently from this config (e.g.
    model.freeze_vision changed, or a LoRA run's full warm-up, which trains the base weights): the
    split whose trainable part has the checkpoint's `params` names is restored, then split like the setup.
    """
    model = nnx.merge(setup.graphdef, setup.params, setup.frozen)
    path = os.path.join(os.path.abspath(step_dir), "state")
    stored = _stored_tree(path)
    base_frozen = None
    if lora.has_adapters(model) and not _parameter_names(None, stored.get("frozen")):
        # A LoRA checkpoint without base weights: the config's base model, or the run's warm-up checkpoint.
        step_dir = os.path.abspath(step_dir)
        step = int(os.path.basename(step_dir)) if os.path.basename(step_dir).isdigit() else None
        base = builders.adapter_base(setup.config, step, os.path.dirname(step_dir))
        base_frozen = restore_model_state(setup, base["base"])[1] if "base_step" in base else base_state(setup)[1]
    _check_parameter_names(setup, stored, step_dir, frozen=base_frozen is None)
    errors = []
    splits = [(setup.freeze_vision, None)] if base_frozen is not None else [
        (freeze, trains) for trains in ((None, "base") if lora.has_adapters(model) else (None,))
        for freeze in (setup.freeze_vision, not setup.freeze_vision)]
    stored_params = _parameter_names(stored.get("params"), None)
    for freeze, trains in splits:
        graphdef, params, frozen = split_model(model, freeze, trains)
        if _parameter_names(params, None) != stored_params:  # (a partial restore would leave them abstract)
            errors.append(f"freeze_vision={freeze}, trains={trains}: other trainable parameters")
            continue
        target = {"params": _abstract(params, setup.mesh, setup.rules)}
        if base_frozen is None:
            target["frozen"] = _abstract(frozen, setup.mesh, setup.rules)
        restore_args = jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), target)
        try:
            with ocp.PyTreeCheckpointer() as checkpointer:
                out = checkpointer.restore(path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                                              partial_restore=True))
        except (ValueError, KeyError, TypeError) as error:  # orbax: structure or shape mismatch
            errors.append(f"freeze_vision={freeze}, trains={trains}: {type(error).__name__}: {error}")
            continue
        if base_frozen is not None:
            return out["params"], base_frozen
        if (freeze, trains) != (setup.freeze_vision, None):
            _, params, frozen = split_model(nnx.merge(graphdef, out["params"], out["frozen"]), setup.freeze_vision)
            return params, frozen
        return out["params"], out["frozen"]
    raise ValueError(f"{step_dir}: the checkpoint does not hold this config's model ({_USE_THE_RUN_CONFIG}):\n"
                     + "\n".join(errors))
