"""Timing helpers shared by the scripts in bench/gpu (run from the repository root as
``python bench/gpu/<script>.py``, which puts this folder on the import path)."""
import time

import torch


def host_us(fn, n=300, before=None):
    """The host's time to queue one call of fn (us, mean of n after 20 warm-ups), without waiting
    for the device inside the loop; ``before``: called once just before the timed loop (e.g. to
    queue a long kernel ahead of it)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    if before is not None:
        before()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    return dt * 1e6


def layer_case(fin=768, fout=3072, batch=64, sparsity=0.95):
    """The profiled case, seeded: ``(dense nn.Linear, SparseLinear with its weights at a random
    mask, x requiring grad, an output gradient)``, all on the GPU."""
    import sparsebp.torch as st

    torch.manual_seed(0)
    dense = torch.nn.Linear(fin, fout).cuda()
    mask = torch.rand(fout, fin, device="cuda") >= sparsity
    sp = st.SparseLinear.from_dense(dense, mask=mask)
    x = torch.randn(batch, fin, device="cuda", requires_grad=True)
    gy = torch.randn(batch, fout, device="cuda")
    return dense, sp, x, gy
