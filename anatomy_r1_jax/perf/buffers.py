"""Which buffers make up a compiled program's temporaries: XLA's buffer assignment at its peak.

`compiled_memory` (perf/memory.py) gives the temporaries' total; this reads XLA's own dump of the
buffer assignment and of the live ranges over the flattened schedule (loop bodies included), written
when the program is compiled with `compile(compiler_options=dump_options(directory))`, and lists
the values of the temporary allocation live at the instant where their sum is largest:

    live(t) = sum of size(c) over chunks c (offset, size) of the "preallocated-temp" allocation
              holding a value v with start(v) <= t <= end(v)    (aliased values share a chunk)
    peak    = max over t of live(t)          (<= the allocation's size: the heap packs chunks)

A value's `source` is the op_name of its first operand when it has none itself: for XLA:CPU's
float32 upcast of a bf16 weight (a `wrapped_convert` fusion) that is the parameter's path, e.g.
"state.params['language']['layers']['mlp']['up']['kernel'].value".
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re

_VALUE = re.compile(r" value: <\d+ (\S+)(?: \(phi\))? @\S+> \(size=(\d+),offset=(\d+)\): (\S+?)(?:\{|$)")
_RANGE = re.compile(r"\s+(\S+?)(\{[^}]*\})?:(\d+)-(\d+)$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = \S+ [\w\-]+\(([^)]*)\)(.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass(frozen=True)
class Buffer:
    """One value live at the peak: HLO name (with its tuple index), shape, bytes, op_name or source."""

    name: str
    shape: str
    bytes: int
    source: str


@dataclasses.dataclass(frozen=True)
class Peak:
    """bytes = live(t) at t = time (an index into the flattened schedule); buffers largest first,
    one per (offset, size) chunk of the allocation."""

    bytes: int
    time: int
    allocation: int
    buffers: list[Buffer]


def dump_options(directory: str) -> dict:
    """compiler_options for `Lowered.compile` that write the files `peak_buffers` reads."""
    return {"xla_dump_to": directory, "xla_dump_hlo_as_text": True}


def _temp_values(path: str) -> tuple[int, dict[str, tuple[int, int, str]]]:
    """(allocation size, {value name: (offset, size, shape)}) of the preallocated-temp allocation."""
    size, values, inside = 0, {}, False
    with open(path) as f:
        for line in f:
            if line.startswith("allocation "):
                inside = "preallocated-temp" in line
                if inside:
                    size = int(re.search(r"size (\d+)", line).group(1))
            elif inside and (m := _VALUE.match(line)):
                values[m.group(1)] = (int(m.group(3)), int(m.group(2)), m.group(4))
    return size, values


def _live_ranges(path: str) -> dict[str, tuple[int, int]]:
    ranges, inside = {}, False
    with open(path) as f:
        for line in f:
            if "BufferLiveRange:" in line:
                inside = True
            elif inside and "Live ranges at" in line:
                break
            elif inside and (m := _RANGE.match(line.rstrip())):
                index = "" if m.group(2) in (None, "{}") else m.group(2)
                ranges[m.group(1) + index] = (int(m.group(3)), int(m.group(4)))
    return ranges


def _sources(path: str) -> dict[str, str]:
    """{instruction: its op_name, else its first operand's}."""
    own, first = {}, {}
    with open(path) as f:
        for line in f:
            if m := _INSTRUCTION.match(line):
                if n := _OP_NAME.search(m.group(3)):
                    own[m.group(1)] = n.group(1).replace("\\'", "'")
                operands = re.findall(r"%([\w.\-]+)", m.group(2))
                if operands:
                    first[m.group(1)] = operands[0]
    return {name: own.get(name) or own.get(first.get(name, ""), "") for name in set(own) | set(first)}


def _module(directory: str) -> str:
    """The dumped module (path prefix) with the largest temporary allocation."""
    suffix = "-buffer-assignment.txt"
    paths = glob.glob(os.path.join(directory, "*after_optimizations" + suffix))
    if not paths:
        raise FileNotFoundError(f"{directory}: no XLA buffer-assignment dump; compile with "
                                f"compiler_options=perf.buffers.dump_options(dir)")
    return max(paths, key=lambda p: _temp_values(p)[0])[: -len(suffix)]


def _union(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Closed integer intervals merged where they overlap or touch."""
    merged: list[list[int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [tuple(m) for m in merged]


def peak_buffers(directory: str) -> Peak:
    """The values of the temporaries live at their peak (see the module docstring)."""
    prefix = _module(directory)
    allocation, values = _temp_values(prefix + "-buffer-assignment.txt")
    ranges = _live_ranges(prefix + "-live-range.txt")
    timed = {name: v + ranges[name] for name, v in values.items() if name in ranges}
    if not timed:
        return Peak(0, 0, allocation, [])
    spans: dict[tuple[int, int], list[tuple[int, int]]] = {}  # a chunk is live while any of its values is
    for offset, size, _, start, end in timed.values():
        spans.setdefault((offset, size), []).append((start, end))
    delta = [0] * (max(end for *_, end in timed.values()) + 2)
    for (_, size), intervals in spans.items():
        for start, end in _union(intervals):
            delta[start] += size
            delta[end + 1] -= size
    live, best, time = 0, -1, 0
    for t, d in enumerate(delta):
        live += d
        if live > best:
            best, time = live, t
    sources = _sources(prefix + ".txt")
    chunks: dict[tuple[int, int], Buffer] = {}
    for name, (offset, size, shape, start, end) in timed.items():
        if start <= time <= end and (offset, size) not in chunks:
            chunks[offset, size] = Buffer(name, shape, size, sources.get(name.split("{")[0], ""))
    return Peak(best, time, allocation, sorted(chunks.values(), key=lambda b: -b.bytes))
