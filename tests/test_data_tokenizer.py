"""Tiny tokenizer: deterministic, loadable by AutoTokenizer, Qwen2-VL special tokens and chat template,
and a Qwen2VLProcessor that expands the image pad to the merged patch count."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anatomy_r1_jax.data import Record, chat_messages, format_question, think_target
from anatomy_r1_jax.data.tokenizer import (
    QWEN2_VL_CHAT_TEMPLATE,
    QWEN2_VL_SPECIAL_TOKENS,
    build_tiny_tokenizer,
    load_processor,
    special_token_ids,
)

RECORD = Record(id="q", images=("frame.png",), question="What is the red center anatomy?",
                options=("Gut", "Liver", "Cystic Plate", "Omentum"), answer="C", answer_text="Cystic Plate")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_deterministic_small_vocabulary_with_qwen_specials_last(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    again = build_tiny_tokenizer(tmp_path)
    assert (Path(again) / "tokenizer.json").read_bytes() == (Path(tiny_dir) / "tokenizer.json").read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer" and 512 <= len(tokenizer) <= 1024
    ids = tokenizer.convert_tokens_to_ids(list(QWEN2_VL_SPECIAL_TOKENS))
    assert ids == list(range(len(tokenizer) - len(QWEN2_VL_SPECIAL_TOKENS), len(tokenizer)))
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert tokenizer.chat_template == QWEN2_VL_CHAT_TEMPLATE
    found = special_token_ids(tokenizer)
    assert found["image_token_id"] == ids[12] and found["vision_start_token_id"] == ids[9]
    assert found["eos_token_id"] == ids[2] and found["pad_token_id"] == ids[0] and found["vocab_size"] == len(tokenizer)
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_tokenizer(tmp_path / "small", vocab_size=100)


def test_text_round_trips_and_specials_are_atomic(tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    for text in (format_question(RECORD, "numbered_choice"), think_target(RECORD), "Unseen wörds 123 ✓\n"):
        assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = tokenizer.encode("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>")
    assert tokenizer.convert_ids_to_tokens(ids)[:4] == ["<|im_start|>", "user", "Ċ", "<|vision_start|>"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert len(tokenizer.encode(format_question(RECORD))) < 200  # the tiny vocabulary covers the prompt


@pytest.mark.parametrize("size, tokens", [(84, 9), (56, 4)])
def test_processor_expands_the_image_pad(tiny_dir, size, tokens):
    from transformers import Qwen2VLProcessor

    processor = load_processor(tiny_dir)
    assert isinstance(processor, Qwen2VLProcessor)
    text = processor.apply_chat_template(chat_messages(RECORD), tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|image_pad|><|vision_end|>You are an expert")
    assert text.endswith("D. Omentum<|im_end|>\n<|im_start|>assistant\n")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))
    batch = processor(text=[text], images=[image], return_tensors="np")
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((batch["input_ids"] == image_id).sum()) == tokens
    assert batch["image_grid_thw"].tolist() == [[1, size // 14, size // 14]]
    assert batch["pixel_values"].shape == (tokens * 4, 3 * 2 * 14 * 14)
    assert np.array_equal(batch["mm_token_type_ids"] == 1, batch["input_ids"] == image_id)


def test_processor_overrides_pixel_budget(tiny_dir):
    processor = load_processor(tiny_dir, max_pixels=56 * 56)
    text = processor.apply_chat_template(chat_messages(RECORD), tokenize=False, add_generation_prompt=True)
    image = Image.new("RGB", (84, 84), (180, 50, 50))
    assert processor(text=[text], images=[image], return_tensors="np")["image_grid_thw"].tolist() == [[1, 4, 4]]
