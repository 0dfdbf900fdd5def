"""Command line: canonize models, check them, print what happened.

    python -m fxcanon resnet50                 # torchvision model, random weights, no download
    python -m fxcanon resnet18 densenet121 --size 128 --json
    python -m fxcanon mypackage.models:build   # your own model factory
    python -m fxcanon explain resnet18 --composite epsilon_plus --out fig.png   # heatmaps (fxcanon[xai])
    python -m fxcanon evaluate vgg --data shapes --out results/   # Quantus scores, canonized or not (fxcanon[eval])
    python -m fxcanon search vgg --data shapes --out results/     # LRP-gamma per layer group (fxcanon[eval])
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import torch
from torch import nn

from . import passes as passes_module
from .canonicalize import canonicalize, trace
from .equivalence import check_equivalence
from .report import (BACKWARD_BIAS_MAP, BACKWARD_VECTOR, FORWARD, IDENTITY_BRANCH, PER_SAMPLE_STATISTICS,
                     PRECOMPUTED, THRESHOLD, THROUGH_LAYOUT, get_report)
from .zoo import build, count_batchnorms, example_inputs

RULE_COLUMNS = {FORWARD: "fwd", BACKWARD_VECTOR: "bwd vec", BACKWARD_BIAS_MAP: "bwd map",
                THROUGH_LAYOUT: "layout", THRESHOLD: "thresh", IDENTITY_BRANCH: "branch", PRECOMPUTED: "precomp"}


class UsageError(Exception):
    """Bad command-line input: reported as one line on stderr, exit status 2."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are :class:`UsageError` (one line, no usage dump)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def load_model(name: str, seed: int = 0) -> nn.Module:
    """:func:`fxcanon.zoo.build`; a :class:`UsageError` for unknown names and for factories that fail."""
    try:
        return build(name, seed)
    except Exception as error:
        if ":" in name:
            raise UsageError(f"model {name!r} could not be built: {type(error).__name__}: {error}") from error
        if isinstance(error, ValueError) and str(error).startswith("Unknown model"):
            raise UsageError(f"unknown model {name!r}: give a torchvision model name or package.module:callable") \
                from error
        raise


def run_one(name: str, size: int, batch: int, lrp_form: bool, check: bool, seed: int) -> dict[str, Any]:
    """Build, trace, canonicalize and check one model; a JSON-ready summary."""
    model = load_model(name, seed)
    inputs = example_inputs(model, name, size, batch)
    selected = passes_module.DEFAULT_PASSES if lrp_form else passes_module.FOLD_PASSES
    start = time.perf_counter()
    traced = trace(model)
    traced_s = time.perf_counter() - start
    start = time.perf_counter()
    gm = canonicalize(traced, inputs, passes=selected)
    canon_s = time.perf_counter() - start
    report = get_report(gm)
    counts = report.rule_counts()
    summary: dict[str, Any] = {
        "model": name, "input": [list(x.shape) for x in inputs],
        "batchnorms_before": count_batchnorms(traced), "batchnorms_after": count_batchnorms(gm),
        "folds": {rule: counts.get(rule, 0) for rule in RULE_COLUMNS},
        "left": {e.batchnorm: e.left_reason for e in report.left if not e.refused(PER_SAMPLE_STATISTICS)},
        "kept": {e.batchnorm: e.left_reason for e in report.left if e.refused(PER_SAMPLE_STATISTICS)},
        "trace_s": traced_s, "canonicalize_s": canon_s,
    }
    if check:
        result = check_equivalence(model, inputs, canonize=lambda m, x: canonicalize(m, x, passes=selected))
        summary.update(error_float64=result.float64, error_float32=result.low_precision,
                       error_float32_original=result.baseline, equivalent=result.holds())
    return summary


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ["model", "BN before", "after", *RULE_COLUMNS.values(), "err f64", "err f32 (orig)", "trace s",
              "canon s"]
    lines = [header]
    for r in rows:
        errors = ["-", "-"]
        if "error_float64" in r:
            errors = [f"{r['error_float64']:.1e}", f"{r['error_float32']:.1e} ({r['error_float32_original']:.1e})"]
        lines.append([r["model"], str(r["batchnorms_before"]), str(r["batchnorms_after"]),
                      *(str(r["folds"][rule]) for rule in RULE_COLUMNS), *errors,
                      f"{r['trace_s']:.2f}", f"{r['canonicalize_s']:.2f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
            for line in lines]
    text.insert(1, "-" * len(text[0]))
    for r in rows:
        for batchnorm, reason in r["left"].items():
            text.append(f"{r['model']}: {batchnorm} left: {reason}")
        for norm, reason in r["kept"].items():
            text.append(f"{r['model']}: {norm} kept (not a BatchNorm): {reason}")
    return "\n".join(text)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; bad input is one line on stderr and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["explain"]:
            from .explain import main as explain

            return explain(argv[1:])
        if argv[:1] == ["evaluate"]:
            from .evaluate import main as evaluate

            return evaluate(argv[1:])
        if argv[:1] == ["search"]:
            from .search import main as search

            return search(argv[1:])
        return canonize_main(argv)
    except UsageError as error:
        prog = f"fxcanon {argv[0]}" if argv[:1] in (["explain"], ["evaluate"], ["search"]) else "fxcanon"
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2


def canonize_main(argv: Sequence[str]) -> int:
    parser = Parser(prog="fxcanon", description="Canonize models: fold every BatchNorm exactly.")
    parser.add_argument("models", nargs="+", help="torchvision model names, or package.module:callable")
    parser.add_argument("--size", type=positive, default=224, help="input height and width (default 224)")
    parser.add_argument("--batch", type=positive, default=1)
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and BatchNorm statistics")
    parser.add_argument("--fold-only", action="store_true",
                        help="only fold: no explicit sums, gates and pooling modules")
    parser.add_argument("--no-check", action="store_true", help="skip the float64/float32 equivalence check")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--threads", type=positive, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for i, name in enumerate(args.models, 1):
        print(f"[{i}/{len(args.models)}] {name} ...", file=sys.stderr, flush=True)
        rows.append(run_one(name, args.size, args.batch, not args.fold_only, not args.no_check, args.seed))
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0 if all(r.get("equivalent", True) and r["batchnorms_after"] == 0 and not r["left"] for r in rows) else 1
