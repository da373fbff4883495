#!/usr/bin/env bash
# Packaging smoke test (CI, after the test suite): build fullres's wheel, install it and torch==2.13.0 into a
# clean virtual environment (no system site-packages, no source tree on the path), and from an empty folder
# run what a user of the wheel runs first: --version, estimate, the dry run and a one-epoch training at 16^3.
# Refuses to go on when torch==2.13.0 would come with NVIDIA's wheels (~2.7 GB from PyPI on Linux x86-64;
# see docs/install.md), unless FULLRES_SMOKE_TORCH names another torch requirement to install.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_spec=${FULLRES_SMOKE_TORCH:-torch==2.13.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
started=$SECONDS

# The wheel, built from a copy of what it is made of, so that the working tree gets no build/ folder.
mkdir "$work/tree"
cp -r pyproject.toml README.md LICENSE src "$work/tree/"
rm -rf "$work/tree/src/"*.egg-info
python3 -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" "$work/tree"
wheel=$(ls "$work/dist/"fullres-*.whl)
echo "smoke: built $(basename "$wheel") ($((SECONDS - started)) s)"

python3 -m venv "$work/venv"
python="$work/venv/bin/python"
"$python" -m pip install --quiet --dry-run --report "$work/torch.json" "$torch_spec"
"$python" - "$work/torch.json" <<'EOF'
import json, sys
install = json.load(open(sys.argv[1]))["install"]
cuda = [item["metadata"]["name"] for item in install if item["metadata"]["name"].lower().startswith(("nvidia-", "cuda-"))]
if cuda:
    sys.exit(f"smoke: torch would come with {len(cuda)} NVIDIA/CUDA wheels here ({', '.join(cuda[:3])}, ...): install "
             "the CPU build's index (docs/install.md) or set FULLRES_SMOKE_TORCH")
EOF
"$python" -m pip install --quiet --no-compile "$wheel" "$torch_spec"
echo "smoke: installed the wheel and $torch_spec into a clean virtual environment ($((SECONDS - started)) s)"

# From an empty folder, with a cache of its own: nothing of the source tree or of a user's cache is seen.
mkdir "$work/empty"
cd "$work/empty"
export XDG_CACHE_HOME="$work/cache" PYTHONNOUSERSITE=1
unset PYTHONPATH
fullres="$work/venv/bin/fullres"
"$python" -c 'import sys, fullres; assert fullres.__file__.startswith(sys.prefix), fullres.__file__'
"$python" -c 'import importlib.resources as r; assert r.files("fullres").joinpath("py.typed").is_file()'
"$fullres" --version
table=$("$fullres" estimate --shape 16 16 16 --filters 2 --batch 1)  # not piped: a failure must fail the script
grep "^Double for training" <<<"$table"
dryrun=$("$fullres" estimate --method dryrun --shape 16 16 16 --filters 2 --batch 1)
grep "^Peak" <<<"$dryrun"
"$fullres" train --out run --shape 16 16 16 --filters 2 --batch 1 --epochs 1 --workers 0 --threads 1 --quiet --force
test -f run/config.json && test -f run/last.pt
echo "smoke: the wheel works from an empty folder ($((SECONDS - started)) s in all)"
