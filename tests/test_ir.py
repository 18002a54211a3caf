"""The IR keeps def-use edges consistent by construction and refuses bad edits."""

import numpy as np
import pytest

from rescompile.ir import Graph, IRError, Node, OpKind, Usage, Value, to_networkx, verify


def small_graph():
    g = Graph()
    x = g.add_input(Value("x", dtype="float32", shape=(2, 4)))
    w = g.add_param("w", np.ones((4, 4), np.float32), dtype="float32")
    mm = g.append(Node("MatMul", [x, w], name="mm"))
    add = g.append(Node("Add", [x, mm.output], name="add"))
    g.set_outputs([add.output])
    return g, x, w, mm, add


def test_node_registers_its_uses_and_kinds():
    g, x, w, mm, add = small_graph()
    assert x.uses() == (Usage(mm, 0), Usage(add, 0))
    assert w.uses() == (Usage(mm, 1),)
    assert mm.output.producer is mm and mm.output.index == 0
    assert mm.kind is OpKind.WEIGHTED and add.kind is OpKind.ADD
    verify(g)


def test_replace_input_updates_both_sides():
    g, x, w, mm, add = small_graph()
    add.replace_input_with(0, mm.output)
    assert x.uses() == (Usage(mm, 0),)
    assert Usage(add, 0) in mm.output.uses() and Usage(add, 1) in mm.output.uses()
    verify(g)


def test_replace_all_uses_refuses_graph_outputs_unless_asked():
    g, x, w, mm, add = small_graph()
    neg = g.append(Node("Neg", [add.output], name="neg"))
    with pytest.raises(IRError, match="graph output"):
        add.output.replace_all_uses_with(neg.output)
    add.output.replace_all_uses_with(x, replace_graph_outputs=True)
    assert g.outputs == [x] and neg.inputs[0] is x
    verify(g)


def test_remove_refuses_used_node_and_changes_nothing():
    g, x, w, mm, add = small_graph()
    with pytest.raises(IRError, match="used by add"):
        g.remove(mm)
    assert len(g) == 2 and mm.graph is g and Usage(mm, 0) in x.uses()
    with pytest.raises(IRError, match="graph output"):
        g.remove(add)
    verify(g)


def test_values_from_another_graph_are_refused():
    g, x, *_ = small_graph()
    other = Graph()
    y = other.add_input(Value("y"))
    with pytest.raises(IRError, match="another graph"):
        g.append(Node("Neg", [y]))
    with pytest.raises(IRError, match="another graph"):
        x.replace_all_uses_with(y)


def test_insert_before_keeps_order_and_iteration_is_mutation_safe():
    g, x, w, mm, add = small_graph()
    neg = Node("Neg", [mm.output], name="neg")
    g.insert_before(add, neg)
    add.replace_input_with(1, neg.output)
    assert [n.name for n in g] == ["mm", "neg", "add"]
    for node in g:  # removing the current node while iterating is safe
        if node.name == "neg":
            add.replace_input_with(1, mm.output)
            g.remove(node)
    assert [n.name for n in g] == ["mm", "add"]
    verify(g)


def test_a_removed_node_can_be_moved_and_gets_its_uses_back():
    g, x, w, mm, add = small_graph()
    neg = g.append(Node("Neg", [x], name="neg"))
    g.remove(neg)
    assert Usage(neg, 0) not in x.uses()
    g.insert_after(None, neg)
    assert [n.name for n in g] == ["neg", "mm", "add"]
    assert Usage(neg, 0) in x.uses()
    verify(g)


def test_verify_catches_use_before_definition():
    g, x, w, mm, add = small_graph()
    late = Node("Neg", [x], name="late")
    g.append(late)
    mm.replace_input_with(0, late.output)  # mm now reads a value defined after it
    with pytest.raises(IRError, match="before it is defined"):
        verify(g)


def test_remove_dead_and_unique_deterministic_names():
    g, x, w, mm, add = small_graph()
    a = g.append(Node("Relu", [x], name="add"))  # clashing node name
    b = g.append(Node("Relu", [a.output], name="add"))
    assert (a.name, b.name) == ("add_1", "add_2")
    assert g.remove_dead() == 2
    assert [n.name for n in g] == ["mm", "add"]
    verify(g)


def test_networkx_view_ignores_shape_edges():
    g = Graph()
    x = g.add_input(Value("x"))
    shape = g.append(Node("Shape", [x]))
    r = g.append(Node("Reshape", [x, shape.output]))
    g.set_outputs([r.output])
    view = to_networkx(g)
    assert not view.has_edge(x, shape) and view.has_edge(x, r)
    assert view.has_edge(shape.output, r)
