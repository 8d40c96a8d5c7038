"""Synthetic benchmark: determinism, valid records, answerable questions, S(q) spread, pixels decide."""

import collections
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anatomy_r1_jax.data import read_class_similarity, read_records
from anatomy_r1_jax.data import synthetic as syn

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return out, syn.make_synthetic_dataset(out, n=240, seed=7)


def test_splits_are_valid_balanced_records(dataset):
    out, paths = dataset
    splits = {split: read_records(path) for split, path in paths.items()}  # checks every image decodes
    assert {s: len(r) for s, r in splits.items()} == {"train": 192, "val": 24, "test": 24}
    ids = [r.id for records in splits.values() for r in records]
    assert len(ids) == len(set(ids))
    for records in splits.values():
        assert set(collections.Counter(r.category for r in records).values()) == {len(records) // 6}
        for r in records:
            assert len(r.options) == 4 and len(set(r.options)) == 4 and set(r.options) <= set(syn.CLASSES)
            assert r.answer_text == r.category == r.options[r.answer_index] and r.source == "synthetic"
            assert Path(r.images[0]).parent == out / "images" / r.id.split("-")[1]
    kinds = collections.Counter(r.question_type for r in splits["train"])
    assert set(kinds) == {"location", "attribute", "relation"} and min(kinds.values()) > 30
    vocabulary = {w for r in splits["train"] for w in r.question.replace("?", " ").split()}
    assert len(vocabulary) < 60


def test_similarity_file_and_spread_of_s(dataset):
    out, paths = dataset
    classes, rows = read_class_similarity(out / syn.SIMILARITY_FILE)
    matrix = np.array(rows)
    assert classes == syn.CLASSES and np.allclose(matrix, matrix.T) and np.all(np.diag(matrix) == 1.0)
    scores = [syn.question_similarity(r.answer_text, [o for o in r.options if o != r.answer_text])
              for r in read_records(paths["train"])]
    low, q1, q3, high = np.quantile(scores, [0, 0.25, 0.75, 1])
    assert low < 0.15 and high > 0.6 and q3 - q1 > 0.15  # an easy / hard mix for the curriculum


def test_deterministic_and_reused(tmp_path):
    first = syn.make_synthetic_dataset(tmp_path / "a", n=48, seed=7)
    again = syn.make_synthetic_dataset(tmp_path / "b", n=48, seed=7)
    other = syn.make_synthetic_dataset(tmp_path / "c", n=48, seed=8)
    for split in first:
        assert Path(again[split]).read_text() == Path(first[split]).read_text()  # image paths are relative
    image = "images/train/000000.png"
    assert (tmp_path / "a" / image).read_bytes() == (tmp_path / "b" / image).read_bytes()
    assert Path(other["train"]).read_text() != Path(first["train"]).read_text()
    for split in first:  # the same records without drawing their images (read_records makes paths absolute)
        written = [dataclasses.replace(r, images=tuple(str(Path(i).relative_to(tmp_path / "a")) for i in r.images))
                   for r in read_records(first[split])]
        assert syn.synthetic_records(split, n=48, seed=7) == written
    assert syn.synthetic_records("train", n=48, seed=8) != syn.synthetic_records("train", n=48, seed=7)
    before = (tmp_path / "a/train.jsonl").stat().st_mtime_ns
    assert syn.make_synthetic_dataset(tmp_path / "a", n=48, seed=7) == first  # same parameters: reused
    assert (tmp_path / "a/train.jsonl").stat().st_mtime_ns == before
    syn.make_synthetic_dataset(tmp_path / "a", n=48, seed=7, overwrite=True)
    assert (tmp_path / "a/train.jsonl").stat().st_mtime_ns != before


def test_small_frames_and_bad_sizes(tmp_path):
    paths = syn.make_synthetic_dataset(tmp_path, n=12, seed=0, image_size=56)
    records = read_records(paths["train"])
    corners = {"top-left", "top-right", "bottom-left", "bottom-right"}
    assert all(r.question_type != "location" or any(c in r.question for c in corners) for r in records)
    with pytest.raises(ValueError, match="multiple of 28"):
        syn.make_synthetic_dataset(tmp_path, n=12, image_size=64)
    with pytest.raises(ValueError, match="question_mix"):
        syn.make_synthetic_dataset(tmp_path, n=12, question_mix={"count": 1.0})


def test_questions_have_exactly_one_answer():
    scene = syn.Scene(3, {(0, 0): "Liver", (1, 0): "Gut", (2, 0): "Omentum", (1, 2): "Cystic Plate"},
                      {"hook": (1, 1)})
    assert syn.candidate_questions(scene, "Gut", "location") == [
        "What anatomy is at the mid-left of the frame ?", "What is the mid-left anatomy?"]
    assert syn.candidate_questions(scene, "Liver", "attribute")[0] == "What is the brown anatomy?"
    assert syn.candidate_questions(scene, "Gut", "attribute") == ["What is the red mid-left anatomy?"]
    relations = syn.candidate_questions(scene, "Gut", "relation")
    assert "What is the name of the anatomy that is to the left of the silver hook instrument?" in relations
    assert not any("below the brown liver" in q or "above the yellow omentum" in q for q in relations)  # 2 on ray
    assert syn.candidate_questions(scene, "Cystic Plate", "relation") == [
        "What is the name of the anatomy that is on the right side of the red gut anatomy?",
        "What name is the anatomy that is on the right side of the red gut anatomy?",
        "What is the name of the anatomy that is on the right side of the silver hook instrument?",
        "What name is the anatomy that is on the right side of the silver hook instrument?"]


def _crop_features(crop: np.ndarray) -> np.ndarray:
    pixels = crop.astype(np.float32)
    lum = pixels.mean(-1)
    gradients = [np.abs(np.diff(lum, axis=a)).mean() for a in (0, 1)]
    diagonals = [np.abs(lum[1:, 1:] - lum[:-1, :-1]).mean(), np.abs(lum[1:, :-1] - lum[:-1, 1:]).mean()]
    return np.concatenate([pixels.reshape(-1, 3).mean(0), [lum.std()], gradients, diagonals])


def test_pixels_decide_the_class_and_similarity_predicts_confusion():
    features, labels = [], []
    for i in range(150):
        rng = np.random.default_rng([99, i])
        scene = syn.sample_scene(rng, 3, syn.CLASSES[i % 6])
        image = syn.render_scene(scene, 84, rng)
        for (row, col), name in scene.anatomy.items():
            features.append(_crop_features(image[row * 28 + 6: row * 28 + 22, col * 28 + 6: col * 28 + 22]))
            labels.append(syn.CLASSES.index(name))
    z = np.array(features)
    z, labels, half = (z - z.mean(0)) / z.std(0), np.array(labels), len(labels) // 2
    centroids = np.stack([z[:half][labels[:half] == k].mean(0) for k in range(6)])
    distance = ((z[half:, None] - centroids[None]) ** 2).sum(-1)
    assert (distance.argmin(1) == labels[half:]).mean() > 0.9  # a nearest-centroid reader already succeeds
    soft = np.exp(-(distance - distance.min(1, keepdims=True)) / 2)
    soft /= soft.sum(1, keepdims=True)
    confusion = np.stack([soft[labels[half:] == k].mean(0) for k in range(6)])
    upper = np.triu_indices(6, 1)
    ranks = [np.argsort(np.argsort(v)) for v in ((confusion + confusion.T)[upper], syn.CLASS_SIMILARITY[upper])]
    assert np.corrcoef(*ranks)[0, 1] > 0.5  # Spearman: designed similarity tracks pixel confusability


def test_script_writes_a_dataset(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts/make_synthetic_data.py"), "--out", str(tmp_path),
                             "--n", "18", "--seed", "1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^train +14 records", result.stdout, re.MULTILINE)
    assert json.loads((tmp_path / "meta.json").read_text())["params"]["seed"] == 1
