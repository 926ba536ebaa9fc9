#!/usr/bin/env bash
# Runs a nanas_jax search on a Cloud TPU VM pod slice: creates the slice (unless it exists),
# installs JAX for TPU and the repository on every worker, then starts the same command on
# all workers at once. jax.distributed.initialize() finds the pod's other workers by itself,
# and the search is data parallel over every TPU core of the slice.
#
# Every variable below can be set from the environment, e.g.
#   WORKDIR=/mnt/gcs/nanas/na_darts_c10 launch/tpu_pod.sh
set -euo pipefail

TPU_NAME="${TPU_NAME:-nanas-pod}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
# Extra flags for `gcloud compute tpus tpu-vm create`, e.g. "--spot".
CREATE_FLAGS="${CREATE_FLAGS:-}"
# The repository (git URL) and the branch or tag that every worker checks out.
REPO="${REPO:-https://github.com/nanas-jax/nanas_jax}"
REF="${REF:-main}"
CONFIG="${CONFIG:-configs/na_darts_cifar10.py:first}"
# Workers share no disk: the workdir must be a file system mounted on every worker (e.g. a
# gcsfuse mount of a bucket, or Filestore). Results are written with local file
# operations, so gs:// URLs are refused; a tfds data_dir may be gs://.
WORKDIR="${WORKDIR:-}"
# More flags for nanas_jax.main, e.g. "--config.data.data_dir=gs://my-bucket/tfds".
EXTRA="${EXTRA:-}"
# The TPU VM images ship Python 3.10; the package needs 3.11 or newer.
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"

usage() {
  cat <<EOF
Usage: $0 [--dry-run] [--detach] [STEP...]

Steps (default: create setup run):
  create   create the TPU VM slice \$TPU_NAME (skipped when it already exists)
  setup    on every worker: check out \$REPO at \$REF, install jax[tpu] and the package
  run      on every worker: python -m nanas_jax.main --config=\$CONFIG --workdir=\$WORKDIR
           --config.parallel.distributed=on \$EXTRA
  delete   delete the TPU VM slice

Options:
  --dry-run  print the gcloud commands instead of running them
  --detach   start the run in the background on every worker (log: ~/nanas_run.log there),
             so that it survives the end of this ssh session; rerunning resumes from WORKDIR
  -h, --help this text

Now: TPU_NAME=$TPU_NAME ZONE=$ZONE ACCELERATOR_TYPE=$ACCELERATOR_TYPE
     RUNTIME_VERSION=$RUNTIME_VERSION REPO=$REPO REF=$REF
     CONFIG=$CONFIG WORKDIR=${WORKDIR:-(unset)} EXTRA=$EXTRA
EOF
}

DRY_RUN=0
DETACH=0
STEPS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --detach) DETACH=1 ;;
    -h|--help) usage; exit 0 ;;
    create|setup|run|delete) STEPS+=("$arg") ;;
    *) echo "Unknown argument: $arg" >&2; usage >&2; exit 2 ;;
  esac
done
if (( ${#STEPS[@]} == 0 )); then
  STEPS=(create setup run)
fi

# Prints a command the way it can be pasted back into a shell, or runs it.
invoke() {
  if (( DRY_RUN )); then
    local words=() word
    for word in "$@"; do
      if [[ $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
        words+=("$word")
      elif [[ $word =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
        words+=("${BASH_REMATCH[1]}${BASH_REMATCH[2]@Q}")
      else
        words+=("${word@Q}")
      fi
    done
    echo "${words[*]}"
  else
    "$@"
  fi
}

on_all_workers() {
  invoke gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
    --command="$1"
}

create() {
  if (( ! DRY_RUN )) && gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" \
      >/dev/null 2>&1; then
    echo "TPU $TPU_NAME already exists in $ZONE; using it."
    return
  fi
  # CREATE_FLAGS holds zero or more flags: split on purpose.
  # shellcheck disable=SC2086
  invoke gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" $CREATE_FLAGS
}

setup() {
  local repo ref
  repo=$(printf '%q' "$REPO")
  ref=$(printf '%q' "$REF")
  # uv brings a Python >= 3.11 next to the image's 3.10, in a venv of its own.
  on_all_workers "set -e; \
if [ -d ~/nanas_jax/.git ]; then git -C ~/nanas_jax fetch -q --depth=1 origin $ref && \
git -C ~/nanas_jax checkout -q FETCH_HEAD; \
else git clone -q --depth=1 --branch $ref $repo ~/nanas_jax; fi; \
python3 -m pip install -q --user -U uv; \
[ -x ~/nanas_venv/bin/python ] || ~/.local/bin/uv venv -q --python $PYTHON_VERSION ~/nanas_venv; \
~/.local/bin/uv pip install -q --python ~/nanas_venv/bin/python -U 'jax[tpu]' -e ~/nanas_jax"
}

run() {
  local command
  command="cd ~/nanas_jax && ~/nanas_venv/bin/python -m nanas_jax.main \
--config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR") \
--config.parallel.distributed=on${EXTRA:+ $EXTRA}"
  if (( DETACH )); then
    command="nohup bash -c ${command@Q} > ~/nanas_run.log 2>&1 < /dev/null &"
  fi
  on_all_workers "$command"
  if (( DETACH && ! DRY_RUN )); then
    echo "Started on every worker; follow worker 0 with:"
    echo "  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0" \
      "--command='tail -f ~/nanas_run.log'"
  fi
}

delete() {
  invoke gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
}

# Checked before any step, so that a missing WORKDIR does not wait for a slice to be created.
if [[ " ${STEPS[*]} " == *" run "* ]]; then
  if [[ -z $WORKDIR ]]; then
    echo "Set WORKDIR (a path mounted on every worker, e.g. a gcsfuse mount)." >&2
    usage >&2
    exit 2
  fi
  if [[ $WORKDIR == *://* ]]; then
    echo "WORKDIR=$WORKDIR is a URL: mount the bucket on every worker (gcsfuse) and pass" \
      "the mount path." >&2
    exit 2
  fi
fi

for step in "${STEPS[@]}"; do
  "$step"
done
