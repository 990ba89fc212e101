#!/usr/bin/env bash
# Create a Cloud TPU VM (all hosts of a slice) and install prinmix-jax with JAX for TPU on every worker.
#   TPU_NAME=my-tpu ZONE=us-central2-b ACCELERATOR_TYPE=v4-16 ./create_tpu_vm.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu_scripts/common.sh
source "$here/common.sh"

command -v gcloud >/dev/null || die "gcloud is not installed (https://cloud.google.com/sdk/docs/install)"

gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} \
  --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION"

install_cmd="set -e
sudo apt-get update -qq && sudo apt-get install -y -qq git python3-venv
if [ ! -d $REMOTE_DIR ]; then git clone --depth 1 --branch $REPO_REF $REPO_URL $REMOTE_DIR; fi
python3 -m venv $REMOTE_DIR/.venv
$REMOTE_DIR/.venv/bin/pip install -q -U pip
$REMOTE_DIR/.venv/bin/pip install -q 'jax[tpu]' -e $REMOTE_DIR
$REMOTE_DIR/.venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count())'"
tpu_ssh_all "$install_cmd"

if [ -n "$BUCKET" ]; then
  bucket_name="${BUCKET#gs://}"; bucket_name="${bucket_name%%/*}"
  mount_cmd="set -e
if ! command -v gcsfuse >/dev/null; then
  export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s)
  echo \"deb https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -
  sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
fi
sudo mkdir -p $SHARED_MOUNT && sudo chown \$USER $SHARED_MOUNT
mountpoint -q $SHARED_MOUNT || gcsfuse --implicit-dirs --rename-dir-limit=100000 $bucket_name $SHARED_MOUNT"
  tpu_ssh_all "$mount_cmd"
fi
echo "TPU VM $TPU_NAME is ready"
