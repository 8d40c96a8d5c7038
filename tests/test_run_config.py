"""A run's saved config.json read back for evaluation / export: every shipped config comes back with
its values and types (tuples, ints vs floats), the tiny model rebuilds identically, the scripts'
choice between --config and the run's config, and the errors a user can hit."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import jax
import ml_collections
import pytest

from anatomy_r1_jax.evaluation.checkpoints import build_setup
from anatomy_r1_jax.evaluation.run_config import config_for_checkpoints, read_run_config

REPO = Path(__file__).resolve().parents[1]


def shipped_config(name: str, arg=None) -> ml_collections.ConfigDict:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # configs/ is a folder of the repository, not of the package
    return importlib.import_module(f"configs.{name}").get_config(arg)


def make_run(workdir: Path, config) -> Path:
    """A run folder as train.py leaves it: config.json and one finished checkpoint step folder."""
    (workdir / "checkpoints" / "7" / "state").mkdir(parents=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
    return workdir


def typed(node):
    """Values with their types, to compare configs exactly (1 != 1.0, (a,) != [a])."""
    if isinstance(node, dict):
        return {k: typed(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return (type(node).__name__, [typed(v) for v in node])
    return (type(node).__name__, node)


@pytest.mark.parametrize("name,arg", [("default", None), ("synthetic", None), ("ssg_vqa", None),
                                      ("ssg_vqa", "model=qwen2_vl_2b,method=grpo"), ("omnimedvqa", None)])
def test_every_shipped_config_reads_back_with_its_types(tmp_path, name, arg):
    config = shipped_config(name, arg)
    make_run(tmp_path, config)
    back = read_run_config(str(tmp_path), template=shipped_config("default"))
    assert typed(back.to_dict()) == typed(config.to_dict())
    # Without the template's types the sharding rules' axis tuples would be lists.
    assert isinstance(back.sharding_rules[0][1], tuple) and isinstance(back.mesh, list)


def test_the_read_back_config_builds_the_same_model(tmp_path):
    config = shipped_config("default")
    config.model.tiny.num_hidden_layers = 1
    config.optim.lr = 1  # an int in a float field: the ConfigDict stores 1.0, the reader keeps a float
    make_run(tmp_path, config)
    back = read_run_config(str(tmp_path), template=shipped_config("default"))
    assert isinstance(back.optim.lr, float)
    ours, theirs = build_setup(config, None), build_setup(back, None)
    assert ours.graphdef == theirs.graphdef and ours.model_cfg == theirs.model_cfg
    assert jax.tree.structure(ours.params) == jax.tree.structure(theirs.params)
    assert [(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(ours.params)] == [
        (x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(theirs.params)]
    assert ours.tokenizer.get_vocab() == theirs.tokenizer.get_vocab()


def test_scripts_use_the_run_config_unless_told_otherwise(tmp_path):
    default = shipped_config("default")
    trained = shipped_config("default")
    trained.model.tiny.hidden_size, trained.model.param_dtype = 64, "bfloat16"
    run = make_run(tmp_path / "run", trained)

    # No --config: the run's config (a step folder or the checkpoints folder name the same run).
    for spec in (str(run), f"trained={run}/checkpoints/7", "base"):
        config = config_for_checkpoints([spec] if spec != "base" else ["base", str(run)], default)
        assert (config.model.tiny.hidden_size, config.model.param_dtype) == (64, "bfloat16")
        assert config.is_locked
    # --config.FIELD=VALUE overrides apply on top of it.
    config = config_for_checkpoints([str(run)], default, overrides={"rl.top_k": 3, "gdqa.kinds": ("rephrase",)})
    assert (config.rl.top_k, config.gdqa.kinds, config.model.tiny.hidden_size) == (3, ("rephrase",), 64)
    # No run among the checkpoints: the --config file.
    assert config_for_checkpoints(["base"], default) is default

    # Two runs that need different models are refused with the field that differs.
    other = trained.copy_and_resolve_references()
    other.model.tiny.hidden_size = 32
    other.seed = 3  # seeds may differ (ablation runs): only the tiny base model's weights depend on it
    make_run(tmp_path / "other", other)
    with pytest.raises(ValueError, match=r"different model\.tiny\.hidden_size \(64 vs 32\)"):
        config_for_checkpoints([str(run), str(tmp_path / "other")], default)
    other.model.tiny.hidden_size = 64
    make_run(tmp_path / "same", other)
    assert config_for_checkpoints([str(run), str(tmp_path / "same")], default).seed == trained.seed


def test_unreadable_run_configs_say_which_file(tmp_path):
    run = make_run(tmp_path, shipped_config("default"))
    (run / "config.json").write_text('{"seed": 0,')
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON .* pass --config FILE"):
        config_for_checkpoints([str(run)], shipped_config("default"))
    (run / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected a JSON object"):
        read_run_config(str(run))
    (run / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no saved config"):
        read_run_config(str(run))
