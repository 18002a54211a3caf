"""Worker for the FSDP2 test: each of 2 processes rewrites the same tiny GPT-2 with rescompile,
shards it with `torch.distributed.fsdp.fully_shard` (gloo, CPU, localhost) and trains a few SGD
steps on its own batches. FSDP averages gradients over the ranks, so the result must equal
single-process training whose loss is the mean of both ranks' losses (`train_single`).

fully_shard refuses 0-d parameters ("fully_shard doesn't support scalar parameters"); rescompile
stores its trainable scalars (gate's b, rezero's alpha, hyper's scales) with shape (1,), so every
parameter is sharded as it is."""

from __future__ import annotations

import os

import torch

STEPS = 4
LR = 0.05


def rewritten(spec: str) -> torch.nn.Module:
    """The same rewritten model in every process (seeded build, seeded pass)."""
    import rescompile
    from tools.models import gpt2

    case = gpt2(layers=1)
    return rescompile.apply(case.module, [spec], example_kwargs=case.kwargs, dynamic=False).train()


def batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank `rank`'s (input_ids, target) per step: the tiny GPT-2's shape (2, 8), width 32."""
    gen = torch.Generator().manual_seed(100 + rank)
    return [
        (torch.randint(0, 101, (2, 8), generator=gen), torch.randn(2, 8, 32, generator=gen))
        for _ in range(STEPS)
    ]


def loss_of(model: torch.nn.Module, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    hidden = out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()))
    return torch.nn.functional.mse_loss(hidden, target)


def train_single(spec: str, world: int = 2) -> dict:
    """One process, the ranks' batches together: the loss of a step is the mean of theirs."""
    model = rewritten(spec)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    data = [batches(r) for r in range(world)]
    losses = []
    for step in range(STEPS):
        loss = sum(loss_of(model, *data[r][step]) for r in range(world)) / world
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "params": {k: v.detach().clone() for k, v in model.named_parameters()}}


def worker(rank: int, world: int, port: int, out_dir: str, specs: list[str]) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        results = {}
        for spec in specs:
            model = rewritten(spec)
            initial = {k: v.detach().clone() for k, v in model.named_parameters()}
            fully_shard(model, mesh=mesh)
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            losses = []
            for ids, target in batches(rank):
                loss = loss_of(model, ids, target)
                opt.zero_grad()
                loss.backward()
                opt.step()
                mean = loss.detach().clone()
                dist.all_reduce(mean)
                losses.append(mean.item() / world)
            params = {
                k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                for k, v in model.named_parameters()
            }
            results[spec] = {"losses": losses, "params": params, "initial": initial}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
