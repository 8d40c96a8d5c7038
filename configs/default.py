"""The embedded default: synthetic surgical-anatomy benchmark + a tiny Qwen2-VL made from scratch.

    python train.py --workdir runs/default [--config.train.steps=40 ...]

Everything is made on the spot (data, tokenizer, model); no downloads. A short supervised
warm-up teaches the answer format, then GRPO trains on CPU in minutes.
"""

import ml_collections


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    # jax's persistent compilation cache: compiled programs are kept here and a restarted run (after a
    # preemption or kill -9) or evaluate.py on the same shapes loads them instead of compiling again
    # (programs that compile in under a second are not kept); "" = off. Past max_gb the least recently
    # used programs are deleted (a real model's update and rollout take tens to hundreds of MB each).
    c.compilation_cache = "~/.cache/anatomy_r1_jax/xla"
    c.compilation_cache_max_gb = 8.0

    c.model = dict(
        path="",  # local HF checkpoint directory; "" = a tiny model made from scratch
        preset="",  # real-model name (configs/methods.py) when path must be given
        family="qwen2_vl",
        tiny=dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vision_depth=2, vision_hidden_size=64, vision_num_heads=2,
                  vision_intermediate_size=128),
        dtype="float32",  # compute; param_dtype: the weights (precision policy: runtime/precision.py)
        param_dtype="float32",
        remat="none",  # per-layer recomputation in the backward pass: "none" | "full" | "save_dots"
        # "auto" (cuDNN on GPU, XLA on CPU, chunked on TPU) | "reference" | "xla" | "cudnn" | "chunked"
        # | "pallas" (decode steps by the Pallas GPU decode kernel, blocks of queries by XLA)
        attention="auto",
        scan_layers=False,  # layers stacked, run by lax.scan; measured: no gain at 2 layers (docs/benchmarks.md)
        freeze_vision=False,
        # Low-rank adapters (models/lora.py): rank 0 = off (full fine-tuning); rank > 0 trains only the
        # adapters (alpha / rank scales them) on the decoder's `targets`, and with vision=True on the
        # vision blocks' qkv, proj and MLP; the KL reference is the base model (adapters off).
        # warmup: what the supervised warm-up (sft.steps > 0) trains. "full": the whole model (full AdamW
        # state), whose weights then become GRPO's frozen base; use it when the base cannot answer in
        # format yet (the embedded default's random tiny model, where adapters alone do not learn the
        # warm-up). "adapters": the adapters alone (then folded into the base); use it for a real
        # pretrained base, where a full warm-up would need the memory LoRA saves.
        # lr_scale: a phase that trains the adapters (GRPO; the warm-up with warmup="adapters") uses its
        # learning rate (optim.lr, sft.lr) times this factor (docs/results/default_run.md).
        lora=dict(rank=0, alpha=32.0, dropout=0.0, targets=("q", "k", "v", "o", "gate", "up", "down"), vision=False,
                  warmup="full", lr_scale=1.0),
    )
    c.tokenizer = dict(path="", vocab_size=1024)  # "" = the project's tiny byte-level BPE

    c.data = dict(
        train="synthetic",  # a records file (any supported format) or "synthetic"
        eval="synthetic",  # a records file, "" (none), "synthetic" (its val split; with train="synthetic")
        format="auto",
        image_root="",
        synthetic=dict(n=8000, seed=0, image_size=56),
        prompt_variant="compact",  # the paper's "grpo" header is 100 tokens: too costly for a CPU demo
        prompt_length=96,  # GDQA rephrasings of the longest synthetic questions need 90
        patches_per_query=16,  # 56x56 px -> 4x4 patches
        # Images are resized to at most max_pixels (0: patches_per_query * 14^2, so every image fits
        # the budget) and at least min_pixels (0: the checkpoint's), as Qwen's processors do.
        max_pixels=0,
        min_pixels=0,
        eval_size=0,  # held-out questions evaluated (the first N of data.eval; 0: all, 800 in the synthetic val split)
        workers=0,
        # records with problems (unreadable or missing image, prompt or GDQA variant over prompt_length,
        # images over patches_per_query), found by a pass over all data before training:
        # "raise" lists them all and stops; "skip" leaves them out (listed in workdir/invalid_records.jsonl)
        on_error="raise",
    )

    c.rl = dict(
        group_size=8,
        # Exploration: the whole distribution (no top-p / top-k cut), so minority answers reach the
        # group; at 0.9 / top-p 0.9 half the groups came out all-equal (docs/results/default_run.md).
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_completion_length=24,
        # The policy loss (rl/losses.py POLICY_LOSSES: "grpo", "gpg") reads its config's fields from
        # rl.<field> by name (GRPOLoss: eps_low, eps_high, beta, aggregation, max_completion_length);
        # a new loss's new knob is one more field here, with its default.
        beta=0.04,  # the KL weight (0: no reference policy)
        eps_low=0.2,
        eps_high=0.2,
        loss="grpo",
        aggregation="token-mean",
        advantage="grpo",
        num_iterations=1,
        # Weight of every registered reward (rl/rewards.py; 0 = off), e.g. --config.rl.rewards.accuracy=1.0.
        # The paper scores the exact letter ("accuracy"); a tiny model made from scratch is scored on
        # naming the structure ("accuracy_lenient" accepts the option text), see sft.answer.
        rewards=dict(format=1.0, accuracy=0.0, accuracy_lenient=1.0),
        # DAPO-style dynamic sampling of groups whose rewards are all equal (methods/reroll.py): "off";
        # "resample" (re-rolled with fresh samples in the step, up to max_resample_rounds rounds); "drop"
        # (zero weight in the loss, which is normalised by the valid groups).
        dynamic_sampling="off",
        max_resample_rounds=1,
        # Queries per rollout call (0: all of the step's in one call, however many micro-batches the
        # update takes): each call reads every weight once per generated token, so fewer, larger calls
        # decode faster; smaller ones hold a smaller KV cache. Must divide train.batch_size.
        rollout_batch_size=0,
        # The rollout's prompt width: each call's left-padded prompts are cut to the smallest of K
        # widths (data.prompt_length * k / K, multiples of 8) that holds its longest prompt, so the
        # prefill and every decode step skip the padding (K compiled rollout shapes at most; the
        # update still reads the full data.prompt_length); 1: always data.prompt_length.
        prompt_buckets=4,
    )

    # The rest of the precision policy (runtime/precision.py): the dtype gradients are accumulated in, AdamW's
    # moments, and whether AdamW updates a float32 master copy of bf16 weights.
    c.optim = dict(lr=5e-4, warmup_steps=20, schedule="constant", weight_decay=0.0, grad_clip=1.0, b1=0.9, b2=0.99,
                   grad_dtype="float32", moment_dtype="float32", master_weights=False)

    # Each phase has its own schedule (train/schedules.py: "constant", "linear", "cosine"; warmup_steps 0 =
    # none) counted from its first step, and its own AdamW state (GRPO starts with fresh moments).
    c.sft = dict(steps=100, lr=2e-3, batch_size=32, target="think", answer="text", warmup_steps=20, schedule="constant")

    c.train = ml_collections.ConfigDict(dict(
        batch_size=16,  # queries per GRPO step (rows = batch_size * group_size)
        micro_batches=1,
        steps=400,  # one epoch of the 6400 training queries
        log_every=1,  # a metrics.jsonl row every N steps (and at every evaluation and the last step)
        eval_every=100,  # the held-out evaluation's cadence (evals.heldout.every follows it)
        checkpoint_every=100,
        # A non-finite loss or gradient skips its update (optax.apply_if_finite); this many in a row stop the run.
        max_consecutive_errors=10,
        keep_checkpoints=2,
        logp_chunk=32,
        # Prefix sharing: each distinct prompt of a group goes through the model once (rollout
        # prefill and update), not once per rollout: 1 prompt row per group without GDQA variants,
        # num_variants with them (rl/rollout.py).
        share_prompts=True,
        # The length-aware GRPO update: the step's groups sorted by their longest completion into the
        # micro-batches, each trimmed to the smallest of K bucket lengths (T/K steps of
        # rl.max_completion_length, multiples of 8) that holds its rows, so the update costs about in
        # proportion to the real tokens with K compiled shapes (train/micro_batches.py); 0: every
        # micro-batch padded to rl.max_completion_length (one scanned program).
        length_buckets=4,
    ))
    # Evaluations during training, by name (big_vision style), each on the evaluator scripts/evaluate.py
    # uses (greedy answers, the run's accuracy reward): records "eval" (data.eval, data.eval_size) or a
    # records file (read and checked with the run's data, data.format; its first `limit`, 0: all; "": off); every N
    # GRPO steps counted from GRPO's start, at the warm-up's last step (GRPO's start, against which each
    # later evaluation reports its paired gain) and at the last step. "heldout" logs eval/*, its gain is the
    # run's last line; another name logs eval_<name>/*.
    c.evals = ml_collections.ConfigDict()
    c.evals.heldout = ml_collections.ConfigDict(dict(records="eval", every=c.train.get_ref("eval_every"), limit=0))

    # The ablation arm (configs/methods.py ARMS). The default run is plain GRPO: at this scale ASC's easy
    # stage is dominated by the two pale classes and the policy collapses onto them (docs/results/default_run.md);
    # the paper's methods are the arms of configs/synthetic.py (method=asc|gdqa|gdqa_online|anatomy_r1).
    c.method = "grpo"
    # schedule (methods/curriculum.py): "none" | "competence" (the curriculum arms' default: difficulty
    # = S(q)'s percentile within its answer class, batches from the questions with difficulty <=
    # c(t) = min(1, sqrt(c0^2 + (1 - c0^2) t / T)); T = competence_steps, 0: the span's last step) |
    # "staged" (num_stages stages by S(q); collapses onto classes where S(q) follows the class).
    # score: S(q) as "distractors" (mean similarity of the answer to its distractors) or "symmetric"
    # (mean over all option pairs) (methods/similarity.py).
    # span: how many leading queries of each epoch the schedule orders: "run" (train.steps x
    # batch_size, so a run shorter than an epoch still climbs every stage), 0 (the whole epoch), or N.
    c.curriculum = dict(backend="matrix", matrix="", score="distractors", schedule="none", num_stages=4, c0=0.5,
                        competence_steps=0, span="run")
    # calibration (adaptive trigger): "auto" = a pass of G plain rollouts over the GRPO run's queries
    # before its first step; or an evaluate.py result of the base model on the training records with
    # --samples G; or "" (none). Queries whose G rewards all agree and are not all correct start out
    # triggered (and leave the hard set once a group of theirs diverges). Without it the
    # adaptive trigger only fires on a query's second visit, i.e. never within one epoch.
    # calibration_steps: batches the "auto" pass covers (0: the run's steps, at most one epoch).
    # trigger: "adaptive" | "always" | "off" | "online" (no variants up front: a group whose rewards come out
    # all equal is re-rolled over its variants within the step, before the update, up to max_rerolls rounds).
    # signal (methods/reroll.py SIGNALS; the online re-roll): "reward" (groups whose total rewards are all
    # equal are re-rolled, rescued when they differ after) | "accuracy" (only all-wrong groups are re-rolled,
    # rescued when the accuracy varies after; "permute" is dropped from kinds when the accuracy reward scores
    # the class name, augmentation.variant_kinds). rescued_prompt: what a group a variant re-roll rescued
    # trains on: "variant" (the prompts its rows were sampled with) | "original" (the query's own prompt).
    c.gdqa = dict(trigger="off", kinds=("rephrase", "permute"), num_variants=4, calibration="auto",
                  calibration_steps=0, max_rerolls=1, signal="reward", rescued_prompt="variant")

    c.mesh = [("data", -1)]
    # Logical names -> mesh axes (anatomy_r1_jax/sharding.py): activations (names of their own, MaxText
    # style; activation_batch also places every batch's rows and splits the data over hosts), then weights.
    c.sharding_rules = [("activation_batch", ("data", "fsdp")), ("activation_embed", "fsdp"),
                        ("activation_vision_embed", "fsdp"), ("activation_mlp", "tensor"),
                        ("activation_heads", "tensor"), ("activation_kv_heads", "tensor"),
                        ("activation_vocab", "tensor"),
                        ("embed", "fsdp"), ("vision_embed", "fsdp"), ("mlp", "tensor"), ("vision_mlp", "tensor"),
                        ("heads", "tensor"), ("vision_heads", "tensor"), ("kv_heads", "tensor"), ("vocab", "tensor")]
    # The rollout's layout, apart from training's: the decode loop reads every weight once per token, so
    # weights sharded over fsdp would be all-gathered on every generated token. Before each step's
    # rollout the weights are resharded once onto these rules (here: replicated over data and fsdp,
    # tensor-parallel over `tensor`; rows over data x fsdp), on `rollout_mesh` ([] = the training mesh;
    # e.g. [("data", -1), ("tensor", 2)] decodes a model too large for one device tensor-parallel over
    # pairs). The evaluation's answering uses the same layout.
    c.rollout_mesh = []
    c.rollout_sharding_rules = [("activation_batch", ("data", "fsdp")), ("activation_mlp", "tensor"),
                                ("activation_heads", "tensor"), ("activation_kv_heads", "tensor"),
                                ("mlp", "tensor"), ("vision_mlp", "tensor"), ("heads", "tensor"),
                                ("vision_heads", "tensor"), ("kv_heads", "tensor"), ("vocab", "tensor")]
    return c
