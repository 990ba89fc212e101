#!/usr/bin/env bash
# Sourced by the device scripts (device_scale.sh, device_tests.sh): installs the Python 3.12 wheels carried
# in .whl/ (packages the device's image lacks; device_scale.sh's header says which and how they are made)
# into /tmp/site and puts it first on PYTHONPATH (nothing to do where .whl/ holds no wheel); defines
# numerics_probe, the float32 probe both scripts run.
# shellcheck shell=bash
if compgen -G ".whl/*.whl" >/dev/null; then
  "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# numerics_probe FILE: benchmarks/device_numerics.py twice, as is and with XLA's Triton GEMM fusions off (every
# dot through cuBLAS: does that restore float32 accuracy?), printed as it runs and kept in FILE.
numerics_probe() {
  local file=$1
  timeout 120 "${PYTHON:-python3}" benchmarks/device_numerics.py 2>&1 | tee "$file"
  echo "== numerics with --xla_gpu_enable_triton_gemm=false" | tee -a "$file"
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" timeout 120 "${PYTHON:-python3}" \
    benchmarks/device_numerics.py 2>&1 | tee -a "$file"
}
