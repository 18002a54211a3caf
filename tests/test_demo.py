"""`rescompile demo` runs the whole job and checks its own claims."""

from rescompile.cli import main


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "8 residual sites (8 identity, 0 projection) in 1 streams" in out
    assert "bit-identical: yes" in out
    assert out.count("validate: outputs within tolerance atol=1e-05 (x max|want|) rtol=0.0001") == 3
    assert "validate: outputs within tolerance atol=0 (x max|want|) rtol=0" in out  # the identity round trip
    assert "fold: folded=8" in out
    # rezero init=0 changes the function: reported as expected, never as a failure
    assert "validate: outputs differ from the original, as expected" in out
    assert "NOT within" not in out and "NO\n" not in out
    assert (tmp_path / "tiny_transformer.onnx").exists()
