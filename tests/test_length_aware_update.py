"""The length-aware GRPO update (train/micro_batches.py plans, train/compiled.py LengthAwareUpdate
runs): groups sorted by their longest row into micro-batches, each trimmed to a bucket length, is
the padded update to fp32 tolerance (parameters and every metric), on one device and under
data x fsdp x tensor sharding, with the KL reference, dynamic-sampling drop, GPG / Dr.GRPO,
num_iterations 2 and LoRA; it compiles one program per bucket, never returns to the host between
micro-batches, and its compiled programs do the trimmed work."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from anatomy_r1_jax import sharding
from anatomy_r1_jax.models import lora
from anatomy_r1_jax.data.batch import Completions, TrainBatch
from anatomy_r1_jax.rl.losses import GPGLoss, GRPOLoss
from anatomy_r1_jax.train.compiled import Programs, run_iterations
from anatomy_r1_jax.train.micro_batches import bucket_lengths, plan_micro_batches, trimmed_completions
from anatomy_r1_jax.runtime.placement import put_batch, split_model
from anatomy_r1_jax.train.step import StepConfig, make_optimizer
from test_rollout_step import GRID, RULES, _stack, make_model, one_device_mesh, prompt_batch

Q, G, T, M = 4, 4, 32, 2  # 4 groups of 4 rows, budget 32 tokens, 2 micro-batches of 2 groups
TOKENS = (GRID[1] * GRID[2]) // 4  # image tokens per query
BUCKETS = bucket_lengths(T, 4)
CFG = StepConfig(group_size=G, loss=GRPOLoss(beta=0.04, max_completion_length=T), temperature=0.9, logp_chunk=8,
                 num_categories=3)


def test_buckets_and_the_plan():
    assert bucket_lengths(512, 4) == (128, 256, 384, 512)
    assert bucket_lengths(24, 4) == (8, 16, 24) and bucket_lengths(100, 1) == (100,) and BUCKETS == (8, 16, 24, 32)
    lengths = np.array([[3, 30, 2, 2], [5, 1, 7, 2], [32, 4, 4, 4], [6, 8, 1, 1]]).reshape(-1)
    plan = plan_micro_batches(lengths, G, M, BUCKETS)
    assert plan.groups == ((1, 3), (0, 2)) and plan.lengths == (8, 32)  # longest rows 7, 8 | 30, 32
    np.testing.assert_array_equal(plan.rows(0, G), [4, 5, 6, 7, 12, 13, 14, 15])
    assert plan.length_fraction == pytest.approx(40 / 64)
    # Two data shards (groups 0, 1 on shard 0; 2, 3 on shard 1): every micro-batch takes one of each.
    plan = plan_micro_batches(lengths, G, M, BUCKETS, shard_of_group=np.array([0, 0, 1, 1]))
    assert plan.groups == ((1, 3), (0, 2)) and plan.lengths == (8, 32)
    plan = plan_micro_batches(lengths, G, M, BUCKETS, shard_of_group=np.array([0, 1, 0, 1]))
    assert plan.groups == ((0, 1), (2, 3)) and plan.lengths == (32, 32)
    with pytest.raises(ValueError, match="longer than the longest bucket"):
        plan_micro_batches(lengths + 1, G, M, BUCKETS)
    with pytest.raises(ValueError, match="do not split into 3 micro-batches"):
        plan_micro_batches(lengths, G, 3, BUCKETS)


# ---- a step's rows and its micro-batches ---------------------------------------------------------
def _step_rows(seed: int, longest: list[int], s: int = 1):
    """A step of Q groups: prompts with S rows per group (one image per query), completions [Q*G, T]
    whose group q's rows end at or before longest[q] (one of them exactly there), rewards with
    groups both varied and all-equal, categories q % 3."""
    rng = np.random.default_rng(seed)
    prompts = prompt_batch(queries=Q, group=s, seed=0)
    lengths = np.concatenate([np.r_[n, rng.integers(1, n + 1, G - 1)] for n in longest])
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(1, 200, (Q * G, T)).astype(np.int32) * mask
    comp = Completions(ids=ids, mask=mask, logps=np.zeros((Q * G, T), np.float32), lengths=lengths)
    rewards = rng.integers(0, 3, Q * G).astype(np.float32)
    rewards[G:2 * G] = 1.0  # one all-equal group (no gradient; dropped with drop_invalid_groups)
    return prompts, comp, rewards, np.repeat(np.arange(Q) % 3, G).astype(np.int32)


def _prompts_of(prompts, groups, s: int):
    """The prompt batch of `groups` (S rows each) of a step's prompts, one image per query."""
    rows = [q * s + j for q in groups for j in range(s)]
    return prompts.replace(
        input_ids=prompts.input_ids[rows], attention_mask=prompts.attention_mask[rows],
        position_ids=prompts.position_ids[:, rows], rope_deltas=prompts.rope_deltas[rows],
        pixel_values=np.concatenate([prompts.pixel_values[q * 16:(q + 1) * 16] for q in groups]),
        vision=prompt_batch(queries=len(groups), group=1).vision,
        image_rows=np.concatenate([np.arange(k * TOKENS, (k + 1) * TOKENS) for k in range(len(groups))
                                   for _ in range(s)]).astype(np.int32))


def _micro_batch(step, groups, length, s):
    prompts, comp, rewards, cats = step
    rows = np.array([q * G + j for q in groups for j in range(G)])
    return TrainBatch(prompt=_prompts_of(prompts, groups, s), completions=trimmed_completions(comp, rows, length),
                      rewards=rewards[rows], categories=cats[rows])


def padded_batch(step, s: int = 1):
    """[M, n, T]: the groups in order, M contiguous micro-batches at the full length T."""
    per = Q // M
    return _stack([_micro_batch(step, range(m * per, (m + 1) * per), T, s) for m in range(M)])


def length_aware_batches(step, s: int = 1):
    """The planned micro-batches: groups sorted by their longest row, each trimmed to its bucket."""
    plan = plan_micro_batches(step[1].lengths, G, M, BUCKETS)
    return tuple(_micro_batch(step, groups, length, s) for groups, length in zip(plan.groups, plan.lengths)), plan


# ---- the two updates -----------------------------------------------------------------------------
def _programs(mesh, adapters=False):
    model = make_model(seed=3)
    if adapters:
        model = lora.add_adapters(model, lora.LoraConfig(rank=4, alpha=8.0), seed=1)
        for _, dense in lora.adapted_layers(model):  # B != 0: the adapted policy differs from its base
            dense.lora.lora_b.set_value(0.1 * jnp.ones_like(dense.lora.lora_b[...]))
    graphdef, params, frozen = split_model(model, freeze_vision=False)
    return Programs.create(graphdef, mesh, RULES), params, frozen


def sgd():
    """Plain SGD (skipped when non-finite, as make_optimizer): the parameters after a step are
    params - lr * grad, so comparing them compares the gradients. AdamW's first steps are about
    lr * sign(grad) and turn last-bit differences of near-zero gradients into differences of lr."""
    return optax.apply_if_finite(optax.sgd(0.05), 10)


def _run(kind, steps, cfg, *, mesh=None, s=1, iterations=1, adapters=False):
    """Params and per-step metrics of `steps` GRPO updates, padded (Programs.update over [M, n, T])
    or length-aware (LengthAwareUpdate over the planned micro-batches), compiled as the trainer
    compiles them."""
    mesh = mesh or one_device_mesh()
    programs, params, frozen = _programs(mesh, adapters)
    tx = sgd()
    state = programs.init_state(tx, cfg.precision, params, frozen, reference=cfg.needs_reference and not adapters)
    if kind == "padded":
        update, old = programs.update(tx, cfg, state), programs.old_logps(cfg)
        place = lambda step: put_batch(padded_batch(step, s), mesh, RULES, micro_axis=True)  # noqa: E731
    else:
        update = programs.length_aware_update(tx, cfg, state, BUCKETS)
        old = update.old_logps
        place = lambda step: tuple(put_batch(mb, mesh, RULES) for mb in length_aware_batches(step, s)[0])  # noqa: E731
    metrics = []
    for step in steps:
        state, m = run_iterations(update, old, state, place(step), iterations)
        metrics.append(jax.device_get(m))
    return state, metrics, update


STEPS = lambda s=1: [_step_rows(0, [5, 30, 7, 32], s), _step_rows(1, [3, 12, 2, 20], s)]  # noqa: E731


def _assert_same(a, b, rtol=1e-5, atol=1e-6):
    (state_a, metrics_a, _), (state_b, metrics_b, _) = a, b
    for x, y in zip(metrics_a, metrics_b):
        assert set(x) == set(y)
        for k in x:
            np.testing.assert_allclose(np.asarray(y[k]), np.asarray(x[k]), rtol=rtol, atol=atol, err_msg=k)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=rtol, atol=atol),
                 state_a.params, state_b.params)


@pytest.mark.slow  # the 8-device programs: the longest compile of the file
def test_length_aware_update_equals_the_padded_update_sharded_without_host_round_trips():
    """GRPO with the KL reference: two steps (lengths planned to buckets 8 | 32, then 8 | 24) on a
    data x fsdp x tensor mesh equal the padded update on one device; the loop of micro-batches
    neither reads a device value back nor sends one (transfer guard), and each program compiles
    once per bucket."""
    steps = STEPS()
    assert [length_aware_batches(st)[1].lengths for st in steps] == [(8, 32), (8, 24)]
    padded = _run("padded", steps, CFG)
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
    programs, params, frozen = _programs(mesh)
    tx = sgd()
    state = programs.init_state(tx, CFG.precision, params, frozen, reference=True)
    update = programs.length_aware_update(tx, CFG, state, BUCKETS)
    metrics = []
    for step in steps:
        micro = tuple(put_batch(mb, mesh, RULES) for mb in length_aware_batches(step)[0])
        with jax.transfer_guard("disallow"):
            state, m = update(state, micro)
        metrics.append(jax.device_get(m))
    assert update.cache_sizes() == {"statistics": 1, "zeros": 1, "accumulate": 3, "apply": 1, "current_logps": 0,
                                    "reference": 3}
    # (the tolerance of test_rollout_step's sharded tests: the mesh reorders fp32 sums; one device: 1e-5)
    _assert_same(padded, (state, metrics, update), rtol=1e-4, atol=1e-6)
    assert metrics[0]["invalid_gradient_ratio"] == 0.25 and metrics[0]["groups_by_category"].tolist() == [2, 1, 1]


@pytest.mark.parametrize("variant", ["drop_gpg_drgrpo", "sequence_mean_prompts_per_row", "iterations2_lora"])
def test_length_aware_update_equals_the_padded_update(variant):
    """The same two steps under the other settings the update reads: dynamic-sampling drop with
    GPG's valid-fraction scale and Dr.GRPO's fixed denominator (the padded T, not the trimmed
    width); sequence-mean aggregation with one prompt row per completion (S = G); two PPO epochs
    (old log-probs per trimmed micro-batch) on LoRA adapters (the reference: adapters off)."""
    kw = {}
    if variant == "drop_gpg_drgrpo":
        cfg = dataclasses.replace(CFG, objective="gpg", drop_invalid_groups=True,
                                  loss=GPGLoss(beta=0.0, aggregation="drgrpo", max_completion_length=T))
    elif variant == "sequence_mean_prompts_per_row":
        seq_mean = dataclasses.replace(CFG.loss, aggregation="sequence-mean-token-mean")
        cfg, kw = dataclasses.replace(CFG, loss=seq_mean), dict(s=G)
    else:
        cfg, kw = dataclasses.replace(CFG, old_logps="batch"), dict(iterations=2, adapters=True)
    steps = STEPS(kw.get("s", 1))
    padded, trimmed = _run("padded", steps, cfg, **kw), _run("length", steps, cfg, **kw)
    _assert_same(padded, trimmed)
    assert float(padded[1][0]["grad_norm"]) > 1e-3  # a non-trivial update
    if variant == "iterations2_lora":
        assert trimmed[2].cache_sizes()["current_logps"] == 3
        assert float(trimmed[1][0]["ratio"]) != 1.0  # the second epoch's ratio
        with pytest.raises(ValueError, match="drgrpo's denominator"):
            _programs(one_device_mesh())[0].length_aware_update(
                make_optimizer(1e-3), dataclasses.replace(cfg, loss=dataclasses.replace(
                    cfg.loss, aggregation="drgrpo", max_completion_length=None)), trimmed[0], BUCKETS)


def test_the_compiled_update_does_the_trimmed_work():
    """The accumulate program of a micro-batch trimmed to T/4 costs less than half the padded
    width's (XLA's FLOP count; 0.42 here, the prompts' and the vision tower's work is not
    trimmed), and a width that is not a bucket is refused before it compiles."""
    mesh = one_device_mesh()
    programs, params, frozen = _programs(mesh)
    tx = make_optimizer(1e-3)
    state = programs.init_state(tx, CFG.precision, params, frozen, reference=True)
    update = programs.length_aware_update(tx, CFG, state, BUCKETS)
    step = _step_rows(0, [5, 6, 7, 8])
    flops = {}
    for length in (8, 32):
        mb = put_batch(_micro_batch(step, (0, 1), length, 1), mesh, RULES)
        adv, keep = jnp.zeros(Q // M * G), jnp.ones(Q // M * G, bool)
        ref = jnp.zeros(mb.completions.ids.shape)
        compiled = update.accumulate.lower(state, update.zeros(state.params), mb, adv, keep, ref,
                                           jnp.float32(1)).compile()
        cost = compiled.cost_analysis()
        flops[length] = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    assert flops[8] < flops[32] / 2
    wrong = tuple(put_batch(_micro_batch(step, g, 12, 1), mesh, RULES) for g in ((0, 1), (2, 3)))
    with pytest.raises(ValueError, match="not all bucket lengths"):
        update(state, wrong)
