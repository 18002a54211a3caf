"""`rescompile demo` runs the whole job and checks its own claims."""

from rescompile.cli import main


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "8 residual sites (8 identity, 0 projection) in 1 streams" in out
    assert "bit-identical: yes" in out
    assert out.count("validate: outputs within atol=1e-05") == 3  # rezero, layerscale+fold, hyper
    assert "fold: {'folded': 8}" in out
    assert "validate: outputs NOT within" in out  # rezero init=0 changes the function
    assert (tmp_path / "tiny_transformer.onnx").exists()
