"""The plumbing every script shares, written once so that the other files can be about the method.

- torchrun set-up and shutdown, per-rank seeding, bf16 autocast; data parallelism: DDP, or FSDP2
  (`parallelize`) for models that do not fit a GPU, and gradient accumulation over micro-batches;
- the flags every trainer shares, and checks of their ranges at parse time;
- rank-0 logging to the console and to `log.jsonl`
  (harness.py: the rest of a training run's bookkeeping);
- atomic writes (temporary file, then rename), safe checkpoint loading, pretrained weight files;
- the EMA of the weights; `UserError` and `script_main`: bad input is one clear line,
  not a traceback.
"""

import argparse
import contextlib
import copy
import glob
import json
import math
import os
import sys
import time
import urllib.error
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm


# A run stopped by SIGTERM/Ctrl-C after saving (sysexits' EX_TEMPFAIL: "try again").
EXIT_STOPPED = 75


class UserError(Exception):
    """Bad input, or a run that cannot go on: the message names the problem and the fix, so scripts
    print it alone (once, on rank 0) and exit with status 2 instead of showing a traceback."""


class MissingWeightsError(UserError):
    """A pretrained weight file that is neither given, cached nor downloadable."""


def script_main(main):
    """Run a script's `main()`: a UserError becomes one line on stderr and exit status 2; a training
    run stopped by a signal exits with EXIT_STOPPED, so that `train && sample` does not go on."""
    # Warnings as "warning: <message>", without the source line.
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


# --------------------------------------------------------------------------------------------------
# Command lines


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Module docstring kept as written, and every flag's default shown in --help."""


def at_least(minimum, kind=int):
    """An argparse type for numbers >= `minimum`: `--batch_size 0` fails when it is parsed."""
    return in_range(minimum, math.inf, kind)


def in_range(lo, hi, kind=float, lo_open=False, hi_open=False):
    """An argparse type for finite numbers in [lo, hi] (an end left out if *_open): `--ema_decay 2`
    or `--lr nan` fails when it is parsed, naming the flag, not as NaN weights in a checkpoint
    hours later."""
    if hi == math.inf:
        bounds = f"> {lo}" if lo_open else f"at least {lo}"
    else:
        bounds = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"

    def parse(text):
        value = kind(text)
        if not (math.isfinite(value) and (value > lo if lo_open else value >= lo)
                and (value < hi if hi_open else value <= hi)):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def add_optimisation_args(p, steps: int, steps_help: str, batch_size: int, lr: float, betas,
                          ema_decay: float, optimiser: str = "AdamW",
                          grad_clip: float | None = None, micro_batch: bool = False):
    """The optimisation flags every trainer has, with its defaults (constant lr; AdamW: weight decay
    too; `micro_batch`: gradient accumulation, see `micro_batches`)."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=at_least(1), default=steps, help=steps_help)
    g.add_argument("--batch_size", type=at_least(1), default=batch_size,
                   help="global batch size (split over ranks)")
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
    if micro_batch:
        g.add_argument("--micro_batch", type=at_least(1), help="per-rank batch per forward; "
                       "below batch_size / ranks: gradient accumulation (default: none)")
    return g


def micro_batches(args, env) -> tuple[int, int]:
    """(samples per forward on a rank, forwards per optimiser step): --batch_size is the global
    batch, split over the ranks, and each rank's share into --micro_batch (default: all of it)."""
    per_rank = args.batch_size // env.world_size
    micro = getattr(args, "micro_batch", None) or per_rank
    if args.batch_size % env.world_size or per_rank % micro:
        raise UserError(f"--batch_size {args.batch_size} must split into {env.world_size} ranks x "
                        f"whole micro-batches of --micro_batch {micro}")
    return micro, per_rank // micro


def add_runtime_args(p, num_workers: int, log_every: int, ckpt_every: int, grid_every: int,
                     grids: str):
    """The flags every trainer shares: device and precision, data loading, seed,
    log/checkpoint/grid cadence."""
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                   help="auto: CUDA if present")
    g.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 autocast on CUDA, float32 on the CPU")
    add_compile_arg(g)
    add_fsdp_arg(g)
    g.add_argument("--num_workers", type=at_least(0), default=num_workers,
                   help="data loading processes per rank")
    g.add_argument("--seed", type=at_least(0), default=0,
                   help="seeds the weights, noise and data order")
    g.add_argument("--log_every", type=at_least(1), default=log_every,
                   help="steps between log lines")
    g.add_argument("--ckpt_every", type=at_least(1), default=ckpt_every,
                   help="steps between checkpoints")
    g.add_argument("--keep_every", type=at_least(0), default=0,
                   help="also keep ckpt_<step>.pt every N steps (0: never)")
    g.add_argument("--grid_every", type=at_least(0), default=grid_every,
                   help=f"steps between {grids} (0: never)")
    return g


def add_compile_arg(p):
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="torch.compile the networks (auto: on CUDA, where it pays; "
                        "the CPU stays eager)")


def add_fsdp_arg(p):
    p.add_argument("--fsdp", nargs="?", const="shard", choices=("shard", "hybrid"),
                   help="shard the weights, gradients, AdamW state and EMA over the ranks (FSDP2) "
                        "instead of a full copy per GPU (DDP); 'hybrid' (HSDP): shard within each "
                        "node, replicate across nodes. Checkpoints: the folder <run_dir>/ckpt/")


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


# --------------------------------------------------------------------------------------------------
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
    """Join the `torchrun` process group (NCCL on CUDA, gloo on CPU); `device` is auto,
    cuda or cpu."""
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
    """Leave the process group. Call it after every DDP module is gone: destroying the group under a
    live DDP module, or exiting without destroying it, aborts the processes at exit."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int, rank: int = 0):
    """Each rank its own stream (seed + rank), so noise and timesteps differ across GPUs; the data
    order is seeded separately (data.py) and is shared."""
    torch.manual_seed(seed + rank)


@contextlib.contextmanager
def same_on_every_rank(seed: int):
    """Random draws from `seed` alone inside (then this rank's own stream goes on): the initial
    weights of a model are the same on every rank. FSDP shards them as each rank made them; DDP
    would copy rank 0's."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def use_bf16(precision: str, device: torch.device) -> bool:
    """--precision auto is bf16 on CUDA and float32 on the CPU (where bf16 is slow); bf16 on the CPU
    is allowed so that tests cover that path."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def wrap_ddp(module: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """DistributedDataParallel under torchrun (gradients all-reduced in backward),
    else the module."""
    if not env.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel
    device_ids = [env.local_rank] if env.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module behind DDP and/or torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def parallelize(model: torch.nn.Module, ema: "EMA", env: DistEnv, args) -> torch.nn.Module:
    """Put the model and its EMA on this rank's device and return the module to train. DDP (the
    default): a full copy per GPU, gradients all-reduced in backward, torch.compile'd where it pays.
    --fsdp: both sharded in place by FSDP2 (`shard_model`), each block compiled; each rank keeps
    only its shards, so the model is built on the CPU and never whole on a GPU. Build the optimiser
    after this: FSDP replaces the parameters by sharded ones (DTensors)."""
    compiled = use_compile(args.compile, env.device)
    if not args.fsdp:
        for m in (model, ema.model):
            m.to(env.device)
        train_model = wrap_ddp(model, env)
        return torch.compile(train_model) if compiled else train_model  # all-reduces still overlap
    mesh = device_mesh(env, args.fsdp)
    bf16 = use_bf16(args.precision, env.device)
    # Our models' outputs are never changed in place, which is what this warning is about.
    warnings.filterwarnings("ignore", "FSDP2-wrapped module .* returned a view tensor")
    shard_model(model, mesh, bf16, compile_blocks=compiled)
    shard_model(ema.model, mesh, bf16)
    # FSDP keeps a root's parameters gathered after a forward until its backward, which the EMA
    # never runs (it only draws sample grids): reshard them, or the next EMA update meets whole
    # tensors where it expects this rank's shards.
    ema.model.set_reshard_after_forward(True)
    return model


def device_mesh(env: DistEnv, mode: str):
    """The ranks FSDP shards over: all of them ('shard'), or a 2-D mesh (nodes, ranks per node) for
    'hybrid', sharding within a node (fast links) and replicating across nodes. A plain `python`
    run (bench.py on one GPU) gets a process group of one."""
    from torch.distributed.device_mesh import init_device_mesh
    if not dist.is_initialized():
        dist.init_process_group("nccl" if env.device.type == "cuda" else "gloo",
                                store=dist.HashStore(), rank=0, world_size=1)
    if mode == "shard":
        return init_device_mesh(env.device.type, (env.world_size,))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
    return init_device_mesh(env.device.type, (env.world_size // per_node, per_node),
                            mesh_dim_names=("replicate", "shard"))


def shard_model(model: torch.nn.Module, mesh, bf16: bool, compile_blocks: bool = False):
    """FSDP2 (`torch.distributed.fsdp.fully_shard`, see PyTorch's FSDP2 tutorial) on each block of
    the model's top-level ModuleLists (LightningDiT: blocks; text-to-image: double_blocks and
    single_blocks), then on the root (embedders, final layer). Each unit's parameters are gathered
    just before it runs and freed after, its gradients reduce-scattered in backward. Mixed
    precision: bf16 weights in the forward and backward under bf16, gradients reduced and kept in
    float32. `compile_blocks` compiles each block's forward (not the module, whose FSDP hooks stay
    outside the compiled graph; the parameter names stay those of the plain model)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                  reduce_dtype=torch.float32)
    for blocks in model.children():
        for block in blocks if isinstance(blocks, torch.nn.ModuleList) else ():
            if compile_blocks:
                block.forward = torch.compile(block.forward)
            fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def gradient_sync(model: torch.nn.Module, sync: bool):
    """The context of one micro-batch's backward in gradient accumulation; `sync` on the last.
    DDP all-reduces only then (each rank holds full gradients anyway). FSDP reduce-scatters every
    micro-batch, which keeps the gradients sharded (unsynchronised FSDP gradients stay unsharded,
    a full copy per GPU); HSDP's all-reduce across nodes waits for the last."""
    model = getattr(model, "_orig_mod", model)  # behind torch.compile
    if hasattr(model, "set_requires_all_reduce"):  # FSDP2; a no-op without replicas
        model.set_requires_all_reduce(sync)
    elif not sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (DTensor), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


# --------------------------------------------------------------------------------------------------
# Files: atomic writes, checkpoints, pretrained weights


def atomic_write(path: str, write):
    """`write(f)` to a temporary file beside `path`, synced, then renamed over it: a crash or a full
    disk never leaves a half-written file. Temporary files of an earlier, killed writer of `path`
    are removed first. A failed write (a full disk, a read-only folder) is a UserError; the old file
    stays."""
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
        raise UserError(f"could not read the {what} {path} ({e}); "
                        "delete it if it is damaged") from None


def refuse_sharded(path: str, what: str):
    """One line for a sharded (--fsdp) training checkpoint folder given where a file is expected."""
    if os.path.isfile(os.path.join(path, ".metadata")):  # torch.distributed.checkpoint's index
        export = os.path.join(os.path.dirname(os.path.abspath(path)), "export.pt")
        raise UserError(f"{path} is a sharded (--fsdp) training checkpoint, not a {what} file: use "
                        f"its run's {export} (written when the run ends, or with `python "
                        "train_t2i.py --export --run_dir RUN`; train_dit.py alike)")


def load_checkpoint(path: str, what: str = "checkpoint"):
    """torch.load on the CPU with weights_only=True: tensors and
    plain containers only, never code."""
    refuse_sharded(path, what)
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or a pickle of foreign objects
        text = str(e)
        if "Unsupported global" in text:  # name the object, without PyTorch's advice to allow it
            global_name = text.split("Unsupported global: GLOBAL ")[1].split(" ")[0]
            why = "it holds a " + global_name + " object, not only tensors"
        else:
            why = f"{type(e).__name__}: {text.splitlines()[0].split('. ')[0] if text else ''}"
        raise UserError(f"could not read {what} {path} ({why}). Is it a complete file written by "
                        "this project (or the official weights)?") from None


def pretrained_file(url: str, local_path: str | None, what: str, flag: str,
                    random_flag: str = "") -> str:
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
            + (f"\n  For a test or a demo only, {random_flag} runs with random weights instead."
               if random_flag else "")
        ) from None


# --------------------------------------------------------------------------------------------------
# EMA of the weights


class EMA:
    """Exponential moving average of a model's trainable weights, kept as a frozen copy of the
    model: ema <- decay * ema + (1 - decay) * weights after every step. It is what we evaluate and
    export (smoother than the raw weights late in training). Frozen parameters stay as they were
    copied. Under FSDP the copy is sharded as the model is (`parallelize`); each rank updates its
    shards."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._names = [n for n, p in model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        params, ema = dict(model.named_parameters()), dict(self.model.named_parameters())
        # One fused kernel for all tensors: ema += (1 - decay) * (param - ema).
        torch._foreach_lerp_([local(ema[n]) for n in self._names],
                             [local(params[n].detach()) for n in self._names], 1.0 - self.decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)


# --------------------------------------------------------------------------------------------------
# The training-run harness


class Logger:
    """Prints on rank 0 (through tqdm, so progress bars stay intact) and appends one JSON object per
    `log()` call to `<run_dir>/log.jsonl`; step records also go to TensorBoard
    when it is installed."""

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
