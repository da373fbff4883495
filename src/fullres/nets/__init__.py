"""The networks: the paper's 3D U-Net (`unet3d`), the external families and user factories (`families`:
intel-unet, MONAI, nnU-Net, FILE.py:FUNCTION), and the registry (`registry`: ModelConfig, ModelSpec, and
:func:`~fullres.nets.registry.build_model`, the one place a network is built). fullres's own networks are
registered here, so that importing any module of this package registers them."""

from fullres.nets import families
from fullres.nets.registry import BUILT_IN, DOWNSAMPLING, MODELS, ModelConfig, ModelSpec, register_model
from fullres.nets.unet3d import UNET3D_WHY, UNet3D
from fullres.terms import OWN_DIVISORS


def _intel_check(config: ModelConfig) -> None:
    if config.norm != "batch":
        raise ValueError("intel-unet has batch norm after every convolution: --norm must be batch")


register_model(ModelSpec("unet3d", lambda config, shape: UNet3D(config),
                         "the whitepaper's Table 1 3D U-Net (19,735,329 weights at 32 filters)", slabs=True,
                         divisor=lambda config: DOWNSAMPLING, why=UNET3D_WHY))
register_model(ModelSpec("intel-unet", lambda config, shape: families.IntelUNet(config.in_channels, config.classes,
                                                                               config.filters),
                         "the paper's code repository's 3D U-Net (IntelAI/unet: 5,650,801 parameters)",
                         divisor=lambda config: OWN_DIVISORS["intel-unet"][0], why=OWN_DIVISORS["intel-unet"][1], check=_intel_check,
                         preset="intel-unet"))
BUILT_IN.update(MODELS)
