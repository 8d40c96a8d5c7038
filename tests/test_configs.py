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
