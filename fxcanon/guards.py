"""Call-time checks for folds that hold only for some input ranks or sizes.

``Linear -> BatchNorm1d`` folds exactly only at rank 2: at rank 3 ``BatchNorm1d`` normalizes dim 1,
not the Linear's feature axis. Where the analysis cannot exclude such inputs, the canonized
graph checks the condition (a ``torch._assert``, which ``torch.compile`` and ``torch.export``
keep) and raises a clear error instead of returning a different result.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from .affine import Guard
from .views import shape_holds


def insert_guard(gm: GraphModule, value: Node, guard: Guard, before: Node, folded: str,
                 kind: str = "BatchNorm") -> None:
    """Check ``guard`` on ``value`` right before ``before``; the error names ``folded`` (a ``kind``)."""
    message = (f"fxcanon: {kind} {folded!r} was folded for inputs with {guard.describe()}; this input "
               "differs: call the original model, or canonicalize for inputs like this one")
    with gm.graph.inserting_before(before):
        holds = gm.graph.call_function(shape_holds, (value, guard.rank, guard.sizes))
        gm.graph.call_function(torch._assert, (holds, message))
