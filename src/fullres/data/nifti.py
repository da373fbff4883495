"""Reading and writing NIfTI files (.nii and .nii.gz) with nibabel.

Reading turns every failure (missing, not NIfTI, truncated gzip) into a `UserError` that names the
file. Writing is byte-reproducible: the gzip header's timestamp is fixed at 0, so the same array and
affine always give the same .nii.gz bytes.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from fullres.files import write_bytes_atomically
from fullres.errors import UserError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
GZIP_LEVEL = 1  # nibabel's own default: fast, and noisy images barely compress further at 9


def is_nifti(path: str | Path) -> bool:
    """Whether `path` is named like a NIfTI file (CASE.nii.gz or CASE.nii, CASE not empty)."""
    name = Path(path).name
    return any(name.endswith(suffix) and len(name) > len(suffix) for suffix in NIFTI_SUFFIXES)


def case_id_from_path(path: str | Path) -> str:
    """'imagesTr/BRATS_001.nii.gz' -> 'BRATS_001'."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def open_nifti(path: Path) -> nib.Nifti1Image:
    """Open a NIfTI file lazily (only the header is read). UserError naming the file if that fails."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        image = nib.load(path)
    except ImageFileError:
        raise UserError(f"{path}: not a NIfTI file") from None
    except Exception as error:  # nibabel raises many types for damaged headers; all mean "unreadable"
        raise UserError(f"{path}: unreadable ({type(error).__name__}: {error})") from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise UserError(f"{path}: not a NIfTI file (nibabel reads it as {type(image).__name__})")
    check_affine(image.affine, path)
    return image


def check_affine(affine: np.ndarray, path: Path) -> None:
    """UserError unless `affine` (voxel to world) is finite and invertible: a mask written with it, or
    distances measured through it, would be meaningless."""
    if affine is None or not np.all(np.isfinite(affine)):
        raise UserError(f"{path}: its affine (voxel-to-world matrix) is not finite")
    if abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])) < 1e-12:
        raise UserError(f"{path}: its affine (voxel-to-world matrix) is singular (a voxel size of 0?)")


def read_array(image: nib.Nifti1Image, path: Path) -> np.ndarray:
    """The whole voxel array, in its stored dtype (scaled to float only when the header says so).

    Reading every byte is what detects a truncated or corrupt file, so this is also the check's test.
    """
    dtype = image.get_data_dtype()
    if dtype.kind not in "biuf":  # complex, RGB or other records: casting would drop part of every voxel
        raise UserError(f"{path}: holds {dtype} voxels; fullres reads real-valued numbers only")
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # EOFError, zlib.error, OSError, ValueError... all mean a damaged file
        raise UserError(f"{path}: truncated or corrupt data ({type(error).__name__}: {error})") from None
    if data.dtype.kind not in "biuf":
        raise UserError(f"{path}: holds {data.dtype} voxels; fullres reads real-valued numbers only")
    return data


def read_image_channels_first(path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """A 4D image (H, W, D, C) as float32 (C, H, W, D); a 3D image counts as one channel.

    `path` may also be a sequence of 3D files, one per channel (nnU-Net, BraTS): they are stacked in
    order, and must agree in shape; the first file's image is returned.
    """
    if not isinstance(path, (str, Path)):
        return _read_channel_files([Path(p) for p in path])
    path = Path(path)
    image = open_nifti(path)
    data = read_array(image, path)
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4:
        raise UserError(f"{path}: expected a 4D image (H, W, D, channels), got shape {data.shape}")
    return np.ascontiguousarray(np.moveaxis(data, -1, 0), dtype=np.float32), image


def _read_channel_files(paths: list[Path]) -> tuple[np.ndarray, nib.Nifti1Image]:
    channels, first = [], None
    for path in paths:
        image = open_nifti(path)
        data = read_array(image, path)
        if data.ndim == 4 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise UserError(f"{path}: expected a 3D image (one channel), got shape {data.shape}")
        if channels and data.shape != channels[0].shape:
            raise UserError(f"{path}: shape {data.shape} differs from {paths[0].name}'s {channels[0].shape}")
        channels.append(np.asarray(data, dtype=np.float32))
        first = first or image
    if not channels:
        raise UserError("an image needs at least one channel file")
    return np.stack(channels), first


def voxel_spacing(image: nib.Nifti1Image) -> tuple[float, float, float]:
    """The voxel size of `image` along its first three axes (H, W, D), in mm: the lengths of its affine's
    columns, which :func:`open_nifti` has checked finite and invertible (the header's pixdim can disagree
    with the affine, and nibabel turns a zero there into 1 mm)."""
    return tuple(float(size) for size in nib.affines.voxel_sizes(image.affine)[:3])


def read_label(path: Path) -> np.ndarray:
    """A 3D label volume as uint8 (values 0-255; anything else is a UserError)."""
    data = read_array(open_nifti(path), path)
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise UserError(f"{path}: expected a 3D label volume, got shape {data.shape}")
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise UserError(f"{path}: label values must be whole numbers")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise UserError(f"{path}: label values must lie in 0..255, got {data.min()}..{data.max()}")
    return data.astype(np.uint8)


def nifti_bytes(array: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None = None) -> bytes:
    """An uncompressed single-file NIfTI-1 (.nii) holding `array` in its own dtype, with `affine` as qform and sform."""
    header = header.copy() if header is not None else nib.Nifti1Header()
    header.set_data_dtype(array.dtype)
    image = nib.Nifti1Image(array, affine, header)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    return image.to_bytes()


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None = None) -> None:
    """Write `array` to `path` (.nii or .nii.gz) atomically, with reproducible bytes (gzip mtime 0).

    `header`, when given (e.g. the source image's), contributes its fields; dtype and dimensions
    always follow `array`, so a uint8 prediction can be written with a 4D int16 image's header.
    """
    raw = nifti_bytes(array, affine, header)
    data = gzip.compress(raw, compresslevel=GZIP_LEVEL, mtime=0) if path.name.endswith(".gz") else raw
    write_bytes_atomically(path, data)
