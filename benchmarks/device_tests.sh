#!/usr/bin/env bash
# Test files on a lent GPU (the `device` tool), as one prepared command; each failure's report is printed as it
# happens (PRINMIX_TEST_INSTAFAIL=1, tests/conftest.py), since the tool stops a command at its time limit,
# possibly before pytest's summary (on the first H200 run the reasons for four failures were lost that way).
#
#   run(command="OUT=$OUT bash benchmarks/device_tests.sh", carry=[".whl"], timeout_s=430)   # ~410 s on the H200
#   OUT=/tmp/o bash benchmarks/device_tests.sh tests/test_gptq.py     # other files
#
# Default files: test_numerics (the float32 product check, on the GPU), test_svd_truncated (its float32 checks
# take a GPU slack since the second H200 run), test_gptq, test_error_table, test_rtc. JAX runs on the GPU
# (JAX_PLATFORMS=cuda unless set), without preallocating its memory, at XLA's default optimisation level.
# Tests marked eight_devices are skipped on one GPU (tests/conftest.py). First (NUMERICS=1, the default)
# benchmarks/device_numerics.py runs twice, as is and
# with XLA's Triton GEMM fusions off, into $OUT/numerics.txt; then (LOOP=1, the default)
# benchmarks/bench_gptq_loop.py, whether a step of GPTQ's column loop costs a fixed floor on the GPU (on the
# H200: ~0.026 ms a column, flat in the rows), into $OUT/gptq_loop.txt. The test log goes to $OUT/tests.log.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
# shellcheck source=benchmarks/device_env.sh
source benchmarks/device_env.sh
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} XLA_PYTHON_CLIENT_PREALLOCATE=false PRINMIX_TEST_XLA_OPT=default \
  PRINMIX_TEST_INSTAFAIL=1 PYTHONUNBUFFERED=1
files=("$@")
if [ ${#files[@]} -eq 0 ]; then
  files=(tests/test_numerics.py tests/test_svd_truncated.py tests/test_gptq.py tests/test_error_table.py tests/test_rtc.py)
fi
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee "$OUT/tests.log"
if [ "${NUMERICS:-1}" = 1 ]; then   # the float32 probe first, as is and with XLA's Triton GEMM fusions off
  numerics_probe "$OUT/numerics.txt"
fi
if [ "${LOOP:-1}" = 1 ]; then
  timeout 120 "$PY" benchmarks/bench_gptq_loop.py --rows 1024,8192 --cols 256,1024 2>&1 | tee "$OUT/gptq_loop.txt"
fi
"$PY" -m pytest -p no:cacheprovider -v -rf "${files[@]}" 2>&1 | tee -a "$OUT/tests.log"
