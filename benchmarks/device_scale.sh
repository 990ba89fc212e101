#!/usr/bin/env bash
# Issue 14, item 5, as one prepared command for a lent accelerator (the `device` tool): the Llama-2-7B-shaped
# pair at full depth, `prinmix compress --data-free` end to end, wall time including XLA compilation.
#
#   0. with NUMERICS=1 (off by default: on a GPU its compiles can take a minute the full-depth run needs;
#      benchmarks/device_tests.sh runs it in the second call), benchmarks/device_numerics.py twice, as is and
#      with XLA's Triton GEMM fusions off: float32 accuracy of the SVD path's products and decompositions;
#   1. a short run (SHORT_LAYERS blocks; 0, the default, skips it) whose per-block figures give a projection
#      to full depth even if the long run does not finish inside the command's time limit;
#   2. the full-depth run (LAYERS, default 32; 0 skips it), given what is left of TOTAL seconds (default 570,
#      inside the device tool's 600-s command limit) and stopped there.
#
# The first H200 run (2026-12-04) ran with SHORT_LAYERS=2, TOTAL=560: the 2-block run took 120 s of the
# window, and the full-depth run stopped at step 22 of 33 of its compress pass. Hence the 2-block run is off by
# default, and the writer processes run with one BLAS thread each (they had 16 each on 16 cores). The second
# run (the same day, these defaults) wrote the 32-block pair in 36.9 s and compressed it in 337.2 s: 400 s of
# the first command, so the detached wait below was not needed then.
# Then, if >= 2 min of device time is left, at once (the machine stays warm 30 s): benchmarks/device_tests.sh.
#
# The full-depth run is detached (DETACH=1, the default): it runs in a process session of its own (setsid),
# which the device tool leaves running after the command returns, until the machine goes back. The command
# waits for it until TOTAL; if it has not finished by then, a second call made at once (within the 30 s the
# machine stays warm) waits for it again and collects it, without installing or writing anything:
#
#   run(command="MODE=wait OUT=$OUT bash benchmarks/device_scale.sh", timeout_s=<device time left - 20>)
#
# So a run that overruns one 600-s command is still measured end to end (bench_scale times its compress child
# itself; the waiting is not in its figures). Everything the run writes goes to $WORK (long.log, long.json,
# long.child.log, long.rc with its exit status); each call copies what is there into its own $OUT.
#
# Each run writes its pair with one process per shard (--jobs, the core count), then compresses it in a fresh
# child. Output lands in $OUT (env.txt, numerics.txt, long.json, long.log and the compress child's log with its
# progress bar and `[stage]` lines: first 60 and last 140 lines; short.* likewise when it runs);
# bench_scale.py prints the tables docs/benchmarks.md takes. Disk: the full-depth pair is 27 GB (both models,
# bf16) plus ~1 GB of delta.
#
# Packages the device's image lacks travel as wheels in .whl/ (ignored by git; name it in `carry`), made here
# for its Python 3.12 with pip download (see the device tool's README), e.g.:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl cvxpy==1.9.3 highspy clarabel osqp qdldl 'sparsediffpy>=0.6,<0.7' \
#     cffi pycparser orbax-checkpoint==0.12.8
# (23 MB; cvxpy imports and solves with HiGHS without scs, whose 43-MB wheel would not fit the 64-MiB tree;
# orbax-checkpoint is pinned to the project's <0.13 range. The image had flax 0.12.10 and orbax 0.12.8 on
# 2026-12-04.) The device's own jax (0.11.2 with its CUDA plugin on 2026-12-04) runs this code; this script
# refuses a run where JAX does not see an accelerator, so a CPU-only number never passes for a device one
# (PRINMIX_ALLOW_CPU=1 overrides, for trying the script itself at a small SCALE on a CPU).
#
#   SCALE=0.0625 LAYERS=4 PRINMIX_ALLOW_CPU=1 OUT=/tmp/o bash benchmarks/device_scale.sh    # a CPU dry run
#
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"     # the detached run starts this script again
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
SCALE=${SCALE:-1}
SHORT_LAYERS=${SHORT_LAYERS:-0}
NUMERICS=${NUMERICS:-0}
LAYERS=${LAYERS:-32}
TOTAL=${TOTAL:-570}
WORK=${WORK:-/tmp/prinmix-device-scale}
JOBS=${JOBS:-$(nproc)}
SHARD_MB=${SHARD_MB:-1000}   # 14 shards a model at full depth: one writer process each
PY=${PYTHON:-python3}
MODE=${MODE:-run}           # run: everything; wait: wait for an earlier call's detached run and collect it
DETACH=${DETACH:-1}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"

bench_cmd() {   # bench_cmd NAME LAYERS: the bench_scale command line of a run, into the array CMD
  CMD=("$PY" benchmarks/bench_scale.py --models llama2 --modes data-free --layers "$2"
       --shapes-scale "$SCALE" --progress --keep --jobs "$JOBS" --shard-mb "$SHARD_MB" --workdir "$WORK/$1"
       --out-json "$WORK/$1.json")
}

excerpt() {   # excerpt NAME: the compress child's log (its progress bar: how far a run got, and when) -> $WORK
  local f
  for f in "$WORK/$1"/*/delta-*.log; do
    if [ -f "$f" ]; then
      { tr '\r' '\n' <"$f" | sed -n '1,60p'; echo "[...]"; tr '\r' '\n' <"$f" | tail -n 140; } >"$WORK/$1.child.log"
    fi
  done
}

collect() {   # collect NAME: what the run has written so far, into this call's $OUT
  local name=$1 f
  if [ ! -f "$WORK/$name.rc" ]; then excerpt "$name"; fi       # still running: its log as it stands
  for f in "$name.log" "$name.json" "$name.child.log"; do
    if [ -f "$WORK/$f" ]; then cp "$WORK/$f" "$OUT/$f"; fi
  done
  if [ -f "$WORK/$name.log" ]; then tail -n 40 "$WORK/$name.log"; fi
}

wait_for() {   # wait_for NAME DEADLINE: until the detached run has finished or $SECONDS reaches DEADLINE
  local name=$1 deadline=$2 last=$SECONDS
  while [ ! -f "$WORK/$name.rc" ] && [ "$SECONDS" -lt "$deadline" ]; do
    sleep 5
    if [ $((SECONDS - last)) -ge 60 ]; then      # a sign of life: the child's last progress line
      last=$SECONDS
      tail -c 300 "$WORK/$name"/*/delta-*.log 2>/dev/null | tr '\r' '\n' | grep -v '^$' | tail -n 1 || true
    fi
  done
  collect "$name"
  if [ -f "$WORK/$name.rc" ]; then
    echo "== $name: finished, exit $(cat "$WORK/$name.rc")"
    return 0
  fi
  echo "== $name: still running after this call's ${TOTAL} s; call again at once, within 30 s:"
  echo "   MODE=wait OUT=\$OUT bash benchmarks/device_scale.sh"
  return 3
}

if [ "$MODE" = job ]; then     # the detached run itself (started below with setsid): no terminal, no $OUT
  rc=0
  bench_cmd "$JOB_NAME" "$JOB_LAYERS"
  "${CMD[@]}" >"$WORK/$JOB_NAME.log" 2>&1 || rc=$?
  excerpt "$JOB_NAME"
  rm -rf "${WORK:?}/$JOB_NAME"
  echo "$rc" >"$WORK/$JOB_NAME.rc"
  exit 0
fi
if [ "$MODE" = wait ]; then
  if [ ! -f "$WORK/long.log" ]; then
    echo "no detached run in $WORK on this machine (a fresh one, or none was started): nothing to wait for" >&2
    exit 2
  fi
  wait_for long "$TOTAL"
  exit $?
fi

# shellcheck source=benchmarks/device_env.sh
source benchmarks/device_env.sh

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" - <<'EOF'
import importlib
for m in ("jax", "jaxlib", "flax", "orbax.checkpoint", "cvxpy", "highspy", "transformers", "numpy"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:   # report, the run below fails with the real error
        print(m, "MISSING", type(e).__name__, e)
import jax
print("devices", jax.devices())
import resource
import jax.numpy as jnp
jax.jit(lambda x: jnp.linalg.eigh(x @ x.T)[1])(jnp.ones((256, 256))).block_until_ready()
# the runtime's own host memory (bench_scale's bound takes RUNTIME_BYTES, measured on the CPU backend)
print(f"host peak RSS of jax after start-up and one compiled program: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")
EOF
  echo "nproc $(nproc); free: $(df -h /tmp | tail -1)"
} 2>&1 | tee "$OUT/env.txt"

if [ "${PRINMIX_ALLOW_CPU:-0}" != 1 ] && ! "$PY" -c "import jax, sys; sys.exit(jax.devices()[0].platform == 'cpu')"; then
  echo "JAX sees no accelerator here; refusing to report CPU figures as device ones (PRINMIX_ALLOW_CPU=1 overrides)" >&2
  exit 2
fi

bench() {   # bench NAME LAYERS [timeout]: in this process, stopped at the timeout
  local name=$1 layers=$2 limit=${3:-0} rc=0
  bench_cmd "$name" "$layers"
  echo "== $name: ${CMD[*]}"
  if [ "$limit" -gt 0 ]; then timeout --signal=INT --kill-after=15 "$limit" "${CMD[@]}" >"$WORK/$name.log" 2>&1 || rc=$?
  else "${CMD[@]}" >"$WORK/$name.log" 2>&1 || rc=$?; fi
  excerpt "$name"
  rm -rf "${WORK:?}/$name"
  echo "$rc" >"$WORK/$name.rc"
  collect "$name"
  echo "== $name: exit $rc"
  return "$rc"
}

if [ "$NUMERICS" = 1 ]; then
  echo "== numerics"
  numerics_probe "$OUT/numerics.txt" || echo "numerics: exit $?"
fi
rm -f "$WORK"/short.* "$WORK"/long.*
if [ "$SHORT_LAYERS" -gt 0 ]; then bench short "$SHORT_LAYERS"; fi
left=$((TOTAL - SECONDS))
if [ "$LAYERS" -le 0 ] || [ "$left" -le 60 ]; then
  echo "== long: skipped (LAYERS=$LAYERS, ${left} s left of TOTAL=$TOTAL)"
elif [ "$DETACH" = 1 ]; then
  bench_cmd long "$LAYERS"
  echo "== long (detached): ${CMD[*]}"
  MODE=job JOB_NAME=long JOB_LAYERS=$LAYERS setsid nohup bash "$SELF" >/dev/null 2>&1 </dev/null &
  wait_for long "$TOTAL" || exit 3
else
  bench long "$LAYERS" "$left" || echo "the full-depth run did not finish in ${left} s (exit $?): see long.log"
fi
