"""torch.compile against a dense float64 torch twin of a sparse module (the independent reference)."""
from __future__ import annotations


def check_compiled_against_dense(module, dense64, x, tol: float = 1e-4) -> None:
    """``torch.compile(module, backend="aot_eager")`` (dynamo tracing, fake tensors, the registered
    operators and their autograd): its output and the gradients of x and of the stored values
    against ``dense64``, a float64 dense module holding the same (pruned) weights."""
    import torch

    y = torch.compile(module, backend="aot_eager")(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    y.backward(g)
    x64 = x.detach().double().requires_grad_()
    y64 = dense64(x64)
    y64.backward(g.double())
    assert torch.allclose(y.double(), y64, atol=tol), "forward"
    assert torch.allclose(x.grad.double(), x64.grad, atol=tol), "input gradient"
    want = dense64.weight.grad.reshape(module.mask().shape)[module.mask()]
    assert torch.allclose(module.values.grad.double(), want, atol=tol), "values gradient"
