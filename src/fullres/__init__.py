"""fullres: train 3D segmentation networks on whole, full-resolution medical volumes.

The library's public face (see docs/api.md): :func:`estimate`, :func:`plan` and :func:`checkpointed` for
any ``nn.Module``, with their results :class:`Estimate` and :class:`Plan`. They are loaded on first use,
so ``import fullres`` (and ``fullres --help``) does not import torch.
"""

__version__ = "0.1.0"
__all__ = ["__version__", "estimate", "plan", "checkpointed", "Estimate", "Plan"]

_API = {"estimate", "plan", "checkpointed", "Estimate", "Plan"}


def __getattr__(name: str):
    if name in _API:
        from fullres import api

        return getattr(api, name)
    raise AttributeError(f"module 'fullres' has no attribute {name!r}")
