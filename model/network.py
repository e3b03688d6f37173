"""3D U-Net with hybrid spatial-and-channel attention (HSCA) and multi-scale feature extraction.

The network of Mazher et al., "Federated Learning on Brain Disease Research: Segmentation of
Cerebral Small Vessel Diseases using Multi-scale Hybrid Spatial Deep Learning Approach":

- encoder E1..E5 with 16, 32, 64, 128, 256 feature maps (``base_channels * 2**level``), each
  block two 3x3x3 conv + batch norm + ReLU, 2x2x2 max-pooling between blocks;
- MSFE at the bottleneck: parallel branches with growing receptive fields (1x1x1, 3x3x3 with
  dilation 1, 2 and 4, and global context), concatenated, fused by a 1x1x1 conv, added to the
  input (residual);
- decoder D1..D4: trilinear 2x upsampling and a 1x1x1 conv to the stage's width (the paper's
  "3D up-sampling using bi-linear up-sampling"; ``upsampling="transposed"`` selects a 2x2x2
  stride-2 transposed conv instead, the layout of weights made before format 2); HSCA fuses
  the upsampled decoder map with
  its encoder skip (channel attention from average- and max-pooled descriptors, then spatial
  attention from channel-pooled maps, as in CBAM), then two 3x3x3 conv + BN + ReLU;
- head: 1x1x1 conv to 2 classes (background, vessel). ``forward`` returns logits; the
  probabilities are their softmax (:func:`probabilities`).

The switches ``hsca`` and ``msfe`` give the three variants of the paper's Table 1; without HSCA
the skip is fused by plain concatenation, without MSFE the bottleneck is the E5 block alone.

Cost of the full network (``base_channels=16``, both modules), counted with
``torch.utils.flop_counter`` on a 96^3 patch (``python -m model.network``):
6.81 M parameters, 114 kFLOP per voxel (a multiply-add counts 2 FLOPs). MSFE only: 6.78 M;
HSCA only: 5.37 M. With transposed-conv upsampling: 7.11 M, 116 kFLOP per voxel.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

DOWNSAMPLING = 16  # four 2x2x2 poolings: every spatial size must be a multiple of this
UPSAMPLINGS = ("trilinear", "transposed")


@dataclass(frozen=True)
class Architecture:
    """The settings that fix the network's parameter shapes; stored beside every weight file."""

    base_channels: int = 16
    hsca: bool = True
    msfe: bool = True
    in_channels: int = 1
    classes: int = 2
    upsampling: str = "trilinear"  # the paper's decoder; "transposed": 2x2x2 stride-2 conv

    def __post_init__(self) -> None:
        if self.upsampling not in UPSAMPLINGS:
            raise ValueError(f"upsampling {self.upsampling!r} is not one of {UPSAMPLINGS}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, settings: dict) -> Architecture:
        unknown = set(settings) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown architecture settings: {sorted(unknown)}")
        return cls(**settings)


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3x3 conv + batch norm + ReLU."""
    layers = []
    for channels_in in (in_channels, out_channels):
        layers += [
            nn.Conv3d(channels_in, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class ChannelAttention(nn.Module):
    """Channel weights ``sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))`` (Woo et al., CBAM, 2018)."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.mlp = nn.Sequential(
            nn.Conv3d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv3d(hidden, channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        average = self.mlp(torch.mean(x, dim=(2, 3, 4), keepdim=True))
        maximum = self.mlp(torch.amax(x, dim=(2, 3, 4), keepdim=True))
        return x * torch.sigmoid(average + maximum)


class SpatialAttention(nn.Module):
    """Voxel weights ``sigmoid(conv7([mean_c(x), max_c(x)]))`` (Woo et al., CBAM, 2018)."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv3d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class HSCA(nn.Module):
    """Hybrid spatial-and-channel attention fusing an upsampled decoder map with its skip.

    The concatenated maps are re-weighted per channel (which of the high- and low-level
    features matter), then per voxel (where the thin vessels are).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channel = ChannelAttention(channels)
        self.spatial = SpatialAttention()

    def forward(self, upsampled: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(torch.cat([upsampled, skip], dim=1)))


class MSFE(nn.Module):
    """Multi-scale feature extraction: ``x + fuse([b_1(x), ..., b_k(x)])``.

    Branches: 1x1x1 conv, 3x3x3 convs with dilation 1, 2 and 4 (receptive fields 3, 5 and 9
    voxels at the bottleneck, i.e. 48 to 144 input voxels), and a global-context branch
    (global average pooling, 1x1x1 conv, broadcast back).
    """

    def __init__(self, channels: int, dilations: tuple[int, ...] = (1, 2, 4)):
        super().__init__()
        width = channels // 4

        def branch(kernel: int, dilation: int = 1) -> nn.Sequential:
            padding = dilation * (kernel // 2)
            return nn.Sequential(
                nn.Conv3d(channels, width, kernel, padding=padding, dilation=dilation, bias=False),
                nn.BatchNorm3d(width),
                nn.ReLU(inplace=True),
            )

        self.branches = nn.ModuleList([branch(1)] + [branch(3, d) for d in dilations])
        self.context = nn.Sequential(nn.Conv3d(channels, width, 1), nn.ReLU(inplace=True))
        self.fuse = nn.Sequential(
            nn.Conv3d(width * (len(dilations) + 2), channels, 1, bias=False),
            nn.BatchNorm3d(channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [branch(x) for branch in self.branches]
        context = self.context(torch.mean(x, dim=(2, 3, 4), keepdim=True))
        features.append(context.expand(-1, -1, *x.shape[2:]))
        return x + self.fuse(torch.cat(features, dim=1))


def upsampler(in_channels: int, out_channels: int, mode: str) -> nn.Module:
    """2x upsampling to ``out_channels``: trilinear interpolation and a 1x1x1 conv, or a 2x2x2
    stride-2 transposed conv.

    The 1x1x1 conv runs before the interpolation: both are linear and the interpolation
    weights sum to 1, so the order does not change the result (bias included), and the conv
    then costs 1/8 of its work at the coarse resolution (as MONAI's ``UpSample`` pre_conv).
    """
    if mode == "transposed":
        return nn.ConvTranspose3d(in_channels, out_channels, 2, stride=2)
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, 1),
        nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
    )


class DecoderStage(nn.Module):
    """Upsample 2x, fuse with the skip (HSCA or concatenation), convolve."""

    def __init__(self, in_channels: int, out_channels: int, hsca: bool, upsampling: str):
        super().__init__()
        self.up = upsampler(in_channels, out_channels, upsampling)
        self.attention = HSCA(2 * out_channels) if hsca else None
        self.conv = conv_block(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        upsampled = self.up(x)
        if self.attention is None:
            fused = torch.cat([upsampled, skip], dim=1)
        else:
            fused = self.attention(upsampled, skip)
        return self.conv(fused)


class VesselUNet(nn.Module):
    """The paper's 3D U-Net; input ``(N, 1, Z, Y, X)`` with Z, Y, X multiples of 16."""

    def __init__(self, architecture: Architecture | None = None, **settings):
        super().__init__()
        self.architecture = architecture or Architecture(**settings)
        arch = self.architecture
        widths = [arch.base_channels * 2**level for level in range(5)]
        self.encoders = nn.ModuleList(
            conv_block(c_in, c_out) for c_in, c_out in zip([arch.in_channels] + widths, widths)
        )
        self.pool = nn.MaxPool3d(2)
        self.bottleneck = MSFE(widths[-1]) if arch.msfe else nn.Identity()
        self.decoders = nn.ModuleList(
            DecoderStage(widths[level + 1], widths[level], arch.hsca, arch.upsampling)
            for level in reversed(range(4))
        )
        self.head = nn.Conv3d(widths[0], arch.classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x.shape[2:])
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x if level == 0 else self.pool(x))
            skips.append(x)
        x = self.bottleneck(skips.pop())
        for decoder in self.decoders:
            x = decoder(x, skips.pop())
        return self.head(x)


def check_input_size(spatial_size) -> None:
    """Raise a ValueError naming the size unless every spatial size is a multiple of 16."""
    size = tuple(int(s) for s in spatial_size)
    if len(size) != 3 or any(s % DOWNSAMPLING or s == 0 for s in size):
        raise ValueError(
            f"input spatial size {size} is not divisible by {DOWNSAMPLING}: "
            "the network pools four times by 2; pad or choose a patch size that is"
        )


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities (softmax over the class axis), as the paper's head outputs."""
    return torch.softmax(logits, dim=1)


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def flops_per_voxel(net: nn.Module, patch: int = 96) -> float:
    """Forward FLOPs of one patch divided by its voxels, counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net.eval()(torch.zeros(1, net.architecture.in_channels, patch, patch, patch))
    return counter.get_total_flops() / patch**3


if __name__ == "__main__":
    for hsca, msfe in ((False, True), (True, False), (True, True)):
        net = VesselUNet(hsca=hsca, msfe=msfe)
        print(
            f"hsca={hsca!s:5} msfe={msfe!s:5} parameters={parameter_count(net):,} "
            f"FLOPs/voxel={flops_per_voxel(net):,.0f}"
        )
