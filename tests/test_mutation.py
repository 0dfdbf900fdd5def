"""The alias analysis itself: which values may alias, who changes them in place, and in what order."""

import operator

import torch
from hypothesis import given, strategies as st
from torch import nn
from torch.fx import Graph, GraphModule, symbolic_trace

from fxcanon.mutation import AliasAnalysis, fold_hazard


def nodes_by_name(gm):
    return {node.name: node for node in gm.graph.nodes}


class ViewsAndInplace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.conv(x)
        flat = y.view(-1)
        z = self.relu(y)
        w = z + 1
        w.mul_(2)
        w.add_(1)
        return flat, w


def test_classes_follow_views_and_inplace_ops_and_stop_at_fresh_results():
    gm = symbolic_trace(ViewsAndInplace())
    n = nodes_by_name(gm)
    aliases = AliasAnalysis(gm)
    assert aliases.alias_class(n["conv"]) == {n["conv"], n["view"], n["relu"]}
    assert aliases.alias_class(n["x"]) == {n["x"]}
    assert aliases.mutations(n["view"]) == [n["relu"]]
    assert aliases.mutations(n["add"]) == [n["mul_"], n["add_"]]  # program order
    assert aliases.mutations(n["add"], after=n["mul_"]) == [n["add_"]]
    assert aliases.mutations(n["add"], ignore=[n["mul_"]]) == [n["add_"]]
    assert aliases.mutations(n["x"]) == []


class ChangesSecondInput(nn.Module):
    def forward(self, a, b):
        b.mul_(2)
        return a + b


def test_graph_inputs_may_alias_each_other():
    gm = symbolic_trace(ChangesSecondInput())
    n = nodes_by_name(gm)
    assert AliasAnalysis(gm).mutations(n["a"]) == [n["mul_"]]


def test_one_attribute_read_twice_is_one_value_and_its_change_is_seen_by_every_reader():
    graph = Graph()
    x = graph.placeholder("x")
    first, second = graph.get_attr("w"), graph.get_attr("w")
    graph.call_method("add_", (second, 1.0))
    graph.output(graph.call_function(operator.mul, (x, first)))
    gm = GraphModule({"w": torch.ones(3)}, graph)
    n = nodes_by_name(gm)
    aliases = AliasAnalysis(gm)
    assert aliases.mutations(n["w"]) == [n["add_"]]
    reader = n["mul"]
    assert aliases.changes_parameters(reader)
    assert fold_hazard(gm, [reader]) == "the graph changes parameters of mul in place"
    assert not aliases.changes_parameters(n["x"])


# a random straight-line program: (op, argument positions among the values so far)
_OPS = ("view", "clone", "relu_", "add", "add_")
programs = st.lists(st.tuples(st.sampled_from(_OPS), st.integers(0, 99), st.integers(0, 99)), min_size=1, max_size=12)


def _graph_of(program):
    graph = Graph()
    values = [graph.placeholder("a"), graph.placeholder("b"), graph.call_function(torch.zeros, (3,))]
    for op, i, j in program:
        x, y = values[i % len(values)], values[j % len(values)]
        args = (x, y) if op.startswith("add") else (x,) if op != "view" else (x, -1)
        values.append(graph.call_method(op, args))
    graph.output(values[-1])
    return GraphModule(torch.nn.Module(), graph)


@given(programs)
def test_classes_partition_the_values_and_hold_every_value_a_node_changes(program):
    gm = _graph_of(program)
    aliases = AliasAnalysis(gm)
    values = [node for node in gm.graph.nodes if node.op != "output"]
    classes = {node: aliases.alias_class(node) for node in values}
    links = {node: set() for node in values}  # the links, as the class docstring states them
    for node in values:
        if node.op == "placeholder" or (node.op == "call_method" and node.target != "clone" and node.target != "add"):
            for arg in node.all_input_nodes:
                links[node].add(arg)
                links[arg].add(node)
    placeholders = [node for node in values if node.op == "placeholder"]
    for a in placeholders:
        links[a].update(p for p in placeholders if p is not a)
    for node in values:
        reached, frontier = {node}, [node]
        while frontier:
            for other in links[frontier.pop()] - reached:
                reached.add(other)
                frontier.append(other)
        assert classes[node] == reached
        assert all(classes[other] == classes[node] for other in classes[node])
        changed = [m for m in values if m.op == "call_method" and m.target.endswith("_") and m.args[0] in reached]
        assert aliases.mutations(node) == changed
