"""The FID Inception-v3: the network behind FID, sFID, IS and precision/recall (fid.py).

The 2015 TensorFlow Inception graph as pytorch-fid ported it, in torchvision's Inception3 layout,
so that pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` loads strictly. What makes it the FID
Inception: average pools that do not count the zero padding (TF's way), a max pool in Mixed_7c's
pool branch, 1008 classes, and the input preprocessing inside the network. By default that is the
TF graph's own, which ADM's evaluator (so every published ImageNet FID) runs: TF1's legacy bilinear
resize to 299x299, then (x - 128) / 128. pytorch-fid's (PyTorch's half-pixel bilinear, then
2 x / 255 - 1) moves the statistics of real photos by 1-5% with the same weights.
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
PREPROCESSING = ("adm", "pytorch-fid")


def tf1_resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF1's legacy ResizeBilinear (align_corners False, no half-pixel centres) of float32 images
    (B, C, H, W) -> (B, C, *size), computed as TF computes it: output pixel i reads the input at
    float32(i * (in / out)), two taps (the upper one clamped to the last pixel), x first, then y."""
    def taps(n_in, n_out):  # lower and upper source index, weight of the upper
        scale = torch.tensor(float(n_in)) / n_out  # float32, as TF's
        src = torch.arange(n_out, dtype=torch.float32, device=x.device) * scale
        lo = src.floor()
        return lo.long(), src.ceil().long().clamp(max=n_in - 1), src - lo

    (y0, y1, wy), (x0, x1, wx) = taps(x.shape[2], size[0]), taps(x.shape[3], size[1])
    top, bottom = (r[..., x0] + (r[..., x1] - r[..., x0]) * wx for r in (x[:, :, y0], x[:, :, y1]))
    return top + (bottom - top) * wy[:, None]  # (B, C, *size)


class BasicConv2d(nn.Module):
    """Convolution without bias (the BatchNorm's shift replaces it) -> BatchNorm (TF's eps) ->
    ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, **kw):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, bias=False, **kw)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool(x):  # TensorFlow averages over the real pixels only; PyTorch's default would not
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
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_pool(x))], 1)  # (B, 224 + pool_features, 35, 35)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35x35 -> 17x17 (strided convs next to a strided max-pool)."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)  # (B, 768, 17, 17)


class InceptionC(nn.Module):
    """Mixed_6b..e (17x17): 7x7 convolutions factorised into 1x7 and 7x1."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7, row, col = channels_7x7, dict(padding=(0, 3)), dict(padding=(3, 0))
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), **col)
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), **row)
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for i in range(2, 6):
            b7d = getattr(self, f"branch7x7dbl_{i}")(b7d)
        b1, bp = self.branch1x1(x), self.branch_pool(_avg_pool(x))
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
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)  # (B, 1280, 8, 8)


class InceptionE(nn.Module):
    """Mixed_7b/c (8x8): branches that split into parallel 1x3 and 3x1 convolutions. The pool
    branch of Mixed_7c max-pools (a quirk of the TF graph; the weights expect it)."""

    def __init__(self, in_channels, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
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
        b3 = self.branch3x3_1(x)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d),
                          self.branch_pool(pooled)], 1)  # (B, 320 + 768 + 768 + 192 = 2048, 8, 8)


class FIDInception(nn.Module):
    """Inception-v3 for FID: images (B, 3, H, W) as floats 0..255 -> pool features (B, 2048), logits
    (B, 1008) and with spatial=True sFID's features (B, 2023). The logits are `pool @ fc.weight.T`
    without `fc.bias`, as the Inception Score has always been computed (original IS code, ADM,
    torch-fidelity). `preprocess`: "adm" or "pytorch-fid" (the module docstring).

    sFID (Nash et al. 2021, as ADM computes it) takes the TF graph's `mixed_6/conv`: TF names the
    blocks mixed, mixed_1, mixed_2 (5b-5d), mixed_3 (6a), mixed_4..mixed_7 (6b-6e), so it is
    Mixed_6d's 1x1 branch after its BatchNorm and ReLU, (B, 192, 17, 17). ADM keeps channels 0..6,
    flattened per image in NHWC order: the (h, w, c) order of its stored mu_s/sigma_s."""

    dims = (FEATURE_DIM, SPATIAL_DIM)  # (pool, spatial) sizes; statistics are checked against them

    def __init__(self, preprocess: str = "adm"):
        super().__init__()
        assert preprocess in PREPROCESSING, preprocess
        self.preprocess = preprocess
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
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_LOGITS)
        self.weights_name = "uninitialised"  # where the weights came from; set by load_inception

    def forward(self, x, spatial: bool = False):
        if self.preprocess == "adm":  # the TF graph's own ops, as ADM's evaluator feeds it
            x = (tf1_resize_bilinear(x, (299, 299)) - 128) / 128
        else:  # pytorch-fid: [0, 1], PyTorch's bilinear (half-pixel centres), then [-1, 1]
            x = 2 * F.interpolate(x / 255, (299, 299), mode="bilinear", align_corners=False) - 1
        x = self.Conv2d_1a_3x3(x)                       # (B, 3, 299, 299) -> (B, 32, 149, 149)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(x))   # (B, 32, 147, 147) -> (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)    # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))   # (B, 80, 73, 73) -> (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)    # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)                            # (B, 768, 17, 17)
        x = self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x)))  # (B, 768, 17, 17)
        # Mixed_6d's output starts with its 1x1 branch (torch.cat in InceptionC), TF's mixed_6/conv;
        # sFID keeps its first 7 channels, flattened per image in TF's NHWC order: (B, 2023).
        feats_s = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1) if spatial else None
        x = self.Mixed_7a(self.Mixed_6e(x))             # (B, 1280, 8, 8)
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
                   seed: int = 0, preprocess: str = "adm") -> FIDInception:
    """The FID Inception in eval mode, float32, frozen, on `device`: weights from `ckpt`, else the
    torch.hub cache, else downloaded. random_weights=True is for tests and the offline demo only."""
    model = FIDInception(preprocess)
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
