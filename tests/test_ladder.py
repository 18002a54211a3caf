"""ladder: against a hand-written x_k = x_{k-1} + h_k(x_{k-2}) calling the original submodules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rescompile
from rescompile.errors import RescompileError
from rescompile.examples import TinyTransformer
from rescompile.validation import assert_close
from tools.models import ModelCase, PostNormMLP, ResidualMLP, export_onnx

IDS = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(1))


def tiny(layers: int = 3) -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer(width=16, heads=2, layers=layers).eval()


def modules(model: TinyTransformer) -> list:
    """h_1, h_2, ...: each pre-norm branch of the stack, built from the model's own submodules."""
    hs = []
    for block in model.blocks:
        hs.append(lambda z, b=block: b.attn(b.ln1(z), b.ln1(z), b.ln1(z), need_weights=False)[0])
        hs.append(lambda z, b=block: b.mlp(b.ln2(z)))
    return hs


def reference(model: TinyTransformer, ids: torch.Tensor, ladder_from: int = 0) -> torch.Tensor:
    """x_k = x_{k-1} + h_k(x_{k-2}) for modules k >= ladder_from (x_{-1} := x_0), else h_k(x_{k-1})."""
    x = model.tok(ids) + model.pos[:, : ids.shape[1]]
    before = x  # x_{k-2}
    for k, h in enumerate(modules(model)):
        reads = before if k >= ladder_from else x
        before, x = x, x + h(reads)
    return model.head(model.norm(x))


@pytest.mark.parametrize("spec,ladder_from", [("ladder", 0), ("ladder:layers=1", 4)])
def test_ladder_equals_the_hand_written_recurrence(spec, ladder_from):
    model = tiny()
    out = rescompile.apply(model, [spec], (IDS,), dynamic=False)
    with torch.no_grad():
        got, want = out(IDS).numpy(), reference(model, IDS, ladder_from).numpy()
        assert_close(got, want)
        assert not np.allclose(got, model(IDS).numpy(), atol=1e-3)


def test_ladder_on_onnx_in_ort_equals_the_recurrence(tmp_path):
    model = tiny(layers=2)
    src = export_onnx(ModelCase("tiny", model, (IDS,), {}, sites=4), tmp_path / "src" / "t.onnx")
    proto = rescompile.apply(str(src), ["ladder"])
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: IDS.numpy()})
    with torch.no_grad():
        assert_close(got, reference(model, IDS).numpy())


def test_c_one_keeps_the_function_and_learnable_c_gets_gradients():
    model = tiny()
    out = rescompile.apply(model, ["ladder:c=1,learnable=true"], (IDS,), dynamic=False)
    with torch.no_grad():
        assert_close(out(IDS).numpy(), model(IDS).numpy())
    cs = [p for name, p in out.named_parameters() if name.startswith("rescompile.ladder")]
    assert len(cs) == 5  # every module but the stream's first
    out.train()
    out(IDS).logsumexp(-1).mean().backward()
    assert all(c.grad is not None and c.grad.abs() > 0 for c in cs)


def test_rewritten_module_trains():
    out = rescompile.apply(tiny(layers=2), ["ladder"], (IDS,), dynamic=False)
    out.train()
    opt = torch.optim.SGD(out.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        logits = out(IDS)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), IDS[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "model,spec,match",
    [
        (PostNormMLP(), "ladder", "pre-norm"),
        (ResidualMLP(blocks=1), "ladder", "no selected module"),
        (ResidualMLP(), "ladder:sites=depth:0-0", "no selected module"),
    ],
)
def test_refusals_name_the_reason(model, spec, match):
    x = torch.randn(2, 5, 16)
    with pytest.raises(RescompileError, match=match) as info:
        rescompile.apply(model.eval(), [spec], (x,), dynamic=False)
    assert "\n" not in str(info.value)
