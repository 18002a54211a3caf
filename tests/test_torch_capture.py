"""torch capture: the bounded dynamic-shape attempt, and multi-output aten ops kept as
multi-output IR nodes with readable attributes."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time

import pytest
import sympy
import torch
from torch import nn

from rescompile.errors import RescompileError
from rescompile.frontends import torch as tf


class _Block(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc(self.norm(x))


@pytest.fixture
def warnings_seen():
    """Records of the rescompile.torch logger (pytest runs with -p no:logging here)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("rescompile.torch")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


@pytest.fixture
def slow_dynamic_export(monkeypatch):
    """torch.export.export that spends 0.5 s in sympy before a dynamic-shape capture, as
    symbolic shape solving on Swin does for minutes; returns the dynamic_shapes it got."""
    real = torch.export.export
    calls: list = []

    def export(*args, dynamic_shapes=None, **kwargs):
        calls.append(dynamic_shapes)
        end = time.perf_counter() + 0.5
        while dynamic_shapes is not None and time.perf_counter() < end:
            sympy.factor(sympy.Symbol("s") ** 12 - 1)
        return real(*args, dynamic_shapes=dynamic_shapes, **kwargs)

    monkeypatch.setattr(torch.export, "export", export)
    return calls


def _input_shape(gm) -> tuple:
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    return tuple(placeholder.meta["val"].shape)


def _is_static(shape: tuple) -> bool:
    return all(isinstance(d, int) for d in shape)


def test_auto_interrupts_a_real_export_and_captures_static_shapes(warnings_seen, monkeypatch):
    # The bound fires inside torch.export's own shape solver: the static capture after it must
    # still work, without the dim markers the interrupted export left on the input. The solver is
    # made slow (0.5 s of sympy before the real guards are produced), as it is on Swin: a small
    # model's real solving can finish between two ticks of the timer, which would make this flaky.
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    real = ShapeEnv.produce_guards

    def slow_guards(self, *args, **kwargs):
        end = time.perf_counter() + 0.5
        while time.perf_counter() < end:
            sympy.factor(sympy.Symbol("s") ** 12 - 1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ShapeEnv, "produce_guards", slow_guards)
    model, x = _Block().eval(), torch.randn(2, 8, 16)
    x.user_mark = "kept"
    gm, method = tf.capture(model, (x,), {}, dynamic="auto", dynamic_timeout=0.1)
    assert method == "torch.export" and _input_shape(gm) == (2, 8, 16)
    assert vars(x) == {"user_mark": "kept"}
    torch.testing.assert_close(gm(x), model(x))
    assert len(warnings_seen) == 1
    message = warnings_seen[0].getMessage()
    assert "\n" not in message and "static shapes" in message and "_Block" in message


def test_the_fallback_prints_one_line_to_stderr():
    # As the CLI runs it: no logging configured, so logging's last-resort handler prints the message.
    # The solver is slowed as in the test above, so the bound reliably fires inside it.
    code = (
        "import time, sympy, torch; from rescompile.frontends import torch as tf; "
        "from torch.fx.experimental.symbolic_shapes import ShapeEnv; real = ShapeEnv.produce_guards\n"
        "def slow(self, *a, **k):\n"
        "    end = time.perf_counter() + 0.5\n"
        "    while time.perf_counter() < end: sympy.factor(sympy.Symbol('s') ** 12 - 1)\n"
        "    return real(self, *a, **k)\n"
        "ShapeEnv.produce_guards = slow\n"
        "model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16))\n"
        "tf.capture(model, (torch.randn(2, 8, 16),), {}, dynamic_timeout=0.1)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("rescompile: warning: dynamic-shape capture of Sequential")


def test_auto_without_timeout_stays_dynamic(warnings_seen):
    model, x = _Block().eval(), torch.randn(2, 8, 16)
    gm, _ = tf.capture(model, (x,), {})
    assert not _is_static(_input_shape(gm))
    torch.testing.assert_close(gm(torch.randn(3, 5, 16)).shape, torch.Size([3, 5, 16]))
    assert warnings_seen == []


def test_auto_falls_back_after_the_bound_and_import_module_passes_it_on(slow_dynamic_export, warnings_seen):
    model, x = _Block().eval(), torch.randn(2, 8, 16)
    start = time.perf_counter()
    graph = tf.import_module(model, x, dynamic_timeout=0.05)
    assert time.perf_counter() - start < 5
    assert graph.inputs[0].shape == (2, 8, 16)
    assert [d is not None for d in slow_dynamic_export] == [True, False]
    assert len(warnings_seen) == 1
    torch.testing.assert_close(tf.export_module(graph)(x), model(x))


def test_dynamic_true_waits_for_the_dynamic_capture(slow_dynamic_export, warnings_seen):
    model, x = _Block().eval(), torch.randn(2, 8, 16)
    gm, _ = tf.capture(model, (x,), {}, dynamic=True, dynamic_timeout=0.05)
    assert not _is_static(_input_shape(gm))
    assert [d is not None for d in slow_dynamic_export] == [True]
    assert warnings_seen == []


def test_dynamic_false_skips_the_dynamic_attempt(slow_dynamic_export, warnings_seen):
    gm, _ = tf.capture(_Block().eval(), (torch.randn(2, 8, 16),), {}, dynamic=False)
    assert _is_static(_input_shape(gm))
    assert slow_dynamic_export == [None]
    assert warnings_seen == []


def test_no_bound_off_the_main_thread(slow_dynamic_export, warnings_seen):
    result = {}

    def work():
        result["gm"], _ = tf.capture(_Block().eval(), (torch.randn(2, 8, 16),), {}, dynamic_timeout=0.05)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert not _is_static(_input_shape(result["gm"]))
    assert warnings_seen == []


def test_the_callers_alarm_handler_and_timer_are_restored(slow_dynamic_export):
    fired = []

    def handler(*_):
        fired.append(True)

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 30)
        tf.capture(_Block().eval(), (torch.randn(2, 8, 16),), {}, dynamic_timeout=0.05)
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 20 < left < 30
        assert signal.getsignal(signal.SIGALRM) is handler and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_bad_dynamic_value():
    with pytest.raises(RescompileError, match="dynamic="):
        tf.capture(_Block(), (torch.randn(2, 16),), {}, dynamic="yes")


class _Structured(nn.Module):
    """Every multi-output aten op family the importer folds getitems into."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.ln = nn.LayerNorm(8)

    def forward(self, x):
        y, indices = self.pool(self.bn(self.conv(x)))
        a, b = y.split([3, 5], dim=1)
        var, mean = torch.var_mean(a, dim=1)
        z = self.ln(y.permute(0, 2, 3, 1))
        first, _ = z.chunk(2, -1)
        return first + var.unsqueeze(-1) + mean.unsqueeze(-1) + torch.unbind(b, 1)[0].unsqueeze(-1), indices


def _structured():
    torch.manual_seed(0)
    model = _Structured().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return model, torch.randn(2, 3, 8, 8)


def _by_op(graph) -> dict[str, object]:
    return {node.op_type.split("::")[-1].split(".")[0]: node for node in graph}


def _assert_same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_multi_output_ops_become_one_node_each_without_getitems():
    model, x = _structured()
    graph = tf.import_module(model, x, dynamic=False)
    ops = _by_op(graph)
    assert "getitem" not in ops
    split = ops["split_with_sizes"]
    assert [out.shape for out in split.outputs] == [(2, 3, 4, 4), (2, 5, 4, 4)]
    assert split.attrs["split_sizes"] == [3, 5] and split.attrs["dim"] == 1
    assert len(ops["max_pool2d_with_indices"].outputs) == 2
    assert ops["max_pool2d_with_indices"].outputs[1].dtype == "int64"
    assert [out.shape for out in ops["var_mean"].outputs] == [(2, 4, 4), (2, 4, 4)]
    unbind = ops["unbind"]
    assert len(unbind.outputs) == 5 and [bool(out.uses()) for out in unbind.outputs] == [True] + [False] * 4
    assert ops["chunk"].attrs["chunks"] == 2 and len(ops["chunk"].outputs) == 2
    assert ops["layer_norm"].attrs["normalized_shape"] == [8] and ops["layer_norm"].attrs["eps"] == 1e-5
    assert ops["batch_norm"].attrs["eps"] == 1e-5 and ops["batch_norm"].attrs["training"] is False
    assert ops["conv2d"].attrs["padding"] == [1, 1]
    # The consumers read the multi-output node's outputs directly.
    assert split in ops["max_pool2d_with_indices"].outputs[0].consumers()
    _assert_same(tf.export_module(graph)(x), model(x))


def test_decomposed_norms_keep_their_unused_outputs_and_round_trip(tmp_path):
    model, x = _structured()
    ep = torch.export.export(model, (x,), strict=False).run_decompositions()
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    graph = tf.load_pt2(tmp_path / "m.pt2")
    ops = _by_op(graph)
    assert "getitem" not in ops
    for name in ("native_layer_norm", "_native_batch_norm_legit_no_training"):
        outputs = ops[name].outputs
        assert len(outputs) == 3 and outputs[0].uses() and not outputs[1].uses() and not outputs[2].uses()
    assert ops["native_layer_norm"].attrs["normalized_shape"] == [8]
    assert ops["_native_batch_norm_legit_no_training"].attrs["eps"] == 1e-5
    _assert_same(tf.export_module(graph)(x), model(x))
    tf.save_program(graph, tmp_path / "again.pt2")
    _assert_same(torch.export.load(str(tmp_path / "again.pt2")).module()(x), model(x))


def test_an_edited_attribute_reaches_the_exported_call():
    model, x = _structured()
    graph = tf.import_module(model, x, dynamic=False)
    _by_op(graph)["layer_norm"].attrs["eps"] = 10.0
    rewritten = tf.export_module(graph)
    model.ln.eps = 10.0
    _assert_same(rewritten(x), model(x))


def test_fx_fallback_folds_getitems_too(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("no export")

    monkeypatch.setattr(torch.export, "export", fail)
    model, x = _structured()
    graph = tf.import_module(model, x, dynamic=False)
    assert graph.source.method == "torch.fx"
    ops = _by_op(graph)
    assert "getitem" not in ops and len(ops["split"].outputs) == 2 and ops["split"].attrs["dim"] == 1
    assert ops["layer_norm"].attrs["eps"] == 1e-5
    _assert_same(tf.export_module(graph)(x), model(x))


class _Attention(nn.Module):
    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        return x + torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def test_attention_head_count_is_an_attribute():
    model, x = _Attention().eval(), torch.randn(2, 6, 32)
    graph = tf.import_module(model, x, dynamic=False)
    ops = _by_op(graph)
    assert ops["scaled_dot_product_attention"].attrs["num_heads"] == 4
    assert "getitem" not in ops and len(ops["unbind"].outputs) == 3
    _assert_same([tf.export_module(graph)(x)], [model(x)])
