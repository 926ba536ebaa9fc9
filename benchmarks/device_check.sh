#!/usr/bin/env bash
# Every accelerator measurement of the search step in one run, beside the PyTorch reference
# (benchmarks/device_check.py; about 8 minutes on one GPU):
#   benchmarks/device_check.sh PATH/TO/darts/cnn [--preset=small]
# Wheels the machine lacks (ml_collections for the configs) may travel in .whl/; they are
# installed into /tmp/site first. Writes benchmarks/results/<device>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
reference=${1:?usage: benchmarks/device_check.sh PATH/TO/darts/cnn [--preset=small]}
shift
python3 benchmarks/device_check.py --reference="$reference" "$@"
