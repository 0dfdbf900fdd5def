"""Cost of the evaluation (``fxcanon.evaluate``) and of the search, per image, on 64x64 inputs and one thread.

Splits the time into explanations (zennit LRP through ``explain_fn``), model forwards that Quantus
asks for, and Quantus' own work (perturbing, sorting, normalizing, similarities), per metric.

    python benchmarks/bench_evaluate.py [--images 8]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections import defaultdict

import torch
from results import write_section
from torch import nn

from fxcanon.datasets import shapes
from fxcanon.equivalence import randomize_batchnorms
from fxcanon.evaluate import evaluate, explain_fn, prepare
from fxcanon.metrics import _quantus
from fxcanon.models.small import small_vgg
from fxcanon.search import search

TARGETS = {"paper": 1.5, "fast": 0.3, "search": 0.5}


class Clock:
    """Seconds spent in explanations, in model forwards outside explanations, and per Quantus metric."""

    def __init__(self) -> None:
        self.explain = self.forward = 0.0
        self.metrics: dict[str, float] = defaultdict(float)
        self.explaining = False

    def timed_explain(self, *args, **kwargs):
        start, self.explaining = time.perf_counter(), True
        try:
            return explain_fn(*args, **kwargs)
        finally:
            self.explaining = False
            self.explain += time.perf_counter() - start


class TimedForward(nn.Module):
    def __init__(self, model: nn.Module, clock: Clock) -> None:
        super().__init__()
        self.model, self.clock = model, clock
        self.train(False)

    def forward(self, *inputs):
        if self.clock.explaining:
            return self.model(*inputs)
        start = time.perf_counter()
        out = self.model(*inputs)
        self.clock.forward += time.perf_counter() - start
        return out


@contextlib.contextmanager
def metric_clock(clock: Clock):
    """Time every Quantus metric call, by class."""
    quantus = _quantus()
    classes = [quantus.Sparseness, quantus.FaithfulnessCorrelation, quantus.PixelFlipping, quantus.RelevanceMassAccuracy,
               quantus.RelevanceRankAccuracy, quantus.RandomLogit, quantus.AvgSensitivity, quantus.MaxSensitivity]
    originals = {c: c.__call__ for c in classes}

    def wrap(cls, original):
        def call(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                clock.metrics[cls.__name__] += time.perf_counter() - start
        return call

    for c, original in originals.items():
        c.__call__ = wrap(c, original)
    try:
        yield
    finally:
        for c, original in originals.items():
            c.__call__ = original


def measure(kind: str, models: dict, data, composite: str) -> tuple[float, Clock, int]:
    """Seconds per image and per (configuration, canonized or not), the split, and that count."""
    clock = Clock()
    timed = {k: TimedForward(m, clock) for k, m in models.items()}
    explain = clock.timed_explain
    start = time.perf_counter()
    with metric_clock(clock):
        if kind == "search":
            result = search(timed, data, grid=(0.0, 1.0), progress=False, batch_size=len(data),
                            explain=explain)
            units = len(result.configurations) * 2 * len(data)
        else:
            evaluate(timed, data, [composite], kind, progress=False, batch_size=len(data), explain=explain)
            units = 2 * len(data)
    return (time.perf_counter() - start) / units, clock, units


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--note", default="", help="a sentence for RESULTS.md, e.g. that the CPU was shared")
    args = parser.parse_args()
    torch.set_num_threads(1)
    _quantus()
    torch.manual_seed(0)
    model = randomize_batchnorms(small_vgg(4), 0).eval()
    data = shapes(args.images, seed=1)
    models = prepare(model, (data.x[:2],))
    evaluate(models, data[:1], ["eb"], "fast", progress=False)  # warm-up
    rows = [("| run | s per image | target | explanations (zennit via explain_fn) | model forwards | "
             "Quantus' own | slowest metrics (total s per image) |"), "|---|---|---|---|---|---|---|"]
    for kind, composite in (("paper", "epsilon_plus"), ("paper", "eb"), ("fast", "epsilon_plus"),
                            ("search", "gamma")):
        per_image, clock, units = measure(kind, models, data, composite)
        total = per_image * units
        own = sum(clock.metrics.values()) - clock.explain - clock.forward
        top = sorted(clock.metrics.items(), key=lambda kv: -kv[1])[:3]
        label = f"{kind} preset, {composite}" if kind != "search" else "search (fast preset, LRP-gamma per group)"
        rows.append(f"| {label} | {per_image:.3f} | {TARGETS[kind]} | {clock.explain / units:.3f} "
                    f"({100 * clock.explain / total:.0f}%) | {clock.forward / units:.3f} "
                    f"({100 * clock.forward / total:.0f}%) | {own / units:.3f} ({100 * own / total:.0f}%) | "
                    + ", ".join(f"{name} {t / units:.3f}" for name, t in top) + " |")
        print(rows[-1], flush=True)
    body = (f"Small VGG (BatchNorm, 4 convolutions, 78k parameters, random weights) on {args.images} generated "
            "64x64 shapes images, one thread, explanations in batches of all images. Seconds per image and per "
            "(composite or configuration, canonized or not); 'Quantus' own' is the time inside Quantus' metric "
            "calls minus explanations and model forwards. "
            f"`python benchmarks/bench_evaluate.py`. {args.note}\n\n" + "\n".join(rows))
    write_section("Evaluation and search", body)


if __name__ == "__main__":
    main()
