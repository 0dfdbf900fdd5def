"""What the call-time guards of a canonized model cost at inference.

    python benchmarks/bench_guards.py [--repeats 30] [--threads 1] [--no-write]

Where a fold holds only for some input ranks (a functional BatchNorm folded into a convolution:
timm's norm-act layers), the canonized graph checks the rank on every call
(:mod:`fxcanon.guards`). Each row times, call by call in rotating order, the canonized model with its
guards and the same graph with the guards removed, and the original model. Writes section
"guards" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import copy
import sys
import timeit
from pathlib import Path

import timm
import torch
from torch.fx import GraphModule, symbolic_trace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fused_layers import interleaved_times, medians  # noqa: E402
from results import timing_arguments, write_section  # noqa: E402

from fxcanon import canonicalize  # noqa: E402
from fxcanon.equivalence import randomize_batchnorms  # noqa: E402
from fxcanon.views import shape_holds  # noqa: E402

MODELS = ["efficientnet_b0", "mobilenetv3_small_100"]


def guard_count(gm: GraphModule) -> int:
    return sum(node.target is torch._assert for node in gm.graph.nodes)


def without_guards(gm: GraphModule) -> GraphModule:
    """A copy of ``gm`` with every ``torch._assert(shape_holds(...))`` pair removed."""
    stripped = GraphModule(gm, copy.deepcopy(gm.graph))
    for node in list(stripped.graph.nodes):
        if node.target is torch._assert:
            holds = node.args[0]
            stripped.graph.erase_node(node)
            if isinstance(holds, torch.fx.Node) and holds.target is shape_holds and not holds.users:
                stripped.graph.erase_node(holds)
    stripped.recompile()
    return stripped


def main() -> None:
    args = timing_arguments(__doc__.splitlines()[0])
    rows = ["| model (timm) | input | guards | original (ms) | canonized, guards (ms) | canonized, no guards (ms) "
            "| guards cost |", "|---|---|---|---|---|---|---|"]
    counts: dict[str, int] = {}
    shares: list[float] = []
    for name in MODELS:
        model = randomize_batchnorms(timm.create_model(name, pretrained=False)).eval()
        guarded = canonicalize(symbolic_trace(model))
        plain = without_guards(guarded)
        counts[name] = guard_count(guarded)
        for batch, side in ((1, 224), (8, 224), (64, 32)):
            x = torch.randn(batch, 3, side, side)
            with torch.no_grad():
                torch.testing.assert_close(guarded(x), plain(x), rtol=0, atol=0)
                times = medians(interleaved_times({"original": lambda: model(x), "guards": lambda: guarded(x),
                                                   "none": lambda: plain(x)}, args.repeats))
            cost = times["guards"] - times["none"]
            shares.append(100 * cost / times["none"])
            rows.append(f"| {name} | {batch}x3x{side}x{side} | {guard_count(guarded)} | {times['original']:.2f} | "
                        f"{times['guards']:.2f} | {times['none']:.2f} | {cost:+.2f} ms "
                        f"({100 * cost / times['none']:+.1f}%) |")
            print(rows[-1], flush=True)
    x = torch.randn(1, 32, 112, 112)
    one = min(timeit.repeat(lambda: torch._assert(shape_holds(x, 4, ()), "fxcanon"), number=10000, repeat=5)) / 10000
    body = (f"### Eager CPU latency, {args.threads} thread(s), median of {args.repeats} interleaved rounds\n\n"
            + "\n".join(rows) + "\n\nGuards are rank checks (`torch._assert(shape_holds(x, 4, ()))`) before each "
            "convolution that absorbed a functional BatchNorm (timm's `BatchNormAct2d`). One check alone costs "
            f"{one * 1e6:.2f} us here, so {MODELS[0]}'s guards add about "
            f"{one * 1e3 * counts[MODELS[0]]:.3f} ms "
            f"per call, far below the table's differences (from {min(shares):+.1f}% to {max(shares):+.1f}% in this "
            "run), which are this shared machine's run-to-run noise.")
    if not args.no_write:
        write_section("guards", body)


if __name__ == "__main__":
    main()
