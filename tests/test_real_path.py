"""The real user's path, end to end: a transformers-saved Qwen2.5-VL folder in bf16 (safetensors,
a tokenizer, the real processor settings min_pixels=3136, max_pixels=12845056), the paper's released
records re-rooted to 854x480 frames, the shipped configs/ssg_vqa.py with only paths and sizes
overridden: train, resume, evaluate, export; transformers loads the export with our logits.
Also the set-up's errors a user meets on that path (missing folder, config typo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import subprocess_env
from anatomy_r1_jax.runtime import builders
from hf_tiny import HF_CLASSES, hf_image_logits, widen_

ROOT = Path(__file__).resolve().parents[1]
RELEASED = Path("/work/shared/data/anatomy_r1/GRPO.json")
FRAME = (854, 480)  # CholecT45 frames (width, height)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            vision_depth=2, vision_hidden_size=32, vision_num_heads=2, vision_intermediate_size=64,
            fullatt_block_indexes=(1,))


def _checkpoint_folder(path: Path) -> Path:
    """What a user downloads: config.json + bf16 safetensors (transformers' save_pretrained), the
    tokenizer files, and preprocessor_config.json with Qwen's real pixel range."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    from anatomy_r1_jax.data.tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer(path)
    Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056).save_pretrained(path)
    hf = builders.tiny_hf_config_for(AutoTokenizer.from_pretrained(path), "qwen2_5_vl", **TINY)
    config_cls, model_cls = HF_CLASSES["qwen2_5_vl"]
    torch.manual_seed(0)
    model = model_cls(config_cls(**hf)).eval()
    widen_(model)
    model.to(torch.bfloat16).save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    return path


def _records_and_frames(root: Path, n: int = 16) -> tuple[Path, Path]:
    """The first n released records, unchanged, and an 854x480 frame at each image path under a
    frames root (the records' paths are absolute paths of the authors' machine)."""
    records = json.loads(RELEASED.read_text())[:n]
    path = root / "anatomy_r1" / "GRPO.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(records))
    frames = root / "frames"
    rng = np.random.default_rng(0)
    for i, record in enumerate(records):
        file = frames / record["images"].strip().lstrip("/")
        file.parent.mkdir(parents=True, exist_ok=True)
        base = np.linspace(0, 255, FRAME[0])[None, :, None] * rng.uniform(0.3, 1.0, (1, 1, 3))
        pixels = np.clip(base + rng.normal(0, 20, (FRAME[1], FRAME[0], 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(file, format="PNG" if i % 2 else "JPEG")  # both kinds under .png names
    return path, frames


def _run(script: str, *args: str, cache: Path, expect_ok: bool = True) -> subprocess.CompletedProcess:
    env = subprocess_env(devices=1, JAX_COMPILATION_CACHE_DIR=str(cache))
    out = subprocess.run([sys.executable, str(ROOT / script), *args], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    if expect_ok:
        assert out.returncode == 0, out.stderr[-4000:]
    return out


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_path")
    records, frames = _records_and_frames(root)
    ckpt = _checkpoint_folder(root / "Qwen2.5-VL-tiny")
    config = ["--config=configs/ssg_vqa.py", f"--config.model.path={ckpt}", f"--config.data.train={records}",
              f"--config.data.image_root={frames}"]
    # Only sizes: steps, group, batch, completion length (the patch budget and prompt length are shipped).
    sizes = ["--config.train.batch_size=2", "--config.train.micro_batches=1", "--config.rl.group_size=2",
             "--config.rl.max_completion_length=8", "--config.train.checkpoint_every=1"]
    return dict(root=root, records=records, frames=frames, ckpt=ckpt, config=config, sizes=sizes,
                cache=root / "jax_cache")


@pytest.mark.slow
def test_train_resume_evaluate_export_on_the_real_path(user):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from anatomy_r1_jax.data import read_records
    from anatomy_r1_jax.data.collate import BatchShape, Collator, preprocess_images
    from anatomy_r1_jax.models import load_pretrained

    run, cache = user["root"] / "run", user["cache"]
    train = lambda steps: _run("train.py", f"--workdir={run}", *user["config"], *user["sizes"],  # noqa: E731
                               f"--config.train.steps={steps}", cache=cache)
    train(2)
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert not any(k.startswith("eval/") for r in rows for k in r)  # no eval set: no eval metrics
    assert all(np.isfinite(r["loss"]) and r["update_skipped"] == 0 for r in rows)
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["model"]["family"] == "qwen2_5_vl" and recorded["model"]["preset"] == ""  # not qwen2_5_vl_7b
    assert recorded["model"]["param_dtype"] == "bfloat16" and recorded["optim"]["master_weights"] is True
    assert recorded["data"]["patches_per_query"] == 2040

    # A crash left an unfinished save behind; running again resumes from the last complete step.
    tmp = run / "checkpoints" / "3.orbax-checkpoint-tmp-1700000000"
    (tmp / "state").mkdir(parents=True)
    out = train(3)
    assert "resumed from step 2" in out.stderr and not tmp.exists()
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3]
    assert "3" in os.listdir(run / "checkpoints")

    # evaluate.py and export_hf.py read the run's saved config: nothing typed again.
    evaluation = user["root"] / "eval"
    _run("scripts/evaluate.py", f"--checkpoints=trained={run}", f"--datasets={user['records']}",
         f"--out={evaluation}", "--batch_size=2", "--limit=2", cache=cache)
    assert (evaluation / "summary.md").exists()

    export = user["root"] / "export"
    _run("scripts/export_hf.py", f"--checkpoint={run}", f"--out={export}", "--dtype=float32",
         cache=cache)

    # transformers loads the export; its processor resizes the paper's frames to the run's budget.
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(export, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    processor = Qwen2VLImageProcessorPil.from_pretrained(export)
    record = read_records(user["records"], image_root=str(user["frames"]))[0]
    feats = preprocess_images(record, processor)
    np.testing.assert_array_equal(feats.grid_thw, [[1, 34, 60]])  # 854x480 -> 840x476 px, 2040 patches
    ours = load_pretrained(export)
    ids = np.asarray([Collator(tokenizer, ours.config, BatchShape(1024, 8, 2040)).prompt_ids(record, feats.grid_thw)])
    logits = np.asarray(ours(ids, np.ones_like(ids), feats.pixel_values, feats.grid_thw))
    ref = hf_image_logits(hf, ids, feats.pixel_values, feats.grid_thw)
    assert np.abs(ref).max() > 1.0
    diff = float(np.abs(logits - ref).max())
    assert diff <= 1e-4, f"max |logits diff| {diff:.3g}"


@pytest.mark.slow
def test_set_up_errors_are_one_clear_line(user, tmp_path):
    no_folder = _run("train.py", f"--workdir={tmp_path / 'a'}", *user["config"], "--config.model.path=/no/such/model",
                     cache=user["cache"], expect_ok=False)
    assert no_folder.returncode != 0
    assert "config model.path='/no/such/model': no such folder" in no_folder.stderr.splitlines()[-1]
    typo = _run("train.py", f"--workdir={tmp_path / 'b'}", *user["config"], "--config.train.stepz=3",
                cache=user["cache"], expect_ok=False)
    assert typo.returncode != 0
    assert typo.stderr.strip().splitlines() == [
        "train.py: unknown config field --config.train.stepz (train has no 'stepz'; nearest: steps)"]


def test_an_exception_mid_run_leaves_complete_checkpoints_and_a_restart_resumes(tmp_path, monkeypatch):
    """The loop waits for its in-flight save on the way out of an exception (no *.orbax-checkpoint-tmp
    left), and the next run resumes from the last complete step. Also: no eval set, no eval metrics."""
    from anatomy_r1_jax.train.trainer import Trainer
    from test_export_hf import default_config

    config = default_config()
    config.sft.update(steps=3, batch_size=4)
    config.train.update(steps=0, checkpoint_every=1)
    config.data.update(eval="", synthetic=dict(n=40, seed=0, image_size=56))
    config.model.tiny.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    config.gdqa.trigger = "off"
    workdir = tmp_path / "run"
    original = Trainer.sft_iteration

    def crash_at_third_step(self, step):
        if step == 2:
            raise RuntimeError("simulated crash")
        return original(self, step)

    monkeypatch.setattr(Trainer, "sft_iteration", crash_at_third_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(config, str(workdir)).run()
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]  # step 2's save completed, no tmp dir
    monkeypatch.setattr(Trainer, "sft_iteration", original)
    rows = Trainer(config, str(workdir)).run()
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert not any(k.startswith("eval/") for r in rows for k in r)
