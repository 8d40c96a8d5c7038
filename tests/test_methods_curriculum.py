import dataclasses

import numpy as np
import pytest

from anatomy_r1_jax.data import synthetic, write_class_similarity
from anatomy_r1_jax.data.synthetic import synthetic_records
from anatomy_r1_jax.methods import similarity as sim_mod
from anatomy_r1_jax.methods.curriculum import Curriculum, competence, curriculum_order, stage_slices
from anatomy_r1_jax.methods.curriculum_check import check_order


def _order(scores, *, schedule, num_stages=4, seed, epoch, span=0, classes=None):
    return curriculum_order(scores, classes, Curriculum(schedule=schedule, num_stages=num_stages, span=span),
                            seed=seed, epoch=epoch)


def _scores(n=103, seed=0, levels=None):
    rng = np.random.default_rng(seed)
    return rng.choice(levels, n) if levels is not None else rng.random(n)


@pytest.mark.parametrize("levels", [None, [0.1, 0.3, 0.3, 0.6, 0.9]])  # continuous, and heavy ties
def test_staged_order_is_monotone_by_stage(levels):
    scores = _scores(levels=levels)
    order = _order(scores, schedule="staged", num_stages=4, seed=7, epoch=0)
    assert sorted(order.tolist()) == list(range(len(scores)))
    stages = [scores[order[s]] for s in stage_slices(len(scores), 4)]
    assert [len(s) for s in stages] == [26, 26, 26, 25]
    for a, b in zip(stages, stages[1:]):
        assert a.max() <= b.min()
    means = [s.mean() for s in stages]
    assert means == sorted(means)
    # shuffled inside a stage (not simply sorted)
    assert not np.all(np.diff(scores[order[stage_slices(len(scores), 4)[0]]]) >= 0)


def test_order_is_deterministic_and_epoch_dependent():
    scores = _scores()
    for schedule in ("staged", "none"):
        a = _order(scores, schedule=schedule, num_stages=5, seed=1, epoch=0)
        b = _order(scores, schedule=schedule, num_stages=5, seed=1, epoch=0)
        c = _order(scores, schedule=schedule, num_stages=5, seed=1, epoch=1)
        d = _order(scores, schedule=schedule, num_stages=5, seed=2, epoch=0)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c) and not np.array_equal(a, d)
        assert a.dtype == np.int64 and sorted(a.tolist()) == list(range(len(scores)))
    # a new epoch keeps the stages (continuous scores: no ties at the boundaries)
    e0 = _order(scores, schedule="staged", num_stages=5, seed=1, epoch=0)
    e1 = _order(scores, schedule="staged", num_stages=5, seed=1, epoch=1)
    for s in stage_slices(len(scores), 5):
        assert set(e0[s]) == set(e1[s])


def test_none_ignores_scores_and_edge_cases():
    a = _order(np.zeros(50), schedule="none", num_stages=3, seed=0, epoch=0)
    b = _order(np.arange(50.0), schedule="none", num_stages=3, seed=0, epoch=0)
    np.testing.assert_array_equal(a, b)
    assert _order(np.zeros(0), schedule="staged", num_stages=3, seed=0, epoch=0).shape == (0,)
    one = _order(np.array([0.5, 0.1]), schedule="staged", num_stages=5, seed=0, epoch=0)
    np.testing.assert_array_equal(one, [1, 0])
    with pytest.raises(KeyError):
        _order(np.zeros(3), schedule="reverse", num_stages=2, seed=0, epoch=0)
    with pytest.raises(ValueError):
        stage_slices(3, 0)


def test_span_orders_the_queries_a_short_run_sees():
    """With span m, "staged" and "none" share the same first m records (a short run's queries) and
    the rest; "staged" climbs every stage within those m."""
    rng = np.random.default_rng(0)
    scores = rng.random(1000)
    kw = dict(num_stages=4, seed=3, epoch=0, span=100)
    staged = _order(scores, schedule="staged", **kw)
    plain = _order(scores, schedule="none", **kw)
    np.testing.assert_array_equal(np.sort(staged), np.arange(1000))
    assert set(staged[:100]) == set(plain[:100]) and list(staged[100:]) == list(plain[100:])
    head = scores[staged[:100]]
    bounds = [(head[s].min(), head[s].max()) for s in stage_slices(100, 4)]
    assert all(hi <= lo for (_, hi), (lo, _) in zip(bounds, bounds[1:]))
    assert list(plain) == list(_order(scores, schedule="none", num_stages=4, seed=3, epoch=0))
    assert list(_order(scores, schedule="staged", num_stages=4, seed=3, epoch=0, span=0)) == list(
        _order(scores, schedule="staged", num_stages=4, seed=3, epoch=0))


# ---- the class-stratified competence curriculum -------------------------------------------------


def test_competence_schedule_values():
    c = competence(np.array([0, 25, 100, 200]), c0=0.5, steps=100)
    np.testing.assert_allclose(c, [0.5, np.sqrt(0.25 + 0.75 * 0.25), 1.0, 1.0])
    with pytest.raises(ValueError):
        competence(np.arange(3), c0=0.0, steps=10)


def test_competence_draws_each_step_from_the_eligible_easiest_per_class():
    """Step t's batch holds only questions with within-class percentile d(q) <= c(t) (while enough
    are eligible), every record once, and the order is a pure function of (seed, epoch)."""
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 3, 600)
    scores = rng.random(600) + classes  # S(q) follows the class: "staged" would sort by class
    cur = Curriculum(schedule="competence", c0=0.2, batch_size=10)
    order = curriculum_order(scores, classes, cur, seed=4, epoch=1)
    np.testing.assert_array_equal(np.sort(order), np.arange(600))
    np.testing.assert_array_equal(order, curriculum_order(scores, classes, cur, seed=4, epoch=1))
    assert not np.array_equal(order, curriculum_order(scores, classes, cur, seed=4, epoch=2))
    pct = np.zeros(600)
    for c in range(3):
        m = np.flatnonzero(classes == c)
        pct[m[np.argsort(scores[m])]] = np.arange(1, len(m) + 1) / len(m)
    comp = competence(np.arange(60), c0=0.2, steps=59)  # T = 0: full competence at the last step
    for t in range(60):
        assert pct[order[t * 10:(t + 1) * 10]].max() <= comp[t] + 1e-9
    assert pct[order[:10]].max() <= 0.2 + 1e-9  # the first batch: the easiest fifth of each class
    # T longer than the span: too few eligible, the easiest not-yet-eligible fill the batch
    slow = curriculum_order(scores, classes, dataclasses.replace(cur, competence_steps=600), seed=4, epoch=1)
    np.testing.assert_array_equal(np.sort(slow), np.arange(600))
    staged = curriculum_order(scores, classes, dataclasses.replace(cur, schedule="staged"), seed=4, epoch=1)
    assert set(classes[staged[:150]]) == {0} and len(set(classes[order[:150]])) == 3


@pytest.fixture(scope="module")
def synthetic_train(tmp_path_factory):
    """The default run's training records (configs/default.py: 8000 generated, 6400 train; made
    without their images) and the generator's class-similarity matrix, written as its dataset writes it."""
    records = synthetic_records("train", n=8000, seed=0, image_size=56)
    path = write_class_similarity(tmp_path_factory.mktemp("similarity") / "class_similarity.json",
                                  list(synthetic.CLASSES), synthetic.CLASS_SIMILARITY)
    return records, sim_mod.make_similarity("matrix", matrix=path)


@pytest.mark.parametrize("schedule, violated", [
    ("competence", set()),  # the curriculum arms' default passes
    ("staged", {"max class share", "min class share", "odd-one-out", "best class"}),  # the old one fails
])
@pytest.mark.parametrize("seed, epoch", [(0, 0), (1, 3)])
def test_curriculum_cannot_collapse_onto_a_class(synthetic_train, schedule, violated, seed, epoch):
    """The default run's curriculum (batch 16, one epoch of 6400 = its 400 steps, c0 = 0.5) keeps the
    bounds of methods/curriculum_check.py; "staged" breaks all but the climb."""
    records, sim = synthetic_train
    curriculum = Curriculum(schedule=schedule, c0=0.5, batch_size=16, span=len(records))
    assert set(check_order(records, sim, curriculum, seed=seed, epoch=epoch).violations()) == violated


def test_class_r2_and_odd_one_out():
    from anatomy_r1_jax.data.records import Record
    from anatomy_r1_jax.methods.curriculum_check import class_r2

    classes = np.array([0, 0, 1, 1])
    assert class_r2(np.array([0.1, 0.1, 0.7, 0.7]), classes) == pytest.approx(1.0)
    assert class_r2(np.array([0.1, 0.7, 0.1, 0.7]), classes) == pytest.approx(0.0)
    sim = sim_mod.ClassSimilarity(("a", "b", "c", "d"), np.array(
        [[1, .1, .1, .1], [.1, 1, .9, .9], [.1, .9, 1, .9], [.1, .9, .9, 1]]))
    odd = Record(id="q", images=(), question="?", options=("b", "a", "c", "d"), answer="B", answer_text="a")
    assert sim_mod.odd_one_out(odd, sim) == 1.0  # "a" is least like the others
    assert sim_mod.odd_one_out(Record(id="r", images=(), question="?", options=("b", "a", "c", "d"), answer="A",
                                      answer_text="b"),
                               sim) == 0.0
    tie = sim_mod.ClassSimilarity(("a", "b", "c", "d"), np.ones((4, 4)))
    assert sim_mod.odd_one_out(odd, tie) == pytest.approx(0.25)  # all alike: a uniform guess among the four
    assert sim_mod.symmetric_similarity(odd, sim) == pytest.approx((3 * .1 + 3 * .9) / 6)
