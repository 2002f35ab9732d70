#!/usr/bin/env bash
# The TPU pod workflow on this machine's CPU: set up .venv, train (relaunching after a preemption, which
# resumes from the run's own checkpoints), and export the result to Hugging Face format.
#
#   launch/local.sh [--config FILE] [--workdir DIR] [--retries N] [-- extra train flags]
#
# Defaults: configs/tiny_cream.py, runs/local, 3 relaunches. The export lands in WORKDIR/hf-step<N>.
# Example: launch/local.sh -- --config.train.steps=50 --config.checkpoint.every=10
set -euo pipefail

cd "$(dirname "$0")/.."
CONFIG="configs/tiny_cream.py"
WORKDIR="runs/local"
RETRIES=3
EXTRA=()
while [[ $# -gt 0 ]]; do
  # --option=value, as the Python CLIs take it, is --option value (what follows -- is passed on as it is)
  if [[ "$1" == --?*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case "$1" in
    --config) CONFIG="$2"; shift ;;
    --workdir) WORKDIR="$2"; shift ;;
    --retries) RETRIES="$2"; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "local.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

make setup
PY=.venv/bin/python
export JAX_PLATFORMS=cpu

finished() { grep -q '"state": "done"' "$WORKDIR/status.json" 2>/dev/null; }

attempt=0
# A preempted run (SIGTERM) exits 0 after saving: relaunch until status.json says done. Exit code 2 is a
# config or data error: relaunching would not help.
while true; do
  rc=0
  # --reuse_freed_memory: on CPU glibc keeps each step's freed buffers for the next (faster, more resident memory)
  "$PY" -m cream_jax.train --config="$CONFIG" --workdir="$WORKDIR" --reuse_freed_memory "${EXTRA[@]}" || rc=$?
  if [[ "$rc" == 0 ]] && finished; then break; fi
  if [[ "$rc" == 2 ]]; then exit 2; fi
  attempt=$((attempt + 1))
  if [[ "$attempt" -gt "$RETRIES" ]]; then
    echo "local.sh: training failed $attempt times; giving up" >&2
    exit 1
  fi
  resume="from the start (no checkpoint yet)"
  [[ -d "$WORKDIR/checkpoints" ]] && resume="resuming from $WORKDIR/checkpoints"
  echo "local.sh: training stopped (exit $rc); relaunching ($attempt of $RETRIES), $resume" >&2
done

STEP="$(sed -E 's/.*"step": ([0-9]+).*/\1/' "$WORKDIR/status.json")"
EXPORT="$WORKDIR/hf-step$STEP"
if [[ -e "$EXPORT" ]]; then
  echo "local.sh: $EXPORT exists already; not exporting again"
else
  "$PY" -m cream_jax.convert orbax-to-hf --ckpt="$WORKDIR" --out="$EXPORT"
  echo "local.sh: trained model exported to $EXPORT"
fi
