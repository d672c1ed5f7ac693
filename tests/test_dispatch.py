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
    r = subprocess.run([sys.executable, "-m", "sparsebp.cli", "info"], capture_output=True, text=True,
                       env=dict(os.environ, SPARSEBP_BUFFER_CACHE_MB="3"))
    assert r.returncode == 0 and "buffer cache   : keeps up to 3 MiB" in r.stdout, r.stdout


def _sysfs_last_level_cache(root: str = "/sys/devices/system/cpu/cpu0/cache"):
    """The highest-level data or unified cache of CPU 0 in Linux's sysfs, in bytes (None: none listed)."""
    best = None
    for entry in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        d = os.path.join(root, entry)
        try:
            with open(os.path.join(d, "level")) as f:
                level = int(f.read())
            with open(os.path.join(d, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(d, "size")) as f:
                size = f.read().strip()
        except (OSError, ValueError):
            continue
        if kind not in ("Data", "Unified"):
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        nbytes = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        if best is None or level > best[0]:
            best = (level, nbytes)
    return best


def test_llc_share_bytes_matches_sysfs():
    # The tile width of the gathered per-example products follows this figure (ops.cpp spmm_rows).
    info = sparsebp.build_info()
    assert isinstance(info["llc_share_bytes"], int) and info["llc_share_bytes"] >= 0
    best = _sysfs_last_level_cache()
    if best is None or best[0] < 2:
        assert info["llc_share_bytes"] == 0
    else:
        assert info["llc_share_bytes"] == best[1]
