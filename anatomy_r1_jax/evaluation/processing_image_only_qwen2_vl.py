"""Qwen2-VL's processor without its video processor, for machines without torchvision.

This file is copied verbatim into every exported model folder (evaluation/export.py) and named
there by processor_config.json's auto_map, so that

    AutoProcessor.from_pretrained(DIR, trust_remote_code=True)

loads it: the PIL image processor (Qwen2VLImageProcessorPil, chosen by AutoImageProcessor when
torchvision is missing), the tokenizer and the chat template, no video processor. Without
trust_remote_code transformers' own Qwen2VLProcessor is loaded, which needs torchvision for its
video processor. It imports transformers only: it runs where this package is not installed.
"""

from transformers import Qwen2VLProcessor


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor with images and text only (video inputs are not supported)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # ProcessorMixin pairs its sub-processors with this signature: no video slot, so none is loaded.
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
