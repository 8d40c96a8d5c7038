"""Multi-host runs: start-up, each process's data shard, and the few host-side exchanges.

Start-up (`maybe_initialize`) calls `jax.distributed.initialize` when the environment describes
several processes: JAX_COORDINATOR_ADDRESS (host:port of process 0) with JAX_NUM_PROCESSES and
JAX_PROCESS_ID (any cluster; CPU collectives use gloo, jax 0.10's default); a SLURM job step with
SLURM_NTASKS > 1 or a GKE TPU pod (TPU_WORKER_HOSTNAMES), which JAX reads itself; or
ANATOMY_R1_DISTRIBUTED=1, which leaves all detection to JAX (Cloud TPU VM slices, whose workers
learn their peers from the metadata server, Open MPI). Single-process runs skip all of it.

Data: the mesh's logical `activation_batch` axis splits every batch's rows over the devices; the processes
whose devices hold the same block of rows form one data shard (`DataShard`). Each shard reads and
preprocesses only its own queries (data/pipeline.py, `shard_block` = its micro-batch), and the
trainer exchanges only small host values: query indices, prompt-batch bookkeeping (token ids,
vision layout, not pixels) and completions, so that host-side decisions (GDQA variants, rewards,
metrics) are the same on every process and equal to a one-process run's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from anatomy_r1_jax import sharding

log = logging.getLogger(__name__)


def maybe_initialize() -> None:
    """Initialises the distributed runtime when the environment describes more than one process."""
    multi = os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("TPU_WORKER_HOSTNAMES") or (
        int(os.environ.get("SLURM_NTASKS", "1")) > 1) or os.environ.get("ANATOMY_R1_DISTRIBUTED") == "1"
    if not multi:
        return
    kwargs = {}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in os.environ]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} not: set both on every process")
        kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(os.environ["JAX_NUM_PROCESSES"]), process_id=int(os.environ["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kwargs)
    barrier("initialized")
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def is_primary() -> bool:
    """Process 0 writes what exists once per run (metrics, plots, config, caches)."""
    return jax.process_index() == 0


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Waits until every process reached `name`. Uses the coordination service, not a device
    collective: gloo's CPU collectives give up when peers arrive more than 30 s apart (a host
    writing the synthetic data set or a cache takes longer)."""
    if jax.process_count() > 1:
        from jax._src import distributed as jax_distributed  # the client orbax and multihost_utils use

        jax_distributed.global_state.client.wait_at_barrier(name, timeout_s * 1000)


@contextlib.contextmanager
def primary_first(name: str):
    """Process 0 runs the body first (e.g. writes the synthetic data or a cache), the others after
    it finished, so on a shared file system they reuse its files instead of racing to write them."""
    if not is_primary():
        barrier(name)
    yield
    if is_primary():
        barrier(name)


@dataclasses.dataclass(frozen=True)
class DataShard:
    """Block `index` of `count` equal blocks of every batch's rows (and patches): the rows this
    process's devices hold. count = 1 on one host (or when rows are not split across hosts)."""

    index: int = 0
    count: int = 1

    def block(self, x):
        """This shard's block of a sequence or array's leading axis."""
        n = len(x) // self.count
        return x[self.index * n:(self.index + 1) * n]

    def gather(self, tree) -> list:
        """Every shard's `tree` (NumPy leaves of equal shapes on all processes), in shard order."""
        if jax.process_count() == 1:
            return [tree]
        stacked, index = multihost_utils.process_allgather((tree, np.int32(self.index)))
        first = [int(np.flatnonzero(index == k)[0]) for k in range(self.count)]
        return [jax.tree.map(lambda x, p=p: np.asarray(x[p]), stacked) for p in first]


def data_shard(mesh: Mesh, rules) -> DataShard:
    """This process's DataShard under the mesh and the logical `activation_batch` rule."""
    n = mesh.devices.size
    spec = sharding.logical_to_spec((sharding.BATCH,), rules, mesh)
    rows = sorted({i for index in NamedSharding(mesh, P(*spec)).addressable_devices_indices_map((n,)).values()
                   for i in range(*index[0].indices(n))})
    size = len(rows)
    if rows != list(range(rows[0], rows[0] + size)) or rows[0] % size:
        raise ValueError(f"the devices of process {jax.process_index()} hold rows {rows} of {n}: the mesh "
                         f"{dict(mesh.shape)} must give each host one contiguous block of the batch rows; order the "
                         f"mesh axes so that the logical 'activation_batch' axes come first")
    return DataShard(rows[0] // size, n // size)


def check_same_data_shard(shard: DataShard, mesh: Mesh, rules, field: str = "rollout_sharding_rules") -> None:
    """Raises one line unless `rules` on `mesh` give this process the batch rows `shard` (the
    training layout's) does: each host collates its own queries for the rollout and the update alike."""
    other = data_shard(mesh, rules)
    if other != shard:
        raise ValueError(f"config {field}: process {jax.process_index()} would hold block {other.index} of "
                         f"{other.count} of the rollout's rows but block {shard.index} of {shard.count} of the "
                         f"update's: map 'activation_batch' to mesh axes that split the hosts as training does")


def to_host(tree):
    """Global arrays -> NumPy on every process (jax.device_get of arrays other hosts hold part of)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)
