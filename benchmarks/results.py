"""Writing benchmark tables into benchmarks/RESULTS.md, one section per script, with the machine."""

from __future__ import annotations

import argparse
import platform
import re
from datetime import date
from pathlib import Path

import torch
import torchvision

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}; torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"Python {platform.python_version()}, {torch.get_num_threads()} threads; measured {date.today()}")


def write_section(name: str, body: str) -> None:
    """Replace (or add) the section ``name`` of RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nFigures measured by the scripts in this folder.\n"
    section = f"<!-- {name} -->\n## {name}\n\nMachine: {machine()}\n\n{body}\n<!-- /{name} -->"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else f"{text.rstrip()}\n\n{section}\n"
    RESULTS.write_text(text)


def timing_arguments(description: str, repeats: int = 30) -> argparse.Namespace:
    """Parse ``--repeats``, ``--threads`` (default 1, applied to torch) and ``--no-write``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args
