"""fullres: train 3D segmentation networks on whole, full-resolution medical volumes."""

__version__ = "0.1.0"
