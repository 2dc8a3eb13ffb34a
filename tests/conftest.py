"""Shared test settings: small thread counts (CI has 2 cores) and a helper to run torchrun."""

import os
import socket
import subprocess
import sys
import time

import torch
from torch import nn

# One thread: oneDNN with 2 threads on 2 shared cores slows down badly when anything else runs.
torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_torchrun(script_args, nproc=2, timeout=300, env=None, nodes=1):
    """Run `torchrun --standalone --nproc_per_node=N <args>` from the repo root on CPU (gloo); with
    `nodes` > 1, that many torchrun agents on this machine, as on several nodes."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                "PYTHONPATH": ROOT, **(env or {})}
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nodes == 1:
        cmds = [[*launch, "--standalone", *script_args]]
    else:
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmds = [[*launch, f"--nnodes={nodes}", f"--node_rank={i}", "--master_addr=127.0.0.1",
                 f"--master_port={port}", *script_args] for i in range(nodes)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for cmd in cmds]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, (f"torchrun failed ({p.returncode}):\n"
                                   f"{out[-4000:]}\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmds[0], 0, *outputs[0])


def run_script(script_args, timeout=300, env=None):
    """Run `python <args>` from the repo root, as a user would."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run([sys.executable, *script_args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def wait_for_log(log_path, text, timeout=120):
    """Wait until a line of a run's log.jsonl contains `text` (e.g. '"step": 1,': a step is
    done)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(log_path) and any(text in line for line in open(log_path)):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{text!r} not in {log_path} after {timeout} s")


def save_tokenizer(path, **config):
    """A random tiny tokenizer (32 px -> 32x2x2 latents) saved as train_tokenizer.py's stage 3 did
    before its export named the weights "ema": such older files must still load."""
    from tokenizer import AlignedTokenizer

    tok = AlignedTokenizer(dict(encoder="tiny", image_size=32, decoder_ch=32, decoder_res_blocks=1,
                                **config))
    ckpt = {"kind": "tokenizer", "stage": 3, "config": tok.config, "model": tok.state_dict()}
    torch.save(ckpt, path)
    return tok


def randomize_(model, scale=0.2, seed=0):
    """Random non-zero values for every trainable weight, norm weights near 1: the AdaLN-Zero init
    would make a LightningDiT predict exactly 0 and hide most of the model from a test."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                offset = 1.0 if "norm" in name else 0.0
                p.copy_(torch.randn(p.shape, generator=g) * scale + offset)
    return model


class StubInception(nn.Module):
    """Same interface as FIDInception at a tiny cost: 64-d "pool features" (a fixed random
    projection of an 8x8 thumbnail), 10 logits and 12-d "spatial features" (a 2x2 thumbnail). For
    testing the plumbing around the network; small features also keep the Frechet distance cheap."""

    weights_name = "stub"
    dims = (64, 12)

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = nn.Parameter(torch.randn(3 * 8 * 8, 64, generator=g) / 8, requires_grad=False)
        self.fc = nn.Parameter(torch.randn(64, 10, generator=g) / 8, requires_grad=False)

    def forward(self, x, spatial=False):
        pool = torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1) @ self.proj
        thumb = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)  # (B, 12)
        return (pool, pool @ self.fc, thumb) if spatial else (pool, pool @ self.fc)


def save_random_clip(folder: str, dim: int = 32, image_size: int = 32) -> str:
    """A tiny RANDOMLY initialised CLIP with a byte-level tokenizer, for the CLIP score offline."""
    import transformers

    layers = dict(hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=1,
                  num_attention_heads=2)
    text = dict(layers, vocab_size=384, max_position_embeddings=64, bos_token_id=1, eos_token_id=1,
                pad_token_id=0)
    vision = dict(layers, image_size=image_size, patch_size=8)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=dim)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        transformers.CLIPModel(config).save_pretrained(folder)
    transformers.ByT5Tokenizer().save_pretrained(folder)
    return folder
