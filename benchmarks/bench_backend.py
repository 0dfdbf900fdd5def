"""torch.compile with backend="fxcanon" against eager and the default inductor backend.

    python benchmarks/bench_backend.py [--models resnet50 densenet121] [--repeats 10] [--no-write]
    python benchmarks/bench_backend.py --fold-cache [--threads 1] [--repeats 20]

CPU, fixed thread count, batch 1 and 8; compile time is the first call's time minus the
steady-state latency (inductor's on-disk caches persist between runs and shorten it). Writes the table to benchmarks/RESULTS.md, section "backend".

``--fold-cache`` compares the inner eager compiler with its value-validated fold cache, without
a cache, and plain eager, at batch 1 (two input sizes) and 64; the variants run interleaved call by
call (medians), for a shared machine. Writes section "backend fold cache".
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

import fxcanon  # noqa: E402,F401  (registers the backend)
from fxcanon.zoo import build  # noqa: E402

VARIANTS = {
    "eager": None,
    "fxcanon (inner eager)": dict(backend="fxcanon"),
    "inductor": dict(backend="inductor"),
    "fxcanon + inductor": dict(backend="fxcanon", options={"inner": "inductor"}),
    "inductor, freezing": dict(backend="inductor", freezing=True),
    "fxcanon + inductor, freezing": dict(backend="fxcanon", options={"inner": "inductor"}, freezing=True),
}


def measure(model, x, spec, repeats):
    torch._dynamo.reset()
    spec = dict(spec or {})
    torch._inductor.config.freezing = spec.pop("freezing", False)
    fn = torch.compile(model, **spec) if spec else model
    with torch.inference_mode():
        start = time.perf_counter()
        fn(x)
        first = time.perf_counter() - start
        fn(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
    return first, statistics.median(times)


FOLD_CACHE_VARIANTS = {
    "eager": None,
    "fxcanon, value-validated cache": {"cache": True},
    "fxcanon, no cache": {"cache": False},
}


FOLD_CACHE_INPUTS = ((1, 224), (1, 64), (64, 224))  # (batch, side)


def fold_cache_rows(name: str, batch: int, size: int, repeats: int) -> list[str]:
    """Median latency of each variant, timed round by round on copies of one model."""
    model = build(name)
    x = torch.randn(batch, 3, size, size)
    torch._dynamo.reset()
    fns = {label: copy.deepcopy(model) if options is None else
           torch.compile(copy.deepcopy(model), backend="fxcanon", options=options)
           for label, options in FOLD_CACHE_VARIANTS.items()}
    times: dict[str, list[float]] = {label: [] for label in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn(x)
            fn(x)
        for _ in range(repeats):
            for label, fn in fns.items():
                start = time.perf_counter()
                fn(x)
                times[label].append(time.perf_counter() - start)
    base = statistics.median(times["eager"])
    return [f"| {name} | {batch} | {size} | {label} | {1000 * statistics.median(t):.1f} | "
            f"{statistics.median(t) / base - 1:+.1%} |" for label, t in times.items()]


def fold_cache_table(models: list[str], repeats: int, threads: int) -> str:
    lines = ["| model | batch | input side | variant | latency ms | vs eager |", "|---|---|---|---|---|---|"]
    for name in models:
        for batch, size in FOLD_CACHE_INPUTS:
            print(f"[fold cache] {name} batch {batch} side {size}", file=sys.stderr, flush=True)
            lines += fold_cache_rows(name, batch, size, repeats if batch == 1 else max(3, repeats // 4))
    return (f"### Inner eager: fold cache or none, CPU, {threads} thread(s), median of {repeats} "
            f"(batch 64: {max(3, repeats // 4)}) "
            "interleaved rounds\n\nOther processes shared the CPU while this ran; the variants alternate call by "
            "call so that load hits them alike.\n\n" + "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["resnet50", "densenet121"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fold-cache", action="store_true", help="only the fold cache comparison")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.fold_cache:
        text = fold_cache_table(args.models, args.repeats, args.threads)
        print(text)
        if not args.no_write:
            write_section("backend fold cache", text)
        return
    lines = ["| model | batch | variant | latency ms | compile s |", "|---|---|---|---|---|"]
    for name in args.models:
        model = build(name)
        for batch in (1, 8):
            x = torch.randn(batch, 3, args.size, args.size)
            for label, spec in VARIANTS.items():
                print(f"[backend] {name} batch {batch} {label}", file=sys.stderr, flush=True)
                first, latency = measure(model, x, spec, args.repeats)
                compile_s = "-" if spec is None else f"{max(0.0, first - latency):.1f}"
                lines.append(f"| {name} | {batch} | {label} | {1000 * latency:.1f} | {compile_s} |")
    text = (f"### torch.compile backends, CPU, {args.threads} threads, {args.size}x{args.size}, "
            f"median of {args.repeats}\n\nCompile s: first call minus steady-state latency; inductor's "
            "on-disk caches persist between runs and shorten it.\n\n" + "\n".join(lines))
    print(text)
    if not args.no_write:
        write_section("backend", text)


if __name__ == "__main__":
    main()
