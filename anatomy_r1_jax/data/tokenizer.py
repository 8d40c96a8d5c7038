"""A tiny Qwen2-VL tokenizer + processor for small runs (no real Qwen tokenizer is available offline).

build_tiny_tokenizer trains a byte-level BPE with `tokenizers` on a fixed corpus (the Anatomy-R1
prompt templates, the synthetic question grammar, option lines, answer formats) using Qwen2's own
pre-tokenizer (its split regex, then byte-level), appends Qwen2-VL's special tokens at the end of the
vocabulary (as Qwen does), and saves a Hugging Face tokenizer folder (Qwen2Tokenizer, Qwen2-VL chat
template) plus a preprocessor_config.json for the PIL image processor.

load_processor builds a `transformers.Qwen2VLProcessor` from such a folder, or from a real Qwen2-VL /
Qwen2.5-VL checkpoint. transformers' Qwen2VLProcessor insists on a video processor, which needs
torchvision (never installed here); ImageOnlyQwen2VLProcessor is the same processor without it.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE

from anatomy_r1_jax.data import synthetic
from anatomy_r1_jax.data.prompts import HEADERS, default_reasoning, question_block
from anatomy_r1_jax.data.records import LETTERS, Record

# Qwen2-VL's added tokens, in its id order (151643..151656 in the real vocabulary).
QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# The chat template shipped with Qwen2-VL-2B/7B-Instruct (chat_template.json).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen2's pre-tokenizer split (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 84 * 84

_REASONING_WORDS = (
    "The image shows a red region with diagonal stripes, a brown smooth region, a white glossy region, "
    "a yellow lobulated region, a pink region with wavy bands and a dark red speckled region. "
    "The question asks about the region in the top left, top right, bottom left, bottom right, center. "
    "Looking at the colour and texture, this is the liver, gallbladder, omentum, gut, cystic plate or "
    "abdominal wall cavity. So the answer is option A, B, C or D. It is above, below, left, right of the "
    "grasper or hook instrument. 0 1 2 3 4 5 6 7 8 9 10 100 . , ; : ? ! ( ) [ ] - _ / \" '"
)


def tiny_corpus() -> list[str]:
    """The fixed training text: prompt headers, every synthetic question, option lines, answer formats."""
    # each header as the chat template lays it out (role names included, special tokens left out)
    texts = [f"system\nYou are a helpful assistant.\nuser\n{header}\nassistant\n"
             for pair in HEADERS.values() for header in pair]
    texts.append(_REASONING_WORDS)
    grid_words = [w for grid in (2, 3) for row in synthetic.location_names(grid) for w in row]
    colours = sorted({look.word for look in synthetic.APPEARANCE.values()} | {"silver"})
    for template in synthetic.LOCATION_TEMPLATES:
        texts += [template.format(loc=loc) for loc in grid_words]
    for template in synthetic.ATTRIBUTE_TEMPLATES:
        texts += [template.format(colour=colour) for colour in colours]
    references = [f"{look.word} {synthetic.snake_name(c)} anatomy" for c, look in synthetic.APPEARANCE.items()]
    references += [f"silver {tool} instrument" for tool in synthetic.TOOLS]
    for template, relation, reference in itertools.product(
            synthetic.RELATION_TEMPLATES, synthetic.DIRECTIONS, references):
        texts.append(template.format(relation=relation, reference=reference))
    for shift in range(len(synthetic.CLASSES)):
        options = synthetic.CLASSES[shift:] + synthetic.CLASSES[:shift]
        texts.append(question_block("What anatomy is at the center of the frame ?", options[:4]))
    for letter, name in zip(LETTERS, synthetic.CLASSES):
        example = Record(id="", images=(), question="What is the red anatomy?", options=synthetic.CLASSES,
                         answer=letter, answer_text=name)
        texts.append(default_reasoning(example))
    for letter in LETTERS[:4]:
        texts += [f"<answer>{letter}</answer>", f"<think> ... </think> <answer>{letter}</answer>",
                  f"<think>The answer is {letter}.</think><answer>{letter}</answer>"]
    return texts


def _train_backend(vocab_size: int) -> Tokenizer:
    backend = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                            fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(QWEN2_VL_SPECIAL_TOKENS), min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    backend.train_from_iterator(tiny_corpus(), trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_VL_SPECIAL_TOKENS])
    return backend


def build_tiny_tokenizer(
    out_dir: str | os.PathLike,
    vocab_size: int = 1024,
    min_pixels: int = TINY_MIN_PIXELS,
    max_pixels: int = TINY_MAX_PIXELS,
) -> str:
    """Train and save the tiny tokenizer folder; returns its path. Deterministic.

    vocab_size is an upper bound on len(tokenizer): the BPE stops early when the corpus has no more
    pairs to merge (the fixed corpus gives 663 in all), and the 14 special tokens come last. The image
    processor keeps images within [min_pixels, max_pixels] (84x84 -> 36 patches -> 9 image tokens).
    """
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if vocab_size < 256 + len(QWEN2_VL_SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must hold the 256 byte tokens and the special tokens, got {vocab_size}")
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=_train_backend(vocab_size), eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, bos_token=None, model_max_length=32768,
        extra_special_tokens=list(QWEN2_VL_SPECIAL_TOKENS[1:]),
    )
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    out = Path(out_dir)
    tokenizer.save_pretrained(out)
    Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(out)
    return str(out)


def special_token_ids(tokenizer) -> dict[str, int]:
    """The ids a Qwen2-VL config needs (image/video/vision start/end, eos, pad), from a tokenizer."""
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("endoftext_token_id", "<|endoftext|>"), ("im_start_token_id", "<|im_start|>"))}
    ids.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))
    return ids


@functools.cache
def image_only_processor_class():
    """The ImageOnlyQwen2VLProcessor class (made on first use: importing transformers is slow)."""
    from transformers import Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        """Qwen2VLProcessor without a video processor (transformers' one requires torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            # ProcessorMixin pairs positional parts with this signature, so the video slot is dropped.
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImageOnlyQwen2VLProcessor


def load_processor(path: str | os.PathLike, **image_processor_overrides):
    """A Qwen2VLProcessor (image-only) from a tokenizer folder or a Qwen2-VL / Qwen2.5-VL checkpoint.

    The image processor is transformers' PIL implementation (Qwen2VLImageProcessorPil); overrides such
    as min_pixels / max_pixels replace the saved ones. The chat template is the tokenizer's, else the
    folder's chat_template.json.
    """
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **image_processor_overrides)
    template = tokenizer.chat_template
    template_file = Path(path) / "chat_template.json"
    if template is None and template_file.exists():
        template = json.loads(template_file.read_text())["chat_template"]
    return image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)
