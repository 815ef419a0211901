#!/usr/bin/env bash
# The one install step of robot_rl: README, CI and the Dockerfiles all run this script.
# It creates .venv/ in the checkout with torch==2.13.0, the CPU build (TORCH_SPEC chooses another), and the project,
# and puts libusb (needed before pyrealsense2 imports) in place where it can, saying so where it cannot.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}

if ! ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "install: apt-get install libusb-1.0-0 (pyrealsense2 needs it)"
    apt-get install -y -qq libusb-1.0-0 >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libusb-1.0-0 >/dev/null 2>&1; } \
      || echo "install: could not install libusb-1.0-0; RealSense cameras stay unavailable until it is installed"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null && command -v apt-get >/dev/null; then
    sudo apt-get install -y -qq libusb-1.0-0 >/dev/null 2>&1 \
      || echo "install: could not install libusb-1.0-0; RealSense cameras stay unavailable until it is installed"
  else
    echo "install: libusb-1.0-0 is missing and this user cannot install system packages;"
    echo "         run 'sudo apt-get install libusb-1.0-0' for RealSense cameras (everything else works without it)"
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned, and the CPU build: PyPI's Linux wheel of torch is the CUDA build, which pulls gigabytes of
# nvidia-* packages. The CPU build comes from the indexes pip is configured with when they hold it (a local mirror),
# else from PyTorch's CPU index; only if neither answers is PyPI's build taken, said so.
# TORCH_SPEC chooses another build of the same version (e.g. torch==2.13.0+cu128, with PIP_EXTRA_INDEX_URL set).
if [ -n "${TORCH_SPEC:-}" ]; then
  .venv/bin/python -m pip install -q "$TORCH_SPEC"
elif ! .venv/bin/python -m pip install -q "torch==2.13.0+cpu" 2>/dev/null \
  && ! .venv/bin/python -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu; then
  echo "install: no CPU build of torch 2.13.0 was found; installing PyPI's (the CUDA build, several GB)"
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[dev]"
echo "install: ready (.venv/bin/robot-rl)"
