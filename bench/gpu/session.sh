#!/usr/bin/env bash
# One call on a lent GPU machine: build with the CUDA kernels, run the CUDA tests (then, with ALL=1,
# the whole suite), profile one layer's step, and run the GPU benchmark into $OUT.
#   bash bench/gpu/session.sh            (from the repository root, on the device machine)
set -uo pipefail
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16
OUT=${OUT:-/tmp/sparsebp-gpu}
mkdir -p "$OUT"
t0=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-deps . -Ccmake.define.SPARSEBP_CUDA=ON \
  -Ccmake.define.SPARSEBP_AVX512_EMULATED=OFF -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 >"$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
python3 -c "import sparsebp, json; print(json.dumps(sparsebp.build_info()))"
python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -4
echo "cuda tests done: $(( $(date +%s) - t0 )) s"
[ "${PROFILE:-1}" = 1 ] && python3 bench/gpu/layer_profile.py 2>&1 | tee "$OUT/profile.txt" | grep -E "===|ms/step|failed"
[ "${PROFILE:-1}" = 1 ] && python3 bench/gpu/host_cost.py >"$OUT/host_cost.txt" 2>&1
if [ "${BENCH:-1}" = 1 ]; then
  python3 -m sparsebp bench --what cuda --out "$OUT" >"$OUT/bench.log" 2>&1
  cat "$OUT/cuda.md"
  echo "bench done: $(( $(date +%s) - t0 )) s"
fi
if [ "${ALL:-0}" = 1 ]; then
  # 8 workers x 2 kernel threads (16 workers x 16 threads each oversubscribed the 16 cores ~16x)
  SPARSEBP_NUM_THREADS=2 OMP_NUM_THREADS=2 timeout "${ALL_TIMEOUT:-400}" python3 -m pytest -q -p no:cacheprovider \
    -n 8 tests 2>&1 | tail -15
  echo "all tests done: $(( $(date +%s) - t0 )) s"
fi
