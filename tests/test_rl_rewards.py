import numpy as np
import pytest

from anatomy_r1_jax.data.records import Record
from anatomy_r1_jax.rl import rewards
from anatomy_r1_jax.rl.rewards import compute_rewards, register_reward

@register_reward("test_length_penalty")
def _length_penalty(completions, targets):
    return [-len(c) / 100 for c in completions]


REC = Record(
    id="r0",
    images=("x.png",),
    question="What anatomy is at the top-mid of the frame ?",
    options=("Gallbladder", "Liver", "Abdominal Wall Cavity", "Omentum"),
    answer="A",
    answer_text="Gallbladder",
    category="Gallbladder",
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>look</think><answer>A</answer>", 1.0),
        ("<think>look</think> \n <answer>A</answer>", 1.0),
        ("<think>multi\nline</think>\n<answer>B</answer>", 1.0),
        ("<think>look</think><answer>A</answer>\n", 0.0),  # trailing newline scores 0
        ("<think>look</think><answer>A</answer> ", 0.0),
        (" <think>look</think><answer>A</answer>", 0.0),
        ("<answer>A</answer>", 0.0),
        ("<think>look</think>text<answer>A</answer>", 0.0),
        ("<think>look</think><answer>A</answer><answer>B</answer>", 1.0),
    ],
)
def test_format_reward(text, expected):
    assert rewards.format_reward(text) == expected


@pytest.mark.parametrize(
    "text, strict, lenient",
    [
        ("<think>x</think><answer>A</answer>", 1.0, 1.0),
        ("<think>x</think><answer> A \n</answer>", 1.0, 1.0),
        ("<think>x</think><answer>B</answer>", 0.0, 0.0),
        ("<think>x</think><answer>(A)</answer>", 0.0, 1.0),
        ("<think>x</think><answer>A.</answer>", 0.0, 1.0),
        ("<think>x</think><answer>A. Gallbladder</answer>", 0.0, 1.0),
        ("<think>x</think><answer>(A) gallbladder</answer>", 0.0, 1.0),
        ("<think>x</think><answer>A. Liver</answer>", 0.0, 0.0),  # letter and text disagree
        ("<think>x</think><answer>B. Gallbladder</answer>", 0.0, 0.0),
        ("<think>x</think><answer>Gallbladder</answer>", 0.0, 1.0),
        ("<think>x</think><answer>gallbladder.</answer>", 0.0, 1.0),
        ("<think>x</think><answer>Gut</answer>", 0.0, 0.0),
        ("<think>x</think><answer>a</answer>", 0.0, 0.0),
        ("<answer>A</answer><answer>B</answer>", 1.0, 1.0),  # first answer tag counts
        ("<answer>B</answer><answer>A</answer>", 0.0, 0.0),
        ("A", 0.0, 0.0),  # no answer tag
    ],
)
def test_accuracy_strict_and_lenient(text, strict, lenient):
    assert rewards.accuracy_reward(text, REC) == strict
    assert rewards.accuracy_reward(text, "A") == strict
    assert rewards.lenient_accuracy_reward(text, REC) == lenient


def test_solution_string_forms():
    assert rewards.solution_letter("<answer> B </answer>") == "B"
    assert rewards.solution_letter(" C ") == "C"
    # lenient with a bare solution letter cannot check option text: letter decides
    assert rewards.lenient_accuracy_reward("<answer>A. Liver</answer>", "A") == 1.0
    assert rewards.lenient_accuracy_reward("<answer>Gallbladder</answer>", "A") == 0.0


def test_compute_rewards_weights_and_registry():
    completions = [
        "<think>x</think><answer>A</answer>",
        "<think>x</think><answer>B</answer>",
        "<answer>A</answer>",
        "<think>x</think><answer>A. Gallbladder</answer>\n",
    ]
    total, per = compute_rewards(completions, [REC] * 4, {"format": 1.0, "accuracy": 2.0})
    np.testing.assert_array_equal(per["format"], [1, 1, 0, 0])
    np.testing.assert_array_equal(per["accuracy"], [1, 0, 1, 0])
    np.testing.assert_array_equal(total, [3, 1, 2, 0])
    assert total.dtype == np.float32

    total, per = compute_rewards(completions[:2], ["A", "A"], [("accuracy_lenient", 1.0), ("test_length_penalty", 0.5)])
    np.testing.assert_allclose(total, [1 - 0.5 * 34 / 100, -0.5 * 34 / 100], rtol=1e-6)
    with pytest.raises(KeyError, match="unknown reward"):
        compute_rewards(completions, [REC] * 4, {"nope": 1.0})
    with pytest.raises(ValueError):
        compute_rewards(completions, [REC], {"format": 1.0})
    with pytest.raises(ValueError, match="already registered"):
        register_reward("format")(lambda c, t: [0.0] * len(c))
