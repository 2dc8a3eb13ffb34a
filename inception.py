"""The FID Inception-v3: the network behind FID, IS and precision/recall (fid.py).

It is the 2015 TensorFlow Inception graph as pytorch-fid ported it: torchvision's Inception3 layout
and parameter names, so pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` loads strictly, and
the same 2048-d pool features as pytorch-fid (a test compares them), plus the 1008 logits of the
Inception Score. What makes it the FID Inception rather than torchvision's: average pools that do
not count the zero padding (TensorFlow's way), a max pool in Mixed_7c's pool branch (a quirk of the
TF graph), 1008 classes, and the input resized to 299x299 and scaled to [-1, 1] inside the network.
"""

import math
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, load_checkpoint, pretrained_file

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FEATURE_DIM = 2048  # Inception pool_3 features: what FID and precision/recall are computed on
NUM_LOGITS = 1008   # the 2015 graph's classifier: 1000 ImageNet classes + 8 unused ones
SPATIAL_CHANNELS = 7  # sFID: ADM's evaluator keeps the first 7 channels of TF's `mixed_6/conv`
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023, flattened per image in TF's (h, w, c) order

class BasicConv2d(nn.Module):
    """Convolution (no bias: the BatchNorm's shift replaces it) -> BatchNorm (eps 0.001, TF's) ->
    ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


# TensorFlow averages over the real pixels only; PyTorch's default darkens borders
def _avg_pool_no_pad(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/c/d (35x35): 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avg-pool->1x1, concatenated."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_no_pad(x))
        return torch.cat([b1, b5, b3, bp], 1)  # (B, 224 + pool_features, 35, 35)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35x35 -> 17x17 (strided convs next to a strided max-pool)."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3d, bp], 1)  # (B, 768, 17, 17)


class InceptionC(nn.Module):
    """Mixed_6b..e (17x17): 7x7 convolutions factorised into 1x7 and 7x1."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            b7d = conv(b7d)
        bp = self.branch_pool(_avg_pool_no_pad(x))
        return torch.cat([b1, b7, b7d, bp], 1)  # (B, 768, 17, 17)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17x17 -> 8x8."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)  # (B, 1280, 8, 8)


class InceptionE(nn.Module):
    """Mixed_7b/c (8x8): branches that split into parallel 1x3 and 3x1 convolutions. `pool` is "avg"
    for Mixed_7b and "max" for Mixed_7c (the TF graph's last block max-pools; the weights expect
    it)."""

    def __init__(self, in_channels, pool: str):
        super().__init__()
        assert pool in ("avg", "max")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        pooled = (_avg_pool_no_pad(x) if self.pool == "avg"
                  else F.max_pool2d(x, kernel_size=3, stride=1, padding=1))
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, b3d, bp], 1)  # (B, 320 + 768 + 768 + 192 = 2048, 8, 8)


class FIDInception(nn.Module):
    """Inception-v3 as used for FID: images (B, 3, H, W) in [0, 1] -> pool features (B, 2048) and
    logits (B, 1008), and with spatial=True also sFID's spatial features (B, 2023). The logits are
    `pool @ fc.weight.T` without `fc.bias`, as the Inception Score has always been computed
    (original IS code, ADM, torch-fidelity); `fc.bias` is kept so the file loads strictly.

    sFID (Nash et al. 2021, as ADM's evaluator computes it) takes the TF graph's tensor
    `mixed_6/conv`: the TF blocks are named mixed, mixed_1, mixed_2 (5b-5d), mixed_3 (6a),
    mixed_4..mixed_7 (6b-6e), so it is Mixed_6d's 1x1 branch after its BatchNorm and ReLU,
    (B, 192, 17, 17). ADM keeps channels 0..6 and flattens each image of the NHWC tensor: the
    (h, w, c) order of its stored mu_s/sigma_s."""

    dims = (FEATURE_DIM, SPATIAL_DIM)  # (pool, spatial) sizes; statistics are checked against them

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_LOGITS)
        # says where the weights came from; set by load_inception
        self.weights_name = "uninitialised"

    def forward(self, x, spatial: bool = False):
        # Resize exactly as pytorch-fid does (bilinear, half-pixel centres, no antialiasing), then
        # [0, 1] -> [-1, 1], the range the TF graph was trained on.
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1                                   # (B, 3, 299, 299)
        x = self.Conv2d_1a_3x3(x)                       # (B, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)                       # (B, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)                       # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)    # (B, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)                       # (B, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)                       # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)    # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)                            # (B, 768, 17, 17)
        x = self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x)))  # (B, 768, 17, 17)
        # Mixed_6d's output starts with its 1x1 branch (torch.cat in InceptionC), TF's mixed_6/conv;
        # sFID keeps its first 7 channels, flattened per image in TF's NHWC order: (B, 2023).
        feats_s = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1) if spatial else None
        x = self.Mixed_6e(x)                            # (B, 768, 17, 17)
        x = self.Mixed_7a(x)                            # (B, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))             # (B, 2048, 8, 8)
        # The same pooling op as pytorch-fid (not .mean), so the features match to the last bit.
        pool = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)  # (B, 2048)
        logits = pool @ self.fc.weight.t()  # (B, 1008), no bias (see the class docstring)
        return (pool, logits, feats_s) if spatial else (pool, logits)

    @torch.no_grad()
    def randomize_(self, seed: int = 0):
        """Random weights whose activations stay O(1) through the 94 layers (He-initialised convs,
        BatchNorm near identity): tests and the offline demo only, never a meaningful FID."""
        g = torch.Generator().manual_seed(seed)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                std = math.sqrt(2.0 / m.weight[0].numel())
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
            if isinstance(m, (nn.BatchNorm2d, nn.Linear)):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        return self


def load_inception(ckpt: str | None = None, random_weights: bool = False, device="cpu",
                   seed: int = 0) -> FIDInception:
    """The FID Inception in eval mode, float32, frozen, on `device`: weights from `ckpt`, else the
    torch.hub cache, else downloaded. random_weights=True is for tests and the offline demo only."""
    model = FIDInception()
    if random_weights:
        warnings.warn(f"FID Inception with RANDOM weights (seed {seed}): for tests/demo only; "
                      "FID/IS/precision/recall computed with it are meaningless", stacklevel=2)
        model.randomize_(seed)
        model.weights_name = f"RANDOM (seed {seed}, test only)"
    else:
        path = pretrained_file(FID_WEIGHTS_URL, ckpt, "FID Inception weights", "--inception_ckpt",
                               "--random_inception")
        try:
            model.load_state_dict(load_checkpoint(path, "FID Inception weights"), strict=True)
        except (RuntimeError, TypeError, AttributeError) as e:
            raise UserError(f"{path} is not pytorch-fid's {os.path.basename(FID_WEIGHTS_URL)} (an "
                            f"Inception3 state dict with 1008 classes): {str(e)[:300]}") from None
        model.weights_name = os.path.basename(path)
    return model.to(device).float().eval().requires_grad_(False)
