"""Explanations on canonized models: the supplement's LRP composites (Table A.1) with zennit.

Needs the ``xai`` extra (``pip install "fxcanon[xai]"``, zennit >= 0.5.1).

    relevance, output = attribute(model, x, target, composite="epsilon_plus")

Composites recognise fxcanon's modules: fused layers are ordinary ``nn.Conv2d``/``nn.Linear``
subclasses and get their base type's rule, ``Sum`` gets the norm rule like zennit's own ``Sum``,
``Gate`` (squeeze-excitation) sends all relevance to the signal ("signal-takes-all") and
``ThresholdReLU`` passes relevance only where its gate is on (:class:`GatedPass`).

A fused layer's bias map is its bias at each output position; every rule treats it as it treats
a vector bias (:class:`BiasMapMod`): ``zero_params=["bias"]`` zeroes all of it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from .canonicalize import canonicalize
from .modules import Gate, Sum, ThresholdReLU
from .passes import PRESETS, STRUCTURAL_PASSES
from .report import REPORT_KEY

try:
    from zennit.composites import LayerMapComposite, SpecialFirstLayerMapComposite
    from zennit.core import BasicHook, Composite, Hook, ParamMod, zero_wrap
    from zennit.layer import Sum as ZennitSum
    from zennit.rules import AlphaBeta, Epsilon, Norm, Pass, ZBox, ZPlus
    from zennit.types import Activation, AvgPool, BatchNorm, Convolution, Linear
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError('fxcanon.xai needs zennit: pip install "fxcanon[xai]"') from error

# Every parameter that makes up a fused layer's bias (vector and position-dependent parts); rules see
# all of it as ``bias`` (BiasMapMod).
BIAS_PARAMETERS = ["bias", "bias_kernel", "pad_kernel"]
_MAP_PARAMETERS = ("bias_kernel", "pad_kernel")
COMPOSITES = ("eb", "epsilon_plus", "alpha2_beta1", "rn_custom", "epsilon")
# "rule": a bias map is the layer's bias under every rule; "outside": rules leave it out (the paper's code)
BIAS_MAP_MODES = ("rule", "outside")
INITS = ("onehot", "logit")


class SignalTakesAll(Hook):
    """LRP for ``Gate(signal, gate)``: the output's relevance goes to the signal, none to the gate."""

    def backward(self, module: nn.Module, grad_input: tuple[Tensor, ...], grad_output: tuple[Tensor, ...]
                 ) -> tuple[Tensor, ...]:
        return (grad_output[0], *(torch.zeros_like(g) if g is not None else None for g in grad_input[1:]))

    def copy(self) -> SignalTakesAll:
        return SignalTakesAll()


class GatedPass(Hook):
    """LRP for :class:`~fxcanon.modules.ThresholdReLU`: relevance passes where the gate is on, else it is absorbed.

    ``ReLU(s * x + t) = s * h(x) + t'``: where the gate is off, ``h`` is the constant ``-t/s`` and
    does not depend on ``x``, so relevance reaching it belongs to the constant, like relevance
    reaching a bias, not to the input. Where the gate is on, ``h`` is the identity and relevance
    passes unchanged. (A plain pass rule would send the off units' relevance to inputs they
    ignore.) The paper's threshold activation behaves the same way.
    """

    def forward(self, module: ThresholdReLU, input: tuple[Tensor, ...], output: Tensor) -> None:
        x, shape = input[0], (-1,) + (1,) * (input[0].dim() - 2)
        sign = module.sign.to(x.dtype).reshape(shape)
        self.stored_tensors["gate"] = sign * x > sign * module.threshold.to(x.dtype).reshape(shape)

    def backward(self, module: nn.Module, grad_input: tuple[Tensor, ...], grad_output: tuple[Tensor, ...]
                 ) -> tuple[Tensor, ...]:
        return (grad_output[0] * self.stored_tensors["gate"],)


def _has_bias_map(module: nn.Module) -> bool:
    return any(getattr(module, name, None) is not None for name in _MAP_PARAMETERS)


@contextmanager
def _without(module: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """``module`` with the Parameters ``names`` set to None for a while."""
    stored = {name: getattr(module, name) for name in names}
    try:
        for name in stored:
            setattr(module, name, None)
        yield
    finally:
        for name, value in stored.items():
            setattr(module, name, value)


class _MappedForward:
    """What a rule's pass sees of a fused layer: the layer without its bias, plus the pass's whole bias."""

    def __init__(self, module: nn.Module, mod: ParamMod, in_rule: bool) -> None:
        self.module: Any = module  # a fused convolution (bias_map, kernel_size)
        self.mod, self.in_rule = mod, in_rule

    def bias(self, x: Tensor) -> Tensor:
        """``bias + bias_map(x)``, modified as the pass modifies a parameter named ``bias``."""
        with torch.no_grad():
            bias = self.module.bias_map(x)
            if self.module.bias is not None:
                bias = bias + self.module.bias.to(bias.dtype).reshape((-1,) + (1,) * len(self.module.kernel_size))
        keys = self.mod.param_keys
        if keys is not None and "bias" not in keys:
            return bias
        return zero_wrap(self.mod.zero_params or [])(self.mod.modifier)(bias, "bias")

    def forward(self, x: Tensor) -> Tensor:
        if not self.in_rule:
            with _without(self.module, _MAP_PARAMETERS), self.mod(self.module) as modified:
                return modified.forward(x)
        bias = self.bias(x)
        with _without(self.module, ("bias", *_MAP_PARAMETERS)), self.mod(self.module) as modified:
            return modified.forward(x) + bias


class BiasMapMod(ParamMod):
    """A rule's parameter modifier that treats a fused layer's bias map as the position-dependent bias it is.

    In each of the rule's passes the layer computes ``conv(x, mod(W)) + mod(b + B)``, where ``B`` is
    the bias map and ``mod`` what the pass does to a parameter named ``bias``: the whole bias for
    epsilon and gamma, at each output position its positive part in ZPlus/alpha-beta's positive
    terms and its negative part in their negative terms, as for a vector bias. Interior positions
    therefore get exactly what an unpadded fold with the vector bias ``b + sum(W t)`` gets, and no
    negative part of the map enters a positive sum (clamping the kernel taps instead would).
    ``in_rule=False`` leaves the map out of every pass (what the paper's forward hook amounts to).
    """

    def __init__(self, inner: ParamMod, in_rule: bool = True) -> None:
        super().__init__(inner.modifier, inner.param_keys, inner.zero_params, inner.require_params)
        self.inner, self.in_rule = inner, in_rule

    @contextmanager
    def __call__(self, module: nn.Module) -> Iterator[Any]:
        if not _has_bias_map(module):
            with self.inner(module) as modified:
                yield modified
        else:
            yield _MappedForward(module, self.inner, self.in_rule)


def with_bias_maps(rule: Hook, bias_map: str = "rule") -> Hook:
    """``rule`` (changed in place) with its parameter modifiers wrapped in :class:`BiasMapMod`."""
    if bias_map not in BIAS_MAP_MODES:
        raise ValueError(f"bias_map must be one of {', '.join(BIAS_MAP_MODES)}, not {bias_map!r}")
    if isinstance(rule, BasicHook):
        rule.param_modifiers = [m if isinstance(m, BiasMapMod) else BiasMapMod(ParamMod.ensure(m), bias_map == "rule")
                                for m in rule.param_modifiers]
    return rule


def _fxcanon_map(stabilizer: float) -> list[tuple[Any, Hook]]:
    return [(Sum, Norm(stabilizer=stabilizer)), (Gate, SignalTakesAll()), (ThresholdReLU, GatedPass())]


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
    bias_map: str = "rule",
) -> Composite:
    """A composite of Table A.1 by name; parameters default to the supplement's values.

    ``"eb"`` Excitation Backprop as zennit's ``ExcitationBackprop``: alpha1-beta0 (ZPlus) on every
    linear-like layer and no rule on activations and BatchNorms (their gradient flows, e.g. SiLU's);
    ``"epsilon_plus"``: ZPlus on convolutions, epsilon on fully connected layers;
    ``"alpha2_beta1"``: alpha-beta on convolutions, epsilon on fully connected layers;
    ``"rn_custom"`` (Relation Networks): ZBox on the first convolution (``low``/``high``: the
    input domain), ZPlus on the other convolutions and the fully connected layers;
    ``"epsilon"``: epsilon everywhere (with ``zero_params=["bias"]``: conservative).
    All but ``"eb"`` pass relevance through activations and BatchNorms unchanged. Sums and average
    pooling get the norm rule. ``bias_map`` (see :class:`BiasMapMod`): ``"rule"`` treats a fused
    layer's bias map as its bias in every rule, ``"outside"`` leaves it out of the rules (the paper's code).
    """
    kwargs = {"zero_params": list(zero_params) if zero_params is not None else None}
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
    structural = [(ZennitSum, Norm(stabilizer=stabilizer)), (AvgPool, Norm(stabilizer=stabilizer))]
    passive = [] if name == "eb" else [(Activation, Pass()), (BatchNorm, Pass())]
    layer_map = [(kind, with_bias_maps(rule, bias_map))
                 for kind, rule in _fxcanon_map(stabilizer) + structural + passive + rules[name]]
    if name == "rn_custom":
        if low is None or high is None:
            raise ValueError("the rn_custom composite needs the input domain: low= and high=")
        first = [(Convolution, with_bias_maps(ZBox(low=low, high=high, stabilizer=stabilizer, **kwargs), bias_map))]
        return SpecialFirstLayerMapComposite(layer_map=layer_map, first_map=first, canonizers=canonizers)
    return LayerMapComposite(layer_map=layer_map, canonizers=canonizers)


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
    preset: str | None = None,
    **composite_kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """Relevance of the first input for ``target`` (class index, per batch or one for all) and the output.

    ``model`` is canonized on the way (a copy: the caller's model is untouched) unless it already
    is or ``canonize=False`` (the model as it is); ``canonize="structural"`` runs only the
    structural passes (explicit sums, gates, pooling; BatchNorms kept, with the composite's
    BatchNorm rule): the paper's "not canonized" baseline. Further inputs (a Relation Network's
    question) are passed along. ``init`` seeds the explained output: ``"onehot"`` (1 at the
    target, the paper's choice) or ``"logit"`` (the target's logit). For ``"rn_custom"`` without
    ``low``/``high`` the bounds are the first input's minimum and maximum.

    ``preset="paper"`` reproduces Pahde et al.'s explanations: their canonical form
    (``canonicalize(..., preset="paper")``: DenseNet thresh-first) and their bias-map treatment
    (``bias_map="outside"``), with the one-hot seed. The defaults fold for speed where the form is
    a choice and treat bias maps as biases (see README, "Explanations").
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, not {init!r}")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if preset == "paper":
        if init != "onehot":
            raise ValueError("preset='paper' seeds with init='onehot'")
        composite_kwargs.setdefault("bias_map", "outside")
    inputs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    if canonize == "structural":
        model = canonicalize(model, inputs, passes=STRUCTURAL_PASSES)
    elif canonize and not is_canonized(model):
        model = canonicalize(model, inputs, preset=preset)
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
