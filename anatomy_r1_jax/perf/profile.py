"""Where a compiled function spends its time on XLA:CPU: a jax.profiler trace, read back with
`jax.profiler.ProfileData`, summed per HLO instruction and labelled with the Python source line
that emitted it (the innermost frame of the instruction's `stack_frame_id` in the HLO text) and its
`op_name` (the JAX primitive path, where `transpose(jvp(...))` marks the backward pass).

Durations are summed over the XLA worker threads, so the shares are of busy time, not wall time.
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile
from typing import Any, Callable

import jax

_SKIP = ("ThreadpoolListener", "end: ", "ThunkExecutor", "Pjit", "ParseArguments", "PythonRefManager")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=.*?metadata=\{[^}]*?op_name=\"(?P<op>[^\"]*)\""
                    r"(?:[^}]*?stack_frame_id=(?P<frame>\d+))?")
_TABLE_ROW = re.compile(r"^(?P<id>\d+) (?P<body>.*)$")


def _tables(hlo_text: str) -> dict[str, dict[int, str]]:
    tables: dict[str, dict[int, str]] = {}
    current = None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
            continue
        m = _TABLE_ROW.match(line) if current is not None else None
        if m:
            current[int(m.group("id"))] = m.group("body")
        elif line.strip() == "" and current:
            current = None
    return tables


def source_lines(hlo_text: str) -> dict[int, str]:
    """stack_frame_id -> `file:line function` of the frame (from the HLO text's stack tables)."""
    t = _tables(hlo_text)
    files, funcs = t.get("FileNames", {}), t.get("FunctionNames", {})
    out = {}
    for fid, body in t.get("StackFrames", {}).items():
        loc_id = int(re.search(r"file_location_id=(\d+)", body).group(1))
        loc = t.get("FileLocations", {}).get(loc_id, "")
        m = re.search(r"file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", loc)
        if not m:
            continue
        file = files.get(int(m.group(1)), "?").strip('"')
        file = file.split("anatomy_r1_jax/", 1)[-1] if "anatomy_r1_jax/" in file else file.rsplit("/", 1)[-1]
        out[fid] = f"{file}:{m.group(3)} {funcs.get(int(m.group(2)), '?').strip(chr(34))}"
    return out


def op_names(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (source line, op_name metadata), from compiled HLO text."""
    frames = source_lines(hlo_text)
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            frame = frames.get(int(m.group("frame"))) if m.group("frame") else None
            out.setdefault(m.group("name"), (frame or "?", m.group("op")))
    return out


def busy_time(fn: Callable[[], Any], *, reps: int = 1) -> dict[str, tuple[float, int]]:
    """{event name: (total seconds, count)} over the XLA threads while running fn() reps times
    (call fn once before, so compilation is not traced)."""
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(reps):
                jax.block_until_ready(fn())
        data = ProfileData.from_file(glob.glob(d + "/**/*.xplane.pb", recursive=True)[0])
    totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for plane in data.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for event in line.events:
                if event.name.startswith(_SKIP):
                    continue
                totals[event.name][0] += event.duration_ns * 1e-9
                totals[event.name][1] += 1
    return {k: (v[0], v[1]) for k, v in totals.items()}


def top_ops(fn: Callable[[], Any], hlo_text: str, *, reps: int = 1, top: int = 15,
            by: str = "source") -> list[tuple[str, float, float, int]]:
    """[(label, seconds per call, share of busy time, events per call)] of the costliest groups:
    by "source" line, by "op" (source line + whether forward / backward + primitive), or by HLO
    "instruction"."""
    names = op_names(hlo_text)
    busy = busy_time(fn, reps=reps)
    total = sum(t for t, _ in busy.values()) or 1.0
    merged: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for name, (t, n) in busy.items():
        source, op = names.get(name, ("?", name))
        if by == "source":
            label = source
        elif by == "op":
            label = f"{source} [{'bwd' if 'transpose(' in op else 'fwd'}] {op.rsplit('/', 1)[-1]}"
        else:
            label = f"{name}: {source} {op}"
        merged[label][0] += t
        merged[label][1] += n
    rows = sorted(merged.items(), key=lambda kv: -kv[1][0])[:top]
    return [(label, t / reps, t / total, n // reps) for label, (t, n) in rows]


def markdown(rows: list[tuple[str, float, float, int]]) -> str:
    """A table of `top_ops` rows."""
    from anatomy_r1_jax.perf.report import markdown_table

    return markdown_table(["source line (or instruction)", "busy ms per call", "share of busy time", "events"],
                          [[f"`{label}`", t * 1e3, f"{share * 100:.1f}%", n] for label, t, share, n in rows])
