"""``torch.compile(model, backend="fxcanon")``: the same folds inside Dynamo graphs, never stale.

Dynamo hands a backend a graph whose parameters and buffers are *inputs* (one compiled graph
serves every instance of a module class), with convolutions and BatchNorms as functional calls.
The backend therefore folds on the graph itself: :class:`fxcanon.folders.GraphFolder` emits the
fold math (scale, shift, fused weights, bias maps) as computations of those inputs, so the
result is right for whatever weights arrive, after ``load_state_dict`` or in-place updates too.
Bias maps are computed from the input's runtime size. Training-mode BatchNorms are untouched.

``options={"inner": "eager" | "inductor" | callable}`` picks what compiles the rewritten graph
(default eager); inductor with ``torch._inductor.config.freezing`` constant-folds the fold math.
Eval graphs with ``dynamic=True`` are folded too (``eps`` then arrives as a graph input).

Fold cache (eager inner compiler only; ``options={"cache": False}`` turns it off). Without one,
every call recomputes the fused weights of the whole model, which at batch 1 costs more than the
BatchNorms it saves. Keying on identities and version counters is cheap but goes stale: edits
through ``tensor.data``, ``vector_to_parameters`` and the running statistics a training-mode call
updates move no version counter. The cache therefore keeps a copy of the tensors each fold read
and reuses the fold only while they are equal by value (:class:`fxcanon.folders.CachedFold`):
never stale, at the price of one comparison pass over the folded parameters per call and a
second copy of them in memory. Measured (``benchmarks/RESULTS.md``, "backend fold cache"): at
batch 1 and 224x224 the cache costs +10-15% against plain eager where recomputing costs +45-66%;
at batch 64 both beat plain eager. Folds are not cached while autograd records them. Bias maps
are computed every call, as in the fused layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.fx import GraphModule
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .canonicalize import run_passes
from .folders import GraphFolder
from .passes import FoldBatchNormBackward, FoldBatchNormForward, FoldBatchNormThroughReLU
from .report import REPORT_KEY, Report
from .shapes import VALUE_KEY


def _record_shapes(gm: GraphModule) -> None:
    """``tensor_meta`` (and small values) from the example values Dynamo recorded on each node."""
    for node in gm.graph.nodes:
        value = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(value, torch.Tensor):  # symbolic sizes too: ranks prove channel axes
            node.meta["tensor_meta"] = _extract_tensor_metadata(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            node.meta[VALUE_KEY] = value


def fold_graph(gm: GraphModule, cache: bool = False) -> GraphModule:
    """Rewrite a Dynamo graph in place: every eval-mode BatchNorm folded as graph computations.

    ``cache``: memoize the fold computations on their parameters' versions (for eager execution).
    """
    _record_shapes(gm)
    report, folder = Report(), GraphFolder(cache)
    passes = [p(report, folder=folder) for p in (FoldBatchNormForward, FoldBatchNormBackward,
                                                  FoldBatchNormThroughReLU)]
    gm = run_passes(gm, passes)
    gm.meta[REPORT_KEY] = report
    return gm


def fxcanon_backend(gm: GraphModule, example_inputs: Sequence[Any],
                    options: dict[str, Any] | None = None, **_: Any) -> Callable[..., Any]:
    """The ``torch.compile`` backend: fold, then compile with ``options["inner"]``."""
    options = options or {}
    inner = options.get("inner", "eager")
    folded = fold_graph(gm, cache=options.get("cache", inner == "eager"))
    if inner == "eager":
        return folded.forward
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        compiled: Callable[..., Any] = compile_fx(folded, list(example_inputs))  # type: ignore[assignment]
        return compiled
    if callable(inner):
        return inner(folded, example_inputs)
    raise ValueError(f"options['inner'] must be 'eager', 'inductor' or a callable, not {inner!r}")


def register() -> None:
    """Make ``backend="fxcanon"`` known to Dynamo when no installed entry point provides it."""
    from importlib.metadata import entry_points

    if "fxcanon" in entry_points(group="torch_dynamo_backends").names:
        return
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if "fxcanon" not in _COMPILER_FNS:
        register_backend(compiler_fn=fxcanon_backend, name="fxcanon")
