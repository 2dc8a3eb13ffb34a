"""The networks behind fid.py's metrics, in true float32: DINOv2 (FD_DINOv2), the FID Inception-v3
(FID, sFID, IS computed here, precision/recall): the 2015 TF graph as pytorch-fid ports it, with
ADM's preprocessing (TF1's bilinear resize to 299, (x - 128) / 128; pytorch-fid's: FID 1-5% off)."""

import contextlib
import math
import os
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.models import inception as tv

from common import UserError, load_checkpoint, pretrained_file
from tokenizer import build_dinov2

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
SPATIAL_CHANNELS = 7  # sFID: ADM keeps the first 7 channels of TF's `mixed_6/conv`, 17x17 each
PREPROCESSING = ("adm", "pytorch-fid")


@contextlib.contextmanager
def exact_float32(device: torch.device):
    """True float32 in the body: no autocast, no TF32 (its 10-bit mantissa moves FID)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def load_dinov2(ckpt: str | None = None, random_weights: bool = False, device="cpu"):
    """DINOv2 ViT-L/14, official weights loaded strictly, or a random one-block one for tests."""
    with torch.random.fork_rng(devices=[]):  # random weights: the same in every run
        torch.manual_seed(0)
        net = build_dinov2("tiny" if random_weights else "dinov2_vitl14", not random_weights,
                           ckpt, ("--dinov2_ckpt", "--random_dinov2")).eval().requires_grad_(False)
    net.weights_name = "RANDOM (tiny, test only)" if random_weights else ckpt or "dinov2_vitl14"
    return net.to(device)


def dinov2_input(images) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> DINOv2's input (B, 3, 224, 224) as dgm-eval makes it: PIL's
    bicubic resize straight to 224x224 (torch's bicubic differs), /255, ImageNet's mean and std."""
    resized = [np.asarray(Image.fromarray(im.permute(1, 2, 0).numpy()).resize(
        (224, 224), Image.BICUBIC)) for im in images.cpu()]  # each (224, 224, 3) uint8
    x = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor([(0.485, 0.456, 0.406), (0.229, 0.224, 0.225)]).view(2, 3, 1, 1)
    return (x - mean) / std


def tf1_resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF1's legacy ResizeBilinear of float32 images (B, C, H, W) -> (B, C, *size), as TF computes
    it: output pixel i reads the input at float32(i * (in / out)), upper tap clamped, x then y."""
    def taps(n_in, n_out):  # lower and upper source index, weight of the upper
        scale = torch.tensor(float(n_in)) / n_out  # float32, as TF's
        src = torch.arange(n_out, dtype=torch.float32, device=x.device) * scale
        lo = src.floor()
        return lo.long(), src.ceil().long().clamp(max=n_in - 1), src - lo

    (y0, y1, wy), (x0, x1, wx) = taps(x.shape[2], size[0]), taps(x.shape[3], size[1])
    top, bottom = (r[..., x0] + (r[..., x1] - r[..., x0]) * wx for r in (x[:, :, y0], x[:, :, y1]))
    return top + (bottom - top) * wy[:, None]  # (B, C, *size)


_avg_pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)  # TF's: real pixels only


# torchvision's Inception3 blocks (BasicConv2d has TF's BatchNorm eps); these pool as TF does
class InceptionA(tv.InceptionA):
    """Mixed_5b/c/d (35x35): 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avg-pool->1x1, concatenated."""

    def _forward(self, x):
        return [self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg_pool(x))]  # (B, 224 + pool_features, 35, 35) once joined


class InceptionC(tv.InceptionC):
    """Mixed_6b..e (17x17): 7x7 convolutions factorised into 1x7 and 7x1."""

    def _forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        b7d = self.branch7x7dbl_5(self.branch7x7dbl_4(b7d))
        return [self.branch1x1(x), b7, b7d, self.branch_pool(_avg_pool(x))]  # (B, 768, 17, 17)


class InceptionE(tv.InceptionE):
    """Mixed_7b/c (8x8): parallel 1x3 and 3x1 convolutions; Mixed_7c's pool branch max-pools."""

    def __init__(self, in_channels, max_pool: bool):
        super().__init__(in_channels)
        self.max_pool = max_pool

    def _forward(self, x):
        b3 = self.branch3x3_1(x)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return [self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d),
                self.branch_pool(pooled)]  # (B, 320 + 768 + 768 + 192 = 2048, 8, 8) once joined


class FIDInception(nn.Module):
    """Images (B, 3, H, W), floats 0..255 -> pool features (B, 2048), logits (B, 1008) without
    `fc.bias` (as IS always was), and with `spatial` sFID's (B, 2023): TF's `mixed_6/conv` as in
    ADM, Mixed_6d's 1x1 branch (B, 192, 17, 17), channels 0..6 flattened in TF's (h, w, c) order."""

    dims = (2048, 17 * 17 * SPATIAL_CHANNELS)  # (pool, spatial) feature sizes

    def __init__(self, preprocess: str = "adm"):
        super().__init__()
        assert preprocess in PREPROCESSING, preprocess
        self.preprocess = preprocess
        self.Conv2d_1a_3x3 = tv.BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = tv.BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = tv.BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = tv.BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = tv.BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = tv.InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = tv.InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # 1000 ImageNet classes + 8 unused ones

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
        # Mixed_6d's output starts with its 1x1 branch (torch.cat): (B, 2023) in NHWC order
        feats_s = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1) if spatial else None
        x = self.Mixed_7a(self.Mixed_6e(x))             # (B, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))             # (B, 2048, 8, 8)
        pool = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)  # (B, 2048), pytorch-fid's op to the bit
        logits = pool @ self.fc.weight.t()  # (B, 1008), no bias
        return (pool, logits, feats_s) if spatial else (pool, logits)


def load_inception(ckpt: str | None = None, random_weights: bool = False, device="cpu",
                   seed: int = 0, preprocess: str = "adm") -> FIDInception:
    """The frozen FID Inception: weights from `ckpt`, the hub cache, a download, or random ones."""
    model = FIDInception(preprocess)
    if random_weights:
        warnings.warn(f"FID Inception with RANDOM weights (seed {seed}): for tests/demo only; "
                      "FID/IS/precision/recall computed with it are meaningless", stacklevel=2)
        g = torch.Generator().manual_seed(seed)
        for name, t in model.state_dict().items():  # views of the parameters and buffers
            if t.ndim > 1:  # conv and fc weights, He's init: activations stay O(1), 94 layers deep
                t.copy_(torch.randn(t.shape, generator=g) * math.sqrt(2.0 / t[0].numel()))
            elif name.endswith(("bn.weight", "running_var")):  # BatchNorm near identity
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point():  # biases, running means
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
        model.weights_name = f"RANDOM (seed {seed}, test only)"
    else:
        path = pretrained_file(FID_WEIGHTS_URL, ckpt, "FID Inception weights", "--inception_ckpt",
                               "--random_inception")
        try:
            model.load_state_dict(load_checkpoint(path, "FID Inception weights"), strict=True)
        except (RuntimeError, TypeError, AttributeError) as e:
            raise UserError(f"{path} is not pytorch-fid's {os.path.basename(FID_WEIGHTS_URL)}: "
                            f"{str(e)[:300]}") from None
        model.weights_name = os.path.basename(path)
    return model.to(device).float().eval().requires_grad_(False)


def inception_score(logits, split_size: int = 5000) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) from logits (N, 1008) as ADM computes it: softmax over all 1008,
    consecutive parts of `split_size` images, each with its own p(y). (mean, std) over the parts."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    scores = []
    for part in F.log_softmax(logits, dim=1).split(split_size):  # log p(y|x): no log(0)
        log_marginal = torch.logsumexp(part, dim=0) - math.log(part.shape[0])  # log p(y), this part
        scores.append((part.exp() * (part - log_marginal)).sum(1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))
