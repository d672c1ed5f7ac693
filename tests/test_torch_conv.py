"""sparsebp.torch.SparseConv2d against dense torch convolution computed in float64, every option
combination over small sizes, on every available ISA."""
import copy
import itertools
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import sparsebp.torch as st  # noqa: E402

U32 = 2.0 ** -24


def check(m, x, what):
    """Forward and all gradients of m at x against float64 dense torch (the weight rebuilt from the
    layer's raw buffers by scatter, not through sparsebp)."""
    x = x.detach().clone().requires_grad_()
    y = m(x)
    kh, kw = m.kernel_size
    k = m.in_channels // m.groups * kh * kw
    counts = (m.indptr[1:] - m.indptr[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(m.out_channels), counts)
    w64 = torch.zeros(m.out_channels, k, dtype=torch.float64)
    w64[rows, m.indices.long()] = m.values.detach().double()
    w64 = w64.reshape(m.weight_shape).requires_grad_()
    b64 = m.bias.detach().double().requires_grad_() if m.bias is not None else None
    x64 = x.detach().double().requires_grad_()
    args = (m.stride, m.padding, m.dilation, m.groups)
    ref = F.conv2d(x64, w64, b64, *args)
    scale = F.conv2d(x64.detach().abs(), w64.detach().abs(), None if b64 is None else b64.detach().abs(), *args)
    tol = lambda s, n: 8 * U32 * (n ** 0.5) * s + 1e-30  # noqa: E731
    assert y.shape == ref.shape, what
    assert bool(((y.double() - ref).abs() <= tol(scale, k)).all()), f"{what}: forward"
    g = torch.randn(ref.shape)
    y.backward(g)
    ref.backward(g.double())
    n_out = ref.shape[0] * ref.shape[2] * ref.shape[3]
    gscale_x = torch.nn.grad.conv2d_input(x.shape, w64.detach().abs(), g.double().abs(), *args)
    assert bool(((x.grad.double() - x64.grad).abs() <= tol(gscale_x, m.out_channels * kh * kw)).all()), f"{what}: dx"
    gw_scale = torch.nn.grad.conv2d_weight(x64.detach().abs(), w64.shape, g.double().abs(), *args)
    mask = m.mask()
    err = (m.values.grad.double() - w64.grad[mask]).abs()
    assert bool((err <= tol(gw_scale[mask], n_out)).all()), f"{what}: dvalues {err.max():.3e}"
    if b64 is not None:
        assert bool(((m.bias.grad.double() - b64.grad).abs() <= tol(g.double().abs().sum((0, 2, 3)), n_out)).all())
    return y


def _sparse_and_dense(cin, cout, dtype=torch.float32, sparsity=0.5):
    """A SparseConv2d (3x3, padding 1) and an nn.Conv2d holding the same (pruned) weights and bias."""
    m = st.SparseConv2d(cin, cout, 3, padding=1, sparsity=sparsity).to(dtype)
    dense = torch.nn.Conv2d(cin, cout, 3, padding=1).to(dtype)
    with torch.no_grad():
        dense.weight.copy_(m.weight)
        dense.bias.copy_(m.bias)
    return m, dense


OPTIONS = list(itertools.product([1, 2], [0, 1, 2], [1, 2], [1, 2], [(3, 3), (2, 3), (1, 1)]))


@pytest.mark.parametrize("stride,padding,dilation,groups,kernel", OPTIONS)
@pytest.mark.parametrize("batch", [3, 8])  # 8: implicit padding where the options allow it
def test_every_option_combination(isa, stride, padding, dilation, groups, kernel, batch):
    torch.manual_seed(hash((stride, padding, dilation, groups, kernel)) % 2**31)
    m = st.SparseConv2d(4, 6, kernel, stride, padding, dilation, groups, sparsity=0.6,
                        generator=torch.Generator().manual_seed(3))
    check(m, torch.randn(batch, 4, 9, 8), f"s{stride} p{padding} d{dilation} g{groups} k{kernel}")


IMPLICIT_OPTIONS = [((1, 1), (1, 1), (1, 1), (3, 3)), ((1, 1), (2, 1), (2, 1), (3, 3)), ((2, 1), (1, 2), (1, 1), (3, 5)),
                    ((1, 1), (3, 3), (1, 2), (2, 3)), ((3, 1), (1, 0), (2, 1), (3, 3)), ((1, 1), (0, 0), (1, 1), (3, 3)),
                    ((1, 1), (4, 4), (1, 1), (3, 3)), ((1, 1), (4, 4), (1, 1), (9, 8))]  # last: 72 taps, padded copies


@pytest.mark.parametrize("stride,padding,dilation,kernel", IMPLICIT_OPTIONS)
@pytest.mark.parametrize("batch", [1, 3, 16, 17])
def test_implicit_padding_any_batch(isa, monkeypatch, stride, padding, dilation, kernel, batch):
    """Implicit zero padding (windows in the gather kernels) with the batch condition lifted: image
    borders inside vectors (odd batches: lanes assembled one by one), padding wider than the kernel's
    reach (windows empty for some taps: rows of zeros), tall strides, 1-pixel-wide rows, channel
    blocks; forward and every gradient against float64, both layouts, on every ISA."""
    from sparsebp.torch import _conv

    monkeypatch.setattr(_conv, "_IMPLICIT_BATCH_MULTIPLE", 1)
    torch.manual_seed(batch)
    m = st.SparseConv2d(6, 5, kernel, stride, padding, dilation, sparsity=0.5,
                        generator=torch.Generator().manual_seed(batch + 1))
    for hw in ((9, 8), (5, 1), (2, 7)):
        out = [(hw[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in (0, 1)]
        if min(out) < 1:
            continue
        plan = _conv._plan(m.indptr, m.indices, 5, 6, *m.kernel_size, m.stride, m.padding, m.dilation, 1, *hw)
        assert plan.implicit(batch) == (any(padding) and stride[1] == 1 and kernel[0] * kernel[1] <= 64)
        for blocks in (False, True):
            monkeypatch.setattr(_conv, "_BLOCK_BYTES", 1 if blocks else 128 << 10)
            for x in (torch.randn(batch, 6, *hw), st.batch_inner(torch.randn(batch, 6, *hw))):
                m.zero_grad()
                check(m, x, f"implicit n{batch} {hw} s{stride} p{padding} d{dilation} k{kernel} blocks {blocks}")


@pytest.mark.parametrize("layout", ["nchw", "batch_inner"])
@pytest.mark.parametrize("stride", [(2, 2), (2, 3), (1, 2)])
def test_strided_1x1_subsamples_and_accumulates(isa, layout, stride):
    """Strided 1x1 convolutions run on the subsampled input; their input gradient (a pooled buffer
    in the batch-innermost case) must come back zero off the subsampled pixels, also when autograd
    adds a second gradient of x into it and when the buffer is reused: three steps against float64."""
    torch.manual_seed(stride[1])
    m = st.SparseConv2d(6, 5, 1, stride, bias=True, sparsity=0.4)
    w64 = m.weight.detach().double()
    for step in range(3):
        x0 = torch.randn(16, 6, 56, 57)  # over the pool's 1 MB minimum
        x = (st.batch_inner(x0) if layout == "batch_inner" else x0.clone()).requires_grad_()
        other = (x * 0.5).square().sum()  # a second gradient of x, reaching it after the conv's
        y = m(x)
        assert st.conv_ops.is_batch_inner(y) == (layout == "batch_inner")
        gy = torch.randn(y.shape)
        (y * gy).sum().add(other).backward()
        x64 = x0.double().requires_grad_()
        y64 = F.conv2d(x64, w64, m.bias.detach().double(), stride)
        (y64 * gy.double()).sum().add((x64 * 0.5).square().sum()).backward()
        assert torch.allclose(y.double(), y64, atol=1e-5), step
        assert torch.allclose(x.grad.double(), x64.grad, atol=1e-5), step
        m.zero_grad()
        del x, y
        # Whatever touched the pooled buffers once they were handed out (e.g. an in-place
        # accumulation into a gradient) must not leak into the next step.
        from sparsebp.torch import _conv

        for key, pool in _conv._pool.pools.items():
            if key[0] != ("out",):  # (not the zero-bordered ones, whose contract differs)
                continue
            for i in range(len(pool)):
                if _conv._refs(pool, i) == _conv._FREE_REFS:
                    pool[i].fill(np.nan)


@pytest.mark.parametrize("stride,padding,kernel", [(1, 1, 3), (2, 1, 3), (2, 0, 1), ((1, 2), 2, (3, 2))])
def test_operator_path_matches_float64(isa, monkeypatch, stride, padding, kernel):
    """The registered operators with their registered autograd (what tracing and torch.compile
    use; eager calls run the same functions without the operator machinery): forward and every
    gradient against float64, both layouts, padded and implicit-padding batches; gradcheck."""
    from sparsebp.torch import _conv

    monkeypatch.setattr(_conv, "_eager", lambda *tensors: False)
    torch.manual_seed(7)
    m = st.SparseConv2d(4, 6, kernel, stride, padding, sparsity=0.5, generator=torch.Generator().manual_seed(2))
    for x in (torch.randn(3, 4, 9, 8), st.batch_inner(torch.randn(8, 4, 9, 8))):
        m.zero_grad()
        check(m, x, f"operator path s{stride} p{padding} k{kernel}")
    m64 = st.SparseConv2d(2, 3, kernel, stride, padding, sparsity=0.5).double()
    x64 = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, v, b: st.conv_ops.conv2d(a, v, b, m64.indptr, m64.indices, 2, 3, kernel,
                                                                       stride, padding),
                                    (x64, m64.values, m64.bias))


def test_torch_compile_traces_the_operators():
    """torch.compile (the aot_eager backend: tracing, fake tensors, the operators' autograd) against
    dense float64 torch."""
    from compiled_reference import check_compiled_against_dense

    m = st.SparseConv2d(4, 6, 3, padding=1, sparsity=0.5, generator=torch.Generator().manual_seed(4))
    dense = torch.nn.Conv2d(4, 6, 3, padding=1).double()
    with torch.no_grad():
        dense.weight.copy_(m.weight)
        dense.bias.copy_(m.bias)
    check_compiled_against_dense(m, dense, st.batch_inner(torch.randn(8, 4, 9, 9)).requires_grad_())


def test_implicit_padding_switch_and_kept_input(monkeypatch):
    """SPARSEBP_CONV_IMPLICIT_PADDING=0's switch gives the padded-copy path, the same values up to
    rounding; with implicit padding the forward keeps no copy of a batch-innermost input (the
    backward reads it), and keeps its transposed copy of an (N, C, H, W) one."""
    from sparsebp.torch import _conv

    m = st.SparseConv2d(8, 8, 3, padding=1, sparsity=0.5)
    outs = {}
    for implicit in (True, False):
        monkeypatch.setattr(_conv, "_IMPLICIT", implicit)
        x = st.batch_inner(torch.randn(16, 8, 6, 7, generator=torch.Generator().manual_seed(0))).requires_grad_()
        m.zero_grad()
        y, kept = torch.ops.sparsebp.conv2d(x, m.values, m.bias, m.indptr, m.indices, 8, [3, 3], [1, 1], [1, 1],
                                            [1, 1], 1, True)
        assert kept.shape == ((0,) if implicit else (8, 8, 9, 16))
        xn = x.detach().contiguous()
        _, kept_n = torch.ops.sparsebp.conv2d(xn, m.values, m.bias, m.indptr, m.indices, 8, [3, 3], [1, 1], [1, 1],
                                              [1, 1], 1, True)
        assert kept_n.shape == ((8, 6, 7, 16) if implicit else (8, 8, 9, 16))
        m(x).square().sum().backward()
        outs[implicit] = (y.detach(), x.grad, m.values.grad.clone(), m.bias.grad.clone())
    for a, b in zip(outs[True], outs[False]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride,padding,dilation,groups,kernel", OPTIONS[::3])
def test_entry_blocks_every_option(isa, monkeypatch, stride, padding, dilation, groups, kernel):
    """The kernels' channel blocks (one input channel per block here, forced small; real layers get
    them from 128 or so channels up): rows whose blocks are empty, a bias only in block 0, every
    option, forward and all gradients against float64, on every ISA."""
    from sparsebp.torch import _conv

    monkeypatch.setattr(_conv, "_BLOCK_BYTES", 1)
    torch.manual_seed(hash((stride, padding, dilation, groups, kernel, "blocks")) % 2**31)
    m = st.SparseConv2d(8, 6, kernel, stride, padding, dilation, groups, sparsity=0.7,
                        generator=torch.Generator().manual_seed(5))
    for x in (torch.randn(3, 8, 9, 8), st.batch_inner(torch.randn(4, 8, 7, 6))):
        m.zero_grad()
        check(m, x, f"blocks s{stride} p{padding} d{dilation} g{groups} k{kernel}")
    plan = _conv._plan(m.indptr, m.indices, 6, 8, *m.kernel_size, m.stride, m.padding, m.dilation, m.groups, 7, 6)
    blocks = plan.blocks(4, False)
    assert blocks is not None and blocks.shape == (6, 8 // groups + 1)
    assert (blocks[:, 0] == plan.indptr[:-1]).all() and (blocks[:, -1] == plan.indptr[1:]).all()


@pytest.mark.parametrize("batch", [1, 2, 16, 33])
@pytest.mark.parametrize("layout", ["nchw", "batch_inner"])
def test_batches_and_layouts(isa, batch, layout):
    torch.manual_seed(batch)
    m = st.SparseConv2d(5, 7, 3, padding=1, sparsity=0.8, bias=batch % 2 == 0, generator=torch.Generator().manual_seed(1))
    x = torch.randn(batch, 5, 6, 11)
    if layout == "batch_inner" and batch > 1:
        x = st.batch_inner(x)
        assert st.conv_ops.is_batch_inner(x)
    y = check(m, x, f"batch {batch} {layout}")
    if batch > 1:
        assert st.conv_ops.is_batch_inner(y) == (layout == "batch_inner")


@pytest.mark.parametrize("implicit", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "batch_inner"])
def test_wide_tiles_and_long_rows(isa, monkeypatch, implicit, layout):
    """Rows of 16+ entries under the widest register tiles (AVX-512: 256 columns, AVX2: 128), where
    the weight gradient reduces whole groups of dot products at once (a batch of 32 at width 10
    gives a 256-column piece between the image borders)."""
    monkeypatch.setattr(st.conv_ops, "_IMPLICIT", implicit)
    torch.manual_seed(5)
    m = st.SparseConv2d(16, 6, 3, padding=1, sparsity=0.5, generator=torch.Generator().manual_seed(2))
    assert int((m.indptr[1:] - m.indptr[:-1]).min()) >= 32
    x = torch.randn(32, 16, 5, 10)
    if layout == "batch_inner":
        x = st.batch_inner(x)
    check(m, x, f"wide tiles, implicit={implicit}, {layout}")


def test_asymmetric_options_and_unbatched(isa):
    m = st.SparseConv2d(6, 4, (3, 2), stride=(1, 2), padding=(2, 0), dilation=(2, 1), groups=2, sparsity=0.5)
    check(m, torch.randn(3, 6, 8, 9), "asymmetric")
    x = torch.randn(6, 8, 9)
    assert torch.allclose(m(x), m(x.unsqueeze(0)).squeeze(0))


def test_padding_strings_and_from_dense():
    for pad in ("same", "valid"):
        conv = nn.Conv2d(3, 5, 3, padding=pad)
        m = st.SparseConv2d.from_dense(conv, sparsity=0.7)
        assert m.padding == ((1, 1) if pad == "same" else (0, 0))
        x = torch.randn(2, 3, 7, 7)
        ref = F.conv2d(x, conv.weight * m.mask(), conv.bias, padding=pad)
        assert torch.allclose(m(x), ref, atol=1e-5)
    back = m.to_dense()
    assert isinstance(back, nn.Conv2d) and torch.equal(back.weight, m.weight)
    kept = conv.weight.detach().abs()[m.mask()]
    assert kept.min() >= conv.weight.detach().abs()[~m.mask()].max()


# (kernel, stride, padding, dilation, padding_mode): every mode, and padding="same" where it needs
# one more row or column on one side (an odd reach dilation * (kernel - 1)), which torch puts at the
# bottom or right
PAD_CASES = [(3, 1, 1, 1, "reflect"), ((3, 2), (2, 1), (2, 1), (1, 2), "replicate"), (3, 1, (1, 2), 1, "circular"),
             (4, 1, "same", 1, "zeros"), ((2, 3), 1, "same", (1, 2), "reflect"), ((4, 1), 1, "same", 1, "circular"),
             (3, 1, "same", 2, "replicate"), (2, 1, "same", 1, "zeros")]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # (the reference's)
@pytest.mark.parametrize("kernel,stride,padding,dilation,mode", PAD_CASES)
@pytest.mark.parametrize("layout", ["rows", "batch_inner", "channels_last"])
def test_padding_modes_and_one_sided_same(isa, kernel, stride, padding, dilation, mode, layout):
    """Forward and every gradient against a float64 nn.Conv2d with the same options (torch pads the
    input itself), the weight scattered from the layer's raw buffers; the output keeps the layout."""
    torch.manual_seed(7)
    m = st.SparseConv2d(4, 6, kernel, stride, padding, dilation, groups=2, padding_mode=mode, sparsity=0.5,
                        generator=torch.Generator().manual_seed(1))
    ref_conv = nn.Conv2d(4, 6, kernel, stride, padding, dilation, groups=2, padding_mode=mode, dtype=torch.float64)
    counts = (m.indptr[1:] - m.indptr[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(6), counts)
    w64 = torch.zeros(6, m.weight_shape[1] * m.kernel_size[0] * m.kernel_size[1], dtype=torch.float64)
    w64[rows, m.indices.long()] = m.values.detach().double()
    with torch.no_grad():
        ref_conv.weight.copy_(w64.reshape(m.weight_shape))
        ref_conv.bias.copy_(m.bias.detach().double())
    x0 = torch.randn(5, 4, 7, 8)
    x = {"rows": x0.clone(), "batch_inner": st.batch_inner(x0),
         "channels_last": x0.contiguous(memory_format=torch.channels_last)}[layout].requires_grad_()
    x64 = x0.double().requires_grad_()
    y, ref = m(x), ref_conv(x64)
    assert y.shape == ref.shape
    assert st.conv_ops.is_batch_inner(y) == (layout == "batch_inner")
    if layout == "rows":
        assert y.is_contiguous()
    g = torch.randn(ref.shape)
    y.backward(g)
    ref.backward(g.double())
    assert x.grad.stride() == x.stride()  # the input gradient in the input's layout
    # float32 rounding bound: the products of |x| and |w| over each output's taps (the padded input
    # of |x| is |padded x| in every mode)
    scale_conv = copy.deepcopy(ref_conv)
    with torch.no_grad():
        scale_conv.weight.abs_()
        scale_conv.bias.abs_()
    k = m.weight_shape[1] * m.kernel_size[0] * m.kernel_size[1]
    assert bool(((y.double() - ref).abs() <= 8 * U32 * k ** 0.5 * scale_conv(x64.detach().abs()) + 1e-30).all())
    dvalues = ref_conv.weight.grad.reshape(6, -1)[rows, m.indices.long()]
    for got, want, what in ((x.grad, x64.grad, "dx"), (m.values.grad, dvalues, "dvalues"),
                            (m.bias.grad, ref_conv.bias.grad, "dbias")):
        err = (got.double() - want).abs().max().item()
        assert err <= 1e-5 * (1 + want.abs().max().item()), f"{what}: {err:.3e}"
    # unbatched input: the same as a batch of one
    assert torch.allclose(m(x0[1]), m(x0[1:2]).squeeze(0), atol=1e-6)
    back = m.to_dense()  # the padding (a pair where 'same' is symmetric) and the mode carried over
    assert back.padding_mode == mode and (back.padding == "same") == (m.padding == "same")
    assert torch.allclose(back(x0), y.detach(), atol=1e-5)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_padding_a_batch_inner_input(mode):
    """The padding of a batch-innermost input (its own gather and folded-border backward) against
    F.pad on the row-major copy, and gradcheck; the result batch-innermost."""
    from sparsebp.torch._conv import pad_input

    x0 = torch.randn(3, 2, 5, 4, dtype=torch.float64)
    for pads in ((1, 2, 3, 0), (0, 0, 2, 4), (3, 1, 0, 0), (4, 4, 4, 4) if mode != "reflect" else (3, 3, 4, 4)):
        x = st.batch_inner(x0).requires_grad_()
        y = pad_input(x, pads, mode, 2, (1, 1), (1, 1))
        ref = F.pad(x0, pads, mode="constant" if mode == "zeros" else mode)
        assert st.conv_ops.is_batch_inner(y) and torch.equal(y, ref)
        assert torch.autograd.gradcheck(lambda t: pad_input(t, pads, mode, 2, (1, 1), (1, 1)), (x,))


def test_padding_that_cannot_be_applied_is_a_value_error():
    m = st.SparseConv2d(3, 4, 5, padding=2, padding_mode="reflect", sparsity=0.5)
    with pytest.raises(ValueError, match=r"padding_mode='reflect' needs each padding smaller than the input's side; "
                                         r"got padding \(left, right, top, bottom\) = \(2, 2, 2, 2\) for an input of "
                                         r"size 2x6"):
        m(torch.randn(1, 3, 2, 6))
    m = st.SparseConv2d(3, 4, 7, padding=3, padding_mode="circular", sparsity=0.5)
    with pytest.raises(ValueError, match=r"padding_mode='circular' needs each padding at most the input's side"):
        m(torch.randn(1, 3, 2, 6))
    with pytest.raises(ValueError, match=r"x must have shape \(N, 3, H, W\) or \(3, H, W\); got \(1, 2, 9, 9\)"):
        m(torch.randn(1, 2, 9, 9))
    m = st.SparseConv2d(3, 4, 6, padding="same", dilation=3, sparsity=0.5)  # reach 15: 7 + 8 rows
    with pytest.raises(ValueError, match="too small"):
        m(torch.randn(1, 3, 0, 4))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        m(np.zeros((1, 3, 4, 4), dtype=np.float32))
    for mode in ("reflect", "replicate", "circular"):
        with pytest.raises(ValueError, match=f"padding_mode='{mode}' needs"):
            st.SparseConv2d(3, 4, 1, padding=1, padding_mode=mode, sparsity=0.5)(torch.randn(1, 3, 0, 3))


def test_gradcheck_and_opcheck():
    m = st.SparseConv2d(4, 4, 3, stride=(2, 1), padding=1, dilation=(1, 2), groups=2, sparsity=0.5).double()
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    f = lambda a, v, b: st.conv_ops.conv2d(a, v, b, m.indptr, m.indices, 4, 4, 3, (2, 1), 1, (1, 2), 2)  # noqa
    assert torch.autograd.gradcheck(f, (x, m.values, m.bias))
    m = st.SparseConv2d(4, 6, 3, stride=(1, 2), padding=1, groups=2, sparsity=0.5)
    for x in (torch.randn(3, 4, 6, 7), st.batch_inner(torch.randn(3, 4, 6, 7)), torch.randn(1, 4, 6, 7)):
        for b in (m.bias, None):
            for keep in (False, True):  # keep: the forward also returns its padded input, for the backward
                torch.library.opcheck(torch.ops.sparsebp.conv2d.default,
                                      (x.requires_grad_(), m.values, b, m.indptr, m.indices, 6, [3, 3], [1, 2],
                                       [1, 1], [1, 1], 2, keep))


def test_optimizer_never_regrows_and_state_dict():
    m = st.SparseConv2d(3, 4, 3, padding=1, sparsity=0.7)
    mask = m.mask()
    opt = torch.optim.AdamW(m.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(2, 3, 5, 5)).square().mean().backward()
        opt.step()
    assert torch.equal(m.mask(), mask)
    x = torch.randn(2, 3, 5, 5)
    fresh = st.SparseConv2d(3, 4, 3, padding=1, sparsity=0.2)
    fresh.load_state_dict(m.state_dict())
    for other in (fresh, copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert torch.equal(other(x), m(x))
    bad = dict(m.state_dict())
    bad["indices"] = torch.full_like(bad["indices"], 27)  # 3 * 3 * 3 = 27 columns: out of range
    with pytest.raises(ValueError, match="structure is invalid"):
        fresh.load_state_dict(bad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible by groups"):
        st.SparseConv2d(3, 4, 3, groups=2, sparsity=0.5)
    with pytest.raises(ValueError, match="padding_mode must be one of 'zeros', 'reflect', 'replicate', 'circular'; "
                       "got 'mirror'"):
        st.SparseConv2d(3, 4, 3, padding_mode="mirror", sparsity=0.5)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        st.SparseConv2d(3, 4, 3, stride=0, sparsity=0.5)
    with pytest.raises(TypeError, match="kernel_size must be an int or a pair"):
        st.SparseConv2d(3, 4, "3", sparsity=0.5)
    m = st.SparseConv2d(3, 4, 3, sparsity=0.5)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 3, H, W\)"):
        m(torch.randn(2, 5, 6, 6))
    with pytest.raises(ValueError, match="too small"):
        m(torch.randn(2, 3, 2, 2))
    with pytest.raises(TypeError, match="x must be float32"):
        m(torch.ones(2, 3, 6, 6, dtype=torch.int32))


def test_layers_sharing_a_padded_shape_keep_their_borders(isa):
    """Padded scratch buffers are reused between calls; two layers whose padded input (or padded
    output gradient) has the same shape but a different interior must not see each other's data."""
    torch.manual_seed(11)
    a = st.SparseConv2d(4, 4, 3, padding=1, sparsity=0.5)   # 28x28 input -> padded 30x30
    b = st.SparseConv2d(4, 4, 5, padding=2, sparsity=0.5)   # 26x26 input -> padded 30x30
    c = st.SparseConv2d(4, 4, 3, padding=0, sparsity=0.5)   # its input gradient pads 28 -> 30 too
    xa, xb = torch.randn(3, 4, 28, 28), torch.randn(3, 4, 26, 26)
    for _ in range(2):
        for m, x in ((a, xa), (b, xb), (c, xb), (a, xa), (c, xa)):
            m.zero_grad(set_to_none=True)  # check() compares one backward's gradients
            check(m, st.batch_inner(x), f"{m} on {tuple(x.shape)}")


def test_kept_padded_input_is_reused_only_when_free(monkeypatch):
    """The forward keeps its zero-padded input for the weight gradient in a pooled buffer: a buffer
    some live graph still holds is never handed out again (two graphs alive, backward of the older
    one after the newer forward, a retained graph run twice: all against dense torch), and once the
    graph is gone the next forward reuses it."""
    from sparsebp.torch import _conv

    monkeypatch.setattr(_conv._Pool, "MIN_BYTES", 0)  # pool even these small tensors
    torch.manual_seed(3)
    m, dense = _sparse_and_dense(5, 6, sparsity=0.6)
    xs = [st.batch_inner(torch.randn(4, 5, 7, 7)) for _ in range(2)]

    def ref_grad(x):
        dense.zero_grad()
        dense(x).square().sum().backward()
        return dense.weight.grad[m.mask()].clone()

    ys = [m(x) for x in xs]  # two graphs alive at once
    for i in (0, 1):  # the older graph's backward after the newer forward
        m.zero_grad()
        ys[i].square().sum().backward(retain_graph=True)
        torch.testing.assert_close(m.values.grad, ref_grad(xs[i]), rtol=1e-4, atol=1e-4)
    m.zero_grad()
    ys[0].square().sum().backward()  # the retained graph again: same gradient
    torch.testing.assert_close(m.values.grad, ref_grad(xs[0]), rtol=1e-4, atol=1e-4)
    del ys
    key = (("padded", 1, 1), (5, 9, 9, 4))
    pool = _conv._pool.pools[key]
    assert len(pool) == 2
    ptrs = {a.ctypes.data for a in pool}
    y = m(xs[0])  # both graphs gone: a pooled buffer is reused, no new one made
    assert len(_conv._pool.pools[key]) == 2
    assert y.grad_fn is not None
    with torch.no_grad():  # no weight gradient coming: nothing kept
        m(xs[1])
    assert len(_conv._pool.pools[key]) == 2 and {a.ctypes.data for a in _conv._pool.pools[key]} == ptrs


@pytest.mark.parametrize("layout", ["nchw", "batch_inner", "single"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_are_not_views_so_inplace_ops_work(layout, dtype):
    """Outputs and input gradients are tensors of their own in the input's layout (not views of an
    internal buffer), so ReLU(inplace=True) after the layer works, as after nn.Conv2d, and the
    gradients match dense torch's."""
    from sparsebp.torch._conv import is_batch_inner

    torch.manual_seed(7)
    m, dense = _sparse_and_dense(4, 6, dtype)
    x0 = torch.randn(1 if layout == "single" else 3, 4, 5, 5, dtype=dtype)
    x = (st.batch_inner(x0) if layout == "batch_inner" else x0.clone()).requires_grad_()
    xd = x0.clone().requires_grad_()
    y = torch.nn.ReLU(inplace=True)(m(x))
    yd = torch.nn.ReLU(inplace=True)(dense(xd))
    assert y._base is None and is_batch_inner(y) == (layout == "batch_inner")
    (y * torch.arange(y.numel(), dtype=dtype).reshape(y.shape)).sum().backward()
    (yd * torch.arange(yd.numel(), dtype=dtype).reshape(yd.shape)).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y, yd, **tol)
    torch.testing.assert_close(x.grad, xd.grad, **tol)
    assert x.grad._base is None and is_batch_inner(x.grad) == (layout == "batch_inner")
    torch.testing.assert_close(m.values.grad, dense.weight.grad[m.mask()], **tol)


@pytest.mark.parametrize("need_x, need_w, need_b", [(True, False, False), (True, False, True), (False, True, False),
                                                    (False, False, True), (True, True, False), (True, True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_any_subset_of_gradients_against_dense(need_x, need_w, need_b, dtype):
    """Frozen weights (fine-tuning later layers only), a frozen bias, an input that needs no
    gradient: every subset of the three gradients, against dense torch; the backward operator's
    unused returns must be distinct tensors (aliasing returns is an error in torch.library)."""
    torch.manual_seed(9)
    m, dense = _sparse_and_dense(3, 5, dtype)
    m.values.requires_grad_(need_w)
    m.bias.requires_grad_(need_b)
    dense.weight.requires_grad_(need_w)
    dense.bias.requires_grad_(need_b)
    x = torch.randn(2, 3, 6, 6, dtype=dtype, requires_grad=need_x)
    xd = x.detach().clone().requires_grad_(need_x)
    m(x).square().sum().backward()
    dense(xd).square().sum().backward()
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    if need_x:
        torch.testing.assert_close(x.grad, xd.grad, **tol)
    if need_w:
        torch.testing.assert_close(m.values.grad, dense.weight.grad[m.mask()], **tol)
    else:
        assert m.values.grad is None
    if need_b:
        torch.testing.assert_close(m.bias.grad, dense.bias.grad, **tol)
    else:
        assert m.bias.grad is None
    if need_x or need_w:  # the operator itself, for torch.library's checks
        args = (torch.randn(2, 5, 6, 6, dtype=dtype), x.detach(), m.values.detach(), m.indptr, m.indices, 5, [3, 3],
                [1, 1], [1, 1], [1, 1], 1, need_x, need_w, need_b)
        torch.library.opcheck(torch.ops.sparsebp.conv2d_backward.default, args)


def test_gather_kernels_check_their_entry_blocks():
    """The engine checks entry blocks before a kernel runs: shape, ends at the rows' bounds, order."""
    import numpy as np

    from sparsebp import _core

    indptr = np.array([0, 2, 3], np.int64)
    offsets = np.array([0, 1, 2], np.int64)
    values = np.ones(3, np.float32)
    x = np.ones(8, np.float32)
    y = np.empty(8, np.float32)
    geo = (4, 1, 1, 0, 0, 4, 0, 0)
    good = np.array([[0, 1, 2], [2, 2, 3]], np.int64)
    _core.gather_forward(indptr, offsets, values, None, None, x, y, geo, good)
    np.testing.assert_array_equal(y[:4], 2.0)  # row 0: two entries of 1 * 1, over its two blocks
    np.testing.assert_array_equal(y[4:], 1.0)
    for bad, match in ((good[:1], "shape"), (np.array([[0, 1, 2], [1, 2, 3]]), "must run from indptr"),
                       (np.array([[0, 3, 2], [2, 2, 3]]), "must not decrease"), (good[:, :1], "shape")):
        with pytest.raises(ValueError, match=match):
            _core.gather_forward(indptr, offsets, values, None, None, x, y, geo, bad)
    with pytest.raises(ValueError, match="must not decrease"):
        _core.gather_sddmm(indptr, offsets, x, x, np.empty(3, np.float32), None, geo, np.array([[0, 3, 2], [2, 2, 3]]))


def test_gather_kernel_windows_checked_and_applied(isa):
    """Windows at the engine level (implicit padding): an entry reads x only inside its window, so
    offsets may point outside x where the window excludes those cells; the check uses the window;
    malformed taps / windows are clear errors. Against a NumPy loop, on every ISA."""
    import numpy as np

    from sparsebp import _core

    rng = np.random.default_rng(0)
    x = rng.standard_normal(40).astype(np.float32)
    # Two rows; segments of 5 columns, 3 segment rows 10 apart in x.
    indptr = np.array([0, 2, 3], np.int64)
    offsets = np.array([-2, 7, 3], np.int64)  # entry 0 starts before x: its window begins at column 2
    taps = np.array([0, 1, 2], np.int32)
    wins = np.array([[0, 3, 2, 5], [1, 3, 0, 4], [0, 2, 1, 3]], np.int64)
    values = np.array([1.5, -2.0, 0.5], np.float32)
    bias = np.array([0.25, -1.0], np.float32)
    geo = (5, 3, 1, 10, 0, 15, 5, 0)
    ref = np.zeros((2, 3, 5))
    for o in range(2):
        ref[o] += bias[o]
        for p in range(indptr[o], indptr[o + 1]):
            lo_s, hi_s, lo_c, hi_c = wins[taps[p]]
            for so in range(max(lo_s, 0), min(hi_s, 3)):
                for j in range(max(lo_c, 0), min(hi_c, 5)):
                    ref[o, so, j] += float(values[p]) * float(x[offsets[p] + so * 10 + j])
    y = np.full(30, np.nan, np.float32)
    _core.gather_forward(indptr, offsets, values, None, bias, x, y, geo, None, taps, wins)
    np.testing.assert_allclose(y.reshape(2, 3, 5), ref, rtol=1e-6, atol=1e-6)
    g = rng.standard_normal(30).astype(np.float32)
    dv, db = np.empty(3, np.float32), np.empty(2, np.float32)
    _core.gather_sddmm(indptr, offsets, g, x, dv, db, geo, None, taps, wins)
    gr = g.reshape(2, 3, 5).astype(np.float64)
    for o in range(2):
        assert db[o] == pytest.approx(gr[o].sum(), rel=1e-5, abs=1e-5)
        for p in range(indptr[o], indptr[o + 1]):
            lo_s, hi_s, lo_c, hi_c = wins[taps[p]]
            want = sum(gr[o, so, j] * x[offsets[p] + so * 10 + j] for so in range(max(lo_s, 0), min(hi_s, 3))
                       for j in range(max(lo_c, 0), min(hi_c, 5)))
            assert dv[p] == pytest.approx(want, rel=1e-5, abs=1e-5)
    with pytest.raises(ValueError, match="outside x"):  # without its window, entry 0 reads x[-2]
        _core.gather_forward(indptr, offsets, values, None, bias, x, y, geo, None, taps,
                             np.array([[0, 3, 0, 5], [1, 3, 0, 4], [0, 2, 1, 3]], np.int64))
    with pytest.raises(ValueError, match="taps and windows"):
        _core.gather_forward(indptr, offsets, values, None, bias, x, y, geo, None, taps, None)
    with pytest.raises(ValueError, match="outside"):
        _core.gather_forward(indptr, offsets, values, None, bias, x, y, geo, None, np.array([0, 1, 3], np.int32),
                             wins)
    with pytest.raises(ValueError, match="1 to 64"):
        _core.gather_sddmm(indptr, offsets, g, x, dv, db, geo, None, taps, np.zeros((65, 4), np.int64))
    with pytest.raises(ValueError, match="windows must have shape"):
        _core.gather_sddmm(indptr, offsets, g, x, dv, db, geo, None, taps, np.zeros((3, 3), np.int64))


def test_empty_cache_frees_only_unused_buffers(monkeypatch):
    from sparsebp.torch import _conv

    monkeypatch.setattr(_conv._Pool, "MIN_BYTES", 0)
    st.empty_cache()
    m, dense = _sparse_and_dense(3, 4)
    x = st.batch_inner(torch.randn(2, 3, 6, 6)).requires_grad_()
    y = m(x)  # graph alive: its kept padded input and the output are in use
    in_use = _conv._pool.bytes
    assert in_use > 0
    assert st.empty_cache() >= 0 and _conv._pool.bytes == in_use  # nothing free to drop
    y.sum().backward()
    del y
    freed = st.empty_cache()
    assert freed > 0 and _conv._pool.bytes < in_use
    with torch.no_grad():  # and everything still works after
        torch.testing.assert_close(m(x.detach()), dense(x.detach()), rtol=1e-4, atol=1e-4)


def test_functional_conv2d_checks_channels_and_groups():
    """st.conv_ops.conv2d: channel counts and groups are checked before use (groups=0 raised
    ZeroDivisionError; a string in_channels gave a misleading shape error)."""
    torch.manual_seed(0)
    sc = st.SparseConv2d(2, 4, 3, padding=1, sparsity=0.5)
    args = (torch.randn(2, 2, 5, 5), sc.values.detach(), sc.bias.detach(), sc.indptr, sc.indices)
    geo = dict(in_channels=2, out_channels=4, kernel_size=3, padding=1)
    w = torch.zeros(4, 2, 3, 3)
    w[sc.mask()] = args[1]  # the stored values, row-major over the mask
    want = torch.nn.functional.conv2d(args[0], w, args[2], padding=1)
    assert torch.allclose(st.conv_ops.conv2d(*args, **geo), want, atol=1e-5)
    for kw, err, what in ((dict(groups=0), ValueError, "groups must be an int >= 1; got 0"),
                          (dict(groups=3), ValueError, "groups = 3 must divide"),
                          (dict(in_channels="2"), TypeError, "in_channels must be an int"),
                          (dict(out_channels=2.0), TypeError, "out_channels must be an int")):
        with pytest.raises(err, match=what):
            st.conv_ops.conv2d(*args, **{**geo, **kw})
