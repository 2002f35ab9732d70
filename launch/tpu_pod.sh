#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create it, install cream-jax on every worker, run the same train
# command on all workers (logs streamed here), relaunch after a preemption, and delete it.
#
#   launch/tpu_pod.sh [--dry_run] COMMAND --name NAME --zone ZONE [options] [-- extra train flags]
#
# COMMANDS
#   create   create the TPU VM (or a queued resource with --queued)
#   setup    on every worker: clone/update the repository, install it, mount the bucket (gcsfuse)
#   train    on every worker: python -m cream_jax.train ... --distributed (one process per host)
#   run      create + setup + train, and after a preemption or a failure: recreate if the VM is gone, set
#            up and train again (the run resumes from its own checkpoints), up to --retries times; then
#            delete. Exit code 2 from train (a config or data error: a relaunch would repeat it) stops
#            at once, keeping the TPU for the corrected `train` unless --delete_on_error
#   logs     tail the train log of worker 0
#   delete   delete the TPU VM (or queued resource)
#
# OPTIONS
#   --name NAME          TPU name (required)
#   --zone ZONE          e.g. us-east5-a (required)
#   --project PROJECT    default: gcloud's configured project
#   --type TYPE          accelerator type, e.g. v5p-8, v5p-32, v4-32, v6e-8 (default v5p-8)
#   --version VERSION    TPU runtime (default v2-alpha-tpuv5 for v5p, tpu-ubuntu2204-base otherwise)
#   --spot               a spot (preemptible) VM
#   --queued             create through a queued resource (waits for capacity)
#   --repo URL           git URL of cream-jax (default: this checkout's origin)
#   --bucket BUCKET      a GCS bucket, mounted at /gcs/BUCKET on every worker (for checkpoints and data)
#   --config FILE        train recipe (default configs/llama2_7b_cream_32k.py)
#   --workdir DIR        run directory on every worker; must be shared, e.g. /gcs/BUCKET/runs/NAME
#   --retries N          relaunches after preemption or failure for `run` (default 5)
#   --delete_on_error    `run`: delete the TPU when train stops with a config or data error (exit 2)
#   --dry_run            print every gcloud command instead of running it
#
# Example
#   launch/tpu_pod.sh run --name cream32k --zone us-east5-a --type v5p-32 --spot --bucket my-bucket \
#       --workdir /gcs/my-bucket/runs/cream32k -- --config.model.init_from=/gcs/my-bucket/Llama-2-7b-hf \
#       --config.data.data_dir=/gcs/my-bucket/tensorflow_datasets
set -euo pipefail

DRY_RUN=0
NAME=""
ZONE=""
PROJECT=""
TYPE="v5p-8"
VERSION=""
SPOT=0
QUEUED=0
REPO=""
BUCKET=""
CONFIG="configs/llama2_7b_cream_32k.py"
WORKDIR=""
RETRIES=5
DELETE_ON_ERROR=0
EXTRA=()

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

COMMAND="${1:-}"
[[ -z "$COMMAND" || "$COMMAND" == "-h" || "$COMMAND" == "--help" ]] && usage 0
if [[ "$COMMAND" == "--dry_run" ]]; then DRY_RUN=1; shift; COMMAND="${1:-}"; fi
shift || true
while [[ $# -gt 0 ]]; do
  # --option=value, as the Python CLIs take it, is --option value (what follows -- is passed on as it is)
  if [[ "$1" == --?*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case "$1" in
    --dry_run) DRY_RUN=1 ;;
    --name) NAME="$2"; shift ;;
    --zone) ZONE="$2"; shift ;;
    --project) PROJECT="$2"; shift ;;
    --type) TYPE="$2"; shift ;;
    --version) VERSION="$2"; shift ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --repo) REPO="$2"; shift ;;
    --bucket) BUCKET="$2"; shift ;;
    --config) CONFIG="$2"; shift ;;
    --workdir) WORKDIR="$2"; shift ;;
    --retries) RETRIES="$2"; shift ;;
    --delete_on_error) DELETE_ON_ERROR=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  shift
done

case "$COMMAND" in create|setup|train|run|logs|delete) ;; *) die "unknown command '$COMMAND' (see --help)" ;; esac
[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
if [[ -z "$VERSION" ]]; then
  case "$TYPE" in v5p-*) VERSION="v2-alpha-tpuv5" ;; v5litepod-*|v5e-*) VERSION="v2-alpha-tpuv5-lite" ;;
    v6e-*) VERSION="v2-alpha-tpuv6e" ;; *) VERSION="tpu-ubuntu2204-base" ;; esac
fi
if [[ -z "$REPO" ]]; then
  REPO="$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || echo https://github.com/cream-jax/cream-jax.git)"
fi
[[ -n "$WORKDIR" || "$COMMAND" =~ ^(create|delete|logs|setup)$ ]] || die "--workdir is required for '$COMMAND'"

GCLOUD=(gcloud compute tpus)
LOCATION=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && LOCATION+=(--project "$PROJECT")

# Run a command, or print it (shell-quoted) with --dry_run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    local line
    line="$(printf '%q ' "$@")"
    echo "${line% }"
  else
    "$@"
  fi
}

on_all_workers() { run "${GCLOUD[@]}" tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=all --command "$1"; }

create() {
  local spot=()
  [[ "$SPOT" == 1 ]] && spot=(--spot)
  if [[ "$QUEUED" == 1 ]]; then
    run "${GCLOUD[@]}" queued-resources create "$NAME" "${LOCATION[@]}" --node-id "$NAME" \
      --accelerator-type "$TYPE" --runtime-version "$VERSION" "${spot[@]}"
    run "${GCLOUD[@]}" queued-resources describe "$NAME" "${LOCATION[@]}" --format='value(state.state)'
  else
    run "${GCLOUD[@]}" tpu-vm create "$NAME" "${LOCATION[@]}" --accelerator-type "$TYPE" \
      --version "$VERSION" "${spot[@]}"
  fi
}

setup() {
  local mount=""
  if [[ -n "$BUCKET" ]]; then
    mount="(mountpoint -q /gcs/$BUCKET || (sudo apt-get install -y -q gcsfuse && sudo mkdir -p /gcs/$BUCKET && \
sudo chown \$USER /gcs/$BUCKET && gcsfuse --implicit-dirs $BUCKET /gcs/$BUCKET)) && "
  fi
  on_all_workers "${mount}(test -d cream-jax || git clone $REPO cream-jax) && cd cream-jax && git pull --ff-only && \
python3 -m pip install -q -r requirements.txt -r requirements-tpu.txt && python3 -m pip install -q --no-deps -e ."
}

train_command() {
  local flags=(--config="$CONFIG" --workdir="$WORKDIR" --distributed "${EXTRA[@]}")
  printf 'set -o pipefail; cd cream-jax && python3 -m cream_jax.train'
  printf ' %q' "${flags[@]}"
  printf ' 2>&1 | tee -a train.log'
}

train() { on_all_workers "$(train_command)"; }

# A preempted run exits 0 after saving (SIGTERM) or the ssh fails (VM gone): done only when status.json says so.
finished() {
  [[ "$DRY_RUN" == 1 ]] && return 0
  "${GCLOUD[@]}" tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=0 \
    --command "grep -q '\"state\": \"done\"' $WORKDIR/status.json" 2>/dev/null
}

state() { "${GCLOUD[@]}" tpu-vm describe "$NAME" "${LOCATION[@]}" --format='value(state)' 2>/dev/null || echo GONE; }

delete() {
  if [[ "$QUEUED" == 1 ]]; then
    run "${GCLOUD[@]}" queued-resources delete "$NAME" "${LOCATION[@]}" --force --quiet
  else
    run "${GCLOUD[@]}" tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
  fi
}

case "$COMMAND" in
  create) create ;;
  setup) setup ;;
  train) train ;;
  logs) run "${GCLOUD[@]}" tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=0 --command "tail -f cream-jax/train.log" ;;
  delete) delete ;;
  run)
    create
    setup
    attempt=0
    while true; do
      rc=0
      train || rc=$?
      if [[ "$rc" == 0 ]] && finished; then break; fi
      if [[ "$DRY_RUN" == 1 ]]; then break; fi
      if [[ "$rc" == 2 ]]; then
        echo "tpu_pod.sh: train exited 2: a config or data error (its message is above), which a relaunch" \
          "would repeat; not retried" >&2
        if [[ "$DELETE_ON_ERROR" == 1 ]]; then
          delete
        else
          echo "tpu_pod.sh: the TPU $NAME is kept: fix the flags and run \`tpu_pod.sh train\` with them, or" \
            "\`tpu_pod.sh delete\`" >&2
        fi
        exit 2
      fi
      attempt=$((attempt + 1))
      if [[ "$attempt" -gt "$RETRIES" ]]; then
        echo "tpu_pod.sh: giving up after $RETRIES relaunches (train exited $rc); the TPU is kept for" \
          "inspection" >&2
        exit 1
      fi
      current="$(state)"
      echo "tpu_pod.sh: train exited $rc; TPU state: $current (relaunch $attempt of $RETRIES)" >&2
      if [[ "$current" == PREEMPTED || "$current" == GONE || "$current" == TERMINATED ]]; then
        delete || true
        create
        setup
      fi
    done
    delete
    ;;
esac
