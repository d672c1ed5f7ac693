"""ISA dispatch: chosen once at import, overridable by SPARSEBP_ISA, never unsafe."""
import json
import os
import subprocess
import sys

import pytest

import sparsebp
from sparsebp._runtime import _set_isa


def run_python(code, **env):
    e = dict(os.environ)
    e.pop("SPARSEBP_ISA", None)
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e)


def test_default_is_best_runnable():
    r = run_python("import sparsebp; print(sparsebp.active_isa())")
    assert r.returncode == 0, r.stderr
    best = [i for i in sparsebp.available_isas() if i != "avx512-emulated"][0]
    assert r.stdout.strip() == best


@pytest.mark.parametrize("name", sparsebp.available_isas())
def test_environment_override(name):
    r = run_python("import sparsebp; print(sparsebp.active_isa())", SPARSEBP_ISA=name)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == name


def test_environment_override_unknown_fails_with_choices():
    r = run_python("import sparsebp", SPARSEBP_ISA="avx9000")
    assert r.returncode != 0
    assert "ImportError" in r.stderr
    assert "SPARSEBP_ISA=avx9000" in r.stderr and "choose one of: " in r.stderr and "scalar" in r.stderr


def test_set_isa_unknown():
    with pytest.raises(ValueError, match="unknown or not compiled ISA 'nope'; choose one of: .*scalar"):
        _set_isa("nope")
    with pytest.raises(TypeError):
        _set_isa(3)


@pytest.mark.parametrize("disabled,refused", [("avx512", "avx512"), ("avx2", "avx2"), ("avx2", "avx512")])
def test_table_the_cpu_cannot_run_is_refused(disabled, refused):
    # SPARSEBP_DISABLE_CPU_FEATURES makes the dispatcher see a CPU without the feature, so the
    # refusal path runs on any machine (on one that truly lacks it, it is the real thing).
    if refused not in sparsebp.build_info()["compiled_isas"]:
        pytest.fail(f"the {refused} table is not compiled into this build")
    code = "import sparsebp; print(','.join(sparsebp.available_isas())); print(sparsebp.active_isa())"
    r = run_python(code, SPARSEBP_DISABLE_CPU_FEATURES=disabled)
    assert r.returncode == 0, r.stderr
    avail, active = r.stdout.split()
    assert refused not in avail.split(",") and active != refused and "scalar" in avail
    r = run_python("import sparsebp", SPARSEBP_DISABLE_CPU_FEATURES=disabled, SPARSEBP_ISA=refused)
    assert r.returncode != 0 and "this CPU cannot run it; choose one of: " in r.stderr


def test_build_info_and_cli():
    info = sparsebp.build_info()
    assert info["active_isa"] in info["available_isas"]
    assert set(info["available_isas"]) <= set(info["compiled_isas"])
    assert "scalar" in info["available_isas"]
    assert isinstance(info["cuda"], bool)  # True only in a SPARSEBP_CUDA=ON build
    if info["cuda"]:
        assert len(info["cuda_devices"]) == sparsebp._core.cuda_device_count()
    else:  # no GPU code: no devices reported, and the CUDA entry points say why
        assert info["cuda_devices"] == []
        with pytest.raises(ValueError, match="no CUDA kernels"):
            sparsebp._core.cuda_synchronize(0, 0)
    r = subprocess.run([sys.executable, "-m", "sparsebp.cli", "info", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["version"] == sparsebp.__version__
    r = subprocess.run([sys.executable, "-m", "sparsebp.cli", "info"], capture_output=True, text=True)
    assert r.returncode == 0 and "active ISA" in r.stdout
