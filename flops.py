"""Speed accounting, kept out of the model files: the model FLOPs of a training step and the GPU's
peak, for the model FLOPs utilisation (MFU) that the trainers log and bench.py reports.

MFU = achieved model FLOP/s / the GPU's dense bf16 peak. Model FLOPs count each matmul weight
applied to each token it sees (a multiply-add is 2 FLOPs) and attention's q k^T and attn v; norms,
RoPE, softmax and other elementwise work are not counted. A training step costs 3 forwards (the
backward pass costs twice the forward).
"""

import torch
import torch.nn as nn

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
                   "L40S": 362e12, "B200": 2250e12}


def peak_bf16_flops(device: torch.device) -> float | None:
    """The GPU's bf16 peak if we know it (None on CPU and unknown GPUs: then no MFU is reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def mfu(images_per_s: float, flops_per_image: float, device: torch.device, ranks: int = 1):
    """The MFU of `ranks` GPUs together, or None where the peak is unknown."""
    peak = peak_bf16_flops(device)
    return images_per_s * flops_per_image / (peak * ranks) if peak else None


def _matmul_weights(model: nn.Module):
    """(name, number of weights) of every Linear and Conv2d:
    each is one matmul per token it sees."""
    return [(n, m.weight.numel()) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))]


def forward_flops_per_image(model) -> int:
    """One LightningDiT forward pass of one image: 2 P_token N + 2 P_cond + depth 4 N^2 D, with
    P_token the matmul weights applied to every token and P_cond those applied once to the
    conditioning (t-MLP, adaLN). Pass the unwrapped module."""
    per_token = per_image = 0
    for name, n in _matmul_weights(model):
        if "adaLN_modulation" in name or "t_embedder" in name:
            per_image += n
        else:
            per_token += n
    N, D = model.num_patches, model.hidden_size
    return 2 * per_token * N + 2 * per_image + model.depth * 4 * N * N * D


def training_flops_per_image(model) -> int:
    """One LightningDiT training step per image."""
    return 3 * forward_flops_per_image(model)


def t2i_forward_flops(model, image_tokens: int, text_tokens: int) -> int:
    """forward_flops_per_image for t2i.TextToImageDiT: each matmul weight times the tokens it sees
    (a stream's weights its own tokens, the single-stream blocks all), plus joint attention."""
    flops = 0
    for name, n in _matmul_weights(model):
        if "adaLN_modulation" in name or name.startswith(("t_embedder", "text_pool")):
            tokens = 1
        elif name.startswith("context_embedder") or ".txt." in name:
            tokens = text_tokens
        elif name.startswith(("x_embedder", "final_layer")) or ".img." in name:
            tokens = image_tokens
        else:
            tokens = image_tokens + text_tokens
        flops += 2 * n * tokens
    return flops + model.depth * 4 * (image_tokens + text_tokens) ** 2 * model.hidden_size
