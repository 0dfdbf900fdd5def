"""Small models shared by the tests."""

import torch
import torch.nn.functional as F
from torch import nn

from fxcanon.equivalence import randomize_batchnorms


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d in miniature: functional batch_norm, then an activation."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return torch.relu(x)


class FunctionalNet(nn.Module):
    """Functional spellings: F.conv2d / torch.batch_norm / F.linear with get_attr parameters."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(6) * 0.1)
        self.bn = nn.BatchNorm2d(6)
        self.bn2 = nn.BatchNorm1d(6)
        self.w2 = nn.Parameter(torch.randn(4, 6) * 0.3)

    def forward(self, x):
        y = F.conv2d(x, self.w1, self.b1, padding=1)
        y = torch.batch_norm(y, self.bn.weight, self.bn.bias, self.bn.running_mean, self.bn.running_var,
                             False, 0.1, 1e-5, False)
        y = torch.relu(y).mean((2, 3))
        y = F.batch_norm(y, self.bn2.running_mean, self.bn2.running_var, self.bn2.weight, self.bn2.bias,
                         False, 0.1, 1e-5)
        return F.linear(y, self.w2)


def random_bn(model, seed=0):
    return randomize_batchnorms(model, seed).eval()


class SideBranchReLU(nn.Module):
    """An in-place ReLU on a BatchNorm's input, after the BatchNorm read it."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True)
        self.conv2, self.conv3 = nn.Conv2d(4, 2, 3, padding=1), nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        h = self.conv1(x)
        y = self.bn(h)
        z = self.relu(h)
        return self.conv2(y) + self.conv3(z)


class EditedOutput(nn.Module):
    """A BatchNorm's output edited in place by ``edit`` before a convolution reads it."""

    def __init__(self, edit):
        super().__init__()
        self.bn, self.conv, self.edit = nn.BatchNorm2d(3), nn.Conv2d(3, 2, 3, padding=1), edit

    def forward(self, x):
        y = self.bn(x)
        self.edit(y)
        return self.conv(y)

