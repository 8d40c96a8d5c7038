"""Rollout engine and GRPO update: KV-cache decoding agrees with the teacher-forced forward, sampling
filters behave, the update is exact under micro-batching and under FSDP x tensor sharding."""

import dataclasses
import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from anatomy_r1_jax import sharding
from anatomy_r1_jax.models import QwenVL, QwenVLConfig, get_rope_index
from anatomy_r1_jax.models.presets import tiny_hf_config
from anatomy_r1_jax.models.vision_inputs import pad_pixel_values, vision_inputs
from anatomy_r1_jax.data.batch import Completions, PromptBatch, TrainBatch
from anatomy_r1_jax.rl.losses import GRPOLoss
from anatomy_r1_jax.rl.rollout import generate
from anatomy_r1_jax.rl.sampling import SamplingConfig, sample_token
from anatomy_r1_jax.train.compiled import Programs
from anatomy_r1_jax.train.logprobs import completion_logps
from anatomy_r1_jax.runtime.placement import put_batch, split_model
from anatomy_r1_jax.train.step import StepConfig, TrainState, make_optimizer, train_step

GRID = (1, 4, 4)  # 16 patches -> 4 image tokens
RULES = [("embed", "fsdp"), ("vision_embed", "fsdp"), ("mlp", "tensor"), ("vision_mlp", "tensor"), ("heads", "tensor"),
         ("vision_heads", "tensor"), ("kv_heads", "tensor"), ("vocab", "tensor"),
         ("activation_batch", ("data", "fsdp")), ("activation_embed", "fsdp"), ("activation_vision_embed", "fsdp"),
         ("activation_mlp", "tensor"), ("activation_heads", "tensor"), ("activation_kv_heads", "tensor"),
         ("activation_vocab", "tensor")]


@functools.lru_cache(maxsize=None)
def tiny_model_cfg():
    return QwenVLConfig.from_hf(tiny_hf_config("qwen2_vl", vocab_size=256))


def make_model(seed=0, scale=5.0, remat=False):
    """Tiny random model with widened weights (the default 0.02 init makes every layer ~identity)."""
    model = QwenVL(tiny_model_cfg(), remat=remat, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x * scale if x.ndim == 2 else x, state)
    return nnx.merge(graphdef, state)


def prompt_batch(queries=2, group=3, lp=24, seed=0) -> PromptBatch:
    """`queries` image prompts of different lengths, each repeated `group` times, left padded."""
    cfg = tiny_model_cfg()
    rng = np.random.default_rng(seed)
    rows, grids, image_rows = [], [], []
    tokens = (GRID[1] * GRID[2]) // 4
    for q in range(queries):
        ids = list(rng.integers(0, 200, 5 + 3 * q)) + [cfg.vision_start_token_id] + [cfg.image_token_id] * tokens + [
            cfg.vision_end_token_id] + list(rng.integers(0, 200, 4))
        for _ in range(group):
            rows.append(ids)
            grids.append(GRID)
            image_rows += list(range(q * tokens, (q + 1) * tokens))
    input_ids = np.zeros((len(rows), lp), np.int32)
    mask = np.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, lp - len(r):] = r
        mask[i, lp - len(r):] = 1
    pos, deltas = get_rope_index(input_ids, image_grid_thw=np.array(grids), attention_mask=mask,
                                 image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id)
    patches = queries * 16
    pixels = rng.normal(size=(patches, 3 * 2 * 14 * 14)).astype(np.float32)
    return PromptBatch(input_ids=input_ids, attention_mask=mask, position_ids=pos.astype(np.int32),
                       rope_deltas=deltas.astype(np.int32), pixel_values=pad_pixel_values(pixels, patches),
                       vision=vision_inputs(np.array([GRID] * queries), cfg.vision, patch_budget=patches),
                       image_rows=np.array(image_rows, np.int32))


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 2000)
    draw = jax.vmap(lambda k, cfg=None: sample_token(k, logits, SamplingConfig(temperature=1.0, top_k=0, top_p=0.7))[0])
    counts = np.bincount(np.asarray(draw(keys)).ravel(), minlength=4)
    assert counts[2] == counts[3] == 0 and counts[0] > counts[1] > 0  # nucleus {0, 1}: mass above 2 is 0.8
    draw_k = jax.vmap(lambda k: sample_token(k, logits, SamplingConfig(temperature=1.0, top_k=1, top_p=1.0))[0])
    assert set(np.asarray(draw_k(keys[:50])).ravel()) == {0}
    _, logp = sample_token(keys[0], logits, SamplingConfig(temperature=2.0, top_k=0, top_p=1.0))
    tok = _
    assert np.allclose(logp, jax.nn.log_softmax(logits / 2.0)[0, tok[0]])


def test_rollout_matches_teacher_forcing_and_never_samples_placeholders():
    model = make_model()
    cfg = tiny_model_cfg()
    batch = jax.tree.map(jnp.asarray, prompt_batch())
    forbidden = (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
    sc = SamplingConfig(max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.95, eos_ids=(7,), pad_id=0,
                        forbidden_ids=forbidden)
    comp = jax.jit(lambda b, k: generate(model, b, k, sc))(batch, jax.random.key(1))
    ids = np.asarray(comp.ids)
    assert not np.isin(ids[np.asarray(comp.mask) == 1], forbidden).any()
    assert len({tuple(r) for r in ids}) > 1  # sampling differs across a group's rows
    logps, _ = completion_logps(model, batch, comp.ids, comp.mask, temperature=0.9)
    m = np.asarray(comp.mask) == 1
    np.testing.assert_allclose(np.asarray(logps)[m], np.asarray(comp.logps)[m], atol=2e-4)
    # EOS handling: everything after the first EOS is pad and masked.
    for row, mrow in zip(ids, np.asarray(comp.mask)):
        hits = np.flatnonzero(row == 7)
        if len(hits):
            assert mrow[: hits[0] + 1].all() and not mrow[hits[0] + 1:].any() and (row[hits[0] + 1:] == 0).all()


def test_greedy_rollout_equals_argmax_of_full_forward():
    model = make_model(seed=1)
    batch = jax.tree.map(jnp.asarray, prompt_batch(queries=2, group=1))
    sc = SamplingConfig(max_new_tokens=8, greedy=True, eos_ids=(), pad_id=0)
    comp = generate(model, batch, jax.random.key(0), sc)
    ids = np.asarray(comp.ids)
    # Every greedy token is the argmax of one cache-free forward over prompt + the tokens before it
    # (causal attention: position t sees only what the decoder saw when it chose token t + 1).
    from anatomy_r1_jax.train.logprobs import sequence_hidden

    hidden = sequence_hidden(model, batch, jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids)))
    argmax = np.asarray(jnp.argmax(model.logits(hidden), -1))
    np.testing.assert_array_equal(argmax, ids)


def _train_batch(seed=0, queries=2, group=4, t=6):
    rng = np.random.default_rng(seed)
    pb = prompt_batch(queries=queries, group=group, seed=seed)
    n = queries * group
    ids = rng.integers(0, 200, (n, t)).astype(np.int32)
    lengths = rng.integers(2, t + 1, n)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    comp = Completions(ids=ids * mask, mask=mask, logps=np.zeros((n, t), np.float32), lengths=lengths)
    rewards = rng.integers(0, 3, n).astype(np.float32)
    return TrainBatch(prompt=pb, completions=comp, rewards=rewards, categories=np.zeros(n, np.int32))


def _stack(items):
    return jax.tree.map(lambda *xs: np.stack(xs), *items)


def one_device_mesh():
    return sharding.make_mesh([("data", 1)], devices=jax.devices()[:1])


def _run_steps(mesh, batches, steps, cfg, micro=1, remat=False, grad_norms=None, entropies=None):
    """`steps` updates compiled the way the trainer compiles them (train/compiled.py), on `mesh`
    (None: one device)."""
    mesh = one_device_mesh() if mesh is None else mesh
    model = make_model(seed=3, remat=remat)
    graphdef, params, frozen = split_model(model, freeze_vision=False)
    programs = Programs.create(graphdef, mesh, RULES)
    tx = make_optimizer(1e-2, grad_clip=1.0)
    state = programs.init_state(tx, cfg.precision, params, frozen, reference=True)
    step_fn = programs.update(tx, cfg, state)
    losses = []
    for i in range(steps):
        b = batches[i % len(batches)]
        if micro > 1:  # split whole groups into micro-batches
            n = b.rewards.shape[0] // micro
            parts = [jax.tree.map(lambda x: x, _slice_batch(b, j * n, (j + 1) * n)) for j in range(micro)]
            stacked = _stack(parts)
        else:
            stacked = _stack([b])
        state, metrics = step_fn(state, put_batch(stacked, mesh, RULES, micro_axis=True))
        losses.append(float(metrics["loss"]))
        if grad_norms is not None:
            grad_norms.append(float(metrics["grad_norm"]))
        if entropies is not None:
            entropies.append(float(metrics["entropy"]))
    assert step_fn._cache_size() == 1  # one compilation for every step
    return np.array(losses), state, metrics


def _slice_batch(b: TrainBatch, lo, hi):
    """Rows lo:hi of a batch whose two queries each own their image (used with micro=2)."""
    q = lo // 4
    pb = prompt_batch(queries=2, group=4, seed=0)
    one = prompt_batch(queries=1, group=4, seed=0)
    sub = PromptBatch(input_ids=pb.input_ids[lo:hi], attention_mask=pb.attention_mask[lo:hi],
                      position_ids=pb.position_ids[:, lo:hi], rope_deltas=pb.rope_deltas[lo:hi],
                      pixel_values=pb.pixel_values[q * 16:(q + 1) * 16], vision=one.vision,
                      image_rows=one.image_rows)
    comp = jax.tree.map(lambda x: x[lo:hi], b.completions)
    return TrainBatch(prompt=sub, completions=comp, rewards=b.rewards[lo:hi], categories=b.categories[lo:hi])


def test_microbatch_accumulation_and_remat_are_exact():
    """Two micro-batches == one batch; remat (with the KL reference forward, as real configs run it)
    changes nothing."""
    cfg = StepConfig(group_size=4, loss=GRPOLoss(beta=0.04), temperature=0.9, logp_chunk=3)
    batches = [_train_batch(seed=0)]
    full, _, m_full = _run_steps(None, batches, 2, cfg, micro=1)
    split, _, m_split = _run_steps(None, batches, 2, cfg, micro=2, remat=True)
    np.testing.assert_allclose(full, split, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m_full["grad_norm"]), float(m_split["grad_norm"]), rtol=1e-4)


def test_reference_logps_are_a_pass_apart_from_the_gradient_pass():
    """No loop of the update reads both the policy's and the reference's weights: the reference's
    log-probs of every micro-batch come first (one lax.map), so its weights (and a backend's copies
    of them, e.g. XLA:CPU's float32 upcasts) are not live beside the gradient pass's; the loss is
    that of the reference computed inside the gradient loop (test_microbatch_accumulation_...)."""
    cfg = StepConfig(group_size=4, loss=GRPOLoss(beta=0.04), temperature=0.9, logp_chunk=3)
    graphdef, params, frozen = split_model(make_model(seed=3), freeze_vision=False)
    ref = jax.tree.map(lambda x: x + 1, params)
    tx = make_optimizer(1e-2)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, ref_params=ref,
                       opt_state=tx.init(params))
    closed = jax.make_jaxpr(functools.partial(train_step, graphdef, tx, cfg))(state, _stack([_train_batch(seed=0)]))
    sizes = [len(jax.tree.leaves(x)) for x in (state.step, params, frozen, ref)]
    invars = closed.jaxpr.invars
    policy = set(invars[sizes[0]: sizes[0] + sizes[1]])
    reference = set(invars[sum(sizes[:3]): sum(sizes)])
    loops = [{v for v in e.invars if not isinstance(v, jax.extend.core.Literal)} for e in closed.jaxpr.eqns
             if e.primitive.name in ("scan", "while")]
    reads = [(bool(v & policy), bool(v & reference)) for v in loops]
    assert (True, False) in reads and (False, True) in reads  # a gradient loop and a reference pass
    assert (True, True) not in reads


@pytest.mark.parametrize("scan_layers", [True, False])
def test_backward_through_the_cache_saves_it_once(scan_layers):
    """The update's shared-prefix path differentiates through the KV cache: the layers take it one
    slice each (run_layers' per_layer), so the backward saves each layer's slice, not the whole
    [layers, ...] cache once per layer (n^2 slices, 45 of the 54 GB per device of the 3B update at
    the paper's shape with one micro-batch)."""
    cfg = tiny_model_cfg()
    model = QwenVL(cfg, remat="full", scan_layers=scan_layers, rngs=nnx.Rngs(0))
    b, length, slots = 2, 4, 16
    cache = model.init_cache(b, slots).replace(index=jnp.asarray(slots - length, jnp.int32))
    ids = jnp.ones((b, length), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (3, b, length))

    def loss(k, v):
        hidden, _ = model.forward(ids, pos, jnp.ones((b, length), jnp.int32), None, cache.replace(k=k, v=v))
        return hidden.sum()

    _, backward = jax.vjp(loss, cache.k, cache.v)  # a pytree whose leaves are the saved residuals
    slices = [x for x in jax.tree.leaves(backward) if x.shape[-4:] == cache.k.shape[1:]]  # [..., B, S, KVH, D]
    assert cache.k.shape[0] >= 2 and slices
    assert sum(x.size for x in slices) <= 2 * cache.k.size  # k and v once, not once per layer


def test_a_decode_step_writes_the_cache_in_place():
    """The layers hand back only the new tokens' keys and values, written into the stacked cache
    once; a decode step's temporaries stay below one cache. Returning each layer's updated
    [B, S, KVH, D] slice made the scan's outputs a second whole cache (temporaries were 2x the
    cache: every generated token copied it)."""
    model = QwenVL(tiny_model_cfg(), scan_layers=True, rngs=nnx.Rngs(0))
    b, slots = 4, 1024
    cache = model.init_cache(b, slots).replace(index=jnp.asarray(100, jnp.int32))
    graphdef, state = nnx.split(model)

    def decode(state, cache):
        pos = jnp.broadcast_to(cache.index, (3, b, 1)).astype(jnp.int32)
        return nnx.merge(graphdef, state).forward(jnp.ones((b, 1), jnp.int32), pos, jnp.ones((b, 1), jnp.int32),
                                                   None, cache)

    memory = jax.jit(decode, donate_argnums=1).lower(state, cache).compile().memory_analysis()
    cache_bytes = cache.k.nbytes + cache.v.nbytes
    assert cache.k.shape[0] >= 2
    assert memory.temp_size_in_bytes < cache_bytes


@pytest.mark.slow
def test_sharded_fsdp_tensor_equals_single_device():
    assert jax.device_count() >= 8
    cfg = StepConfig(group_size=4, loss=GRPOLoss(beta=0.04), temperature=0.9, logp_chunk=3)
    batches = [_train_batch(seed=s) for s in range(5)]
    single, _, _ = _run_steps(None, batches, 5, cfg)
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
    sharded, state, _ = _run_steps(mesh, batches, 5, cfg)
    np.testing.assert_allclose(sharded, single, atol=1e-5, rtol=1e-5)
    kernel = state.params["language"]["layers"][0]["mlp"]["gate"]["kernel"]
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated


def test_sft_objective_learns_and_nonfinite_updates_are_skipped():
    cfg = StepConfig(objective="sft", advantage="none", group_size=1, temperature=1.0, logp_chunk=6)
    losses, state, _ = _run_steps(None, [_train_batch(seed=0)], 15, cfg)
    assert losses[-1] < 0.5 * losses[0]
    # A NaN reward makes the GRPO gradient non-finite: the update is skipped, params unchanged.
    bad = _train_batch(seed=1)
    bad = bad.replace(rewards=np.full_like(bad.rewards, np.nan))
    grpo = StepConfig(group_size=4, loss=GRPOLoss(beta=0.0), temperature=1.0, logp_chunk=6)
    model = make_model(seed=3)
    graphdef, params, frozen = split_model(model, freeze_vision=False)
    tx = make_optimizer(1e-2)
    st = TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, ref_params=None,
                    opt_state=tx.init(params))
    before = jax.tree.map(np.asarray, params)
    st, metrics = jax.jit(functools.partial(train_step, graphdef, tx, grpo))(st, _stack([bad]))
    assert int(metrics["update_skipped"]) == 1
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, st.params))


def test_dynamic_sampling_drop_trains_on_the_valid_groups_alone():
    """StepConfig(drop_invalid_groups=True) (rl.dynamic_sampling="drop"): a group with all-equal
    rewards has zero weight, KL term included, and the loss is normalised by the valid groups'
    tokens; two steps on [valid group, all-equal group] equal two steps on the valid group alone.
    Without drop the all-equal group's tokens dilute the loss (and its KL pulls)."""
    b = _train_batch(seed=0)
    b = b.replace(rewards=np.concatenate([b.rewards[:4], np.ones(4, np.float32)]))
    assert len(set(b.rewards[:4].tolist())) > 1
    cfg = StepConfig(group_size=4, loss=GRPOLoss(beta=0.04), temperature=0.9, logp_chunk=3)
    drop = dataclasses.replace(cfg, drop_invalid_groups=True)
    norms_d, norms_a, entropy_d, entropy_a = [], [], [], []
    dropped, _, m_d = _run_steps(None, [b], 2, drop, grad_norms=norms_d, entropies=entropy_d)
    alone, _, _ = _run_steps(None, [_slice_batch(b, 0, 4)], 2, cfg, grad_norms=norms_a, entropies=entropy_a)
    np.testing.assert_allclose(dropped, alone, rtol=1e-5, atol=1e-7)  # without drop: about half (diluted)
    np.testing.assert_allclose(norms_d, norms_a, rtol=1e-4)
    assert float(m_d["invalid_gradient_ratio"]) == 0.5
    # The logged entropy is the policy's over every sampled token, dropped groups included.
    every = float(_run_steps(None, [b], 1, cfg)[2]["entropy"])  # without drop, first step
    assert entropy_d[0] == pytest.approx(every, rel=1e-6)
    assert abs(every - entropy_a[0]) > 5e-6 * every  # the random model's groups differ by about 1.5e-5 of it


def _shared(b: TrainBatch, queries=2) -> TrainBatch:
    """The same batch with one prompt row per group (prefix sharing)."""
    return b.replace(prompt=prompt_batch(queries=queries, group=1, seed=0))


def _rows_of(pb: PromptBatch, rows) -> PromptBatch:
    """The per-row prompt batch whose row i is row rows[i] of `pb` (one image per row of pb)."""
    tokens = (GRID[1] * GRID[2]) // 4
    return pb.replace(input_ids=pb.input_ids[rows], attention_mask=pb.attention_mask[rows],
                      position_ids=pb.position_ids[:, rows], rope_deltas=pb.rope_deltas[rows],
                      image_rows=np.concatenate([np.arange(r * tokens, (r + 1) * tokens) for r in rows]).astype(np.int32))


def test_shared_prompt_rollout_and_logps_equal_per_row(queries=2, group=4, per_group=2):
    """S prompt rows per group of G (row j of a group continues prompt j % S; S = 1 is the update
    test below) is the same function as one prompt row per completion: the same samples, log-probs
    and gradients."""
    model = make_model(seed=2)
    prompts = prompt_batch(queries=queries * per_group, group=1)  # Q * S distinct prompts
    rows = [q * per_group + j % per_group for q in range(queries) for j in range(group)]
    full = jax.tree.map(jnp.asarray, _rows_of(prompts, rows))
    shared = jax.tree.map(jnp.asarray, prompts)
    sc = SamplingConfig(max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.95, eos_ids=(7,), pad_id=0)
    a = jax.jit(lambda b, k: generate(model, b, k, sc))(full, jax.random.key(4))
    b = jax.jit(lambda b, k: generate(model, b, k, sc, group_size=group, prompts_per_group=per_group))(
        shared, jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(a.ids), np.asarray(b.ids))
    np.testing.assert_allclose(np.asarray(a.logps), np.asarray(b.logps), atol=1e-5)
    assert len({tuple(r) for r in np.asarray(a.ids)}) > queries * per_group  # rows sharing a prompt differ

    graphdef, params = nnx.split(model, nnx.Param)
    weights = jnp.asarray(np.random.default_rng(0).normal(size=a.ids.shape), jnp.float32)

    def objective(params, prompt, g):
        logps, _ = completion_logps(nnx.merge(graphdef, params), prompt, a.ids, a.mask, 0.9, 4, group_size=g)
        return jnp.sum(logps * a.mask * weights), logps

    value_and_grad = jax.jit(jax.value_and_grad(objective, has_aux=True), static_argnums=2)
    (_, lp_full), g_full = value_and_grad(params, full, 1)
    (_, lp_shared), g_shared = value_and_grad(params, shared, group)
    np.testing.assert_allclose(np.asarray(lp_shared), np.asarray(lp_full), atol=1e-5)
    m = np.asarray(a.mask) == 1
    np.testing.assert_allclose(np.asarray(lp_full)[m], np.asarray(a.logps)[m], atol=2e-4)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5),
                 g_shared, g_full)
    with pytest.raises(ValueError, match="do not divide into"):
        completion_logps(model, prompt_batch(queries=3, group=1), a.ids, a.mask,  # 3 rows, 2 groups
                         group_size=group)


@pytest.mark.slow
def test_shared_prompt_update_equals_per_row_update_sharded():
    """The GRPO update on S = 1 prompt row per group, on a data x fsdp x tensor mesh (the 4 prompt
    rows one per data x fsdp device), equals the per-row update on one device."""
    cfg = StepConfig(group_size=4, loss=GRPOLoss(beta=0.04), temperature=0.9, logp_chunk=3)
    batches = [_train_batch(seed=0, queries=4)]
    runs = {}
    for name, mesh, bs in [("full", None, batches),
                           ("sharded", sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)]),
                            [_shared(b, queries=4) for b in batches])]:
        norms = []
        losses, _, _ = _run_steps(mesh, bs, 3, cfg, grad_norms=norms)
        runs[name] = losses, np.array(norms)
    # Every step's gradient norm (the first step's loss is -mean(A) whatever the model computes);
    # later losses drift by AdamW (lr 1e-2) amplifying last-bit gradient differences.
    np.testing.assert_allclose(runs["sharded"][1], runs["full"][1], rtol=1e-4)
    np.testing.assert_allclose(runs["sharded"][0], runs["full"][0], rtol=1e-3, atol=1e-5)
