#!/usr/bin/env bash
# Sourced by the device scripts (device_scale.sh, device_tests.sh): installs the Python 3.12 wheels carried
# in .whl/ (packages the device's image lacks; device_scale.sh's header says which and how they are made)
# into /tmp/site and puts it first on PYTHONPATH. Nothing to do where .whl/ holds no wheel.
# shellcheck shell=bash
if compgen -G ".whl/*.whl" >/dev/null; then
  "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
