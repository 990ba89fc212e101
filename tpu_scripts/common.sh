#!/usr/bin/env bash
# Shared settings for the Cloud TPU scripts. Override any of them in the environment.
# shellcheck disable=SC2034  # variables are used by the scripts that source this file
set -euo pipefail

TPU_NAME="${TPU_NAME:-prinmix-tpu}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null || true)}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-16}"            # v4-16 = 2 hosts
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
REPO_URL="${REPO_URL:-https://github.com/prinmix/prinmix-jax.git}"
REPO_REF="${REPO_REF:-main}"
REMOTE_DIR="${REMOTE_DIR:-\$HOME/prinmix-jax}"          # expanded on the worker
# OUT must be visible to every worker: a gcsfuse-mounted bucket or an NFS/Filestore mount.
SHARED_MOUNT="${SHARED_MOUNT:-/mnt/prinmix}"
BUCKET="${BUCKET:-}"                                      # gs://bucket/prefix mounted at SHARED_MOUNT

die() { echo "error: $*" >&2; exit 1; }

tpu_ssh_all() {
  # Run one command line on every worker of the TPU VM.
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} \
    --worker=all --command="$1"
}
