"""The Grain input pipeline: records in curriculum order -> preprocessed images -> batches of queries.

    positions 0, 1, 2, ...  (one endless stream; epoch e+1 follows epoch e)
      -> record index order_fn(epoch)[position % records_per_epoch]      (the curriculum hook)
      -> this process's shard: blocks of shard_block positions dealt round-robin to the
         shard_count processes (block 1: positions shard_index, shard_index + shard_count, ...)
      -> Query(index, record, images)     load + image processor, in `workers` worker processes
      -> lists of batch_size queries      after the multiprocess prefetch, so the order holds
      -> thread prefetch of batches in the main process

Global batch t of the whole job (all processes together) is positions [t*B*S, (t+1)*B*S) of the
stream (B = batch_size, S = shard_count): every process reads its share of the same contiguous
slice, so the curriculum order holds across hosts as well as within one. With shard_block = B / M
(the trainer's M micro-batches), micro-batch m of the global batch is the concatenation of every
process's micro-batch m in process order: exactly the rows a single process would have read.

An image that cannot be read when its query is loaded (deleted or damaged after the start-up
validation): `on_unreadable="raise"` stops the iterator with a DataError naming the record and the
file; "skip" logs that line and yields the query with a blank image of the processor's smallest size
and `Query.unreadable` set, so batches keep their fixed shapes and the trainer leaves the query out
of the step (`QueryIterator.unreadable` marks the last batch's).

GDQA variants and tokenization are not done here: their adaptive state changes every step, so the
trainer does them in its main process (data/collate.py).

The iterator is Grain's own: `get_state()` (a JSON-serialisable dict) and `set_state()` give an exact
resume, and `grain.checkpoint` handlers can save it with Orbax. A state restores into a pipeline built
with the same records, batch_size, order_fn, workers and shard_index / shard_count / shard_block
(its layout follows the worker count).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Callable

import grain
import numpy as np
from absl import flags
from PIL import Image

from anatomy_r1_jax.data.collate import ImageFeatures, preprocess_images
from anatomy_r1_jax.data.images import image_problem
from anatomy_r1_jax.data.readers import DataError
from anatomy_r1_jax.data.records import Record
from anatomy_r1_jax import faults

log = logging.getLogger(__name__)
ON_UNREADABLE = ("raise", "skip")

OrderFn = Callable[[int], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Query:
    """One query ready for the trainer: its index in the record list, the record, its images
    (pixel_values [p, C*T*ps*ps] float32, grid_thw [k, 3]). unreadable: what was wrong with its
    images when they were loaded (then `images` is a blank stand-in and the query is left out)."""

    index: int
    record: Record
    images: ImageFeatures
    unreadable: str | None = None


def ensure_flags_parsed() -> None:
    """Grain reads absl flags, in the trainer and in its worker processes; a script that does not go
    through `absl.app.run` (pytest, a plain `python train.py`) has not parsed them."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _worker_init(worker_index: int, worker_count: int) -> None:
    del worker_index, worker_count
    ensure_flags_parsed()


def seeded_shuffle(num_records: int, seed: int) -> OrderFn:
    """The default order: a fresh seeded permutation each epoch (curriculum schedule "none" with the
    same seed gives the same orders)."""
    return lambda epoch: np.random.default_rng([seed, epoch]).permutation(num_records)


class _EpochOrder:
    """Random-access source over the endless stream: position -> record index.

    Only the first `records_per_epoch` entries of each epoch's order are used (all of them unless
    the remainder is dropped). Orders are computed lazily and cached per epoch (in each worker).
    """

    def __init__(self, num_records: int, records_per_epoch: int, order_fn: OrderFn):
        self.num_records = num_records
        self.records_per_epoch = records_per_epoch
        self.order_fn = order_fn
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(int(position), self.records_per_epoch)
        return int(self.order(epoch)[offset])

    def order(self, epoch: int) -> np.ndarray:
        order = self._cache.get(epoch)
        if order is None:
            order = np.asarray(self.order_fn(epoch))
            n = self.num_records
            if order.shape != (n,) or not np.issubdtype(order.dtype, np.integer) or \
                    not np.array_equal(np.sort(order), np.arange(n)):
                raise ValueError(f"order_fn({epoch}) must return a permutation of range({n}); got "
                                 f"shape {order.shape}, dtype {order.dtype}")
            if len(self._cache) >= 2:  # positions only move forward: two epochs cover a boundary
                self._cache.pop(min(self._cache), None)
            self._cache[epoch] = order
        return order

    def __getstate__(self):
        return {**self.__dict__, "_cache": {}}


class _ShardOrder:
    """Random-access source over this process's share of the stream: its position j -> the record
    index at global position p(j), where blocks of `block` consecutive global positions go
    round-robin to the `count` shards (block 1: p(j) = index + j * count)."""

    def __init__(self, order: _EpochOrder, index: int, count: int, block: int):
        self.order, self.index, self.count, self.block = order, index, count, block

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, j: int) -> int:
        k, offset = divmod(int(j), self.block)
        return self.order[(k * self.count + self.index) * self.block + offset]


class _LoadQuery:
    """record index -> (index, record, pixel_values, grid_thw): loads and preprocesses the record's
    images (the expensive part). A flat tuple rather than a Query so that Grain sees the arrays as
    leaves and passes them from the worker processes through shared memory instead of a pickle."""

    def __init__(self, records: list[Record], image_processor, on_unreadable: str = "raise"):
        if on_unreadable not in ON_UNREADABLE:
            raise ValueError(f"on_unreadable must be one of {ON_UNREADABLE}, got {on_unreadable!r}")
        self.records = records
        self.image_processor = image_processor
        self.on_unreadable = on_unreadable

    def __call__(self, index: int) -> tuple[int, Record, np.ndarray, np.ndarray, str]:
        record = self.records[index]
        if faults.active("vanish", "record", index):
            for path in record.images:
                if os.path.exists(path):
                    os.remove(path)
        try:
            images = preprocess_images(record, self.image_processor)
        except Exception as error:  # PIL and the processor raise many types
            problems = [p for p in map(image_problem, record.images) if p is not None]
            what = problems[0] if problems else (
                f"images {list(record.images)} failed in the image processor "
                f"({type(error).__name__}: {error})")
            message = f"record {record.id!r} (index {index}): {what}"
            if self.on_unreadable == "raise":
                raise DataError(message) from error
            log.warning("%s: left out of its step (data.on_error=skip)", message)
            images, unreadable = self._stand_in(record), message
        else:
            unreadable = ""
        return index, record, images.pixel_values, images.grid_thw, unreadable

    def _stand_in(self, record: Record) -> ImageFeatures:
        """Blank images of the processor's smallest size, one per image of `record` (fewer patches
        than any image that passed the validation, so every budget still holds)."""
        side = int(np.ceil(np.sqrt(self.image_processor.size["shortest_edge"])))  # its min_pixels
        blank = Image.new("RGB", (side, side))
        out = self.image_processor(images=[blank] * len(record.images), return_tensors="np")
        return ImageFeatures(np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"], np.int64))


def _queries(elements: list[tuple[int, Record, np.ndarray, np.ndarray, str]]) -> list[Query]:
    return [Query(index, record, ImageFeatures(np.asarray(pixels), np.asarray(grid)), str(unreadable) or None)
            for index, record, pixels, grid, unreadable in elements]


class QueryIterator:
    """Grain's iterator (next, get_state, set_state, close) that also keeps `unreadable`: a bool
    [batch_size] array marking the queries of the last batch whose images could not be read."""

    def __init__(self, iterator: grain.DatasetIterator, batch_size: int):
        self._iterator = iterator
        self.unreadable = np.zeros(batch_size, bool)

    def __iter__(self):
        return self

    def __next__(self) -> list[Query]:
        queries = next(self._iterator)
        self.unreadable = np.array([q.unreadable is not None for q in queries], bool)
        return queries

    def get_state(self) -> dict:
        return self._iterator.get_state()

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(state)

    def close(self) -> None:
        self._iterator.close()


class QueryPipeline:
    """Endless batches of `batch_size` Queries for this process, in the global order of `order_fn`.

    Args:
      records: the training records; `Query.index` indexes this list.
      batch_size: queries per batch on this process.
      image_processor: the checkpoint's image processor (`Qwen2VLImageProcessorPil`); it travels to
        the worker processes by pickle.
      order_fn: epoch -> a permutation of range(len(records)) (e.g. methods.curriculum.curriculum_order
        with the scores bound); default `seeded_shuffle(len(records), seed)`. It must be picklable
        with cloudpickle (lambdas and closures are) and a pure function of the epoch.
      workers: worker processes preprocessing images (0: threads in this process).
      shard_index, shard_count: this process's share of the stream (its data shard among the
        processes, `runtime.distributed.data_shard`).
      shard_block: consecutive positions a shard reads before the next shard's turn; a divisor of
        batch_size (1: strided; batch_size / micro-batches: the trainer's layout, see above).
      drop_remainder: True: each epoch uses the first `steps_per_epoch * batch_size * shard_count`
        records of its order, so a global batch never mixes two epochs (fewer than
        batch_size * shard_count records are left out of an epoch, a different set each epoch when
        the order is shuffled).
        False: every record of every epoch, and a batch may straddle an epoch boundary.
      read_threads: threads running the image transform in each worker (or here when workers=0).
      prefetch: queries each worker prepares ahead (default batch_size); batches are prefetched 2 ahead.
      on_unreadable: "raise" | "skip": an image unreadable when loaded (see the module docstring).
    """

    def __init__(self, records: list[Record], *, batch_size: int, image_processor,
                 order_fn: OrderFn | None = None, seed: int = 0, workers: int = 0,
                 shard_index: int = 0, shard_count: int = 1, shard_block: int = 1, drop_remainder: bool = True,
                 read_threads: int = 1, prefetch: int | None = None, on_unreadable: str = "raise"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
        if shard_block < 1 or batch_size % shard_block:
            raise ValueError(f"shard_block={shard_block} must divide batch_size={batch_size}")
        global_batch = batch_size * shard_count
        n = len(records)
        self.records_per_epoch = n - n % global_batch if drop_remainder else n
        if self.records_per_epoch == 0:
            raise ValueError(f"{n} records cannot fill one global batch of {batch_size} x "
                             f"{shard_count} shards")
        self.steps_per_epoch = self.records_per_epoch // global_batch  # exact when drop_remainder
        self.batch_size = batch_size
        order_fn = order_fn if order_fn is not None else seeded_shuffle(n, seed)
        prefetch = batch_size if prefetch is None else prefetch

        order = _EpochOrder(n, self.records_per_epoch, order_fn)
        ds = grain.MapDataset.source(_ShardOrder(order, shard_index, shard_count, shard_block))
        ds = ds.map(_LoadQuery(list(records), image_processor, on_unreadable))
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
        # Arrays under 64 KiB (grid_thw) are cheaper pickled than put in a shared-memory segment.
        ds = grain.experimental.WithOptionsIterDataset(ds, grain.experimental.DatasetOptions(min_shm_size=1 << 16))
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=_worker_init)
        ds = ds.batch(batch_size, drop_remainder=True, batch_fn=_queries)
        self._dataset = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=2)

    def __iter__(self) -> QueryIterator:
        """Grain's iterator: next() -> list[Query] of length batch_size; get_state() / set_state().
        Call `close()` on it when done (it stops the worker processes)."""
        ensure_flags_parsed()
        return QueryIterator(iter(self._dataset), self.batch_size)
