"""The start-up pass over a run's records: every problem the collator would meet hours into a run,
found before the first step and reported all at once.

Per record:
- images: each file exists and PIL reads its header (the size; pixels are not decoded). The patches
  follow from that size by the image processor's own resize rule (`get_number_of_image_patches`:
  Qwen's smart_resize with the processor's min/max pixels, patch and merge size), and their sum must
  fit the patch budget `patches_per_query`.
- prompt: the chat prompt of data/collate.py (chat template, each image placeholder expanded to the
  resized image's tokens) must fit `prompt_length`. With GDQA variants (gdqa_kinds), so must the
  longest prompt a variant can have: every rephrasing x every instruction template x every option
  order of the kinds (methods/augmentation.py draws from exactly these), worst case taken.
Not checked here: a file whose header reads but whose pixels are corrupt (the pipeline's load names
it when it comes up), and the supervised warm-up targets' completion_length (the collator does).

Speed (100k records): image headers are read once per distinct path, and prompts are counted by
pieces. Qwen2's pre-tokenizer cuts the text after every newline that a letter follows and at special
tokens, so a prompt's length is the sum of its pieces' lengths: the chat template's text before and
after the instruction, the header, the question and the option lines (data/prompts.py
`question_pieces`). Distinct pieces are few (headers, questions, option lines) and are tokenized once,
in batches; the worst case over option orders is a max over permutations of a k x k table of line
lengths. A check against the full tokenization (collate.prompt_ids) on the first records guards
the premise.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from anatomy_r1_jax.data import prompts
from anatomy_r1_jax.data.collate import prompt_ids, prompt_text
from anatomy_r1_jax.data.readers import DataError, write_jsonl
from anatomy_r1_jax.data.records import Record
from anatomy_r1_jax.data.rephrasings import question_rephrasings

log = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")
SHOWN = 50  # problems listed in the error message; the report file has all of them
_CHECKED_IN_FULL = 3  # records whose piecewise prompt length is checked against the full tokenization
_EXACT_PERMUTATIONS = 6  # up to this many options every order is tried (as augmentation does)


@dataclasses.dataclass(frozen=True)
class Problem:
    """What stops one record from being trained on: its file, its id and the reason."""

    file: str
    record_id: str
    reason: str

    def line(self) -> str:
        return f"{self.file}: record {self.record_id!r}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """One image file: its patches after the image processor's resize, or what is wrong with it."""

    patches: int = 0
    problem: str | None = None


def image_info(path: str, image_processor) -> ImageInfo:
    """Reads the header only (PIL's open; the pixels are decoded lazily and never here)."""
    if not os.path.isfile(path):
        return ImageInfo(problem=f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception as error:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        return ImageInfo(problem=f"image header cannot be read ({type(error).__name__}: {error}): {path}")
    if width == 0 or height == 0:
        return ImageInfo(problem=f"image has zero size: {path}")
    try:
        return ImageInfo(patches=int(image_processor.get_number_of_image_patches(height, width, {})))
    except ValueError as error:  # smart_resize rejects aspect ratios over 200
        return ImageInfo(problem=f"image of {width}x{height} px cannot be resized ({error}): {path}")


class _PieceLengths:
    """Token counts of text pieces, tokenized once each, in batches."""

    def __init__(self, tokenizer, batch: int = 4096):
        self.tokenizer, self.batch = tokenizer, batch
        self.lengths: dict[str, int] = {}

    def add(self, texts: Iterable[str]) -> None:
        todo = list({t for t in texts if t not in self.lengths})
        for start in range(0, len(todo), self.batch):
            chunk = todo[start:start + self.batch]
            self.lengths.update(zip(chunk, map(len, self._encode(chunk))))

    def _encode(self, texts: list[str]) -> list:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)  # a fast tokenizer's Rust core
        if backend is not None and hasattr(backend, "encode_batch_fast"):  # ids only: 1.7x faster
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def __getitem__(self, text: str) -> int:
        if text not in self.lengths:
            self.add([text])
        return self.lengths[text]


class PromptLengths:
    """Longest prompt (in tokens) of a record and of its GDQA variants, by pieces (module docstring).

    gdqa_kinds: the variant kinds ("rephrase", "permute", "template"); () for the record alone.
    Pieces are made once per distinct template, question, option list and image count (records
    share them), and the sums once per distinct combination of these.
    """

    def __init__(self, tokenizer, gdqa_kinds: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.kinds = frozenset(gdqa_kinds)
        self.lengths = _PieceLengths(tokenizer)
        self._chat: dict[int, tuple[str, str]] = {}  # image count -> text before / after the instruction
        self._headers: dict[str, tuple[str, ...]] = {}  # the record's template -> headers (its own first)
        self._questions: dict[str, tuple[str, ...]] = {}  # question -> question pieces (its own first)
        self._lines: dict[tuple[str, ...], tuple[tuple[str, ...], ...]] = {}  # options -> [rotation][line]
        self._sums: dict[tuple, tuple[int, int]] = {}

    def _pieces(self, record: Record) -> tuple:
        """(chat, headers, questions, lines) of the record, made on first use of each."""
        n = len(record.images)
        if n not in self._chat:
            text = prompt_text(self.tokenizer, record)
            before, sep, after = text.partition(prompts.format_question(record))
            if not sep:
                raise ValueError("the tokenizer's chat template changes the instruction text; prompt lengths "
                                 "cannot be counted by pieces")
            self._chat[n] = (before, after)
        own = record.prompt_variant or prompts.DEFAULT_VARIANT
        if own not in self._headers:
            templates = (own, *(t for t in prompts.VARIANTS if t != own)) if "template" in self.kinds else (own,)
            self._headers[own] = tuple(prompts.question_pieces(record, t)[0] for t in templates)
        q = record.question
        if q not in self._questions:
            questions = (q, *question_rephrasings(q)) if "rephrase" in self.kinds else (q,)
            self._questions[q] = tuple(prompts.question_pieces(dataclasses.replace(record, question=w))[1]
                                       for w in questions)
        options = record.options
        if options not in self._lines:
            shifts = range(len(options)) if "permute" in self.kinds else range(1)
            self._lines[options] = tuple(prompts.question_pieces(dataclasses.replace(
                record, options=options[r:] + options[:r]))[2] for r in shifts)
        return self._chat[n], self._headers[own], self._questions[q], self._lines[options]

    def prepare(self, records: Sequence[Record]) -> None:
        """Makes every record's pieces and tokenizes them all (in batches)."""
        texts = set()
        for record in records:
            chat, headers, questions, lines = self._pieces(record)
            texts.update(chat + headers + questions)
            texts.update(itertools.chain.from_iterable(lines))
        self.lengths.add(texts)

    def longest(self, record: Record, image_tokens: Sequence[int]) -> tuple[int, int]:
        """(tokens of the record's own prompt, tokens of the longest prompt of it or its variants);
        image_tokens: the merged tokens each image's placeholder expands to."""
        key = (len(record.images), record.prompt_variant, record.question, record.options)
        if key not in self._sums:
            n = self.lengths
            (before, after), headers, questions, lines = self._pieces(record)
            table = np.array([[n[line] for line in rotation] for rotation in lines])  # [rotation r, line i]
            fixed = n[before] + n[after]
            own = fixed + n[headers[0]] + n[questions[0]] + int(table[0].sum())
            worst = fixed + max(n[h] for h in headers) + max(n[q] for q in questions) + (
                int(table[0].sum()) if len(table) == 1 else _longest_order(table))
            self._sums[key] = (own, max(own, worst))
        own, worst = self._sums[key]
        expanded = sum(image_tokens) - len(image_tokens)  # each placeholder is one token before expansion
        return own + expanded, worst + expanded


def _longest_order(table: np.ndarray) -> int:
    """Max over option orders of the lines' total length. table[r, i] is the length of line i holding
    option (i + r) % k, so cost[i, j] = table[(j - i) % k, i]. Every order up to
    _EXACT_PERMUTATIONS options; beyond, the bound sum_i max_j cost[i, j]."""
    k = table.shape[1]
    i = np.arange(k)
    cost = table[(i[None, :] - i[:, None]) % k, i[:, None]]  # [position, option]
    if k > _EXACT_PERMUTATIONS:
        return int(cost.max(axis=1).sum())
    orders = _orders(k)
    return int(cost[i, orders].sum(axis=1).max())


@functools.cache
def _orders(k: int) -> np.ndarray:
    return np.array(list(itertools.permutations(range(k))), np.int64)


def find_problems(
    records: Sequence[Record],
    *,
    tokenizer,
    image_processor,
    prompt_length: int,
    patches_per_query: int,
    gdqa_kinds: Sequence[str] = (),
    file: str = "",
) -> list[Problem]:
    """Every problem of every record (one Problem per record and reason), in record order.

    gdqa_kinds: the GDQA variant kinds whose prompts must fit too (() when GDQA is off).
    file: the records' data file, named in each problem.
    """
    merge = image_processor.merge_size
    images: dict[str, ImageInfo] = {}
    for record in records:
        for path in record.images:
            if path not in images:
                images[path] = image_info(path, image_processor)
    counter = PromptLengths(tokenizer, gdqa_kinds)
    counter.prepare(records)
    problems, checked = [], 0
    for record in records:
        infos = [images[p] for p in record.images]
        bad = [i.problem for i in infos if i.problem]
        problems += [Problem(file, record.id, reason) for reason in bad]
        if bad:
            continue
        patches = sum(i.patches for i in infos)
        if patches > patches_per_query:
            problems.append(Problem(file, record.id, (
                f"its images have {patches} patches after the image processor's resize, more than "
                f"data.patches_per_query={patches_per_query}; raise data.patches_per_query or lower the "
                f"image processor's max_pixels")))
        image_tokens = [i.patches // merge ** 2 for i in infos]
        own, worst = counter.longest(record, image_tokens)
        if checked < _CHECKED_IN_FULL:
            full = len(prompt_ids(tokenizer, record, image_tokens))
            if full != own:
                raise ValueError(f"record {record.id!r}: its prompt has {full} tokens, {own} counted by pieces; "
                                 f"the tokenizer does not cut text where Qwen2's pre-tokenizer does")
            checked += 1
        if own > prompt_length:
            problems.append(Problem(file, record.id, (
                f"prompt of {own} tokens exceeds data.prompt_length={prompt_length}; raise data.prompt_length")))
        elif worst > prompt_length:
            problems.append(Problem(file, record.id, (
                f"its longest GDQA variant prompt ({', '.join(sorted(counter.kinds))}) has {worst} tokens, more "
                f"than data.prompt_length={prompt_length}; raise data.prompt_length or narrow gdqa.kinds")))
    return problems


def write_report(problems: Sequence[Problem], path: str | os.PathLike) -> Path:
    """One JSON object per problem: {"file", "id", "reason"}."""
    return write_jsonl(({"file": p.file, "id": p.record_id, "reason": p.reason} for p in problems), path)


def drop_or_raise(
    splits: dict[str, tuple[list[Record], list[Problem]]],
    on_error: str,
    report_path: str | os.PathLike,
) -> dict[str, list[Record]]:
    """Applies data.on_error to each split's (records, problems).

    Any problem: all of them go to report_path (JSONL; removed when there are none), then "raise"
    raises one DataError listing them, one line each (the first SHOWN, then a count); "skip" returns
    each split without the records that have problems and logs how many were left out. A split left
    empty by skipping raises.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"data.on_error must be one of {ON_ERROR}, got {on_error!r}")
    problems = [p for _, split_problems in splits.values() for p in split_problems]
    if not problems:
        Path(report_path).unlink(missing_ok=True)  # a previous run's list would mislead
        return {name: records for name, (records, _) in splits.items()}
    report = write_report(problems, report_path)
    bad_ids = {name: {p.record_id for p in ps} for name, (_, ps) in splits.items()}
    if on_error == "raise":
        counts = ", ".join(f"{len(bad_ids[name])} of {len(records)} {name}"
                           for name, (records, _) in splits.items() if bad_ids[name])
        lines = [p.line() for p in problems[:SHOWN]]
        if len(problems) > SHOWN:
            lines.append(f"... and {len(problems) - SHOWN} more")
        raise DataError(f"records with problems ({counts}); all {len(problems)} problems are in {report}:\n"
                        + "\n".join(lines)
                        + "\nfix them, or leave these records out with --config.data.on_error=skip")
    kept = {}
    for name, (records, _) in splits.items():
        kept[name] = [r for r in records if r.id not in bad_ids[name]]
        if bad_ids[name]:
            log.warning("data: skipped %d of %d %s records with problems; reasons in %s",
                        len(records) - len(kept[name]), len(records), name, report)
        if records and not kept[name]:
            raise DataError(f"every {name} record has a problem (data.on_error=skip left none); reasons in {report}")
    return kept
