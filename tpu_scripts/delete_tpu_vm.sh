#!/usr/bin/env bash
# Delete the TPU VM (stops billing).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu_scripts/common.sh
source "$here/common.sh"
gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --quiet
