"""The start-up validation pass (data/validation.py): every problem found at once, skip mode, exact
prompt lengths by pieces, and train.py stopping before its first step."""

import dataclasses
import itertools
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import transformers
from PIL import Image

from conftest import subprocess_env
from anatomy_r1_jax.data import prompts
from anatomy_r1_jax.data.collate import prompt_ids, prompt_text
from anatomy_r1_jax.data.readers import DataError, read_records, write_records
from anatomy_r1_jax.data.records import Record
from anatomy_r1_jax.data.synthetic import make_synthetic_dataset
from anatomy_r1_jax.data.tokenizer import build_tiny_tokenizer
from anatomy_r1_jax.data import validation
from anatomy_r1_jax.methods.augmentation import KINDS, permute_options, question_rephrasings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASED = "/work/shared/data/anatomy_r1/GRPO-GDQA.json"  # as the other tests of the released records
BUDGET = 16  # patches per query: a 56x56 image is 4x4 patches, a 112x112 one 8x8


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return transformers.AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def processor():
    return transformers.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for name, size in (("small", 56), ("large", 112)):
        paths[name] = str(folder / f"{name}.png")
        Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(paths[name])
    paths["garbage"] = str(folder / "garbage.png")
    with open(paths["garbage"], "wb") as f:
        f.write(b"not an image at all" * 10)
    paths["missing"] = str(folder / "missing.png")
    return paths


def _record(rid: str, image: str, question: str = "What is the red anatomy?", variant: str = "compact") -> Record:
    return Record(id=rid, images=(image,), question=question, options=("Liver", "Gut", "Omentum", "Gallbladder"),
                  answer="B", answer_text="Gut", prompt_variant=variant)


def _own_length(tokenizer, record, image_tokens=(4,)):
    return len(prompt_ids(tokenizer, record, list(image_tokens)))


def test_every_problem_is_reported_at_once_with_file_record_and_reason(tokenizer, processor, images):
    good = _record("good", images["small"])
    length = _own_length(tokenizer, good) + 15  # the large image adds 12 tokens
    records = [good, _record("missing", images["missing"]), _record("garbage", images["garbage"]),
               _record("long", images["small"], question="What is the " + "very " * 40 + "red anatomy?"),
               _record("large", images["large"]), _record("good2", images["small"])]
    problems = validation.find_problems(records, tokenizer=tokenizer, image_processor=processor,
                                        prompt_length=length, patches_per_query=BUDGET, file="train.json")
    by_id = {p.record_id: p for p in problems}
    assert [p.record_id for p in problems] == ["missing", "garbage", "long", "large"]
    assert all(p.file == "train.json" for p in problems)
    assert "image file not found" in by_id["missing"].reason and images["missing"] in by_id["missing"].reason
    assert "header cannot be read" in by_id["garbage"].reason
    assert "exceeds data.prompt_length" in by_id["long"].reason
    assert "64 patches" in by_id["large"].reason and "patches_per_query=16" in by_id["large"].reason
    # the budget that fits makes the large image fine
    assert not validation.find_problems([records[4]], tokenizer=tokenizer, image_processor=processor,
                                        prompt_length=10 ** 4, patches_per_query=64)


def test_prompt_length_counts_the_resized_images_tokens(tokenizer, processor, images):
    """A 112x112 image is 64 patches = 16 tokens, a 56x56 one 4: the limit sits between them."""
    small, large = _record("small", images["small"]), _record("large", images["large"])
    length = _own_length(tokenizer, small, [4]) + 6
    problems = validation.find_problems([small, large], tokenizer=tokenizer, image_processor=processor,
                                        prompt_length=length, patches_per_query=64)
    assert [p.record_id for p in problems] == ["large"]
    assert f"prompt of {_own_length(tokenizer, large, [16])} tokens" in problems[0].reason


def test_gdqa_variants_must_fit_too(tokenizer, processor, images):
    """The "compact" prompt fits; with GDQA's template kind the paper's 100-token headers must fit as well."""
    record = _record("q", images["small"])
    length = _own_length(tokenizer, record) + 5
    check = dict(tokenizer=tokenizer, image_processor=processor, prompt_length=length, patches_per_query=BUDGET)
    assert not validation.find_problems([record], **check)
    assert not validation.find_problems([record], gdqa_kinds=("permute",), **check)
    (problem,) = validation.find_problems([record], gdqa_kinds=("template",), **check)
    assert "longest GDQA variant" in problem.reason and "template" in problem.reason
    longest = max(_own_length(tokenizer, dataclasses.replace(record, prompt_variant=t)) for t in prompts.VARIANTS)
    assert f"has {longest} tokens" in problem.reason


def _brute_force_longest(tokenizer, record, image_tokens):
    texts = []
    for q in [record.question, *question_rephrasings(record.question)]:
        for t in {record.prompt_variant or prompts.DEFAULT_VARIANT, *prompts.VARIANTS}:
            for perm in itertools.permutations(range(len(record.options))):
                variant = permute_options(dataclasses.replace(record, question=q, prompt_variant=t), perm)
                texts.append(prompt_text(tokenizer, variant))
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return max(map(len, ids)) + sum(image_tokens) - len(image_tokens)


def test_lengths_by_pieces_equal_the_full_tokenization_of_every_variant(tokenizer, tmp_path):
    """The released records (SSG-VQA rephrasings) and synthetic ones, each variant of all kinds."""
    paths = make_synthetic_dataset(tmp_path, n=20, image_size=56)
    records = read_records(RELEASED)[:2] + read_records(paths["train"])[:2]
    records.append(dataclasses.replace(records[-1], options=("Liver.", "Gut", "a (b)", "Omentum?")))
    counter = validation.PromptLengths(tokenizer, KINDS)
    counter.prepare(records)
    for record in records:
        own, worst = counter.longest(record, [7])
        assert own == _own_length(tokenizer, record, [7])
        assert worst == _brute_force_longest(tokenizer, record, [7]), record.id


def test_raise_lists_every_problem_one_line_each_and_caps_the_display(tmp_path, images):
    records = [_record(f"r{i}", images["small"]) for i in range(60)]
    problems = [validation.Problem("train.json", f"r{i}", "image file not found: x") for i in range(55)]
    with pytest.raises(DataError) as error:
        validation.drop_or_raise({"train": (records, problems), "eval": ([], [])}, "raise", tmp_path / "bad.jsonl")
    message = str(error.value)
    assert "55 of 60 train" in message and "data.on_error=skip" in message
    assert "train.json: record 'r0': image file not found: x" in message.splitlines()
    assert "... and 5 more" in message and "'r54'" not in message
    assert len((tmp_path / "bad.jsonl").read_text().splitlines()) == 55


def test_skip_keeps_the_good_records_and_says_how_many_were_left_out(tmp_path, images, caplog):
    train = [_record(f"t{i}", images["small"]) for i in range(4)]
    evals = [_record(f"e{i}", images["small"]) for i in range(3)]
    splits = {"train": (train, [validation.Problem("a.json", "t1", "x"), validation.Problem("a.json", "t1", "y")]),
              "eval": (evals, [validation.Problem("b.json", "e2", "z")])}
    with caplog.at_level(logging.WARNING):
        kept = validation.drop_or_raise(splits, "skip", tmp_path / "invalid.jsonl")
    assert [r.id for r in kept["train"]] == ["t0", "t2", "t3"] and [r.id for r in kept["eval"]] == ["e0", "e1"]
    assert "skipped 1 of 4 train records" in caplog.text and "skipped 1 of 3 eval records" in caplog.text
    report = [json.loads(line) for line in (tmp_path / "invalid.jsonl").read_text().splitlines()]
    assert [(r["file"], r["id"], r["reason"]) for r in report] == [("a.json", "t1", "x"), ("a.json", "t1", "y"),
                                                                  ("b.json", "e2", "z")]
    assert validation.drop_or_raise({"train": (train, [])}, "skip", tmp_path / "invalid.jsonl") == {"train": train}
    assert not (tmp_path / "invalid.jsonl").exists()  # no stale list from an earlier run
    with pytest.raises(DataError, match="every train record"):
        validation.drop_or_raise({"train": (train[:1], [validation.Problem("a", "t0", "x")])}, "skip",
                                 tmp_path / "r.jsonl")


def _bad_train_file(tmp_path) -> str:
    paths = make_synthetic_dataset(tmp_path / "data", n=40, image_size=56)
    records = read_records(paths["train"])
    records[3] = dataclasses.replace(records[3], images=(str(tmp_path / "gone.png"),))
    records[5] = dataclasses.replace(records[5], question="What is the " + "very " * 60 + "red anatomy?")
    return str(write_records(records, tmp_path / "train.jsonl"))


@pytest.mark.slow
def test_train_py_stops_before_the_first_step_naming_every_bad_record(tmp_path):
    train = _bad_train_file(tmp_path)
    workdir = tmp_path / "run"
    env = subprocess_env(devices=1)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--workdir={workdir}",
                          f"--config.data.train={train}", "--config.data.eval=", "--config.sft.steps=0"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert f"{train}: record 'synthetic-train-000003': image file not found" in out.stderr
    assert f"{train}: record 'synthetic-train-000005': prompt of" in out.stderr
    assert not (workdir / "metrics.jsonl").exists() and not (workdir / "checkpoints").exists()
    assert len((workdir / "invalid_records.jsonl").read_text().splitlines()) == 2


def test_on_error_skip_from_the_command_line_drops_the_bad_records(tmp_path):
    from absl import flags
    from ml_collections import config_flags  # train.py's flag parser
    from anatomy_r1_jax.runtime import builders

    train = _bad_train_file(tmp_path)
    argv = ["train.py", f"--config.data.train={train}", "--config.data.eval=", "--config.data.on_error=skip"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs", "default.py"), flag_values=fv,
                                    sys_argv=argv)
    fv(argv)
    config, workdir = fv.config, str(tmp_path / "run")
    tokenizer = builders.build_tokenizer(config, workdir)
    data = builders.build_data(config, workdir)
    kept = builders.validate_data(config, data, tokenizer, builders.build_image_processor(config, tokenizer),
                                    workdir)
    assert len(kept.train) == len(data.train) - 2
    assert {r.id for r in data.train} - {r.id for r in kept.train} == {"synthetic-train-000003",
                                                                        "synthetic-train-000005"}
