"""Prompt templates: exact round trip with the released Anatomy-R1 files, chat form, SFT targets."""

import json
import re
from pathlib import Path

import pytest

from anatomy_r1_jax.data import (
    Record,
    chat_messages,
    format_question,
    format_sft_prompt,
    parse_instruction,
    read_records,
    sft_target,
    think_target,
    warmup_target,
)

RELEASED = Path("/work/shared/data/anatomy_r1")
FILES = {"GRPO.json": "grpo", "GRPO-ASC-Learning.json": "numbered", "GRPO-GDQA.json": "numbered_choice"}
FORMAT_REWARD = re.compile(r"^<think>.*?</think>\s*<answer>.*?</answer>(?![\s\S])", re.DOTALL | re.MULTILINE)

RECORD = Record(
    id="q1", images=("a.png",), question="What anatomy is at the top-left of the frame ?",
    options=("Liver", "Gut", "Omentum", "Gallbladder"), answer="B", answer_text="Gut", category="Gut",
)


@pytest.mark.skipif(not RELEASED.exists(), reason="released Anatomy-R1 records not present")
@pytest.mark.parametrize("name", sorted(FILES))
def test_released_records_round_trip_exactly(name):
    raw = json.loads((RELEASED / name).read_text())
    records = read_records(RELEASED / name)
    assert len(records) == len(raw) == 1000
    for record, item in zip(records, raw):
        assert record.prompt_variant == FILES[name]
        assert format_question(record) == item["instruction"]
        assert format_sft_prompt(record, image_tag=True) == item.get("sft_prompt", item.get("sft_instruction"))


def test_variant_override_and_default():
    assert format_question(RECORD).startswith("You are an expert") and "answer the question." in format_question(RECORD)
    numbered = format_question(RECORD, "numbered")
    assert "follow the instructions:\n\n1.Select" in numbered and "<answer>YOUR ANSWER HERE</answer>." in numbered
    assert "<answer>YOUR CHOICE HERE</answer>." in format_question(RECORD, "numbered_choice")
    assert format_question(RECORD).endswith(
        "\nQuestion:\nWhat anatomy is at the top-left of the frame ?\nAnatomy Options:\n"
        "A. Liver\nB. Gut\nC. Omentum\nD. Gallbladder"
    )
    with pytest.raises(ValueError, match="unknown prompt variant 'cot'.*q1"):
        format_question(RECORD, "cot")


def test_parse_instruction_inverts_every_header():
    for variant in ("grpo", "numbered", "numbered_choice"):
        for think, text in ((True, format_question(RECORD, variant)), (False, format_sft_prompt(RECORD, variant, True))):
            parsed = parse_instruction(text)
            # the no-think texts of "numbered" and "numbered_choice" are the same; they parse as "numbered"
            assert (parsed.variant, parsed.think) == (variant if think else variant.replace("_choice", ""), think)
            assert parsed.question == RECORD.question and parsed.options == RECORD.options


def test_parse_instruction_unknown_header_and_malformed_text():
    parsed = parse_instruction("Answer it.\nQuestion:\nWhat?\nAnatomy Options:\nA. x\nB. y")
    assert (parsed.variant, parsed.question, parsed.options) == ("", "What?", ("x", "y"))
    with pytest.raises(ValueError, match="no '\\\\nQuestion:"):
        parse_instruction("What is this?")
    with pytest.raises(ValueError, match="Anatomy Options"):
        parse_instruction("h\nQuestion:\nWhat?\nA. x")
    with pytest.raises(ValueError, match="option line 2 is 'C. y'"):
        parse_instruction("h\nQuestion:\nWhat?\nAnatomy Options:\nA. x\nC. y")


def test_chat_messages_put_the_image_first():
    messages = chat_messages(RECORD)
    assert len(messages) == 1 and messages[0]["role"] == "user"
    content = messages[0]["content"]
    assert content[0] == {"type": "image", "image": "a.png"}
    assert content[1] == {"type": "text", "text": format_question(RECORD)}
    assert "<image>" not in content[1]["text"]
    assert chat_messages(RECORD, think=False)[0]["content"][1]["text"] == format_sft_prompt(RECORD)


def test_targets_satisfy_the_authors_rewards():
    assert sft_target(RECORD) == "<answer>B</answer>"
    target = think_target(RECORD)
    assert FORMAT_REWARD.match(target)
    assert re.search(r"<answer>(.*?)</answer>", target).group(1).strip() == "B"
    assert think_target(RECORD, "  top-left is red and banded  ") == (
        "<think>top-left is red and banded</think><answer>B</answer>"
    )


def test_warmup_targets_by_config():
    """sft.target x sft.answer: the no-think answer, or the think format answering with the letter
    or the option text; each scores 1 on format (think) and on the accuracy it is trained for."""
    text = RECORD.answer_text
    assert warmup_target(RECORD, "answer", "letter") == "<answer>B</answer>"
    assert warmup_target(RECORD, "think", "letter") == f"<think>It is the {text}.</think><answer>B</answer>"
    by_text = warmup_target(RECORD, "think", "text")
    assert by_text == f"<think>It is the {text}.</think><answer>{text}</answer>" and FORMAT_REWARD.match(by_text)
    with pytest.raises(ValueError, match="config sft.answer='Text'"):
        warmup_target(RECORD, "think", "Text")
    with pytest.raises(ValueError, match="config sft.target='cot'"):
        warmup_target(RECORD, "cot", "letter")
