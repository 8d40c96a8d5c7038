"""Export of a trained checkpoint to a Hugging Face directory: transformers loads it unchanged and
gives our restored model's logits (fp32, <= 1e-4) on a real collated prompt; the exported tokenizer
and image processor reproduce the run's."""

from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import subprocess_env
from anatomy_r1_jax.data import chat_messages, read_records
from anatomy_r1_jax.data.collate import IMAGE_PAD, BatchShape, Collator, preprocess_images
from anatomy_r1_jax.data.synthetic import make_synthetic_dataset
from anatomy_r1_jax.evaluation.checkpoints import build_setup, restore_model_state
from anatomy_r1_jax.evaluation.export import export_checkpoint
from anatomy_r1_jax.evaluation.run_config import config_for_checkpoints
from anatomy_r1_jax.runtime import builders
from anatomy_r1_jax.train.checkpoint import Checkpointer
from anatomy_r1_jax.train.step import TrainState, make_optimizer
from hf_tiny import hf_image_logits

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4


def default_config():
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # configs/ is a folder of the repository, not of the package
    module = importlib.import_module("configs.default")
    return module.get_config()


def random_state(abstract, seed: int, std: float = 0.15):
    """Values for an abstract nnx State, wide enough that no layer is close to the identity
    (norm scales 1 + N(0, std^2), everything else N(0, std^2)), on the abstract leaves' shardings."""
    leaves = jax.tree_util.tree_leaves_with_path(abstract)
    keys = iter(jax.random.split(jax.random.key(seed), len(leaves)))

    def value(path, x):
        name = jax.tree_util.keystr(path)
        noise = std * jax.random.normal(next(keys), x.shape, x.dtype)
        is_scale = ("norm" in name or "ln_q" in name) and "weight" in name
        return jax.device_put(1.0 + noise if is_scale else noise, x.sharding)

    return jax.tree_util.tree_map_with_path(value, abstract)


def make_run(run: Path, config, step: int, seed: int, base_saved: bool = True):
    """A run folder as train.py leaves it (config.json, tokenizer/, one checkpoint of random weights);
    returns (setup, params, frozen). base_saved=False: the checkpoint holds the trainable part alone
    (a LoRA run's adapters; frozen None)."""
    run.mkdir(parents=True)
    (run / "config.json").write_text(config.to_json_best_effort(indent=1))
    builders.build_tokenizer(config, str(run))
    setup = build_setup(config, str(run))
    params, frozen = random_state(setup.params, seed), random_state(setup.frozen, seed + 1)
    tx = make_optimizer(1e-3)
    state = TrainState(step=jnp.asarray(step, jnp.int32), params=params, frozen=frozen if base_saved else None,
                       ref_params=None, opt_state=tx.init(params))
    ckpt = Checkpointer(str(run / "checkpoints"))
    ckpt.save(step, state, {"note": "test"})
    ckpt.close()
    return setup, params, frozen


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def synthetic_record(root: Path):
    """One validation record of a small synthetic set, with the paper's long prompt."""
    paths = make_synthetic_dataset(root / "synthetic", n=20, seed=1, image_size=56)
    return dataclasses.replace(read_records(paths["val"])[0], prompt_variant="grpo")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    config = default_config()
    config.model.freeze_vision = True  # the checkpoint splits params / frozen: both must be exported
    run = root / "run"
    setup, params, frozen = make_run(run, config, step=12, seed=1)
    before = files_under(run)
    out = root / "hf"
    export_checkpoint(config, str(run), str(out))
    assert files_under(run) == before, "the export wrote into the run folder"
    record = synthetic_record(root)
    return {"config": config, "setup": setup, "params": params, "frozen": frozen, "out": out, "run": run,
            "record": record, "root": root}


def test_restored_checkpoint_is_what_was_saved(exported):
    setup = exported["setup"]
    params, frozen = restore_model_state(setup, str(exported["run"] / "checkpoints" / "12"))
    for ours, saved in ((params, exported["params"]), (frozen, exported["frozen"])):
        assert jax.tree.structure(ours) == jax.tree.structure(saved)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(saved)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
    # A config that splits trainable / frozen otherwise still restores the same model.
    other = exported["config"].copy_and_resolve_references()
    other.model.freeze_vision = False
    setup2 = build_setup(other, str(exported["run"]))
    params2, frozen2 = restore_model_state(setup2, str(exported["run"] / "checkpoints" / "12"))
    assert not jax.tree.leaves(frozen2)
    flat = lambda g, p, f: {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(  # noqa: E731
        nnx.state(nnx.merge(g, p, f)))}
    saved, again = flat(setup.graphdef, params, frozen), flat(setup2.graphdef, params2, frozen2)
    assert saved.keys() == again.keys() and all(np.array_equal(saved[k], again[k]) for k in saved)
    meta = json.loads((exported["out"] / "anatomy_r1_export.json").read_text())
    assert meta["step"] == 12 and meta["checkpoint"].endswith("checkpoints/12")


def test_transformers_loads_the_export_with_the_same_logits(exported):
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    setup, out, record = exported["setup"], str(exported["out"]), exported["record"]
    hf = Qwen2VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    hf_images = Qwen2VLImageProcessorPil.from_pretrained(out)

    # The exported tokenizer and image processor are the run's.
    text = setup.tokenizer.apply_chat_template(chat_messages(record), tokenize=False, add_generation_prompt=True)
    assert hf_tokenizer.apply_chat_template(chat_messages(record), tokenize=False, add_generation_prompt=True) == text
    assert hf_tokenizer(text)["input_ids"] == setup.tokenizer(text)["input_ids"]
    feats = preprocess_images(record, setup.image_processor)
    hf_feats = preprocess_images(record, hf_images)
    np.testing.assert_array_equal(hf_feats.pixel_values, feats.pixel_values)
    np.testing.assert_array_equal(hf_feats.grid_thw, feats.grid_thw)

    # Our model restored from the checkpoint vs transformers on the export: one real prompt.
    collator = Collator(setup.tokenizer, setup.model_cfg, BatchShape(256, 16, 16))
    ids = np.asarray([collator.prompt_ids(record, feats.grid_thw)])
    assert ids.shape[1] > 100 and (ids == setup.tokenizer.convert_tokens_to_ids(IMAGE_PAD)).sum() == 4
    params, frozen = restore_model_state(setup, str(exported["run"] / "checkpoints" / "12"))
    model = nnx.merge(setup.graphdef, params, frozen)
    ours = np.asarray(model(ids, np.ones_like(ids), feats.pixel_values, feats.grid_thw))
    ref = hf_image_logits(hf, ids, feats.pixel_values, feats.grid_thw)
    assert np.abs(ref).max() > 1.0, "weights too small to exercise the layers"
    diff = float(np.abs(ours - ref).max())
    assert diff <= TOL, f"max |logits diff| {diff:.3g}"


def test_auto_processor_loads_the_export_without_torchvision(exported):
    """The exported processor (image-only, shipped in the folder) gives the run's prompt ids and pixels."""
    from PIL import Image
    from transformers import AutoProcessor

    assert importlib.util.find_spec("torchvision") is None, "this test is about machines without torchvision"
    setup, out, record = exported["setup"], str(exported["out"]), exported["record"]
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    messages = chat_messages(record)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == setup.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = processor(images=[Image.open(p).convert("RGB") for p in record.images], text=[text], return_tensors="np")
    feats = preprocess_images(record, setup.image_processor)
    np.testing.assert_array_equal(batch["pixel_values"], feats.pixel_values)
    np.testing.assert_array_equal(batch["image_grid_thw"], feats.grid_thw)
    collator = Collator(setup.tokenizer, setup.model_cfg, BatchShape(256, 16, 16))
    assert batch["input_ids"][0].tolist() == collator.prompt_ids(record, feats.grid_thw)


def stored_dtypes(path: Path) -> set[str]:
    """The tensor dtypes a safetensors file declares in its header."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def test_export_keeps_the_trained_dtype(exported):
    """A float32 run exported with a bfloat16 config file at hand (e.g. configs/ssg_vqa.py): without
    --config the run's saved config wins, and the export is the float32 one the run's config gives."""
    run, root = exported["run"], exported["root"]
    bf16 = exported["config"].copy_and_resolve_references()
    bf16.model.param_dtype = "bfloat16"
    config = config_for_checkpoints([str(run)], bf16)  # what export_hf.py does without --config
    assert config.model.param_dtype == "float32"
    out = root / "hf-from-run-config"
    export_checkpoint(config, str(run), str(out))
    assert stored_dtypes(out / "model.safetensors") == {"F32"}
    assert (out / "model.safetensors").read_bytes() == (exported["out"] / "model.safetensors").read_bytes()
    assert json.loads((out / "anatomy_r1_export.json").read_text())["dtype"] == "float32"


@pytest.mark.slow
def test_scripts_without_config_evaluate_and_export_the_run(tmp_path, monkeypatch):
    """The user's commands with no --config on a run whose model is not configs/default.py's (1 layer,
    bfloat16 weights): the same results as the explicit config gives, nothing written into the run."""
    from anatomy_r1_jax import sharding
    from anatomy_r1_jax.evaluation.evaluator import EvalSettings, Evaluator
    from anatomy_r1_jax.evaluation.scoring import run_accuracy
    from anatomy_r1_jax.evaluation.sweep import run_sweep

    config = default_config()
    config.model.tiny.num_hidden_layers, config.model.param_dtype = 1, "bfloat16"
    config.data.synthetic.n, config.rl.max_completion_length = 40, 8
    run = tmp_path / "run"
    make_run(run, config, step=3, seed=5)
    before = files_under(run)
    # What the default config gives (it was a shape error, or a model with unrestored layers).
    missing = r"not hold this config.s model: \d+ of its parameters are not in the checkpoint \(language\.layers\.1\."
    with pytest.raises(ValueError, match=missing):
        export_checkpoint(default_config(), str(run), str(tmp_path / "wrong"))
    wrong = config.copy_and_resolve_references()
    wrong.model.tiny.intermediate_size = 128  # the same parameters, other shapes
    with pytest.raises(ValueError, match=r"not hold this config.s model \(use the run.s config: .*\n.*shape"):
        export_checkpoint(wrong, str(run), str(tmp_path / "wrong"))
    assert not (tmp_path / "wrong").exists()

    env = subprocess_env(devices=1)
    evaluate = [f"--checkpoints={run}", "--datasets=synthetic:val", f"--out={tmp_path / 'eval'}", "--limit=2",
                "--batch_size=2", "--config.rl.max_completion_length=4"]
    for script, args in (("export_hf.py", [f"--checkpoint={run}", f"--out={tmp_path / 'hf'}"]),
                         ("evaluate.py", evaluate)):
        done = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{script}: {done.stderr[-3000:]}"
    assert files_under(run) == before, "a script wrote into the run folder"

    explicit = tmp_path / "hf-explicit"
    export_checkpoint(config, str(run), str(explicit))
    assert stored_dtypes(tmp_path / "hf" / "model.safetensors") == {"BF16"}
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (explicit / name).read_bytes(), name

    # The sweep with the explicit config finds the script's result made with everything it would use
    # itself (checkpoint, data, settings and every answer-relevant config field): nothing to evaluate.
    [theirs] = [json.loads(p.read_text()) for p in (tmp_path / "eval" / "results").glob("*.json")]
    assert theirs["n"] == 2 and theirs["identity"]["config"]["data"]["synthetic"]["n"] == 40
    config.rl.max_completion_length = 4  # the command line's override
    mesh = sharding.make_mesh([("data", 1)], devices=jax.devices()[:1])
    monkeypatch.setattr(Evaluator, "evaluate", lambda *a, **k: pytest.fail("the script's result was not reused"))
    settings = EvalSettings(batch_size=2, accuracy=run_accuracy(config.rl.rewards))  # the script's default rule
    [ours] = run_sweep(config, [str(run)], ["synthetic:val"], str(tmp_path / "eval"), settings,
                       limit=2, mesh=mesh, progress=False)
    assert ours == theirs
