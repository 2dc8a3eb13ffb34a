"""The plumbing every script shares: errors, torchrun and DDP, atomic writes, safe loading, weight
files, the EMA, and a training run's bookkeeping (`Run`: exact resume, log, checkpoint, stop)."""

import argparse
import contextlib
import copy
import functools
import glob
import json
import math
import os
import signal
import sys
import time
import urllib.error
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from tqdm import tqdm

EXIT_STOPPED = 75  # a run stopped by SIGTERM/Ctrl-C after saving (sysexits' EX_TEMPFAIL)


class UserError(Exception):
    """Bad input, or a run that cannot go on: the message names the problem and the fix."""


class MissingWeightsError(UserError):
    """A pretrained weight file that is neither given, cached nor downloadable."""


def script_main(main):
    """`main()`: a UserError is one line on stderr and exit status 2; a stopped run EXIT_STOPPED."""
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    try:
        result = main()
    except UserError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # no barrier: another rank may never get there
        sys.exit(2)
    sys.exit(EXIT_STOPPED if getattr(result, "stopped", False) else 0)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Module docstring kept as written, and every flag's default shown in --help."""


def in_range(lo, hi=math.inf, kind=float, lo_open=False, hi_open=False):
    """An argparse type: finite numbers in [lo, hi] (an end left out if *_open), checked at once."""
    bounds = (f"> {lo}" if lo_open else f"at least {lo}") if hi == math.inf else \
        f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"

    def parse(text):
        value = kind(text)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        if value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


at_least = functools.partial(in_range, kind=int)  # at_least(1): a count


@dataclass
class DistEnv:
    """Where this process stands in a `torchrun` job (a plain `python` run is rank 0 of 1)."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    def __post_init__(self):
        self.is_main, self.distributed = self.rank == 0, self.world_size > 1

    def barrier(self):
        if self.distributed:
            dist.barrier()


def setup_distributed(device: str = "auto") -> DistEnv:
    """Join the `torchrun` process group (NCCL on CUDA, gloo on the CPU)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    use_cuda = torch.cuda.is_available() and device != "cpu"
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
        # TF32 for the float32 parts (losses, norms); fid.py keeps its features in true float32.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistEnv(rank, local_rank, world_size, dev)


def cleanup_distributed():
    """Leave the process group once every DDP module is gone (else the processes abort at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def same_on_every_rank(seed: int):
    """Random draws from `seed` alone inside: the same initial weights on every rank."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def use_bf16(precision: str, device: torch.device) -> bool:
    """--precision auto: bf16 on CUDA, float32 on the CPU (bf16 there only if asked: tests)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def use_compile(flag: str, device: torch.device) -> bool:
    return flag == "on" or (flag == "auto" and device.type == "cuda")


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def wrap_ddp(module: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """DistributedDataParallel under torchrun (gradients all-reduced in backward), else `module`."""
    if not env.distributed:
        return module
    device_ids = [env.local_rank] if env.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module behind DDP and/or torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def parallelize(model: torch.nn.Module, ema: "EMA", env: DistEnv, args) -> torch.nn.Module:
    """The model and its EMA on this rank's device; returns the DDP module to train, compiled."""
    model.to(env.device)
    ema.model.to(env.device)
    train_model = wrap_ddp(model, env)
    return torch.compile(train_model) if use_compile(args.compile, env.device) else train_model


def gradient_sync(model: torch.nn.Module, sync: bool):
    """A micro-batch's backward: DDP all-reduces the gradients only on the last (`sync`)."""
    model = getattr(model, "_orig_mod", model)  # behind torch.compile
    return contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()


def micro_batches(args, env: DistEnv) -> tuple[int, int]:
    """(samples per forward on a rank, forwards per step): --batch_size is global, over ranks."""
    per_rank, given = args.batch_size // env.world_size, getattr(args, "micro_batch", None)
    micro = min(given or per_rank, per_rank)
    if args.batch_size % env.world_size or per_rank % micro:
        raise UserError(f"--batch_size {args.batch_size} must split evenly over {env.world_size} "
                        f"ranks" + (f", each share into micro-batches of --micro_batch {micro}"
                                    if given else ""))
    return micro, per_rank // micro


def atomic_write(path: str, write):
    """`write(f)` to a synced temporary file renamed over `path`: never a half-written file."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    for stale in glob.glob(os.path.join(folder, f".{glob.escape(name)}.tmp*")):  # a killed writer's
        os.remove(stale)
    tmp = os.path.join(folder, f".{name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save's zip writer: a RuntimeError for a full disk
        why = getattr(e, "strerror", None) or str(e).strip().splitlines()[-1]
        raise UserError(f"could not write {path} ({why}): is the disk full or read-only? "
                        f"The previous {os.path.basename(path)} there, if any, is intact") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(obj, path: str):
    atomic_write(path, lambda f: torch.save(obj, f))


def save_json(obj, path: str):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def load_json(path: str, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"could not read the {what} {path} ({e}); delete it if damaged") from None


def load_checkpoint(path: str, what: str = "checkpoint"):
    """torch.load on the CPU with weights_only=True: tensors and plain containers, never code."""
    folder = os.path.abspath(path if os.path.isdir(path) else os.path.dirname(path))
    if os.path.isfile(os.path.join(folder, ".metadata")):  # a DCP folder, as fsdp.py writes
        export = os.path.basename(folder).replace("ckpt", "export", 1) + ".pt"  # fsdp.export's
        raise UserError(f"{path} is (part of) a sharded training checkpoint, not a {what} file: "
                        f"sample from {os.path.join(os.path.dirname(folder), export)}, which "
                        f"`python train_t2i.py --export {folder}` writes")
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or a pickle of foreign objects
        raise UserError(f"could not read {what} {path} ({type(e).__name__}): it is damaged, or not "
                        "a file of tensors of this project or the official weights") from None


def check_writable(path: str, what: str):
    """Fail now, not after hours of work, if the file `path` cannot be created."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write_test{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write the {what} {path}: {e.strerror}") from None


def pretrained_file(url: str, local_path: str | None, what: str, flag: str,
                    random_flag: str = "") -> str:
    """A pretrained weight file: `local_path`, else the torch.hub cache, else downloaded there."""
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
            f"  (the torch.hub cache; set TORCH_HOME to move it), or pass {flag} /path/to/{name}."
            + (f"\n  For a test or a demo only, {random_flag} runs with random weights instead."
               if random_flag else "")) from None


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a sharded DTensor's own shard


class EMA:
    """The weights' moving average (sampled, exported): a frozen copy of the model."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.state_dict, self.load_state_dict = self.model.state_dict, self.model.load_state_dict
        self._names = [n for n, p in model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        params, ema = dict(model.named_parameters()), dict(self.model.named_parameters())
        # One fused kernel for all tensors: ema += (1 - decay) * (param - ema); under FSDP on this
        # rank's shards, plain tensors (DTensor would dispatch tensor by tensor).
        torch._foreach_lerp_([_local(ema[n]) for n in self._names],
                             [_local(params[n].detach()) for n in self._names], 1.0 - self.decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


class Checkpoint:
    """A run's `state` (parts with a state dict) in <run_dir>/ckpt.pt, written by rank 0."""

    name = "ckpt.pt"

    def __init__(self, env, args, run_dir: str, identity: dict, state: dict):
        self.dir, self.identity, self.state = run_dir, identity, state
        self.path = os.path.join(run_dir, self.name)
        if args.keep_every % args.ckpt_every:
            raise UserError(f"--keep_every {args.keep_every} must be a multiple of --ckpt_every "
                            f"{args.ckpt_every} (kept checkpoints are copies of saved ones)")
        found = [p for p in ("ckpt.pt", "ckpt", "ckpt.old") if os.path.exists(f"{run_dir}/{p}")]
        if found and not args.resume:  # on every rank, so that all of them stop
            raise UserError(f"{os.path.join(run_dir, found[0])} exists: pass --resume to continue "
                            "that run, or use another --run_dir (we do not overwrite progress)")
        if env.is_main:
            check_writable(self.path, "checkpoint")
        env.barrier()

    def load(self, env) -> dict:
        """Every part and this rank's RNG; the optimisers keep this run's lr, betas, decay."""
        if not os.path.exists(self.path):
            raise UserError(f"training checkpoint to resume not found: {self.path}")
        opts = [p for p in self.state.values() if isinstance(p, torch.optim.Optimizer)]
        hyper = [{k: g[k] for k in ("lr", "betas", "weight_decay") if k in g}
                 for opt in opts for g in opt.param_groups]
        ckpt = self.read()
        differ = {k: (ckpt.get(k), v) for k, v in self.identity.items() if ckpt.get(k) != v}
        if differ:
            raise UserError(f"{self.path} comes from a different run: " + "; ".join(
                f"{k} is {a!r} there but {b!r} here" for k, (a, b) in differ.items())
                + " (other architecture flags, or other latents/tokenizer?)")
        self.restore(ckpt)
        for group, h in zip([g for opt in opts for g in opt.param_groups], hyper):
            group.update(h)
        set_rng_states(ckpt["rng"], env)
        return ckpt

    def read(self) -> dict:
        return load_checkpoint(self.path, "training checkpoint to resume")

    def restore(self, ckpt: dict):
        for name, part in self.state.items():
            part.load_state_dict(ckpt[name])

    def save(self, extras: dict, env, keep: str | None):
        """A collective; the copy `keep` first: after a kill between the two, both are redone."""
        ckpt = {**extras, **{name: part.state_dict() for name, part in self.state.items()}}
        if env.is_main:
            for name in ([keep + ".pt"] if keep else []) + [self.name]:
                save_checkpoint(ckpt, os.path.join(self.dir, name))


class Logger:
    """Prints on rank 0; records to <run_dir>/log.jsonl, TensorBoard (if installed), curves.png."""

    def __init__(self, env: DistEnv, run_dir: str | None = None):
        self.enabled, self.dir, self.drawn, self.tensorboard = env.is_main, run_dir, 0.0, None
        self.path = os.path.join(run_dir, "log.jsonl") if (run_dir and self.enabled) else None
        if self.path and os.path.isfile(self.path):  # a line cut short by a crash or a full disk
            with open(self.path, "rb+") as f:  # would swallow the next record: cut it off
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
                    warnings.warn(f"{self.path}: dropped its last line, cut short by a crash")
        if self.path:
            with contextlib.suppress(ImportError):  # the tensorboard package is optional
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(run_dir)

    def info(self, msg: str):
        if self.enabled:
            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    def log(self, record: dict):
        if not self.path:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        if "event" not in record and self.tensorboard:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tensorboard.add_scalar(k, v, record["step"])
            self.tensorboard.flush()
        if "event" not in record and time.time() - self.drawn > 60:
            self.draw_curves()

    def draw_curves(self):
        if self.path:
            self.drawn = time.time()
            plot_curves(read_log(self.path), os.path.join(self.dir, "curves.png"))


def rng_states(env: DistEnv) -> list[dict]:
    """Every rank's torch RNG state (CPU and this rank's GPU), gathered for a checkpoint."""
    state = {"torch": torch.get_rng_state()}
    if env.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(env.device)
    states = [state] * env.world_size
    if env.distributed:
        dist.all_gather_object(states, state)
    return states


def set_rng_states(states: list[dict], env: DistEnv):
    """Restore this rank's RNG; a rank new to the run gets a new stream (a copy repeats noise)."""
    if env.rank >= len(states):
        saved = torch.Generator().set_state(states[env.rank % len(states)]["torch"])
        torch.manual_seed(int(torch.randint(0, 2 ** 62, (), generator=saved)) + env.rank)
        return
    torch.set_rng_state(states[env.rank]["torch"])
    if "cuda" in states[env.rank] and env.device.type == "cuda":
        torch.cuda.set_rng_state(states[env.rank]["cuda"], env.device)


class StopSignal:
    """SIGTERM and a first Ctrl-C: a flag the loop checks to save and exit; a second one aborts."""

    def __init__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n[rank {os.environ.get('RANK', 0)}] received {signal.Signals(signum).name}: "
              "saving and stopping (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Meter:
    """Values summed on the device (no host sync) until logged, and the first non-finite step."""

    NO_BAD_STEP = 2 ** 62  # above every step, so that the ranks' minimum is the first bad one

    def __init__(self, device: torch.device):
        self.sums, self.steps = {}, 0
        self.first_bad = torch.full((), self.NO_BAD_STEP, dtype=torch.long, device=device)

    def add(self, done: int, values: dict):
        stacked = torch.stack([v.detach().float() for v in values.values()])
        bad = (self.first_bad == self.NO_BAD_STEP) & ~torch.isfinite(stacked).all()
        self.first_bad = torch.where(bad, done, self.first_bad)
        for k, v in values.items():  # a value may be missing in some steps (the GAN's at first)
            s, n = self.sums.get(k, (0.0, 0))
            self.sums[k] = (s + v.detach().float(), n + 1)
        self.steps += 1

    def check(self, env: DistEnv, last_good: str, advice: str):
        """Stop the run on every rank if a value was not finite, before it logs or saves."""
        bad = self.first_bad.clone()
        if env.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        if bad.item() != self.NO_BAD_STEP:
            raise UserError(f"non-finite loss at step {bad.item()}: the run stops, its last good "
                            f"checkpoint is {last_good} (none was written after it). {advice}")

    def means(self, env: DistEnv) -> dict:
        keys = sorted(self.sums)
        means = torch.stack([self.sums[k][0] / self.sums[k][1] for k in keys])
        if env.distributed:
            dist.all_reduce(means)
            means /= env.world_size
        self.sums, self.steps = {}, 0
        return dict(zip(keys, means.tolist()))


def due(every: int, done: int, steps: int) -> bool:
    """Every `every` steps and after the last (every = 0: never)."""
    return bool(every) and (done % every == 0 or done == steps)


# dense bf16 FLOP/s (the first name that the GPU's contains)
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
                   "L40S": 362e12, "B200": 2250e12}


def forward_flops(model, image_tokens: int, text_tokens: int = 0) -> int:
    """One image's forward FLOPs (LightningDiT, or TextToImageDiT): 2 per matmul weight and token it
    sees (conditioning: one token), plus attention's 4 tokens^2 width per block."""
    flops = 0
    for name, m in model.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        tokens = image_tokens + text_tokens  # the joint stream's layers see all tokens
        if "adaLN_modulation" in name or name.startswith(("t_embedder", "text_pool")):
            tokens = 1  # the conditioning
        elif name.startswith("context_embedder") or ".txt." in name:
            tokens = text_tokens
        elif name.startswith(("x_embedder", "final_layer")) or ".img." in name:
            tokens = image_tokens
        flops += 2 * m.weight.numel() * tokens
    return flops + model.depth * 4 * (image_tokens + text_tokens) ** 2 * model.hidden_size


class Run(contextlib.AbstractContextManager):
    """A training run's bookkeeping, which its loop calls: `record`, `log`, `stop_requested`."""

    checkpoint_type = Checkpoint  # fsdp.ShardedRun: a sharded one

    def __init__(self, env, args, run_dir: str, identity: dict, state: dict, meta: dict = None,
                 skipped=None, nan_advice: str = "", show=("loss", "img_per_s"),
                 flops_per_image: float | None = None):
        self.env, self.args, self.meta, self.show = env, args, meta or {}, show
        self.skipped, self.nan_advice = skipped or (lambda: 0), nan_advice
        gpu = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else ""
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), 0) * env.world_size
        mfu = peak and flops_per_image and use_bf16(args.precision, env.device)  # known GPU, bf16
        self.mfu_scale = flops_per_image / peak if mfu else None  # MFU = images/s x this
        self.checkpoint = self.checkpoint_type(env, args, run_dir, identity, state)
        self.logger, self.meter, self.stop = Logger(env, run_dir), Meter(env.device), StopSignal()
        self.pbar = tqdm(total=args.steps, disable=not env.is_main, dynamic_ncols=True)
        self.stopped, self.t0, self.first_step = False, time.time(), True
        self.about = {"args": vars(args), **{k: v for k, v in self.meta.items() if isinstance(
            v, (str, int, float, bool))}}  # the log's start and resume records
        if not args.resume:
            self.logger.log({"event": "start", "step": 0, **self.about})

    def resume(self) -> int:
        ckpt = self.checkpoint.load(self.env)
        self.logger.info(f"resumed at step {ckpt['step']} from {self.checkpoint.path} (saved on "
                         f"{len(ckpt['rng'])} ranks)")
        self.logger.log({"event": "resume", "step": ckpt["step"], **self.about})
        self.pbar.update(ckpt["step"])
        self.t0 = time.time()
        return ckpt["step"]

    def record(self, done: int, **values: torch.Tensor):
        self.meter.add(done, values)
        self.pbar.update(1)
        if self.first_step:  # one host sync, once: the first step includes torch.compile's work
            self.first_step = False
            self.meter.first_bad.item()  # a host sync: waits for the step's kernels
            self.logger.info(f"first step: {time.time() - self.t0:.1f} s")

    def log(self, done: int, **extras):
        """The recorded values' means over steps and ranks, images/s, MFU and `extras`."""
        self.meter.check(self.env, self.checkpoint.path, self.nan_advice)
        img_s = self.meter.steps * self.args.batch_size / (time.time() - self.t0)
        record = {"step": done, **self.meter.means(self.env), "img_per_s": img_s, **extras}
        if self.mfu_scale:
            record["mfu"] = img_s * self.mfu_scale
        skipped = self.skipped()
        self.logger.log({**record, "skipped_files": skipped} if skipped else record)
        self.pbar.set_postfix_str(" ".join(f"{k} {record[k]:.4g}" for k in self.show
                                           if k in record))
        self.t0 = time.time()

    def stop_requested(self, done: int) -> bool:
        """Ranks agree every 10 steps (torchrun kills its workers 30 s after a SIGTERM)."""
        if not self.env.distributed:
            self.stopped = self.stop.requested
        elif done % 10 == 0:  # true on every rank if asked on any
            flag = torch.tensor(float(self.stop.requested), device=self.env.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.stopped = bool(flag.item())
        return self.stopped

    def save(self, done: int):
        self.meter.check(self.env, self.checkpoint.path, self.nan_advice)
        keep = self.args.keep_every and done % self.args.keep_every == 0
        self.checkpoint.save({**self.checkpoint.identity, "step": done, **self.meta,
                              "rng": rng_states(self.env), "args": vars(self.args)},
                             self.env, f"ckpt_{done:07d}" if keep else None)
        if self.stopped:
            self.logger.info(f"stopped at step {done}; continue with --resume")

    def __exit__(self, exc_type, *exc):
        self.pbar.close()
        self.stop.restore()
        if exc_type is None:
            if (skipped := self.skipped()):  # a collective: every rank calls it
                self.logger.info(f"{skipped} unusable samples were skipped (see the warnings)")
            self.logger.draw_curves()
            self.env.barrier()


def read_log(path: str) -> list[dict]:
    """A log.jsonl's step records, the latest of each step; a damaged line is skipped, said."""
    by_step = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            try:
                r = json.loads(line)
            except ValueError:
                warnings.warn(f"{path}: line {number} is damaged (an interrupted write?); skipped")
                continue
            if r.get("event") in ("start", "resume"):  # the steps after r["step"] run again
                by_step = {s: rec for s, rec in by_step.items() if s <= r["step"]}
            elif "step" in r and "event" not in r:
                by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def plot_curves(records: list[dict], path: str, x: str = "step", width=300, height=170):
    """A PNG of every logged number against `x` (records sorted by it), one small panel each."""
    keys = list(dict.fromkeys(k for r in records for k, v in r.items()
                              if k not in ("time", x, "epoch") and isinstance(v, (int, float))))
    cols = min(3, max(1, len(keys)))
    canvas = Image.new("RGB", (cols * width, max(1, -(-len(keys) // cols)) * height), "white")
    draw, grey = ImageDraw.Draw(canvas), (90, 90, 90)
    for i, key in enumerate(keys):
        points = [(r[x], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        x0, y0, w, h = (i % cols) * width + 45, (i // cols) * height + 20, width - 60, height - 45
        lo, hi = min(v for _, v in points), max(v for _, v in points)
        s_lo, s_hi = points[0][0], max(points[-1][0], points[0][0] + 1)
        xy = [(x0 + w * (s - s_lo) / (s_hi - s_lo), y0 + h * (1 - (v - lo) / ((hi - lo) or 1)))
              for s, v in points]
        draw.rectangle([x0, y0, x0 + w, y0 + h], outline=(180, 180, 180))
        draw.line(xy if len(xy) > 1 else xy * 2, fill=(30, 90, 200), width=2)
        draw.text((x0, y0 - 15), key, fill="black")
        draw.text((x0 - 42, y0 - 4), f"{hi:.3g}", fill=grey)
        draw.text((x0 - 42, y0 + h - 8), f"{lo:.3g}", fill=grey)
        draw.text((x0, y0 + h + 3), f"{x} {s_lo}", fill=grey)
        draw.text((x0 + w - 60, y0 + h + 3), f"{points[-1][0]}", fill=grey)
    atomic_write(path, lambda f: canvas.save(f, format="PNG"))
