"""perf helpers: collective counting in HLO text, bytes per device, abstract (weightless) states."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from anatomy_r1_jax import sharding
from anatomy_r1_jax.models import QwenVL, QwenVLConfig
from anatomy_r1_jax.perf import abstract, hlo, workloads
from anatomy_r1_jax.perf.memory import bytes_per_device, compiled_memory
from anatomy_r1_jax.runtime.placement import place_state, split_model
from anatomy_r1_jax.runtime.precision import BF16
from anatomy_r1_jax.train.step import StepConfig, make_optimizer, train_step

FSDP = [("embed", "fsdp"), ("vision_embed", "fsdp"), ("activation_batch", "fsdp"), ("activation_embed", "fsdp"),
        ("activation_vision_embed", "fsdp")]

HLO = """
  %all-reduce.1 = f32[8,128]{1,0} all-reduce(f32[8,128]{1,0} %x), replica_groups={{0,1}}, to_apply=%add
  %ag-start = (bf16[4,16]{1,0}, bf16[8,16]{1,0}) all-gather-start(bf16[4,16]{1,0} %y), dimensions={0}
  %ag-done = bf16[8,16]{1,0} all-gather-done((bf16[4,16]{1,0}, bf16[8,16]{1,0}) %ag-start)
  %rs = (f32[2]{0}, f32[3]{0}) reduce-scatter(f32[4]{0} %a, f32[6]{0} %b), dimensions={0}
  %cp = s32[5]{0} collective-permute(s32[5]{0} %z), source_target_pairs={{0,1}}
  %add.3 = f32[8,128]{1,0} add(f32[8,128]{1,0} %p, f32[8,128]{1,0} %q)
"""


def test_collective_stats_counts_kinds_and_result_bytes():
    stats = hlo.collective_stats(HLO)
    assert stats["all-reduce"] == {"count": 1, "bytes": 8 * 128 * 4}
    assert stats["all-gather"] == {"count": 1, "bytes": 8 * 16 * 2}  # the start's result half, done not counted
    assert stats["reduce-scatter"] == {"count": 1, "bytes": (2 + 3) * 4}
    assert stats["collective-permute"] == {"count": 1, "bytes": 5 * 4}
    assert stats["all-to-all"] == {"count": 0, "bytes": 0}
    assert hlo.total(stats) == (4, 8 * 128 * 4 + 8 * 16 * 2 + 20 + 20)


def test_collectives_of_a_compiled_sharded_reduction():
    mesh = sharding.make_mesh([("data", 8)])
    x = jax.device_put(jnp.ones((64, 32)), NamedSharding(mesh, P("data")))
    text = jax.jit(lambda x: jnp.sum(x, axis=0)).lower(x).compile().as_text()
    stats = hlo.collective_stats(text)
    assert stats["all-reduce"]["count"] >= 1 and stats["all-reduce"]["bytes"] >= 32 * 4


def test_bytes_per_device_of_arrays_and_abstract_state():
    mesh = sharding.make_mesh([("fsdp", 8)])
    x = jax.device_put(jnp.ones((64, 32)), NamedSharding(mesh, P("fsdp")))
    assert bytes_per_device(x) == 64 * 32 * 4 // 8
    assert bytes_per_device({"a": x, "b": jax.ShapeDtypeStruct((10,), jnp.bfloat16)}) == 64 * 32 * 4 // 8 + 20

    cfg = QwenVLConfig.from_hf(workloads.size_config("tiny"))
    _, params, frozen = split_model(QwenVL(cfg, rngs=nnx.Rngs(0)), freeze_vision=False)
    placed = place_state(params, mesh, FSDP)
    _, abstract_params, _ = abstract.abstract_params(cfg, mesh, FSDP, dtype=jnp.float32, param_dtype=jnp.float32)
    assert bytes_per_device(abstract_params) == bytes_per_device(placed) < bytes_per_device(params)
    fp = abstract.state_footprint(abstract_params, param_bytes=4, grad_bytes=4, moment_bytes=8)
    assert fp.params == bytes_per_device(placed) and fp.moments == 2 * fp.params and fp.total == 5 * fp.params

    # Abstract AdamW moments get their parameters' shardings, as the eagerly initialised state does.
    tx = make_optimizer(1e-3)
    eager = place_state(tx.init(placed), mesh, FSDP)
    opt = abstract.abstract_opt_state(tx, abstract_params, mesh, FSDP)
    assert [x.sharding.spec for x in jax.tree.leaves(opt)] == [x.sharding.spec for x in jax.tree.leaves(eager)]
    assert bytes_per_device(opt) == bytes_per_device(eager)


def test_abstract_update_compiles_with_memory_analysis():
    mesh = sharding.make_mesh([("fsdp", 2), ("tensor", 2)], jax.devices()[:4])
    rules = [("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("activation_batch", "fsdp"),
             ("activation_embed", "fsdp"), ("activation_mlp", "tensor"), ("activation_heads", "tensor")]
    cfg = QwenVLConfig.from_hf(workloads.size_config("tiny", num_hidden_layers=1, vision_depth=1,
                                                     fullatt_block_indexes=(0,)))
    tx = make_optimizer(1e-3)
    with sharding.use_rules(mesh, rules):
        graphdef, state = abstract.abstract_train_state(cfg, mesh, rules, tx, moment_dtype=jnp.float32, remat=False)
        prompts, _ = workloads.image_prompts(cfg, queries=2, group=4, prompt_length=32)
        comp = workloads.random_completions(cfg, 8, 4)
        batch = abstract.abstract_batch(workloads.train_batch(prompts, comp), mesh, rules)
        step = jax.jit(functools.partial(train_step, graphdef, tx, StepConfig(group_size=4, precision=BF16)),
                       donate_argnums=0)
        compiled = step.lower(state, batch).compile()
    mem = compiled_memory(compiled)
    assert mem is not None and mem.peak > mem.argument >= bytes_per_device(state.params)
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert moments and all(x.dtype == np.float32 for x in moments)
    assert hlo.total(hlo.collective_stats(compiled.as_text()))[0] > 0


def test_sharding_study_programs_share_prefixes_and_budget_frames():
    """The real-shape study's batches and rollout: S prompt rows per group, the frame budget of one
    query's image, the rollout lowered abstractly from Q * S prompt rows to Q * G completions."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import sharding_study as study

    paper = study.PresetShape.parse("paper")
    assert (paper.prompts_per_group, paper.grid) == (1, (34, 60)) and paper.grid[0] * paper.grid[1] == 2040
    cfg = QwenVLConfig.from_hf(workloads.size_config("tiny", family="qwen2_5_vl"))
    shape = study.PresetShape.parse("4,4,1,2,48,8,4x8")  # 2 micro-batches of 2 queries, S = 1
    batch = study.preset_batch(cfg, shape)
    assert batch.prompt.input_ids.shape == (2, 2, 48) and batch.completions.ids.shape == (2, 8, 8)
    assert batch.prompt.pixel_values.shape[1] == 2 * 32 and batch.prompt.vision.frame_rows.index.shape[1:] == (2, 32)
    mesh = study.build_mesh([("fsdp", -1)], 2)
    kw = dict(remat="full", attention="chunked", scan_layers=True)
    for s in (1, 4):
        lowered = study.lower_rollout(cfg, mesh, study.FSDP_RULES, study.PresetShape.parse(f"4,4,{s},2,48,8,4x8"), kw)
        assert lowered.args_info[0][2].input_ids.shape == (2 * s, 48)
        assert lowered.out_info.ids.shape == (8, 8)


def test_peak_buffers_lists_the_temporaries_of_a_compiled_program(tmp_path):
    """perf/buffers.py reads XLA's buffer-assignment dump: the [256, 256] float32 product is the
    temporary at the peak, named with the op that made it, and the peak fits the allocation that
    memory_analysis() reports."""
    from anatomy_r1_jax.perf import buffers

    x = jnp.ones((256, 128), jnp.float32)
    compiled = jax.jit(lambda x: jnp.sin(x @ x.T).sum(0)).lower(x).compile(
        compiler_options=buffers.dump_options(str(tmp_path)))
    peak = buffers.peak_buffers(str(tmp_path))
    temp = compiled_memory(compiled).temp
    assert 256 * 256 * 4 <= peak.bytes <= peak.allocation == temp
    top = peak.buffers[0]
    assert (top.shape, top.bytes) == ("f32[256,256]", 256 * 256 * 4) and "dot_general" in top.source
