"""VR-PGE's torch path against dense torch with the unit masks applied after each activation."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import sparsebp.torch as st  # noqa: E402


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 4)).double()


def _cnn():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 5, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3)).double()


def _padded_cnn():
    """Convolutions that pad their input in reflect / circular / replicate mode, and a one-sided
    'same' (an even kernel): the compacted forward must pad as nn.Conv2d does."""
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1, padding_mode="reflect"), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 5, 4, padding="same", padding_mode="circular"), nn.ReLU(),
                         nn.Conv2d(5, 4, 3, padding=(1, 2), padding_mode="replicate"), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 6, 8), nn.ReLU(), nn.Linear(8, 3)).double()


class _Masked(nn.Module):
    """The reference: the dense model with each unit mask multiplied in after the activation."""

    def __init__(self, model, masks):
        super().__init__()
        self.model, self.masks = model, masks

    def forward(self, x):
        weights = [i for i, m in enumerate(self.model) if isinstance(m, (nn.Linear, nn.Conv2d))][:-1]
        acts = {}
        for li, i in enumerate(weights):  # the activation right after each masked layer
            acts[i + 1] = torch.as_tensor(self.masks[li], dtype=x.dtype)
        for i, m in enumerate(self.model):
            x = m(x)
            if i in acts:
                shape = (1, -1) + (1,) * (x.dim() - 2)
                x = x * acts[i].reshape(shape)
        return x


@pytest.mark.parametrize("make,shape", [(_mlp, (10, 12)), (_cnn, (6, 2, 8, 8)), (_padded_cnn, (5, 2, 8, 8))])
def test_forward_and_gradients_match_masked_dense(make, shape):
    model = make()
    tr = st.VRPGETrainer(model, 0.5, seed=2)
    torch.manual_seed(3)
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, model[-1].out_features, (shape[0],))
    mask = tr.sample()
    mask[0][0] = True
    ref_model = make()
    ref = _Masked(ref_model, mask)
    out = tr.forward(x, mask)
    torch.testing.assert_close(out, ref(x))
    torch.nn.functional.cross_entropy(out, y).backward()
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
    small = tr.compact(mask)
    torch.testing.assert_close(small(x), ref(x))
    kept = [int(m.sum()) for m in mask]
    widths = [m.out_features if isinstance(m, nn.Linear) else m.out_channels
              for m in small if isinstance(m, (nn.Linear, nn.Conv2d))][:-1]
    assert widths == kept


def test_steps_keep_budget_and_learn():
    torch.manual_seed(0)
    X = torch.randn(256, 12)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    tr = st.VRPGETrainer(model, 0.5, lr=0.05, lr_s=0.05, seed=0)
    first = None
    for e in range(60):
        r = tr.step(X, y)
        first = first if first is not None else 0.5 * (r["loss1"] + r["loss2"])
        assert sum(s.sum() for s in tr.s) <= tr.budget + 1e-9
    last = 0.5 * (r["loss1"] + r["loss2"])
    assert last < first
    mask, acc = tr.best_mask(X, y, samples=5)
    assert acc > 0.5


def test_bad_models():
    with pytest.raises(TypeError, match="Sequential"):
        st.VRPGETrainer(nn.Linear(3, 2), 0.5)
    with pytest.raises(ValueError, match="BatchNorm"):
        st.VRPGETrainer(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)), 0.5)
    with pytest.raises(ValueError, match="groups"):
        st.VRPGETrainer(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2)), 0.5)
    with pytest.raises(ValueError, match="two weight layers"):
        st.VRPGETrainer(nn.Sequential(nn.Linear(3, 2)), 0.5)
    with pytest.raises(ValueError, match="keep_ratio"):
        st.VRPGETrainer(_mlp(), 1.5)


def test_trainer_bad_arguments_and_batches():
    """Hyper-parameters of the default SGD, the optimizer and the seed are checked up front (a
    momentum of 1.5 or optimizer=5 used to be accepted); a batch of the wrong dtype, width or length
    is a TypeError / ValueError naming x or y, not torch's RuntimeError from inside the model."""
    for kw, err, what in ((dict(momentum=1.5), ValueError, "momentum"), (dict(weight_decay=-1), ValueError, "weight_decay"),
                          (dict(lr=0), ValueError, "lr"), (dict(optimizer=5), TypeError, "optimizer"),
                          (dict(seed=-1), ValueError, "seed"), (dict(seed="1"), ValueError, "seed")):
        with pytest.raises(err, match=what):
            st.VRPGETrainer(_mlp(), 0.5, **kw)
    tr = st.VRPGETrainer(_mlp(), 0.5)
    n_in = tr.model[0].in_features
    x, y = torch.randn(4, n_in, dtype=torch.float64), torch.tensor([0, 1, 1, 0])  # _mlp is float64
    for xb, yb, err, what in ((x.float(), y, TypeError, "x must have the model's dtype"),
                              (torch.randn(4, n_in + 1, dtype=torch.float64), y, ValueError, rf"x must have shape \(batch, {n_in}\)"),
                              (x, y[:2], ValueError, "one target per example"),
                              (x[:0], y[:0], ValueError, "no examples"), (x.numpy(), y, TypeError, "torch.Tensors")):
        with pytest.raises(err, match=what):
            tr.step(xb, yb)
    tr.step(x, y)  # and a good batch still steps
