"""Shared fixtures: every kernel test runs once per available ISA (the emulated AVX-512 table included)."""
import os

import pytest

import sparsebp
from sparsebp._runtime import _set_isa

ISAS = sparsebp.available_isas()

# Jobs split across threads from 2^19 multiply-adds per thread by default; the tests' cases are
# mostly smaller, so they lower it to 2^16 to keep exercising the threaded paths (test_threads.py
# checks the default in a clean environment).
os.environ.setdefault("SPARSEBP_MIN_WORK", str(1 << 16))

# CI names the tables that must be present (so a build that silently lost one fails loudly).
_required = [s for s in os.environ.get("SPARSEBP_REQUIRE_ISAS", "").split(",") if s]
_missing = [s for s in _required if s not in ISAS]
if _missing:
    raise RuntimeError(f"SPARSEBP_REQUIRE_ISAS wants {_missing}, but this build offers only {ISAS}")


if os.environ.get("SPARSEBP_REQUIRE_TORCH") == "1":
    import torch  # noqa: F401  (CI installs torch: its tests must not be skipped for want of it)


@pytest.fixture(params=ISAS)
def isa(request):
    before = sparsebp.active_isa()
    _set_isa(request.param)
    yield request.param
    _set_isa(before)


@pytest.fixture
def threads():
    """Restores the thread count a test changes."""
    before = sparsebp.get_num_threads()
    yield
    sparsebp.set_num_threads(before)
