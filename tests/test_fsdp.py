"""Rewritten modules train under FSDP2 (`fully_shard`) as in one process: two CPU processes (gloo)
train a gated and a hyper-connected tiny GPT-2 on their own batches; the losses and the gathered
parameters must equal single-process training on both ranks' batches (tools/fsdp_check.py)."""

from __future__ import annotations

import socket

import pytest
import torch

from rescompile.validation import assert_close

SPECS = ["gate", "hyper:n=2"]


def _fsdp2_unavailable() -> str | None:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if torch.distributed.is_gloo_available() else "torch.distributed has no gloo backend"


@pytest.mark.skipif(_fsdp2_unavailable() is not None, reason=str(_fsdp2_unavailable()))
def test_fsdp2_two_processes_match_single_process(tmp_path):
    import torch.multiprocessing as mp

    from tools.fsdp_check import train_single, worker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, str(tmp_path), SPECS), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for spec in SPECS:
        single = train_single(spec)
        for rank in ranks:
            got = rank[spec]
            assert got["params"].keys() == single["params"].keys()
            torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(single["losses"]))
            for name, value in single["params"].items():
                assert_close(got["params"][name], value)
        new = [k for k in single["params"] if k.startswith("rescompile.")]
        assert new, f"{spec} added no parameters"
        # the rewrite's own parameters trained (so equal parameters are not just untouched ones)
        assert any(not torch.equal(single["params"][k], ranks[0][spec]["initial"][k]) for k in new)
