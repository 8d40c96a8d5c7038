import json
import sys
from pathlib import Path

import numpy as np
import pytest

from anatomy_r1_jax.data import read_records
from anatomy_r1_jax.data.records import Record
from anatomy_r1_jax.methods import similarity as sim_mod
from anatomy_r1_jax.methods.curriculum import Curriculum, curriculum_order, stage_slices

GRPO = "/work/shared/data/anatomy_r1/GRPO.json"
CLASSES = ["Liver", "Omentum", "Abdominal Wall Cavity", "Gallbladder", "Cystic Plate", "Gut"]


def _matrix():
    m = np.full((6, 6), 0.1)
    pairs = {("Liver", "Gallbladder"): 0.8, ("Gallbladder", "Cystic Plate"): 0.7, ("Liver", "Cystic Plate"): 0.6,
             ("Omentum", "Gut"): 0.5, ("Omentum", "Abdominal Wall Cavity"): 0.3}
    for (a, b), v in pairs.items():
        i, j = CLASSES.index(a), CLASSES.index(b)
        m[i, j] = m[j, i] = v
    np.fill_diagonal(m, 1.0)
    return m


@pytest.fixture(scope="module")
def records():
    return read_records(GRPO)


@pytest.fixture()
def matrix_file(tmp_path):
    path = tmp_path / "sim.json"
    path.write_text(json.dumps({"classes": CLASSES, "matrix": _matrix().tolist()}))
    return path


def test_released_records_scores_with_matrix(records, matrix_file):
    sim = sim_mod.make_similarity("matrix", matrix=matrix_file)
    m = _matrix()
    for r in records:
        s = sim_mod.question_similarity(r, sim)
        c = CLASSES.index(r.answer_text)
        expected = np.mean([m[c, CLASSES.index(o)] for o in r.options if o != r.answer_text])
        assert s == pytest.approx(expected) and 0.0 <= s <= 1.0
    scores = np.array([sim_mod.question_similarity(r, sim) for r in records])
    assert scores.min() < 0.2 and scores.max() > 0.5  # the released data spans easy and hard questions
    order = curriculum_order(scores, None, Curriculum(schedule="staged", num_stages=5), seed=0, epoch=0)
    means = [scores[order[s]].mean() for s in stage_slices(len(scores), 5)]
    assert means == sorted(means) and means[0] < means[-1]


def test_matrix_names_and_errors(matrix_file):
    sim = sim_mod.make_similarity("matrix", matrix=json.loads(matrix_file.read_text()))
    assert sim("abdominal_wall_cavity", "omentum") == pytest.approx(0.3)
    assert sim("Gallbladder", "Liver") == pytest.approx(0.8)
    with pytest.raises(KeyError, match="'Spleen' is not a class"):
        sim("Spleen", "Liver")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sim_mod.ClassSimilarity(("a", "b"), np.array([[1.0, 1.5], [1.5, 1.0]]))


def test_confusion_backend():
    opts = ("Liver", "Gallbladder", "Gut", "Omentum")
    liver = Record("a", (), "q", opts, "A", "Liver")
    gall = Record("b", (), "q", ("Gallbladder", "Liver", "Gut", "Omentum"), "A", "Gallbladder")
    # Liver answered as Gallbladder 3/4 times; Gallbladder as Liver 1/4; Gut once when Liver is right.
    rollouts = [(liver, "B")] * 3 + [(liver, "A")] + [(gall, "B")] + [(gall, "A")] * 2 + [(gall, None)]
    rollouts += [(liver, "C"), (liver, "Z")]
    sim = sim_mod.make_similarity("confusion", rollouts=rollouts)
    assert sim.classes == opts
    np.testing.assert_allclose(sim.matrix, sim.matrix.T)
    np.testing.assert_allclose(np.diag(sim.matrix), 1.0)
    # P(G|L) = 3/6, P(L|G) = 1/4 -> 0.375 (max, -> 1); P(Gut|L) = 1/6 -> 1/12 / 0.375
    assert sim("Liver", "Gallbladder") == pytest.approx(1.0)
    assert sim("Gut", "Liver") == pytest.approx((1 / 12) / 0.375)
    assert sim("Omentum", "Gut") == 0.0


def test_embedding_backend_and_pooling():
    calls = []
    vectors = {"Liver": [1.0, 0.0], "Gallbladder": [1.0, 1.0], "Gut": [-1.0, 0.0], "Omentum": [0.0, 1.0]}

    def embed(texts):
        calls.append(list(texts))
        return np.array([vectors[t] for t in texts])

    sim = sim_mod.make_similarity("embedding", embed=embed)
    r = Record("a", (), "q", ("Liver", "Gallbladder", "Gut", "Omentum"), "A", "Liver")
    s = sim_mod.score_records([r], sim)["a"]
    assert s == pytest.approx(np.mean([(1 + np.sqrt(0.5)) / 2, 0.0, 0.5]))
    assert len(calls) == 1  # all option texts embedded in one call

    table = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    ids = [[1, 2, 3], [7], list(range(10, 22))]
    got = sim_mod.mean_pooled_embeddings(table, ids)
    np.testing.assert_allclose(got, [table[i].mean(0) for i in ids], rtol=1e-6)
    embedder = sim_mod.token_embedder(table, lambda t: [ord(c) % 50 for c in t])
    np.testing.assert_allclose(embedder(["ab"]), [table[[97 % 50, 98 % 50]].mean(0)], rtol=1e-6)


def test_score_records_cache(records, matrix_file, tmp_path):
    sim = sim_mod.make_similarity("matrix", matrix=matrix_file)
    cache = tmp_path / "scores.json"
    first = sim_mod.score_records(records[:50], sim, cache, fingerprint="matrix:v1")
    assert sim_mod.load_scores(cache) == first

    def boom(a, b):
        raise AssertionError("cached scores must not be recomputed")

    again = sim_mod.score_records(records[:50], boom, cache, fingerprint="matrix:v1")
    assert again == first
    more = sim_mod.score_records(records[:60], sim, cache, fingerprint="matrix:v1")
    assert len(sim_mod.load_scores(cache)) == 60 and {k: more[k] for k in first} == first
    with pytest.raises(AssertionError):
        sim_mod.score_records(records[:5], boom, cache, fingerprint="matrix:v2")  # other backend: recompute
    np.testing.assert_allclose(sim_mod.scores_array(records[:3], more), [more[r.id] for r in records[:3]])


def test_score_curriculum_script(matrix_file, tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        import score_curriculum
    finally:
        sys.path.pop(0)
    out = tmp_path / "scores.json"
    score_curriculum.main(["--data", GRPO, "--backend", "matrix", "--matrix", str(matrix_file), "--out", str(out)])
    scores = sim_mod.load_scores(out)
    assert len(scores) == 1000 and all(0.0 <= v <= 1.0 for v in scores.values())


def test_confusion_backend_from_an_evaluation_result(tmp_path):
    """score_curriculum.py --backend confusion reads evaluate.py's result JSON as the calibration pass."""
    from anatomy_r1_jax.evaluation.scoring import score

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        import score_curriculum
    finally:
        sys.path.pop(0)
    opts = ("Liver", "Gallbladder", "Gut")
    records = [Record(f"r{i}", (), "q", opts, "A", "Liver") for i in range(4)]
    texts = [f"<think>t</think><answer>{x}</answer>" for x in "BBAC"]
    path = tmp_path / "base_on_train.json"
    path.write_text(json.dumps({"records": [o.to_json() for o in score(records, texts)]}))
    rows = score_curriculum.read_rollouts(str(path))
    assert rows == [{"id": f"r{i}", "prediction": x} for i, x in enumerate("BBAC")]
    jsonl = tmp_path / "rollouts.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert score_curriculum.read_rollouts(str(jsonl)) == rows
