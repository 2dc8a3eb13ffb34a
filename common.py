"""Run plumbing shared by every script: torchrun/DDP set-up and clean shutdown, per-rank seeding,
rank-0 logging (console + JSONL), atomic checkpoints, the EMA of the weights, graceful stop on
SIGTERM/SIGINT, and finding pretrained weight files offline.

Nothing here is specific to the method; it is the part of a training script that is the same for the
tokenizer (train_tokenizer.py), the diffusion model (train_dit.py), sampling and evaluation, written
once so those files can stay about the method.
"""

import copy
import json
import os
import signal
import sys
import time
import urllib.error
from dataclasses import dataclass

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------------------------------
# Distributed set-up


@dataclass
class DistEnv:
    """Where this process stands in a `torchrun` job (a plain `python` run is rank 0 of 1)."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def all_reduce_mean(self, tensor):
        """Average a tensor over ranks (in place on a copy); a no-op for a single process."""
        tensor = tensor.detach().clone()
        if self.distributed:
            dist.all_reduce(tensor)
            tensor /= self.world_size
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank (so all ranks take the same branch)."""
        if not self.distributed:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def setup_distributed(device: str = "auto") -> DistEnv:
    """Read rank and world size from the `torchrun` environment and join the process group.

    NCCL on CUDA, gloo on CPU. `device` is "auto" (CUDA when present), "cuda" or "cpu".
    """
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"--device must be auto, cuda or cpu, not {device!r}")
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        # TF32 for the float32 parts (losses, norms, FID is kept in true fp32 by fid.py itself).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return DistEnv(rank, local_rank, world_size, dev)


def cleanup_distributed():
    """Leave the process group cleanly.

    Call this after every DDP-wrapped module is gone (return from the function that owns them
    first): destroying the group under a live DDP module, or exiting without destroying it, aborts
    the processes at exit with "terminate called without an active exception".
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int, rank: int = 0):
    """Seed torch on this rank. Each rank gets its own stream (seed + rank) so that noise and
    timesteps differ across GPUs; the data order is seeded separately (data.py) and is shared."""
    torch.manual_seed(seed + rank)


def use_bf16(precision: str, device: torch.device) -> bool:
    """--precision auto|bf16|fp32: auto is bf16 autocast on CUDA and float32 on the CPU (where bf16
    is slow); bf16 on the CPU is allowed so that tests cover that path."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast (on CUDA by default; on CPU only when asked for, so tests cover the path)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def wrap_ddp(module: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """DistributedDataParallel under torchrun (gradients all-reduced in backward), else the module."""
    if not env.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[env.local_rank] if env.device.type == "cuda" else None)


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, for model FLOPs utilisation.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                   "B200": 2250e12}


def peak_bf16_flops(device: torch.device) -> float | None:
    """The device's bf16 peak if we know it (None on CPU and unknown GPUs: then no MFU is reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


# ----------------------------------------------------------------------------------------------------
# Logging


class Logger:
    """Prints on rank 0 and appends one JSON object per `log()` call to `<run_dir>/log.jsonl`."""

    def __init__(self, dist_env: DistEnv, run_dir: str | None = None):
        self.enabled = dist_env.is_main
        self.path = os.path.join(run_dir, "log.jsonl") if (run_dir and self.enabled) else None

    def info(self, msg: str):
        if self.enabled:
            # tqdm.write keeps an active progress bar intact.
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    def log(self, record: dict):
        if self.path is None:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def fmt_metrics(record: dict) -> str:
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(obj, path: str):
    """Write `obj` with torch.save atomically: a temporary file in the same folder, flushed to disk,
    then renamed over `path`. A crash mid-write leaves the previous checkpoint intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, what: str = "checkpoint"):
    """torch.load with weights_only=True (no arbitrary code from a file), on the CPU, with errors
    that say which file is missing or unreadable."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, a non-torch file, or a pickle with foreign objects
        raise RuntimeError(f"could not read {what} {path}: {type(e).__name__}: {e}. "
                           "Is it a complete file written by this project (or the official weights)?") from e


def training_state(parts: dict, env: DistEnv) -> dict:
    """What a resumable checkpoint holds besides its metadata: the state dict of every stateful part
    (model, EMA, optimisers, data position) and every rank's RNG. A collective: call it on all ranks."""
    return {**{name: part.state_dict() for name, part in parts.items()}, "rng": rng_states(env)}


def load_training_state(ckpt: dict, parts: dict, env: DistEnv) -> int:
    """Restore what `training_state` saved; returns the step to continue from.

    An optimiser gets its moments and step counts back, but keeps the hyper-parameters it was built
    with from this run's flags, so that `--resume --lr 1e-5` (after a loss spike) does lower the lr."""
    for name, part in parts.items():
        if isinstance(part, torch.optim.Optimizer):
            hyper = [{k: g[k] for k in ("lr", "betas", "weight_decay") if k in g} for g in part.param_groups]
            part.load_state_dict(ckpt[name])
            for group, h in zip(part.param_groups, hyper):
                group.update(h)
        else:
            part.load_state_dict(ckpt[name])
    set_rng_states(ckpt["rng"], env)
    return ckpt["step"]


def rng_states(env: DistEnv) -> list[dict]:
    """Every rank's torch RNG state (CPU and this rank's GPU), gathered for a checkpoint."""
    state = {"torch": torch.get_rng_state()}
    if env.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(env.device)
    if not env.distributed:
        return [state]
    states = [None] * env.world_size
    dist.all_gather_object(states, state)
    return states


def set_rng_states(states: list[dict], env: DistEnv):
    """Restore this rank's RNG state from `rng_states`. A rank the checkpoint did not have (a run
    resumed on more ranks) gets a new seed instead, drawn from a saved state and its own rank: a copy
    of another rank's state would make the two draw the same noise, timesteps and label drops."""
    if env.rank < len(states):
        state = states[env.rank]
        torch.set_rng_state(state["torch"])
        if "cuda" in state and env.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], env.device)
        return
    saved = torch.Generator().set_state(states[env.rank % len(states)]["torch"])
    base = int(torch.randint(0, 2 ** 62, (), generator=saved))
    torch.manual_seed(base + env.rank)  # seeds the CPU and every GPU


# ----------------------------------------------------------------------------------------------------
# Pretrained weights (no network at run time on many clusters)


class MissingWeightsError(RuntimeError):
    pass


def pretrained_file(url: str, local_path: str | None, what: str, flag: str) -> str:
    """Path of a pretrained weight file: `local_path` if given, else the torch.hub cache
    (`$TORCH_HOME/hub/checkpoints/<file name>`), else downloaded there from `url`.
    Offline with no file, the error names the file, where to put it and the flag that takes it."""
    if local_path:
        if not os.path.isfile(local_path):
            raise MissingWeightsError(f"{what}: {flag} {local_path} does not exist")
        return local_path
    name = os.path.basename(url)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", name)
    if os.path.isfile(cached):
        return cached
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        torch.hub.download_url_to_file(url, cached, progress=True)
        return cached
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise MissingWeightsError(
            f"{what}: the weight file {name} is not available and could not be downloaded ({e}).\n"
            f"  Download {url} on a machine with internet and put it at {cached}\n"
            f"  (the torch.hub cache; set TORCH_HOME to move it), or pass {flag} /path/to/{name}.") from e


# ----------------------------------------------------------------------------------------------------
# EMA of the weights


class EMA:
    """Exponential moving average of a model's trainable weights, kept as a full frozen copy.

    The copy is what we evaluate and export: it is smoother than the raw weights late in training.
    Parameters that do not train (a frozen encoder) are simply left as they were copied.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        ema_params = dict(self.model.named_parameters())
        self._ema = [ema_params[n] for n in names]
        self._names = names

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        params = dict(model.named_parameters())
        src = [params[n].detach() for n in self._names]
        # One fused kernel for all tensors: ema += (1 - decay) * (param - ema).
        torch._foreach_lerp_(self._ema, src, 1.0 - self.decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module behind DDP and/or torch.compile wrappers."""
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


# ----------------------------------------------------------------------------------------------------
# Non-finite losses


class NonFiniteGuard:
    """Remembers, on the device, the first step whose loss was not finite: `update` costs no host
    sync; `check` (called before anything is logged or saved) reads it and stops the run, so a
    checkpoint is never written after a NaN and the last good one survives."""

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, loss: torch.Tensor, step: int):
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss.detach()), step, self.first_bad)

    def check(self, env: DistEnv, ckpt_path: str, advice: str):
        bad = self.first_bad.clone()
        if env.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() >= 0:
            raise FloatingPointError(f"non-finite loss at step {bad.item()}: the run is stopped and no checkpoint "
                                     f"was written after it; the last good one is {ckpt_path}. {advice}")


# ----------------------------------------------------------------------------------------------------
# Graceful stop


class StopSignal:
    """Turns SIGTERM (cluster pre-emption, `kill`) and the first Ctrl-C into a flag that the training
    loop checks between steps, so it can save a checkpoint and exit cleanly. A second Ctrl-C stops at
    once as usual. `restore()` puts the previous handlers back."""

    def __init__(self, every: int = 10):
        self.requested, self.every = False, every
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def should_stop(self, env: DistEnv, step: int) -> bool:
        """Whether to save and stop after `step`. All ranks must take the same branch, so under DDP
        they combine their flags with a collective; that is a host sync, so only every `every` steps.
        Not only at log steps: torchrun's agent kills the workers 30 s after it forwards a SIGTERM."""
        if env.distributed and step % self.every:
            return False
        return env.any(self.requested)

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n[rank {os.environ.get('RANK', 0)}] received {signal.Signals(signum).name}: "
              "saving a checkpoint and stopping (Ctrl-C again to abort)", file=sys.stderr, flush=True)
