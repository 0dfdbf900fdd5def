"""Norm sources, declared as data: one :class:`NormKind` per kind of normalization that folds.

A source is a normalization that, with running statistics, is the per-channel affine map
``s * x + t`` (``s = gamma / sqrt(var + eps)``, ``t = beta - s * mean``, A.3-A.4): folded into a
neighbouring linear layer, nothing of it remains. A kind declares its module types with the input
ranks each accepts, its functional spellings (arguments in order, defaults, the element of a tuple
result that is the normalized tensor) and the flag, with its polarity, that makes it normalize
with statistics of its input instead. Every kind normalizes dim 1 at the ranks it declares (the
axis the analysis in ``fxcanon.affine`` follows). Adding a kind is one declaration and its tests;
:func:`register_norm` adds a user's module type to a kind.

An :class:`AffineTailKind` (LayerNorm, GroupNorm) normalizes with statistics of its input, which
no fold removes; only its affine tail folds, by the opt-in pass ``FoldNormAffine``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .report import NO_RUNNING_STATISTICS, PER_SAMPLE_STATISTICS, Refusal


@dataclass(frozen=True)
class NormSpelling:
    """A functional spelling: argument names by position, defaults of omitted arguments, and the
    index of the normalized tensor when the call returns a tuple (its other elements must be unused)."""

    args: tuple[str, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    output: int | None = None


@dataclass(frozen=True)
class NormKind:
    """A kind of normalization source (see the module docstring).

    ``flag`` is the argument whose value ``flag_selects`` makes a call normalize with statistics of
    its input; ``flag_is_training`` says whether that is the kind's training mode (which raises
    unless training is allowed) rather than its ordinary behaviour (left: ``without_statistics``).
    ``tracks(module)`` says whether an eval-mode module uses its running statistics.
    """

    name: str
    modules: dict[type, tuple[int, ...] | None]  # module type -> input ranks it accepts (None: any >= 2)
    functions: Mapping[Callable[..., Any], NormSpelling]
    flag: str
    flag_selects: bool
    flag_is_training: bool
    tracks: Callable[[nn.Module], bool]
    without_statistics: Refusal  # why a call without running statistics stays


_BATCH_NORM_ARGS = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")

BATCH_NORM = NormKind(
    name="BatchNorm",
    modules={nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,), nn.SyncBatchNorm: None},
    functions={
        F.batch_norm: NormSpelling(("input", "running_mean", "running_var", "weight", "bias", "training",
                                    "momentum", "eps"), {"training": False, "eps": 1e-5}),
        torch.batch_norm: NormSpelling((*_BATCH_NORM_ARGS, "cudnn_enabled")),
        torch.native_batch_norm: NormSpelling(_BATCH_NORM_ARGS, output=0),
        torch._native_batch_norm_legit_no_training: NormSpelling(
            ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps"), {"training": False},
            output=0),
    },
    flag="training", flag_selects=True, flag_is_training=True,
    tracks=lambda module: True,  # an eval-mode BatchNorm uses running statistics whenever it has them
    without_statistics=Refusal(NO_RUNNING_STATISTICS,
                               "track_running_stats=False: normalizes with batch statistics even in eval mode"),
)

# The module accepts unbatched inputs too (rank N + 1), normalizing dim 0 there: the channel axis of
# a ConvNd at that rank, so folds between InstanceNormNd and ConvNd stay exact; the analysis
# follows the batched rank declared here.
INSTANCE_NORM = NormKind(
    name="InstanceNorm",
    modules={nn.InstanceNorm1d: (3,), nn.InstanceNorm2d: (4,), nn.InstanceNorm3d: (5,)},
    functions={
        F.instance_norm: NormSpelling(("input", "running_mean", "running_var", "weight", "bias", "use_input_stats",
                                       "momentum", "eps"), {"use_input_stats": True, "eps": 1e-5}),
        torch.instance_norm: NormSpelling(("input", "weight", "bias", "running_mean", "running_var",
                                           "use_input_stats", "momentum", "eps", "cudnn_enabled")),
    },
    flag="use_input_stats", flag_selects=True, flag_is_training=False,
    tracks=lambda module: bool(module.track_running_stats),
    without_statistics=Refusal(PER_SAMPLE_STATISTICS, "normalizes with the statistics of each sample "
                               "(track_running_stats=False or use_input_stats=True): not a fixed affine map"),
)

NORM_KINDS: tuple[NormKind, ...] = (BATCH_NORM, INSTANCE_NORM)


def module_kind(module: nn.Module) -> NormKind | None:
    """The kind of a norm module read as a source (its exact type is declared or registered), else None."""
    return next((kind for kind in NORM_KINDS if type(module) in kind.modules), None)


def function_kind(target: Any) -> tuple[NormKind, NormSpelling] | None:
    """The kind and spelling of a functional norm, else None."""
    for kind in NORM_KINDS:
        if target in kind.functions:
            return kind, kind.functions[target]
    return None


def register_norm(cls: type[nn.Module], like: type[nn.Module] = nn.BatchNorm2d) -> type[nn.Module]:
    """Fold modules of type ``cls`` as ``like`` (a declared norm module type, e.g. ``nn.BatchNorm2d``).

    For a user's subclass kept as a leaf by a custom tracer, or a module of the user's with the
    same ``running_mean``, ``running_var``, ``weight``, ``bias``, ``eps`` and ``training``
    semantics; the fold replaces its call entirely (its own ``forward`` is not run). Returns ``cls``.
    """
    for kind in NORM_KINDS:
        if like in kind.modules:
            kind.modules[cls] = kind.modules[like]
            return cls
    raise ValueError(f"{like.__name__} is not a norm module type fxcanon folds")


@dataclass(frozen=True)
class AffineTailKind:
    """A norm that normalizes with statistics of its input, then applies ``g * n + b`` per feature
    along ``axis``: the statistics stay, the affine tail can fold into the next layer.

    ``modules`` maps each module type to its remainder: a new module that normalizes alike without
    the affine tail. Only tails with one weight per feature of ``axis`` fold.
    """

    name: str
    modules: Mapping[type, Callable[[Any], nn.Module]]
    functions: Mapping[Callable[..., Any], NormSpelling]
    axis: int  # -1: the last dim (LayerNorm over one dim); 1: the channels (GroupNorm)


LAYER_NORM = AffineTailKind(
    name="LayerNorm",
    modules={nn.LayerNorm: lambda m: nn.LayerNorm(m.normalized_shape, eps=m.eps, elementwise_affine=False)},
    functions={F.layer_norm: NormSpelling(("input", "normalized_shape", "weight", "bias", "eps"), {"eps": 1e-5})},
    axis=-1,
)
GROUP_NORM = AffineTailKind(
    name="GroupNorm",
    modules={nn.GroupNorm: lambda m: nn.GroupNorm(m.num_groups, m.num_channels, eps=m.eps, affine=False)},
    functions={F.group_norm: NormSpelling(("input", "num_groups", "weight", "bias", "eps"), {"eps": 1e-5})},
    axis=1,
)
AFFINE_TAIL_KINDS: tuple[AffineTailKind, ...] = (LAYER_NORM, GROUP_NORM)
