#!/usr/bin/env bash
# Copy a finished delta checkpoint from the TPU VM to a bucket or to this machine.
#   ./gather_result.sh OUT gs://bucket/deltas/name      # to a bucket
#   ./gather_result.sh OUT ./local-folder               # to local disk (via worker 0)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu_scripts/common.sh
source "$here/common.sh"

[ "$#" -eq 2 ] || die "usage: $0 OUT DESTINATION"
out="$1"; dest="$2"
check="test -f $(printf '%q' "$out")/prinmix_delta.json"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=0 \
  --command="$check" || die "$out on worker 0 is not a finished delta (no prinmix_delta.json)"
case "$dest" in
  gs://*)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=0 \
      --command="gcloud storage cp -r $(printf '%q' "$out") $(printf '%q' "$dest")"
    ;;
  *)
    mkdir -p "$dest"
    gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=0 \
      "$TPU_NAME:$out" "$dest"
    ;;
esac
echo "copied $out to $dest"
