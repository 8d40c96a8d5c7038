"""The re-roll settings of a run (methods/reroll.py) and the arms that use them (configs/methods.py).
What a re-roll does inside a step is tested with the trainer (tests/test_trainer_groups.py)."""

import numpy as np
import pytest

from anatomy_r1_jax.data.records import Record
from anatomy_r1_jax.methods import augmentation as aug
from anatomy_r1_jax.methods.reroll import REGROUPS, reroll_policy
from configs import default, methods


def _config(trigger="off", dynamic_sampling="off"):
    c = default.get_config()
    c.gdqa.update(trigger=trigger, max_rerolls=2)
    c.rl.update(dynamic_sampling=dynamic_sampling, max_resample_rounds=3)
    return c


def test_reroll_policy_from_the_config():
    assert reroll_policy(_config()) is None
    assert reroll_policy(_config(dynamic_sampling="drop")) is None  # drop weighs groups in the loss instead
    online = reroll_policy(_config(trigger="online"))
    assert (online.regroup, online.rounds, online.prefix) == ("variants", 2, "gdqa")
    resample = reroll_policy(_config(dynamic_sampling="resample"))
    assert (resample.regroup, resample.rounds, resample.prefix) == ("same", 3, "dynamic_sampling")
    with pytest.raises(ValueError, match="rl.dynamic_sampling='sometimes'"):
        reroll_policy(_config(dynamic_sampling="sometimes"))
    with pytest.raises(ValueError, match="gdqa.trigger='online' and rl.dynamic_sampling='resample'"):
        reroll_policy(_config(trigger="online", dynamic_sampling="resample"))


def test_regroups_and_the_online_trigger():
    record = Record("q1", (), "What is the red anatomy?", ("Liver", "Gut", "Omentum", "Fat"), "B", "Gut")
    state = aug.GDQAState(trigger="online", num_variants=4, kinds=("permute",), hard_ids={"q1"})
    assert not state.is_triggered("q1")  # online: no variants before the rollout, whatever the history
    plain = [record] * 4
    assert REGROUPS.get("same")(plain, state, np.random.default_rng(0)) == plain
    spread = REGROUPS.get("variants")(plain, state, np.random.default_rng(0))
    assert spread[0] is record and len({r.options for r in spread}) == 4
    assert all(r.options[ord(r.answer) - ord("A")] == "Gut" for r in spread)


@pytest.mark.parametrize("arm", sorted(methods.ARMS))
def test_every_arm_sets_its_three_fields(arm):
    c = methods.override(default.get_config(), methods.ARMS[arm])
    assert (c.method, c.curriculum.schedule, c.gdqa.trigger, c.rl.dynamic_sampling) == (
        arm, *(methods.ARMS[arm][k] for k in ("curriculum.schedule", "gdqa.trigger", "rl.dynamic_sampling")))
    reroll_policy(c)  # a valid combination
    aug.GDQAState(trigger=c.gdqa.trigger)


def test_the_new_arms():
    fields = ("curriculum.schedule", "gdqa.trigger", "rl.dynamic_sampling")
    assert tuple(methods.ARMS["grpo_dynamic"][k] for k in fields) == ("none", "off", "resample")
    assert tuple(methods.ARMS["gdqa_online"][k] for k in fields) == ("none", "online", "off")
