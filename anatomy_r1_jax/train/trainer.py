"""The loop: feeds the compiled rollout and update, evaluates, logs, checkpoints.

Per GRPO step: queries (Grain, curriculum order) -> the step collector (train/collector.py: GDQA
variants, rollout, rewards, re-rolls, micro-batches) -> update (jit, donated state) -> metrics.
A supervised warm-up (config.sft.steps) precedes GRPO on the same step counter. Everything the
loop runs is built by train/assembly.py; the state across phases and restarts is train/state.py's.
Randomness is a pure function of (seed, step), so a killed run resumes exactly. Several processes
(hosts): each reads and collates its data shard's queries; host-side decisions see the whole step
on every process (runtime/placement.py), and process 0 alone writes metrics and plots.
Stops (train/preemption.py): SIGTERM / SIGINT end the run after the step in flight with a checkpoint
of that step on every host; an unreadable latest checkpoint is set aside and the newest one that
restores resumes; a checkpoint that does not fit on the disk, an image unreadable under
data.on_error=raise (after a checkpoint of the last finished step) and train.max_consecutive_errors
non-finite updates in a row each stop the run with one line.
"""

from __future__ import annotations

import logging
import time

import jax
import numpy as np
from tqdm import tqdm

from anatomy_r1_jax import faults
from anatomy_r1_jax.data import prompts
from anatomy_r1_jax.data.batch import Completions, TrainBatch, prompt_width, trim_prompts
from anatomy_r1_jax.data.readers import DataError
from anatomy_r1_jax.evaluation.heldout import itstime
from anatomy_r1_jax.runtime import distributed
from anatomy_r1_jax.runtime.placement import put_batch
from anatomy_r1_jax.train import preemption
from anatomy_r1_jax.train.assembly import build_run
from anatomy_r1_jax.train.collector import calibrate_gdqa
from anatomy_r1_jax.train.compiled import run_iterations
from anatomy_r1_jax.train.metrics import MetricsWriter, report_run, update_metrics
from anatomy_r1_jax.train.state import RunState

log = logging.getLogger(__name__)


def _stack(items):
    return jax.tree.map(lambda *xs: np.stack(xs), *items)


class Trainer:
    """The loop over a Run (train/assembly.py) and its RunState (train/state.py)."""

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        self.run_parts = build_run(config, workdir)
        self.state = RunState(self.run_parts)

    # ---- the device side ------------------------------------------------------------------------------
    def rollout(self, batch, key, group_size: int, prompts_per_group: int) -> Completions:
        """The step collector's rollout: this shard's prompts cut to the call's prompt width (the
        smallest of rl.prompt_buckets widths that holds every shard's longest prompt) and placed on
        the rollout's layout, the compiled rollout over the weights resharded onto it (once per
        state), completions on the host."""
        r = self.run_parts
        layout = r.rollout_programs
        width = max(r.shard.gather(np.int32(prompt_width(batch.attention_mask, r.prompt_widths))))
        batch = trim_prompts(batch, int(width))
        placed = put_batch(batch, layout.mesh, layout.rules, False, r.shard.count)
        weights = r.rollout_weights(self.state.train.params, self.state.train.frozen)
        return distributed.to_host(r.rollout(*weights, placed, key, r.sampling, group_size, prompts_per_group))

    def _place(self, batch, micro_axis=False):
        return put_batch(batch, self.run_parts.mesh, self.run_parts.rules, micro_axis, self.run_parts.shard.count)

    def _unreadable_count(self, iterator) -> float:
        """How many of the last batch's queries (all data shards') were left out: unreadable images."""
        return float(sum(int(part) for part in self.run_parts.shard.gather(np.int32(iterator.unreadable.sum()))))

    def evaluate(self, evaluation) -> tuple[dict, dict[str, float]]:
        """An evaluation (evaluation/heldout.py) of the current weights, on the rollout's layout."""
        return evaluation.evaluate(*self.run_parts.rollout_weights(self.state.train.params, self.state.train.frozen))

    # ---- the steps --------------------------------------------------------------------------------------
    def sft_iteration(self, step: int) -> dict:
        r, c = self.run_parts, self.config.sft
        tb = r.collector.warmup_batch(next(r.it_sft), r.it_sft.unreadable, lambda rec: prompts.warmup_target(
            rec, c.target, c.answer), r.eos_id)
        self.state.train, metrics = self.state.update("sft")(self.state.train, self._place(_stack([tb]), micro_axis=True))
        return {"sft/loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                "updates_skipped_consecutive": metrics["updates_skipped_consecutive"],
                "data/unreadable_queries": self._unreadable_count(r.it_sft)}

    def grpo_batches(self, step: int) -> tuple[list[TrainBatch], dict]:
        """The step's TrainBatches and metrics from the collector, with its key and rng of (seed, step)."""
        r, seed = self.run_parts, self.config.seed
        queries = next(r.it)  # this data shard's
        return r.collector.collect(queries, r.it.unreadable, self.rollout, r.gdqa,
                                   jax.random.fold_in(jax.random.key(seed), step), np.random.default_rng([seed, step]))

    def grpo_iteration(self, step: int) -> dict:
        r = self.run_parts
        t0 = time.perf_counter()
        batches, out = self.grpo_batches(step)
        r.rollout_weights.drop()  # the rollout's copy of the weights is not held through the update
        out["data/unreadable_queries"] = self._unreadable_count(r.it)
        if faults.active("nan", "update", step + 1):  # test-only (anatomy_r1_jax/faults.py): a non-finite loss
            batches = [b.replace(rewards=b.rewards * np.float32("nan")) for b in batches]
        update = self.state.update("grpo")
        if r.length_buckets:  # micro-batches of their own widths, placed one by one
            tb, old_logps = tuple(self._place(b) for b in batches), update.old_logps
        else:
            tb, old_logps = self._place(_stack(batches), micro_axis=True), r.old_logps
        self.state.train, metrics = run_iterations(update, old_logps, self.state.train, tb, self.config.rl.num_iterations)
        out["step_seconds"] = time.perf_counter() - t0
        out.update(update_metrics(jax.device_get(metrics), r.collector.category_index))
        if out["update_skipped"]:
            log.warning("step %d: non-finite loss or gradient; update skipped", step)
        return out

    def calibrate_gdqa(self) -> float:
        """GDQA's calibration (train/collector.py calibrate_gdqa) with the run's rollout and data iterator."""
        r = self.run_parts
        return calibrate_gdqa(r.collector, r.gdqa, r.it, self.rollout, self.config)

    # ---- the loop -------------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        """Resumes from the last complete checkpoint, trains to sft.steps + train.steps. Whatever ends
        it (also an exception), in-flight checkpoint saves finish before it returns, so no
        half-written step is left behind."""
        r = self.run_parts
        start = self.state.restore()
        faults.reached("start", start)
        writer = MetricsWriter(self.workdir, resume_step=start if start else None) if distributed.is_primary() else None
        # The signal handlers stay until the last save is written: a second signal cannot cut it short.
        with preemption.StopSignals() as self.signals:
            try:
                rows = self._loop(start, writer)
            finally:
                r.ckpt.close()
                if writer is not None:
                    writer.close()
                r.it.close()
                if r.it_sft is not None:
                    r.it_sft.close()
        if writer is None:  # processes other than 0 return this session's rows
            return rows
        return report_run(writer.path, self.workdir, self.config.sft.steps)

    def _loop(self, start: int, writer: MetricsWriter | None) -> list[dict]:
        """Steps start..end; metrics rows of this session (written by process 0 only)."""
        c, r, s = self.config, self.run_parts, self.state
        warm, rows = c.sft.steps, []
        total = warm + c.train.steps
        for ev in r.evals.values():
            if start == warm and c.train.steps and ev.start is None:
                # GRPO starts here without a warm-up evaluation (no warm-up, or a checkpoint from before
                # one was kept): evaluate the policy it starts from.
                ev.start = {"step": start, "correct": self.evaluate(ev)[1]}
        bar = tqdm(range(start, total), initial=start, total=total, desc="train", dynamic_ncols=True,
                   disable=writer is None)
        for step in bar:
            sft = step < warm
            before = s.meta(step)  # what a checkpoint of the last finished step holds
            if step == warm and step > 0:
                faults.reached("grpo", step)
                s.begin_grpo()
            calibration = {}
            if step == warm and c.gdqa.calibration and r.gdqa.trigger == "adaptive" and not r.gdqa.calibrated:
                calibration = {"gdqa/calibration_hard": self.calibrate_gdqa()}
            try:
                out = self.sft_iteration(step) if sft else self.grpo_iteration(step)
            except DataError as error:  # an image unreadable under data.on_error=raise
                if s.saved < step and not (step == warm and step > 0):  # (not in GRPO's form already)
                    s.save(step, before)
                raise preemption.RunStopped(f"step {step + 1}: {error}; the last finished step {s.saved} is "
                                            f"checkpointed (data.on_error=skip leaves such queries out)") from error
            out.update(calibration)
            out["lr"] = r.schedules["sft" if sft else "grpo"](step if sft else step - warm)
            done = step + 1
            last = done == total
            due = [ev for ev in r.evals.values() if ev.due(done, warm_up=warm, last=last)]
            if due:
                faults.reached("eval", done)
            for ev in due:
                metrics, correct = self.evaluate(ev)
                out.update(metrics)
                if done == warm:  # the warm-up's last evaluation: where GRPO starts
                    ev.start = {"step": done, "correct": correct}
                elif ev.start is not None:
                    out.update(ev.gain(correct))
            out = {"phase": 0.0 if sft else 1.0, **{k: float(v) for k, v in out.items()}}
            rows.append({"step": done, **out})
            if writer is not None and (itstime(done, c.train.log_every, last=last) or due or calibration):
                writer.write(done, out)
            bar.set_postfix({k: f"{out[k]:.3f}" for k in ("sft/loss", "reward/total", "eval/accuracy") if k in out})
            skipped = int(out.get("updates_skipped_consecutive", 0))
            if skipped >= c.train.max_consecutive_errors:
                raise preemption.RunStopped(
                    f"step {done}: the last {skipped} updates had a non-finite loss or gradient and were skipped "
                    f"(train.max_consecutive_errors={c.train.max_consecutive_errors}); the last checkpoint is "
                    f"step {s.saved}")
            faults.reached("step", done)
            # (the full warm-up's last checkpoint always: it becomes the base of a LoRA run's GRPO checkpoints)
            if itstime(done, c.train.checkpoint_every, last=last) or done in r.ckpt.preserve:
                s.save(done)
            if not last and self.signals.should_stop(done):  # every host stops after the same step
                if s.saved != done:
                    s.save(done)
                raise preemption.RunStopped(
                    f"stopped by {self.signals.received} after step {done}: checkpoint {done} saved in "
                    f"{r.ckpt.directory}; run the same command to resume", preemption.EXIT_STOPPED)
        return rows
