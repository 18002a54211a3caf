"""Regions: remove, clone and re-point branches and blocks, checked against references
built independently (Hugging Face models with layers deleted or weights edited, hooks,
numpy), in ONNX Runtime and in torch."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rescompile.analysis.residuals import find_residuals
from rescompile.api import load
from rescompile.frontends.onnx import load_onnx, save_onnx
from rescompile.frontends.torch import export_module
from rescompile.ir import PARAM, Graph, IRError, Node, Value, verify
from rescompile.ir.regions import Region, clone, remove, remove_branch, replace_entry
from rescompile.validation import run_onnx
from tools.models import build


def run(graph, tmp_path, feeds, name="out.onnx"):
    save_onnx(graph, tmp_path / name)
    return next(iter(run_onnx(tmp_path / name, feeds).values()))


def gpt2_feeds(case):
    return {"input_ids": case.kwargs["input_ids"].numpy()}


def hf(model, case):
    with torch.no_grad():
        return model(**case.kwargs).last_hidden_state.numpy()


def without_layer(model, index):
    """The reference for dropping a block: the same HF model with `model.h[index]` deleted."""
    ref = copy.deepcopy(model)
    del ref.h[index]
    return ref


def assert_layer_weights_gone(graph, layer):
    """The layer's weights are gone and nothing unused is left. The exporter merged the
    equal LayerNorm weights of all layers into one initializer (named after layer 0's
    ln_1): still read by the other layers, it stays."""
    assert all(v.uses() for v in graph.initializers.values())
    assert [n for n in graph.initializers if f".h.{layer}." in n] == (
        ["module.h.0.ln_1.weight", "module.h.0.ln_1.bias"] if layer == 0 else []
    )


def add_before(graph, anchor, inputs, name):
    """`inputs[0] + inputs[1]`, inserted before `anchor`, typed like the first input."""
    node = Node("Add", inputs, name=name, output_names=[name])
    node.output.dtype, node.output.shape = inputs[0].dtype, inputs[0].shape
    graph.insert_before(anchor, node)
    return node.output


# ----- remove ---------------------------------------------------------------------------
def test_removing_both_branches_of_a_gpt2_layer_equals_deleting_the_layer(onnx_model, tmp_path):
    case = build("gpt2")
    graph = load_onnx(onnx_model("gpt2"))
    sites = find_residuals(graph).sites
    before = len(graph)
    # Later site first: removing it leaves the earlier site's records intact.
    for site in (sites[1], sites[0]):
        remove_branch(site)
        verify(graph)
    assert_layer_weights_gone(graph, 0)
    assert any(".h.1." in name for name in graph.initializers)
    assert len(graph) == before - len(sites[0].nodes) - len(sites[1].nodes) - 2
    assert len(find_residuals(graph).sites) == 2
    got = run(graph, tmp_path, gpt2_feeds(case))
    np.testing.assert_allclose(got, hf(without_layer(case.module, 0), case), atol=1e-5)


@pytest.mark.parametrize("layer", [0, 1])
def test_removing_a_gpt2_block_region_equals_deleting_the_layer(onnx_model, tmp_path, layer):
    case = build("gpt2")
    graph = load_onnx(onnx_model("gpt2"))
    attn, mlp = find_residuals(graph).sites[2 * layer : 2 * layer + 2]
    block = Region.of_block([attn, mlp])
    assert attn.add in block and mlp.add in block
    assert block.entries == (attn.fork,) and block.exits == (mlp.output,)
    remove(block, replace={mlp.output: attn.fork})
    verify(graph)
    assert_layer_weights_gone(graph, layer)
    got = run(graph, tmp_path, gpt2_feeds(case))
    np.testing.assert_allclose(got, hf(without_layer(case.module, layer), case), atol=1e-5)


def test_removing_one_branch_equals_zeroing_its_output_projection(onnx_model, tmp_path):
    case = build("gpt2")
    graph = load_onnx(onnx_model("gpt2"))
    remove_branch(find_residuals(graph).sites[2])  # attention of layer 1
    verify(graph)
    ref = copy.deepcopy(case.module)
    with torch.no_grad():
        ref.h[1].attn.c_proj.weight.zero_()
        ref.h[1].attn.c_proj.bias.zero_()
    np.testing.assert_allclose(run(graph, tmp_path, gpt2_feeds(case)), hf(ref, case), atol=1e-5)


def test_removing_a_cnn_branch_keeps_a_projection_shortcut(onnx_model, tmp_path):
    case = build("residual_cnn")
    graph = load_onnx(onnx_model("residual_cnn"))
    sites = find_residuals(graph).sites
    identity, projection = sites[1], sites[2]
    assert projection.kind == "projection"
    shortcut = projection.skip.producer
    remove_branch(projection)
    remove_branch(identity)
    verify(graph)
    assert shortcut.graph is graph
    assert {n for n in graph.initializers if n.startswith(("b2.", "b3."))} == set()
    assert "proj.0.weight" in graph.initializers
    ref = copy.deepcopy(case.module)
    with torch.no_grad():
        for block in (ref.b2, ref.b3):  # the last BatchNorm's affine at zero: the branch is 0
            block[4].weight.zero_()
            block[4].bias.zero_()
        want = ref(*case.args).numpy()
    got = run(graph, tmp_path, {"input_0": case.args[0].numpy()})
    np.testing.assert_allclose(got, want, atol=1e-5)


def tiny_graph():
    """out = x + relu(x @ W), the add a graph output; W is also read by a second output
    y = x @ W when `shared`."""
    graph = Graph("tiny")
    x = graph.add_input(Value("x", dtype="float32", shape=(2, 4)))
    w = graph.add_param("W", np.arange(16, dtype=np.float32).reshape(4, 4) / 16, dtype="float32")
    mm = graph.append(Node("MatMul", [x, w], output_names=["h"]))
    act = graph.append(Node("Relu", [mm.output], output_names=["r"]))
    add = graph.append(Node("Add", [x, act.output], output_names=["out"]))
    for value in (mm.output, act.output, add.output):
        value.dtype, value.shape = "float32", (2, 4)
    graph.set_outputs([add.output])
    return graph


def test_removing_a_branch_whose_add_is_a_graph_output_keeps_the_output_name(tmp_path):
    graph = tiny_graph()
    (site,) = find_residuals(graph).sites
    remove_branch(site)
    verify(graph)
    assert [v.name for v in graph.outputs] == ["out"]
    assert [n.op_type for n in graph] == ["Identity"]
    assert graph.initializers == {}
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_array_equal(run(graph, tmp_path, {"x": x}), x)


def test_remove_keeps_what_others_still_read_and_refuses_used_exits():
    graph = tiny_graph()
    w = graph.initializers["W"]
    other = graph.append(Node("MatMul", [graph.inputs[0], w], output_names=["y"]))
    graph.set_outputs([*graph.outputs, other.output])
    (site,) = find_residuals(graph).sites
    region = Region.of_branch(site)
    assert region.params == (w,) and region.exits == (site.branch,)
    with pytest.raises(IRError, match="still used outside"):
        remove(region)
    assert len(graph) == 4  # nothing changed
    remove_branch(site)
    verify(graph)
    assert graph.initializers == {"W": w}  # shared with y: kept


# ----- clone ----------------------------------------------------------------------------
def test_clone_with_shared_params_doubles_the_branch(onnx_model, tmp_path):
    """x + F(x) + F'(x) with F' a tied copy of F equals x + 2F(x): GPT-2's MLP with
    its output projection doubled."""
    case = build("gpt2")
    graph = load_onnx(onnx_model("gpt2"))
    site = find_residuals(graph).sites[1]
    region = Region.of_branch(site)
    initializers = dict(graph.initializers)
    values = clone(region)
    verify(graph)
    assert graph.initializers == initializers
    twin = values[site.branch]
    assert not twin.uses()
    total = add_before(graph, site.add, [site.branch, twin], "branch_x2")
    site.add.replace_input_with(1 - site.skip_index, total)
    verify(graph)
    ref = copy.deepcopy(case.module)
    with torch.no_grad():
        ref.h[0].mlp.c_proj.weight.mul_(2)
        ref.h[0].mlp.c_proj.bias.mul_(2)
    np.testing.assert_allclose(run(graph, tmp_path, gpt2_feeds(case)), hf(ref, case), atol=1e-5)


def test_clone_with_copied_params_is_independent(onnx_model, tmp_path):
    """Zeroing the copy's output projection gives back the original model; the original
    branch keeps its weights."""
    case = build("gpt2")
    graph = load_onnx(onnx_model("gpt2"))
    site = find_residuals(graph).sites[2]
    region = Region.of_branch(site)
    count = len(graph.initializers)
    values = clone(region, share_params=False, prefix="copy/")
    copied = [p for p in region.params if p.role == PARAM]
    assert len(graph.initializers) == count + len(copied)
    for param in copied:
        assert values[param].name.startswith("copy/") and values[param].payload is not param.payload
        np.testing.assert_array_equal(np.asarray(values[param].payload), np.asarray(param.payload.numpy()))
    # The output projection's weight and bias, read directly or through a Transpose.
    stack, zeroed = list(site.weighted[-1].inputs[1:]), 0
    while stack:
        value = stack.pop()
        if value in copied:
            graph.set_payload(values[value], np.zeros(value.shape, dtype=np.float32))
            zeroed += 1
        elif value is not None and value.producer is not None:
            stack.extend(value.producer.inputs)
    assert zeroed  # the weight; the zero-initialised bias was folded away by the exporter
    total = add_before(graph, site.add, [site.branch, values[site.branch]], "branch_sum")
    site.add.replace_input_with(1 - site.skip_index, total)
    verify(graph)
    got = run(graph, tmp_path, gpt2_feeds(case))
    np.testing.assert_allclose(got, hf(case.module, case), atol=1e-5)


def test_clone_names_are_fresh_and_unique(onnx_model):
    graph = load_onnx(onnx_model("gpt2"))
    sites = find_residuals(graph).sites
    block, before = Region.of_block(sites[:2]), len(graph)
    first = clone(block)
    second = clone(block, share_params=False)
    verify(graph)
    names = [v.name for v in graph.values()]
    assert len(names) == len(set(names))
    assert len({n.name for n in graph}) == len(graph)
    for values in (first, second):
        assert all(v.name.startswith("clone/") for v in values.values())
    assert len(graph) == len(list(graph)) == before + 2 * len(block)
    # Both copies sit right after the block's input, in the block's order.
    order = graph.node_order()
    assert order[second[sites[0].output].producer] < order[sites[0].add]


def test_clone_fed_another_value_and_errors(onnx_model):
    graph = load_onnx(onnx_model("gpt2"))
    sites = find_residuals(graph).sites
    mlp0, mlp1 = Region.of_branch(sites[1]), Region.of_branch(sites[3])
    with pytest.raises(IRError, match="not read by the region"):
        clone(mlp0, inputs={sites[3].fork: sites[1].fork})
    # Layer 1's MLP applied to layer 0's stream: the copy goes after that value's producer.
    values = clone(mlp1, inputs={sites[3].fork: sites[1].fork})
    verify(graph)
    twin = values[sites[3].branch]
    order = graph.node_order()
    first = min(order[values[out].producer] for out in (n.output for n in mlp1.nodes))
    assert first == order[sites[1].fork.producer] + 1
    assert order[twin.producer] < order[sites[1].add]


# ----- replace_entry ----------------------------------------------------------------------
def test_replace_entry_makes_gpt2_layer_parallel(onnx_model, tmp_path):
    """Layer 1's MLP reads the layer input instead of x + A(x): x' = x + A(N1 x) + M(N2 x),
    against the HF model with a hook that feeds ln_2 the block's input."""
    case = build("gpt2")
    graph = load_onnx(onnx_model("gpt2"))
    attn, mlp = find_residuals(graph).sites[2:4]
    region = Region.of_branch(mlp)
    with pytest.raises(IRError, match="defined after"):
        replace_entry(region, mlp.fork, mlp.output)
    replace_entry(region, mlp.fork, attn.fork)
    verify(graph)
    assert region.entries == (attn.fork,)
    model = copy.deepcopy(case.module)
    block, seen = model.h[1], {}

    def keep_input(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    def norm_of_input(module, args, output):
        return F.layer_norm(seen["x"], module.normalized_shape, module.weight, module.bias, module.eps)

    block.register_forward_pre_hook(keep_input, with_kwargs=True)
    block.ln_2.register_forward_hook(norm_of_input)
    want = hf(model, case)
    assert not np.allclose(want, hf(case.module, case), atol=1e-3)
    np.testing.assert_allclose(run(graph, tmp_path, gpt2_feeds(case)), want, atol=1e-5)


def test_region_of_branch_matches_the_analysis(onnx_model):
    graph = load_onnx(onnx_model("gpt2"))
    sites = find_residuals(graph).sites
    for site in sites:
        region = Region.of_branch(site)
        assert set(site.nodes) <= set(region.nodes)
        assert site.add not in region
        assert region.entries == (site.fork,) and region.exits == (site.branch,)
        assert {p.name for p in region.params} >= {
            v.name for n in site.weighted for v in n.inputs if v is not None and v.role == PARAM
        }
    with pytest.raises(IRError, match="not consecutive"):
        Region.of_block([sites[1], sites[0]])


# ----- torch ------------------------------------------------------------------------------
def test_torch_gpt2_block_removal_and_exported_module(tmp_path):
    case = build("gpt2")
    graph = load(case.module, (), example_kwargs=case.kwargs, dynamic=False)
    attn, mlp = find_residuals(graph).sites[:2]
    block = Region.of_block([attn, mlp])
    assert block.exits == (mlp.output,)
    remove(block, replace={mlp.output: attn.fork})
    verify(graph)
    module = export_module(graph)
    names = [n for n, _ in module.named_parameters()]
    assert not any(n.startswith("h.0.") for n in names) and any(n.startswith("h.1.") for n in names)
    with torch.no_grad():
        got = module(**case.kwargs)[0].numpy()
    np.testing.assert_allclose(got, hf(without_layer(case.module, 0), case), atol=1e-5)


def test_torch_clone_with_copied_params_trains():
    """residual_mlp: a copied last branch added to itself is x + 2F(x) (fc2 doubled), and
    the copy's parameters are new, trainable module parameters."""
    case = build("residual_mlp")
    graph = load(case.module, case.args)
    site = find_residuals(graph).sites[-1]
    region = Region.of_branch(site)
    values = clone(region, share_params=False)
    total = add_before(graph, site.add, [site.branch, values[site.branch]], "branch_sum")
    site.add.replace_input_with(1 - site.skip_index, total)
    verify(graph)
    module = export_module(graph)
    copies = {n for n, p in module.named_parameters() if n.startswith("clone_")}
    assert len(copies) == len([p for p in region.params if p.role == PARAM]) == 6  # norm, fc1, fc2
    ref = copy.deepcopy(case.module)
    with torch.no_grad():
        ref.fc2[-1].weight.mul_(2)
        ref.fc2[-1].bias.mul_(2)
        torch.testing.assert_close(module(*case.args), ref(*case.args), atol=1e-5, rtol=0)
    module(*case.args).square().sum().backward()
    assert all(p.grad is not None for n, p in module.named_parameters() if n in copies)


def test_removing_a_post_norm_bert_block_up_to_the_next_fork(onnx_model, tmp_path):
    """Post-norm: the block ends after the norm that follows its last add (the next
    layer's fork), so the reference is BERT with `encoder.layer[0]` deleted."""
    case = build("bert")
    graph = load_onnx(onnx_model("bert"))
    sites = find_residuals(graph).sites
    block = Region.of_block(sites[:2], exit=sites[2].fork)
    assert block.exits == (sites[2].fork,)
    remove(block, replace={sites[2].fork: sites[0].fork})
    verify(graph)
    ref = copy.deepcopy(case.module)
    del ref.encoder.layer[0]
    feeds = {k: v.numpy() for k, v in case.kwargs.items()}
    np.testing.assert_allclose(run(graph, tmp_path, feeds), hf(ref, case), atol=1e-5)


def test_torch_llama_branch_removal_takes_the_asserts_along():
    """torch.export puts `_assert_tensor_metadata` nodes on branch values; their outputs are
    unused, so they belong to the branch region and go with it."""
    case = build("llama")
    graph = load(case.module, (), example_kwargs=case.kwargs, dynamic=False)
    sites = find_residuals(graph).sites
    asserts = [n for n in Region.of_branch(sites[0]) if "assert" in n.op_type]
    assert asserts and not any(n in sites[0].nodes for n in asserts)
    for site in (sites[1], sites[0]):
        remove_branch(site)
        verify(graph)
    assert all(n.graph is None for n in asserts)
    module = export_module(graph)
    assert not any(n.startswith("layers.0.") for n, _ in module.named_parameters())
    ref = copy.deepcopy(case.module)
    del ref.layers[0]
    with torch.no_grad():
        got = module(**case.kwargs)[0].numpy()
    np.testing.assert_allclose(got, hf(ref, case), atol=1e-5)


def test_removing_the_original_keeps_params_a_tied_clone_reads(onnx_model, tmp_path):
    case = build("gpt2")
    graph = load_onnx(onnx_model("gpt2"))
    site = find_residuals(graph).sites[3]
    region = Region.of_branch(site)
    params = set(region.params)
    twin = clone(region)[site.branch]
    site.add.replace_input_with(1 - site.skip_index, twin)
    remove(region)
    verify(graph)
    assert params <= set(graph.initializers.values())
    np.testing.assert_allclose(run(graph, tmp_path, gpt2_feeds(case)), hf(case.module, case), atol=1e-5)
    (copy_site,) = [s for s in find_residuals(graph).sites if s.add is site.add]
    remove_branch(copy_site)
    verify(graph)
    assert not any(".h.1.mlp." in name for name in graph.initializers)


def test_clone_fed_from_the_branch_gives_a_heun_step(onnx_model, tmp_path):
    """rk2's Heun step on residual_mlp's last block, x + (F(x) + F(x + F(x))) / 2: the copy
    reads a value computed after the original branch and is placed after it, against
    the module's own layers called by hand."""
    case = build("residual_mlp")
    graph = load_onnx(onnx_model("residual_mlp"))
    site = find_residuals(graph).sites[-1]
    x, f = site.fork, site.branch
    z = add_before(graph, site.add, [x, f], "heun/z")
    g = clone(Region.of_branch(site), inputs={x: z})[f]
    total = add_before(graph, site.add, [f, g], "heun/sum")
    half = graph.add_param("heun/half", np.array(0.5, dtype=np.float32), dtype="float32", trainable=False)
    mean = Node("Mul", [total, half], name="heun/mean", output_names=["heun/mean"])
    mean.output.dtype, mean.output.shape = f.dtype, f.shape
    graph.insert_before(site.add, mean)
    site.add.replace_input_with(1 - site.skip_index, mean.output)
    verify(graph)
    m, h = case.module, case.args[0]
    with torch.no_grad():
        for norm, fc1, fc2 in zip(m.norms[:-1], m.fc1[:-1], m.fc2[:-1]):
            h = h + fc2(torch.relu(fc1(norm(h))))

        def branch(t):
            return m.fc2[-1](torch.relu(m.fc1[-1](m.norms[-1](t))))

        want = m.head(h + (branch(h) + branch(h + branch(h))) / 2).numpy()
    got = run(graph, tmp_path, {"input_0": case.args[0].numpy()})
    np.testing.assert_allclose(got, want, atol=1e-5)
