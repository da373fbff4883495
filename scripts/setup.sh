#!/usr/bin/env bash
# Install fullres into the current Python (3.11+); a virtual environment is recommended (docs/install.md).
# `bash scripts/setup.sh test` adds the test extras (pytest, and the deploy extra the export tests need:
# onnx, onnxruntime, onnxscript, openvino; ~100 MB of wheels, no torch).
# torch: one already installed is kept (a CUDA build stays a CUDA build, a CPU build a CPU build). Otherwise
# torch==2.13.0 is installed as pip resolves it from the configured index, and one line says which build
# that is before anything is downloaded. From PyPI on Linux x86-64 it is the CUDA build: torch (527 MB), 18
# NVIDIA/CUDA wheels and triton (2.2 GB). For the CPU-only build (192 MB), install it first (then it is kept):
#   python3 -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c 'import sys; assert sys.version_info >= (3, 11), "fullres needs Python 3.11 or newer"'
if python3 -c 'import torch' 2>/dev/null; then
    python3 -c 'import torch; print(f"torch {torch.__version__} kept: " + (f"a CUDA {torch.version.cuda} build"
                if torch.version.cuda else "a ROCm build" if torch.version.hip else "a build without CUDA"))'
else
    report=$(mktemp)
    trap 'rm -f "$report"' EXIT
    python3 -m pip install --quiet --dry-run --report "$report" torch==2.13.0
    python3 - "$report" <<'EOF'
import json, sys
install = json.load(open(sys.argv[1]))["install"]
torch = next(item for item in install if item["metadata"]["name"].lower() == "torch")
version, url = torch["metadata"]["version"], torch["download_info"]["url"]
cuda = [item["metadata"]["name"] for item in install if item["metadata"]["name"].lower().startswith(("nvidia-", "cuda-"))]
if cuda or "+cu" in version:
    what = (f"the CUDA build, with {len(cuda)} NVIDIA/CUDA wheels (from PyPI on Linux x86-64: ~2.7 GB in all); "
            "for the CPU-only build (~190 MB) stop now (Ctrl-C) and see docs/install.md")
else:
    what = "the CPU-only build" if "+cpu" in version else "no NVIDIA wheels with it"
source = url.rsplit("/", 1)[0] if url.startswith("file:") else url.split("/")[2]
print(f"installing torch {version} from {source}: {what}", flush=True)
EOF
    python3 -m pip install --quiet torch==2.13.0
fi
python3 -m pip install --quiet --editable ".${1:+[$1]}"
# nnU-Net v2's networks: its package without its declared extras (timm would pull torchvision, a second
# multi-GB torch build); fullres uses only its plain and residual U-Nets, which need neither.
python3 -m pip install --quiet --no-deps dynamic-network-architectures==0.4.4
if [ "${1:-}" = "test" ]; then
    # nnU-Net v2 itself, for the tests of `fullres nnunet plan` against its planner, plans and trainer: its
    # package without its declared timm/torchvision (they pin a torch of their own), its other requirements
    # constrained to the torch installed above.
    constraint=$(mktemp)
    python3 -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' >"$constraint"
    python3 -m pip install --quiet -c "$constraint" "acvl-utils>=0.2.6,<0.3" "batchgenerators>=0.25.1" \
        "batchgeneratorsv2>=0.3.2" scikit-learn "scikit-image>=0.19.3" "SimpleITK>=2.2.1" pandas graphviz tifffile \
        requests seaborn imagecodecs yacs "blosc2>=3.3.2"
    python3 -m pip install --quiet --no-deps nnunetv2==2.8.1
    rm -f "$constraint"
fi
python3 -c 'import fullres, torch; print(f"fullres {fullres.__version__} installed (torch {torch.__version__})")'
