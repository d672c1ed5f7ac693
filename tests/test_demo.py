"""The main job, `sparsebp demo`, on a small slice (a smoke run: it trains, reports, writes files),
and its argument checks."""
import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from sparsebp import demo


def test_demo_quick_run(tmp_path):
    res = demo.run(epochs=1, batch=64, out=str(tmp_path), quick=True, progress=False, with_torch=False)
    assert list(res)[0] == "dense (NumPy)" and len(res) == 5
    for name, hist in res.items():
        assert len(hist) == 1 and 0.0 <= hist[0]["test_acc"] <= 1.0 and hist[0]["total_s"] > 0, name
    assert res["dense (NumPy)"][0]["test_acc"] > 0.5  # it learns (chance is 0.1)
    assert (tmp_path / "demo.csv").exists()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "demo.png").stat().st_size > 1000
    table = demo.table(res)
    assert "| dense (NumPy) |" in table and "speed-up" in table


def test_demo_saves_the_trained_models(tmp_path, capsys):
    """--save-models: each trained model loads back (sparsebp.nn.load) with the test accuracy the
    demo reported for its last epoch, on the same test digits."""
    from sparsebp import cli, nn
    from sparsebp.datasets import load_mnist

    assert cli.main(["demo", "--quick", "--epochs", "1", "--batch", "64", "--no-torch", "--out", str(tmp_path),
                     "--save-models"]) == 0
    out = capsys.readouterr().out
    Xt, yt = load_mnist("test")
    Xt, yt = Xt[:500], yt[:500]  # the quick run's test digits
    rows = {}
    import csv

    with open(tmp_path / "demo.csv") as f:
        for r in csv.DictReader(f):
            rows[r["model"]] = float(r["test_acc"])
    kinds = {"dense": "dense (NumPy)", "meprop": "meProp k=20", "meprop-unified": "meProp k=20 unified",
             "msbp": "MSBP k=20, alpha=0.5", "sparse+meprop": "sparse 90% + meProp k=20"}
    for kind, name in kinds.items():
        model = nn.load(tmp_path / f"{kind}.safetensors")
        assert abs(nn.evaluate(model, Xt, yt) - rows[name]) < 1e-9, kind
    assert isinstance(nn.load(tmp_path / "sparse+meprop.safetensors").layers[0], nn.SparseLinear)
    assert "safetensors" in out
    with pytest.raises(SystemExit):
        cli.main(["demo", "--quick", "--out", "", "--save-models"])
    assert "argument --save-models" in capsys.readouterr().err


def test_demo_seed_changes_the_run_and_repeats_it():
    """--seed reaches the models: another seed gives other weights; the same seed the same run."""
    kw = dict(epochs=1, batch=64, out=None, quick=True, progress=False, with_torch=False)
    a, b, c = (demo.run(seed=s, **kw) for s in (0, 1, 0))
    acc = lambda r: [h[0]["test_acc"] for h in r.values()]  # noqa: E731
    assert acc(a) == acc(c)
    assert acc(a) != acc(b)


def test_demo_with_sgd_runs(tmp_path):
    res = demo.run(epochs=1, batch=64, out=None, quick=True, progress=False, with_torch=False, optimizer="sgd")
    assert res["dense (NumPy)"][0]["test_acc"] > 0.5
    with pytest.raises(ValueError, match="optimizer"):
        demo.run(epochs=1, quick=True, out=None, optimizer="rmsprop")
    with pytest.raises(ValueError, match="dropout"):
        demo.run(epochs=1, quick=True, out=None, dropout=1.0)


def test_demo_models_carry_dropout_only_when_asked():
    for kind in ("dense", "meprop", "meprop-unified", "msbp", "sparse+meprop"):
        with_drop = demo.build(kind, 20, 0.9, 0.8, 0, dropout=0.1)
        without = demo.build(kind, 20, 0.9, 0.8, 0, dropout=0.0)
        assert [type(m).__name__ for m in with_drop.layers].count("Dropout") == 2, kind
        assert not any(type(m).__name__ == "Dropout" for m in without.layers), kind
        # the same initial weights either way
        for a, b in zip(with_drop.params(), without.params()):
            np.testing.assert_array_equal(a.data, b.data)


@pytest.mark.parametrize("args", [["--epochs", "0"], ["--sparsity", "1.0"], ["--k", "-3"], ["--optimizer", "lbfgs"],
                                  ["--dropout", "1.0"], ["--dropout", "-0.2"], ["--seed", "-1"], ["--seed", "x"],
                                  ["--alpha", "1.5"], ["--alpha", "nan"], ["--lr", "0"], ["--lr", "-1e-3"],
                                  ["--lr", "inf"]])
def test_demo_rejects_bad_arguments(args):
    proc = subprocess.run([sys.executable, "-m", "sparsebp.cli", "demo", *args], capture_output=True, text=True)
    assert proc.returncode == 2 and "error" in proc.stderr


@pytest.mark.parametrize("argv", [
    ["vrpge", "--lr", "-1"], ["vrpge", "--lr-s", "nan"], ["vrpge", "--limit", "-5"], ["vrpge", "--lr", "0"],
    ["vrpge", "--seeds", "0"], ["vrpge", "--search", "-1"], ["vrpge", "--finetune", "-1"], ["vrpge", "--batch", "0"],
    ["bench", "--reps", "0"], ["bench", "--threads", "0"], ["bench", "--threads", "1", "-2"],
    ["demo", "--alpha", "-0.1"], ["demo", "--lr", "nan"],
])
def test_command_lines_reject_bad_values_as_usage_errors(argv, capsys):
    """A bad number is argparse's usage error (exit 2, the option named), before any work starts."""
    from sparsebp import cli

    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert f"argument {argv[1]}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, option", [
    (["demo", "--batch", "13001"], "--batch"), (["demo", "--quick", "--batch", "2001"], "--batch"),
    (["vrpge", "--limit", "100", "--batch", "101"], "--batch"), (["demo", "--out", "{file}/sub"], "--out"),
    (["bench", "--what", "sparse-grad", "--out", "{file}/sub"], "--out"), (["vrpge", "--out", "{file}/sub"], "--out"),
])
def test_command_lines_reject_unusable_batch_and_out_before_work(argv, option, tmp_path, capsys):
    """A batch larger than the training digits (it would train nothing), or a results folder that
    cannot be made (here: under a regular file), is a usage error naming the option, before any
    training or timing starts (the folder used to fail only when the results were written)."""
    from sparsebp import cli

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    argv = [a.replace("{file}", str(blocker)) for a in argv]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and ("larger than" in err or "cannot create the folder" in err)


@pytest.mark.parametrize("module, argv", [
    ("sparsebp.bench.sparse_grad", ["--reps", "0"]), ("sparsebp.bench.linear", ["--threads", "0"]),
    ("sparsebp.bench.msbp_alpha", ["--out", "x", "--epochs", "0"]),
    ("sparsebp.bench.msbp_alpha", ["--out", "x", "--alphas", "1"]),
    ("sparsebp.bench.msbp_alpha", ["--out", "x", "--seeds", "-1"]),
])
def test_benchmark_command_lines_reject_bad_values(module, argv, capsys):
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(argv)
    assert e.value.code == 2 and "argument" in capsys.readouterr().err


def test_version_flag_prints_the_installed_distribution_version(capsys):
    """``sparsebp --version`` says the version the installed package's metadata carries."""
    from importlib.metadata import version

    from sparsebp import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"sparsebp {version('sparsebp')}"
