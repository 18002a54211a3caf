"""ladder, macaron and shallow on HF LLaMA in torch, whose RMSNorm reads the stream through a
dtype-keeping cast (x.to(float32)): that is still a pre-norm link. The exact starts keep the
function; the non-exact forms compute the same in torch as in ONNX, where there is no cast."""

from __future__ import annotations

import pytest
import torch

import rescompile
from rescompile.validation import assert_close, run_onnx
from tools.models import cached_onnx, llama


def _hidden(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@pytest.mark.parametrize("spec", ["ladder:c=1", "macaron"])
def test_exact_starts_keep_the_function(spec):
    case = llama()
    out = rescompile.apply(case.module, [spec], example_kwargs=case.kwargs)
    with torch.no_grad():
        assert_close(_hidden(out(**case.kwargs)), _hidden(case.module(**case.kwargs)))


@pytest.mark.parametrize("spec", ["ladder", "shallow", "macaron"])
def test_torch_and_onnx_compute_the_same(spec):
    case = llama()
    rewritten = rescompile.apply(case.module, [spec], example_kwargs=case.kwargs)
    onnx_model = rescompile.apply(str(cached_onnx("llama")), [spec])
    feeds = {"input_ids": case.kwargs["input_ids"].numpy()}
    (got,) = [v for k, v in run_onnx(onnx_model.SerializeToString(), feeds).items()][:1]
    with torch.no_grad():
        want = _hidden(rewritten(**case.kwargs)).numpy()
        assert_close(got, want)
        if spec != "macaron":  # the non-exact forms change the function
            assert abs(want - _hidden(case.module(**case.kwargs)).numpy()).max() > 1e-3
