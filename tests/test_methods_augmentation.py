import itertools
import json

import numpy as np
import pytest

from anatomy_r1_jax.data import read_records
from anatomy_r1_jax.data.prompts import VARIANTS
from anatomy_r1_jax.data.records import LETTERS, Record
from anatomy_r1_jax.methods import augmentation as aug
from anatomy_r1_jax.rl.advantages import group_advantages, all_equal_groups
from anatomy_r1_jax.rl.rewards import compute_rewards

DATA = "/work/shared/data/anatomy_r1"
FILES = ("GRPO.json", "GRPO-ASC-Learning.json", "GRPO-GDQA.json")


@pytest.fixture(scope="module")
def released():
    return {name: read_records(f"{DATA}/{name}") for name in FILES}


def _check_variant(original: Record, variant: Record):
    assert variant.id == original.id
    assert sorted(variant.options) == sorted(original.options)
    assert variant.answer in LETTERS[: len(variant.options)]
    assert variant.options[variant.answer_index] == original.answer_text == variant.answer_text
    assert sum(o == original.answer_text for o in variant.options) == 1


def test_every_released_record_variants_keep_one_correct_answer(released):
    rng = np.random.default_rng(0)
    unparsed = []
    for records in released.values():
        for record in records:
            variants = aug.make_variants(record, 8, rng)
            assert variants[0] is record and len(variants) == 8
            phrase = aug.parse_ssg_question(record.question)
            if phrase is None:
                unparsed.append(record.question)
            for v in variants:
                _check_variant(record, v)
                assert aug.parse_ssg_question(v.question) == phrase  # same target, new wording
                assert v.prompt_variant in VARIANTS
            assert len({(v.question, v.options, v.prompt_variant) for v in variants}) == 8
    # the only questions outside the SSG grammar are the files' "at the None of the frame" defects
    assert set(unparsed) == {"What anatomy is at the None of the frame ?"} and len(unparsed) == 2


def test_all_permutations_and_answer_positions():
    for answer in range(4):
        record = Record("q", ("i.png",), "What is it?", ("w", "x", "y", "z"), LETTERS[answer], "wxyz"[answer])
        for perm in itertools.permutations(range(4)):
            _check_variant(record, aug.permute_options(record, perm))
    with pytest.raises(ValueError):
        aug.permute_options(record, (0, 0, 1, 2))


def test_template_bank_covers_every_released_question_form(released):
    """Re-rendering a question's target phrase with the bank reproduces the original wording."""
    for records in released.values():
        for record in records:
            phrase = aug.parse_ssg_question(record.question)
            if phrase is None:
                continue
            canonical = f"What is the name of the {phrase}?"
            assert record.question in aug.question_rephrasings(canonical) + [canonical]
    # the GDQA file's own rephrasings ("There is a ..., what is its name?" etc.) are among them
    assert sum(r.question.startswith("There is a ") for r in released["GRPO-GDQA.json"]) > 300


def test_rephrasings_of_known_forms():
    q = "There is a brown anatomy, what is its name?"
    forms = aug.question_rephrasings(q)
    assert q not in forms
    assert "What is the brown anatomy?" in forms
    assert "There is a brown anatomy?; what name is it?" in forms
    loc = aug.question_rephrasings("What anatomy is at the top-left of the frame ?")
    assert "There is a top-left anatomy; what is it?" in loc
    back = aug.question_rephrasings("What is the top-left anatomy?")
    assert "What anatomy is at the top-left of the frame ?" in back
    generic = aug.question_rephrasings("Which organ is shown in this CT image?")
    assert "Based on the image, which organ is shown in this CT image?" in generic
    assert aug.parse_ssg_question("What is the anatomical structure shown in this CT image?") is None


def test_kinds_select_what_changes():
    record = Record("q", ("i.png",), "What is the red anatomy?", ("Liver", "Gut", "Omentum", "Gallbladder"), "B", "Gut")
    rng = np.random.default_rng(1)
    only_perm = aug.make_variants(record, 6, rng, kinds=("permute",))
    assert all(v.question == record.question and v.prompt_variant == "" for v in only_perm)
    assert len({v.options for v in only_perm}) == 6
    only_q = aug.make_variants(record, 4, rng, kinds=("rephrase",))
    assert all(v.options == record.options for v in only_q) and len({v.question for v in only_q}) == 4
    only_t = aug.make_variants(record, 3, rng, kinds=("template",), templates=("grpo", "numbered"))
    assert [v.prompt_variant for v in only_t][0] == "" and {v.prompt_variant for v in only_t[1:]} <= {"grpo", "numbered"}
    with pytest.raises(ValueError):
        aug.make_variants(record, 2, rng, kinds=("paraphrase",))


def test_triggers_and_state_round_trip(tmp_path):
    state = aug.GDQAState(trigger="adaptive", num_variants=3)
    assert not state.is_triggered("a")
    mask = state.observe(["a", "b"], np.array([1, 1, 1, 1, 0, 1, 0, 1]), 4)
    np.testing.assert_array_equal(mask, [True, False])
    assert state.is_triggered("a") and not state.is_triggered("b")
    state.observe(["a"], np.array([1, 0, 0, 0]), 4)  # its variants made the group informative
    assert not state.is_triggered("a")
    assert not state.calibrated
    # c: all wrong (hard); d: mixed; e: all right (easy, not hard); f: all-equal total reward, one right
    rewards = np.array([1, 1, 1, 1, 2, 1, 2, 2, 2, 1, 1, 1])
    correct = np.array([0, 0, 0, 0, 1, 0, 1, 1, 1, 0, 1, 0])
    assert state.calibrate(["c", "d", "e", "f"], rewards, correct, 3) == 2
    assert state.hard_ids == {"c", "f"} and state.is_triggered("c") and state.calibrated
    assert not state.is_triggered("e")
    state.observe(["c"], np.array([1, 1, 1]), 3)
    assert state.is_triggered("c")  # still all-equal: stays hard
    # the hard set decays: a query whose group diverges leaves it, and is no longer triggered
    state.observe(["c", "f"], np.array([1, 0, 0, 1, 1, 1]), 3)
    assert state.hard_ids == {"f"} and not state.is_triggered("c") and state.is_triggered("f")

    path = tmp_path / "gdqa.json"
    state.save(path)
    restored = aug.GDQAState.load(path)
    assert restored == state
    assert json.loads(path.read_text()) == state.to_json()

    # A run resumed under another method (the ablation's arms from one warm-up checkpoint) keeps
    # its configured trigger and the checkpoint's history.
    resumed = aug.GDQAState(trigger="off", num_variants=2).resumed(
        aug.GDQAState(trigger="adaptive", hard_ids={"h"}, last_all_equal={"a": True}, calibrated=True).to_json())
    assert (resumed.trigger, resumed.num_variants, resumed.hard_ids) == ("off", 2, {"h"})
    assert resumed.last_all_equal == {"a": True} and resumed.calibrated and not resumed.is_triggered("h")

    assert aug.GDQAState(trigger="always").is_triggered("x")
    off = aug.GDQAState(trigger="off", hard_ids={"x"})
    assert not off.is_triggered("x")
    with pytest.raises(KeyError):
        aug.GDQAState(trigger="sometimes")


def test_assign_group_variants_and_pooled_advantages():
    record = Record("q7", ("i.png",), "What is the white top-mid anatomy?", ("Liver", "Gut", "Omentum", "Gallbladder"), "A", "Liver")
    G = 8
    rng = np.random.default_rng(3)
    plain = aug.assign_group_variants(record, G, aug.GDQAState(trigger="off"), rng)
    assert len(plain) == G and all(r is record for r in plain)

    state = aug.GDQAState(trigger="always", num_variants=4)
    group = aug.assign_group_variants(record, G, state, rng)
    assert len(group) == G and group[0] is record
    assert all(group[j] == group[j + 4] for j in range(4))  # round-robin
    assert len({(r.question, r.options, r.prompt_variant) for r in group}) == 4
    for r in group:
        _check_variant(record, r)

    # A policy that always answers "A": right on variants where Liver sits under A, wrong elsewhere.
    completions = ["<think>x</think><answer>A</answer>"] * G
    plain_rewards, _ = compute_rewards(completions, plain, {"format": 1.0, "accuracy": 1.0})
    rewards, _ = compute_rewards(completions, group, {"format": 1.0, "accuracy": 1.0})
    expected_acc = [1.0 if r.answer == "A" else 0.0 for r in group]
    np.testing.assert_array_equal(rewards, 1.0 + np.array(expected_acc))
    assert bool(all_equal_groups(plain_rewards, G)[0])  # G copies: no gradient
    # pooled group of G: the ordinary group advantages over the G rewards, whatever the variants
    adv = np.asarray(group_advantages(rewards, G))
    ref = (rewards - rewards.mean()) / (rewards.std(ddof=1) + 1e-4)
    np.testing.assert_allclose(adv, ref, rtol=1e-5, atol=1e-6)
    perm = rng.permutation(G)
    np.testing.assert_allclose(np.asarray(group_advantages(rewards[perm], G)), adv[perm], rtol=1e-6)


def test_calibration_from_an_evaluation_result(tmp_path):
    """Queries whose sampled answers in the base model's evaluation all score alike start triggered."""
    from anatomy_r1_jax.evaluation.scoring import score

    records = [Record(id=f"q{i}", images=(), question="Which structure is shown?",
                      options=("Liver", "Gallbladder", "Fat"), answer="A", answer_text="Liver") for i in range(3)]
    right, wrong = "<think>t</think><answer>A</answer>", "<think>t</think><answer>B</answer>"
    sampled = [[right] * 3, [wrong] * 3, [right, wrong, wrong]]  # all right, all wrong, mixed
    outcomes = score(records, [right] * 3, sampled)
    path = tmp_path / "base_on_train.json"
    path.write_text(json.dumps({"settings": {"samples": 3}, "records": [o.to_json() for o in outcomes]}))
    state = aug.GDQAState(trigger="adaptive")
    assert state.calibrate_from_evaluation(path, [r.id for r in records]) == 1
    # all wrong is hard; all right is easy (no variants spent on it); mixed has signal
    assert state.hard_ids == {"q1"} and not state.is_triggered("q0") and not state.is_triggered("q2")

    with pytest.raises(ValueError, match="q2.*not a training record"):
        aug.GDQAState().calibrate_from_evaluation(path, ["q0", "q1"])
    path.write_text(json.dumps({"settings": {"samples": 0}, "records": []}))
    with pytest.raises(ValueError, match="base_on_train.json.*--samples"):
        aug.GDQAState().calibrate_from_evaluation(path, ["q0"])
