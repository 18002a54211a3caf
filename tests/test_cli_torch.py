"""The CLI on torch programs: .pt2 in, .pt2 or .onnx out; pickles only when trusted."""

import torch

from rescompile.cli import main
from rescompile.validation import assert_close, run_onnx
from tools.models import build


def save_pt2(tmp_path, name="residual_cnn"):
    case = build(name)
    ep = torch.export.export(case.module, case.args, case.kwargs, strict=False)
    path = tmp_path / f"{name}.pt2"
    torch.export.save(ep, str(path))
    return case, path


def test_pt2_inspect_apply_to_pt2_and_onnx(tmp_path, capsys):
    case, path = save_pt2(tmp_path)
    before = path.read_bytes()
    assert main(["inspect", str(path)]) == 0
    assert "4 residual sites (3 identity, 1 projection) in 2 streams" in capsys.readouterr().out
    assert main(["apply", str(path), "-p", "rezero", "-o", str(tmp_path / "o.pt2"), "--validate"]) == 0
    assert (
        "validate: outputs within tolerance atol=1e-05 (x max|want|) rtol=0.0001" in capsys.readouterr().out
    )
    program = torch.export.load(str(tmp_path / "o.pt2"))
    with torch.no_grad():
        assert_close(program.module()(*case.args), case.module(*case.args))
    assert main(["apply", str(path), "-p", "rezero:init=0", "-o", str(tmp_path / "o.onnx")]) == 0
    (got,) = run_onnx(str(tmp_path / "o.onnx"), {"x": case.args[0].numpy()}).values()
    assert got.shape == tuple(case.module(*case.args).shape)
    assert path.read_bytes() == before


def test_pickles_need_trust_and_state_dicts_are_refused(tmp_path, capsys):
    case = build("residual_mlp")
    torch.save(case.module, tmp_path / "m.pt")
    torch.save(case.module.state_dict(), tmp_path / "sd.pt")
    torch.save(case.args, tmp_path / "inputs.pt")
    assert main(["inspect", str(tmp_path / "m.pt")]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "sd.pt"), "--trust-pickle"]) == 2
    assert "holds a state dict" in capsys.readouterr().err
    assert (
        main(
            [
                "inspect",
                str(tmp_path / "m.pt"),
                "--trust-pickle",
                "--example-inputs",
                str(tmp_path / "inputs.pt"),
            ]
        )
        == 0
    )
    assert "3 residual sites" in capsys.readouterr().out
    assert (
        main(
            [
                "apply",
                str(tmp_path / "m.pt"),
                "--trust-pickle",
                "--example-inputs",
                str(tmp_path / "inputs.pt"),
                "-p",
                "rezero",
                "-o",
                str(tmp_path / "m.pt2"),
                "--validate",
            ]
        )
        == 0
    )
    assert "within" in capsys.readouterr().out


def test_unreadable_pt2_is_one_line(tmp_path, capsys):
    (tmp_path / "bad.pt2").write_bytes(b"not a zip")
    assert main(["inspect", str(tmp_path / "bad.pt2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a readable torch.export program" in err[0]


def test_capture_mode_flags(tmp_path, capsys):
    case = build("residual_mlp")
    torch.save(case.module, tmp_path / "m.pt")
    torch.save(case.args, tmp_path / "inputs.pt")
    common = [str(tmp_path / "m.pt"), "--trust-pickle", "--example-inputs", str(tmp_path / "inputs.pt")]
    assert main(["inspect", *common, "--static"]) == 0
    assert "3 residual sites" in capsys.readouterr().out
    assert main(["inspect", *common, "--dynamic", "--dynamic-timeout", "60"]) == 0
    assert main(["inspect", *common, "--dynamic-timeout", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dynamic-timeout must be > 0" in err
