"""Explanations on canonized models: the supplement's LRP composites (Table A.1) with zennit.

Needs the ``xai`` extra (``pip install "fxcanon[xai]"``, zennit >= 0.5.1).

    relevance, output = attribute(model, x, target, composite="epsilon_plus")

Composites recognise fxcanon's modules: fused layers are ordinary ``nn.Conv2d``/``nn.Linear``
subclasses and get their base type's rule, ``ThresholdReLU`` is an ``nn.ReLU`` (pass rule),
``Sum`` gets the norm rule like zennit's own ``Sum``, and ``Gate`` (squeeze-excitation) sends
all relevance to the signal ("signal-takes-all"). Rules that zero biases zero the bias map too:
pass ``zero_params=BIAS_PARAMETERS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from .canonicalize import canonicalize
from .modules import Gate, Sum
from .passes import STRUCTURAL_PASSES
from .report import REPORT_KEY

try:
    from zennit.composites import LayerMapComposite, SpecialFirstLayerMapComposite, layer_map_base
    from zennit.core import Composite, Hook
    from zennit.rules import AlphaBeta, Epsilon, Norm, ZBox, ZPlus
    from zennit.types import Convolution, Linear
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError('fxcanon.xai needs zennit: pip install "fxcanon[xai]"') from error

# Every parameter that makes up a fused layer's bias (vector and position-dependent parts).
BIAS_PARAMETERS = ["bias", "bias_kernel", "pad_kernel"]
COMPOSITES = ("eb", "epsilon_plus", "alpha2_beta1", "rn_custom", "epsilon")


class SignalTakesAll(Hook):
    """LRP for ``Gate(signal, gate)``: the output's relevance goes to the signal, none to the gate."""

    def backward(self, module: nn.Module, grad_input: tuple[Tensor, ...], grad_output: tuple[Tensor, ...]
                 ) -> tuple[Tensor, ...]:
        return (grad_output[0], *(torch.zeros_like(g) if g is not None else None for g in grad_input[1:]))

    def copy(self) -> SignalTakesAll:
        return SignalTakesAll()


def _fxcanon_map(stabilizer: float) -> list[tuple[Any, Hook]]:
    return [(Sum, Norm(stabilizer=stabilizer)), (Gate, SignalTakesAll())]


def lrp_composite(
    name: str,
    *,
    epsilon: float = 1e-6,
    stabilizer: float = 1e-6,
    alpha: float = 2.0,
    beta: float = 1.0,
    low: Tensor | float | None = None,
    high: Tensor | float | None = None,
    zero_params: Sequence[str] | None = None,
    canonizers: list[Any] | None = None,
) -> Composite:
    """A composite of Table A.1 by name; parameters default to the supplement's values.

    ``"eb"`` Excitation Backprop: alpha1-beta0 (ZPlus) on every linear-like layer;
    ``"epsilon_plus"``: ZPlus on convolutions, epsilon on fully connected layers;
    ``"alpha2_beta1"``: alpha-beta on convolutions, epsilon on fully connected layers;
    ``"rn_custom"`` (Relation Networks): ZBox on the first convolution (``low``/``high``: the
    input domain), ZPlus on the other convolutions and the fully connected layers;
    ``"epsilon"``: epsilon everywhere (with ``zero_params=BIAS_PARAMETERS``: conservative).
    """
    kwargs = {"zero_params": list(zero_params) if zero_params is not None else None}
    base = _fxcanon_map(stabilizer) + layer_map_base(stabilizer)
    rules: dict[str, list[tuple[Any, Hook]]] = {
        "eb": [(Linear, ZPlus(stabilizer=stabilizer, **kwargs))],
        "epsilon_plus": [(Convolution, ZPlus(stabilizer=stabilizer, **kwargs)),
                         (nn.Linear, Epsilon(epsilon=epsilon, **kwargs))],
        "alpha2_beta1": [(Convolution, AlphaBeta(alpha=alpha, beta=beta, stabilizer=stabilizer, **kwargs)),
                         (nn.Linear, Epsilon(epsilon=epsilon, **kwargs))],
        "rn_custom": [(Linear, ZPlus(stabilizer=stabilizer, **kwargs))],
        "epsilon": [(Linear, Epsilon(epsilon=epsilon, **kwargs))],
    }
    if name not in rules:
        raise ValueError(f"unknown composite {name!r}; choose from {', '.join(COMPOSITES)}")
    if name == "rn_custom":
        if low is None or high is None:
            raise ValueError("the rn_custom composite needs the input domain: low= and high=")
        first = [(Convolution, ZBox(low=low, high=high, stabilizer=stabilizer, **kwargs))]
        return SpecialFirstLayerMapComposite(layer_map=base + rules[name], first_map=first, canonizers=canonizers)
    return LayerMapComposite(layer_map=base + rules[name], canonizers=canonizers)


def is_canonized(model: nn.Module) -> bool:
    return isinstance(model, GraphModule) and REPORT_KEY in model.meta


def attribute(
    model: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    target: int | Tensor,
    composite: str | Composite = "epsilon_plus",
    canonize: bool | str = True,
    *,
    init: str = "onehot",
    **composite_kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """Relevance of the first input for ``target`` (class index, per batch or one for all) and the output.

    ``model`` is canonized on the way (a copy: the caller's model is untouched) unless it already
    is or ``canonize=False`` (the model as it is); ``canonize="structural"`` runs only the
    structural passes (explicit sums, gates, pooling; BatchNorms kept): the paper's "not
    canonized" baseline. Further inputs (a Relation Network's question) are passed along.
    ``init`` seeds the explained output: ``"onehot"`` (1 at the target, the paper's choice) or
    ``"logit"`` (the target's logit). For ``"rn_custom"`` without ``low``/``high`` the bounds are
    the first input's minimum and maximum.
    """
    if init not in ("onehot", "logit"):
        raise ValueError(f"init must be 'onehot' or 'logit', not {init!r}")
    inputs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    if canonize == "structural":
        model = canonicalize(model, inputs, passes=STRUCTURAL_PASSES)
    elif canonize and not is_canonized(model):
        model = canonicalize(model, inputs)
    if isinstance(composite, str):
        if composite == "rn_custom":
            composite_kwargs.setdefault("low", torch.full_like(inputs[0], float(inputs[0].min())))
            composite_kwargs.setdefault("high", torch.full_like(inputs[0], float(inputs[0].max())))
        composite = lrp_composite(composite, **composite_kwargs)
    x = inputs[0].detach().requires_grad_(True)
    with composite.context(model) as modified:
        output = modified(x, *inputs[1:])
        index = torch.as_tensor(target, device=output.device).reshape(-1, 1).expand(output.shape[0], 1)
        selected = torch.zeros_like(output).scatter(1, index, 1.0)
        if init == "logit":
            selected = selected * output
        (relevance,) = torch.autograd.grad(output, x, grad_outputs=selected.detach())
    return relevance, output.detach()
