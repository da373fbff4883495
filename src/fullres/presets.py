"""Named presets: every default a job or a run has, in one place.

``paper`` is the whitepaper's job (Table 1's network on MSD Task01 at 240x240x144, all four
modalities, whole tumour, batch 16, 25 epochs, no augmentation, images as stored, one centred crop).
``demo`` is the embedded synthetic job that trains in a few minutes on 2 CPU cores, with the default
augmentation, the median spacing and random foreground windows. ``intel-unet`` is the
defaults of the paper's code repository (IntelAI/unet: FLAIR only, whole tumour, 144^3 crops, batch 8,
16 filters, batch norm, no dropout, 40 epochs; no augmentation, as the paper's). The CLI's flags default
to the network's own preset where it has one, else ``paper`` (``train`` without DATA: ``demo``), and a
flag given on the command line overrides its preset value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Preset:
    """The defaults of every job flag and training option (the CLI's names, underscores for dashes)."""

    shape: tuple[int, int, int]
    channels: str  # a --channels spec: a count N (the first N modalities) or names/indices
    target: str  # wt | regions | classes
    filters: int
    batch: int
    dropout: float
    norm: str
    epochs: int
    lr: float
    loss: str
    schedule: str = "cosine"
    seed: int = 0
    val_fraction: float = 0.2
    augment: str = "default"  # augmentation on the fly (fullres.data.augment): none | light | default
    spacing: str = "auto"  # resampling (fullres.data.fingerprint): auto (median spacing) | none
    crop: str = "foreground"  # training windows (fullres.data.preprocess.sample_crop_box): foreground | center

    def values(self) -> dict:
        return asdict(self)


# Augmentation, resampling and random windows off: the paper's job, and every result measured with it, stay as
# they were.
PAPER = Preset(shape=(240, 240, 144),  # BraTS 240x240x155, depth cropped to 144 (whitepaper Table 1)
               channels="4", target="wt", filters=32, batch=16, dropout=0.2, norm="none",
               epochs=25, lr=1e-4, loss="dice", augment="none", spacing="none", crop="center")

# Instance norm and Dice + BCE keep so small a network from collapsing to an all-background output,
# which the paper's plain no-norm soft-Dice set-up does within a few epochs at this size.
DEMO = replace(PAPER, shape=(48, 48, 32), filters=8, batch=2, epochs=10, lr=3e-3, norm="instance", loss="dice_bce",
               augment="default", spacing="auto", crop="foreground")

#: The demo's synthetic dataset (fullres.data.synth.write_dataset arguments).
DEMO_DATA = {"train_cases": 20, "test_cases": 4, "shape": (48, 48, 32), "seed": 0}

INTEL_UNET = replace(PAPER, shape=(144, 144, 144), channels="1", filters=16, batch=8, dropout=0.0, norm="batch",
                     epochs=40)

PRESETS = {"paper": PAPER, "demo": DEMO, "intel-unet": INTEL_UNET}
