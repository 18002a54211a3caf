"""Output guarantees (issue 15, part 3): writes are atomic and outputs deterministic.

Atomic: a failure part-way through writing (an exception injected into the chunked model
writer, or SIGKILL in a child process) leaves an existing output and its external data
exactly as they were, and no temporary files (a killed writer's staging folder is swept by
the next write into the folder). Deterministic: the same input and passes give
byte-identical files (model and external data) in two processes with different
PYTHONHASHSEED, for ONNX input and for a torch module (.pt2 and .onnx out).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_bad_inputs import residual_mlp, save_external

from rescompile.cli import main
from rescompile.frontends import _onnx_write
from rescompile.frontends._staging import STALE_SECONDS, TEMP_PREFIX

ROOT = Path(__file__).resolve().parents[1]


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture
def existing_output(tmp_path):
    """An input with external data and an earlier output of it (o.onnx + o.onnx.data) in out/."""
    (tmp_path / "in").mkdir()
    src = tmp_path / "in" / "m.onnx"
    save_external(residual_mlp(width=16, blocks=6), src)
    out = tmp_path / "out" / "o.onnx"
    assert main(["apply", str(src), "-p", "rezero", "-o", str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.onnx", "o.onnx.data"]
    return src, out


class _FailingFile:
    """A file whose write() raises after `ok` successful writes."""

    def __init__(self, f, ok: int, action):
        self._f, self._left, self._action = f, ok, action

    def write(self, data):
        if self._left == 0:
            self._action(self._f)
        self._left -= 1
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def _raise(f):
    raise RuntimeError("injected write failure")


@pytest.mark.parametrize("ok_writes", [1, 3, 6])
def test_failure_while_writing_chunks_leaves_the_old_output(existing_output, monkeypatch, capsys, ok_writes):
    src, out = existing_output
    before = hashes(out.parent), hashes(src.parent)
    monkeypatch.setattr(_onnx_write, "_NODES_PER_CHUNK", 4)  # 32 nodes: several chunks
    monkeypatch.setattr(
        _onnx_write,
        "open",
        lambda path, mode="r", *a: _FailingFile(open(path, mode, *a), ok_writes, _raise),
        raising=False,
    )
    assert main(["apply", str(src), "-p", "layerscale", "-o", str(out)]) == 2
    assert "RuntimeError: injected write failure" in capsys.readouterr().err
    assert (hashes(out.parent), hashes(src.parent)) == before  # old output intact, no temp files


def test_failure_in_the_external_data_writer_leaves_the_old_output(existing_output, monkeypatch, capsys):
    src, out = existing_output
    before = hashes(out.parent)
    real = _onnx_write.ir.external_data.unload_from_model

    def partial(model, base_dir, *args, **kwargs):
        real(model, base_dir, *args, **kwargs)  # the data file is complete in the staging folder
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_onnx_write.ir.external_data, "unload_from_model", partial)
    assert main(["apply", str(src), "-p", "layerscale", "-o", str(out)]) == 2
    assert f"cannot write {out}: No space left on device" in capsys.readouterr().err
    assert hashes(out.parent) == before


def test_a_failing_check_leaves_the_old_output(existing_output, monkeypatch, capsys):
    import onnx

    src, out = existing_output
    before = hashes(out.parent)

    def refuse(*args, **kwargs):
        raise onnx.checker.ValidationError("injected checker failure")

    monkeypatch.setattr(onnx.checker, "check_model", refuse)
    assert main(["apply", str(src), "-p", "layerscale", "-o", str(out)]) == 2
    assert "fails onnx.checker: injected checker failure" in capsys.readouterr().err
    assert hashes(out.parent) == before


_KILLED_CHILD = """
import os, sys, time
from pathlib import Path
from rescompile.cli import main
from rescompile.frontends import _onnx_write

mark = Path(sys.argv[1])


class Stall:
    def __init__(self, f):
        self.f, self.n = f, 0

    def write(self, data):
        self.n += 1
        if self.n == 4:  # part-way: the head and some chunks are on disk
            self.f.flush()
            mark.write_text(str(os.getpid()))
            time.sleep(120)
        return self.f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)


_onnx_write._NODES_PER_CHUNK = 4
_onnx_write.open = lambda path, mode="r": Stall(open(path, mode))
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_mid_write_leaves_the_old_output_and_the_next_write_sweeps(existing_output, tmp_path):
    src, out = existing_output
    before = hashes(out.parent)
    mark = tmp_path / "writing"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _KILLED_CHILD,
            str(mark),
            "apply",
            str(src),
            "-p",
            "layerscale",
            "-o",
            str(out),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.monotonic() + 120
        while not mark.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mark.exists(), "the child never reached the write"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    staged = [p for p in out.parent.iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert len(staged) == 1 and (staged[0] / "o.onnx").exists()  # killed part-way through
    assert {k: v for k, v in hashes(out.parent).items() if not k.startswith(TEMP_PREFIX)} == before

    # The next write into the folder removes the dead writer's staging folder once it is old
    # (a younger one might belong to a live writer on another machine sharing the folder).
    assert main(["apply", str(src), "-p", "rezero", "-o", str(out.parent / "p.onnx")]) == 0
    assert staged[0].exists()
    old = time.time() - STALE_SECONDS - 60
    os.utime(staged[0], (old, old))
    assert main(["apply", str(src), "-p", "rezero", "-o", str(out.parent / "p.onnx")]) == 0
    assert not staged[0].exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.onnx", "o.onnx.data", "p.onnx", "p.onnx.data"]


def _run(commands: list[list[str]], seed: int, cwd: Path) -> None:
    """Run CLI commands in one fresh process (one start-up of torch for several outputs)."""
    code = "import sys\nfrom rescompile.cli import main\n" + "".join(
        f"assert main({args!r}) == 0\n" for args in commands
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={**os.environ, "PYTHONHASHSEED": str(seed), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr


def test_onnx_output_is_byte_identical_across_hash_seeds(tmp_path):
    src = tmp_path / "m.onnx"
    save_external(residual_mlp(width=16, blocks=4), src)
    specs = ["-p", "layerscale", "-p", "hyper:n=2,dynamic=true", "-p", "gate"]
    for seed in (1, 2):
        _run([["apply", "m.onnx", *specs, "-o", f"s{seed}/o.onnx"]], seed, tmp_path)
    a, b = hashes(tmp_path / "s1"), hashes(tmp_path / "s2")
    assert sorted(a) == ["o.onnx", "o.onnx.data"] and a == b


def test_torch_output_is_byte_identical_across_hash_seeds(tmp_path):
    torch = pytest.importorskip("torch")
    from tools.models import build

    case = build("residual_mlp")
    torch.save(case.module, tmp_path / "m.pt")
    torch.save(case.args, tmp_path / "inputs.pt")
    common = [
        "apply",
        "m.pt",
        "--trust-pickle",
        "--example-inputs",
        "inputs.pt",
        "--static",
        "-p",
        "layerscale",
    ]
    for seed in (1, 2):
        _run([[*common, "-o", f"s{seed}/o.pt2"], [*common, "-o", f"s{seed}/o.onnx"]], seed, tmp_path)
    a, b = hashes(tmp_path / "s1"), hashes(tmp_path / "s2")
    assert {"o.pt2", "o.onnx"} <= set(a) and a == b
