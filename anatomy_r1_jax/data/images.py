"""Image paths and image files: where a record's image lives, whether it can be read, loading it."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image


def resolve_image_path(raw: str, image_root: str | os.PathLike | None, base_dir: str | os.PathLike) -> str:
    """Where a record's image path points.

    Surrounding whitespace is dropped (the released Anatomy-R1 paths begin with a space).
    With image_root every path is put under it: a relative path is joined to it and an absolute one is
    re-rooted (its leading "/" dropped, then joined), so " /CholecT45/data/VID66/000791.png" with root
    "/data" becomes "/data/CholecT45/data/VID66/000791.png". Without image_root an absolute path is kept
    and a relative one is taken relative to base_dir (the data file's folder).
    """
    path = raw.strip()
    if image_root is not None:
        return str(Path(image_root) / path.lstrip("/\\"))
    if os.path.isabs(path):
        return path
    return str(Path(base_dir) / path)


def image_problem(path: str) -> str | None:
    """None if the file exists and PIL decodes it fully; otherwise what is wrong, naming the path."""
    if not os.path.isfile(path):
        return f"image file not found: {path}"
    try:
        with Image.open(path) as image:
            image.load()
            if image.width == 0 or image.height == 0:
                return f"image has zero size: {path}"
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return f"image cannot be decoded ({type(error).__name__}: {error}): {path}"
    return None


def load_image(path: str) -> Image.Image:
    """The image as an RGB PIL image (fully loaded, file closed)."""
    with Image.open(path) as image:
        return image.convert("RGB")
