#!/usr/bin/env bash
# Install xai-workers into a virtual environment, with the PyTorch build that fits this machine.
#
#   scripts/install.sh [EXTRAS]          e.g. scripts/install.sh analytics   or   test,timm
#
# Creates .venv (or $XAI_VENV), upgrades pip, installs torch and torchvision at the versions
# pyproject.toml pins, then `pip install -e '.[EXTRAS]'`.
#
# Which torch build: with an NVIDIA GPU (`nvidia-smi -L` lists one) the default index's torch,
# which bundles CUDA. Without one, PyTorch's CPU wheels (about 200 MB instead of 3+ GB of CUDA
# libraries) from $XAI_TORCH_CPU_INDEX (default https://download.pytorch.org/whl/cpu), as an
# extra index beside pip's own configuration (its local indexes and wheels keep working), and
# only when that index answers within 5 seconds; otherwise the default index's torch, with a note.
# `2.14.1+cpu` satisfies the package's `torch==2.14.1`, so the editable install keeps it.
#
# XAI_INSTALL_DRY_RUN=1 prints the commands and installs nothing. XAI_TORCH_INDEX=cpu|default
# forces the choice.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-}"
venv="${XAI_VENV:-.venv}"
cpu_index="${XAI_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
dry="${XAI_INSTALL_DRY_RUN:-}"
python="${PYTHON:-python3}"

say() { echo "[install] $*" >&2; }
run() {
  echo "+ $*"
  if [ -z "$dry" ]; then "$@"; fi
}

# the pins, from pyproject.toml (one source of truth)
pin() { sed -n "s/^ *\"\\($1==[^\"]*\\)\".*/\\1/p" pyproject.toml | head -n 1; }
torch_pin="$(pin torch)"
vision_pin="$(pin torchvision)"
if [ -z "$torch_pin" ] || [ -z "$vision_pin" ]; then
  say "cannot read the torch/torchvision pins from pyproject.toml"
  exit 2
fi

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q .; }
reachable() {
  "$python" - "$1" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5).close()
EOF
}

choice="${XAI_TORCH_INDEX:-}"
if [ -z "$choice" ]; then
  if has_gpu; then
    say "NVIDIA GPU found (nvidia-smi): torch from the default index (with CUDA)"
    choice=default
  elif reachable "$cpu_index"; then
    say "no NVIDIA GPU: torch's CPU build from $cpu_index"
    choice=cpu
  else
    say "no NVIDIA GPU, but $cpu_index does not answer: torch from the default index"
    choice=default
  fi
fi
case "$choice" in
  cpu) torch_index=(--extra-index-url "$cpu_index") ;;
  default) torch_index=() ;;
  *) say "XAI_TORCH_INDEX must be cpu or default, got '$choice'"; exit 2 ;;
esac

run "$python" -m venv "$venv"
run "$venv/bin/pip" install -U pip
run "$venv/bin/pip" install "${torch_index[@]}" "$torch_pin" "$vision_pin"
run "$venv/bin/pip" install -e ".${extras:+[$extras]}"
