"""A sweep: every model (the base model and checkpoints) on every dataset, resumable.

    out/results/<model>__<dataset>.json   one per (model, dataset) pair, written atomically
    out/summary.md                        markdown tables (report.py)
    out/accuracy_by_category.png, out/accuracy_by_checkpoint.png

A pair whose result file exists and was made with the same checkpoint, data, settings and
answer-relevant config (sweep.evaluation_config) is skipped, so a stopped sweep started again only does what is missing; a model whose pairs are all
done is not even loaded. Dataset specs: a records file in any format `read_records` supports
(the paper's released records, OmniMedVQA, Med-R1, the project's JSONL), or "synthetic:val" /
"synthetic:test" (the synthetic benchmark generated from the config's data.synthetic settings,
as the training run generates it); "NAME=SPEC" names one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from typing import Sequence

import jax
from tqdm import tqdm

from anatomy_r1_jax.data import read_records
from anatomy_r1_jax.data.records import Record
from anatomy_r1_jax.evaluation import report
from anatomy_r1_jax.evaluation.checkpoints import (CheckpointRef, build_setup, load_model_state, resolve_checkpoint,
                                                   safe_name)
from anatomy_r1_jax.evaluation.evaluator import EvalSettings, Evaluator

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic:"


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    path: str
    records: list[Record]


def load_dataset(spec: str, config, cache_dir: str, limit: int = 0) -> Dataset:
    """Records of a dataset spec (see the module docstring), the first `limit` when limit > 0,
    with the config's prompt variant where a record names none (as training reads them)."""
    name, _, target = spec.partition("=") if "=" in spec else ("", "", spec)
    c = config.data
    if target.startswith(SYNTHETIC):
        from anatomy_r1_jax.data.synthetic import SPLITS, make_synthetic_dataset

        split = target[len(SYNTHETIC):]
        if split not in SPLITS:
            raise ValueError(f"dataset {spec!r}: synthetic split must be one of {SPLITS}")
        paths = make_synthetic_dataset(os.path.join(cache_dir, "synthetic"), n=c.synthetic.n, seed=c.synthetic.seed,
                                       image_size=c.synthetic.image_size)
        path, default_name = paths[split], f"synthetic-{split}"
        records = read_records(path)
    else:
        path = os.path.abspath(os.path.expanduser(target))
        default_name = os.path.splitext(os.path.basename(path))[0]
        records = read_records(path, format=c.format, image_root=c.image_root or None)
    if c.prompt_variant:
        records = [r if r.prompt_variant else dataclasses.replace(r, prompt_variant=c.prompt_variant) for r in records]
    return Dataset(name or default_name, path, records[:limit] if limit > 0 else records)


def result_path(out_dir: str, model: str, dataset: str) -> str:
    return os.path.join(out_dir, "results", f"{safe_name(model)}__{safe_name(dataset)}.json")


def write_json_atomic(path: str, obj) -> None:
    """Writes JSON to a temporary file beside `path`, then renames it over `path` (atomic on POSIX):
    a sweep killed mid-write never leaves a truncated result that would later be skipped."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _json(node):
    return node.to_dict() if hasattr(node, "to_dict") else node


def evaluation_config(config) -> dict:
    """The parts of a run's config that change answers: the model, tokenizer, prompts, image
    budget, completion budget and sampler, and the seed (the tiny base model's weights)."""
    c = config
    data = {k: _json(c.data[k]) for k in ("prompt_variant", "prompt_length", "patches_per_query", "format",
                                          "image_root", "synthetic")}
    rl = {k: c.rl[k] for k in ("max_completion_length", "temperature", "top_p", "top_k")}
    return json.loads(json.dumps({"seed": c.seed, "model": _json(c.model), "tokenizer": _json(c.tokenizer),
                                  "data": data, "rl": rl}, default=list))


def _identity(ref: CheckpointRef, data: Dataset, settings: EvalSettings, config) -> dict:
    """What a stored result must match to be reused."""
    return {"checkpoint": ref.path, "step": ref.step, "dataset_path": data.path,
            "record_ids_head": [r.id for r in data.records[:5]], "num_records": len(data.records),
            "settings": settings.to_json(), "config": evaluation_config(config)}


def _done(path: str, identity: dict) -> dict | None:
    try:
        with open(path) as f:
            stored = json.load(f)
    except (OSError, ValueError):
        return None
    return stored if stored.get("identity") == identity else None


def run_sweep(config, checkpoints: Sequence[str], datasets: Sequence[str], out_dir: str,
              settings: EvalSettings = EvalSettings(), *, limit: int = 0, mesh=None, progress: bool = True) -> list[dict]:
    """Evaluates every checkpoint spec on every dataset spec; returns the results (sweep order)
    and writes them, the summary and the plots under out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    refs = [resolve_checkpoint(spec) for spec in checkpoints]
    names = [r.name for r in refs]
    if len(set(names)) != len(names):
        raise ValueError(f"two checkpoints share a name in {names}; name them with NAME=PATH")
    # The tiny tokenizer of the first run among the checkpoints (read there, never written).
    setup = build_setup(config, next((r.workdir for r in refs if r.workdir), None), mesh=mesh, rollout=True)
    data = [load_dataset(spec, config, out_dir, limit) for spec in datasets]
    if len({d.name for d in data}) != len(data):
        raise ValueError(f"two datasets share a name in {[d.name for d in data]}; name them with NAME=SPEC")
    evaluator = Evaluator.from_config(config, setup.graphdef, setup.model_cfg, setup.tokenizer, setup.image_processor,
                                      setup.mesh, setup.rules, settings)
    settings = evaluator.settings  # batch size as rounded to the mesh
    writer = jax.process_index() == 0
    results, failures = {}, []
    bar = tqdm(total=len(refs) * len(data), desc="sweep", disable=not progress, dynamic_ncols=True)
    for ref in refs:
        todo = []
        for d in data:
            path, identity = result_path(out_dir, ref.name, d.name), _identity(ref, d, settings, config)
            stored = _done(path, identity)
            if stored is not None:
                results[ref.name, d.name] = stored
                bar.update(1)
            else:
                todo.append((d, path, identity))
        if not todo:
            continue
        params, frozen = load_model_state(setup, ref)
        for d, path, identity in todo:
            bar.set_postfix_str(f"{ref.name} on {d.name}")
            try:
                result = evaluator.evaluate(params, frozen, d.records, progress=progress)
            except Exception as error:  # one unusable dataset (missing images, too long prompts) must not end the sweep
                log.error("%s on %s failed: %s: %s", ref.name, d.name, type(error).__name__, error)
                failures.append((ref.name, d.name, f"{type(error).__name__}: {error}"))
                bar.update(1)
                continue
            result = {"model": ref.name, "dataset": d.name, "identity": identity, **result}
            if writer:
                write_json_atomic(path, result)
            results[ref.name, d.name] = result
            log.info("%s on %s: accuracy %.3f, format failures %.3f, %.2f answers/s", ref.name, d.name,
                     result["accuracy"]["value"], result["format_failure_rate"]["value"],
                     result["throughput"]["answers_per_second"])
            bar.update(1)
        del params, frozen
    bar.close()
    ordered = [results[r.name, d.name] for r in refs for d in data if (r.name, d.name) in results]
    if writer and ordered:
        report.write_report(ordered, out_dir, failures)
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(refs) * len(data)} pairs failed: "
                           + "; ".join(f"{m} on {d}: {e}" for m, d, e in failures))
    return ordered
