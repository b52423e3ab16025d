"""CAML's networks: V-Net pieces and the two-sub-model CAML3d with cross-sample mutual attention."""
from .caml3d import AuxiliaryEncoder, CAML3d, CAML3dOutput, load_checkpoint, read_state_dict
from .vnet import (
    ConvBlock,
    Decoder,
    DownsamplingConvBlock,
    Encoder,
    Upsampling,
    UpsamplingDeconvBlock,
)

__all__ = [
    "AuxiliaryEncoder",
    "CAML3d",
    "CAML3dOutput",
    "ConvBlock",
    "Decoder",
    "DownsamplingConvBlock",
    "Encoder",
    "Upsampling",
    "UpsamplingDeconvBlock",
    "load_checkpoint",
    "read_state_dict",
]
