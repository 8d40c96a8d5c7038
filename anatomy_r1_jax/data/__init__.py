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
    warmup_target,
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
from anatomy_r1_jax.data.synthetic import CLASSES, CLASS_SIMILARITY, SIMILARITY_FILE, make_synthetic_dataset
from anatomy_r1_jax.data.tokenizer import build_tiny_tokenizer, load_processor, special_token_ids

__all__ = [
    "build_tiny_tokenizer", "chat_messages", "CLASS_SIMILARITY", "CLASSES", "DataError", "format_question",
    "format_sft_prompt", "FORMATS", "image_problem", "LETTERS", "load_image", "load_processor",
    "make_synthetic_dataset", "parse_instruction", "read_class_similarity", "read_records", "Record",
    "record_problems", "resolve_image_path", "sft_target", "SIMILARITY_FILE", "special_token_ids",
    "think_target", "VARIANTS", "warmup_target", "write_class_similarity", "write_records",
]
