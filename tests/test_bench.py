"""The benchmark code runs end to end on a tiny case (its correctness check against float64 NumPy
included), with either dense baseline, and writes its report. Timings are not asserted here."""
import importlib.util

import numpy as np
import pytest

from sparsebp.bench import linear

HAVE_TORCH = importlib.util.find_spec("torch") is not None


@pytest.mark.parametrize("torch_baseline", [False, True])
def test_linear_case_runs_and_reports(tmp_path, torch_baseline):
    if torch_baseline and not HAVE_TORCH:
        pytest.skip("torch not installed")
    case = dict(kind="random", in_f=96, out_f=40, batch=33, sparsity=0.9)
    rows = linear.run_case(case, reps=2, have_sparseprop=False, have_torch=torch_baseline)
    names = {r["contender"] for r in rows}
    assert {"dense", "sparsebp", "sparsebp-C"} <= names
    assert ("torch.sparse" in names) == torch_baseline
    for r in rows:
        assert r["time_ms"] > 0 and np.isfinite(r["speedup"])
        assert r["sparsity"] == pytest.approx(0.9, abs=1e-3)
    md = linear.report(rows, ["test header"])
    assert "| 96->40 | 33 | " in md
    linear.plot(rows, str(tmp_path / "linear.png"))


def test_random_mask_has_exact_count():
    rng = np.random.default_rng(0)
    indptr, indices = linear.random_mask(50, 70, 0.93, rng)
    assert indptr[-1] == round(0.07 * 50 * 70) and len(indices) == indptr[-1]
    for r in range(50):
        row = indices[indptr[r]:indptr[r + 1]]
        assert np.all(np.diff(row) > 0)


def test_bundled_dlmc_matrices_load():
    for name in linear.DLMC:
        rows, cols, indptr, indices = linear.read_smtx(linear.dlmc_path(name))
        assert len(indptr) == rows + 1 and indptr[-1] == len(indices) and indices.max() < cols


def test_scaling_worker_runs(capsys):
    linear.scaling_worker(reps=1, quick=True)
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("SCALING ")]
    assert len(lines) == 1 and '"t1_ms"' in lines[0] and '"t2_ms"' in lines[0]


def test_conv_bench_case_and_report_smoke(threads):
    pytest.importorskip("torch")
    import sparsebp
    from sparsebp.bench import conv

    sparsebp.set_num_threads(1)  # the bar verdict applies to 1-thread rows
    rows = conv.run_case(dict(cin=4, cout=6, hw=7, batch=3), 0.9, reps=1, have_sp=False)
    names = {r["contender"] for r in rows}
    assert {"dense", "sparsebp", "sparsebp-nchw"} <= names
    assert all(r["time_ms"] > 0 for r in rows)
    md = conv.report(rows)
    assert "| 3x3 4->6 7x7 | 3 |" in md and ("met" in md or "MISSED" in md)


def test_sparse_grad_bench_case_and_report_smoke(threads):
    import sparsebp
    from sparsebp.bench import sparse_grad

    sparsebp.set_num_threads(1)
    rows = sparse_grad.run_case(500, 32, 0.04, reps=1, have_torch=HAVE_TORCH)
    names = {r["contender"] for r in rows}
    assert {"dense", "meprop-example", "meprop-unified", "topk"} <= names
    assert all(r["time_ms"] > 0 for r in rows)
    md = sparse_grad.report(rows)
    assert "| 500x500 | 32 | 20 (4%) | 1 |" in md


def test_train_step_bench_case_and_report_smoke(threads):
    pytest.importorskip("torch")
    import sparsebp
    from sparsebp.bench import train_step

    sparsebp.set_num_threads(1)
    old = train_step.BATCH
    train_step.BATCH = 4
    try:
        rows = train_step.run_case(0.95, reps=1, have_sp=False)
    finally:
        train_step.BATCH = old
    assert {r["contender"] for r in rows} == {"dense", "sparsebp"}
    assert "0.95" in train_step.report(rows)


def test_msbp_alpha_report_means_against_numpy():
    """The validation study's table: each cell is the mean over seeds of a measure of the per-epoch
    curve (last epoch, mean of the last three, best, epoch 10), computed here independently."""
    from sparsebp.bench import msbp_alpha

    rng = np.random.default_rng(3)
    curves = {(m, s): rng.uniform(0.9, 1.0, 12) for m in ("alpha=0", "alpha=0.5") for s in (0, 1, 2)}
    rows = [dict(model=m, seed=s, epoch=e + 1, val_acc=float(c[e])) for (m, s), c in curves.items()
            for e in range(12)]
    rng.shuffle(rows)  # the report must not rely on row order
    md = msbp_alpha.report(rows, 12)
    line = next(ln for ln in md.splitlines() if ln.startswith("| MSBP alpha = 0.5 |"))
    cells = [c.strip() for c in line.strip("|").split("|")[1:]]
    for cell, fn in zip(cells, (lambda c: c[-1], lambda c: c[-3:].mean(), np.max, lambda c: c[9])):
        v = np.mean([fn(curves[("alpha=0.5", s)]) for s in range(3)]) * 100
        d = v - np.mean([fn(curves[("alpha=0", s)]) for s in range(3)]) * 100
        assert cell == f"{v:.2f} ({d:+.2f})"
    assert "| alpha = 0 (unified meProp) |" in md and "mean over epochs 10-12" in md


@pytest.fixture
def train_split_only(monkeypatch):
    """``load_mnist`` fails on any split but "train": the validation studies must never read the
    test split."""
    from sparsebp import datasets

    real = datasets.load_mnist

    def train_only(split="train", **kw):
        assert split == "train", "a validation study read the test split"
        return real(split, **kw)

    monkeypatch.setattr(datasets, "load_mnist", train_only)


def test_msbp_alpha_runs_on_training_digits_only(tmp_path, train_split_only):
    """One epoch end to end; the study must never read the test split."""
    from sparsebp.bench import msbp_alpha

    rows = msbp_alpha._train(("msbp", 0.5, 0, 1))
    assert [r["epoch"] for r in rows] == [1] and 0.5 < rows[0]["val_acc"] <= 1.0
    with pytest.raises(SystemExit):
        msbp_alpha.main(["--out", str(tmp_path), "--alphas", "1.5"])


def test_msbp_alpha_main_runs_each_model_and_seed_once(tmp_path):
    """End to end through the spawned workers; a repeated seed or alpha is run once, not mixed in."""
    import csv

    from sparsebp.bench import msbp_alpha

    msbp_alpha.main(["--out", str(tmp_path), "--seeds", "0", "0", "--alphas", "0", "0.0", "--epochs", "1",
                     "--jobs", "1", "--no-dense"])
    rows = list(csv.DictReader(open(tmp_path / "msbp_alpha.csv")))
    assert [(r["model"], r["seed"], r["epoch"]) for r in rows] == [("alpha=0", "0", "1")]
    assert "| alpha = 0 (unified meProp) |" in (tmp_path / "msbp_alpha.md").read_text()


@pytest.mark.parametrize("memory", ["score", "column"])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_msbp_memory_readings_against_numpy(memory, alpha):
    """The study's two other readings of MSBP's memory over four steps, against NumPy (float64
    scores, argsort): the columns chosen and the gradient propagated. alpha = 0 is unified meProp."""
    from sparsebp.bench import msbp_alpha

    rng = np.random.default_rng(17)
    pol = msbp_alpha._memory_policy(memory, 3, alpha).clone()
    mem = np.zeros(12)
    for _ in range(4):
        g = rng.standard_normal((5, 12)).astype(np.float32)
        sel = pol.select(g)
        if memory == "score":
            u = g.astype(np.float64)
            scores = np.abs(u).sum(axis=0) + mem
        else:
            u = g.astype(np.float64) + mem / 5
            scores = np.abs(u).sum(axis=0)
        cols = np.sort(np.argsort(-scores, kind="stable")[:3])
        np.testing.assert_array_equal(sel.cols, cols)
        np.testing.assert_allclose(sel.grad, u, rtol=1e-6, atol=1e-6)
        mem = alpha * (scores if memory == "score" else u.sum(axis=0))
        mem[cols] = 0.0
        assert sel.mode == "unified"


def test_msbp_alpha_main_memory_readings(tmp_path):
    """--memory runs each reading for each alpha > 0 (alpha = 0 once: unified meProp), named apart."""
    import csv

    from sparsebp.bench import msbp_alpha

    msbp_alpha.main(["--out", str(tmp_path), "--seeds", "0", "--alphas", "0", "0.5", "--epochs", "1", "--jobs", "1",
                     "--no-dense", "--memory", "score", "gradient"])
    rows = list(csv.DictReader(open(tmp_path / "msbp_alpha.csv")))
    assert [r["model"] for r in rows] == ["alpha=0", "alpha=0.5, score memory", "alpha=0.5"]
    assert "| MSBP alpha = 0.5, score memory |" in (tmp_path / "msbp_alpha.md").read_text()


def test_meprop_settings_report_against_numpy():
    """The settings study's table: per-example meProp against the dense run of the same batch, init,
    dropout and clip (one dense run serves the settings that differ only in Adam's row rule), means
    over seeds computed here independently."""
    from sparsebp.bench import meprop_settings as ms

    rng = np.random.default_rng(5)
    runs = [("batch 10", "dense"), ("batch 10", "meProp k=20 per example"),
            ("batch 10, Adam on every row", "meProp k=20 per example")]
    curves = {(st, m, s): (rng.uniform(0.8, 1.0, 6), rng.uniform(0.1, 3.0, 6)) for st, m in runs for s in (0, 1)}
    rows = [dict(setting=st, model=m, seed=s, epoch=e + 1, loss=float(c[1][e]), test_acc=float(c[0][e]))
            for (st, m, s), c in curves.items() for e in range(6)]
    rng.shuffle(rows)  # the report must not rely on row order
    md = ms.report(rows, 6)
    dense = [curves[("batch 10", "dense", s)] for s in (0, 1)]
    for st in ("batch 10", "batch 10, Adam on every row"):
        mp = [curves[(st, "meProp k=20 per example", s)] for s in (0, 1)]
        fin = [100 * (m[0][-1] - d[0][-1]) for m, d in zip(mp, dense)]
        last3 = [100 * (m[0][-3:].mean() - d[0][-3:].mean()) for m, d in zip(mp, dense)]
        want = (f"| {st} | {100 * np.mean([d[0][-1] for d in dense]):.2f} | {np.mean(fin):+.2f} | "
                f"{fin[0]:+.2f}, {fin[1]:+.2f} | {np.mean(last3):+.2f} | {np.mean([m[1][0] for m in mp]):.2f} "
                f"({np.mean([d[1][0] for d in dense]):.2f}) |")
        assert want in md.splitlines()
    assert "mean over epochs 4-6" in md


def test_meprop_settings_jobs_share_dense_runs():
    """Each setting's per-example runs, and dense once per (batch, init, dropout, clip)."""
    from sparsebp.bench import meprop_settings as ms

    jobs = ms._jobs([0, 3], 2)
    assert sorted(j[0] for j in jobs if j[1] == "meprop") == sorted(list(ms.SETTINGS) * 2)
    dense_keys = [tuple(ms.SETTINGS[j[0]][i] for i in (0, 2, 3, 4)) for j in jobs if j[1] == "dense"]
    assert len(dense_keys) == 2 * len(set(dense_keys)) == 2 * len({tuple(v[i] for i in (0, 2, 3, 4))
                                                                   for v in ms.SETTINGS.values()})


@pytest.mark.parametrize("every_row,clip", [(False, None), (True, None), (True, 0.05)])
def test_meprop_settings_adam_against_float64(every_row, clip):
    """The study's Adam over three steps whose gradients touch a few rows: on every row (a
    touched-rows gradient counts as zero elsewhere; every row's moments decay and move it) or only
    on the touched rows (sparsebp's rule), with optional element-wise clipping; against Adam in
    float64 NumPy."""
    from sparsebp import nn
    from sparsebp.bench import meprop_settings as ms

    rng = np.random.default_rng(11)
    w0 = rng.standard_normal((6, 4)).astype(np.float32)
    p = nn.Param("w", w0.copy())
    opt = ms._optimizer([p], every_row, clip)
    w, m, v = w0.astype(np.float64), np.zeros((6, 4)), np.zeros((6, 4))
    for t, rows in enumerate(([1, 4], [0, 1], [5]), start=1):
        g = rng.standard_normal((len(rows), 4)).astype(np.float32) * 0.1
        p.grad, p.rows = g.copy(), np.array(rows, dtype=np.int32)
        opt.step()
        full = np.zeros((6, 4))
        full[rows] = g
        if clip is not None:
            full = np.clip(full, -clip, clip)
        upd = np.arange(6) if every_row else np.array(rows)
        m[upd] = 0.9 * m[upd] + 0.1 * full[upd]
        v[upd] = 0.999 * v[upd] + 0.001 * full[upd] ** 2
        w[upd] -= 1e-3 * (m[upd] / (1 - 0.9 ** t)) / (np.sqrt(v[upd] / (1 - 0.999 ** t)) + 1e-8)
    # Row 4 is touched at step 1 only: on every row its momentum moves it ~1e-3 at steps 2 and 3,
    # far beyond the tolerance, so the two rules cannot pass for each other.
    np.testing.assert_allclose(p.data, w, rtol=0, atol=1e-6)


def test_meprop_settings_main_runs_each_setting_and_seed_once(tmp_path):
    """End to end through the spawned workers: a repeated seed or setting is run once, and the dense
    run of the setting is there to compare against."""
    import csv

    from sparsebp.bench import meprop_settings as ms

    ms.main(["--out", str(tmp_path), "--seeds", "0", "0", "--epochs", "1", "--jobs", "1",
             "--settings", "batch 10", "batch 10"])
    rows = list(csv.DictReader(open(tmp_path / "meprop_settings.csv")))
    assert sorted((r["setting"], r["model"], r["seed"], r["epoch"]) for r in rows) == [
        ("batch 10", "dense", "0", "1"), ("batch 10", "meProp k=20 per example", "0", "1")]
    assert "| batch 10 |" in (tmp_path / "meprop_settings.md").read_text()
    with pytest.raises(SystemExit):
        ms.main(["--out", str(tmp_path), "--settings", "batch 7"])


def test_vrpge_lr_main_writes_one_row_per_run(tmp_path):
    """The lr study end to end through the shared study runner (its runs give one row each)."""
    import csv

    from sparsebp.bench import vrpge_lr

    vrpge_lr.main(["--out", str(tmp_path), "--keeps", "0.5", "--lrs", "0.2", "--seeds", "0", "--search", "1",
                   "--finetune", "0", "--jobs", "1"])
    rows = list(csv.DictReader(open(tmp_path / "vrpge_lr.csv")))
    assert sorted(r["method"] for r in rows) == ["random", "vr-pge"]
    assert "| 0.5 | random mask | 1 |" in (tmp_path / "vrpge_lr.md").read_text()


def test_meprop_settings_glorot_init():
    """The paper's C# initialisation: normal weights of variance 2 / (in + out), zero biases."""
    from sparsebp import demo
    from sparsebp.bench import meprop_settings as ms

    model = demo.build("meprop", 20, 0.9, 0.5, 0, 0.0)
    ms._glorot(model, 0)
    for layer in [la for la in model.layers if hasattr(la, "weight")]:
        out_f, in_f = layer.weight.data.shape
        assert layer.weight.data.dtype == np.float32 and not layer.bias.data.any()
        assert abs(layer.weight.data.std() / np.sqrt(2.0 / (in_f + out_f)) - 1) < 0.05
        assert abs(layer.weight.data.mean()) < 0.1 * np.sqrt(2.0 / (in_f + out_f))


def test_vrpge_lr_report_against_numpy():
    """The lr-of-s study's table: mean validation accuracy per (keep, lr) and learned minus random
    seed by seed (mean, standard error, seeds ahead), computed here independently."""
    from sparsebp.bench import vrpge_lr

    rng = np.random.default_rng(5)
    rows = [dict(method="random", keep=0.1, lr_s=float("nan"), seed=s, val_acc=float(rng.uniform(0.9, 0.96)),
                 polarised=float("nan"), step_ms=1.0) for s in range(4)]
    rows += [dict(method="vr-pge", keep=0.1, lr_s=lr, seed=s, val_acc=float(rng.uniform(0.9, 0.96)),
                  polarised=float(rng.uniform(0.9, 1.0)), step_ms=float(rng.uniform(1, 2)))
             for lr in (0.05, 0.2) for s in range(4)]
    rng.shuffle(rows)  # the report must not rely on row order
    md = vrpge_lr.report(rows)
    rnd = {r["seed"]: r["val_acc"] for r in rows if r["method"] == "random"}
    for lr in (0.05, 0.2):
        rs = [r for r in rows if r["method"] == "vr-pge" and r["lr_s"] == lr]
        d = np.array([100 * (r["val_acc"] - rnd[r["seed"]]) for r in rs])
        want = (f"| 0.1 | {lr:g} | 4 | {100 * np.mean([r['val_acc'] for r in rs]):.2f} | {d.mean():+.2f} | "
                f"{d.std(ddof=1) / 2:.2f} | {int((d > 0).sum())} / 4 | {np.mean([r['polarised'] for r in rs]):.3f} | "
                f"{np.median([r['step_ms'] for r in rs]):.2f} |")
        assert want in md.splitlines()
    assert f"| 0.1 | random mask | 4 | {100 * np.mean(list(rnd.values())):.2f} |" in md


def test_vrpge_lr_runs_on_training_digits_only(tmp_path, train_split_only):
    """One short run of each kind end to end; the study must never read the test split."""
    from sparsebp.bench import vrpge_lr

    learned = vrpge_lr._run(("vr-pge", 0.25, 0.2, 0, 1, 0, "unit"))
    random = vrpge_lr._run(("random", 0.25, float("nan"), 0, 1, 0, "unit"))
    for r in (learned, random):
        assert 0.5 < r["val_acc"] <= 1.0 and r["step_ms"] > 0
    assert 0.0 <= learned["polarised"] <= 1.0
    for bad in (["--keeps", "0"], ["--keeps", "1.5"], ["--lrs", "0"], ["--seeds", "-1"], ["--jobs", "0"]):
        with pytest.raises(SystemExit):
            vrpge_lr.main(["--out", str(tmp_path), *bad])
    assert not (tmp_path / "vrpge_lr.csv").exists()


def test_torch_meprop_step_runs_and_reports():
    """The PyTorch meProp step benchmark on one short round: every contender timed, the report's
    ratios are the rows' times over dense's."""
    pytest.importorskip("torch")
    from sparsebp.bench import torch_meprop

    old = torch_meprop.STEPS
    torch_meprop.STEPS = 2
    try:
        rows = torch_meprop.run_case(reps=1)
    finally:
        torch_meprop.STEPS = old
    by = {r["contender"]: r for r in rows}
    assert {"dense", "unified", "per example"} <= set(by)
    for r in rows:
        assert r["step_ms"] > 0
        assert r["speedup"] == pytest.approx(by["dense"]["step_ms"] / r["step_ms"])
    md = torch_meprop.report(rows)
    assert "| unified |" in md and "| per example |" in md
