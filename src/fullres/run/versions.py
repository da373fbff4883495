"""What this installation is: fullres, torch, CUDA, oneDNN, Python and the platform.

`fullres --version` prints :func:`describe`; runs and predictions record :func:`versions`, so a result can be
traced to the libraries that computed it (a CPU result depends on oneDNN's kernels, a GPU one on CUDA's).
"""

from __future__ import annotations

import platform
import re

import torch

from fullres import __version__
from fullres.kernels.cpu_pool import unsupported

# torch.__config__.show() names the oneDNN it was built with under oneDNN's former name: "Intel(R) MKL-DNN
# v3.12.0 (Git Hash ...)" in torch 2.13.0; its present name is accepted too, should a build use it.
_ONEDNN = re.compile(r"(?:oneDNN|MKL-DNN)\s+v(\d+(?:\.\d+)*)")


def onednn_version() -> str | None:
    """The oneDNN version this torch was built with ("3.12.0"), or None when it has none (or does not say).
    torch exposes no function for it: it is read from the build configuration torch reports."""
    if not torch.backends.mkldnn.is_available():
        return None
    found = _ONEDNN.search(torch.__config__.show())
    return found.group(1) if found else None


def versions() -> dict:
    """fullres, torch, CUDA (None for a CPU-only build), oneDNN (None without it), Python and the platform,
    as strings: what a run or a prediction records."""
    return {"fullres": __version__, "torch": torch.__version__, "cuda": torch.version.cuda,
            "onednn": onednn_version(), "python": platform.python_version(), "platform": platform.platform()}


def describe() -> str:
    """One line, as `fullres --version` prints it: "fullres 0.1.0, torch 2.13.0+cpu (CUDA none, oneDNN 3.12.0),
    Python 3.11.7, Linux-...", and where the CPU pool cannot exist here (no fcntl/resource), that it is off."""
    v = versions()
    line = (f"fullres {v['fullres']}, torch {v['torch']} (CUDA {v['cuda'] or 'none'}, oneDNN {v['onednn'] or 'none'}), "
            f"Python {v['python']}, {v['platform']}")
    reason = unsupported()
    return line + (f"; CPU pool off: {reason}" if reason else "")

