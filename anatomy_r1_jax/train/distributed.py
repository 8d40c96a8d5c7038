"""Multi-host start-up: `jax.distributed.initialize` for TPU pods and multi-node GPU.

On a TPU pod slice every host runs the same command and JAX discovers the peers itself. On GPU
clusters set JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
JAX_PROCESS_ID on each node (SLURM jobs are detected automatically by JAX). Single-host runs do
nothing here.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def maybe_initialize() -> None:
    """Initialises the distributed runtime when the environment describes more than one process."""
    multi = os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("TPU_WORKER_HOSTNAMES") or (
        int(os.environ.get("SLURM_NTASKS", "1")) > 1)
    if not multi:
        return
    kwargs = {}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(os.environ["JAX_NUM_PROCESSES"]), process_id=int(os.environ["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
