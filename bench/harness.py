"""Timing harness shared by the benchmarks: interleaved medians, machine description, outputs."""
from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List


def interleaved_medians(contenders: Dict[str, Callable[[], None]], reps: int, warmup: int = 1,
                        setup: Callable[[], None] | None = None) -> Dict[str, float]:
    """Runs every contender once per round (A B C A B C ...), `reps` timed rounds after `warmup`
    untimed ones, and returns each contender's median seconds. `setup` runs untimed before each call."""
    times: Dict[str, List[float]] = {k: [] for k in contenders}
    for r in range(warmup + reps):
        for name, fn in contenders.items():
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_header() -> List[str]:
    import numpy as np

    import sparsebp

    info = sparsebp.build_info()
    lines = [
        f"cpu: {cpu_name()} ({os.cpu_count()} logical CPUs)",
        f"sparsebp {info['version']}: active ISA {info['active_isa']}, available {', '.join(info['available_isas'])}",
        f"python {platform.python_version()}, numpy {np.__version__}",
    ]
    try:
        import torch

        lines.append(f"torch {torch.__version__}")
    except ImportError:
        lines.append("torch: not installed (dense and torch.sparse contenders skipped)")
    try:
        import importlib.metadata as md

        lines.append(f"sparseprop {md.version('sparseprop')}")
    except Exception:
        lines.append("sparseprop: not installed (contender skipped; see PEERS.md for how to install it)")
    return lines


def write_csv(path: str, rows: List[dict]) -> None:
    if not rows:
        return
    keys: List[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def run_workers(module: str, threads: List[int], reps: int, quick: bool) -> List[dict]:
    """Runs ``python -m <module> --worker --threads N --reps R [--quick]`` once per thread count (a
    fresh process each, with the BLAS thread variables set) and collects its ``RESULT {json}`` lines."""
    rows: List[dict] = []
    for n in threads:
        env = dict(os.environ, OMP_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n), OPENBLAS_NUM_THREADS=str(n))
        cmd = [sys.executable, "-m", module, "--worker", "--threads", str(n), "--reps", str(reps)]
        if quick:
            cmd.append("--quick")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            if line.startswith("RESULT "):
                rows.append(json.loads(line[7:]))
        if proc.wait() != 0:
            raise RuntimeError(f"benchmark worker {module} for {n} thread(s) failed (exit {proc.returncode})")
    return rows


def run_and_write(module: str, name: str, report: Callable[[List[dict]], str], out_dir: str, quick: bool,
                  threads: List[int] | None, reps: int | None, default_reps: int) -> List[dict]:
    """The usual `run` of a benchmark module: its worker once per thread count (default 1 thread
    when quick, else 1 and 2), then `<name>.csv` and `<name>.md` (from `report`) in out_dir."""
    threads = threads or ([1] if quick else [1, 2])
    reps = reps or (3 if quick else default_reps)
    rows = run_workers(module, threads, reps, quick)
    os.makedirs(out_dir, exist_ok=True)
    write_csv(os.path.join(out_dir, f"{name}.csv"), rows)
    md = report(rows)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(md)
    print(md)
    return rows


def bench_main(prog: str, worker: Callable[[int, bool, int], None], run: Callable[..., List[dict]],
               argv=None) -> None:
    """The command line of a benchmark module: `--worker` (what run_workers starts) or a whole run."""
    import argparse

    from sparsebp._argtypes import positive_int

    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=positive_int, nargs="+", default=None)
    ap.add_argument("--reps", type=positive_int, default=None)
    ap.add_argument("--out", default="bench-results")
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.threads[0], a.quick, a.reps)
    else:
        run(a.out, a.quick, a.threads, a.reps)


def worker_setup(threads: int) -> Dict[str, bool]:
    """Sets sparsebp's and (when installed) torch's thread counts for a benchmark worker and says
    which optional contenders are installed: {"torch": ..., "sparseprop": ...}."""
    import sparsebp

    sparsebp.set_num_threads(threads)
    have = {"torch": False, "sparseprop": False}
    try:
        import torch

        torch.set_num_threads(threads)
        have["torch"] = True
    except ImportError:
        return have
    try:
        import sparseprop  # noqa: F401

        have["sparseprop"] = True
    except Exception:  # its import can fail in more ways than ImportError
        pass
    return have


def emit(rows: List[dict]) -> None:
    """A worker's result rows, one `RESULT {json}` line each (what run_workers collects)."""
    for row in rows:
        print("RESULT " + json.dumps(row), flush=True)


def map_single_threaded(fn: Callable, jobs: list, processes: int, desc: str = "runs") -> list:
    """``fn`` over ``jobs`` in ``processes`` spawned workers (a tqdm bar over the jobs), each with
    one thread for sparsebp and NumPy's BLAS: for studies whose runs share the machine side by
    side. Results in the jobs' order."""
    import multiprocessing as mp

    from tqdm import tqdm

    # The spawned workers read these when they import NumPy and sparsebp.
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    os.environ["SPARSEBP_NUM_THREADS"] = "1"
    with mp.get_context("spawn").Pool(processes) as pool:
        return list(tqdm(pool.imap(fn, jobs), total=len(jobs), desc=desc))


def run_study(fn: Callable, jobs: list, processes: int, out_dir: str, name: str,
              report: Callable[[List[dict]], str]) -> List[dict]:
    """The common part of the side-by-side studies: ``fn`` over ``jobs`` (``map_single_threaded``;
    a job gives one row, a dict, or a list of rows), then OUT/<name>.csv (the rows) and
    OUT/<name>.md (``report(rows)``, also printed). Returns the rows."""
    rows: List[dict] = []
    for out in map_single_threaded(fn, jobs, processes):
        rows.extend([out] if isinstance(out, dict) else out)
    os.makedirs(out_dir, exist_ok=True)
    write_csv(os.path.join(out_dir, f"{name}.csv"), rows)
    text = report(rows)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(text)
    sys.stdout.write(text)
    return rows
