"""Shipped configs: every registered reward has a weight field, so a locked config (as train.py's
--config flags hold it) takes `--config.rl.rewards.<name>=W` for any reward."""

import importlib

import pytest

from anatomy_r1_jax.rl.rewards import REWARDS


def package_rewards() -> set[str]:
    """The rewards the package registers (tests register their own in the same registry)."""
    return {n for n in REWARDS.names() if REWARDS.get(n).__module__.startswith("anatomy_r1_jax.")}


@pytest.mark.parametrize("name", ["default", "synthetic", "ssg_vqa", "omnimedvqa"])
def test_every_reward_weight_is_a_field_of_a_locked_config(name):
    config = importlib.import_module(f"configs.{name}").get_config(None)
    config.lock()
    assert set(config.rl.rewards.keys()) == package_rewards()
    for reward in package_rewards():
        config.rl.rewards[reward] = 0.5  # what --config.rl.rewards.<reward>=0.5 does
    assert dict(config.rl.rewards) == {reward: 0.5 for reward in package_rewards()}


def _value(config, dotted):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize("name,default_model", [("ssg_vqa", "qwen2_5_vl_7b"), ("omnimedvqa", "qwen2_5_vl_3b")])
def test_real_model_configs_are_default_then_presets_then_their_own_values(name, default_model, monkeypatch):
    """Presets apply in order (the file's own patch budget wins over REAL_MODEL's), and the real
    recipe is written out: retuning the tiny default's sampler or learning rate leaves it alone."""
    from configs import default, methods

    module = importlib.import_module(f"configs.{name}")
    tiny_default = default.get_config

    def retuned():
        c = tiny_default()
        c.rl.temperature, c.rl.top_p, c.optim.lr, c.rl.group_size = 1.3, 1.0, 3e-3, 16
        return c

    monkeypatch.setattr(default, "get_config", retuned)
    config = module.get_config("model=qwen2_vl_2b,method=asc")
    own = {"data.train": "", "curriculum.backend": "embedding"}
    for dotted, want in {**methods.REAL_MODEL, **methods.REAL_MODELS["qwen2_vl_2b"], **methods.ARMS["asc"],
                         **own}.items():
        if dotted != "data.patches_per_query":
            assert _value(config, dotted) == want, dotted
    assert config.data.patches_per_query != methods.REAL_MODEL["data.patches_per_query"]
    assert module.get_config(None).model.preset == default_model
    with pytest.raises(ValueError, match="unknown model 'qwen9'"):
        module.get_config("model=qwen9")
    with pytest.raises(ValueError, match="unknown config argument 'lr'"):
        module.get_config("lr=1")


def test_default_config_is_the_grpo_arm_and_presets_refuse_unknown_fields():
    from configs import default, methods, synthetic

    config = default.get_config()
    assert all(_value(config, k) == v for k, v in methods.ARMS["grpo"].items())
    assert synthetic.get_config(None).to_dict() == config.to_dict()
    assert synthetic.get_config("method=anatomy_r1_staged").curriculum.schedule == "staged"
    assert synthetic.get_config("method=asc").curriculum.schedule == "competence"
    with pytest.raises(KeyError, match="'rl.temprature' is not a field"):
        methods.override(config, {"rl.temprature": 1.0})
