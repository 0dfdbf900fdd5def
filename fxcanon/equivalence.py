"""Checking that a canonized model computes the original function.

Errors are measured against a float64 run of the *original* model: a canonized float64 model
should agree to ~1e-12; in lower precision the canonized model's error should be about the
original model's own error in that precision.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from .canonicalize import canonicalize

Inputs = Sequence[Any]


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm of ``model`` random statistics and affine parameters (in place).

    Models built with ``weights=None`` have mean 0, var 1, gamma 1, beta 0: folding them would
    change nothing and prove nothing.
    """
    generator = torch.Generator().manual_seed(seed)

    def uniform(t: Tensor | None, low: float, high: float) -> None:
        assert t is not None
        t.copy_(torch.rand(t.shape, generator=generator, dtype=torch.float64) * (high - low) + low)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                uniform(module.running_mean, -0.5, 0.5)
                uniform(module.running_var, 0.5, 2.0)
                if module.affine:
                    uniform(module.weight, 0.5, 1.5)
                    uniform(module.bias, -0.5, 0.5)
    return model


def _outputs(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for v in value for t in _outputs(v)]


def relative_error(output: Any, reference: Any) -> float:
    """``max |output - reference| / max |reference|`` over all output tensors, in float64."""
    error, scale = 0.0, 0.0
    for out, ref in zip(_outputs(output), _outputs(reference), strict=True):
        error = max(error, (out.double() - ref.double()).abs().max().item())
        scale = max(scale, ref.double().abs().max().item())
    return error / max(scale, torch.finfo(torch.float64).tiny)


def cast_inputs(inputs: Inputs, dtype: torch.dtype) -> tuple[Any, ...]:
    """Floating-point tensors of ``inputs`` in ``dtype``; everything else unchanged."""
    return tuple(x.to(dtype) if isinstance(x, Tensor) and x.is_floating_point() else x for x in inputs)


@dataclass(frozen=True)
class Equivalence:
    """Relative errors against the original model run in float64 (max over all checked inputs)."""

    float64: float  # canonized float64 model
    low_precision: float  # canonized model in ``dtype``
    baseline: float  # original model in ``dtype``
    dtype: torch.dtype

    def holds(self, float64_tolerance: float = 1e-10, factor: float = 2.0, floor: float | None = None) -> bool:
        """float64 error within tolerance and low-precision error at most ``factor`` x the original's."""
        floor = 4 * torch.finfo(self.dtype).eps if floor is None else floor
        return self.float64 <= float64_tolerance and self.low_precision <= factor * self.baseline + floor


def check_equivalence(
    model: nn.Module,
    example_inputs: Inputs,
    check_inputs: Sequence[Inputs] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    canonize: Callable[[nn.Module, Inputs], GraphModule] | None = None,
) -> Equivalence:
    """Canonize ``model`` (a copy in float64 and a copy in ``dtype``) and compare outputs.

    ``canonize(model, example_inputs)`` defaults to :func:`canonicalize`; ``check_inputs`` (default:
    the example inputs) are the input tuples the canonized models are evaluated on, e.g. several
    resolutions. The caller's model is not changed.
    """
    canonize = canonize or (lambda m, x: canonicalize(m, x))
    checks = [tuple(example_inputs)] if check_inputs is None else [tuple(c) for c in check_inputs]
    reference = copy.deepcopy(model).double().eval()
    low = copy.deepcopy(model).to(dtype).eval()
    canon64 = canonize(reference, cast_inputs(example_inputs, torch.float64))
    canon_low = canonize(low, cast_inputs(example_inputs, dtype))
    e64 = e_low = e_base = 0.0
    with torch.no_grad():
        for inputs in checks:
            x64, x_low = cast_inputs(inputs, torch.float64), cast_inputs(inputs, dtype)
            expected = reference(*x64)
            e64 = max(e64, relative_error(canon64(*x64), expected))
            e_low = max(e_low, relative_error(canon_low(*x_low), expected))
            e_base = max(e_base, relative_error(low(*x_low), expected))
    return Equivalence(e64, e_low, e_base, dtype)
