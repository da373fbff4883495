"""The data stage: dataset folders in four layouts (MSD, nnU-Net, BraTS 2021, BraTS 2023), preprocessing
and its cache, synthetic datasets, conversion between layouts, dataset checks.

    index = load_dataset("Task01_BrainTumour")         # layout detected; or load_dataset(path, layout="brats2021")
    config = DataConfig(channels=resolve_channels("4", index.modalities), target="wt")
    train, val = split_cases(index.training, val_fraction=0.2, seed=0)
    loader = make_loader(MSDDataset.from_index(index, config, train), batch=1, shuffle=True,
                         workers=2, seed=0, device_type="cpu")
"""

from fullres.data.cache import CACHE_DIR_NAME, default_cache_dir, load_case_image
from fullres.data.check import CheckReport, Finding, check_dataset
from fullres.data.msd import (DatasetIndex, MSDDataset, TestCase, TrainingCase, brats_regions, make_loader, resolve_channels, split_cases)
from fullres.data.layouts import LAYOUTS, detect_layout, load_dataset
from fullres.data.nifti import write_nifti
from fullres.data.preprocess import TARGETS, CropBox, DataConfig, crop_or_pad, uncrop, zscore_brain
from fullres.data.synth import brats_phantom, write_dataset

#: The package-level reader detects the layout (fullres.data.msd.load_dataset_json reads MSD folders only).
load_dataset_json = load_dataset

__all__ = [
    "CACHE_DIR_NAME", "LAYOUTS", "TARGETS", "CheckReport", "CropBox", "DataConfig", "DatasetIndex", "Finding", "MSDDataset",
    "TestCase", "TrainingCase", "brats_phantom", "brats_regions", "check_dataset", "crop_or_pad", "default_cache_dir", "detect_layout",
    "load_case_image", "load_dataset", "load_dataset_json", "make_loader", "resolve_channels", "split_cases", "uncrop",
    "write_dataset", "write_nifti", "zscore_brain",
]
