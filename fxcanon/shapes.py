"""Recorded and symbolic shapes.

``record_shapes`` runs the model once and annotates every node with its shape (``tensor_meta``)
and small non-tensor results (``VALUE_KEY``). Without example inputs, ``record_hint_shapes``
makes inputs from how the graph uses its placeholders (the first layer a placeholder reaches gives
its rank and channels, an Embedding makes it an index tensor) at the first side length of
``HINT_SIZES`` the model accepts. ``seeded_shapes`` records, for a while, the shapes of what one
node feeds from a value of that node alone (no model run).

``SymbolicCone`` runs what one node feeds on fake tensors whose sizes are symbols
(``torch.fx.experimental.symbolic_shapes``): the node's value with every size free but its channel
axis, other tensors it meets with every size free (Tensors of the model itself keep theirs), the
output of a resampling op with free spatial sizes (its float size rule would fix them all).
Flatten and adaptive average pooling to a size given in full take their size rules instead of
running (tensors known by their sizes alone become fake tensors where another op reads them). A
size of a node there either has free symbols (it *varies* with the input sizes) or is a constant,
possibly only under the conditions the run had to assume (an Embedding's batch is the image's
because ``cat`` needs it). A feature map proven with the varying sizes held apart from the
constant ones holds at every size the model accepts (``fxcanon.affine``), provided no op on the
way routes features differently under a condition the run assumed (``squeeze`` of a size that is
not 1 at the hint: refused there).
"""

from __future__ import annotations

import functools
import itertools
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
from torch.fx.node import map_arg
from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata

from .errors import CanonizationError
from .views import batchnorm_view, bind_args, call_input, get_attr_value, linear_view, reads_only_metadata, submodule

RESAMPLE_FUNCTIONS = {F.interpolate, F.upsample}
RESAMPLE_MODULES = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
VALUE_KEY = "fxcanon_value"  # non-tensor results recorded by shape propagation
HINTED_KEY = "fxcanon_hinted"  # gm.meta: inputs were made for it once (True if they ran)
# side lengths tried for spatial axes when no example inputs are given, the cheapest first (the
# Relation Network with unpadded convolutions accepts only 127 and 128; Inception needs 75 or more)
HINT_SIZES = (32, 64, 128, 127, 224, 299)
_HINT_BATCH, _HINT_LENGTH = 2, 8


def _small_value(result: Any) -> bool:
    return isinstance(result, (int, float, bool, torch.Size)) or (
        isinstance(result, (tuple, list)) and all(isinstance(r, (int, float, bool)) for r in result))


class _ShapeRecorder(ShapeProp):
    """ShapeProp that also keeps small non-tensor results (sizes, ints) for the affine analysis."""

    def run_node(self, n: Any) -> Any:
        result = super().run_node(n)
        if _small_value(result):
            n.meta[VALUE_KEY] = result
        return result


def record_shapes(gm: GraphModule, example_inputs: Sequence[Any]) -> None:
    """Annotate every node with its shape (``tensor_meta``) by running ``gm`` once without grad;
    buffers the run changes (training-mode statistics) are put back."""
    buffers = {name: buffer.clone() for name, buffer in gm.named_buffers()}
    try:
        with torch.no_grad():
            _ShapeRecorder(gm).propagate(*example_inputs)
    except Exception as error:
        raise CanonizationError(f"running the model on example_inputs failed: {error}") from error
    finally:
        with torch.no_grad():
            for name, buffer in gm.named_buffers():
                if name in buffers and not torch.equal(buffer, buffers[name]):
                    buffer.copy_(buffers[name])


def run_call(gm: GraphModule, node: Node, args: Any, kwargs: Any) -> Any:
    """What ``torch.fx.Interpreter`` computes for a call node on these arguments (without building
    an interpreter: its set-up walks the whole module and graph)."""
    if node.op == "call_function":
        return node.target(*args, **kwargs)  # type: ignore[operator]
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    if node.op == "call_module":
        return submodule(gm, str(node.target))(*args, **kwargs)
    raise CanonizationError(f"{node.name}: {node.op} is not a call")


@contextmanager
def seeded_shapes(gm: GraphModule, start: Node, seed: Tensor, cone: set[Node]) -> Iterator[bool]:
    """Shapes (and small values) of ``start`` taken as ``seed`` and of the nodes of ``cone`` it
    feeds, with what reads their metadata, recorded while the context lasts (then put back).

    Yields False where a node of ``cone`` reads a tensor from outside it (its shape is unknown
    here) or fails on the seed: the shapes recorded are then not to be used."""
    saved: dict[Node, dict[str, Any]] = {}
    env: dict[Node, Any] = {start: seed}

    def annotate(node: Node, result: Any) -> None:
        saved[node] = {key: node.meta.pop(key) for key in ("tensor_meta", VALUE_KEY) if key in node.meta}
        if isinstance(result, Tensor):
            node.meta["tensor_meta"] = _extract_tensor_metadata(result)
        elif _small_value(result):
            node.meta[VALUE_KEY] = result

    def run() -> bool:
        annotate(start, seed)
        node = start.next
        while node.op != "root":  # graphs are in topological order
            args = node.all_input_nodes
            in_cone = node in cone
            if node.op != "output" and any(arg in env for arg in args) and \
                    (in_cone or all(reads_only_metadata(node, arg) for arg in args if arg in cone)):
                if not all(arg in env or arg.op == "get_attr" for arg in args):
                    if in_cone:
                        return False
                else:
                    for arg in args:
                        if arg not in env:
                            env[arg] = get_attr_value(gm, str(arg.target))
                            annotate(arg, env[arg])
                    call_args, kwargs = map_arg((node.args, node.kwargs), env.__getitem__)
                    try:
                        env[node] = run_call(gm, node, call_args, kwargs)
                    except Exception:
                        if in_cone:
                            return False
                    else:
                        annotate(node, env[node])
            node = node.next
        return True

    try:
        with torch.no_grad():
            done = run()
        yield done
    finally:
        for node, meta in saved.items():
            node.meta.pop("tensor_meta", None)
            node.meta.pop(VALUE_KEY, None)
            node.meta.update(meta)


def _placeholder_spec(gm: GraphModule, placeholder: Node) -> tuple[int, int, Tensor] | None:
    """(rank, channels, a tensor of the layer's dtype and device) of a placeholder from the first
    layer it reaches through single-input ops (channels -1: an index tensor for an Embedding)."""
    frontier, seen = [placeholder], set()
    while frontier:
        node = frontier.pop(0)
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            module = submodule(gm, str(user.target)) if user.op == "call_module" else None
            if isinstance(module, nn.Embedding) and user.args and user.args[0] is node:
                return 2, -1, module.weight.new_empty(0, dtype=torch.long)
            view = linear_view(gm, user)
            if view is not None and view.input is node:
                rank = view.batched_rank if view.spatial_dims else 2
                return rank, view.in_channels, view.weight
            bn = batchnorm_view(gm, user)
            if bn is not None and bn.input is node and bn.accepted_ranks:
                return bn.accepted_ranks[0], bn.num_features, next(t for t in (bn.running_mean, bn.weight)
                                                                   if t is not None)
            if len(user.all_input_nodes) == 1:
                frontier.append(user)
    return None


def record_hint_shapes(gm: GraphModule) -> bool:
    """Record shapes at inputs made from how the graph uses its placeholders (once per graph);
    True if shapes are recorded."""
    if HINTED_KEY in gm.meta:
        return gm.meta[HINTED_KEY]
    gm.meta[HINTED_KEY] = False
    found = [_placeholder_spec(gm, n) for n in gm.graph.nodes if n.op == "placeholder"]
    specs = [spec for spec in found if spec is not None]
    if not specs or len(specs) != len(found):
        return False
    for side in HINT_SIZES:
        inputs = [like.new_zeros(_HINT_BATCH, _HINT_LENGTH) if channels < 0 else
                  like.new_zeros(_HINT_BATCH, channels, *([side] * (rank - 2))) for rank, channels, like in specs]
        try:
            record_shapes(gm, inputs)
        except CanonizationError:
            continue
        gm.meta[HINTED_KEY] = True
        return True
    return False


_ADAPTIVE_AVERAGE_FUNCTIONS = {F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3}
_ADAPTIVE_AVERAGE_MODULES: dict[type, int] = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}


SizeRule = Callable[[tuple[Any, ...]], tuple[Any, ...] | None]  # None: the op itself is run


def _adaptive_output(gm: GraphModule, node: Node) -> SizeRule | None:
    """The size rule of an adaptive average pooling whose output size is given in full: its
    trailing sizes are that size whatever the input's; else None."""
    if node.op == "call_module":
        module = submodule(gm, str(node.target))
        dims, size = _ADAPTIVE_AVERAGE_MODULES.get(type(module), 0), getattr(module, "output_size", None)
    elif node.op == "call_function" and node.target in _ADAPTIVE_AVERAGE_FUNCTIONS:
        dims = _ADAPTIVE_AVERAGE_FUNCTIONS[node.target]
        size = bind_args(node, ("input", "output_size")).get("output_size")
    else:
        return None
    pooled = (size,) * dims if isinstance(size, int) else tuple(size) if isinstance(size, (tuple, list)) else ()
    if not (dims and len(pooled) == dims and all(isinstance(n, int) and n > 0 for n in pooled)):
        return None
    return lambda shape: (*shape[:len(shape) - dims], *pooled) if len(shape) in (dims + 1, dims + 2) else None


def _flatten(gm: GraphModule, node: Node) -> SizeRule | None:
    """The size rule of a flatten with int dims (``torch.flatten``, ``Tensor.flatten``,
    ``nn.Flatten``): the sizes from ``start_dim`` to ``end_dim`` multiplied; else None."""
    if node.op == "call_module":
        module = submodule(gm, str(node.target))
        if type(module) is not nn.Flatten:
            return None
        start, end = module.start_dim, module.end_dim
    elif (node.op == "call_function" and node.target is torch.flatten) or \
            (node.op == "call_method" and node.target == "flatten"):
        if len(node.args) > 3 or not set(node.kwargs) <= {"input", "start_dim", "end_dim"}:
            return None
        bound = bind_args(node, ("input", "start_dim", "end_dim"))
        start, end = bound.get("start_dim", 0), bound.get("end_dim", -1)
    else:
        return None
    if type(start) is not int or type(end) is not int:
        return None

    def rule(shape: tuple[Any, ...]) -> tuple[Any, ...] | None:
        rank = max(len(shape), 1)
        first, last = start + rank if start < 0 else start, end + rank if end < 0 else end
        if not 0 <= first <= last < rank:
            return None  # torch raises: the op itself runs
        if not shape:
            return (1,)
        return (*shape[:first], functools.reduce(operator.mul, shape[first:last + 1], 1), *shape[last + 1:])
    return rule


_SIZE_RULES = (_adaptive_output, _flatten)


class _Sizes:
    """A tensor of the symbolic run known by its sizes alone: a fake tensor is made of it only
    where an op without a size rule reads it (making one costs more than most size rules)."""

    __slots__ = ("dtype", "shape")

    def __init__(self, shape: Sequence[Any], dtype: torch.dtype) -> None:
        self.shape, self.dtype = tuple(shape), dtype


def _resamples(gm: GraphModule, node: Node) -> bool:
    if node.op == "call_module":
        return isinstance(submodule(gm, str(node.target)), RESAMPLE_MODULES)
    return node.op == "call_function" and node.target in RESAMPLE_FUNCTIONS


def _recorded(node: Node) -> bool:
    return hasattr(node.meta.get("tensor_meta"), "shape")


class SymbolicCone:
    """Symbolic sizes of ``start`` (every dim free but the ``held`` ones) and of ``nodes`` computed
    from it, with what they read. ``fixed`` lists ``(node, dim, size)``: a size a layer reading
    ``node`` requires (its channels), assumed as the layer's own size check would assume it,
    without running the layer.

    Raises CanonizationError if the run fails (an op without symbolic shape support, an input
    without recorded shape)."""

    def __init__(self, gm: GraphModule, start: Node, nodes: Iterable[Node], free_ones: bool = True,
                 held: tuple[int, ...] = (1,), fixed: Iterable[tuple[Node, int, int]] = ()) -> None:
        self.env = ShapeEnv(specialize_zero_one=False, duck_shape=False)
        self._varies: dict[Any, bool] = {}
        mode = FakeTensorMode(shape_env=self.env, allow_non_fake_inputs=True)
        mode.cache_enabled = False
        device = next((t.device for t in itertools.chain(gm.parameters(), gm.buffers())), torch.device("cpu"))
        downstream = {start}
        node = start.next
        while node.op != "root":  # graphs are in topological order: nothing before start is downstream
            if node.op != "output" and any(arg in downstream for arg in node.all_input_nodes):
                downstream.add(node)
            node = node.next

        names = itertools.count()

        def size(hint: int) -> Any:
            symbol = self.env.create_symbol(hint, ConstantSource(f"size{next(names)}"), dynamic_dim=DimDynamic.DYNAMIC)
            return self.env.create_symintnode(symbol, hint=hint)

        def seed(node: Node, held: tuple[int, ...]) -> _Sizes:
            meta = node.meta.get("tensor_meta")
            if meta is None or not hasattr(meta, "shape"):
                raise CanonizationError(f"{node.name}: no recorded shape")
            # ``free_ones``: a free size recorded as 1 gets the hint 2 (fake tensors take a size 1 as a
            # constant); without, it stays the constant 1
            return _Sizes([n if d in held else size(2 if free_ones and n == 1 else n)
                           for d, n in enumerate(meta.shape)], meta.dtype)

        def value(node: Node) -> Any:  # a fake tensor where the run has sizes alone
            found = self.values[node]
            if isinstance(found, _Sizes):
                with mode:
                    found = self.values[node] = torch.empty(found.shape, dtype=found.dtype, device=device)
            return found

        def size_rule(node: Node) -> SizeRule | None:
            return next((rule for find in _SIZE_RULES if (rule := find(gm, node)) is not None), None) \
                if call_input(node) in self.values else None

        def seeded(node: Node) -> bool:  # a value of its own: read from the model, or free sizes
            return node.op in ("get_attr", "placeholder") or (node not in downstream and _recorded(node))

        self.values: dict[Node, Any] = {start: seed(start, held)}
        sizes_of = list(fixed)
        needed, pending = set(), [n for n in itertools.chain(nodes, (n for n, _, _ in sizes_of)) if n is not start]
        while pending:
            node = pending.pop()
            if node not in needed:
                needed.add(node)
                if not seeded(node):
                    pending.extend(arg for arg in node.all_input_nodes if arg is not start)
        order = {node: i for i, node in enumerate(gm.graph.nodes)}
        try:
            for node in sorted(needed, key=order.__getitem__):
                if node.op == "get_attr":
                    self.values[node] = get_attr_value(gm, str(node.target))
                elif seeded(node):
                    self.values[node] = seed(node, ())
                elif _resamples(gm, node):  # its size rule would take every size as a constant (float math)
                    self.values[node] = seed(node, (1,))
                    torch._check(self.values[node].shape[0] == self.values[call_input(node)].shape[0])
                elif (rule := size_rule(node)) is not None and \
                        (shape := rule((x := self.values[call_input(node)]).shape)) is not None:
                    # without the symbolic checks of the op's meta kernel (the slowest part of a run)
                    self.values[node] = _Sizes(shape, x.dtype)
                else:
                    args, kwargs = map_arg((node.args, node.kwargs), value)
                    with mode:
                        self.values[node] = run_call(gm, node, args, kwargs)
            for node, dim, required in sizes_of:
                torch._check(self.values[node].shape[dim] == required)
        except CanonizationError:
            raise
        except Exception as error:
            raise CanonizationError(f"symbolic shapes: {type(error).__name__}: {error}") from error

    def _expr(self, size: Any) -> Any:
        if isinstance(size, sympy.Basic):
            return size
        return self.env.simplify(size.node.expr) if isinstance(size, torch.SymInt) else sympy.Integer(size)

    def expr_varies(self, size: Any) -> bool:
        """True if ``size`` (an int, SymInt or sympy expression) depends on the input sizes."""
        expr = self._expr(size)
        if expr not in self._varies:  # the run is over: what the shape environment knows stays
            self._varies[expr] = bool(expr.free_symbols) and self.env._maybe_evaluate_static(
                sympy.Eq(expr, self.env.guarding_hint_or_throw(expr))) is not sympy.true
        return self._varies[expr]

    def sizes(self, node: Node) -> tuple[Any, ...] | None:
        """The symbolic sizes of a tensor ``node`` (sympy expressions), None if it is no tensor."""
        value = self.values.get(node)
        return tuple(self._expr(d) for d in value.shape) if isinstance(value, (Tensor, _Sizes)) else None

    def varying(self, node: Node) -> tuple[bool, ...] | tuple[tuple[bool, ...], ...]:
        """Per dim of ``node``'s tensor (per tensor of a tuple of tensors): whether its size varies."""
        value = self.values.get(node)
        if isinstance(value, (tuple, list)):
            return tuple(tuple(self.expr_varies(d) for d in v.shape) if isinstance(v, Tensor) else () for v in value)
        return tuple(self.expr_varies(d) for d in value.shape) if isinstance(value, (Tensor, _Sizes)) else ()

    def value_varies(self, node: Node) -> bool:
        """True if the non-tensor value of ``node`` (a size, a tuple of sizes) depends on the input sizes."""
        value = self.values.get(node)
        values = value if isinstance(value, (tuple, list, torch.Size)) else (value,)
        return any(isinstance(v, torch.SymInt) and self.expr_varies(v) for v in values)

    def equal(self, a: Any, b: Any) -> bool:
        """True if two size expressions are equal wherever the run's conditions hold."""
        return sympy.expand(a - b) == 0 or \
            self.env._maybe_evaluate_static(sympy.Eq(a, b)) is sympy.true

    def hint(self, expr: Any) -> int:
        return int(self.env.guarding_hint_or_throw(expr))
