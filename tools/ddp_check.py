"""Worker for the DistributedDataParallel test: each of 2 processes rewrites the
same model with rescompile, wraps it in DDP (gloo, localhost) and trains a few
steps on its own data; the new parameters must move and stay in sync."""

from __future__ import annotations

import os

import torch


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    import rescompile
    from tools.models import ResidualMLP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        base = ResidualMLP().eval()
        x = torch.randn(2, 5, 16)
        model = rescompile.apply(base, ["rezero:init=0.5"], (x,), dynamic=True)  # trained on batch 4
        model.train()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(100 + rank)
        losses = []
        for _ in range(5):
            inputs, target = torch.randn(4, 5, 16, generator=gen), torch.randn(4, 5, 4, generator=gen)
            loss = torch.nn.functional.mse_loss(ddp(inputs), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        alphas = {k: v.detach().clone() for k, v in model.named_parameters() if k.startswith("rescompile.")}
        torch.save({"alphas": alphas, "losses": losses}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
