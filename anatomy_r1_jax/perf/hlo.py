"""Collectives in compiled (post-SPMD-partitioning) HLO text: how many, and how many bytes.

Counted per kind: all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute, with
async pairs (`all-gather-start` / `-done`) counted once at `-start`. Bytes are those of the op's
result shape per device (for an all-gather the gathered array, for a reduce-scatter the scattered
shard; a tuple result sums its elements). The count is *static*: an op inside a while loop (the
micro-batch scan, the decode loop) is counted once, however many times the loop runs.
"""

from __future__ import annotations

import re

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
               "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}

# `%name = <result shape> <op>(` where the op is a collective (optionally its async -start form).
_OP = re.compile(r"=\s*(?P<shape>.+?)\s+(?P<op>" + "|".join(KINDS) + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+[0-9]*[a-z0-9]*)\[(?P<dims>[0-9,]*)\]")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO result shape such as `f32[8,128]{1,0}` or `(bf16[4], f32[2,2])`."""
    total = 0
    for m in _ARRAY.finditer(shape):
        dtype = m.group("dtype")
        if dtype not in DTYPE_BYTES:
            continue
        dims = [int(d) for d in m.group("dims").split(",") if d]
        total += int(np.prod(dims, dtype=np.int64)) * DTYPE_BYTES[dtype]
    return total


def collective_stats(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {"count": n, "bytes": b}} for every kind in KINDS (zeros when absent)."""
    stats = {k: {"count": 0, "bytes": 0} for k in KINDS}
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if m is None:
            continue
        shape = m.group("shape")
        if m.group("start") and m.group("op") in ("all-gather", "collective-permute"):
            # These async starts return (operands, results[, context]): count the result half only
            # (an all-reduce-start returns its result shape alone).
            shape = _async_result(shape)
        stats[m.group("op")]["count"] += 1
        stats[m.group("op")]["bytes"] += shape_bytes(shape)
    return stats


def _async_result(shape: str) -> str:
    """The second element of a `(operand, result, ...)` tuple shape, or the shape itself."""
    depth, parts, current = 0, [], ""
    inner = shape.strip()
    if not inner.startswith("("):
        return shape
    for ch in inner[1:-1]:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts[1] if len(parts) > 1 else shape


def total(stats: dict[str, dict[str, int]]) -> tuple[int, int]:
    """(count, bytes) summed over kinds."""
    return sum(s["count"] for s in stats.values()), sum(s["bytes"] for s in stats.values())


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_WHILE_BODY = re.compile(r"\swhile\(.*\bbody=%?(?P<body>[\w.\-]+)")
_CALLED = re.compile(r"\b(?:to_apply|body|condition|calls|branch_computations|called_computations)="
                     r"(?P<names>\{[^}]*\}|%?[\w.\-]+)")


def computations(hlo_text: str) -> dict[str, str]:
    """{name: text} of every computation of an HLO module's text."""
    out, name, lines = {}, None, []
    for line in hlo_text.splitlines():
        if name is None:
            m = _COMPUTATION.match(line)
            if m and not line.startswith(("HloModule", " ")):
                name, lines = m.group("name"), []
        elif line.startswith("}"):
            out[name], name = "\n".join(lines), None
        else:
            lines.append(line)
    return out


def _callees(text: str) -> set[str]:
    names = set()
    for m in _CALLED.finditer(text):
        names.update(n.strip().lstrip("%") for n in m.group("names").strip("{}").split(","))
    return names


def loop_body_text(hlo_text: str, dynamic_only: bool = False) -> str:
    """The text of every while loop's body and of all it calls: what runs once per iteration
    (`collective_stats` of it counts the collectives inside loops). dynamic_only: only loops
    whose trip count XLA does not know, i.e. not a scan (over layers, micro-batches) but a
    `lax.while_loop` that may exit early: the rollout's token loop."""
    comps = computations(hlo_text)
    todo = {m.group("body") for text in comps.values() for line in text.splitlines()
            if (m := _WHILE_BODY.search(line)) and not (dynamic_only and "known_trip_count" in line)}
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        todo |= _callees(comps[name])
    return "\n".join(comps[n] for n in sorted(seen))
