#!/usr/bin/env bash
# Run a multi-host `prinmix compress` on every worker of the TPU VM (one process per host).
#   ./run_compress.sh BASE FINETUNED OUT CALIB [extra prinmix compress options...]
# BASE, FINETUNED and CALIB are paths on the workers (e.g. under $SHARED_MOUNT); OUT must be on the shared
# mount so that every process sees the same checkpoint manager. Rerunning the same command resumes.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu_scripts/common.sh
source "$here/common.sh"

[ "$#" -ge 4 ] || die "usage: $0 BASE FINETUNED OUT CALIB [prinmix compress options...]"
base="$1"; finetuned="$2"; out="$3"; calib="$4"; shift 4
extra=""
for a in "$@"; do extra+=" $(printf '%q' "$a")"; done

cmd="set -e; cd $REMOTE_DIR; .venv/bin/prinmix compress --distributed --no-progress \
$(printf '%q' "$base") $(printf '%q' "$finetuned") $(printf '%q' "$out") --calib $(printf '%q' "$calib")$extra"
tpu_ssh_all "$cmd"
echo "compressed delta: $out (on the shared mount)"
