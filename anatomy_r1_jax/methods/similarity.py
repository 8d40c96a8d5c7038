"""Anatomical similarity of a question's options, S(q), for the curriculum (ASC). Our reconstruction.

Question scores (config.curriculum.score), registered by name:

- "distractors": S(q) = 1/|D| * sum_{d in D} sim(c, d)  in [0, 1]
  c the correct option text, D the distractor texts. A high S(q) means the distractors look like
  the answer: a hard question. Largely a function of the answer class (R^2 0.57 on GRPO.json).
- "symmetric":   S_sym(q) = mean over all unordered option pairs {a, b} of sim(a, b)  in [0, 1]
  how alike the options are among themselves, whichever is correct (less tied to the class).

`sim(a, b) -> float in [0, 1]` comes from a backend, registered by name:

- "matrix":    a class-similarity matrix file {"classes": [...], "matrix": [[...]]} (ClassSimilarity).
- "confusion": built from calibration rollouts of the base model: how often class i is answered
               when j is right, among rollouts where i was offered; symmetrised and normalised.
- "embedding": (1 + cos(e(a), e(b))) / 2 of option-text embeddings; `embed(texts) -> [n, d]` is
               passed in (e.g. mean-pooled input embeddings of the policy LM:
               `token_embedder(table, tokenize)`). The map is affine, so it keeps the order of S(q).

Scores are computed once and cached per record id (`score_records`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable, Iterable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from anatomy_r1_jax.data.readers import read_class_similarity, write_class_similarity
from anatomy_r1_jax.data.records import LETTERS, Record
from anatomy_r1_jax.rl.registry import Registry


class Similarity(Protocol):
    def __call__(self, a: str, b: str) -> float: ...


SIMILARITY_BACKENDS: Registry[Callable[..., Similarity]] = Registry("similarity backend")
register_similarity = SIMILARITY_BACKENDS.register


def make_similarity(name: str, **kwargs) -> Similarity:
    """Build a backend by name: make_similarity("matrix", matrix="sim.json")."""
    return SIMILARITY_BACKENDS.get(name)(**kwargs)


def class_key(name: str) -> str:
    """Class-name normal form: "Abdominal Wall Cavity" == "abdominal_wall_cavity"."""
    return " ".join(name.replace("_", " ").split()).casefold()


QuestionScore = Callable[[Record, Similarity], float]
QUESTION_SCORES: Registry[QuestionScore] = Registry("question score")


def _check_options(record: Record) -> None:
    if len(record.options) < 2:
        raise ValueError(f"record {record.id!r} has fewer than two options")


@QUESTION_SCORES.register("distractors")
def question_similarity(record: Record, sim: Similarity) -> float:
    """S(q): mean similarity of the correct option to each distractor, in [0, 1]."""
    _check_options(record)
    correct = record.options[record.answer_index]
    distractors = [o for i, o in enumerate(record.options) if i != record.answer_index]
    return float(np.mean([sim(correct, d) for d in distractors]))


@QUESTION_SCORES.register("symmetric")
def symmetric_similarity(record: Record, sim: Similarity) -> float:
    """S_sym(q): mean similarity over all unordered pairs of options, in [0, 1]."""
    _check_options(record)
    o = record.options
    return float(np.mean([sim(o[i], o[j]) for i in range(len(o)) for j in range(i + 1, len(o))]))


def odd_one_out(record: Record, sim: Similarity) -> float:
    """The image-free shortcut's expected accuracy on `record`: pick, uniformly among ties, an option
    least similar to the others, argmin_i sum_{j != i} sim(o_i, o_j); 1/|ties| if the answer is one
    of them, else 0."""
    o = record.options
    totals = np.array([sum(sim(o[i], o[j]) for j in range(len(o)) if j != i) for i in range(len(o))])
    least = np.flatnonzero(np.isclose(totals, totals.min()))
    return float(record.answer_index in least) / len(least)


@dataclasses.dataclass(frozen=True, eq=False)
class ClassSimilarity:
    """sim(a, b) = matrix[class(a), class(b)] over a fixed class list ([C, C], values in [0, 1])."""

    classes: tuple[str, ...]
    matrix: np.ndarray

    def __post_init__(self):
        m = np.asarray(self.matrix, np.float64)
        if m.shape != (len(self.classes), len(self.classes)):
            raise ValueError(f"matrix shape {m.shape} does not match {len(self.classes)} classes")
        if not np.all(np.isfinite(m)) or m.min() < 0 or m.max() > 1:
            raise ValueError("similarity matrix values must lie in [0, 1]")
        keys = [class_key(c) for c in self.classes]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate class names in {self.classes}")
        object.__setattr__(self, "matrix", m)
        object.__setattr__(self, "_index", {k: i for i, k in enumerate(keys)})

    def index(self, name: str) -> int:
        try:
            return self._index[class_key(name)]
        except KeyError:
            raise KeyError(f"option text {name!r} is not a class of the similarity matrix {list(self.classes)}") from None

    def __call__(self, a: str, b: str) -> float:
        return float(self.matrix[self.index(a), self.index(b)])

    def to_json(self) -> dict:
        return {"classes": list(self.classes), "matrix": self.matrix.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> "ClassSimilarity":
        return cls(tuple(d["classes"]), np.asarray(d["matrix"], np.float64))

    def save(self, path: str | os.PathLike, note: str = "") -> None:
        write_class_similarity(path, list(self.classes), self.matrix, note=note)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ClassSimilarity":
        """From a class-similarity file (data.readers layout; validated there)."""
        classes, rows = read_class_similarity(path)
        return cls(tuple(classes), np.asarray(rows, np.float64))


@register_similarity("matrix")
def matrix_similarity(*, matrix: str | os.PathLike | dict) -> ClassSimilarity:
    """A class-similarity matrix from a JSON file path or an already-loaded {"classes", "matrix"} dict."""
    return ClassSimilarity.from_json(matrix) if isinstance(matrix, dict) else ClassSimilarity.load(matrix)


@register_similarity("confusion")
def confusion_similarity(
    *, rollouts: Iterable[tuple[Record, str | None]], classes: Sequence[str] | None = None
) -> ClassSimilarity:
    """Similarity from how often the base model confuses classes in a calibration pass.

    rollouts: (record, predicted letter or None when unparseable) per base-model rollout.
      offered[j, i]  = rollouts with truth j where i was a distractor
      answered[j, i] = of those, rollouts that answered i
      P(i | j) = answered / offered (0 if never offered);  S = (P + P^T) / 2
    normalised by the largest off-diagonal value (the most-confused pair gets 1); diagonal 1.
    classes: the class list (default: every option text seen, in first-seen order).
    """
    rollouts = list(rollouts)
    if classes is None:
        classes = list(dict.fromkeys(o for r, _ in rollouts for o in r.options))
    sim = ClassSimilarity(tuple(classes), np.eye(len(classes)))
    offered = np.zeros((len(classes),) * 2)
    answered = np.zeros_like(offered)
    for record, predicted in rollouts:
        ids = [sim.index(o) for o in record.options]
        truth = ids[record.answer_index]
        for i, c in enumerate(ids):
            if i != record.answer_index:
                offered[truth, c] += 1
        if predicted is not None and predicted in LETTERS[: len(ids)] and predicted != record.answer:
            answered[truth, ids[LETTERS.index(predicted)]] += 1
    rate = np.divide(answered, offered, out=np.zeros_like(offered), where=offered > 0)
    sym = (rate + rate.T) / 2
    np.fill_diagonal(sym, 0.0)
    if sym.max() > 0:
        sym = sym / sym.max()
    np.fill_diagonal(sym, 1.0)
    return ClassSimilarity(tuple(classes), sym)


class EmbeddingSimilarity:
    """sim(a, b) = (1 + cos(embed(a), embed(b))) / 2, embeddings computed once per text."""

    def __init__(self, embed: Callable[[list[str]], np.ndarray]):
        self._embed = embed
        self._unit: dict[str, np.ndarray] = {}

    def prepare(self, texts: Iterable[str]) -> None:
        """Embed every not-yet-seen text in one call."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._unit))
        if not missing:
            return
        vectors = np.asarray(self._embed(missing), np.float64)
        if vectors.shape[0] != len(missing):
            raise ValueError(f"embed returned {vectors.shape[0]} rows for {len(missing)} texts")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        for text, v in zip(missing, vectors / np.maximum(norms, 1e-12)):
            self._unit[text] = v

    def __call__(self, a: str, b: str) -> float:
        self.prepare([a, b])
        return float(np.clip((1.0 + self._unit[a] @ self._unit[b]) / 2.0, 0.0, 1.0))


@register_similarity("embedding")
def embedding_similarity(*, embed: Callable[[list[str]], np.ndarray]) -> EmbeddingSimilarity:
    return EmbeddingSimilarity(embed)


@jax.jit
def _masked_mean(table: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
    vectors = jnp.take(table, ids, axis=0).astype(jnp.float32)  # [n, L, d]
    m = mask[..., None].astype(jnp.float32)
    return jnp.sum(vectors * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def mean_pooled_embeddings(table: jax.Array, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """[n, d] mean over each text's tokens of rows of an embedding table [V, d].

    Token lists are padded to a power-of-two length (at least 8) so few shapes compile.
    """
    if any(len(t) == 0 for t in token_ids):
        raise ValueError("every text needs at least one token")
    length = max(8, 1 << (max(len(t) for t in token_ids) - 1).bit_length())
    ids = np.zeros((len(token_ids), length), np.int32)
    mask = np.zeros((len(token_ids), length), bool)
    for row, t in enumerate(token_ids):
        ids[row, : len(t)] = t
        mask[row, : len(t)] = True
    return np.asarray(_masked_mean(table, ids, mask))


def token_embedder(table: jax.Array, tokenize: Callable[[str], Sequence[int]]) -> Callable[[list[str]], np.ndarray]:
    """embed(texts) -> [n, d] from an LM's input embedding table and its tokenizer."""
    return functools.partial(_embed_texts, table, tokenize)


def _embed_texts(table, tokenize, texts: list[str]) -> np.ndarray:
    return mean_pooled_embeddings(table, [list(tokenize(t)) for t in texts])


# ---- per-record scores and their cache -----------------------------------------------------------


def _write_json(path: str | os.PathLike, obj) -> None:
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def load_scores(path: str | os.PathLike) -> dict[str, float]:
    """{record id: S(q)} from a `score_records` cache file."""
    with open(path) as f:
        return {k: float(v) for k, v in json.load(f)["scores"].items()}


def score_records(
    records: Sequence[Record],
    backend: Similarity,
    cache_path: str | os.PathLike | None = None,
    *,
    fingerprint: str = "",
    score: str = "distractors",
) -> dict[str, float]:
    """{record id: S(q)} for `records` (`score`: a QUESTION_SCORES name), reusing and extending a
    JSON cache keyed by record id.

    The cache file is {"fingerprint": str, "scores": {id: float}}; a cache written with another
    fingerprint (name the backend and its source in it; the score name is added here) is ignored
    and overwritten.
    """
    score_fn = QUESTION_SCORES.get(score)
    fingerprint = fingerprint if score == "distractors" else f"{fingerprint}|{score}"
    by_id: dict[str, Record] = {}
    for r in records:
        if r.id in by_id and (by_id[r.id].options, by_id[r.id].answer) != (r.options, r.answer):
            raise ValueError(f"record id {r.id!r} appears twice with different options")
        by_id[r.id] = r
    cached: dict[str, float] = {}
    if cache_path is not None and os.path.exists(cache_path):
        with open(cache_path) as f:
            blob = json.load(f)
        if blob.get("fingerprint", "") == fingerprint:
            cached = {k: float(v) for k, v in blob["scores"].items()}
    missing = [r for rid, r in by_id.items() if rid not in cached]
    if missing and hasattr(backend, "prepare"):
        backend.prepare(o for r in missing for o in r.options)
    cached.update({r.id: score_fn(r, backend) for r in missing})
    if cache_path is not None and missing:
        _write_json(cache_path, {"fingerprint": fingerprint, "scores": cached})
    return {rid: cached[rid] for rid in by_id}


def scores_array(records: Sequence[Record], scores: dict[str, float]) -> np.ndarray:
    """[n] float64 S(q) in record order (the input of curriculum_order)."""
    return np.array([scores[r.id] for r in records], np.float64)


def answer_classes(records: Sequence[Record]) -> tuple[np.ndarray, list[str]]:
    """([n] int64 answer-class index per record, class names in first-seen order): the class is the
    correct option's text in class_key normal form (the curriculum's strata)."""
    names: dict[str, int] = {}
    ids = [names.setdefault(class_key(r.options[r.answer_index]), len(names)) for r in records]
    return np.array(ids, np.int64), list(names)
