"""Top-k at small k: the one-pass path against the sampled path, alternated call by call in one
process (SPARSEBP_TOPK_ONE_PASS, read on every call, picks the path), on fresh rows: before each
call the next of a pool of gradients (8,192 rows or more in all) is copied into one buffer,
untimed. One thread; median microseconds per call and one pass / sampled. The kernel set is the
default one (SPARSEBP_ISA picks another). Behind the rule of commit 94d4a2a: the SIMD sets
take the one pass only for k <= 2 on rows up to 1,024 wide and k = 1 up to 2,048; the scalar set
for k <= 6. Outputs: topk_one_pass_avx2.txt and _scalar.txt (one pass / sampled), and
topk_rule_old_new_avx2.txt (the old rule / the new one).

    python topk_one_pass.py              # one pass (SPARSEBP_TOPK_ONE_PASS=8) / sampled (=0)
    python topk_one_pass.py 6 default    # the old rule (k <= 6) / the set's own rule (unset)
"""
import os
import sys
import time

import numpy as np

import sparsebp
from sparsebp import _core

SHAPES = [(64, 128), (32, 500), (256, 500), (32, 1024), (32, 2048), (32, 4096)]
KS = [1, 2, 3, 4, 6, 8]  # (k = 5 behaves as its neighbours)

if __name__ == "__main__":
    a, b_ = sys.argv[1:3] if len(sys.argv) > 2 else ("8", "0")
    _core.set_num_threads(1)
    print(f"# kernel set {sparsebp.active_isa()}; SPARSEBP_TOPK_ONE_PASS {a} / {b_} (median us each)")
    for b, n in SHAPES:
        rng = np.random.default_rng(n)
        pool = [rng.standard_normal((b, n)).astype(np.float32) for _ in range(max(8, 8192 // b))]
        g = np.empty((b, n), np.float32)
        cells = []
        for k in KS:
            idx = np.empty((b, k), np.int32)
            ts = {a: [], b_: []}
            for r in range(max(60, 6_000_000 // (b * n))):
                np.copyto(g, pool[r % len(pool)])
                for mode in ((a, b_) if r % 2 else (b_, a)):
                    if mode == "default":
                        os.environ.pop("SPARSEBP_TOPK_ONE_PASS", None)
                    else:
                        os.environ["SPARSEBP_TOPK_ONE_PASS"] = mode
                    t0 = time.perf_counter()
                    _core.topk_rows(g, k, idx)
                    ts[mode].append(time.perf_counter() - t0)
            one, smp = np.median(ts[a]) * 1e6, np.median(ts[b_]) * 1e6
            cells.append(f"k={k}: {one:.1f}/{smp:.1f} = {one / smp:.2f}")
        print(f"{b}x{n}: " + " | ".join(cells), flush=True)
    os.environ.pop("SPARSEBP_TOPK_ONE_PASS", None)
