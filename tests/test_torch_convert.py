"""Converters (sparsify, from_pruned, densify) and sparse checkpoints (.pt, .safetensors)."""
import copy
import json
import os

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
import torch.nn.utils.prune as prune  # noqa: E402

import sparsebp.torch as st  # noqa: E402


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 48), nn.ReLU(), nn.Sequential(nn.Linear(48, 48), nn.ReLU()), nn.Linear(48, 10))


X = torch.randn(9, 20)


def sparse_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, st.SparseLinear)]


def test_sparsify_layer_scope_magnitude():
    m, ref = mlp(), mlp()
    rep = st.sparsify(m, 0.9)
    assert rep.converted == ["0", "2.0", "3"] and sparse_names(m) == ["0", "2.0", "3"]
    for name in rep.converted:
        dense_w = ref.get_submodule(name).weight.detach()
        sm = m.get_submodule(name)
        assert sm.nnz == round(0.1 * dense_w.numel())
        assert dense_w.abs()[sm.mask()].min() >= dense_w.abs()[~sm.mask()].max()
        assert torch.equal(sm.weight, dense_w * sm.mask())
    assert "sparsified" in str(rep)


def test_sparsify_global_scope_hits_the_overall_sparsity():
    m, ref = mlp(), mlp()
    st.sparsify(m, 0.8, scope="global")
    total = sum(ref.get_submodule(n).weight.numel() for n in ("0", "2.0", "3"))
    nnz = sum(m.get_submodule(n).nnz for n in ("0", "2.0", "3"))
    assert nnz == round(0.2 * total)
    # One threshold: every kept |w| is at least every dropped |w|, across layers.
    kept = torch.cat([ref.get_submodule(n).weight.detach().abs()[m.get_submodule(n).mask()] for n in ("0", "2.0", "3")])
    drop = torch.cat([ref.get_submodule(n).weight.detach().abs()[~m.get_submodule(n).mask()] for n in ("0", "2.0", "3")])
    assert kept.min() >= drop.max()


def test_magnitude_pruning_refuses_nan_weights():
    """A NaN has no magnitude to rank: the sort dropped it without a word. Now an error naming the
    layer and the entry, in both scopes and from_dense, and the model is left as it was; random
    masks do not rank and still convert."""
    for scope in ("layer", "global"):
        m = mlp()
        with torch.no_grad():
            m.get_submodule("2.0").weight[3, 1] = float("nan")
        with pytest.raises(ValueError, match=r"layer '2.0''s weight holds NaN \(first at \(3, 1\)\)"):
            st.sparsify(m, 0.9, scope=scope)
        assert sparse_names(m) == []
    w = torch.randn(4, 5)
    w[2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"weight holds NaN \(first at \(2, 2\)\)"):
        st.magnitude_mask(w, 0.5)
    lin = torch.nn.Linear(5, 4)
    with torch.no_grad():
        lin.weight[2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        st.SparseLinear.from_dense(lin, sparsity=0.5)
    m = mlp()
    with torch.no_grad():
        m.get_submodule("0").weight[0, 0] = float("nan")
    st.sparsify(m, 0.5, scheme="random", generator=torch.Generator().manual_seed(0))
    assert sparse_names(m) == ["0", "2.0", "3"]
    w[2, 2] = float("inf")  # an infinite magnitude ranks first
    assert st.magnitude_mask(w, 0.9)[2, 2]


def test_from_pruned_refuses_non_finite_weights():
    """A pruned checkpoint (or live model) whose weight holds NaN or infinity is an error naming the
    layer and the entry, not a sparse model carrying it; the model is left as it was. A NaN at a
    pruned position counts: torch's pruned forward (weight_orig * weight_mask) gives NaN there too,
    which dropping it would silently change."""
    src = mlp()
    prune.l1_unstructured(src[0], "weight", amount=0.7)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    kept = tuple(int(i) for i in (sd["0.weight_mask"] != 0).nonzero()[1])
    dropped = tuple(int(i) for i in (sd["0.weight_mask"] == 0).nonzero()[1])
    for at, value in ((kept, float("nan")), (dropped, float("nan")), (kept, float("-inf"))):
        bad = dict(sd)
        bad["0.weight_orig"] = sd["0.weight_orig"].clone()
        bad["0.weight_orig"][at] = value
        pruned_ref = mlp()
        prune.l1_unstructured(pruned_ref[0], "weight", amount=0.7)
        pruned_ref.load_state_dict(bad)
        assert not bool(torch.isfinite(pruned_ref(torch.randn(3, 20))).all())  # torch's own forward
        m = mlp(4)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        want = f"checkpoint entry '0.weight' \\(weight_orig \\* weight_mask\\) holds {value} at \\({at[0]}, {at[1]}\\)"
        with pytest.raises(ValueError, match=want.replace("nan", "nan").replace("-inf", "-inf")):
            st.from_pruned(m, bad)
        assert sparse_names(m) == [] and all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
        with pytest.raises(ValueError, match="weight_orig \\* weight_mask\\) holds"):  # from a file too
            path = "/tmp/_sparsebp_bad_pruned.pt"
            torch.save(bad, path)
            try:
                st.from_pruned(mlp(), path)
            finally:
                os.remove(path)
        # the live pruned model: its reparametrisation stays in place
        with torch.no_grad():
            pruned_ref[0].weight_orig.copy_(bad["0.weight_orig"])
        with pytest.raises(ValueError, match=f"layer '0''s weight_orig \\* weight_mask holds"):
            st.from_pruned(pruned_ref)
        assert hasattr(pruned_ref[0], "weight_orig") and sparse_names(pruned_ref) == []
    m = mlp()
    with torch.no_grad():
        m.get_submodule("2.0").weight[5, 7] = float("inf")
    with pytest.raises(ValueError, match=r"layer '2.0''s weight holds inf at \(5, 7\)"):
        st.from_pruned(m)
    assert sparse_names(m) == []


def test_sparsify_layers_filter_min_sparsity_random():
    m = mlp()
    rep = st.sparsify(m, 0.5, layers=["2.0"])
    assert sparse_names(m) == ["2.0"]
    m = mlp()
    rep = st.sparsify(m, 0.3, min_sparsity=0.5)
    assert rep.converted == [] and all("kept dense" in c.action for c in rep.changes)
    m = mlp()
    st.sparsify(m, 0.9, scheme="random", layers=lambda n, mod: mod.out_features == 48, generator=torch.Generator().manual_seed(1))
    assert sparse_names(m) == ["0", "2.0"]
    with pytest.raises(ValueError, match="not eligible"):
        st.sparsify(mlp(), 0.9, layers=["nope"])
    with pytest.raises(ValueError, match="scheme"):
        st.sparsify(mlp(), 0.9, scheme="l2")
    with pytest.raises(ValueError, match="scope"):
        st.sparsify(mlp(), 0.9, scope="model")
    with pytest.raises(ValueError, match="sparsity must be in"):
        st.sparsify(mlp(), 1.5)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        st.sparsify("model", 0.5)


def pruned_model():
    m = mlp(3)
    prune.l1_unstructured(m[0], "weight", amount=0.9)
    prune.random_unstructured(m[2][0], "weight", amount=0.95)
    return m


def test_from_pruned_live_prune_reparametrisation():
    m = pruned_model()
    want = m(X)
    masks = {"0": m[0].weight_mask.bool().clone(), "2.0": m[2][0].weight_mask.bool().clone()}
    rep = st.from_pruned(m)
    assert rep.converted == ["0", "2.0"]  # the head has no zeros: kept dense
    for n, mask in masks.items():
        assert torch.equal(m.get_submodule(n).mask(), mask)
    assert torch.allclose(m(X), want, atol=1e-6)


def test_from_pruned_checkpoint_file_and_state_dict(tmp_path):
    src = pruned_model()
    want = src(X)
    path = os.fspath(tmp_path / "pruned.pt")
    torch.save(src.state_dict(), path)  # weight_orig + weight_mask entries
    for ckpt in (path, src.state_dict()):
        m = mlp(99)
        rep = st.from_pruned(m, ckpt)
        assert rep.converted == ["0", "2.0"]
        assert torch.equal(m[0].mask(), src[0].weight_mask.bool())
        assert torch.allclose(m(X), want, atol=1e-6)


def test_from_pruned_zeros_and_explicit_masks():
    m = mlp(4)
    with torch.no_grad():
        m[3].weight[:, ::2] = 0  # 50% zeros
    want = m(X)
    rep = st.from_pruned(m)
    assert rep.converted == ["3"] and m[3].nnz == 10 * 24
    assert torch.allclose(m(X), want, atol=1e-6)
    m = mlp(5)
    mask = torch.zeros(48, 20, dtype=torch.bool)
    mask[:, :3] = True
    st.from_pruned(m, masks={"0": mask}, min_sparsity=0.0, layers=["0"])
    assert torch.equal(m[0].mask(), mask)
    with pytest.raises(ValueError, match="not eligible"):
        st.from_pruned(mlp(), masks={"9": mask})
    with pytest.raises(ValueError, match=r"the mask of '0' must have shape \(48, 20\)"):
        st.from_pruned(mlp(), masks={"0": mask.t()})


def test_from_pruned_bad_checkpoints(tmp_path):
    src = pruned_model()
    sd = src.state_dict()
    bad = dict(sd)
    del bad["0.weight_mask"]
    with pytest.raises(ValueError, match="no 0.weight_mask"):
        st.from_pruned(mlp(), bad)
    bad = dict(sd)
    bad["3.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="does not fit the model"):
        st.from_pruned(mlp(), bad)
    bad = dict(sd)
    bad["extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected keys"):
        st.from_pruned(mlp(), bad)
    p = tmp_path / "junk.pt"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        st.from_pruned(mlp(), os.fspath(p))


def test_densify_round_trip():
    m = mlp()
    st.sparsify(m, 0.9)
    want = m(X)
    rep = st.densify(m)
    assert rep.converted == ["0", "2.0", "3"] and sparse_names(m) == []
    assert all(type(m.get_submodule(n)) is nn.Linear for n in rep.converted)
    assert torch.allclose(m(X), want, atol=1e-6)


@pytest.mark.parametrize("ext", ["pt", "safetensors"])
def test_save_load_round_trip(tmp_path, ext):
    m = mlp()
    st.sparsify(m, 0.9, layers=["0", "2.0"])
    want = m(X)
    path = tmp_path / f"model.{ext}"
    st.save(m, path)
    fresh = st.load(mlp(7), path)  # the dense architecture, other weights
    assert sparse_names(fresh) == ["0", "2.0"]
    assert torch.equal(fresh(X), want)
    again = st.load(fresh, path)  # already sparse: loads in place
    assert torch.equal(again(X), want)


@pytest.mark.parametrize("ext", ["pt", "safetensors"])
def test_load_bad_files(tmp_path, ext):
    m = mlp()
    st.sparsify(m, 0.9)
    path = tmp_path / f"model.{ext}"
    st.save(m, path)
    data = path.read_bytes()
    trunc = tmp_path / f"trunc.{ext}"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable"):
        st.load(mlp(), trunc)
    # A model of another shape.
    other = nn.Sequential(nn.Linear(20, 48), nn.ReLU(), nn.Sequential(nn.Linear(48, 48), nn.ReLU()), nn.Linear(48, 11))
    with pytest.raises(ValueError, match="'3'"):
        st.load(other, path)
    with pytest.raises(FileNotFoundError):
        st.load(mlp(), tmp_path / f"missing.{ext}")


@pytest.mark.parametrize("meta", ["[1, 2]", "0", "\"text\"", "null"])
def test_load_metadata_not_an_object(tmp_path, meta):
    """A safetensors file whose sparsebp metadata is valid JSON but not an object is a ValueError
    (it was an AttributeError for a list); in a .pt file such metadata is not ours, so the file
    is read as a plain state dict, which the dense model refuses."""
    from safetensors.torch import save_file

    m = mlp()
    st.sparsify(m, 0.9)
    sd = {k: v.clone().contiguous() for k, v in m.state_dict().items()}
    path = tmp_path / "meta.safetensors"
    save_file(sd, str(path), metadata={"sparsebp": meta})
    with pytest.raises(ValueError, match="must be a JSON object"):
        st.load(mlp(), path)
    pt = tmp_path / "meta.pt"
    torch.save({"sparsebp": json.loads(meta), "state_dict": sd}, pt)
    with pytest.raises(ValueError, match="does not fit the model"):
        st.load(mlp(), pt)


def test_load_corrupted_structure(tmp_path):
    m = mlp()
    st.sparsify(m, 0.9)
    sd = m.state_dict()
    sd["0.indices"] = torch.full_like(sd["0.indices"], 25)  # columns out of range for in_features=20
    path = tmp_path / "bad.pt"
    torch.save({"sparsebp": {"format": "sparsebp.torch", "version": 1,
                             "sparse_modules": {"0": {"type": "SparseLinear", "in_features": 20, "out_features": 48,
                                                      "bias": True}}},
                "state_dict": {k: v for k, v in sd.items()}}, path)
    with pytest.raises(ValueError, match="structure is invalid"):
        st.load(mlp(), path)


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding="same"), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, groups=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 5))


XI = torch.randn(4, 3, 8, 8)


@pytest.mark.parametrize("ext", ["pt", "safetensors"])
def test_conv_models_sparsify_save_load_densify(tmp_path, ext):
    m = cnn()
    rep = st.sparsify(m, 0.75, scope="global")
    assert rep.converted == ["0", "2", "5"]
    assert isinstance(m[0], st.SparseConv2d) and isinstance(m[2], st.SparseConv2d)
    want = m(XI)
    path = tmp_path / f"cnn.{ext}"
    st.save(m, path)
    fresh = st.load(cnn(5), path)
    assert torch.equal(fresh(XI), want)
    wrong = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=1, groups=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 5))
    with pytest.raises(ValueError, match="'2'"):
        st.load(wrong, path)
    st.densify(m)
    assert type(m[0]) is nn.Conv2d and torch.allclose(m(XI), want, atol=1e-6)


def test_conv_from_pruned():
    m = cnn(2)
    prune.l1_unstructured(m[0], "weight", amount=0.8)
    mask = m[0].weight_mask.bool().clone()
    want = m(XI)
    rep = st.from_pruned(m)
    assert rep.converted == ["0"]
    assert torch.equal(m[0].mask(), mask) and torch.allclose(m(XI), want, atol=1e-6)


def padded_cnn(seed=0):
    """Convolutions that pad the input first: reflect, circular and replicate modes, and 'same'
    with an even kernel (one more row and column at the bottom and right)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                         nn.Conv2d(8, 8, 4, padding="same", padding_mode="circular"), nn.ReLU(),
                         nn.Conv2d(8, 8, 2, padding="same"), nn.ReLU(),
                         nn.Conv2d(8, 4, 3, stride=2, padding=(1, 2), padding_mode="replicate"), nn.Flatten(),
                         nn.Linear(4 * 4 * 5, 5))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("ext", ["pt", "safetensors"])
def test_padding_modes_sparsify_save_load_densify(tmp_path, ext):
    """Every padding mode and a one-sided 'same' go through the converters and files: the sparse
    model computes what the dense one does with the pruned weights (torch's own modules in float64
    are the reference), a file loads into a fresh dense model, and one whose padding differs is
    refused."""
    m = padded_cnn()
    rep = st.sparsify(m, 0.6)
    assert rep.converted == ["0", "2", "4", "6", "8"]
    ref = copy.deepcopy(m)
    st.densify(ref)
    assert [c.padding_mode for c in ref if isinstance(c, nn.Conv2d)] == ["reflect", "circular", "zeros", "replicate"]
    want = ref.double()(XI.double())
    got = m(XI)
    assert torch.allclose(got.double(), want, atol=1e-5)
    path = tmp_path / f"padded.{ext}"
    st.save(m, path)
    fresh = st.load(padded_cnn(3), path)
    assert isinstance(fresh[2], st.SparseConv2d) and fresh[2].padding_mode == "circular"
    assert torch.equal(fresh(XI), got)
    for i, other in ((0, nn.Conv2d(3, 8, 3, padding=1)), (4, nn.Conv2d(8, 8, 2, padding=(1, 1)))):
        wrong = padded_cnn()
        wrong[i] = other
        with pytest.raises(ValueError, match=f"module '{i}' is"):
            st.load(wrong, path)
    # and from a pruned checkpoint: the masks kept exactly
    m = padded_cnn(1)
    for i in (0, 2, 4, 6):
        prune.l1_unstructured(m[i], "weight", amount=0.7)
    want = m(XI)
    assert st.from_pruned(m).converted == ["0", "2", "4", "6"]
    assert torch.allclose(m(XI), want, atol=1e-5)


@pytest.mark.parametrize("ext", ["pt", "safetensors"])
def test_shared_layer_stays_shared(tmp_path, ext):
    """A layer used at two places is converted once and stays one module at both (it used to be
    swapped at its first place only, leaving the dense original at the second): through sparsify,
    save / load and densify; the function equals the dense model with the masked weight."""
    torch.manual_seed(0)

    def tied():
        lin = nn.Linear(8, 8)
        return nn.Sequential(lin, nn.ReLU(), lin)

    m = tied()
    x = torch.randn(5, 8)
    w0, b0 = m[0].weight.detach().clone(), m[0].bias.detach().clone()
    st.sparsify(m, 0.5)
    assert m[0] is m[2] and isinstance(m[0], st.SparseLinear)
    w = w0 * m[0].mask()  # magnitude pruning keeps the stored values
    want = torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, w, b0)), w, b0)
    assert torch.allclose(m(x), want, atol=1e-6)
    path = tmp_path / f"tied.{ext}"
    st.save(m, path)
    fresh = st.load(tied(), path)
    assert fresh[0] is fresh[2] and torch.equal(fresh(x), m(x))
    st.densify(fresh)
    assert fresh[0] is fresh[2] and type(fresh[0]) is nn.Linear


def test_converter_argument_errors():
    m = mlp()
    with pytest.raises(ValueError, match=r"the mask of '0' must have shape \(48, 20\); got \(5, 5\)"):
        st.from_pruned(m, masks={"0": torch.ones(5, 5, dtype=torch.bool)})  # all kept: it was silently left dense
    with pytest.raises(TypeError, match="the mask of '0' must be a boolean tensor"):
        st.from_pruned(m, masks={"0": torch.ones(48, 20, dtype=torch.int64)})
    with pytest.raises(TypeError, match="layers must be a collection of module names or a callable; got int"):
        st.sparsify(m, 0.5, layers=5)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None; got int"):
        st.sparsify(m, 0.5, generator=5)
    for shape, err in (((4, -1), ValueError), ("44", TypeError), ((4, 2.0), TypeError)):
        with pytest.raises(err, match="shape must be"):
            st.random_mask(shape, 0.5)
    assert st.random_mask(6, 0.5).shape == (6,) and int(st.random_mask((3, 4), 0.5).sum()) == 6
    meta = nn.Sequential(nn.Linear(8, 6, device="meta"))
    with pytest.raises(ValueError, match="meta device"):
        st.sparsify(meta, 0.5)
    assert all(type(x) is not st.SparseLinear for x in m.modules())  # nothing was converted by the failed calls
    good = torch.zeros(48, 20, dtype=torch.bool)
    good[:, :2] = True
    with pytest.raises(ValueError, match="the mask of '3'"):  # a good mask first, then a bad one
        st.from_pruned(m, masks={"0": good, "3": torch.ones(2, 2, dtype=torch.bool)}, min_sparsity=0.0)
    assert all(type(x) is not st.SparseLinear for x in m.modules())  # layer 0 was converted before


def test_sparse_modules_refuse_dtypes_the_kernels_do_not_run():
    """float16 / bfloat16 modules are refused when built or converted (they used to be built, then
    fail at the first forward); float64 (the reference path) is accepted."""
    for dt in (torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match="SparseLinear supports float32"):
            st.SparseLinear(4, 3, sparsity=0.5, dtype=dt)
        with pytest.raises(TypeError, match="SparseConv2d supports float32"):
            st.SparseConv2d(2, 3, 3, sparsity=0.5, dtype=dt)
        with pytest.raises(TypeError, match="supports float32"):
            st.from_pruned(nn.Sequential(nn.Linear(4, 3)).to(dt), min_sparsity=0.0)
    m = st.SparseLinear(4, 3, sparsity=0.5, dtype=torch.float64)
    assert m(torch.randn(2, 4, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("ext", ["pt", "safetensors"])
def test_failed_load_leaves_the_model_as_it_was(tmp_path, ext):
    """A checkpoint whose second sparse layer is bad (or whose dense tail has the wrong shape) is a
    ValueError, and the model keeps its modules and weights: the first layer used to be swapped and
    loaded before the error (torch's load_state_dict copies what fits before it reports the rest)."""
    from safetensors.torch import save_file

    m = mlp()
    st.sparsify(m, 0.9)
    sd = {k: v.clone().contiguous() for k, v in m.state_dict().items()}
    meta = {"format": "sparsebp.torch", "version": 1, "sparse_modules": {
        n: {"type": "SparseLinear", "in_features": x.in_features, "out_features": x.out_features, "bias": True}
        for n, x in m.named_modules() if isinstance(x, st.SparseLinear)}}
    bad_structure = dict(sd)
    bad_structure["3.indices"] = torch.full_like(sd["3.indices"], 48)  # out of range for 48 inputs
    bad_shape = {k: v for k, v in sd.items() if k != "3.bias"}
    bad_shape["3.bias"] = torch.zeros(11)
    for i, bad in enumerate((bad_structure, bad_shape)):
        path = tmp_path / f"bad{i}.{ext}"
        if ext == "pt":
            torch.save({"sparsebp": meta, "state_dict": bad}, path)
        else:
            save_file(bad, str(path), metadata={"sparsebp": json.dumps(meta)})
        for target in (mlp(3), m):  # a dense model, and one already sparse
            types = [type(x) for x in target.modules()]
            before = {k: v.clone() for k, v in target.state_dict().items()}
            with pytest.raises(ValueError, match=r"'3\.bias' has shape|3: the checkpoint"):
                st.load(target, path)
            assert [type(x) for x in target.modules()] == types
            after = target.state_dict()
            assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_from_pruned_failure_leaves_the_model_as_it_was():
    """A checkpoint that does not fit (a wrong shape in the last layer), or a bad user mask for a
    later layer, is a ValueError and the live model keeps its prune reparametrisation, modules and
    weights (the reparametrisation used to be removed, and the checkpoint partly loaded, first)."""
    m = pruned_model()
    assert hasattr(m[0], "weight_orig")
    sd = {k: v.clone() for k, v in pruned_model().state_dict().items()}
    sd["3.weight"] = torch.zeros(11, 48)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"'3.weight' is \(11, 48\) in the checkpoint"):
        st.from_pruned(m, sd)
    with pytest.raises(ValueError, match="the mask of '3'"):
        st.from_pruned(m, masks={"3": torch.ones(2, 2, dtype=torch.bool)})
    assert hasattr(m[0], "weight_orig") and all(type(x) is not st.SparseLinear for x in m.modules())
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _policy_model(seed=0):
    """mlp() with every kind of saved policy: MSBP and unified meProp on sparse layers, a
    MePropLinear (per-example meProp) as the dense classifier."""
    from sparsebp import algorithms as alg

    m = mlp(seed)
    st.sparsify(m, 0.8, layers=["0", "2.0"])
    m[0].grad_policy = alg.MSBP(k=5, alpha=0.5)
    m[2][0].grad_policy = alg.MeProp(ratio=0.25, mode="unified")
    m[3] = st.MePropLinear.from_linear(m[3], k=3)
    return m


def _train(model, steps=3):
    g = torch.Generator().manual_seed(5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        x, y = torch.randn(9, 20, generator=g), torch.randint(0, 10, (9,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("ext", ["pt", "safetensors"])
def test_save_load_keeps_sparse_gradient_policies(tmp_path, ext):
    """A model saved with sparse-gradient policies and loaded into its dense architecture trains as
    the original does (MSBP's memory starting afresh in both), step for step; with the policies
    dropped (what load did before they were saved) it trains differently."""
    m = _policy_model()
    path = tmp_path / f"model.{ext}"
    st.save(m, path)
    fresh = st.load(mlp(7), path)
    assert [type(x).__name__ for x in fresh.modules()] == [type(x).__name__ for x in m.modules()]
    assert repr(fresh) == repr(m)
    assert fresh[0].grad_policy is not m[0].grad_policy  # each loaded layer has its own policy
    full = st.load(mlp(7), path)
    full[0].grad_policy = full[2][0].grad_policy = None
    full[3] = nn.Linear(48, 10)
    full[3].load_state_dict(m[3].state_dict())
    want = _train(m)
    assert torch.equal(_train(fresh), want)
    assert not torch.allclose(_train(full), want, atol=1e-4)


def test_load_keeps_a_policy_set_on_the_model(tmp_path):
    """A layer that already has a policy keeps it; one without gets the file's; a file without
    policies leaves the model's alone; a model's own policy type is not saved (with a warning)."""
    from sparsebp import algorithms as alg

    m = _policy_model()
    path = tmp_path / "model.pt"
    st.save(m, path)
    target = mlp(3)
    st.sparsify(target, 0.8, layers=["0", "2.0"])
    target[0].grad_policy = alg.MeProp(k=2)
    target[3] = st.MePropLinear.from_linear(target[3], k=9)
    st.load(target, path)
    assert repr(target[0].grad_policy) == "MeProp(k=2, mode='example')"
    assert repr(target[2][0].grad_policy) == "MeProp(ratio=0.25, mode='unified')"
    assert repr(target[3].policy) == "MeProp(k=9, mode='example')"
    plain = mlp()
    st.sparsify(plain, 0.8, layers=["0", "2.0"])
    st.save(plain, tmp_path / "plain.pt")
    st.load(target, tmp_path / "plain.pt")
    assert repr(target[0].grad_policy) == "MeProp(k=2, mode='example')"

    class Mine(alg.MeProp):
        pass

    m[0].grad_policy = Mine(k=4)
    with pytest.warns(UserWarning, match="'0' has a policy of its own type"):
        st.save(m, path)
    back = st.load(mlp(), path)
    assert back[0].grad_policy is None and back[2][0].grad_policy is not None


@pytest.mark.parametrize("ext", ["pt", "safetensors"])
def test_load_bad_policy_entries(tmp_path, ext):
    """A policy entry that is not one of ours, names a module the model lacks or of another kind,
    or holds settings a policy refuses is a ValueError naming the file and the module, and the model
    stays as it was."""
    from safetensors.torch import save_file

    m = _policy_model()
    good_path = tmp_path / f"good.{ext}"
    st.save(m, good_path)
    if ext == "pt":
        good = torch.load(good_path, weights_only=True)
        meta, sd = good["sparsebp"], good["state_dict"]
    else:
        from safetensors import safe_open

        with safe_open(str(good_path), framework="pt") as f:
            meta = json.loads(f.metadata()["sparsebp"])
            sd = {k: f.get_tensor(k) for k in f.keys()}
    pols = meta["grad_policies"]
    assert set(pols) == {"0", "2.0", "3"}
    cases = [
        ([1, 2], "grad_policies must be an object"),
        (dict(pols, **{"0": "MeProp"}), "unknown grad policy entry for '0'"),
        (dict(pols, **{"0": dict(pols["0"], layer="SparseConv2d")}), "unknown grad policy entry for '0'"),
        (dict(pols, **{"0": dict(pols["0"], policy=dict(pols["0"]["policy"], type="Random"))}),
         "the grad policy of '0': settings\\['type'\\]"),
        (dict(pols, **{"0": dict(pols["0"], policy=dict(pols["0"]["policy"], k=-3))}),
         "the grad policy of '0': k must be >= 0"),
        (dict(pols, **{"0": dict(pols["0"], policy=dict(pols["0"]["policy"], alpha="x"))}),
         "the grad policy of '0': alpha must be a number"),
        (dict(pols, **{"9": pols["0"]}), "'9', a module the model does not have"),
        (dict(pols, **{"1": pols["3"]}), "module '1' is ReLU\\(\\) in the model but a MePropLinear"),
        (dict(pols, **{"3": dict(pols["3"], layer="SparseLinear")}), "module '3' is Linear.* but a SparseLinear"),
    ]
    for i, (entries, match) in enumerate(cases):
        bad_meta = dict(meta, grad_policies=entries)
        path = tmp_path / f"bad{i}.{ext}"
        if ext == "pt":
            torch.save({"sparsebp": bad_meta, "state_dict": sd}, path)
        else:
            save_file(sd, str(path), metadata={"sparsebp": json.dumps(bad_meta)})
        target = mlp(3)
        types = [type(x) for x in target.modules()]
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(ValueError, match=match):
            st.load(target, path)
        assert [type(x) for x in target.modules()] == types
        assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
