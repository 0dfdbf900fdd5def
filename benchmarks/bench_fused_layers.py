"""Fused layers: what a bias map computed on every forward costs, and the threshold activation.

    python benchmarks/bench_fused_layers.py [--repeats 30] [--threads 1] [--no-write]

Each row times, interleaved call by call (the machine may be shared: medians of many rounds),
a plain convolution, the fused layer with a bias map (``conv(x, W) + b + conv(P(1), K)``, the map
computed every forward on one input channel), the map alone, the map as the response of an
all-ones input with every channel (the former way), and the BatchNorm + convolution it replaces;
then ``nn.ReLU`` against :class:`fxcanon.modules.ThresholdReLU`. Writes section "fused layers"
of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import timing_arguments, write_section  # noqa: E402

from fxcanon import canonicalize  # noqa: E402
from fxcanon.equivalence import randomize_batchnorms  # noqa: E402
from fxcanon.modules import ThresholdReLU  # noqa: E402

# (label, in, out, kernel, stride, padding, input side)
LAYERS = [
    ("stem 3->64 7x7 s2 pad 3", 3, 64, 7, 2, 3, 224),
    ("64->64 3x3 pad 1", 64, 64, 3, 1, 1, 56),
    ("64->64 3x3 pad 1", 64, 64, 3, 1, 1, 112),
    ("256->256 3x3 pad 1", 256, 256, 3, 1, 1, 14),
]


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Milliseconds per call of each function, timed round by round so that load spikes hit all alike;
    the order rotates every round (no function always runs right after another)."""
    labels = list(fns)
    times: dict[str, list[float]] = {label: [] for label in fns}
    for fn in fns.values():
        fn()
    for round_ in range(repeats):
        for label in labels[round_ % len(labels):] + labels[:round_ % len(labels)]:
            start = time.perf_counter()
            fns[label]()
            times[label].append(1000 * (time.perf_counter() - start))
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {label: statistics.median(t) for label, t in times.items()}


def bias_map_row(label: str, c_in: int, c_out: int, kernel: int, stride: int, padding: int, side: int,
                 repeats: int) -> dict[str, object]:
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding)
    bn_conv = randomize_batchnorms(nn.Sequential(nn.BatchNorm2d(c_in), conv)).eval()
    layer = next(m for m in canonicalize(bn_conv).modules() if getattr(m, "has_bias_map", False))
    x = torch.randn(1, c_in, side, side)
    ones = torch.ones(1, c_in, side, side)
    fns = {
        "plain conv": lambda: conv(x),
        "fused conv with bias map": lambda: layer(x),
        "bias map alone": lambda: layer.bias_map(x),
        "all-ones response": lambda: F.conv2d(ones, layer.bias_kernel, None, stride, padding),
        "BN + conv": lambda: bn_conv(x),
    }
    with torch.inference_mode():
        times = interleaved_times(fns, repeats)
    ratios = [f / p for f, p in zip(times["fused conv with bias map"], times["plain conv"])]
    return {"layer": f"{label}, {side}x{side}", **{f"{k} ms": v for k, v in medians(times).items()},
            "overhead": statistics.median(ratios) - 1}


def threshold_row(channels: int, side: int, repeats: int) -> dict[str, object]:
    x = torch.randn(1, channels, side, side)
    sign = torch.ones(channels)
    sign[::3] = -1.0
    threshold = ThresholdReLU(torch.randn(channels), sign)
    fns = {"ReLU": lambda: torch.relu(x), "ThresholdReLU": lambda: threshold(x)}
    with torch.inference_mode():
        ms = medians(interleaved_times(fns, repeats))
    return {"input": f"1x{channels}x{side}x{side}", **{f"{k} ms": v for k, v in ms.items()}}


def markdown(rows: list[dict[str, object]]) -> str:
    keys = list(rows[0])

    def cell(key: str, value: object) -> str:
        if key == "overhead":
            return f"{value:+.1%}"
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(cell(k, r[k]) for k in keys) + " |" for r in rows])


def main() -> None:
    args = timing_arguments(__doc__.splitlines()[0])
    bias_rows = [bias_map_row(*layer, repeats=args.repeats) for layer in LAYERS]
    threshold_rows = [threshold_row(c, s, args.repeats) for c, s in ((64, 112), (256, 28))]
    text = (f"CPU, {args.threads} thread(s), batch 1, median of {args.repeats} interleaved rounds; other "
            "processes shared the CPU while this ran. Overhead: median over rounds of fused / plain.\n\n"
            "### Bias map computed every forward (ms)\n\n" + markdown(bias_rows)
            + "\n\n### Threshold activation, branch-free (ms)\n\n" + markdown(threshold_rows))
    print(text)
    if not args.no_write:
        write_section("fused layers", text)


if __name__ == "__main__":
    main()
