"""Segmentation decoders on a timm `features_only` backbone: FPN and U-Net.

Self-contained on purpose (torch, torchvision and timm only, no visiontune import): an exported segmenter is this
file's decoder around `timm.create_model(..., features_only=True)`, so a user copies this file to rebuild it
without visiontune (README, "Segmentation exports"). Each decoder returns logits at its own resolution (FPN: the
finest level it uses; U-Net: the input's); the caller resizes them to the image it wants a mask for.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FPNDecoder(nn.Module):
    """Semantic FPN (Panoptic FPN's head, simplified): torchvision's FPN over the body's levels from `first` on
    (1: stride 4 on the usual CNNs), each level resized to the finest and summed, a 3x3 conv, a 1x1 classifier.
    `refine` > 0 adds a residual at the input's resolution: two 3x3 convs over the (normalised) image and the
    upsampled logits, so edges thinner than the stride-4 grid follow the pixels (logits then come at full size)."""

    def __init__(self, body: nn.Module, channels: int, classes: int, first: int = 1, refine: int = 0):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork

        self.body, self.first = body, first
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels()[first:], channels)
        self.head = conv_bn_relu(channels, channels)
        self.classifier = nn.Conv2d(channels, classes, 1)
        self.refine = (
            nn.Sequential(conv_bn_relu(classes + 3, refine), nn.Conv2d(refine, classes, 3, padding=1))
            if refine
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = list(self.fpn({str(i): f for i, f in enumerate(self.body(x)[self.first :])}).values())
        size = levels[0].shape[-2:]
        fused = sum(F.interpolate(level, size=size, mode="bilinear", align_corners=False) for level in levels)
        logits = self.classifier(self.head(fused))
        if self.refine is None:
            return logits
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits + self.refine(torch.cat([logits, x], dim=1))


class UNetDecoder(nn.Module):
    """U-Net decoder: from the deepest level up, resize to the next finer level (the input image last), concatenate
    it and apply two 3x3 conv-BN-ReLU; widths halve from `channels` as the resolution doubles (8 at least), so the
    full-resolution steps that find thin boundaries stay cheap."""

    def __init__(self, body: nn.Module, channels: int, classes: int):
        super().__init__()
        skips = [*body.feature_info.channels()[:-1][::-1], 3]  # finer levels, coarse to fine, then the image
        width = body.feature_info.channels()[-1]
        self.body, self.blocks = body, nn.ModuleList()
        for k, skip in enumerate(skips):
            out = max(channels >> max(k - 1, 0), 8)
            self.blocks.append(nn.Sequential(conv_bn_relu(width + skip, out), conv_bn_relu(out, out)))
            width = out
        self.classifier = nn.Conv2d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *finer, y = self.body(x)
        for block, skip in zip(self.blocks, [*finer[::-1], x], strict=True):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], dim=1))
        return self.classifier(y)


DECODERS = {"fpn": FPNDecoder, "unet": UNetDecoder}
