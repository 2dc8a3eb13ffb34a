"""The plumbing every script shares, written once so that the other files can be about the method.

- torchrun/DDP set-up and shutdown, per-rank seeding, bf16 autocast;
- `Run`: the training-run harness of every trainer (train_tokenizer.py, train_dit.py, train_t2i.py):
  refuse to overwrite a run, exact resume, log and checkpoint cadence, graceful stop on SIGTERM/Ctrl-C,
  a guard against non-finite losses, rank-0 logging to the console and to `log.jsonl`;
- atomic writes (temporary file, then rename), safe checkpoint loading, pretrained weight files;
- the EMA of the weights; `UserError` and `script_main`: bad input is one clear line, not a traceback.
"""

import argparse
import copy
import glob
import json
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

import flops

EXIT_STOPPED = 75  # a run stopped by SIGTERM/Ctrl-C after saving (sysexits' EX_TEMPFAIL: "try again")


class UserError(Exception):
    """Bad input, or a run that cannot go on: the message names the problem and the fix, so scripts
    print it alone (once, on rank 0) and exit with status 2 instead of showing a traceback."""


class MissingWeightsError(UserError):
    """A pretrained weight file that is neither given, cached nor downloadable."""


def script_main(main):
    """Run a script's `main()`: a UserError becomes one line on stderr and exit status 2; a training run
    stopped by a signal exits with EXIT_STOPPED, so that `train && sample` does not go on."""
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"  # no source line
    try:
        result = main()
    except UserError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # no barrier: another rank may never get there
        sys.exit(2)
    sys.exit(EXIT_STOPPED if isinstance(result, Run) and result.stopped else 0)


# ----------------------------------------------------------------------------------------------------
# Command lines


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Module docstring kept as written, and every flag's default shown in --help."""


def at_least(minimum, kind=int):
    """An argparse type for numbers >= `minimum`: `--batch_size 0` fails when it is parsed, naming the
    flag, instead of after the first step."""
    def parse(text):
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def add_optimisation_args(p, steps: int, steps_help: str, batch_size: int, lr: float, betas, ema_decay: float,
                          optimiser: str = "AdamW", grad_clip: float | None = None):
    """The optimisation flags every trainer has, with its defaults (constant lr; AdamW: weight decay too)."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=at_least(1), default=steps, help=steps_help)
    g.add_argument("--batch_size", type=at_least(1), default=batch_size, help="global batch size (split over ranks)")
    g.add_argument("--lr", type=float, default=lr, help=f"{optimiser} learning rate (constant)")
    g.add_argument("--betas", type=float, nargs=2, default=betas, help=f"{optimiser} betas")
    if optimiser == "AdamW":
        g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--ema_decay", type=float, default=ema_decay, help="EMA of the weights (exported, or sampled)")
    if grad_clip is not None:
        g.add_argument("--grad_clip", type=float, default=grad_clip, help="max gradient norm (0: no clipping)")
    return g


def add_runtime_args(p, num_workers: int, log_every: int, ckpt_every: int, grid_every: int, grids: str):
    """The flags every trainer shares: device and precision, data loading, seed, log/checkpoint/grid cadence."""
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto: CUDA if present")
    g.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 autocast on CUDA, float32 on the CPU")
    add_compile_arg(g)
    g.add_argument("--num_workers", type=at_least(0), default=num_workers, help="data loading processes per rank")
    g.add_argument("--seed", type=int, default=0, help="seeds the weights, noise and data order")
    g.add_argument("--log_every", type=at_least(1), default=log_every, help="steps between log lines")
    g.add_argument("--ckpt_every", type=at_least(1), default=ckpt_every, help="steps between checkpoints")
    g.add_argument("--keep_every", type=at_least(0), default=0, help="also keep ckpt_<step>.pt every N steps (0: never)")
    g.add_argument("--grid_every", type=at_least(0), default=grid_every, help=f"steps between {grids} (0: never)")
    return g


def add_compile_arg(p):
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="torch.compile the networks (auto: on CUDA, where it pays; the CPU stays eager)")


def use_compile(flag: str, device: torch.device) -> bool:
    return flag == "on" or (flag == "auto" and device.type == "cuda")


def check_writable(path: str, what: str):
    """Fail now, not after hours of work, if `path` (a file to be written) cannot be created."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write_test{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write the {what} {path}: {e.strerror}") from None


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
        """The mean of a tensor over ranks (a new tensor)."""
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
    """Join the `torchrun` process group (NCCL on CUDA, gloo on CPU); `device` is auto, cuda or cpu."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    use_cuda = torch.cuda.is_available() and device != "cpu"
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
        # TF32 for the float32 parts (losses, norms); fid.py keeps its features in true float32 itself.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistEnv(rank, local_rank, world_size, dev)


def cleanup_distributed():
    """Leave the process group. Call it after every DDP module is gone: destroying the group under a
    live DDP module, or exiting without destroying it, aborts the processes at exit."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int, rank: int = 0):
    """Each rank its own stream (seed + rank), so noise and timesteps differ across GPUs; the data
    order is seeded separately (data.py) and is shared."""
    torch.manual_seed(seed + rank)


def use_bf16(precision: str, device: torch.device) -> bool:
    """--precision auto is bf16 on CUDA and float32 on the CPU (where bf16 is slow); bf16 on the CPU
    is allowed so that tests cover that path."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def wrap_ddp(module: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """DistributedDataParallel under torchrun (gradients all-reduced in backward), else the module."""
    if not env.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(module, device_ids=[env.local_rank] if env.device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module behind DDP and/or torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# ----------------------------------------------------------------------------------------------------
# Files: atomic writes, checkpoints, pretrained weights


def atomic_write(path: str, write):
    """`write(f)` to a temporary file beside `path`, synced, then renamed over it: a crash or a full disk never
    leaves a half-written file. Temporary files of an earlier, killed writer of `path` are removed first."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    for stale in glob.glob(os.path.join(folder, f".{glob.escape(name)}.tmp*")):
        os.remove(stale)
    tmp = os.path.join(folder, f".{name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
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
        raise UserError(f"could not read the {what} {path} ({e}); delete it if it is damaged") from None


def load_checkpoint(path: str, what: str = "checkpoint"):
    """torch.load on the CPU with weights_only=True: tensors and plain containers only, never code."""
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or a pickle of foreign objects
        text = str(e)
        if "Unsupported global" in text:  # name the object, without PyTorch's advice to allow it
            why = "it holds a " + text.split("Unsupported global: GLOBAL ")[1].split(" ")[0] + " object, not only tensors"
        else:
            why = f"{type(e).__name__}: {text.splitlines()[0].split('. ')[0] if text else ''}"
        raise UserError(f"could not read {what} {path} ({why}). Is it a complete file written by this project "
                        "(or the official weights)?") from None


def pretrained_file(url: str, local_path: str | None, what: str, flag: str, random_flag: str = "") -> str:
    """Path of a pretrained weight file: `local_path` if given, else the torch.hub cache
    (`$TORCH_HOME/hub/checkpoints/<name>`), else downloaded there from `url`, with a progress bar.
    Offline with no file, the error names the file, where to put it, and the flags that help."""
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
            + (f"\n  For a test or a demo only, {random_flag} runs with random weights instead." if random_flag else "")
        ) from None


# ----------------------------------------------------------------------------------------------------
# EMA of the weights


class EMA:
    """Exponential moving average of a model's trainable weights, kept as a frozen copy of the model:
    ema <- decay * ema + (1 - decay) * weights after every step. It is what we evaluate and export
    (smoother than the raw weights late in training). Frozen parameters stay as they were copied."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._names = [n for n, p in model.named_parameters() if p.requires_grad]
        ema_params = dict(self.model.named_parameters())
        self._ema = [ema_params[n] for n in self._names]

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        params = dict(model.named_parameters())
        # One fused kernel for all tensors: ema += (1 - decay) * (param - ema).
        torch._foreach_lerp_(self._ema, [params[n].detach() for n in self._names], 1.0 - self.decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------
# The training-run harness


class Logger:
    """Prints on rank 0 (through tqdm, so progress bars stay intact) and appends one JSON object per
    `log()` call to `<run_dir>/log.jsonl`; step records also go to TensorBoard when it is installed."""

    def __init__(self, env: DistEnv, run_dir: str | None = None):
        self.enabled = env.is_main
        self.path = os.path.join(run_dir, "log.jsonl") if (run_dir and self.enabled) else None
        self.tensorboard = None
        if self.path:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(run_dir)
            except ImportError:  # the tensorboard package is optional
                pass

    def info(self, msg: str):
        if self.enabled:
            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    def log(self, record: dict):
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        if self.tensorboard and "step" in record and "event" not in record:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tensorboard.add_scalar(k, v, record["step"])
            self.tensorboard.flush()


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
    """Restore this rank's RNG state. A rank the checkpoint did not have (resumed on more ranks) gets a seed
    drawn from a saved state and its rank: a copy of another rank's would repeat that rank's noise."""
    if env.rank < len(states):
        torch.set_rng_state(states[env.rank]["torch"])
        if "cuda" in states[env.rank] and env.device.type == "cuda":
            torch.cuda.set_rng_state(states[env.rank]["cuda"], env.device)
        return
    saved = torch.Generator().set_state(states[env.rank % len(states)]["torch"])
    torch.manual_seed(int(torch.randint(0, 2 ** 62, (), generator=saved)) + env.rank)


class NonFiniteGuard:
    """Remembers on the device the first step with a non-finite loss: `update` needs no host sync;
    `check`, before anything is logged or saved, stops the run, so no checkpoint is written after it."""

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, values: torch.Tensor, step: int):
        bad = (self.first_bad < 0) & ~torch.isfinite(values.detach()).all()
        self.first_bad = torch.where(bad, step, self.first_bad)

    def check(self, env: DistEnv, ckpt_path: str, advice: str):
        bad = self.first_bad.clone()
        if env.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() >= 0:
            raise UserError(f"non-finite loss at step {bad.item()}: the run is stopped and no checkpoint was "
                            f"written after it; the last good one is {ckpt_path}. {advice}")


class StopSignal:
    """SIGTERM (pre-emption, `kill`) and a first Ctrl-C become a flag the loop checks between steps,
    so that it saves and exits cleanly; a second Ctrl-C aborts at once."""

    def __init__(self, every: int = 10):
        self.requested, self.every = False, every
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def should_stop(self, env: DistEnv, step: int) -> bool:
        """Under DDP all ranks must agree, which is a host sync, so they compare flags every `every`
        steps (not only at log steps: torchrun kills its workers 30 s after forwarding a SIGTERM)."""
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
        print(f"\n[rank {os.environ.get('RANK', 0)}] received {signal.Signals(signum).name}: saving a checkpoint "
              "and stopping (Ctrl-C again to abort)", file=sys.stderr, flush=True)


class Run:
    """The bookkeeping of one training run, called explicitly by the trainer's loop (nanoGPT-style):

        with Run(env, args, run_dir, identity, state, ...) as run:
            start = run.resume() if args.resume else 0
            for step in range(start, args.steps):
                ...                                    # batch, loss, backward, optimiser step, EMA
                run.record(loss=loss, **parts)         # device values: summed, NaN-watched, no host sync
                done = step + 1
                if run.due(args.log_every, done):
                    run.log(done, lr=...)              # means over ranks -> console, log.jsonl, TensorBoard
                stop = run.stop_requested(done)        # SIGTERM/Ctrl-C, agreed by all ranks
                if run.due(args.ckpt_every, done) or stop:
                    run.save(done)                     # ckpt.pt (+ ckpt_<step>.pt every --keep_every)
                if stop:
                    break

    `identity` (e.g. kind, stage, architecture) goes into every checkpoint and must match on
    `--resume`; `state` maps names to the parts with a state dict (models, EMA, optimisers, data
    position), which a checkpoint saves with every rank's RNG and `resume` restores exactly. `log` and
    `save` refuse to go past a non-finite recorded value. Leaving the `with` block closes the progress
    bar and the signal handlers and, after a run that was not interrupted by an error, draws the
    curves. `stopped` is True after a SIGTERM/Ctrl-C stop (script_main then exits with EXIT_STOPPED).
    """

    def __init__(self, env, args, run_dir: str, identity: dict, state: dict, meta: dict | None = None,
                 batch_size: int = 1, skipped=None, nan_advice: str = "", show=("loss",),
                 flops_per_image: int | None = None):
        self.env, self.args, self.dir, self.total = env, args, run_dir, args.steps
        self.identity, self.state, self.meta = identity, state, meta or {}
        self.batch_size, self.flops_per_image = batch_size, flops_per_image
        self.skipped = skipped or (lambda: 0)  # unreadable files so far (a collective)
        self.nan_advice, self.show = nan_advice, show
        self.ckpt_path = os.path.join(run_dir, "ckpt.pt")
        if not args.resume and os.path.exists(self.ckpt_path):
            raise UserError(f"{self.ckpt_path} exists: pass --resume to continue that run, or use "
                            "another --run_dir (we do not overwrite training progress)")
        if args.keep_every % args.ckpt_every:
            raise UserError(f"--keep_every {args.keep_every} must be a multiple of --ckpt_every "
                            f"{args.ckpt_every} (kept checkpoints are copies of saved ones)")
        if env.is_main:
            check_writable(self.ckpt_path, "checkpoint")
        env.barrier()
        self.logger = Logger(env, run_dir)
        self.guard = NonFiniteGuard(env.device)
        self.stop = StopSignal()  # from here on, SIGTERM/Ctrl-C mean "save and stop"
        self.stopped, self._sums, self._drawn, self._first = False, {}, 0.0, True
        self.pbar = tqdm(total=self.total, disable=not env.is_main, dynamic_ncols=True)
        self._t0, self._n = time.time(), 0
        if not args.resume:
            self._log_event("start", 0)

    def info(self, msg: str):
        self.logger.info(msg)

    def resume(self) -> int:
        """Restore every part and every rank's RNG from ckpt.pt; returns the step to continue from.
        The optimisers keep this run's lr, betas and weight decay, so that `--resume --lr 1e-5` after
        a loss spike does lower the lr."""
        ckpt = load_checkpoint(self.ckpt_path, "training checkpoint to resume")
        differ = {k: (ckpt.get(k), v) for k, v in self.identity.items() if ckpt.get(k) != v}
        if differ:
            raise UserError(f"{self.ckpt_path} comes from a different run: "
                            + "; ".join(f"{k} is {a!r} there but {b!r} here" for k, (a, b) in differ.items())
                            + " (other architecture flags, or other latents/tokenizer?)")
        for name, part in self.state.items():
            if isinstance(part, torch.optim.Optimizer):
                hyper = [{k: g[k] for k in ("lr", "betas", "weight_decay") if k in g}
                         for g in part.param_groups]
                part.load_state_dict(ckpt[name])
                for group, h in zip(part.param_groups, hyper):
                    group.update(h)
            else:
                part.load_state_dict(ckpt[name])
        set_rng_states(ckpt["rng"], self.env)
        self.info(f"resumed at step {ckpt['step']} from {self.ckpt_path}")
        # A resumed run re-runs the steps after its checkpoint: its records replace the earlier
        # records of those steps (`read_log` keeps the last).
        self._log_event("resume", ckpt["step"])
        self.pbar.update(ckpt["step"])
        return ckpt["step"]

    def record(self, **values: torch.Tensor):
        """This step's scalar device tensors: summed on the device for the next log line (no host sync)
        and watched for NaN/inf. A value may be missing in some steps (GAN terms before the GAN)."""
        step = self.pbar.n + 1
        self.guard.update(torch.stack([v.detach().float() for v in values.values()]), step)
        for k, v in values.items():
            s, n = self._sums.get(k, (0.0, 0))
            self._sums[k] = (s + v.detach().float(), n + 1)
        self._n += 1
        self.pbar.update(1)
        if self._first:  # one host sync, once: the first step includes torch.compile's work
            self._first = False
            if self.env.device.type == "cuda":
                torch.cuda.synchronize(self.env.device)
            compiled = use_compile(getattr(self.args, "compile", "off"), self.env.device)
            self.info(f"first step: {time.time() - self._t0:.1f} s"
                      + (" (compiling included)" if compiled else ""))

    def due(self, every: int, done: int) -> bool:
        """True after every `every` steps and after the last step (0: never)."""
        return bool(every) and (done % every == 0 or done == self.total)

    def log(self, done: int, **extras):
        """The means over the ranks of the values recorded since the last line, images/s, MFU where
        the GPU's peak is known, and `extras`: to log.jsonl, TensorBoard and the progress bar."""
        self.guard.check(self.env, self.ckpt_path, self.nan_advice)  # never log past a NaN
        img_s = self._n * self.batch_size / (time.time() - self._t0)
        keys = sorted(self._sums)
        means = torch.stack([self._sums[k][0] / self._sums[k][1] for k in keys])
        record = {"step": done, **dict(zip(keys, self.env.all_reduce_mean(means).tolist())),
                  "img_per_s": img_s, **extras}
        if self.flops_per_image and use_bf16(self.args.precision, self.env.device):  # a bf16 peak
            mfu = flops.mfu(img_s, self.flops_per_image, self.env.device, self.env.world_size)
            record.update({"mfu": mfu} if mfu else {})
        skipped = self.skipped()
        self.logger.log({**record, "skipped_files": skipped} if skipped else record)
        self.pbar.set_postfix_str(" ".join(f"{k} {record[k]:.4g}" for k in self.show if k in record))
        self._sums, self._t0, self._n = {}, time.time(), 0
        if self.logger.path and time.time() - self._drawn > 60:  # redrawn at most once a minute
            self._draw_curves()

    def stop_requested(self, done: int) -> bool:
        """Whether a SIGTERM/Ctrl-C asks to save and stop. Under DDP all ranks must agree, which is
        a host sync, so they compare flags every 10 steps (torchrun kills its workers 30 s after
        forwarding a SIGTERM)."""
        self.stopped = self.stop.should_stop(self.env, done)
        return self.stopped

    def save(self, done: int):
        """Every state dict and every rank's RNG: all a resume needs; also kept as ckpt_<step>.pt
        every --keep_every steps. A collective: all ranks call it."""
        self.guard.check(self.env, self.ckpt_path, self.nan_advice)  # never save past a NaN
        rng = rng_states(self.env)
        state = {name: part.state_dict() for name, part in self.state.items()}  # some gather
        if self.env.is_main:
            ckpt = {**self.identity, "step": done, **self.meta, **state, "rng": rng,
                    "args": vars(self.args)}
            save_checkpoint(ckpt, self.ckpt_path)
            keep = self.args.keep_every
            if keep and done % keep == 0:
                save_checkpoint(ckpt, os.path.join(self.dir, f"ckpt_{done:07d}.pt"))
        if self.stopped:
            self.info(f"stopped at step {done}; continue with --resume")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.pbar.close()
        self.stop.restore()
        if exc_type is None:
            skipped = self.skipped()
            if skipped:
                self.info(f"{skipped} unreadable image files were skipped (see the warnings above)")
            if self.logger.path:
                self._draw_curves()
            self.env.barrier()

    def _log_event(self, event: str, step: int):
        args = self.args
        self.logger.log({"event": event, "step": step, "args": vars(args), **{
            k: v for k, v in self.meta.items() if isinstance(v, (str, int, float, bool, type(None)))}})

    def _draw_curves(self):
        self._drawn = time.time()
        plot_curves(read_log(self.logger.path), os.path.join(self.dir, "curves.png"))


def read_log(path: str) -> list[dict]:
    """The step records of a log.jsonl, one per step: a resumed run's re-run steps replace the old ones."""
    by_step = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("event") == "resume":
                by_step = {s: rec for s, rec in by_step.items() if s <= r["step"]}
            elif "step" in r and "event" not in r:
                by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def plot_curves(records: list[dict], path: str, width: int = 300, height: int = 170):
    """A PNG of every logged number over the steps, one small panel each (losses, lr, images/s)."""
    keys = list(dict.fromkeys(k for r in records for k, v in r.items()
                              if k not in ("time", "step", "epoch") and isinstance(v, (int, float))))
    cols = min(3, max(1, len(keys)))
    canvas = Image.new("RGB", (cols * width, max(1, -(-len(keys) // cols)) * height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, key in enumerate(keys):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        x0, y0 = (i % cols) * width + 45, (i // cols) * height + 20  # the panel's plot area: (x0, y0) + w x h
        w, h = width - 60, height - 45
        lo, hi = min(v for _, v in points), max(v for _, v in points)
        s_lo, s_hi = points[0][0], max(points[-1][0], points[0][0] + 1)
        xy = [(x0 + w * (s - s_lo) / (s_hi - s_lo), y0 + h * (1 - (v - lo) / ((hi - lo) or 1))) for s, v in points]
        draw.rectangle([x0, y0, x0 + w, y0 + h], outline=(180, 180, 180))
        draw.line(xy if len(xy) > 1 else xy * 2, fill=(30, 90, 200), width=2)
        draw.text((x0, y0 - 15), key, fill="black")
        draw.text((x0 - 42, y0 - 4), f"{hi:.3g}", fill=(90, 90, 90))
        draw.text((x0 - 42, y0 + h - 8), f"{lo:.3g}", fill=(90, 90, 90))
        draw.text((x0, y0 + h + 3), f"step {s_lo}", fill=(90, 90, 90))
        draw.text((x0 + w - 60, y0 + h + 3), f"{points[-1][0]}", fill=(90, 90, 90))
    atomic_write(path, lambda f: canvas.save(f, format="PNG"))
