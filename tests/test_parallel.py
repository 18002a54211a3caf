"""parallel: checked against GPT-NeoX configured the other way, and exact at c=1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rescompile
from rescompile.errors import RescompileError
from rescompile.validation import assert_close
from tools.models import bert, cached_onnx


def neox(parallel: bool, layers: int = 2):
    import transformers as T

    torch.manual_seed(0)
    cfg = T.GPTNeoXConfig(
        vocab_size=101,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        use_parallel_residual=parallel,
        use_cache=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    return T.GPTNeoXModel(cfg).eval()


def _hidden(out):
    return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]).detach().numpy()


IDS = {"input_ids": torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(1))}


def test_parallel_equals_gpt_neox_with_parallel_residual():
    sequential = neox(parallel=False)
    reference = neox(parallel=True)
    reference.load_state_dict(sequential.state_dict())  # same weights, the other layout
    out = rescompile.apply(sequential, ["parallel"], example_kwargs=IDS)
    with torch.no_grad():
        want = _hidden(reference(**IDS))
        assert_close(_hidden(out(**IDS)), want)
        assert not np.allclose(_hidden(sequential(**IDS)), want, atol=1e-4)  # the layouts differ


def test_c_one_keeps_the_function_and_learnable_c_trains():
    model = neox(parallel=False)
    out = rescompile.apply(model, ["parallel:c=1,learnable=true"], example_kwargs=IDS)
    with torch.no_grad():
        assert_close(_hidden(out(**IDS)), _hidden(model(**IDS)))
    cs = [p for name, p in out.named_parameters() if name.startswith("rescompile.parallel")]
    assert len(cs) == 2
    out.train()
    _hidden_t = out(**IDS)
    (_hidden_t.last_hidden_state if hasattr(_hidden_t, "last_hidden_state") else _hidden_t[0]).pow(
        2
    ).mean().backward()
    assert all(c.grad is not None and c.grad.abs() > 0 for c in cs)


def test_zero_mlp_output_makes_both_forms_agree():
    model = neox(parallel=False)
    with torch.no_grad():
        for layer in model.layers:
            layer.mlp.dense_4h_to_h.weight.zero_()
            layer.mlp.dense_4h_to_h.bias.zero_()
    out = rescompile.apply(model, ["parallel"], example_kwargs=IDS)
    with torch.no_grad():
        assert_close(_hidden(out(**IDS)), _hidden(model(**IDS)))


def test_shared_norm_equals_the_mlp_reading_the_attention_norm():
    model = neox(parallel=False)
    reference = neox(parallel=True)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer in reference.layers:  # GPT-J form: the MLP reads N1 x
            layer.post_attention_layernorm.load_state_dict(layer.input_layernorm.state_dict())
    out = rescompile.apply(model, ["parallel:shared_norm=true"], example_kwargs=IDS)
    with torch.no_grad():
        assert_close(_hidden(out(**IDS)), _hidden(reference(**IDS)))
    assert not any("post_attention_layernorm" in name for name, _ in out.named_parameters())


def test_parallel_on_onnx_runs_and_c_one_is_exact(tmp_path):
    source = cached_onnx("gpt2")
    out = tmp_path / "p.onnx"
    result = rescompile.pipeline.compile_model(str(source), ["parallel:c=1"], output=out, validate=True)
    assert result.result.stats["0:parallel"]["layers"] == 2
    assert result.validation.ok


def post_norm_parallel_reference(model, c: float = 0.0):
    """HF BERT's own modules called the post-norm parallel way: h = N1(x + A x) as in the layer,
    then x' = N2(h + M(x + c (h - x))) (c = 0: the MLP reads the layer's input)."""

    def forward(input_ids, attention_mask):
        assert bool(attention_mask.all())  # no padding: attention without a mask is the same
        x = model.embeddings(input_ids=input_ids)
        for layer in model.encoder.layer:
            h = layer.attention(x)[0]
            x = layer.output(layer.intermediate(x + c * (h - x)), h)
        return x

    return forward


@pytest.mark.parametrize("c", [0.0, 0.5])
def test_post_norm_bert_equals_its_modules_called_in_parallel(c):
    case = bert()
    out = rescompile.apply(case.module, [f"parallel:c={c}"], example_kwargs=case.kwargs)
    with torch.no_grad():
        want = post_norm_parallel_reference(case.module, c)(**case.kwargs).numpy()
        assert_close(_hidden(out(**case.kwargs)), want)
        assert not np.allclose(_hidden(case.module(**case.kwargs)), want, atol=1e-4)  # it differs


def test_post_norm_c_one_is_exact_and_shared_norm_is_refused(tmp_path):
    out = tmp_path / "p.onnx"
    result = rescompile.pipeline.compile_model(
        str(cached_onnx("bert")), ["parallel:c=1,learnable=true"], output=out, validate=True
    )
    assert result.result.stats["0:parallel"]["layers"] == 2 and result.validation.ok
    with pytest.raises(RescompileError, match="shared_norm needs a pre-norm layer"):
        rescompile.apply(str(cached_onnx("bert")), ["parallel:shared_norm=true"])


def test_parallel_module_trains():
    model = neox(parallel=False)
    out = rescompile.apply(model, ["parallel"], example_kwargs=IDS)
    out.train()
    target = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.SGD(out.parameters(), lr=0.05)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        result = out(**IDS)
        hidden = result.last_hidden_state if hasattr(result, "last_hidden_state") else result[0]
        loss = (hidden - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
