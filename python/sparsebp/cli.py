"""The `sparsebp` command: `sparsebp info|demo|vrpge|bench`, `sparsebp --version`."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from ._argtypes import batch_fits, fraction, nonnegative_int, out_folder, positive_float, positive_int, unit


def _info(args) -> int:
    import sparsebp

    info = sparsebp.build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from sparsebp.bench.harness import cpu_name

    feats = ", ".join(k for k, v in info["cpu_features"].items() if v) or "none detected"
    print(f"sparsebp {info['version']}")
    print(f"  active ISA     : {info['active_isa']}" + (f" (forced by SPARSEBP_ISA={info['isa_override']})"
                                                        if info["isa_override"] else " (best this CPU runs)"))
    print(f"  available ISAs : {', '.join(info['available_isas'])}")
    print(f"  compiled ISAs  : {', '.join(info['compiled_isas'])}")
    print(f"  threads        : {info['num_threads']} ({info['thread_backend']}; OpenMP "
          f"{'available' if info['openmp'] else 'not built'})")
    print(f"  build          : {info['build_type']}, {info['compiler']}, CUDA {'on' if info['cuda'] else 'off'}")
    if info["cuda"]:
        print(f"  GPUs           : {', '.join(info['cuda_devices']) or 'none seen'}")
    print(f"  cpu            : {cpu_name()}")
    print(f"  cpu features   : {feats}")
    l2 = info["l2_cache_bytes"]
    print(f"  L2 cache       : {f'{l2 // 1024} KB per core' if l2 else 'unknown'}")
    llc = info["llc_share_bytes"]
    print(f"  last-level     : {f'{llc // 1024} KB shared (one instance)' if llc else 'unknown'}")
    bc = sparsebp.buffer_cache_info()
    print(f"  buffer cache   : keeps up to {bc['limit_bytes'] >> 20} MiB of freed outputs of "
          f"{bc['min_bytes'] >> 20} MiB or more for reuse")
    return 0


def _bench(args) -> int:
    have_torch = True
    try:
        import torch  # noqa: F401
    except ImportError:
        have_torch = False
        print("note: PyTorch is not installed, so the dense baseline is NumPy's matmul and the torch.sparse and "
              "SparseProp contenders are left out (pip install 'sparsebp[torch]' to compare against them)")
    from sparsebp.bench.harness import machine_header

    out_folder(args.parser, "--out", args.out)
    for line in machine_header():
        print(line)
    # (name, module, needs torch, files written)
    benches = [("linear", "linear", False, "linear.csv, linear.md, linear.png"),
               ("sparse-grad", "sparse_grad", False, "sparse_grad.csv, sparse_grad.md"),
               ("conv", "conv", True, "conv.csv, conv.md"),
               ("train", "train_step", True, "train_step.csv, train_step.md"),
               ("cuda", "cuda", True, "cuda.csv, cuda.md, cuda_conv.csv, cuda_conv.md")]
    for name, module, needs_torch, files in benches:
        if args.what not in ("all", name):
            continue
        if needs_torch and not have_torch:
            print(f"{name} benchmark skipped: it needs PyTorch")
            continue
        done = importlib.import_module(f"sparsebp.bench.{module}").run(args.out, quick=args.quick,
                                                                        threads=args.threads, reps=args.reps)
        if done is not False:  # False: the benchmark could not run here and said why
            print(f"wrote {args.out}/{files}")
    return 0


def _demo(args) -> int:
    from sparsebp import demo
    from sparsebp.datasets import load_mnist

    batch_fits(args.parser, args.batch, demo.QUICK_TRAIN if args.quick else len(load_mnist("train")[0]))
    if args.out:
        out_folder(args.parser, "--out", args.out)
    elif args.save_models:
        args.parser.error("argument --save-models: needs an --out folder to write the models to")

    if args.threads is not None:
        import sparsebp

        sparsebp.set_num_threads(args.threads)
    demo.run(epochs=args.epochs, batch=args.batch, k=args.k, sparsity=args.sparsity, alpha=args.alpha,
             out=args.out, quick=args.quick, with_torch=False if args.no_torch else None, optimizer=args.optimizer,
             lr=args.lr, dropout=args.dropout, seed=args.seed, save_models=args.save_models)
    return 0


def main(argv=None) -> int:
    from . import __version__

    p = argparse.ArgumentParser(prog="sparsebp", description="sparsebp: sparse training on CPUs")
    p.add_argument("--version", action="version", version=f"sparsebp {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("info", help="version, ISA chosen and available, threads, build flags")
    pi.add_argument("--json", action="store_true", help="print build_info() as JSON")
    pi.set_defaults(fn=_info)
    pd = sub.add_parser("demo", help="train the meProp MLP on the bundled MNIST digits: dense vs sparse gradients "
                                      "vs sparse weights (NumPy; no torch needed)")
    pd.add_argument("--epochs", type=positive_int, default=20,
                    help="epochs per model (default 20, as in the meProp paper)")
    pd.add_argument("--batch", type=positive_int, default=32, help="mini-batch size (default 32)")
    pd.add_argument("--k", type=positive_int, default=20, help="top-k of each hidden layer's gradient (default 20)")
    pd.add_argument("--sparsity", type=fraction, default=0.9, help="weight sparsity of the sparse model (default 0.9)")
    pd.add_argument("--alpha", type=unit, default=0.5,
                    help="MSBP memory ratio (default 0.5, chosen on a validation split: bench/results/msbp_alpha)")
    pd.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                    help="adam (the paper's, lr 1e-3) or sgd (momentum 0.9, lr 0.05)")
    pd.add_argument("--lr", type=positive_float, default=None, help="learning rate (default: the optimizer's above)")
    pd.add_argument("--dropout", type=fraction, default=0.1,
                    help="dropout after each hidden ReLU, every model (default 0.1, as in the meProp authors' code)")
    pd.add_argument("--threads", type=positive_int, default=None, help="sparsebp kernel threads (default: all cores)")
    pd.add_argument("--seed", type=nonnegative_int, default=0,
                    help="seed of the weights, batch order and dropout masks, the same for every model (default 0)")
    pd.add_argument("--quick", action="store_true", help="2,000 training digits (a smoke run)")
    pd.add_argument("--no-torch", action="store_true", help="leave out the dense torch reference run")
    pd.add_argument("--out", default="demo-results", help="folder for demo.csv and demo.png (default demo-results)")
    pd.add_argument("--save-models", action="store_true",
                    help="also write each trained NumPy model to OUT/<model>.safetensors (sparsebp.nn.load reads them)")
    pd.set_defaults(fn=_demo, parser=pd)
    pv = sub.add_parser("vrpge", add_help=False,
                        help="VR-PGE learned unit masks on the MNIST MLP at keep 0.5/0.25/0.1 vs dense vs random "
                             "masks (NumPy; see sparsebp vrpge --help)")
    pv.add_argument("rest", nargs=argparse.REMAINDER)
    pv.set_defaults(fn=lambda a: __import__("sparsebp.vrpge_demo", fromlist=["main"]).main(a.rest))
    pb = sub.add_parser("bench", help="benchmark the kernels against dense torch, torch.sparse and SparseProp")
    pb.add_argument("--quick", action="store_true", help="a few cases, 1 thread (about a minute)")
    pb.add_argument("--threads", type=positive_int, nargs="+", default=None, help="thread counts (default: 1 2)")
    pb.add_argument("--reps", type=positive_int, default=None, help="timed rounds per case (default 7; quick: 3)")
    pb.add_argument("--out", default="bench-results", help="folder for CSV, markdown and PNG (default bench-results)")
    pb.add_argument("--what", choices=["all", "linear", "sparse-grad", "conv", "train", "cuda"], default="all",
                    help="which benchmark (default all; conv and train, the example CNN's training step, need torch)")
    pb.set_defaults(fn=_bench, parser=pb)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["vrpge"]:  # its own parser (sparsebp/vrpge_demo.py) takes the rest
        from sparsebp import vrpge_demo

        return vrpge_demo.main(argv[1:])
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
