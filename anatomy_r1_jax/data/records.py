"""The one internal record type every reader produces and every stage consumes."""

from __future__ import annotations

import dataclasses
import string

LETTERS = string.ascii_uppercase


@dataclasses.dataclass(frozen=True)
class Record:
    """A multiple-choice visual question.

    options are the option texts in letter order (options[0] is "A"); answer is the correct letter;
    answer_text == options[LETTERS.index(answer)]. category is the anatomy class (SSG-VQA), or the
    modality / question type (OmniMedVQA) when known.

    question_type is the source's question kind when it has one (OmniMedVQA "Anatomy Identification",
    synthetic "location" / "attribute" / "relation"). prompt_variant names the instruction template the
    source file used (see data/prompts.py: "grpo", "numbered", "numbered_choice"); "" means the
    trainer's configured default.
    """

    id: str
    images: tuple[str, ...]
    question: str
    options: tuple[str, ...]
    answer: str
    answer_text: str
    category: str = ""
    source: str = ""
    question_type: str = ""
    prompt_variant: str = ""

    @property
    def answer_index(self) -> int:
        return LETTERS.index(self.answer)

    def letters(self) -> str:
        return LETTERS[: len(self.options)]

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["images"] = list(self.images)
        d["options"] = list(self.options)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Record":
        return cls(**{**d, "images": tuple(d["images"]), "options": tuple(d["options"])})
