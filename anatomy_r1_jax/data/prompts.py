"""Anatomy-R1 prompt templates, exactly as in the released data files, and their inverse (parsing).

The released files (`shared/data/anatomy_r1/`) carry three instruction texts:

- "grpo" (GRPO.json): one paragraph, "... answer the question ..." with the think-format request.
- "numbered" (GRPO-ASC-Learning.json): "... follow the instructions:" with two numbered items; the
  think-format example ends in "<answer>YOUR ANSWER HERE</answer>".
- "numbered_choice" (GRPO-GDQA.json): the same, but the example says "YOUR CHOICE HERE".

Each has a no-think counterpart for supervised warm-up (`sft_prompt` / `sft_instruction` in the files,
which also begin with "<image>"); in the "numbered" variants that one always says "YOUR CHOICE HERE".
A prompt is `header + "\\nQuestion:\\n" + question + "\\nAnatomy Options:\\n" + "A. ..\\nB. .."`.
In chat form the image comes first in the user turn and the text carries no `<image>` tag.
"""

from __future__ import annotations

import dataclasses
import re

from anatomy_r1_jax.data.records import LETTERS, Record

DEFAULT_VARIANT = "grpo"
IMAGE_TAG = "<image>"

_EXPERT = (
    "You are an expert in cholecystectomy surgical procedures, and I will provide you with a clinical "
    "image of a cholecystectomy surgery. Please analyze the image and "
)
_GRPO_TASK = (
    "answer the question. You should only return the answer of the question, not any other text. "
)
_NUMBERED_TASK = (
    "follow the instructions:\n\n1.Select the most suitable option for the problem based on the given "
    "anatomy options. Only one correct answer exists. You should only return the choice letter, not "
    "any other text.\n\n2."
)
_THINK_FORMAT = (
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags. "
    "The output answer format should be as follows:<think> ... </think> <answer>{slot}</answer>."
)
_ANSWER_FORMAT = (
    "Output the final answer in <answer> </answer> tags. "
    "The output answer format should be as follows:<answer>{slot}</answer>."
)
_ANSWER_SLOT = "YOUR ANSWER HERE"
_CHOICE_SLOT = "YOUR CHOICE HERE"

#: variant -> (think-format header, no-think header)
HEADERS: dict[str, tuple[str, str]] = {
    "grpo": (
        _EXPERT + _GRPO_TASK + _THINK_FORMAT.format(slot=_ANSWER_SLOT),
        _EXPERT + _GRPO_TASK + _ANSWER_FORMAT.format(slot=_ANSWER_SLOT),
    ),
    "numbered": (
        _EXPERT + _NUMBERED_TASK + _THINK_FORMAT.format(slot=_ANSWER_SLOT),
        _EXPERT + _NUMBERED_TASK + _ANSWER_FORMAT.format(slot=_CHOICE_SLOT),
    ),
    "numbered_choice": (
        _EXPERT + _NUMBERED_TASK + _THINK_FORMAT.format(slot=_CHOICE_SLOT),
        _EXPERT + _NUMBERED_TASK + _ANSWER_FORMAT.format(slot=_CHOICE_SLOT),
    ),
}
#: the paper's templates (what GDQA's template variants draw from)
VARIANTS = tuple(HEADERS)
#: a short header for tiny CPU runs, where the paper's 100-token header dominates the compute
HEADERS["compact"] = ("Answer in <think> </think> <answer> </answer> tags.",
                      "Answer in <answer> </answer> tags.")

_QUESTION_MARK = "\nQuestion:\n"
_OPTIONS_MARK = "\nAnatomy Options:\n"
_OPTION_LINE = re.compile(r"^([A-Z])\. (.*)$")


@dataclasses.dataclass(frozen=True)
class ParsedInstruction:
    """An instruction text split into its parts. variant is "" when the header is not a known one."""

    variant: str
    think: bool
    header: str
    question: str
    options: tuple[str, ...]


def _variant_of(record: Record, variant: str | None) -> str:
    name = variant or record.prompt_variant or DEFAULT_VARIANT
    if name not in HEADERS:
        raise ValueError(f"unknown prompt variant {name!r} (record {record.id!r}); known: {VARIANTS}")
    return name


def option_lines(options: tuple[str, ...] | list[str]) -> list[str]:
    """The option lines, without newlines: ["A. ..", "B. ..", ...]."""
    return [f"{LETTERS[i]}. {text}" for i, text in enumerate(options)]


def question_block(question: str, options: tuple[str, ...] | list[str]) -> str:
    """The part after the header: "\\nQuestion:\\n{q}\\nAnatomy Options:\\nA. ..\\nB. .."."""
    return f"{_QUESTION_MARK}{question}{_OPTIONS_MARK}" + "\n".join(option_lines(options))


def format_question(record: Record, variant: str | None = None) -> str:
    """The think-format instruction text (the files' `instruction` field) for a record.

    variant: one of VARIANTS; None takes record.prompt_variant, else DEFAULT_VARIANT ("grpo").
    """
    return HEADERS[_variant_of(record, variant)][0] + question_block(record.question, record.options)


def question_pieces(record: Record, variant: str | None = None) -> tuple[str, str, tuple[str, ...]]:
    """format_question's text cut after each newline that a letter follows (where Qwen2's
    pre-tokenizer always cuts, so token counts add up over the pieces): the header, the question
    with the options heading, and the option lines. "".join((header, question, *lines)) equals
    format_question(record, variant)."""
    header = HEADERS[_variant_of(record, variant)][0] + _QUESTION_MARK[0]
    lines = option_lines(record.options)
    return (header, f"{_QUESTION_MARK[1:]}{record.question}{_OPTIONS_MARK}",
            tuple(line + "\n" for line in lines[:-1]) + tuple(lines[-1:]))


def format_sft_prompt(record: Record, variant: str | None = None, image_tag: bool = False) -> str:
    """The no-think instruction for supervised warm-up; image_tag=True prefixes "<image>" as the files do."""
    text = HEADERS[_variant_of(record, variant)][1] + question_block(record.question, record.options)
    return IMAGE_TAG + text if image_tag else text


def parse_instruction(text: str) -> ParsedInstruction:
    """Split an Anatomy-R1 instruction into header, question and options (inverse of format_question).

    Accepts the think and no-think headers of every variant, with or without a leading "<image>";
    an unknown header is kept (variant ""). The no-think texts of "numbered" and "numbered_choice" are
    identical and parse as "numbered". Raises ValueError naming what is malformed.
    """
    body_at = text.find(_QUESTION_MARK)
    if body_at < 0:
        raise ValueError("instruction has no '\\nQuestion:\\n' marker")
    header, rest = text[:body_at], text[body_at + len(_QUESTION_MARK):]
    question, sep, option_text = rest.rpartition(_OPTIONS_MARK)
    if not sep:
        raise ValueError("instruction has no '\\nAnatomy Options:\\n' marker after the question")
    options = []
    for i, line in enumerate(option_text.split("\n")):
        match = _OPTION_LINE.match(line)
        if match is None or match.group(1) != LETTERS[i]:
            raise ValueError(f"option line {i + 1} is {line!r}, expected '{LETTERS[i]}. <text>'")
        options.append(match.group(2))
    bare = header[len(IMAGE_TAG):] if header.startswith(IMAGE_TAG) else header
    variant, think = "", True
    for name, (think_header, plain_header) in HEADERS.items():
        if bare in (think_header, plain_header):
            variant, think = name, bare == think_header
            break
    return ParsedInstruction(variant, think, header, question, tuple(options))


def chat_messages(record: Record, variant: str | None = None, think: bool = True) -> list[dict]:
    """The user turn in transformers' chat format: the image(s) first, then the instruction text.

    [{"role": "user", "content": [{"type": "image", "image": path}, ..., {"type": "text", "text": ...}]}]
    No system message: Qwen2-VL's chat template then adds its default one, as ms-swift does.
    think=False gives the no-think (SFT) instruction.
    """
    text = format_question(record, variant) if think else format_sft_prompt(record, variant)
    content = [{"type": "image", "image": path} for path in record.images]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def sft_target(record: Record) -> str:
    """No-think supervised target: "<answer>B</answer>"."""
    return f"<answer>{record.answer}</answer>"


def default_reasoning(record: Record) -> str:
    """A short, correct rationale for think-format warm-up when the source has none."""
    return (
        f"The question asks: {record.question} In the image this is the {record.answer_text}, "
        f"which is option {record.answer}."
    )


def think_target(record: Record, reasoning: str | None = None, answer: str | None = None) -> str:
    """Think-format supervised target "<think>...</think><answer>B</answer>" (answer defaults to the
    letter; pass the option text for runs scored with the lenient accuracy reward).

    It scores 1 under the authors' format reward (no trailing newline after </answer>).
    """
    thought = (reasoning if reasoning is not None else default_reasoning(record)).strip()
    return f"<think>{thought}</think><answer>{record.answer if answer is None else answer}</answer>"


def warmup_target(record: Record, target: str = "think", answer: str = "letter") -> str:
    """The supervised warm-up's target text for `record` (config sft.target, sft.answer):
    target "answer": "<answer>B</answer>" (sft_target); "think": the think format with a short
    rationale naming the structure ("<think>It is the Liver.</think><answer>B</answer>"; long
    rationales do not fit tiny completion budgets). answer "text" answers with the option text instead
    of its letter: tiny models from scratch learn to name a structure long before they learn to copy
    its letter from the option list; such runs score with the lenient accuracy reward, which accepts
    the text."""
    if target not in ("answer", "think"):
        raise ValueError(f"config sft.target={target!r}: use 'answer' or 'think'")
    if answer not in ("letter", "text"):
        raise ValueError(f"config sft.answer={answer!r}: use 'letter' or 'text'")
    if target == "answer":
        return sft_target(record)
    return think_target(record, reasoning=f"It is the {record.answer_text}.",
                        answer=record.answer_text if answer == "text" else None)
