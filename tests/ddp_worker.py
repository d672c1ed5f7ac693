"""Worker for test_torch_ddp: one rank of a 2-process DDP (gloo) training run over sparsebp layers:
SparseLinear ("linear"), SparseLinear with per-example sparse gradients on one of them
("linear_topk": sparse weights and meProp in one layer), or SparseConv2d (one padding in reflect
mode) with a per-example MePropLinear ("conv")."""
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import sparsebp.torch as st


def model(seed: int, kind: str = "linear") -> nn.Module:
    torch.manual_seed(seed)
    if kind == "conv":
        # (per-example meProp selects within each example's row, so splitting the batch between
        # processes selects what one process would on the whole batch)
        m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                          st.MePropLinear(8 * 4 * 4, 16, k=4), nn.ReLU(), nn.Linear(16, 5))
    else:
        m = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 5))
    st.sparsify(m, 0.8, layers=["0", "2"])
    if kind == "linear_topk":  # (per example: each example's selection does not depend on the split)
        from sparsebp.algorithms import MeProp

        m[2].grad_policy = MeProp(k=6)
    return m


def data(steps: int, batch: int, kind: str = "linear"):
    g = torch.Generator().manual_seed(123)
    shape = (batch, 3, 8, 8) if kind == "conv" else (batch, 24)
    return [(torch.randn(*shape, generator=g), torch.randint(0, 5, (batch,), generator=g)) for _ in range(steps)]


def train(m: nn.Module, batches, rank: int = 0, world: int = 1, device: str = "cpu"):
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    for x, t in batches:
        n = x.shape[0] // world
        xs, ts = x[rank * n:(rank + 1) * n].to(device), t[rank * n:(rank + 1) * n].to(device)
        opt.zero_grad()
        nn.functional.cross_entropy(m(xs), ts).backward()
        opt.step()
    return m


def main(rank: int, world: int, port: str, out: str, device: str = "cpu", kind: str = "linear") -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        m = model(0, kind).to(device)
        ddp = nn.parallel.DistributedDataParallel(m)
        train(ddp, data(4, 32, kind), rank, world, device)
        if rank == 0:
            torch.save({k: v.cpu() for k, v in m.state_dict().items()}, out)
        elif device != "cpu":  # how many device structures the GPU path holds after the run
            from sparsebp.torch import _ops

            with open(out + ".structures", "w") as f:
                f.write(str(len(_ops._cuda_structs)))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], *sys.argv[5:])
    # Leave without the interpreter's teardown: with torch 2.13 a gloo process aborts there
    # ("terminate called without an active exception", exit 134) in a few percent of runs, after
    # destroy_process_group and main have returned, also with sparsebp not imported at all (2 of
    # 60 runs of this worker with plain nn.Linear layers on the 2-core Zen 3). Everything the test
    # reads is written and closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
