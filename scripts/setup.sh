#!/usr/bin/env bash
# Install fullres into the current Python (3.11+). `bash scripts/setup.sh test` adds the test extras (pytest, and
# the deploy extra the export tests need: onnx, onnxruntime, onnxscript, openvino; ~100 MB of wheels, no torch).
# torch: one already installed is kept (a CUDA build stays a CUDA build); otherwise the CPU build
# torch==2.13.0 is installed, so that no multi-GB CUDA build is pulled onto a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c 'import sys; assert sys.version_info >= (3, 11), "fullres needs Python 3.11 or newer"'
if ! python3 -c 'import torch' 2>/dev/null; then
    python3 -m pip install --quiet torch==2.13.0
fi
python3 -m pip install --quiet --editable ".${1:+[$1]}"
# nnU-Net v2's networks: its package without its declared extras (timm would pull torchvision, a second
# multi-GB torch build); fullres uses only its plain and residual U-Nets, which need neither.
python3 -m pip install --quiet --no-deps dynamic-network-architectures==0.4.4
python3 -c 'import fullres, torch; print(f"fullres {fullres.__version__} installed (torch {torch.__version__})")'
