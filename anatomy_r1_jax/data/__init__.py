"""Data layer: records, readers of the supported formats, prompts, images, the synthetic benchmark,
and the tiny tokenizer / processor for small runs."""

from anatomy_r1_jax.data.images import image_problem, load_image, resolve_image_path
from anatomy_r1_jax.data.prompts import (
    VARIANTS,
    chat_messages,
    format_question,
    format_sft_prompt,
    parse_instruction,
    sft_target,
    think_target,
)
from anatomy_r1_jax.data.readers import (
    FORMATS,
    DataError,
    read_class_similarity,
    read_records,
    record_problems,
    write_class_similarity,
    write_records,
)
from anatomy_r1_jax.data.records import LETTERS, Record

__all__ = [
    "FORMATS", "LETTERS", "VARIANTS", "DataError", "Record", "chat_messages", "format_question",
    "format_sft_prompt", "image_problem", "load_image", "parse_instruction", "read_class_similarity",
    "read_records", "record_problems", "resolve_image_path", "sft_target", "think_target",
    "write_class_similarity", "write_records",
]
