"""The one tolerance rule (rescompile.validation.Tolerance): scale-aware, strict where it
must be, and loose enough for float32 reassociation on real models in ONNX Runtime."""

import numpy as np
import pytest
import torch

from rescompile.cli import main
from rescompile.validation import DEFAULT_TOLERANCE, Tolerance, assert_close, diff, observed_ratios


def test_rounding_of_large_outputs_passes_and_wrong_rewrites_fail():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((4, 50)) * 40).astype(np.float32)  # LM logits of magnitude 10-100
    rounding = logits * (1 + rng.uniform(-3e-6, 3e-6, logits.shape)).astype(np.float32)
    res = diff("logits", logits, rounding)
    assert res.ok and res.max_abs > 1e-5  # an absolute 1e-5 alone would reject this
    assert diff("logits", logits, logits * np.float32(1.01)).ok is False  # a 1% error is a wrong rewrite
    small = rng.standard_normal(100).astype(np.float32) * 1e-3
    assert not diff("small", small, small + 2e-5).ok  # near zero the absolute floor (1e-5) holds


def test_report_names_the_worst_element_and_ratio():
    want = np.zeros((2, 3), np.float32)
    got = want.copy()
    got[1, 2] = 5e-6
    res = diff("y", want, got)
    assert res.ok and res.worst[0] == (1, 2) and res.worst[2] == pytest.approx(5e-6)
    assert res.ratio == pytest.approx(0.5, rel=1e-3)  # 5e-6 of an allowed 1e-5
    assert res.max_rel == pytest.approx(5e-6)  # want is all zero: max_rel falls back to the abs diff


def test_bit_exact_ints_nan_and_shapes():
    exact = Tolerance(0, 0)
    x = np.float32([1.0, 2.0])
    assert diff("x", x, x, exact.atol, exact.rtol).ok
    assert not diff("x", x, np.nextafter(x, 3).astype(np.float32), exact.atol, exact.rtol).ok
    ids = np.int64([1, 2, 3])
    assert not diff("ids", ids, ids + 1).ok  # integer outputs must be equal whatever the tolerance
    nan = np.float32([np.nan, np.inf])
    assert diff("nan", nan, nan.copy()).ok and not diff("nan", nan, np.float32([0, np.inf])).ok
    assert not diff("shape", x, x[:1]).ok
    with pytest.raises(Exception, match="tolerances must be >= 0"):
        Tolerance(-1, 0)


def test_assert_close_message_is_useful():
    with pytest.raises(AssertionError, match=r"worst element \(\(1,\), 2.0, 3.0\)"):
        assert_close(np.float32([1, 3]), np.float32([1, 2]))
    observed_ratios.clear()  # that failure was the point: keep it out of the margin report
    assert DEFAULT_TOLERANCE == Tolerance(1e-5, 1e-4)


def _export(module, args, path, names):
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), dynamo=True, input_names=names, verbose=False)


def test_cli_validate_passes_on_gpt2_lm_logits_after_hyper(tmp_path, capsys):
    import transformers as T

    torch.manual_seed(0)
    cfg = T.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=500, n_positions=64, use_cache=False)
    model = T.GPT2LMHeadModel(cfg).eval()
    src = tmp_path / "gpt2_lm.onnx"
    _export(model, (torch.randint(0, 500, (2, 16)),), src, ["input_ids"])
    out = tmp_path / "hyper.onnx"
    assert main(["apply", str(src), "-p", "hyper:n=4,dynamic=true", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["validate", str(src), str(out)]) == 0
    assert "validate: outputs within tolerance" in capsys.readouterr().out


def test_cli_validate_passes_on_torchvision_resnet50_after_laurel_pa(tmp_path, capsys):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    src = tmp_path / "resnet50.onnx"
    _export(model, (torch.randn(1, 3, 64, 64),), src, ["x"])
    out = tmp_path / "pa.onnx"
    assert main(["apply", str(src), "-p", "laurel:variant=pa", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["validate", str(src), str(out)]) == 0
    assert "validate: outputs within tolerance" in capsys.readouterr().out
