"""The rollout's compiled programs, and the persistent compilation cache: what training and evaluation share.

    rollout           (params, frozen, prompts, rng, sampling, G, S) -> Completions
    generate          (params, frozen, prompts, rng) -> Completions    (one sampling config; evaluation)

Every function is traced inside `sharding.use_rules(mesh, rules)` (the context is entered in the
traced body, so whenever jax traces it the models' activation constraints are active).
train/compiled.py `Programs` adds the train state's and the update's programs to these.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import os
from typing import Callable

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from anatomy_r1_jax import sharding
from anatomy_r1_jax.rl.rollout import generate
from anatomy_r1_jax.rl.sampling import SamplingConfig
from anatomy_r1_jax.runtime.placement import rollout_layout

log = logging.getLogger(__name__)


def traced_under_rules(fn: Callable, mesh, rules) -> Callable:
    """`fn` whose body runs inside `use_rules(mesh, rules)` (active at trace time, wherever jit traces)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with sharding.use_rules(mesh, rules):
            return fn(*args, **kwargs)

    return wrapped


@dataclasses.dataclass(frozen=True)
class RolloutPrograms:
    """The compiled generation functions of one model (graphdef) on one mesh under one set of logical rules."""

    graphdef: nnx.GraphDef
    mesh: jax.sharding.Mesh
    rules: tuple

    @classmethod
    def create(cls, graphdef, mesh, rules, field: str = "sharding_rules"):
        """`field`: the config field the rules come from (named when one is refused)."""
        sharding.check_rules(rules, field)
        return cls(graphdef, mesh, tuple(tuple(r) for r in rules))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def rollout(self, cache_dtype=None, read_segments: int = 4):
        """Jitted `(params, frozen, prompts, rng, sampling, group_size, prompts_per_group) ->
        Completions` (rl/rollout.py generate, its KV caches in `cache_dtype`, None = the model's
        compute dtype, its decode loop in `read_segments` segments; the last three static)."""

        def run(params, frozen, batch, rng, cfg, group_size, prompts_per_group):
            return generate(nnx.merge(self.graphdef, params, frozen), batch, rng, cfg, cache_dtype=cache_dtype,
                            group_size=group_size, prompts_per_group=prompts_per_group, read_segments=read_segments)

        return jax.jit(traced_under_rules(run, self.mesh, self.rules), static_argnums=(4, 5, 6))

    def generate(self, cfg: SamplingConfig, on_trace: Callable[[], None] | None = None):
        """Jitted `(params, frozen, prompts, rng) -> Completions` for one sampling config, one row
        per prompt (what evaluation answers with); `on_trace` is called each time it is traced."""

        def run(params, frozen, batch, rng):
            if on_trace is not None:
                on_trace()
            return generate(nnx.merge(self.graphdef, params, frozen), batch, rng, cfg)

        return jax.jit(traced_under_rules(run, self.mesh, self.rules))


def rollout_programs(config, graphdef, mesh) -> RolloutPrograms:
    """The rollout's programs, on a layout of their own: config.rollout_mesh ([] = the training
    `mesh`) under config.rollout_sharding_rules. The decode loop reads every weight once per token,
    so the trainer reshards the weights onto this layout once per step (replicated, or
    tensor-parallel over a few devices) instead of all-gathering fsdp shards on every token."""
    return RolloutPrograms.create(graphdef, *rollout_layout(config, mesh), field="rollout_sharding_rules")


def use_compilation_cache(config) -> None:
    """Keep compiled programs in `config.compilation_cache` (jax's persistent compilation cache;
    "" = off): a restarted run loads the update, rollout and evaluation programs it compiled before
    (keyed by the program, its shapes and shardings, the jax version and the devices) instead of
    compiling them again. Call before the first compilation.

    The folder is bounded: past `config.compilation_cache_max_gb` jax deletes the least recently
    used programs. jax writes an entry's program, then its access time (`-atime`), under the
    folder's lock; a program without its time is a write cut short (a kill -9 mid-write). jax would
    read it, fail, compile, and never replace it (it does not overwrite an existing key), and its
    eviction would stop at the missing time: such entries are deleted here, under the same lock."""
    directory = os.path.expanduser(config.compilation_cache)
    if not directory:
        return
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_compilation_cache_max_size", int(config.compilation_cache_max_gb * 2**30))
    drop_unfinished_cache_entries(directory)


def collect_garbage_less() -> None:
    """Python's cyclic garbage collector, tuned for tracing: call once the libraries are imported.

    Tracing and lowering a program allocate millions of small objects, so the collector runs
    constantly, and each older-generation pass walks every live object, the imported libraries'
    too. `gc.freeze()` takes what exists now (the imports) out of its view for good; a young
    generation of 50,000 objects (Python's default: 700) and a middle one of 50 young passes make
    passes ~70x rarer. Short-lived reference cycles are still freed by those passes; full passes
    (every 1000 middle ones) become rare. Measured (docs/benchmarks.md "Start-up"): a warm start
    of the tests' tiny train.py run 0.87x the wall time."""
    gc.freeze()
    gc.set_threshold(50_000, 50, 1000)


def drop_unfinished_cache_entries(directory: str) -> None:
    """Deletes the programs in jax's cache `directory` that have no access-time file (see
    `use_compilation_cache`), and access times without a program."""
    import filelock

    if not os.path.isdir(directory):
        return
    with filelock.FileLock(os.path.join(directory, ".lockfile"), timeout=60):
        names = set(os.listdir(directory))
        programs = {n.removesuffix("-cache") for n in names if n.endswith("-cache")}
        times = {n.removesuffix("-atime") for n in names if n.endswith("-atime")}
        for key in programs - times:
            os.remove(os.path.join(directory, key + "-cache"))
        for key in times - programs:
            os.remove(os.path.join(directory, key + "-atime"))
    if programs - times:
        log.info("compilation cache %s: dropped %d program(s) whose write was cut short", directory,
                 len(programs - times))
