"""The run's state across steps and restarts: the TrainState in each phase's form, and checkpoints.

    warm-up (sft.steps)  -> begin_grpo ->  GRPO (train.steps)
    a checkpoint         =  the TrainState (a LoRA run's: its adapters, and the base weights only
                            where they are its own) + meta: the pipelines' positions, the GDQA state,
                            the held-out start, whether it holds a KL reference copy, the LoRA base

The phase switch: GRPO's reference policy is the policy it starts from (the warmed-up one); its
optimizer starts afresh (moments 0, its own schedule from its step 0). A LoRA run's full warm-up:
its weights become the frozen base (the reference, adapters off) and GRPO trains the adapters,
still at B = 0; else the reference is a copy of the policy (or, LoRA with an adapter warm-up, the
adapters folded into the base). Restores try the newest checkpoint first; an unreadable one is set
aside (train/checkpoint.py) and the next older one tried.
"""

from __future__ import annotations

import logging

from anatomy_r1_jax import faults
from anatomy_r1_jax.evaluation.heldout import HELDOUT
from anatomy_r1_jax.runtime import builders
from anatomy_r1_jax.train import preemption
from anatomy_r1_jax.train.checkpoint import UnreadableCheckpoint

log = logging.getLogger(__name__)


class RunState:
    """`train`: the TrainState; `saved`: the newest step this run checkpointed or resumed from. The
    host parts a checkpoint's meta holds are the run's (`run.it`, `run.it_sft`, `run.gdqa`, each
    evaluation's start `run.evals[name].start`); `run` is train/assembly.py's Run."""

    def __init__(self, run):
        self.run, self.train, self.saved = run, run.initial_state, 0
        self._updates = {}

    def update(self, phase: str):
        """The compiled update of `phase` ("sft" | "grpo"), built once, for the state that phase
        trains (its trainable split); the length-aware one for GRPO with train.length_buckets."""
        r = self.run
        if phase not in self._updates:
            if phase == "grpo" and r.length_buckets:
                self._updates[phase] = r.programs.length_aware_update(r.tx[phase], r.step_configs[phase], self.train,
                                                                      r.length_buckets)
            else:
                self._updates[phase] = r.programs.update(r.tx[phase], r.step_configs[phase], self.train)
        return self._updates[phase]

    # ---- the phases ---------------------------------------------------------------------------------
    def begin_grpo(self) -> None:
        r = self.run
        if r.lora.trains("sft") != r.lora.trains("grpo"):
            self.train = r.programs.switch_trainable(self.train, r.lora.trains("grpo"), r.config.model.freeze_vision)
        else:
            self.train = r.programs.copy_params(self.train, reference=r.kl_reference)
        self.train = r.programs.reset_optimizer(r.tx["grpo"], r.precision, self.train)

    def lora_base(self, step: int) -> dict:
        """builders.adapter_base of checkpoint `step` ({"base_saved": True} without LoRA)."""
        if not self.run.lora.enabled:
            return {"base_saved": True}
        return builders.adapter_base(self.run.config, step, self.run.ckpt.directory)

    # ---- checkpoints --------------------------------------------------------------------------------
    def meta(self, step: int) -> dict:
        r = self.run
        meta = {"pipeline": r.it.get_state(), "pipeline_sft": r.it_sft.get_state() if r.it_sft is not None else None,
                "gdqa": r.gdqa.to_json(), "eval_start": r.evals[HELDOUT].start if HELDOUT in r.evals else None,
                "eval_starts": {name: ev.start for name, ev in r.evals.items() if name != HELDOUT},
                "kl_reference": self.train.ref_params is not None}
        if r.lora.enabled:
            meta["lora"] = self.lora_base(step)
        return meta

    def save(self, done: int, meta: dict | None = None) -> None:
        """A LoRA checkpoint holds the adapters and their optimizer state, and the frozen base weights
        only where they are its own (trained in a full warm-up, or the warm-up's adapters folded into
        them); else its meta names the checkpoint they come from (builders.adapter_base)."""
        base_saved = self.lora_base(done)["base_saved"]
        self.run.ckpt.save(done, self.train if base_saved else self.train.replace(frozen=None), meta or self.meta(done))
        self.saved = done
        faults.reached("save", done)

    def restore(self) -> int:
        """Resumes from the newest checkpoint that restores (0: none). An unreadable one
        (checkpoint.UnreadableCheckpoint) is named in one line and set aside, and the next older
        one tried; when checkpoints exist but none restores, the run stops (exit code 2)."""
        ckpt = self.run.ckpt
        steps, initial = ckpt.steps(), self.train  # every attempt starts from the state built here
        for step in steps:
            try:
                return self._restore(step)
            except UnreadableCheckpoint as error:
                self.train = initial
                log.error("%s; set aside as %s", error, ckpt.set_aside(step))
        if steps:
            raise preemption.RunStopped(
                f"{ckpt.directory}: none of the checkpoints {steps} restores (each moved to "
                f"{ckpt.directory}.unreadable/); running the same command again starts from step 0",
                preemption.EXIT_NO_CHECKPOINT)
        return 0

    def _restore(self, step: int) -> int:
        r = self.run
        base = self.lora_base(step)
        if "base_step" in base:  # GRPO after a full warm-up: the base is the warm-up's last checkpoint
            self.train, _ = r.ckpt.restore(base["base_step"], self.train)
        if step > r.config.sft.steps > 0:  # a GRPO checkpoint: the state in GRPO's form to restore into
            self.begin_grpo()
        wanted = self.train.ref_params is not None
        like = self._like_saved_reference(step)
        if base["base_saved"]:
            self.train, meta = r.ckpt.restore(step, like)
        else:  # the base weights built at start-up are the checkpoint's
            state, meta = r.ckpt.restore(step, like.replace(frozen=None))
            self.train = state.replace(frozen=self.train.frozen)
        if not wanted:  # an older warm-up checkpoint's unused reference copy is dropped
            self.train = self.train.replace(ref_params=None)
        r.it.set_state(meta["pipeline"])
        if r.it_sft is not None and meta.get("pipeline_sft") is not None:
            r.it_sft.set_state(meta["pipeline_sft"])
        r.gdqa = r.gdqa.resumed(meta["gdqa"])
        starts = {**(meta.get("eval_starts") or {}), HELDOUT: meta.get("eval_start")}
        for name, ev in r.evals.items():
            ev.start = starts.get(name)
        log.info("resumed from step %d", step)
        self.saved = step
        return step

    def _like_saved_reference(self, step: int):
        """The state to restore checkpoint `step` into: with a KL reference copy where the checkpoint
        holds one. A GRPO checkpoint must hold one exactly when this run has one (rl.beta != 0);
        warm-up checkpoints from before 2026-11-30 hold an unused copy (dropped after the restore)."""
        r = self.run
        saved = r.ckpt.restore_meta(step).get("kl_reference", r.kl_reference)  # older: as this config
        wanted = self.train.ref_params is not None
        if step > r.config.sft.steps and saved != wanted:
            raise ValueError(
                f"{r.ckpt.directory}: GRPO checkpoint {step} was saved {'with' if saved else 'without'} a KL "
                f"reference policy (rl.beta {'!=' if saved else '=='} 0) and this run has rl.beta={r.config.rl.beta}: "
                f"resume it with rl.beta {'!= 0' if saved else '= 0'}, or train in a new workdir")
        if saved and not wanted:
            return self.train.replace(ref_params=self.train.params)  # a placeholder of the right shapes
        return self.train
