"""find_groups: which slices shrink together, and why a group may not."""

import json

import torch
from torch import nn

from rescompile.analysis.groups import find_groups
from rescompile.ir.ops import call_of
from rescompile.pipeline import load
from tools.models import build


def groups_of(module, *args, dynamic="auto", **kwargs):
    return find_groups(load(module, args or None, example_kwargs=kwargs, dynamic=dynamic)).groups


def members(group):
    return {(m.value.name, m.axis) for m in group.members if m.is_param}


def test_residual_mlp_hidden_layers_and_blocked_stream():
    groups = groups_of(build("residual_mlp").module, torch.randn(2, 16))
    mlp = [g for g in groups if g.kind == "mlp" and g.prunable]
    assert [g.size for g in mlp] == [32, 32, 32]
    assert members(mlp[0]) == {("fc1.0.weight", 0), ("fc1.0.bias", 0), ("fc2.0.weight", 1)}
    (stream,) = [g for g in groups if g.kind == "stream"]
    assert not stream.prunable and stream.reason == "a model input"  # x itself is on the stream
    assert ("norms.2.weight", 0) in members(stream) and ("head.weight", 1) in members(stream)


def test_gqa_key_value_head_owns_its_query_heads():
    case = build("llama")
    heads = [g for g in groups_of(case.module, **case.kwargs) if g.kind == "heads"]
    assert [(g.size, g.unit, g.width, g.prunable) for g in heads] == [(2, "head", 16, True)] * 2
    names = {name for name, _ in members(heads[0])}
    assert {n.rsplit(".", 2)[-2] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    q = next(m for m in heads[0].members if m.value.name.endswith("q_proj.weight"))
    assert q.units == (0,) * 16 + (1,) * 16  # query heads 0-1 read kv head 0, 2-3 read kv head 1


def test_gpt2_conv1d_weight_is_in_out():
    case = build("gpt2")
    groups = groups_of(case.module, **case.kwargs)
    mlp = next(g for g in groups if g.kind == "mlp")
    assert ("h.0.mlp.c_fc.weight", 1) in members(mlp) and ("h.0.mlp.c_proj.weight", 0) in members(mlp)
    heads = next(g for g in groups if g.kind == "heads")
    assert ("h.0.attn.c_attn.weight", 1) in members(heads) and heads.width == 48  # q, k and v of a head


def test_conv_channel_takes_its_batchnorm_and_the_next_conv():
    case = build("tv_resnet18")
    groups = groups_of(case.module, *case.args)
    group = next(g for g in groups if ("layer1.0.conv1.weight", 0) in members(g))
    assert group.kind == "channels" and group.prunable and group.size == 64
    assert members(group) == {
        ("layer1.0.conv1.weight", 0),
        ("layer1.0.bn1.weight", 0),
        ("layer1.0.bn1.bias", 0),
        ("layer1.0.conv2.weight", 1),
    }
    buffers = {(m.value.name, m.axis) for m in group.members if m.value.is_initializer and not m.is_param}
    assert {("layer1.0.bn1.running_mean", 0), ("layer1.0.bn1.running_var", 0)} <= buffers
    stream = next(g for g in groups if ("layer1.0.conv2.weight", 0) in members(g))
    assert stream.kind == "stream" and ("conv1.weight", 0) in members(stream)  # the stem starts it


class FlattenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 5 * 5, 6)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_flatten_before_linear_gives_each_channel_its_features():
    # Static shapes: with a dynamic H x W the flattened size is symbolic and cannot meet fc's 100.
    (group,) = [g for g in groups_of(FlattenNet(), torch.randn(2, 3, 5, 5), dynamic=False) if g.prunable]
    assert group.size == 4 and group.width == 25
    fc = next(m for m in group.members if m.value.name == "fc.weight")
    assert fc.axis == 1 and fc.units == tuple(u for u in range(4) for _ in range(25))


class ConcatNet(nn.Module):
    """DenseNet-style: two convs concatenated, then one conv reads both."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 3, 1), nn.Conv2d(5, 4, 1)

    def forward(self, x):
        return self.c(torch.relu(torch.cat([self.a(x), self.b(x)], dim=1)))


def test_concat_places_each_operand_at_its_offset():
    groups = [g for g in groups_of(ConcatNet(), torch.randn(1, 3, 4, 4)) if g.prunable]
    assert len(groups) == 1 and groups[0].size == 5  # the concat's axis joins both operands' units
    c = next(m for m in groups[0].members if m.value.name == "c.weight")
    a = next(m for m in groups[0].members if m.value.name == "a.weight")
    b = next(m for m in groups[0].members if m.value.name == "b.weight")
    assert c.units == a.units + b.units


class CumsumMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x):
        return x + self.fc2(torch.cumsum(self.fc1(x), dim=-1))


def test_an_op_without_axis_map_stops_the_group():
    (hidden,) = [g for g in groups_of(CumsumMLP(), torch.randn(2, 4)) if ("fc1.weight", 0) in members(g)]
    assert not hidden.prunable and "cumsum" in hidden.reason and "has no axis map" in hidden.reason


def test_depthwise_conv_couples_its_input_and_output_channel():
    model = nn.Sequential(
        nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=6), nn.ReLU(), nn.Conv2d(6, 2, 1)
    )
    (group,) = [g for g in groups_of(model, torch.randn(1, 3, 5, 5)) if g.prunable]
    assert members(group) == {("0.weight", 0), ("0.bias", 0), ("2.weight", 0), ("2.bias", 0), ("4.weight", 1)}


def test_rows_and_json():
    analysis = find_groups(load(build("residual_mlp").module, torch.randn(2, 16)))
    rows = analysis.rows()
    assert set(rows[0]) == {"name", "kind", "size", "unit", "params", "prunable", "reason"}
    data = json.loads(json.dumps(analysis.to_json()))
    assert len(data["groups"]) == len(rows) and data["groups"][2]["members"][0]["size"] == 32


def test_replace_ints_edits_lifted_and_template_arguments():
    graph = load(build("llama").module, None, example_kwargs=build("llama").kwargs)
    view = next(n for n in graph if n.op_type == "aten::view" and n.outputs[0].shape[-2:] == (4, 8))
    attrs = call_of(view).replace_ints("size", lambda k, old: old * 10)
    assert attrs["args"][1][2:] == [-10, 80] and view.attrs["args"][1][2:] == [
        -1,
        8,
    ]  # slots kept, node untouched
    transpose = next(n for n in graph if n.op_type == "aten::transpose.int")
    assert (
        call_of(transpose).replace_ints("dim0", lambda k, old: old + 1)["dim0"] == transpose.attrs["dim0"] + 1
    )


def test_inspect_groups_on_the_command_line():
    import json
    import subprocess
    import sys

    from tools.models import cached_onnx

    result = subprocess.run(
        [sys.executable, "-m", "rescompile", "inspect", str(cached_onnx("gpt2")), "--groups", "--json"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    groups = json.loads(result.stdout)["groups"]
    kinds = {(g["kind"], g["prunable"]) for g in groups}
    assert ("heads", True) in kinds and ("mlp", True) in kinds
    assert all(g["reason"] for g in groups if not g["prunable"])  # every refusal says why
