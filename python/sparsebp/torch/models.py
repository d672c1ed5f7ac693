"""Small models used by the examples and the end-to-end benchmark (torchvision does not import
beside the pinned torch, so the project defines its own)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a ReLU between them, added to the (1x1-projected when the shape
    changes) input, then a ReLU: the basic block of ResNet, without batch normalisation (the
    residual branch's second convolution starts scaled down instead, so the sum stays stable; and no
    convolution biases)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, branch_scale: float = 0.2):
        super().__init__()
        # No biases (as in ResNet, where batch norm follows): the block is then positively homogeneous,
        # so pruning, which mostly shrinks activations, does not let biases swamp the signal.
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if (stride != 1 or cin != cout)
                         else nn.Identity())
        for conv in (self.conv1, self.conv2, self.shortcut):
            if isinstance(conv, nn.Conv2d):
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        with torch.no_grad():
            self.conv2.weight.mul_(branch_scale)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv1(x))
        return torch.relu(self.conv2(h) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet-style CNN for 1x28x28 digits with pixels in [0, 1]: a 3x3 stem, then one stage per entry of `widths`
    (the first at full resolution, each later one halving it), `blocks` residual blocks per stage,
    global average pooling and a linear classifier.

    The default (32, 64, 128) has about 0.5 M parameters and 0.1 GFLOP per image forward; its
    residual-block convolutions are what `sparsify` / `from_pruned` make sparse (`prunable`)."""

    def __init__(self, widths: Sequence[int] = (32, 64, 128), blocks: int = 2, num_classes: int = 10,
                 in_channels: int = 1):
        super().__init__()
        if not widths or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty sequence of positive ints; got {widths!r}")
        if int(blocks) < 1:
            raise ValueError(f"blocks must be >= 1; got {blocks!r}")
        widths = [int(w) for w in widths]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        nn.init.kaiming_normal_(self.stem.weight, nonlinearity="relu")
        nn.init.zeros_(self.stem.bias)
        layers = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for b in range(int(blocks)):
                stride = 2 if (i > 0 and b == 0) else 1
                layers.append(ResidualBlock(cin, w, stride))
                cin = w
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        # Where the activations may change memory layout: sparse models set it to
        # sparsebp.torch.BatchInner() so that every sparse convolution after the (dense) stem reads
        # and writes the batch-innermost layout without conversions. Identity in value.
        self.layout: nn.Module = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = (x - 0.1307) / 0.3081  # MNIST's pixel mean and deviation: inputs in [0, 1] come out centred
        h = self.layout(torch.relu(self.stem(x)))
        h = self.blocks(h)
        return self.fc(h.mean(dim=(2, 3)))

    @staticmethod
    def prunable(name: str, module: nn.Module) -> bool:
        """The layers worth pruning: every convolution inside the residual blocks (the stem, with one
        input channel, and the classifier are small and stay dense)."""
        return name.startswith("blocks.") and isinstance(module, nn.Conv2d)
