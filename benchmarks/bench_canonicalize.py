"""Canonicalize vs torch.fx's fuse: time, BatchNorms left, peak memory, inference latency.

    OMP_NUM_THREADS=1 python benchmarks/bench_canonicalize.py --threads 1   # the full table
    python benchmarks/bench_canonicalize.py --models resnet18 --repeats 5 --latency-models --no-write

Prints Markdown tables and (unless --no-write) writes them to benchmarks/RESULTS.md, section
"canonicalize", with the machine and versions. Canonicalization time compares, in interleaved
rounds (one call of each per round, so that other load on the machine hits them alike):
``symbolic_trace(model)`` alone; ``canonicalize(symbolic_trace(model))`` without example inputs,
the trace included; the same with one example input; and ``torch.fx.experimental.optimization.fuse(model)``,
which deep-copies and traces the model itself. Every call is timed with the garbage collector
paused after a collection (as ``timeit`` times), so that no call pays for another's garbage.
Inference latency compares the unfused model, ``fuse``, fxcanon with and without explicit sums,
gates and pooling modules (the LRP form), and the lower bound: the same model with every BatchNorm
replaced by identity (not equivalent to the model, only the speed a perfect fold can reach).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.fx import symbolic_trace
from torch.fx.experimental.optimization import fuse

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # this checkout's fxcanon
from results import write_section  # noqa: E402

from fxcanon import canonicalize  # noqa: E402
from fxcanon.passes import FOLD_PASSES  # noqa: E402
from fxcanon.zoo import ZOO, build, count_batchnorms, example_inputs  # noqa: E402

LATENCY_MODELS = ["resnet18", "resnet50", "vgg16_bn", "densenet121", "efficientnet_b0", "mobilenet_v2"]


def seconds(fn: Callable[[], object]) -> float:
    """One call's time, with the garbage collector paused (as ``timeit`` does) after a collection:
    a full collection of this process takes about 0.2 s and lands on whichever call trips it."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        gc.enable()


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function over ``repeats`` rounds that call every function once, in turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            times[label].append(seconds(fn))
    return {label: statistics.median(values) for label, values in times.items()}


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(seconds(fn) for _ in range(repeats))


def without_batchnorm(model: nn.Module) -> nn.Module:
    """The lower bound: every BatchNorm module replaced by identity."""
    bound = copy.deepcopy(model)
    for name, module in list(bound.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            parent, _, child = name.rpartition(".")
            setattr(bound.get_submodule(parent) if parent else bound, child, nn.Identity())
    return bound


def peak_memory_mib(name: str, method: str) -> float:
    """Peak resident memory added by one canonicalization (or fuse), in a fresh process.

    The peak (VmHWM) is reset after the model is built (``/proc/self/clear_refs``), so the figure
    is the high-water mark of the call minus the resident size before it.
    """
    code = f"""
import re, torch
from torch.fx.experimental.optimization import fuse
from fxcanon import canonicalize
from fxcanon.zoo import build
def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
model = build({name!r})
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
out = canonicalize(model) if {method!r} == "fxcanon" else fuse(model)
print((status("VmHWM") - before) / 1024)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip())


def canonicalize_row(name: str, repeats: int, size: int) -> dict[str, object]:
    model = build(name)
    x = example_inputs(model, name, size)
    row: dict[str, object] = {"model": name, "BN": count_batchnorms(symbolic_trace(model))}
    row.update(interleaved_medians({
        "trace s": lambda: symbolic_trace(model),
        "fxcanon s": lambda: canonicalize(symbolic_trace(model)),
        "fxcanon+inputs s": lambda: canonicalize(symbolic_trace(model), x),
        "fuse s": lambda: fuse(model),
    }, repeats))
    row["fxcanon / fuse"] = row["fxcanon s"] / row["fuse s"]
    row["BN left: fuse"] = count_batchnorms(symbolic_trace(fuse(model)))
    row["BN left: fxcanon"] = count_batchnorms(canonicalize(model))
    row["BN left: fxcanon+inputs"] = count_batchnorms(canonicalize(model, x))
    row["peak MiB: fuse"] = peak_memory_mib(name, "fuse")
    row["peak MiB: fxcanon"] = peak_memory_mib(name, "fxcanon")
    return row


def latency_row(name: str, batch: int, size: int, repeats: int) -> dict[str, object]:
    model = build(name)
    x = torch.randn(batch, 3, size, size)
    variants = {
        "original": model,
        "fx fuse": fuse(model),
        "fxcanon": canonicalize(model, (x,), passes=FOLD_PASSES),
        "fxcanon LRP form": canonicalize(model, (x,)),
        "no-BN bound": without_batchnorm(model),
    }
    row: dict[str, object] = {"model": name, "batch": batch}
    with torch.inference_mode():
        for label, variant in variants.items():
            row[f"{label} ms"] = 1000 * median_seconds(lambda v=variant: v(x), repeats)
    row["fxcanon vs bound"] = row["fxcanon ms"] / row["no-BN bound ms"] - 1
    return row


def markdown(rows: list[dict[str, object]]) -> str:
    keys = list(rows[0])

    def cell(key: str, value: object) -> str:
        if "vs bound" in key:
            return f"{value:+.1%}"
        if key == "fxcanon / fuse":
            return f"{value:.2f}"
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(k, r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=sorted(ZOO))
    parser.add_argument("--latency-models", nargs="*", default=LATENCY_MODELS)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--json", type=Path, help="also dump the raw rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sections = []
    rows = []
    for i, name in enumerate(args.models, 1):
        print(f"[canonicalize {i}/{len(args.models)}] {name}", file=sys.stderr, flush=True)
        rows.append(canonicalize_row(name, args.repeats, args.size))
    if rows:
        sections.append((f"Canonicalize time (median of {args.repeats} interleaved rounds, seconds), BatchNorms left, "
                         f"peak extra memory; fxcanon: canonicalize(symbolic_trace(model)), the trace included, "
                         f"without example inputs (as fuse) and with one {args.size}x{args.size} example (+inputs)",
                         rows))
    latency = []
    for name in args.latency_models:
        for batch in (1, 8):
            print(f"[latency] {name} batch {batch}", file=sys.stderr, flush=True)
            latency.append(latency_row(name, batch, args.size, args.repeats))
    if latency:
        sections.append((f"Inference latency, CPU, {args.threads} threads, {args.size}x{args.size}, "
                         f"median of {args.repeats}", latency))
    text = "\n\n".join(f"### {title}\n\n{markdown(r)}" for title, r in sections)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(sections, indent=2, default=str))
    if not args.no_write:
        write_section("canonicalize", text)


if __name__ == "__main__":
    main()
