"""Synthetic laparoscopic-style anatomy VQA: the project's embedded default dataset.

Each frame is a grid of cells (3x3 at 84x84 px, 2x2 at 56x56; one cell = 28x28 px = one merged
Qwen2-VL image token). Three to five cells hold one anatomy each, drawn as a shaded blob with its
class's colour and texture; the others show background tissue. Up to two surgical tools (grasper,
hook) enter from the frame edge with their tip in a cell. Questions follow SSG-VQA's grammar
(location, colour attribute, relation to another anatomy or a tool), always with exactly one correct
anatomy that is visible, and 4 options: the correct class plus 3 distractors drawn uniformly from the
other 5 (as in the released data).

Visual similarity is designed in: Abdominal Wall Cavity, Cystic Plate and Gut are all red and differ
by texture (fibres, speckle, bands); Liver is brown and close to the red ones; Gallbladder (white) and
Omentum (yellow) are pale. CLASS_SIMILARITY states that design as a [6, 6] matrix (diagonal 1),
saved beside the data as class_similarity.json; S(q) = mean similarity(correct, distractors) then
ranges from about 0.05 to 0.75 across questions.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from anatomy_r1_jax.data.readers import write_class_similarity, write_records
from anatomy_r1_jax.data.records import LETTERS, Record

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
CLASSES = ("Liver", "Omentum", "Abdominal Wall Cavity", "Gallbladder", "Cystic Plate", "Gut")
TOOLS = ("grasper", "hook")
SIMILARITY_FILE = "class_similarity.json"
SPLITS = ("train", "val", "test")
CELL_PIXELS = 28  # Qwen2-VL: 14 px patches merged 2x2


@dataclasses.dataclass(frozen=True)
class Appearance:
    """How a class is drawn: base colour (RGB), texture name and amplitude, and its SSG-VQA colour word."""

    colour: tuple[int, int, int]
    texture: str
    amplitude: float
    word: str


APPEARANCE = {
    "Liver": Appearance((118, 58, 40), "mottled", 22.0, "brown"),
    "Omentum": Appearance((224, 192, 92), "lobules", 30.0, "yellow"),
    "Abdominal Wall Cavity": Appearance((184, 50, 50), "fibres", 34.0, "red"),
    "Gallbladder": Appearance((214, 218, 196), "glossy", 26.0, "white"),
    "Cystic Plate": Appearance((160, 54, 60), "speckle", 30.0, "red"),
    "Gut": Appearance((198, 88, 92), "bands", 34.0, "red"),
}
BACKGROUND = (92, 42, 58)
TOOL_METAL = (176, 180, 188)

# Designed visual similarity (rows and columns in CLASSES order); see the module docstring.
CLASS_SIMILARITY = np.array([
    # Liver Omentum AWC   Gallbl. Cystic Gut
    [1.00, 0.15, 0.45, 0.10, 0.60, 0.40],  # Liver
    [0.15, 1.00, 0.10, 0.50, 0.10, 0.15],  # Omentum
    [0.45, 0.10, 1.00, 0.05, 0.80, 0.75],  # Abdominal Wall Cavity
    [0.10, 0.50, 0.05, 1.00, 0.05, 0.10],  # Gallbladder
    [0.60, 0.10, 0.80, 0.05, 1.00, 0.75],  # Cystic Plate
    [0.40, 0.15, 0.75, 0.10, 0.75, 1.00],  # Gut
])

DIRECTIONS = {"below": (1, 0), "above": (-1, 0), "to the left of": (0, -1), "on the right side of": (0, 1)}
LOCATION_TEMPLATES = ("What anatomy is at the {loc} of the frame ?", "What is the {loc} anatomy?")
ATTRIBUTE_TEMPLATES = ("What is the {colour} anatomy?", "There is a {colour} anatomy, what is its name?")
ATTRIBUTE_LOCATION_TEMPLATE = "What is the {colour} {loc} anatomy?"
RELATION_TEMPLATES = (
    "What is the name of the anatomy that is {relation} the {reference}?",
    "What name is the anatomy that is {relation} the {reference}?",
)
DEFAULT_QUESTION_MIX = {"location": 0.4, "attribute": 0.3, "relation": 0.3}


def snake_name(name: str) -> str:
    """SSG-VQA spells classes in questions as abdominal_wall_cavity, cystic_plate, ..."""
    return name.lower().replace(" ", "_")


def location_names(grid: int) -> list[list[str]]:
    """SSG-VQA location words per cell: 3x3 top-left .. center .. bottom-right; 2x2 the four corners."""
    if grid == 2:
        return [["top-left", "top-right"], ["bottom-left", "bottom-right"]]
    if grid == 3:
        rows, cols = ("top", "mid", "bottom"), ("left", "mid", "right")
        return [["center" if (r, c) == ("mid", "mid") else f"{r}-{c}" for c in cols] for r in rows]
    raise ValueError(f"grid must be 2 or 3 cells per side, got {grid}")


@dataclasses.dataclass(frozen=True)
class Scene:
    """Which class sits in which cell ((row, col) -> class) and where each tool's tip is."""

    grid: int
    anatomy: dict[tuple[int, int], str]
    tools: dict[str, tuple[int, int]]

    def cell_of(self, name: str) -> tuple[int, int]:
        return next(cell for cell, c in self.anatomy.items() if c == name)


def sample_scene(rng: np.random.Generator, grid: int, target: str) -> Scene:
    """A random layout that contains target: 3-5 distinct classes (2-3 on a 2x2 grid), 0-2 tools."""
    cells = [(r, c) for r in range(grid) for c in range(grid)]
    low = max(2, len(cells) // 3)
    count = int(rng.integers(low, len(cells) // 2 + 2))
    others = [c for c in CLASSES if c != target]
    chosen = [target] + [others[i] for i in rng.choice(len(others), count - 1, replace=False)]
    placed = [cells[i] for i in rng.choice(len(cells), count, replace=False)]
    anatomy = dict(zip(placed, chosen))
    free = [cell for cell in cells if cell not in anatomy] or cells
    n_tools = int(rng.integers(0, len(TOOLS) + 1))
    tool_cells = [free[i] for i in rng.choice(len(free), min(n_tools, len(free)), replace=False)]
    tools = {TOOLS[i]: cell for i, cell in zip(rng.permutation(len(TOOLS)), tool_cells)}
    return Scene(grid, anatomy, tools)


def _texture(kind: str, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A brightness modulation field in about [-1, 1] over the pixel grid."""
    phase = rng.uniform(0, 2 * np.pi, 2)
    if kind == "mottled":
        size = (xx.shape[1], xx.shape[0])
        coarse = rng.normal(size=(max(2, size[1] // 12), max(2, size[0] // 12))).astype(np.float32)
        return np.asarray(Image.fromarray(coarse).resize(size, Image.BILINEAR)) / 1.5
    if kind == "lobules":
        return -np.cos(2 * np.pi * xx / 6 + phase[0]) * np.cos(2 * np.pi * yy / 6 + phase[1])
    if kind == "fibres":
        angle = np.pi / 4 + rng.uniform(-0.2, 0.2)
        return np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / 5 + phase[0])
    if kind == "glossy":
        return 0.3 * rng.normal(size=xx.shape) - 0.2
    if kind == "speckle":
        return np.where(rng.random(xx.shape) < 0.2, -1.6, 0.25) + 0.2 * rng.normal(size=xx.shape)
    if kind == "bands":
        return np.sin(2 * np.pi * (yy + 2.5 * np.sin(2 * np.pi * xx / 13 + phase[0])) / 7 + phase[1])
    raise ValueError(f"unknown texture {kind!r}")


def _draw_tool(draw: ImageDraw.ImageDraw, kind: str, tip: np.ndarray, size: int, rng: np.random.Generator) -> None:
    """A metal shaft from a frame edge to tip, ending in jaws (grasper) or a bent hook."""
    side = int(rng.integers(4))
    along = rng.uniform(0.15, 0.85) * size
    entry = np.array([[along, size], [0, along], [size, along], [along, 0]][side], dtype=float)
    direction = (tip - entry) / max(np.linalg.norm(tip - entry), 1.0)
    width = max(2, size // 28) + (1 if kind == "grasper" else 0)
    draw.line([tuple(entry), tuple(tip)], fill=TOOL_METAL, width=width)
    draw.line([tuple(entry), tuple(tip)], fill=(225, 227, 232), width=1)
    jaw = size / 10
    if kind == "grasper":
        for sign in (-1, 1):
            angle = sign * 0.5
            rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            draw.line([tuple(tip), tuple(tip + jaw * rot @ direction)], fill=(150, 154, 162), width=2)
    else:
        normal = np.array([-direction[1], direction[0]])
        bend = tip + jaw * 0.8 * normal
        draw.line([tuple(tip), tuple(bend), tuple(bend - jaw * 0.5 * direction)], fill=(120, 124, 132), width=2)


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """The frame as uint8 [image_size, image_size, 3]."""
    cell = image_size / scene.grid
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
    image = np.empty((image_size, image_size, 3), np.float32)
    image[:] = BACKGROUND
    image += 10.0 * _texture("mottled", yy, xx, rng)[..., None]
    margin = int(np.ceil(0.1 * cell))
    for (row, col), name in scene.anatomy.items():
        look = APPEARANCE[name]
        # work in the cell's window (plus a margin for the wobble) rather than on the whole frame
        y0, x0 = max(0, int(row * cell) - margin), max(0, int(col * cell) - margin)
        y1, x1 = min(image_size, int((row + 1) * cell) + margin), min(image_size, int((col + 1) * cell) + margin)
        wy, wx = yy[y0:y1, x0:x1], xx[y0:y1, x0:x1]
        cy, cx = (np.array([row, col]) + 0.5 + rng.uniform(-0.05, 0.05, 2)) * cell
        ry, rx = rng.uniform(0.38, 0.47, 2) * cell
        wobble = 1 + 0.08 * np.sin(3 * np.arctan2(wy - cy, wx - cx) + rng.uniform(0, 2 * np.pi))
        radius = np.sqrt(((wy - cy) / ry) ** 2 + ((wx - cx) / rx) ** 2) / wobble
        colour = np.array(look.colour, np.float32) + rng.uniform(-8, 8, 3)
        field = colour + look.amplitude * _texture(look.texture, wy, wx, rng)[..., None]
        if look.texture == "glossy":  # one broad highlight, upper left of the blob
            spot = np.exp(-(((wy - cy + ry / 3) / ry) ** 2 + ((wx - cx + rx / 3) / rx) ** 2) * 2.5)
            field += 40.0 * spot[..., None]
        rim = 1.0 - 0.3 * np.clip((radius - 0.75) / 0.25, 0, 1)  # darker edge: a rounded organ
        window = image[y0:y1, x0:x1]
        window[radius <= 1.0] = (field * rim[..., None])[radius <= 1.0]
    canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for kind, (row, col) in scene.tools.items():
        tip = (np.array([col, row]) + 0.5 + rng.uniform(-0.15, 0.15, 2)) * cell
        _draw_tool(draw, kind, tip, image_size, rng)
    image = np.asarray(canvas, np.float32) * rng.uniform(0.9, 1.1)
    centre = (image_size - 1) / 2
    falloff = ((yy - centre) ** 2 + (xx - centre) ** 2) / (2 * centre ** 2)
    image *= (1.0 - 0.35 * falloff)[..., None]  # laparoscope vignette
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _on_ray(scene: Scene, start: tuple[int, int], step: tuple[int, int]) -> list[str]:
    """The anatomy classes strictly beyond start in one direction (same row or column)."""
    found, (row, col) = [], start
    while True:
        row, col = row + step[0], col + step[1]
        if not (0 <= row < scene.grid and 0 <= col < scene.grid):
            return found
        if (row, col) in scene.anatomy:
            found.append(scene.anatomy[(row, col)])


def candidate_questions(scene: Scene, target: str, kind: str) -> list[str]:
    """Every question of one kind whose only correct anatomy in the scene is target."""
    locations = location_names(scene.grid)
    row, col = scene.cell_of(target)
    loc = locations[row][col]
    if kind == "location":
        return [t.format(loc=loc) for t in LOCATION_TEMPLATES]
    if kind == "attribute":
        colour = APPEARANCE[target].word
        if sum(APPEARANCE[c].word == colour for c in scene.anatomy.values()) == 1:
            return [t.format(colour=colour) for t in ATTRIBUTE_TEMPLATES]
        return [ATTRIBUTE_LOCATION_TEMPLATE.format(colour=colour, loc=loc)]
    if kind != "relation":
        raise ValueError(f"unknown question kind {kind!r}")
    references = [(cell, f"{APPEARANCE[c].word} {snake_name(c)} anatomy") for cell, c in scene.anatomy.items()]
    references += [(cell, f"silver {tool} instrument") for tool, cell in scene.tools.items()]
    questions = []
    for (cell, phrase), (relation, step) in itertools.product(references, DIRECTIONS.items()):
        if cell != (row, col) and _on_ray(scene, cell, step) == [target]:
            questions += [t.format(relation=relation, reference=phrase) for t in RELATION_TEMPLATES]
    return questions


def question_similarity(answer: str, distractors: list[str]) -> float:
    """S(q) under CLASS_SIMILARITY: mean similarity of the answer class to each distractor."""
    i = CLASSES.index(answer)
    return float(np.mean([CLASS_SIMILARITY[i, CLASSES.index(d)] for d in distractors]))


def make_example(rng: np.random.Generator, grid: int, target: str, kind: str) -> tuple[Scene, str, str, list[str]]:
    """(scene, question kind actually used, question, distractors) for one record.

    A relation question needs a reference on target's row or column; up to 8 scenes are tried, then
    the kind falls back to attribute (always possible).
    """
    for _ in range(8 if kind == "relation" else 1):
        scene = sample_scene(rng, grid, target)
        questions = candidate_questions(scene, target, kind)
        if questions:
            break
    else:
        kind, questions = "attribute", candidate_questions(scene, target, "attribute")
    question = questions[int(rng.integers(len(questions)))]
    others = [c for c in CLASSES if c != target]
    distractors = [others[i] for i in rng.choice(len(others), 3, replace=False)]
    return scene, kind, question, distractors


def split_examples(split: str, n: int, seed: int, image_size: int,
                   question_mix: dict[str, float]) -> Iterator[tuple[Record, Scene, np.random.Generator]]:
    """The n records of one split, each with its scene and the rng that renders it (classes exactly
    balanced; image paths images/<split>/<index>.png). A record does not depend on its rendering, so
    the records alone cost no drawing (`generate_split` renders them)."""
    grid = 2 if image_size < 3 * CELL_PIXELS else 3
    split_rng = np.random.default_rng([seed, SPLITS.index(split)])
    targets = [CLASSES[i % len(CLASSES)] for i in split_rng.permutation(n)]
    kinds, weights = list(question_mix), np.array(list(question_mix.values()), float)
    for index, target in enumerate(targets):
        rng = np.random.default_rng([seed, SPLITS.index(split), index, 1])
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        scene, kind, question, distractors = make_example(rng, grid, target, kind)
        options = [target] + distractors
        options = [options[i] for i in rng.permutation(len(options))]
        record = Record(
            id=f"synthetic-{split}-{index:06d}", images=(f"images/{split}/{index:06d}.png",), question=question,
            options=tuple(options), answer=LETTERS[options.index(target)], answer_text=target, category=target,
            source="synthetic", question_type=kind)
        yield record, scene, rng


def generate_split(out_dir: Path, split: str, n: int, seed: int, image_size: int,
                   question_mix: dict[str, float]) -> list[Record]:
    """Render n records of one split (images under out_dir/images/<split>/)."""
    (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    records = []
    for record, scene, rng in split_examples(split, n, seed, image_size, question_mix):
        Image.fromarray(render_scene(scene, image_size, rng)).save(out_dir / record.images[0], compress_level=1)
        records.append(record)
    return records


def synthetic_records(split: str, n: int = 1200, seed: int = 0, image_size: int = 84,
                      split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                      question_mix: dict[str, float] | None = None) -> list[Record]:
    """The records `make_synthetic_dataset` writes for `split` with the same arguments, without their
    images (for model-free studies of the questions, e.g. a curriculum's order)."""
    size = _split_sizes(n, split_fractions)[split]
    return [r for r, _, _ in split_examples(split, size, seed, image_size, dict(question_mix or DEFAULT_QUESTION_MIX))]


def _split_sizes(n: int, fractions: tuple[float, ...]) -> dict[str, int]:
    sizes = [int(round(n * f)) for f in fractions[1:]]
    return dict(zip(SPLITS, [n - sum(sizes)] + sizes))


def make_synthetic_dataset(
    out_dir: str | os.PathLike,
    n: int = 1200,
    seed: int = 0,
    image_size: int = 84,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    question_mix: dict[str, float] | None = None,
    overwrite: bool = False,
) -> dict[str, str]:
    """Write the synthetic benchmark and return {"train"|"val"|"test": path of its JSONL}.

    n records in all, split by split_fractions. image_size must be a multiple of 28 (a 2x2 grid below
    84 px, else 3x3). Writes <split>.jsonl (project Records; image paths relative to out_dir),
    images/<split>/*.png, class_similarity.json and meta.json. Deterministic in (n, seed, image_size,
    split_fractions, question_mix); when out_dir already holds that dataset it is reused, unless
    overwrite.
    """
    if image_size % CELL_PIXELS or image_size < 2 * CELL_PIXELS:
        raise ValueError(f"image_size must be a multiple of {CELL_PIXELS} and at least 56, got {image_size}")
    mix = dict(question_mix or DEFAULT_QUESTION_MIX)
    if not set(mix) <= set(DEFAULT_QUESTION_MIX) or sum(mix.values()) <= 0:
        raise ValueError(f"question_mix must weight some of {list(DEFAULT_QUESTION_MIX)}, got {mix}")
    out = Path(out_dir)
    paths = {split: str(out / f"{split}.jsonl") for split in SPLITS}
    params = {"version": GENERATOR_VERSION, "n": n, "seed": seed, "image_size": image_size,
              "split_fractions": list(split_fractions), "question_mix": mix}
    meta_path = out / "meta.json"
    if not overwrite and meta_path.exists() and all(Path(p).exists() for p in paths.values()):
        if json.loads(meta_path.read_text()).get("params") == params:
            logger.info("reusing synthetic dataset in %s", out)
            return paths
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for split, size in _split_sizes(n, split_fractions).items():
        records = generate_split(out, split, size, seed, image_size, mix)
        write_records(records, paths[split])
        scores = [question_similarity(r.answer_text, [o for o in r.options if o != r.answer_text]) for r in records]
        kinds = {k: sum(r.question_type == k for r in records) for k in DEFAULT_QUESTION_MIX}
        summary[split] = {"records": size, "question_types": kinds,
                          "similarity_quantiles": np.quantile(scores, [0, 0.25, 0.5, 0.75, 1]).round(3).tolist()
                          if scores else []}
    write_class_similarity(out / SIMILARITY_FILE, list(CLASSES), CLASS_SIMILARITY,
                           note="designed visual similarity of the synthetic classes (anatomy_r1_jax.data.synthetic)")
    meta_path.write_text(json.dumps({"params": params, "splits": summary}, indent=1) + "\n")
    logger.info("wrote synthetic dataset to %s: %s", out, {s: v["records"] for s, v in summary.items()})
    return paths
