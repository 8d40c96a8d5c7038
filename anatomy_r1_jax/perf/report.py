"""Markdown output: tables and the machine line that goes with every result."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from typing import Any, Sequence


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    """CPU, cores, memory, load average and library versions, for the record."""
    import jax

    parts = [f"{cpu_model()}, {os.cpu_count()} cores"]
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        parts.append(f"{pages * size / 2**30:.0f} GiB RAM")
    except (ValueError, OSError):
        pass
    parts.append("load average at start {:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg()))
    versions = [f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} devices)"]
    for name in ("flax", "torch", "transformers"):
        module = sys.modules.get(name)
        if module is not None:
            versions.append(f"{name} {module.__version__}")
    return "; ".join(parts) + "; " + ", ".join(versions)


def command_line() -> str:
    env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in ("XLA_FLAGS",) if k in os.environ)
    cmd = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    return f"{env + ' ' if env else ''}python {cmd}"


def comparison_parser(description: str, case_help: str):
    """The side-by-side benchmarks' command line: repeatable --case, --reps, --profile N and
    --torch-threads (parse, then `apply_torch_threads`)."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", help=case_help + " (repeatable)")
    parser.add_argument("--reps", type=int, default=5, help="interleaved timed runs per side")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also print the N source lines where ours spends most time")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    return parser


def apply_torch_threads(args) -> None:
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
