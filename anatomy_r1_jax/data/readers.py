"""Readers: data files of the supported formats -> list[Record], with bad records raised or reported.

Formats (the container, a JSON array or one JSON object per line, is independent of the format):
- "anatomy_r1": the released ms-swift records {"instruction", "sft_prompt"|"sft_instruction",
  "solution": "A", "answer": "Gallbladder", "images": " /CholecT45/..."}; question and options are
  parsed out of `instruction` (data/prompts.py); category = the answer text (the anatomy class).
- "omnimedvqa": {"question", "gt_answer", "option_A".."option_D" (some may be missing), "image_path",
  "modality_type", "question_type", "question_id"}; the letter is where gt_answer matches an option.
- "medr1": {"image", "problem": "Q? A)x, B)y, C)z", "solution": "<answer> B </answer>"}.
- "jsonl": the project's own, one Record.to_json per line.
"auto" picks the format from the keys of the first record.

Bad records (missing keys, unparsable text, answer not among the options, duplicate options, fewer
than 2 options, empty question, duplicate id, invalid JSON or UTF-8 on a line, missing or undecodable
image when checked) raise DataError with on_bad_record="error", naming file, record and problem. With
"skip" the good records are kept and every skipped one is written with its reason to a JSONL report.
A whole-file problem (unreadable, empty, invalid JSON or UTF-8 in an array file, unknown format) always
raises.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

from anatomy_r1_jax.data.images import image_problem, resolve_image_path
from anatomy_r1_jax.data.prompts import parse_instruction
from anatomy_r1_jax.data.records import LETTERS, Record

logger = logging.getLogger(__name__)

FORMATS = ("anatomy_r1", "omnimedvqa", "medr1", "jsonl")
_SIGNATURES = {  # format -> keys its records always carry
    "jsonl": {"id", "images", "question", "options", "answer"},
    "anatomy_r1": {"instruction", "solution", "images"},
    "omnimedvqa": {"question", "gt_answer", "image_path"},
    "medr1": {"problem", "solution", "image"},
}


class DataError(ValueError):
    """A data file or one of its records is unusable; the message names the file, record and problem."""


class _BadRecord(Exception):
    """Internal: what is wrong with one record."""


@dataclasses.dataclass(frozen=True)
class _Item:
    index: int  # position among the file's records
    where: str  # "record 3" or "record 3 (line 5)"
    raw: object  # the decoded JSON value, or the line text when it did not decode
    problem: str | None = None


@dataclasses.dataclass(frozen=True)
class _Context:
    path: Path
    image_root: str | None

    def image_paths(self, value: object) -> tuple[str, ...]:
        raw = [value] if isinstance(value, str) else value
        if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
            raise _BadRecord(f"image path must be a string or a list of strings, got {value!r}")
        return tuple(resolve_image_path(p, self.image_root, self.path.parent) for p in raw)

    def fallback_id(self, index: int) -> str:
        return f"{self.path.stem}-{index}"

    def source(self, fmt: str) -> str:
        return f"{fmt}/{self.path.name}"


def record_problems(record: Record) -> list[str]:
    """What makes a record unusable for multiple-choice training (empty list if nothing)."""
    problems = []
    if not record.question.strip():
        problems.append("empty question")
    if len(record.options) < 2:
        problems.append(f"{len(record.options)} option(s); at least 2 are needed")
    if len(record.options) > len(LETTERS):
        problems.append(f"{len(record.options)} options; at most {len(LETTERS)} letters exist")
    seen: dict[str, str] = {}
    for letter, text in zip(LETTERS, record.options):
        key = text.strip().casefold()
        if not key:
            problems.append(f"option {letter} is empty")
        elif key in seen:
            problems.append(f"duplicate options: {seen[key]} and {letter} are both {text!r}")
        else:
            seen[key] = letter
    letters = record.letters()
    if record.answer not in letters or len(record.answer) != 1:
        problems.append(f"answer {record.answer!r} is not one of the option letters {letters!r}")
    elif record.options[record.answer_index] != record.answer_text:
        problems.append(
            f"answer text {record.answer_text!r} is not option {record.answer} "
            f"({record.options[record.answer_index]!r})"
        )
    if not record.images:
        problems.append("no image")
    return problems


def _require(item: dict, *keys: str) -> None:
    missing = [key for key in keys if key not in item]
    if missing:
        raise _BadRecord(f"missing key(s) {missing}; keys present: {sorted(item)}")


def _text(item: dict, key: str) -> str:
    value = item[key]
    if not isinstance(value, str):
        raise _BadRecord(f"{key!r} must be a string, got {type(value).__name__}")
    return value


def _parse_anatomy_r1(item: dict, index: int, ctx: _Context) -> Record:
    _require(item, "instruction", "solution", "images")
    try:
        parsed = parse_instruction(_text(item, "instruction"))
    except ValueError as error:
        raise _BadRecord(f"cannot parse instruction: {error}") from None
    letter = _text(item, "solution").strip()
    if "answer" in item:
        answer_text = _text(item, "answer").strip()
    else:
        answer_text = parsed.options[LETTERS.index(letter)] if letter in LETTERS[: len(parsed.options)] else ""
    return Record(
        id=str(item.get("id", ctx.fallback_id(index))),
        images=ctx.image_paths(item["images"]),
        question=parsed.question,
        options=parsed.options,
        answer=letter,
        answer_text=answer_text,
        category=answer_text,
        source=ctx.source("anatomy_r1"),
        prompt_variant=parsed.variant,
    )


def _parse_omnimedvqa(item: dict, index: int, ctx: _Context) -> Record:
    _require(item, "question", "gt_answer", "image_path")
    option_keys = sorted(key for key in item if re.fullmatch(r"option_[A-Z]", key))
    options = tuple(str(item[k]).strip() for k in option_keys if item[k] is not None and str(item[k]).strip())
    gt_answer = str(item["gt_answer"]).strip()
    matches = [i for i, text in enumerate(options) if text == gt_answer]
    matches = matches or [i for i, text in enumerate(options) if text.casefold() == gt_answer.casefold()]
    if not matches:
        raise _BadRecord(f"gt_answer {gt_answer!r} is not among the options {list(options)}")
    return Record(
        id=str(item.get("question_id", ctx.fallback_id(index))),
        images=ctx.image_paths(item["image_path"]),
        question=_text(item, "question").strip(),
        options=options,
        answer=LETTERS[matches[0]],
        answer_text=options[matches[0]],
        category=str(item.get("modality_type", "")),
        source=ctx.source("omnimedvqa"),
        question_type=str(item.get("question_type", "")),
    )


def split_medr1_problem(problem: str) -> tuple[str, tuple[str, ...]]:
    """"What is shown? A)CT, B)MRI, C)X-Ray" -> ("What is shown?", ("CT", "MRI", "X-Ray"))."""
    start = re.search(r"(?:^|\s)A\)", problem)
    if start is None:
        raise _BadRecord(f"no 'A)' option list in problem {problem!r}")
    question, rest = problem[: start.start()].strip(), problem[start.end():]
    options = []
    for letter in LETTERS[1:]:
        separator = re.search(rf"(?:,\s*|\s+){letter}\)", rest)
        if separator is None:
            break
        options.append(rest[: separator.start()].strip())
        rest = rest[separator.end():]
    options.append(rest.strip())
    return question, tuple(options)


def _parse_medr1(item: dict, index: int, ctx: _Context) -> Record:
    _require(item, "problem", "solution", "image")
    question, options = split_medr1_problem(_text(item, "problem"))
    solution = _text(item, "solution")
    match = re.fullmatch(r"\s*(?:<answer>\s*([A-Z])\s*</answer>|([A-Z]))\s*", solution)
    if match is None:
        raise _BadRecord(f"solution {solution!r} is not '<answer> X </answer>' with a letter X")
    letter = match.group(1) or match.group(2)
    index_of = LETTERS.index(letter)
    return Record(
        id=str(item.get("id", ctx.fallback_id(index))),
        images=ctx.image_paths(item["image"]),
        question=question,
        options=options,
        answer=letter,
        answer_text=options[index_of] if index_of < len(options) else "",
        category=str(item.get("modality", "")),
        source=ctx.source("medr1"),
        question_type=str(item.get("question_type", "")),
    )


def _parse_jsonl(item: dict, index: int, ctx: _Context) -> Record:
    for key, kind in (("images", list), ("options", list), ("question", str), ("answer", str), ("id", str)):
        if key in item and not isinstance(item[key], kind):
            raise _BadRecord(f"{key!r} must be a {kind.__name__}, got {type(item[key]).__name__}")
    try:
        record = Record.from_json(item)
    except TypeError as error:
        fields = [f.name for f in dataclasses.fields(Record)]
        raise _BadRecord(f"not a project record ({error}); fields are {fields}") from None
    return dataclasses.replace(record, images=ctx.image_paths(list(record.images)))


_PARSERS = {
    "anatomy_r1": _parse_anatomy_r1,
    "omnimedvqa": _parse_omnimedvqa,
    "medr1": _parse_medr1,
    "jsonl": _parse_jsonl,
}


def _load_items(path: Path) -> list[_Item]:
    """The file's records: a JSON array, or one JSON value per non-blank line (JSONL)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read the file: {error}") from None
    data = data.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte-order mark
    if not data.strip():
        raise DataError(f"{path}: the file is empty")
    if data.lstrip()[:1] == b"[":
        try:
            value = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not valid UTF-8 at byte {error.start}: {error.reason}") from None
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from None
        return [_Item(i, f"record {i}", raw) for i, raw in enumerate(value)]
    lines = [(n + 1, line) for n, line in enumerate(data.split(b"\n")) if line.strip()]
    items = []
    for index, (line_number, line) in enumerate(lines):
        where = f"record {index} (line {line_number})"
        try:
            items.append(_Item(index, where, json.loads(line.decode("utf-8"))))
        except UnicodeDecodeError as error:
            text = line.decode("utf-8", errors="replace")
            items.append(_Item(index, where, text, f"not valid UTF-8 at byte {error.start}: {error.reason}"))
        except json.JSONDecodeError as error:
            text = line.decode("utf-8")
            problem = f"invalid JSON at column {error.colno}: {error.msg}"
            if index == 0 and data.lstrip()[:1] == b"{" and len(lines) > 1:
                problem += " (a top-level JSON object spanning lines is not a supported layout)"
            items.append(_Item(index, where, text, problem))
    return items


def detect_format(path: Path, items: list[_Item]) -> str:
    """The format whose signature keys the first JSON-object record carries."""
    first = next((item.raw for item in items if item.problem is None and isinstance(item.raw, dict)), None)
    if first is None:
        raise DataError(f"{path}: no record is a JSON object; cannot detect the format")
    for fmt, keys in _SIGNATURES.items():
        if keys <= first.keys():
            return fmt
    expected = "; ".join(f"{fmt}: {sorted(keys)}" for fmt, keys in _SIGNATURES.items())
    raise DataError(f"{path}: unknown record format; keys seen: {sorted(first)}; expected one of {expected}")


def _raw_id(raw: object, ctx: _Context, index: int) -> str:
    if isinstance(raw, dict):
        for key in ("id", "question_id"):
            if key in raw:
                return str(raw[key])
    return ctx.fallback_id(index)


def default_report_path(path: Path) -> Path:
    """`<path>.skipped.jsonl` beside the data file, or under the temp folder when that is read-only."""
    if os.access(path.parent, os.W_OK):
        return path.with_name(path.name + ".skipped.jsonl")
    tag = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / "anatomy_r1_jax" / f"{path.name}.{tag}.skipped.jsonl"


def read_records(
    path: str | os.PathLike,
    format: str = "auto",
    image_root: str | os.PathLike | None = None,
    on_bad_record: str = "error",
    report_path: str | os.PathLike | None = None,
    check_images: bool | None = None,
) -> list[Record]:
    """Read one data file into Records.

    image_root: every image path is put under it (data/images.py: resolve_image_path); without it
      absolute paths are kept and relative ones are relative to the data file's folder.
    on_bad_record: "error" raises DataError at the first bad record; "skip" keeps the good ones, writes
      each skipped record with its reason to report_path (default: default_report_path) and logs the count.
    check_images: open and decode every image with PIL. None (default) checks when image_root is given
      or the format is the project's "jsonl" (whose images are written beside it); the released
      Anatomy-R1 files read without image_root are not checked, since their images are not public.
    """
    path = Path(path)
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; known: {FORMATS} or 'auto'")
    items = _load_items(path)
    fmt = detect_format(path, items) if format == "auto" else format
    if check_images is None:
        check_images = image_root is not None or fmt == "jsonl"
    ctx = _Context(path, None if image_root is None else str(image_root))
    parse = _PARSERS[fmt]
    records: list[Record] = []
    skipped: list[dict] = []
    seen_ids: set[str] = set()
    image_checks: dict[str, str | None] = {}
    for item in items:
        record_id = _raw_id(item.raw, ctx, item.index)
        try:
            if item.problem is not None:
                raise _BadRecord(item.problem)
            if not isinstance(item.raw, dict):
                raise _BadRecord(f"expected a JSON object, got {type(item.raw).__name__}")
            record = parse(item.raw, item.index, ctx)
            record_id = record.id
            problems = record_problems(record)
            if record.id in seen_ids:
                problems.append(f"duplicate id {record.id!r}")
            for image in record.images if check_images and not problems else ():
                if image not in image_checks:
                    image_checks[image] = image_problem(image)
                if image_checks[image]:
                    problems.append(image_checks[image])
            if problems:
                raise _BadRecord("; ".join(problems))
        except _BadRecord as problem:
            if on_bad_record == "error":
                raise DataError(f"{path}: {item.where} (id {record_id!r}): {problem}") from None
            raw = item.raw if not isinstance(item.raw, str) else item.raw[:2000]
            skipped.append(
                {"file": str(path), "index": item.index, "where": item.where, "id": record_id,
                 "reason": str(problem), "record": raw}
            )
            continue
        seen_ids.add(record.id)
        records.append(record)
    if skipped:
        report = Path(report_path) if report_path is not None else default_report_path(path)
        write_jsonl(skipped, report)
        logger.warning("%s: skipped %d of %d records; reasons in %s", path, len(skipped), len(items), report)
    logger.info("%s: read %d %s records", path, len(records), fmt)
    return records


def write_jsonl(rows, path: str | os.PathLike) -> Path:
    """Write JSON objects one per line (UTF-8), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_records(records: list[Record], path: str | os.PathLike) -> Path:
    """Write Records as the project's JSONL (one Record.to_json per line, UTF-8)."""
    return write_jsonl((record.to_json() for record in records), path)


def write_class_similarity(path: str | os.PathLike, classes: list[str], matrix, note: str = "") -> Path:
    """Save a class-similarity matrix as JSON: {"classes": [...], "matrix": [[...]], "note": "..."}."""
    path = Path(path)
    rows = [[round(float(value), 6) for value in row] for row in matrix]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"classes": list(classes), "matrix": rows, "note": note}, indent=1) + "\n")
    return path


def read_class_similarity(path: str | os.PathLike) -> tuple[tuple[str, ...], list[list[float]]]:
    """Load a class-similarity file (write_class_similarity's layout): (class names, [C, C] rows in [0, 1])."""
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        classes, rows = content["classes"], content["matrix"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path}: not a class-similarity file ({type(error).__name__}: {error})") from None
    if len(set(classes)) != len(classes) or not all(isinstance(name, str) for name in classes):
        raise DataError(f"{path}: class names must be distinct strings, got {classes}")
    if len(rows) != len(classes) or any(len(row) != len(classes) for row in rows):
        raise DataError(f"{path}: matrix must be {len(classes)}x{len(classes)} to match the classes")
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise DataError(f"{path}: similarity[{classes[i]}][{classes[j]}] = {value!r} is not in [0, 1]")
    return tuple(classes), [[float(v) for v in row] for row in rows]
