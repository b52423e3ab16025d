"""V-Net pieces of the CAML / MC-Net code: convolution stages, down- and up-sampling blocks, the encoder
and the decoder, with the official module names (``block_one`` ... ``block_nine``, ``conv.<i>``) so the
official checkpoints load with ``strict=True``."""
from __future__ import annotations

import math
import numbers

from torch import Tensor, nn

NORMALIZATIONS = ("batchnorm", "groupnorm", "instancenorm", "none")
UP_MODES = ("deconv", "trilinear", "nearest")
DEPTH = 4  # down-samplings by 2: the spatial sizes must be multiples of 2**DEPTH

# The constructor arguments of the models, by name: checked up front, so that a wrong one (a float
# width, a misspelt mode) is named instead of failing deep inside torch.
_SIZES = ("in_channels", "out_channels", "num_classes", "n_filters", "feat_dim", "n_stages", "stride", "cma_heads")
_CHOICES = {"normalization": NORMALIZATIONS, "up_mode": UP_MODES, "mode": UP_MODES[1:]}


def check_args(owner: str, **args) -> None:
    """Raises TypeError / ValueError ``<owner>: <name> must be ...`` for the first bad argument."""
    for name, value in args.items():
        if name in _SIZES:
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise TypeError(f"{owner}: {name} must be an integer >= 1, got {value!r}")
            if value < 1:
                raise ValueError(f"{owner}: {name} must be an integer >= 1, got {value!r}")
        elif name in _CHOICES:
            if value not in _CHOICES[name]:
                raise ValueError(f"{owner}: {name} must be one of {_CHOICES[name]}, got {value!r}")
        elif name == "has_dropout":
            if not isinstance(value, bool):
                raise TypeError(f"{owner}: {name} must be a bool, got {value!r}")
        elif name == "cma_dropout":
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value < 1 or \
                    math.isnan(value):
                raise ValueError(f"{owner}: {name} must be a probability in [0, 1), got {value!r}")
        else:
            raise KeyError(f"no rule for argument {name!r}")  # a new argument needs its rule


def _norm(normalization: str, channels: int) -> list[nn.Module]:
    if normalization == "batchnorm":
        return [nn.BatchNorm3d(channels)]
    if normalization == "groupnorm":
        return [nn.GroupNorm(num_groups=16, num_channels=channels)]
    if normalization == "instancenorm":
        return [nn.InstanceNorm3d(channels)]
    if normalization == "none":
        return []
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


class ConvBlock(nn.Module):
    """``n_stages`` x (3x3x3 conv, norm, ReLU)."""

    def __init__(self, n_stages: int, in_channels: int, out_channels: int, normalization: str = "none") -> None:
        super().__init__()
        check_args(type(self).__name__, n_stages=n_stages, in_channels=in_channels, out_channels=out_channels,
                   normalization=normalization)
        ops: list[nn.Module] = []
        for stage in range(n_stages):
            ops.append(nn.Conv3d(in_channels if stage == 0 else out_channels, out_channels, 3, padding=1))
            ops += _norm(normalization, out_channels)
            ops.append(nn.ReLU(inplace=True))
        self.conv = nn.Sequential(*ops)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _StridedBlock(nn.Module):
    """A convolution of kernel = stride (``convolution``: its class), norm, ReLU."""

    convolution: type[nn.Module]

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2, normalization: str = "none") -> None:
        super().__init__()
        check_args(type(self).__name__, in_channels=in_channels, out_channels=out_channels, stride=stride,
                   normalization=normalization)
        ops = [self.convolution(in_channels, out_channels, stride, padding=0, stride=stride)]
        self.conv = nn.Sequential(*ops, *_norm(normalization, out_channels), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class DownsamplingConvBlock(_StridedBlock):
    """Strided conv (kernel = stride), norm, ReLU: halves each spatial size for stride 2."""

    convolution = nn.Conv3d


class UpsamplingDeconvBlock(_StridedBlock):
    """Transposed conv (kernel = stride), norm, ReLU (decoder 1 of CAML)."""

    convolution = nn.ConvTranspose3d


class Upsampling(nn.Module):
    """Interpolation (``"trilinear"``, align_corners=True, or ``"nearest"``), 3x3x3 conv, norm, ReLU
    (decoder 2 of CAML: trilinear)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2, normalization: str = "none",
                 mode: str = "trilinear") -> None:
        super().__init__()
        check_args(type(self).__name__, in_channels=in_channels, out_channels=out_channels, stride=stride,
                   normalization=normalization, mode=mode)
        if mode == "trilinear":
            upsample = nn.Upsample(scale_factor=stride, mode="trilinear", align_corners=True)
        elif mode == "nearest":
            upsample = nn.Upsample(scale_factor=stride, mode="nearest")
        else:
            raise ValueError(f"mode must be 'trilinear' or 'nearest', got {mode!r}")
        ops = [upsample, nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)]
        self.conv = nn.Sequential(*ops, *_norm(normalization, out_channels), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Encoder(nn.Module):
    """V-Net encoder: five stages (1, 2, 3, 3, 3 convs; n, 2n, 4n, 8n, 16n channels) with four
    down-samplings; returns the five stages' features (skips and bottleneck). With ``has_dropout``,
    3D dropout (p = 0.5) on the bottleneck in training."""

    def __init__(self, in_channels: int = 1, n_filters: int = 16, normalization: str = "none",
                 has_dropout: bool = False) -> None:
        super().__init__()
        check_args(type(self).__name__, in_channels=in_channels, n_filters=n_filters, normalization=normalization,
                   has_dropout=has_dropout)
        n = n_filters
        self.has_dropout = has_dropout
        self.block_one = ConvBlock(1, in_channels, n, normalization)
        self.block_one_dw = DownsamplingConvBlock(n, 2 * n, normalization=normalization)
        self.block_two = ConvBlock(2, 2 * n, 2 * n, normalization)
        self.block_two_dw = DownsamplingConvBlock(2 * n, 4 * n, normalization=normalization)
        self.block_three = ConvBlock(3, 4 * n, 4 * n, normalization)
        self.block_three_dw = DownsamplingConvBlock(4 * n, 8 * n, normalization=normalization)
        self.block_four = ConvBlock(3, 8 * n, 8 * n, normalization)
        self.block_four_dw = DownsamplingConvBlock(8 * n, 16 * n, normalization=normalization)
        self.block_five = ConvBlock(3, 16 * n, 16 * n, normalization)
        self.dropout = nn.Dropout3d(p=0.5)

    def after_block_four(self, x4: Tensor) -> Tensor:
        """Hook on the block-four features (the CAML auxiliary encoder puts CMA here)."""
        return x4

    def forward(self, x: Tensor) -> list[Tensor]:
        x1 = self.block_one(x)
        x2 = self.block_two(self.block_one_dw(x1))
        x3 = self.block_three(self.block_two_dw(x2))
        x4 = self.after_block_four(self.block_four(self.block_three_dw(x3)))
        x5 = self.block_five(self.block_four_dw(x4))
        if self.has_dropout:
            x5 = self.dropout(x5)
        return [x1, x2, x3, x4, x5]


class Decoder(nn.Module):
    """V-Net decoder: four up-samplings, each added to the encoder's skip feature, then a 1x1x1 conv to
    ``num_classes`` logits. ``up_mode``: ``"deconv"`` (transposed conv), ``"trilinear"`` or ``"nearest"``
    (interpolation + conv). With ``has_dropout``, 3D dropout (p = 0.5) before the output conv in training.
    ``forward(features)`` returns ``(logits, last features)``; the last features (``n_filters`` wide)
    are CAML's voxel embeddings."""

    def __init__(self, num_classes: int = 2, n_filters: int = 16, normalization: str = "none",
                 has_dropout: bool = False, up_mode: str = "deconv") -> None:
        super().__init__()
        check_args(type(self).__name__, num_classes=num_classes, n_filters=n_filters, normalization=normalization,
                   has_dropout=has_dropout, up_mode=up_mode)
        n = n_filters
        self.has_dropout = has_dropout

        def up(in_channels: int, out_channels: int) -> nn.Module:
            if up_mode == "deconv":
                return UpsamplingDeconvBlock(in_channels, out_channels, normalization=normalization)
            return Upsampling(in_channels, out_channels, normalization=normalization, mode=up_mode)

        self.block_five_up = up(16 * n, 8 * n)
        self.block_six = ConvBlock(3, 8 * n, 8 * n, normalization)
        self.block_six_up = up(8 * n, 4 * n)
        self.block_seven = ConvBlock(3, 4 * n, 4 * n, normalization)
        self.block_seven_up = up(4 * n, 2 * n)
        self.block_eight = ConvBlock(2, 2 * n, 2 * n, normalization)
        self.block_eight_up = up(2 * n, n)
        self.block_nine = ConvBlock(1, n, n, normalization)
        self.out_conv = nn.Conv3d(n, num_classes, 1, padding=0)
        self.dropout = nn.Dropout3d(p=0.5)

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        x1, x2, x3, x4, x5 = features
        x6 = self.block_six(self.block_five_up(x5) + x4)
        x7 = self.block_seven(self.block_six_up(x6) + x3)
        x8 = self.block_eight(self.block_seven_up(x7) + x2)
        x9 = self.block_nine(self.block_eight_up(x8) + x1)
        if self.has_dropout:
            x9 = self.dropout(x9)
        return self.out_conv(x9), x9
