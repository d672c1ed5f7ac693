"""Which CUDA kernels a SparseLinear step should use at a given batch (GPU machine): the batch-major
kernels on the operands as they are (no transposes: fewer launches and allocations, the host's
cost) against the feature-major ones on transposed copies (coalesced loads along the batch, the
device's cost), chosen in sparsebp._cuda by the batch against SMALL_BATCH. Eager (launched and
waited for), pipelined (20 queued, one wait) and CUDA-graph (device) times, interleaved, medians;
dense nn.Linear beside. Run on a GPU machine: python bench/gpu/batch_kernels.py"""
import torch

import sparsebp.torch as st
from sparsebp import _cuda
from sparsebp.bench.cuda import _capture, _pipelined, _time

REPS = 15
default = _cuda.SMALL_BATCH


def with_threshold(fn, threshold):
    def run():
        _cuda.SMALL_BATCH = threshold
        try:
            fn()
        finally:
            _cuda.SMALL_BATCH = default
    return run


print(f"GPU: {torch.cuda.get_device_name()}; SMALL_BATCH = {default}; medians of {REPS}, ms")
print("layer | batch | s | eager dense | eager fm | eager bm | pipe dense | pipe fm | pipe bm | graph dense | "
      "graph fm | graph bm")
for fin, fout in [(768, 3072), (3072, 768), (4096, 4096)]:
    for batch in (32, 64, 128, 256):
        for s in (0.95, 0.99):
            torch.manual_seed(0)
            dense = torch.nn.Linear(fin, fout).cuda()
            mask = torch.rand(fout, fin, device="cuda") >= s
            sp = st.SparseLinear.from_dense(dense, mask=mask)
            x = torch.randn(batch, fin, device="cuda", requires_grad=True)

            def f_sparse():
                sp(x).sum().backward()

            fns = {"dense": lambda: dense(x).sum().backward(),
                   "fm": with_threshold(f_sparse, 0), "bm": with_threshold(f_sparse, 1 << 30)}
            t = _time(fns, REPS)
            tp = _pipelined(fns, REPS)
            params = {"dense": [x, dense.weight, dense.bias], "fm": [x, sp.values, sp.bias],
                      "bm": [x, sp.values, sp.bias]}
            graphs = {k: _capture(fn, params[k]) for k, fn in fns.items()}
            tg = _time({k: g.replay for k, g in graphs.items() if g is not None}, REPS)
            cells = [t[k] for k in fns] + [tp[k] for k in fns] + [tg.get(k, float("nan")) for k in fns]
            print(f"{fin}x{fout} | {batch} | {s} | " + " | ".join(f"{1e3 * c:.3f}" for c in cells), flush=True)
            del graphs
