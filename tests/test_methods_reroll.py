"""The re-roll settings of a run (methods/reroll.py) and the arms that use them (configs/methods.py).
What a re-roll does inside a step is tested with the trainer (tests/test_trainer_groups.py)."""

import numpy as np
import pytest

from anatomy_r1_jax.data.records import Record
from anatomy_r1_jax.methods import augmentation as aug
from anatomy_r1_jax.methods import reroll as reroll_mod
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
    fields += ("gdqa.signal", "gdqa.rescued_prompt")
    assert tuple(methods.ARMS["anatomy_r1"][k] for k in fields) == (
        "competence", "online", "off", "accuracy", "variant")
    assert tuple(methods.ARMS["asc"][k] for k in fields) == ("competence", "off", "off", "reward", "variant")
    assert methods.ARMS["gdqa_accuracy_original"]["gdqa.rescued_prompt"] == "original"
    assert methods.ARMS["anatomy_r1_staged"]["curriculum.schedule"] == "staged"


# ---- GDQA as a recognition signal (issue 23) ------------------------------------------------------


def _script_roll(script):
    """roll(groups, round, todo) whose rows of group p say script[p][round] (G strings of "c" correct /
    "f" formatted, e.g. "cf"), scored by `_score`; completions: the row's text length, a [P * G] leaf."""
    def roll(groups, r, todo):
        del todo  # (every row is scored here; the re-roll keeps the rows of the groups it re-rolled)
        texts = [t for p in range(len(groups)) for t in script[p][min(r, len(script[p]) - 1)]]
        total, acc = _score(texts, None)
        return reroll_mod.MicroRollout(groups, {"length": np.array([len(t) for t in texts])}, texts, total, acc,
                                       prompt=("prompt", r))
    return roll


def _score(texts, rows):
    del rows
    acc = np.array([float("c" in t) for t in texts])
    return acc + np.array([float("f" in t) for t in texts]), acc


def _micro(first):
    records = [Record(f"q{p}", (), "What is the red anatomy?", ("Liver", "Gut", "Omentum", "Fat"), "B", "Gut")
               for p in range(len(first))]
    texts = [t for grp in first for t in grp]
    total, acc = _score(texts, None)
    lengths = {"length": np.array([len(t) for t in texts])}
    return reroll_mod.MicroRollout([[r] * len(first[0]) for r in records], lengths, texts, total, acc,
                                   prompt=("prompt", -1))


# before the re-roll: format-only spread (all wrong), all correct, all wrong (same format)
FIRST = [["f", "", "f", "f"], ["cf"] * 4, ["f"] * 4]
# what a re-roll of each group samples: format spread again; all correct; accuracy spread
REROLL = {0: [["f", "", "", "f"]], 1: [["cf"] * 4], 2: [["cf", "f", "f", "f"]]}


def test_group_outcomes():
    total, acc = _score([t for grp in FIRST + [["cf", "f", "f", "f"]] for t in grp], None)
    assert list(reroll_mod.group_outcomes(total, acc, 4)) == ["format_only", "all_correct", "all_wrong", "diverse"]


@pytest.mark.parametrize("signal, rerolled, rescued", [
    ("accuracy", [0, 2], [2]),  # all-wrong groups only (format spread or not); rescued = accuracy varies after
    ("reward", [1, 2], [2]),  # the old rule: all-equal totals, the all-correct group too; format spread is "diverse"
])
def test_signal_decides_which_groups_are_rerolled_and_rescued(signal, rerolled, rescued):
    micro = _micro(FIRST)
    script = {p: REROLL[p] for p in range(3)}
    out, stats, mask = reroll_mod.reroll_zero_variance(
        micro, group_size=4, rounds=1, regroup=lambda grp: list(grp), roll=_script_roll(script),
        signal=signal)
    changed = [p for p in range(3) if out.texts[4 * p:4 * p + 4] != micro.texts[4 * p:4 * p + 4]]
    assert changed == [p for p in rerolled if REROLL[p][0] != FIRST[p]]
    assert list(np.flatnonzero(mask)) == rescued and stats.rescued == len(rescued)
    assert stats.rerolled == len(rerolled) and stats.accuracy_varies == 1
    m = stats.metrics("gdqa")
    if signal == "accuracy":
        assert (m["gdqa/rerolled/format_only"], m["gdqa/rescued/format_only"]) == (1.0, 0.0)
        assert m["gdqa/rerolled/all_correct"] == 0.0 and m["gdqa/rescued/all_wrong"] == 1.0
    else:
        assert m["gdqa/rerolled/format_only"] == 0.0 and m["gdqa/rerolled/all_correct"] == 1.0
    np.testing.assert_array_equal(out.completions["length"], [len(t) for t in out.texts])
    total = (stats + stats).metrics("gdqa")
    assert total["gdqa/rerolled_groups"] == 2 * m["gdqa/rerolled_groups"]
    assert total["gdqa/rescued/all_wrong"] == 2 * m["gdqa/rescued/all_wrong"]


def test_reward_signal_counts_a_format_only_rescue_that_accuracy_does_not():
    """A re-roll of an all-wrong group that yields only a format spread: rescued by the total reward,
    not by the accuracy."""
    first = [["f"] * 4]
    script = {0: [["f", "", "f", "f"]]}
    kw = dict(group_size=4, rounds=1, regroup=lambda grp: list(grp), roll=_script_roll(script))
    assert reroll_mod.reroll_zero_variance(_micro(first), signal="reward", **kw)[1].rescued == 1
    accuracy = reroll_mod.reroll_zero_variance(_micro(first), signal="accuracy", **kw)[1]
    assert accuracy.rerolled == 1 and accuracy.rescued == 0 and accuracy.accuracy_varies == 0


def test_rescued_groups_train_on_the_original_prompt():
    record = Record("q1", (), "What is the red anatomy?", ("Liver", "Gut", "Omentum", "Fat"), "B", "Gut")
    state = aug.GDQAState(trigger="online", num_variants=4, kinds=("rephrase", "permute"))
    spread = REGROUPS.get("variants")([record] * 4, state, np.random.default_rng(0))
    micro = _micro([["f"] * 4, ["f"] * 4])
    micro.groups = [list(spread), list(spread)]
    out = reroll_mod.on_original_prompt(micro, np.array([True, False]))
    assert out.groups[0] == [record] * 4 and out.groups[1] == spread and out.prompt is None
    assert reroll_mod.on_original_prompt(micro, np.array([False, False])) is micro


def test_no_option_permutation_where_the_accuracy_scores_the_class_name():
    kinds = ("rephrase", "permute")
    assert aug.variant_kinds(kinds, signal="accuracy", accuracy_key="accuracy_lenient") == ("rephrase",)
    assert aug.variant_kinds(kinds, signal="accuracy", accuracy_key="accuracy") == kinds  # a letter: order matters
    assert aug.variant_kinds(kinds, signal="reward", accuracy_key="accuracy_lenient") == kinds


def test_signal_settings_belong_to_the_online_reroll():
    c = _config(trigger="online")
    c.gdqa.update(signal="accuracy", rescued_prompt="original")
    policy = reroll_policy(c)
    assert (policy.signal, policy.rescued_prompt) == ("accuracy", "original")
    c.gdqa.trigger = "adaptive"
    with pytest.raises(ValueError, match="apply to the online re-roll"):
        reroll_policy(c)
    c.gdqa.update(trigger="online", rescued_prompt="both")
    with pytest.raises(ValueError, match="gdqa.rescued_prompt='both'"):
        reroll_policy(c)
    c.gdqa.update(rescued_prompt="variant", signal="format")
    with pytest.raises(KeyError, match="unknown group signal 'format'"):
        reroll_policy(c)
