"""QueryPipeline: curriculum order within and across epochs, batch size, exact resume (workers 0 and
2), multi-host shards, bad images."""

import itertools
import json

import numpy as np
import pytest
import transformers
from PIL import Image

from anatomy_r1_jax.data.collate import preprocess_images
from anatomy_r1_jax.data.pipeline import QueryPipeline, seeded_shuffle
from anatomy_r1_jax.data.readers import DataError
from anatomy_r1_jax.data.records import Record

N = 10


@pytest.fixture(scope="module")
def processor():
    # The processor's default min_pixels (shortest_edge) is 56*56 already; pinning both bounds keeps
    # every 56x56 test image at exactly 4x4 patches of 14 (grid_thw [1, 4, 4], pixel_values [16, 1176]).
    return transformers.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56)


def _record(i: int, path: str) -> Record:
    return Record(id=f"q{i}", images=(path,), question=f"What is shown in image {i}?",
                  options=("Liver", "Gut"), answer="A", answer_text="Liver")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    out = []
    for i in range(N):
        path = folder / f"{i}.png"
        pixels = np.random.default_rng(i).integers(0, 256, (56, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        out.append(_record(i, str(path)))
    return out


def _reversed_then_rolled(epoch: int) -> np.ndarray:
    return np.roll(np.arange(N)[::-1], epoch)


def _take(iterator, steps: int) -> list:
    return [next(iterator) for _ in range(steps)]


def _indices(batches) -> list[list[int]]:
    return [[q.index for q in batch] for batch in batches]


def _assert_same_batches(a, b):
    assert _indices(a) == _indices(b)
    for qa, qb in zip(itertools.chain(*a), itertools.chain(*b)):
        assert qa.record == qb.record
        np.testing.assert_array_equal(qa.images.pixel_values, qb.images.pixel_values)
        np.testing.assert_array_equal(qa.images.grid_thw, qb.images.grid_thw)


def test_order_follows_order_fn_within_and_across_epochs(records, processor):
    pipeline = QueryPipeline(records, batch_size=4, image_processor=processor,
                             order_fn=_reversed_then_rolled, drop_remainder=False)
    it = iter(pipeline)
    batches = _take(it, 8)  # 32 queries: epochs 0, 1, 2 and part of 3; batches straddle epochs
    it.close()
    assert all(len(batch) == 4 for batch in batches)
    expected = np.concatenate([_reversed_then_rolled(e) for e in range(4)])[:32]
    assert list(itertools.chain(*_indices(batches))) == expected.tolist()
    query = batches[0][0]
    assert query.record == records[query.index]
    want = preprocess_images(records[query.index], processor)
    np.testing.assert_array_equal(query.images.pixel_values, want.pixel_values)
    assert query.images.pixel_values.shape == (16, 1176)
    assert query.images.grid_thw.tolist() == [[1, 4, 4]]


def test_drop_remainder_keeps_each_batch_inside_one_epoch(records, processor):
    pipeline = QueryPipeline(records, batch_size=4, image_processor=processor, order_fn=_reversed_then_rolled)
    assert (pipeline.records_per_epoch, pipeline.steps_per_epoch) == (8, 2)
    it = iter(pipeline)
    batches = _take(it, 6)
    it.close()
    expected = np.concatenate([_reversed_then_rolled(e)[:8] for e in range(3)])
    assert list(itertools.chain(*_indices(batches))) == expected.tolist()


def test_default_order_is_a_seeded_shuffle_per_epoch(records, processor):
    order = seeded_shuffle(N, seed=3)
    assert sorted(order(0).tolist()) == list(range(N))
    assert order(0).tolist() != order(1).tolist()
    it = iter(QueryPipeline(records, batch_size=5, image_processor=processor, seed=3))
    batches = _take(it, 4)
    it.close()
    assert list(itertools.chain(*_indices(batches))) == np.concatenate([order(0), order(1)]).tolist()


def test_shards_split_each_global_batch(records, processor):
    shards = []
    for index in range(2):
        it = iter(QueryPipeline(records, batch_size=2, image_processor=processor, order_fn=_reversed_then_rolled,
                                shard_index=index, shard_count=2))
        shards.append(_indices(_take(it, 4)))
        it.close()
    stream = np.concatenate([_reversed_then_rolled(e)[:8] for e in range(2)])  # 8 = 2 global batches of 4
    for step in range(4):
        global_batch = stream[step * 4:(step + 1) * 4].tolist()
        assert shards[0][step] == global_batch[0::2] and shards[1][step] == global_batch[1::2]


def test_shard_blocks_rebuild_one_process_micro_batches(records, processor):
    """shard_block = a shard's micro-batch: micro-batch m of one process's batch of 8 (two
    micro-batches of 4) is shard 0's micro-batch m followed by shard 1's (the trainer's multi-host
    layout; the strided default would interleave the shards)."""
    make = lambda **kw: iter(QueryPipeline(records, image_processor=processor,  # noqa: E731
                                           order_fn=_reversed_then_rolled, **kw))
    one = make(batch_size=8)
    single = _indices(_take(one, 2))
    one.close()
    shards = []
    for index in range(2):
        it = make(batch_size=4, shard_index=index, shard_count=2, shard_block=2)
        shards.append(_indices(_take(it, 2)))
        it.close()
    for step in range(2):
        s0, s1 = shards[0][step], shards[1][step]
        assert single[step] == s0[:2] + s1[:2] + s0[2:] + s1[2:]
    with pytest.raises(ValueError, match="shard_block=3 must divide batch_size=2"):
        QueryPipeline(records, batch_size=2, image_processor=processor, shard_count=2, shard_block=3)


def _resume_matches(records, processor, workers: int, reference=None):
    """Saves the state after 3 batches, reads 3 more, restores the state into a fresh iterator and
    checks that it gives the same 3 batches."""
    make = lambda: iter(QueryPipeline(records, batch_size=3, image_processor=processor,  # noqa: E731
                                      order_fn=_reversed_then_rolled, workers=workers))
    it = make()
    head = _take(it, 3)  # 9 queries: ends inside epoch 1 of records_per_epoch 9
    state = json.loads(json.dumps(it.get_state()))
    tail = _take(it, 3)
    it.close()
    restored = make()
    restored.set_state(state)
    resumed = _take(restored, 3)
    restored.close()
    _assert_same_batches(tail, resumed)
    if reference is not None:
        _assert_same_batches(head + tail, reference)
    return head + tail


@pytest.mark.slow
def test_resume_is_exact_with_and_without_worker_processes(records, processor):
    in_process = _resume_matches(records, processor, workers=0)
    assert list(itertools.chain(*_indices(in_process))) == \
        np.concatenate([_reversed_then_rolled(e)[:9] for e in range(2)]).tolist()
    # Two worker processes (the slow part of this file: each start of 2 workers costs ~10 s of CPU,
    # mostly importing transformers to unpickle the processor): the same resume guarantee, and the
    # same stream as in-process, i.e. the order holds after the multiprocess prefetch.
    _resume_matches(records, processor, workers=2, reference=in_process)


@pytest.mark.parametrize("problem", ["missing", "undecodable"])
def test_bad_image_raises_naming_file_and_record(records, processor, tmp_path, problem):
    path = tmp_path / "bad.png"
    if problem == "undecodable":
        path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    bad = list(records[:3]) + [_record(99, str(path))]
    it = iter(QueryPipeline(bad, batch_size=4, image_processor=processor, order_fn=lambda e: np.arange(4)))
    with pytest.raises(DataError, match=r"record 'q99'.*bad\.png"):
        next(it)
    it.close()


def test_order_fn_must_return_a_permutation(records, processor):
    it = iter(QueryPipeline(records, batch_size=2, image_processor=processor, order_fn=lambda e: np.zeros(N, int)))
    with pytest.raises(ValueError, match="permutation"):
        next(it)
    it.close()


def test_competence_curriculum_order_resumes_exactly(records, processor):
    """The trainer's order_fn for the competence curriculum (a pure function of the epoch): a restored
    iterator gives the batches the first would have, across an epoch boundary, and each epoch is
    the curriculum's order."""
    import functools

    from anatomy_r1_jax.methods.curriculum import Curriculum, curriculum_order

    scores, classes = np.linspace(0.1, 0.9, N), np.arange(N) % 2
    order = functools.partial(curriculum_order, scores, classes, Curriculum(schedule="competence", c0=0.5,
                                                                           batch_size=2), seed=5)
    make = lambda: iter(QueryPipeline(records, batch_size=2, image_processor=processor,  # noqa: E731
                                      order_fn=lambda epoch: order(epoch=epoch)))
    it = make()
    head = _take(it, 4)
    state = json.loads(json.dumps(it.get_state()))
    tail = _take(it, 3)  # 14 queries in all: into epoch 1
    it.close()
    restored = make()
    restored.set_state(state)
    _assert_same_batches(tail, _take(restored, 3))
    restored.close()
    stream = np.concatenate([order(epoch=0), order(epoch=1)])[:14]
    assert list(itertools.chain(*_indices(head + tail))) == stream.tolist()
