"""The plumbing every script shares, written once so that the other files can be about the method.

- torchrun/DDP set-up and shutdown, per-rank seeding, bf16 autocast;
- `Run`: the training-run harness of every trainer (train_tokenizer.py, train_dit.py, train_t2i.py):
  refuse to overwrite a run, exact resume, log and checkpoint cadence, graceful stop on SIGTERM/Ctrl-C,
  a guard against non-finite losses, rank-0 logging to the console and to `log.jsonl`;
- atomic writes (temporary file, then rename), safe checkpoint loading;
- the EMA of the weights; `UserError` and `script_main`: bad input is one clear line, not a traceback.
"""

import argparse
import copy
import glob
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

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
    """An argparse type for numbers >= `minimum`: `--batch_size 0` fails when it is parsed."""
    return in_range(minimum, math.inf, kind)


def in_range(lo, hi, kind=float, lo_open=False, hi_open=False):
    """An argparse type for finite numbers in [lo, hi] (an end left out if *_open): `--ema_decay 2`
    or `--lr nan` fails when it is parsed, not as NaN weights in a checkpoint hours later."""
    bounds = (f"> {lo}" if lo_open else f"at least {lo}") if hi == math.inf else \
        f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"

    def parse(text):
        value = kind(text)
        if not (math.isfinite(value) and (value > lo if lo_open else value >= lo)
                and (value < hi if hi_open else value <= hi)):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def add_optimisation_args(p, steps: int, steps_help: str, batch_size: int, lr: float, betas, ema_decay: float,
                          optimiser: str = "AdamW", grad_clip: float | None = None):
    """The optimisation flags every trainer has, with its defaults (constant lr; AdamW: weight decay too)."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=at_least(1), default=steps, help=steps_help)
    g.add_argument("--batch_size", type=at_least(1), default=batch_size, help="global batch size (split over ranks)")
    g.add_argument("--lr", type=in_range(0, math.inf, lo_open=True), default=lr,
                   help=f"{optimiser} learning rate (constant)")
    g.add_argument("--betas", type=in_range(0, 1, hi_open=True), nargs=2, default=betas,
                   help=f"{optimiser} betas")
    if optimiser == "AdamW":
        g.add_argument("--weight_decay", type=at_least(0.0, float), default=0.0,
                       help="AdamW weight decay")
    g.add_argument("--ema_decay", type=in_range(0, 1, hi_open=True), default=ema_decay,
                   help="EMA of the weights (exported, or sampled)")
    if grad_clip is not None:
        g.add_argument("--grad_clip", type=at_least(0.0, float), default=grad_clip,
                       help="max gradient norm (0: no clipping)")
    return g


def add_runtime_args(p, num_workers: int, log_every: int, ckpt_every: int, grid_every: int, grids: str):
    """The flags every trainer shares: device and precision, data loading, seed, log/checkpoint/grid cadence."""
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto: CUDA if present")
    g.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 autocast on CUDA, float32 on the CPU")
    add_compile_arg(g)
    g.add_argument("--num_workers", type=at_least(0), default=num_workers, help="data loading processes per rank")
    g.add_argument("--seed", type=at_least(0), default=0,
                   help="seeds the weights, noise and data order")
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
# Files: atomic writes, checkpoints


def atomic_write(path: str, write):
    """`write(f)` to a temporary file beside `path`, synced, then renamed over it: a crash or a full disk never
    leaves a half-written file. Temporary files of an earlier, killed writer of `path` are removed
    first. A failed write (a full disk, a read-only folder) is a UserError; the old file stays."""
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
        if self.path and os.path.isfile(self.path):  # a line cut short by a crash or a full disk
            with open(self.path, "rb+") as f:  # would be continued by the next record, lost with it
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
                    warnings.warn(f"{self.path}: dropped its last line, cut short by a crash")
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
    """One training run: `for step in run.steps(): ...; run.record(loss=..., **parts)`.

    `identity` (e.g. kind, stage, architecture) goes into every checkpoint and must match on `--resume`;
    `state` maps names to the parts with a state dict (models, EMA, optimisers, data position), which a
    checkpoint saves with every rank's RNG and a resume restores exactly. Between steps the harness logs
    means of the recorded values every `log_every` steps, calls the hooks, saves `ckpt.pt` every
    `ckpt_every` steps and at the end, stops cleanly on SIGTERM/Ctrl-C (`stopped` is then True), and
    refuses to log or save past a non-finite value."""

    def __init__(self, env, args, run_dir: str, identity: dict, state: dict, meta: dict | None = None,
                 steps: int = 1, batch_size: int = 1, skipped=None, nan_advice: str = "", show=("loss",)):
        self.env, self.args, self.dir, self.total = env, args, run_dir, steps
        self.identity, self.state, self.meta, self.batch_size = identity, state, meta or {}, batch_size
        self.skipped = skipped or (lambda: 0)  # unreadable files so far (data.count_skipped: a collective)
        self.nan_advice, self.show = nan_advice, show
        self.ckpt_path = os.path.join(run_dir, "ckpt.pt")
        if not args.resume and os.path.exists(self.ckpt_path):
            raise UserError(f"{self.ckpt_path} exists: pass --resume to continue that run, or use another "
                            "--run_dir (we do not overwrite training progress)")
        if env.is_main:
            check_writable(self.ckpt_path, "checkpoint")
        env.barrier()
        self.log = Logger(env, run_dir)
        self.hooks, self.extras, self.stopped, self._drawn = [], None, False, 0.0
        self.guard = NonFiniteGuard(env.device)
        self.start = self._resume() if args.resume else 0
        self.stop = StopSignal()  # from here on, SIGTERM/Ctrl-C mean "save and stop"
        # A resumed run re-runs the steps after its checkpoint: records after this one replace earlier
        # records of the same steps (`read_log` keeps the last).
        self.log.log({"event": "resume" if args.resume else "start", "step": self.start, "args": vars(args),
                      **{k: v for k, v in self.meta.items() if isinstance(v, (str, int, float, bool, type(None)))}})

    def _resume(self) -> int:
        ckpt = load_checkpoint(self.ckpt_path, "training checkpoint to resume")
        differ = {k: (ckpt.get(k), v) for k, v in self.identity.items() if ckpt.get(k) != v}
        if differ:
            raise UserError(f"{self.ckpt_path} comes from a different run: "
                            + "; ".join(f"{k} is {a!r} there but {b!r} here" for k, (a, b) in differ.items())
                            + " (other architecture flags, or other latents/tokenizer?)")
        for name, part in self.state.items():
            if isinstance(part, torch.optim.Optimizer):  # moments and step counts, but this run's lr etc.,
                hyper = [{k: g[k] for k in ("lr", "betas", "weight_decay") if k in g} for g in part.param_groups]
                part.load_state_dict(ckpt[name])  # so that `--resume --lr 1e-5` after a spike does lower it
                for group, h in zip(part.param_groups, hyper):
                    group.update(h)
            else:
                part.load_state_dict(ckpt[name])
        set_rng_states(ckpt["rng"], self.env)
        self.log.info(f"resumed at step {ckpt['step']} from {self.ckpt_path}")
        return ckpt["step"]

    def every(self, interval: int, fn):
        """Call fn(step) on rank 0 after every `interval` steps and after the last (0: never)."""
        if interval:
            self.hooks.append((interval, fn))

    def record(self, **values: torch.Tensor):
        """Scalar device tensors of this step: summed on the device for the next log line (no host sync)
        and watched for NaN/inf. A value may be missing in some steps (GAN terms before the GAN starts)."""
        self.guard.update(torch.stack([v.detach().float() for v in values.values()]), self.step + 1)
        for k, v in values.items():
            s, n = self._sums.get(k, (0.0, 0))
            self._sums[k] = (s + v.detach().float(), n + 1)

    def save(self, step: int, path: str | None = None):
        """Every state dict and every rank's RNG: all a resume needs. A collective: all ranks call it."""
        rng = rng_states(self.env)
        state = {name: part.state_dict() for name, part in self.state.items()}  # on every rank: some gather
        if self.env.is_main:
            save_checkpoint({**self.identity, "step": step, **self.meta, **state, "rng": rng,
                             "args": vars(self.args)}, path or self.ckpt_path)

    def steps(self):
        """Yield the steps still to run; after each, the bookkeeping between steps."""
        keep = self.args.keep_every
        pbar = tqdm(total=self.total, initial=self.start, disable=not self.env.is_main, dynamic_ncols=True)
        self._sums, t0, n = {}, time.time(), 0
        try:
            for self.step in range(self.start, self.total):
                yield self.step
                done, n = self.step + 1, n + 1
                pbar.update(1)
                if done == self.start + 1:  # one host sync, once: the first step includes torch.compile's work
                    if self.env.device.type == "cuda":
                        torch.cuda.synchronize(self.env.device)
                    compiled = use_compile(getattr(self.args, "compile", "off"), self.env.device)
                    self.log.info(f"first step: {time.time() - t0:.1f} s" + (" (compiling included)" if compiled else ""))
                due = lambda every: every and (done % every == 0 or done == self.total)  # noqa: E731
                is_log, is_ckpt = due(self.args.log_every), due(self.args.ckpt_every)
                is_keep = keep and done % keep == 0
                self.stopped = self.stop.should_stop(self.env, done)
                if is_log or is_ckpt or is_keep or self.stopped:  # never log or save past a NaN
                    self.guard.check(self.env, self.ckpt_path, self.nan_advice)
                if is_log:
                    record = self._log_record(done, n * self.batch_size / (time.time() - t0))
                    pbar.set_postfix_str(" ".join(f"{k} {record[k]:.4g}" for k in self.show if k in record))
                    self._sums, t0, n = {}, time.time(), 0
                for interval, fn in self.hooks:
                    if self.env.is_main and due(interval):
                        fn(done)
                if is_ckpt or self.stopped:
                    self.save(done)
                if is_keep:
                    self.save(done, os.path.join(self.dir, f"ckpt_{done:07d}.pt"))
                if self.stopped:
                    self.log.info(f"stopped at step {done}; continue with --resume")
                    break
        finally:
            pbar.close()
            self.stop.restore()
        skipped = self.skipped()
        if skipped:
            self.log.info(f"{skipped} unusable samples were skipped (see the warnings above)")
        if self.log.path:
            self._draw_curves()
        self.env.barrier()

    def _log_record(self, step: int, img_per_s: float) -> dict:
        keys = sorted(self._sums)
        means = torch.stack([self._sums[k][0] / self._sums[k][1] for k in keys])
        record = {"step": step, **dict(zip(keys, self.env.all_reduce_mean(means).tolist())), "img_per_s": img_per_s,
                  **(self.extras(step, img_per_s) if self.extras else {})}
        skipped = self.skipped()
        self.log.log({**record, "skipped_files": skipped} if skipped else record)
        if self.log.path and time.time() - self._drawn > 60:  # the curves, redrawn at most once a minute
            self._draw_curves()
        return record

    def _draw_curves(self):
        self._drawn = time.time()
        from data import plot_curves  # data.py imports this module
        plot_curves(read_log(self.log.path), os.path.join(self.dir, "curves.png"))


def read_log(path: str) -> list[dict]:
    """The step records of a log.jsonl, one per step: a resumed run's re-run steps replace the old
    ones. A damaged line (a crash or a full disk during an append) is skipped with a warning."""
    by_step = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            try:
                r = json.loads(line)
            except ValueError:
                warnings.warn(f"{path}: line {number} is damaged (an interrupted write?); skipped")
                continue
            if r.get("event") == "resume":
                by_step = {s: rec for s, rec in by_step.items() if s <= r["step"]}
            elif "step" in r and "event" not in r:
                by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]
