import importlib.util, time, numpy as np, sparsebp
from sparsebp import ops, sparse_grad as new
spec = importlib.util.spec_from_file_location("sparsebp.old_sg", "/tmp/oldpy/sparsebp/sparse_grad.py")
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
sparsebp.set_num_threads(1)
rng=np.random.default_rng(0)
g=rng.standard_normal((32,500)).astype(np.float32)
x=rng.standard_normal((32,784)).astype(np.float32)
w=rng.standard_normal((500,784)).astype(np.float32)
sel=ops.topk(g,20); selu=ops.topk_columns(g,20)
res={}
for mod_name, mod in (("old", old), ("new", new)):
    res[(mod_name,"example")]=[]; res[(mod_name,"unified")]=[]
pc=time.perf_counter
for it in range(4000):
    for mod_name, mod in (("old", old), ("new", new)) if it % 2 else (("new", new), ("old", old)):
        t=pc(); mod.selected_backward(g,x,w,sel,"example",compact=True); res[(mod_name,"example")].append(pc()-t)
        t=pc(); mod.selected_backward(g,x,w,selu,"unified",compact=True); res[(mod_name,"unified")].append(pc()-t)
for mode in ("example","unified"):
    o=np.median(res[("old",mode)])*1e6; n=np.median(res[("new",mode)])*1e6
    print("%-8s old %.1f us  new %.1f us  new-old %+.1f us  old/new %.3fx" % (mode, o, n, n-o, o/n))
