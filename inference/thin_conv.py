"""HSCA's spatial-attention convolution rewritten for CPUs, with the same result.

The spatial attention convolves two channel-pooled maps into one (a 7x7x7 kernel, 2 -> 1
channels) at the decoder's resolutions. CPU convolution kernels vectorise over channels, so a
one-channel output leaves 15 of 16 lanes idle: on the full-resolution 48^3 map this single
convolution, about 1 % of the network's FLOPs, took 13 % of an OpenVINO pass.

:class:`BlockedConv3d` computes the same convolution on space-to-depth blocks: every block of
``bz x by x bx`` voxels becomes channels, so a pass computes ``bz * by * bx`` output voxels per
position with a kernel that is mostly zeros (about twice the FLOPs, all lanes busy). Only the
exported inference graph uses it (:func:`with_blocked_spatial_convs`); training and the weight
files keep the paper's layer.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model.network import VesselUNet

BLOCK = (2, 2, 4)  # 16 output voxels per position: one AVX-512 vector of fp32, two of bf16


class BlockedConv3d(nn.Module):
    """``conv`` (stride 1, no dilation, "same" padding) evaluated on ``block``-sized
    space-to-depth cells; inputs must have sizes divisible by ``block``."""

    def __init__(self, conv: nn.Conv3d, block: Sequence[int] = BLOCK):
        super().__init__()
        kernel = conv.kernel_size
        if (
            conv.stride != (1, 1, 1)
            or conv.dilation != (1, 1, 1)
            or conv.groups != 1
            or conv.padding != tuple(k // 2 for k in kernel)
            or any(k % 2 == 0 for k in kernel)
        ):
            raise ValueError("BlockedConv3d takes odd-kernel, stride-1, 'same' convolutions only")
        self.block = tuple(block)
        self.kernel = kernel
        self.taps = tuple(math.ceil((b + k - 1) / b) for b, k in zip(self.block, kernel))
        self.register_buffer("weight", self.blocked_weight(conv.weight.detach()))
        cells = math.prod(self.block)
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels)
        self.register_buffer("bias", bias.repeat_interleave(cells))

    def blocked_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Output cell ``r`` at block offset ``q`` reads input cell ``t`` through kernel tap
        ``i = b * q + t - r`` (per axis) where ``0 <= i < k``; every other entry is zero."""
        out_channels, in_channels = weight.shape[:2]
        cells = math.prod(self.block)
        blocked = weight.new_zeros(out_channels, cells, in_channels, cells, *self.taps)
        positions = list(itertools.product(*(range(b) for b in self.block)))
        for (r_index, r), (t_index, t) in itertools.product(enumerate(positions), repeat=2):
            for q in itertools.product(*(range(n) for n in self.taps)):
                tap = [b * qa + ta - ra for b, qa, ta, ra in zip(self.block, q, t, r)]
                if all(0 <= i < k for i, k in zip(tap, self.kernel)):
                    blocked[:, r_index, :, t_index, q[0], q[1], q[2]] = weight[:, :, *tap]
        return blocked.reshape(out_channels * cells, in_channels * cells, *self.taps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, channels, *size = x.shape
        if any(s % b for s, b in zip(size, self.block)):
            raise ValueError(f"sizes {tuple(size)} are not divisible by the block {self.block}")
        padding = []
        for k, b, taps in reversed(list(zip(self.kernel, self.block, self.taps))):
            padding += [k // 2, b * (taps - 1) - k // 2]  # F.pad lists the last axis first
        x = F.pad(x, padding)
        cells = [s // b + t - 1 for s, b, t in zip(size, self.block, self.taps)]
        (bz, by, bx), (cz, cy, cx) = self.block, cells
        x = x.reshape(n, channels, cz, bz, cy, by, cx, bx).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(n, channels * bz * by * bx, cz, cy, cx)
        y = F.conv3d(x, self.weight.to(x.dtype), self.bias.to(x.dtype))
        out = y.shape[1] // (bz * by * bx)
        (oz, oy, ox) = (s // b for s, b in zip(size, self.block))
        y = y.reshape(n, out, bz, by, bx, oz, oy, ox).permute(0, 1, 5, 2, 6, 3, 7, 4)
        return y.reshape(n, out, *size)


def with_blocked_spatial_convs(net: nn.Module, patch: Sequence[int]) -> nn.Module:
    """A copy of ``net`` whose HSCA spatial convolutions are :class:`BlockedConv3d` wherever
    that decoder stage's map (for input ``patch``) divides into :data:`BLOCK` cells."""
    if not isinstance(net, VesselUNet) or not net.architecture.hsca:
        return net
    net = copy.deepcopy(net)
    levels = len(net.decoders)
    for index, decoder in enumerate(net.decoders):
        size = [p // 2 ** (levels - 1 - index) for p in patch]  # deepest stage first
        if all(s % b == 0 for s, b in zip(size, BLOCK)):
            spatial = decoder.attention.spatial
            spatial.conv = BlockedConv3d(spatial.conv)
    return net
