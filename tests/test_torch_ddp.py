"""sparsebp's layers under torch.distributed DDP (gloo, 2 processes on localhost): the same result as
one process training on the combined batch. SparseLinear, also with per-example sparse gradients
(grad_topk); and SparseConv2d (zero and reflect padding) with a per-example MePropLinear."""
import os
import socket
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import ddp_worker  # noqa: E402


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _gpu_reason() -> str:
    from sparsebp import _cuda

    if not (_cuda.compiled() and _cuda.device_count() > 0 and torch.cuda.is_available()):
        return "no CUDA GPU here (or a build without CUDA kernels): the GPU DDP run has not run"
    return ""


@pytest.mark.parametrize("kind", ["linear", "linear_topk", "conv"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(bool(_gpu_reason()),
                                                                                           reason=_gpu_reason()))])
def test_ddp_two_processes_match_one_process(tmp_path, device, kind):
    out = os.fspath(tmp_path / "rank0.pt")
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "ddp_worker.py"), str(r), "2", port, out, device,
                               kind],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("DDP workers did not finish in 240 s")
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    got = torch.load(out, weights_only=True)
    single = ddp_worker.train(ddp_worker.model(0, kind), ddp_worker.data(4, 32, kind))
    want = single.state_dict()
    assert set(got) == set(want)
    tol = 2e-5 if device == "cpu" else 1e-4  # (GPU kernels against the CPU's: other summation orders)
    for k in want:
        if want[k].dtype.is_floating_point:
            assert torch.allclose(got[k], want[k], atol=tol), k
        else:
            assert torch.equal(got[k], want[k]), k  # the structure is never changed by training
    # Training changed the weights (the test would pass vacuously otherwise).
    start = ddp_worker.model(0, kind).state_dict()
    for k in ("0.values", "5.weight" if kind == "conv" else "2.values"):
        assert not torch.allclose(want[k], start[k]), k
    if kind == "linear_topk":  # the top-k was in force: full gradients train layer 2 otherwise
        full = ddp_worker.train(ddp_worker.model(0, "linear"), ddp_worker.data(4, 32, "linear")).state_dict()
        assert not torch.allclose(want["2.values"], full["2.values"], atol=1e-4)
    if device == "cuda" and kind == "linear":
        # DDP broadcast the structure buffers into place every step: still one entry per layer
        with open(out + ".structures") as f:
            assert int(f.read()) == 2
