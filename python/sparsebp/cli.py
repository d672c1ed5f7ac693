"""The `sparsebp` command: `sparsebp info`, `sparsebp bench`."""
from __future__ import annotations

import argparse
import json
import sys


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
    print(f"  threads        : {info['num_threads']}")
    print(f"  build          : {info['build_type']}, {info['compiler']}, CUDA {'on' if info['cuda'] else 'off'}")
    print(f"  cpu            : {cpu_name()}")
    print(f"  cpu features   : {feats}")
    return 0


def _bench(args) -> int:
    have_torch = True
    try:
        import torch  # noqa: F401
    except ImportError:
        have_torch = False
        print("note: PyTorch is not installed, so the dense baseline is NumPy's matmul and the torch.sparse and "
              "SparseProp contenders are left out (pip install 'sparsebp[torch]' to compare against them)")
    from sparsebp.bench import linear
    from sparsebp.bench.harness import machine_header

    for line in machine_header():
        print(line)
    if args.what in ("all", "linear"):
        linear.run(args.out, quick=args.quick, threads=args.threads, reps=args.reps)
        print(f"wrote {args.out}/linear.csv, linear.md, linear.png")
    if args.what in ("all", "conv"):
        if not have_torch:
            print("conv benchmark skipped: it needs PyTorch (sparsebp.torch.SparseConv2d)")
        else:
            from sparsebp.bench import conv

            conv.run(args.out, quick=args.quick, threads=args.threads, reps=args.reps)
            print(f"wrote {args.out}/conv.csv, conv.md")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="sparsebp", description="sparsebp: sparse training on CPUs")
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("info", help="version, ISA chosen and available, threads, build flags")
    pi.add_argument("--json", action="store_true", help="print build_info() as JSON")
    pi.set_defaults(fn=_info)
    pb = sub.add_parser("bench", help="benchmark the kernels against dense torch, torch.sparse and SparseProp")
    pb.add_argument("--quick", action="store_true", help="a few cases, 1 thread (about a minute)")
    pb.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default: 1 2)")
    pb.add_argument("--reps", type=int, default=None, help="timed rounds per case (default 7; quick: 3)")
    pb.add_argument("--out", default="bench-results", help="folder for CSV, markdown and PNG (default bench-results)")
    pb.add_argument("--what", choices=["all", "linear", "conv"], default="all",
                    help="which benchmark (default all; conv needs torch)")
    pb.set_defaults(fn=_bench)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
