"""Readers: every format, image roots, auto-detection, and every kind of bad input in both modes."""

import dataclasses
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from anatomy_r1_jax.data import (
    DataError,
    Record,
    read_class_similarity,
    read_records,
    write_class_similarity,
    write_records,
)
from anatomy_r1_jax.data import readers

RELEASED = Path("/work/shared/data/anatomy_r1")
INSTRUCTION = (
    "You are an expert in cholecystectomy surgical procedures, and I will provide you with a clinical image "
    "of a cholecystectomy surgery. Please analyze the image and answer the question. You should only return "
    "the answer of the question, not any other text. Output the thinking process in <think> </think> and "
    "final answer in <answer> </answer> tags. The output answer format should be as follows:<think> ... "
    "</think> <answer>YOUR ANSWER HERE</answer>.\nQuestion:\n{q}\nAnatomy Options:\n{opts}"
)


def png(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    return str(path)


def anatomy_item(q="What anatomy is at the top-left of the frame ?", options=("Liver", "Gut", "Omentum", "Gallbladder"),
                 solution="B", answer="Gut", image=" /CholecT45/data/VID01/000001.png"):
    opts = "\n".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(options))
    return {"instruction": INSTRUCTION.format(q=q, opts=opts), "sft_prompt": "", "solution": solution,
            "answer": answer, "images": image}


def omni_item(index=0, gt="Lung", image="Images/ct/1.png", **options):
    item = {"question_id": f"omni_{index}", "dataset": "ct", "question_type": "Anatomy Identification",
            "modality_type": "CT(Computed Tomography)", "question": "Which organ is shown?", "gt_answer": gt,
            "image_path": image}
    item.update(options or {"option_A": "Liver", "option_B": "Lung"})
    return item


def write_json(path: Path, items) -> Path:
    path.write_text(json.dumps(items))
    return path


@pytest.mark.skipif(not RELEASED.exists(), reason="released Anatomy-R1 records not present")
def test_released_files_read_without_images():
    grpo = read_records(RELEASED / "GRPO.json")
    gdqa = read_records(RELEASED / "GRPO-GDQA.json", format="anatomy_r1")
    first = grpo[0]
    assert first.id == "GRPO-0" and first.images == ("/CholecT45/data/VID66/000791.png",)
    assert first.answer == "A" and first.answer_text == first.category == "Gallbladder"
    assert len(first.options) == 4 and first.source == "anatomy_r1/GRPO.json"
    assert len({r.id for r in gdqa}) == 1000 and all(r.images[0].startswith("/CholecT45/") for r in gdqa)
    assert {r.category for r in grpo} == {"Liver", "Omentum", "Abdominal Wall Cavity", "Gallbladder",
                                           "Cystic Plate", "Gut"}


@pytest.mark.skipif(not RELEASED.exists(), reason="released Anatomy-R1 records not present")
def test_image_root_rerooting_and_missing_images(tmp_path):
    records = read_records(RELEASED / "GRPO.json", image_root=tmp_path, check_images=False)
    assert records[0].images == (str(tmp_path / "CholecT45/data/VID66/000791.png"),)
    with pytest.raises(DataError, match=r"GRPO\.json: record 0 \(id 'GRPO-0'\): image file not found"):
        read_records(RELEASED / "GRPO.json", image_root=tmp_path)  # a root turns the check on
    png(tmp_path / "CholecT45/data/VID66/000791.png")
    report = tmp_path / "skipped.jsonl"
    kept = read_records(RELEASED / "GRPO.json", image_root=tmp_path, on_bad_record="skip", report_path=report)
    assert [r.id for r in kept] == ["GRPO-0"] + [r.id for r in records[1:] if r.images == records[0].images]
    assert len(report.read_text().splitlines()) == 1000 - len(kept)


def test_omnimedvqa_missing_options_and_relative_images(tmp_path):
    image = png(tmp_path / "Images/ct/1.png")
    path = write_json(tmp_path / "ct.json", [
        omni_item(0, gt="Lung"),
        omni_item(1, gt="Kidney", option_A="Liver", option_C="Kidney", option_D=None),
    ])
    first, second = read_records(path, image_root=tmp_path)
    assert (first.id, first.answer, first.options, first.images) == ("omni_0", "B", ("Liver", "Lung"), (image,))
    assert first.category == "CT(Computed Tomography)" and first.question_type == "Anatomy Identification"
    assert (second.options, second.answer, second.answer_text) == (("Liver", "Kidney"), "B", "Kidney")
    # without a root, relative paths are relative to the data file's folder
    assert read_records(path)[0].images == (image,)


def test_medr1_problem_parsing(tmp_path):
    path = write_json(tmp_path / "medr1.json", [{
        "image": "Images/a.png",
        "problem": "What imaging technique is employed? A)Mammogram, B)Positron emission tomography (PET), C)CT, D)X, ray",
        "solution": "<answer> C </answer>",
    }])
    (record,) = read_records(path, format="auto")
    assert record.question == "What imaging technique is employed?"
    assert record.options == ("Mammogram", "Positron emission tomography (PET)", "CT", "X, ray")
    assert (record.answer, record.answer_text, record.id) == ("C", "CT", "medr1-0")


def test_project_jsonl_round_trip(tmp_path):
    image = png(tmp_path / "images/0.png")
    records = [Record(id=f"s-{i}", images=("images/0.png",), question="What is the brown anatomy?",
                      options=("Liver", "Gut"), answer="A", answer_text="Liver", category="Liver",
                      source="synthetic", question_type="attribute") for i in range(3)]
    path = write_records(records, tmp_path / "train.jsonl")
    back = read_records(path)
    assert back == [dataclasses.replace(r, images=(image,)) for r in records]


def test_unknown_format_names_file_and_keys(tmp_path):
    path = write_json(tmp_path / "odd.json", [{"text": "hi", "label": 1}])
    with pytest.raises(DataError, match=r"odd\.json: unknown record format; keys seen: \['label', 'text'\]"):
        read_records(path)
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        read_records(path, format="csv")


BAD_ANATOMY = {
    "answer not among options": (anatomy_item(solution="E", answer="Cystic Plate"), "answer 'E' is not one of"),
    "answer text differs": (anatomy_item(answer="Liver"), "answer text 'Liver' is not option B"),
    "duplicate options": (anatomy_item(options=("Liver", "Gut", "gut", "Omentum")), "duplicate options: B and C"),
    "one option": (anatomy_item(options=("Gut",), solution="A"), "1 option\\(s\\); at least 2"),
    "empty question": (anatomy_item(q="  "), "empty question"),
    "no options block": ({**anatomy_item(), "instruction": "Question?"}, "cannot parse instruction"),
    "missing key": ({"instruction": "x", "images": "a.png"}, "missing key\\(s\\) \\['solution'\\]"),
    "not an object": ([1, 2], "expected a JSON object, got list"),
}


@pytest.mark.parametrize("case", sorted(BAD_ANATOMY))
def test_bad_record_error_and_skip(tmp_path, case, caplog):
    bad, reason = BAD_ANATOMY[case]
    path = write_json(tmp_path / "data.json", [anatomy_item(), bad, anatomy_item()])
    with pytest.raises(DataError, match=rf"data\.json: record 1 \(id 'data-1'\): .*{reason}"):
        read_records(path)
    with caplog.at_level(logging.WARNING):
        kept = read_records(path, on_bad_record="skip")
    assert [r.id for r in kept] == ["data-0", "data-2"]
    (entry,) = [json.loads(line) for line in (tmp_path / "data.json.skipped.jsonl").read_text().splitlines()]
    assert entry["index"] == 1 and entry["id"] == "data-1" and entry["record"] == bad
    assert "skipped 1 of 3 records" in caplog.text


def test_omnimedvqa_answer_not_among_options_and_duplicate_id(tmp_path):
    path = write_json(tmp_path / "o.json", [omni_item(0), omni_item(1, gt="Heart"), omni_item(0)])
    with pytest.raises(DataError, match=r"record 1 \(id 'omni_1'\): gt_answer 'Heart' is not among"):
        read_records(path)
    kept = read_records(path, on_bad_record="skip", report_path=tmp_path / "r/report.jsonl")
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "r/report.jsonl").read_text().splitlines()]
    assert [r.id for r in kept] == ["omni_0"] and "duplicate id 'omni_0'" in reasons[1]


def test_missing_and_undecodable_images(tmp_path):
    png(tmp_path / "Images/ct/1.png")
    (tmp_path / "Images/ct/2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    path = write_json(tmp_path / "o.json", [omni_item(0), omni_item(1, image="Images/ct/2.png"),
                                            omni_item(2, image="Images/ct/3.png")])
    with pytest.raises(DataError, match=r"record 1 \(id 'omni_1'\): image cannot be decoded"):
        read_records(path, image_root=tmp_path)
    kept = read_records(path, image_root=tmp_path, on_bad_record="skip")
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "o.json.skipped.jsonl").read_text().splitlines()]
    assert [r.id for r in kept] == ["omni_0"] and "image file not found" in reasons[1]
    assert len(read_records(path, check_images=False)) == 3


def test_invalid_json_and_encoding(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "x",]')
    with pytest.raises(DataError, match=r"broken\.json: invalid JSON at line 1 column"):
        read_records(broken, on_bad_record="skip")  # a whole-file problem cannot be skipped
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'[{"question": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"latin\.json: not valid UTF-8 at byte"):
        read_records(latin)
    empty = tmp_path / "empty.json"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        read_records(empty)


def test_jsonl_bad_lines_are_record_problems(tmp_path):
    png(tmp_path / "i.png")
    good = json.dumps(Record(id="a", images=("i.png",), question="Q?", options=("x", "y"), answer="A",
                             answer_text="x").to_json())
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join([good.encode(), b'{"id": "b", ', b'{"id": "c\xff"}', b"",
                                 good.replace('"a"', '"d"').encode(), b'{"id": "e", "images": "i.png"}']))
    with pytest.raises(DataError, match=r"d\.jsonl: record 1 \(line 2\) \(id 'd-1'\): invalid JSON"):
        read_records(path)
    kept = read_records(path, on_bad_record="skip")
    entries = [json.loads(line) for line in (tmp_path / "d.jsonl.skipped.jsonl").read_text().splitlines()]
    assert [r.id for r in kept] == ["a", "d"]
    assert [e["where"] for e in entries] == ["record 1 (line 2)", "record 2 (line 3)", "record 4 (line 6)"]
    assert "not valid UTF-8" in entries[1]["reason"] and "'images' must be a list" in entries[2]["reason"]


def test_default_report_goes_to_temp_when_data_folder_is_read_only(tmp_path, monkeypatch):
    path = write_json(tmp_path / "data.json", [anatomy_item(), anatomy_item(q="")])
    monkeypatch.setattr(readers.os, "access", lambda *args: False)
    report = readers.default_report_path(path)
    assert report.name.startswith("data.json.") and str(report).startswith(readers.tempfile.gettempdir())
    read_records(path, on_bad_record="skip")
    assert json.loads(report.read_text().splitlines()[0])["reason"] == "empty question"
    report.unlink()


def test_class_similarity_file(tmp_path):
    path = write_class_similarity(tmp_path / "s.json", ["a", "b"], [[1.0, 0.25], [0.25, 1.0]], note="test")
    assert read_class_similarity(path) == (("a", "b"), [[1.0, 0.25], [0.25, 1.0]])
    write_class_similarity(path, ["a", "b"], [[1.0, 1.5], [0.25, 1.0]])
    with pytest.raises(DataError, match=r"similarity\[a\]\[b\] = 1.5 is not in \[0, 1\]"):
        read_class_similarity(path)
