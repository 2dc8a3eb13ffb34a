"""The plumbing every script shares, so that the other files can be about the method.

- errors: `UserError` (bad input: one clear line, exit status 2) and `script_main`;
- torchrun: `DistEnv`, bf16 autocast, DDP or FSDP2 (`parallelize`);
- files: atomic writes (temporary file, then rename), safe loading, pretrained weight files;
- the EMA of the weights;
- a training run's bookkeeping (`Run`): exact resume, log lines, checkpoints (one file under DDP, a
  sharded folder under FSDP), a clean stop on SIGTERM/Ctrl-C, a guard against non-finite losses.
"""

import argparse
import contextlib
import copy
import glob
import json
import math
import os
import shutil
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
    """Run a script's `main()`: a UserError is one line on stderr (rank 0) and exit status 2; a run
    stopped by a signal exits with EXIT_STOPPED, so that `train && sample` does not go on."""
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
    """An argparse type for finite numbers in [lo, hi] (an end left out if *_open): `--ema_decay 2`
    or `--lr nan` fails when it is parsed, not as NaN weights hours later."""
    bounds = (f"> {lo}" if lo_open else f"at least {lo}") if hi == math.inf else \
        f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"

    def parse(text):
        value = kind(text)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        above = value > lo if lo_open else value >= lo
        if not (above and (value < hi if hi_open else value <= hi)):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def at_least(minimum, kind=int):
    return in_range(minimum, kind=kind)


# --------------------------------------------------------------------------------------------------
# torchrun, precision, DDP and FSDP


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
    """Leave the process group, after every DDP module is gone: destroying the group under a live
    DDP module, or exiting without destroying it, aborts the processes at exit."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def same_on_every_rank(seed: int):
    """Random draws from `seed` alone inside: a model's initial weights are the same on every rank
    (FSDP shards them as each rank made them)."""
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
    """The model (and its EMA) on this rank's device; returns the module to train. DDP (default): a
    full copy per GPU, compiled where it pays. --fsdp: both sharded in place by FSDP2 (each rank
    keeps only its shards: the model was built on the CPU), each block compiled. Build the
    optimiser after this: FSDP replaces the parameters by sharded ones (DTensors)."""
    compiled = use_compile(args.compile, env.device)
    if not args.fsdp:
        model.to(env.device)
        ema.model.to(env.device)
        train_model = wrap_ddp(model, env)
        return torch.compile(train_model) if compiled else train_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if not dist.is_initialized():  # a plain `python` run (bench.py): a process group of one
        dist.init_process_group("nccl" if env.device.type == "cuda" else "gloo",
                                store=dist.HashStore(), rank=0, world_size=1)
    if args.fsdp == "shard":
        mesh = init_device_mesh(env.device.type, (env.world_size,))
    else:  # HSDP: shard within a node (fast links), replicate across nodes
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
        mesh = init_device_mesh(env.device.type, (env.world_size // per_node, per_node),
                                mesh_dim_names=("replicate", "shard"))
    # bf16 weights in forward and backward under bf16; gradients reduced and kept in float32
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if use_bf16(args.precision, env.device)
                                  else None, reduce_dtype=torch.float32)
    warnings.filterwarnings("ignore", "FSDP2-wrapped module .* returned a view tensor")
    for net, compile_blocks in ((model, compiled), (ema.model, False)):
        # each block of the top-level ModuleLists is one unit (gathered just before it runs, freed
        # after), then the root (embedders, final layer); compiling each block's forward keeps
        # FSDP's hooks outside the graph and the parameter names those of the plain model
        for blocks in net.children():
            for block in blocks if isinstance(blocks, torch.nn.ModuleList) else ():
                if compile_blocks:
                    block.forward = torch.compile(block.forward)
                fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(net, mesh=mesh, mp_policy=policy)
    # FSDP keeps a root's parameters gathered after a forward until its backward, which the EMA
    # never runs (it only draws sample grids): reshard, or the next EMA update meets whole tensors.
    ema.model.set_reshard_after_forward(True)
    return model


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, sync: bool):
    """One micro-batch's backward in gradient accumulation, `sync` on the last. DDP all-reduces only
    then. FSDP reduce-scatters every micro-batch (unsynchronised FSDP gradients would stay whole on
    each GPU); only HSDP's all-reduce across nodes waits for the last. Restored on exit."""
    model = getattr(model, "_orig_mod", model)  # behind torch.compile
    if hasattr(model, "set_requires_all_reduce"):  # FSDP2; a no-op without replicas
        model.set_requires_all_reduce(sync)
        try:
            yield
        finally:
            model.set_requires_all_reduce(True)
    else:
        skip = not sync and hasattr(model, "no_sync")  # DDP
        with model.no_sync() if skip else contextlib.nullcontext():
            yield


def micro_batches(args, env: DistEnv) -> tuple[int, int]:
    """(samples per forward on a rank, forwards per optimiser step): --batch_size is the global
    batch, split over the ranks, each rank's share into micro-batches of at most --micro_batch."""
    per_rank, given = args.batch_size // env.world_size, getattr(args, "micro_batch", None)
    micro = min(given or per_rank, per_rank)
    if args.batch_size % env.world_size or per_rank % micro:
        raise UserError(f"--batch_size {args.batch_size} must split evenly over {env.world_size} "
                        f"ranks" + (f", each share into micro-batches of --micro_batch {micro}"
                                    if given else ""))
    return micro, per_rank // micro


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (DTensor), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


# --------------------------------------------------------------------------------------------------
# Files


def atomic_write(path: str, write):
    """`write(f)` to a temporary file beside `path`, synced, then renamed over it: a crash or a full
    disk never leaves a half-written file (a failed write is a UserError; the old file stays)."""
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
        raise UserError(f"could not read the {what} {path} ({e}); delete it if it is damaged") \
            from None


def load_checkpoint(path: str, what: str = "checkpoint"):
    """torch.load on the CPU with weights_only=True: tensors and plain containers, never code."""
    if os.path.isfile(os.path.join(path, ".metadata")):  # torch.distributed.checkpoint's index
        raise UserError(f"{path} is a sharded (--fsdp) training checkpoint, not a {what} file: "
                        f"`python train_dit.py --export {path}` writes one (train_t2i.py for a "
                        "text-to-image run)")
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or a pickle of foreign objects
        raise UserError(f"could not read {what} {path} ({type(e).__name__}): it is damaged, or not "
                        "a file of tensors written by this project (or the official weights)") \
            from None


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
    """A pretrained weight file: `local_path`, else the torch.hub cache, else downloaded there.
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
               if random_flag else "")) from None


# --------------------------------------------------------------------------------------------------
# The EMA of the weights


class EMA:
    """Exponential moving average of a model's trainable weights, kept as a frozen copy of the
    model: ema <- decay * ema + (1 - decay) * weights after every step. It is what we sample from
    and export. Under FSDP the copy is sharded as the model is; each rank updates its shards."""

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
# Checkpoints


TRAIN_STATE = "train_state.pt"  # in a sharded checkpoint: all but the sharded tensors
SHARDED = (torch.nn.Module, torch.optim.Optimizer, EMA)  # the parts whose tensors FSDP shards


class Checkpoint:
    """A training run's state: <run_dir>/ckpt.pt under DDP (every rank holds all of it; rank 0
    writes it), or <run_dir>/ckpt/ under FSDP, a torch.distributed.checkpoint (DCP) folder where
    every rank writes its own shards keyed by parameter name, so that a run resumes on any number
    of ranks (DCP reshards), beside train_state.pt (step, identity, every rank's RNG and data
    position). A sharded save goes to ckpt.tmp/ and is then swapped in (ckpt -> ckpt.old, ckpt.tmp
    -> ckpt): a kill at any moment leaves a whole checkpoint (`recover`). --keep_every keeps
    copies, ckpt_<step>.pt or ckpt_<step>/. `state` maps names to the parts with a state dict."""

    def __init__(self, env, args, run_dir: str, identity: dict, state: dict):
        self.dir, self.identity, self.state = run_dir, identity, state
        self.sharded = bool(getattr(args, "fsdp", None))
        self.path = os.path.join(run_dir, "ckpt" if self.sharded else "ckpt.pt")
        check_run_dir(run_dir, args)  # on every rank, so that all of them stop
        if env.is_main:
            if self.sharded:
                recover(run_dir)
            check_writable(self.path, "checkpoint")
        env.barrier()

    def load(self, env) -> dict:
        """Restore every part and this rank's RNG; returns the checkpoint (step, rng, ...). The
        optimisers keep this run's lr, betas and weight decay (`--resume --lr 1e-5` after a loss
        spike does lower the lr)."""
        if not os.path.exists(self.path):
            raise UserError(f"training checkpoint to resume not found: {self.path}")
        opts = [p for p in self.state.values() if isinstance(p, torch.optim.Optimizer)]
        hyper = [[{k: g[k] for k in ("lr", "betas", "weight_decay") if k in g}
                  for g in opt.param_groups] for opt in opts]
        ckpt = (train_state(self.path) if self.sharded else
                load_checkpoint(self.path, "training checkpoint to resume"))
        differ = {k: (ckpt.get(k), v) for k, v in self.identity.items() if ckpt.get(k) != v}
        if differ:
            raise UserError(f"{self.path} comes from a different run: " + "; ".join(
                f"{k} is {a!r} there but {b!r} here" for k, (a, b) in differ.items())
                + " (other architecture flags, or other latents/tokenizer?)")
        sharded = {n: p for n, p in self.state.items() if self.sharded and isinstance(p, SHARDED)}
        if sharded:
            load_shards(self.path, sharded)
        for name, part in self.state.items():
            if name not in sharded:
                part.load_state_dict(ckpt[name])
        for opt, groups in zip(opts, hyper):
            for group, h in zip(opt.param_groups, groups):
                group.update(h)
        set_rng_states(ckpt["rng"], env)
        return ckpt

    def save(self, extras: dict, env, keep: str | None):
        """Every state dict and `extras`, and a copy named `keep`, written before the newest
        checkpoint: after a kill between the two, a resumed run saves that step and its copy again.
        A collective: some state dicts gather from every rank."""
        if not self.sharded:
            ckpt = {**extras, **{name: part.state_dict() for name, part in self.state.items()}}
            for name in ([keep + ".pt"] if keep else []) + ["ckpt.pt"] if env.is_main else []:
                save_checkpoint(ckpt, os.path.join(self.dir, name))
            return
        import torch.distributed.checkpoint as dcp
        tmp = self.path + ".tmp"
        plain = {n: p.state_dict() for n, p in self.state.items() if not isinstance(p, SHARDED)}
        dcp.save(dcp_state({n: p for n, p in self.state.items() if isinstance(p, SHARDED)}),
                 checkpoint_id=tmp)  # returns when every rank's files are written and synced
        if env.is_main:
            save_checkpoint({**extras, **plain}, os.path.join(tmp, TRAIN_STATE))
            if keep:  # hard links: files are never changed in place, only replaced
                kept = os.path.join(self.dir, keep)
                shutil.copytree(tmp, kept + ".tmp", copy_function=os.link)
                shutil.rmtree(kept, ignore_errors=True)
                os.rename(kept + ".tmp", kept)
            if os.path.isdir(self.path):
                os.rename(self.path, self.path + ".old")
            os.rename(tmp, self.path)
            shutil.rmtree(self.path + ".old", ignore_errors=True)
        env.barrier()


def check_run_dir(run_dir: str, args):
    """Every rank, before anything is written: never overwrite a run without --resume, nor resume
    a checkpoint of the other kind."""
    if args.keep_every % args.ckpt_every:
        raise UserError(f"--keep_every {args.keep_every} must be a multiple of --ckpt_every "
                        f"{args.ckpt_every} (kept checkpoints are copies of saved ones)")
    found = [p for p in ("ckpt.pt", "ckpt", "ckpt.old") if os.path.exists(os.path.join(run_dir, p))]
    if found and not args.resume:
        raise UserError(f"{os.path.join(run_dir, found[0])} exists: pass --resume to continue that "
                        "run, or use another --run_dir (we do not overwrite training progress)")
    if found and (found[0] == "ckpt.pt") == bool(getattr(args, "fsdp", None)):
        kind, fix = (("single-file (DDP)", "without --fsdp (DDP)") if found[0] == "ckpt.pt" else
                     ("sharded (--fsdp)", "with --fsdp"))
        raise UserError(f"{os.path.join(run_dir, found[0])} is a {kind} checkpoint: resume {fix}, "
                        "or start another --run_dir")


def recover(run_dir: str):
    """Rank 0, before a sharded run reads or writes its checkpoint: undo a save that a kill
    interrupted. Half-written folders (*.tmp) go: the checkpoint before them is whole, and the
    resumed run saves their step again."""
    path = os.path.join(run_dir, "ckpt")
    if os.path.isdir(path + ".old"):
        if os.path.isdir(path):  # killed after the swap
            shutil.rmtree(path + ".old")
        else:  # killed between the two renames: the old one is the whole one
            os.rename(path + ".old", path)
    for tmp in glob.glob(os.path.join(glob.escape(run_dir), "ckpt*.tmp")):
        shutil.rmtree(tmp)


def dcp_state(parts: dict) -> dict:
    """What DCP saves, and loads in place: each part's state dict of sharded tensors, keyed by
    parameter name (an optimiser's state too: by the names in the one trained model)."""
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict)
    model = next(p for p in parts.values() if isinstance(p, torch.nn.Module))
    return {name: get_optimizer_state_dict(model, p) if isinstance(p, torch.optim.Optimizer)
            else get_model_state_dict(p.model if isinstance(p, EMA) else p)
            for name, p in parts.items()}


@contextlib.contextmanager
def reading(folder: str):
    """A sharded checkpoint read in the body: a damaged or incomplete one (a missing or truncated
    shard, .metadata or train_state.pt) is one line naming the kept copy to fall back to."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
    try:
        yield
    except (Exception, CheckpointException) as e:
        kept = sorted(glob.glob(os.path.join(glob.escape(os.path.dirname(os.path.abspath(
            folder))), "ckpt_*[0-9]")))
        fix = (f"the last kept copy is {kept[-1]}: to go on from it, move {folder} away and "
               f"copy the kept one there (cp -al {kept[-1]} {folder})" if kept else
               "and no copy kept with --keep_every to fall back to")
        raise UserError(f"the sharded checkpoint {folder} is damaged or incomplete "
                        f"({type(e).__name__}); {fix}") from None


def train_state(folder: str) -> dict:
    with reading(folder):
        return torch.load(os.path.join(folder, TRAIN_STATE), map_location="cpu", weights_only=True)


def load_shards(folder: str, parts: dict):
    """The sharded parts' tensors, loaded in place from a DCP folder: each rank reads what its
    shards need, whatever the number of ranks that wrote them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                         set_optimizer_state_dict)
    state = dcp_state(parts)
    with reading(folder):
        dcp.load(state, checkpoint_id=folder)
    model = next(p for p in parts.values() if isinstance(p, torch.nn.Module))
    for name, part in parts.items():
        if isinstance(part, torch.optim.Optimizer):
            set_optimizer_state_dict(model, part, state[name])
        else:
            set_model_state_dict(part.model if isinstance(part, EMA) else part, state[name])


def export(folder: str) -> str:
    """`--export [FOLDER]`: the file sample.py loads (identity, latent statistics, step and the EMA
    weights whole; no training state) from a sharded checkpoint: <run_dir>/ckpt/ -> export.pt, a
    kept ckpt_<step>/ -> export_<step>.pt beside it. It only reads (a run may be saving meanwhile),
    in one process: one full copy of the EMA in CPU memory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():  # not a run's end
        raise UserError("--export reads the checkpoint in one process: run it with python, not "
                        "torchrun")
    folder = os.path.normpath(folder)
    if not os.path.isdir(folder) or not os.path.basename(folder).startswith("ckpt"):
        raise UserError(f"no sharded (--fsdp) checkpoint folder {folder} to export: give "
                        "<run_dir>/ckpt or a kept <run_dir>/ckpt_<step>")
    ckpt = {k: v for k, v in train_state(folder).items() if k not in ("rng", "data")}
    with reading(folder), warnings.catch_warnings():  # DCP's note that it reads in one process
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        reader = dcp.FileSystemReader(folder)
        ckpt["ema"] = {k[4:]: torch.empty(m.size, dtype=m.properties.dtype)
                       for k, m in reader.read_metadata().state_dict_metadata.items()
                       if k.startswith("ema.") and isinstance(m, TensorStorageMetadata)}
        dcp.load({"ema": ckpt["ema"]}, storage_reader=reader, no_dist=True)
    if train_state(folder)["step"] != ckpt["step"]:  # a save swapped the folder in the meantime
        raise UserError(f"{folder} was replaced by a newer checkpoint while it was read: run "
                        "--export again")
    path = os.path.join(os.path.dirname(os.path.abspath(folder)),
                        os.path.basename(folder).replace("ckpt", "export", 1) + ".pt")
    save_checkpoint(ckpt, path)
    print(f"EMA weights of step {ckpt['step']} for sample.py -> {path}")
    return path


# --------------------------------------------------------------------------------------------------
# A training run's bookkeeping


class Logger:
    """Prints on rank 0 (through tqdm, so progress bars stay intact) and appends one JSON object per
    `log()` to <run_dir>/log.jsonl; step records also go to TensorBoard when it is installed, and
    to <run_dir>/curves.png, redrawn at most once a minute."""

    def __init__(self, env: DistEnv, run_dir: str | None = None):
        self.enabled, self.dir, self.drawn = env.is_main, run_dir, 0.0
        self.path = os.path.join(run_dir, "log.jsonl") if (run_dir and self.enabled) else None
        self.tensorboard = None
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
    """Restore this rank's RNG. A rank the checkpoint did not have (resumed on more ranks) gets a
    seed drawn from a saved state and its rank: a copy of another rank's would repeat its noise."""
    if env.rank >= len(states):
        saved = torch.Generator().set_state(states[env.rank % len(states)]["torch"])
        torch.manual_seed(int(torch.randint(0, 2 ** 62, (), generator=saved)) + env.rank)
        return
    torch.set_rng_state(states[env.rank]["torch"])
    if "cuda" in states[env.rank] and env.device.type == "cuda":
        torch.cuda.set_rng_state(states[env.rank]["cuda"], env.device)


class StopSignal:
    """SIGTERM (pre-emption, `kill`) and a first Ctrl-C become a flag the loop checks between steps,
    so that it saves and exits cleanly; a second Ctrl-C aborts at once."""

    def __init__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n[rank {os.environ.get('RANK', 0)}] received {signal.Signals(signum).name}: "
              "saving a checkpoint and stopping (Ctrl-C again to abort)", file=sys.stderr,
              flush=True)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Meter:
    """The scalar values of the steps since the last log line, summed on the device (no host sync),
    and the first step whose values were not all finite."""

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
        """Stop the run (on every rank) if a recorded value was not finite: before anything is
        logged or saved, so that no checkpoint is written after it."""
        bad = self.first_bad.clone()
        if env.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        if bad.item() != self.NO_BAD_STEP:
            raise UserError(f"non-finite loss at step {bad.item()}: the run is stopped and no "
                            f"checkpoint was written after it; the last good one is {last_good}. "
                            + advice)

    def means(self, env: DistEnv) -> dict:
        """Each value's mean over its steps and the ranks; then the sums start afresh."""
        keys = sorted(self.sums)
        means = env.all_reduce_mean(torch.stack([self.sums[k][0] / self.sums[k][1] for k in keys]))
        self.sums, self.steps = {}, 0
        return dict(zip(keys, means.tolist()))


def due(every: int, done: int, steps: int) -> bool:
    """Whether a log line, grid or checkpoint is due after `done` of `steps` steps: every `every`
    steps, and after the last one (every = 0: never)."""
    return bool(every) and (done % every == 0 or done == steps)


# dense bf16 FLOP/s (the first name that the GPU's contains)
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
                   "L40S": 362e12, "B200": 2250e12}


def mfu_per_image_per_s(flops_per_image: float | None, env: DistEnv, precision: str):
    """MFU = images/s x this: a training image's FLOPs over the job's dense bf16 peak, where the
    run is in bf16 on a known GPU (else None: no MFU is logged)."""
    name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else ""
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    if peak and flops_per_image and use_bf16(precision, env.device):
        return flops_per_image / (peak * env.world_size)
    return None


def forward_flops(model, image_tokens: int, text_tokens: int = 0) -> int:
    """Model FLOPs of one image's forward pass through the LightningDiT (text_tokens = 0) or
    t2i.TextToImageDiT: 2 per matmul weight (Linear, Conv2d) and token it sees, plus attention's
    4 tokens^2 width per block (norms, RoPE, softmax not counted). The conditioning's weights
    (t-MLP, adaLN, text pooling) see one token, a stream's its own tokens, the rest all tokens."""
    flops = 0
    for name, m in model.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if "adaLN_modulation" in name or name.startswith(("t_embedder", "text_pool")):
            tokens = 1
        elif name.startswith("context_embedder") or ".txt." in name:
            tokens = text_tokens
        elif name.startswith(("x_embedder", "final_layer")) or ".img." in name:
            tokens = image_tokens
        else:
            tokens = image_tokens + text_tokens
        flops += 2 * m.weight.numel() * tokens
    return flops + model.depth * 4 * (image_tokens + text_tokens) ** 2 * model.hidden_size


class Run(contextlib.AbstractContextManager):
    """A training run's bookkeeping, which its loop calls step by step: `record` (device values,
    NaN-watched), `log`, `stop_requested`, `save`. `identity` must match on --resume. Leaving the
    `with` block draws the curves (and after a sharded run writes export.pt for sampling)."""

    def __init__(self, env, args, run_dir: str, identity: dict, state: dict, meta: dict = None,
                 batch_size: int = 1, skipped=None, nan_advice: str = "", show=("loss",),
                 flops_per_image: float | None = None):
        self.env, self.args, self.meta, self.batch_size = env, args, meta or {}, batch_size
        self.skipped, self.nan_advice, self.show = skipped or (lambda: 0), nan_advice, show
        self.mfu_scale = mfu_per_image_per_s(flops_per_image, env, args.precision)
        self.checkpoint = Checkpoint(env, args, run_dir, identity, state)
        self.logger, self.meter, self.stop = Logger(env, run_dir), Meter(env.device), StopSignal()
        self.pbar = tqdm(total=args.steps, disable=not env.is_main, dynamic_ncols=True)
        self.stopped, self.t0, self.first_step = False, time.time(), True  # the first: not yet
        self.about = {"args": vars(args), **{k: v for k, v in self.meta.items() if isinstance(
            v, (str, int, float, bool))}}  # the log's start and resume records
        if not args.resume:
            self.logger.log({"event": "start", "step": 0, **self.about})

    def resume(self) -> int:
        """Restore every part and every rank's RNG; returns the step to go on from."""
        ckpt = self.checkpoint.load(self.env)
        self.logger.info(f"resumed at step {ckpt['step']} from {self.checkpoint.path} (saved on "
                         f"{len(ckpt['rng'])} ranks)")  # the log's re-run steps replace the old
        self.logger.log({"event": "resume", "step": ckpt["step"], **self.about})
        self.pbar.update(ckpt["step"])
        self.t0 = time.time()  # the first step's time: from here
        return ckpt["step"]

    def record(self, done: int, **values: torch.Tensor):
        """Step `done`'s scalar device tensors, for the next log line and the NaN guard."""
        self.meter.add(done, values)
        self.pbar.update(1)
        if self.first_step:  # one host sync, once: the first step includes torch.compile's work
            self.first_step = False
            if self.env.device.type == "cuda":
                torch.cuda.synchronize(self.env.device)
            self.logger.info(f"first step: {time.time() - self.t0:.1f} s")

    def log(self, done: int, **extras):
        """The recorded values' means over steps and ranks, images/s, MFU and `extras`."""
        self.meter.check(self.env, self.checkpoint.path, self.nan_advice)
        img_s = self.meter.steps * self.batch_size / (time.time() - self.t0)
        record = {"step": done, **self.meter.means(self.env), "img_per_s": img_s, **extras}
        if self.mfu_scale:
            record["mfu"] = img_s * self.mfu_scale
        skipped = self.skipped()
        self.logger.log({**record, "skipped_files": skipped} if skipped else record)
        self.pbar.set_postfix_str(" ".join(f"{k} {record[k]:.4g}" for k in self.show
                                           if k in record))
        self.t0 = time.time()

    def stop_requested(self, done: int) -> bool:
        """Whether SIGTERM/Ctrl-C asks to save and stop: ranks agree every 10 steps (a host sync;
        torchrun kills its workers 30 s after a SIGTERM)."""
        if not self.env.distributed or done % 10 == 0:
            self.stopped = self.env.any(self.stop.requested)
        return self.stopped

    def save(self, done: int):
        """The checkpoint (a collective), also kept every --keep_every steps."""
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
            if self.checkpoint.sharded and not self.stopped and self.env.is_main:
                export(self.checkpoint.path)
            self.env.barrier()


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
            if r.get("event") == "start":  # a new run in this folder: it replaces all before it
                by_step = {}
            elif r.get("event") == "resume":
                by_step = {s: rec for s, rec in by_step.items() if s <= r["step"]}
            elif "step" in r and "event" not in r:
                by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def plot_curves(records: list[dict], path: str, x: str = "step", width: int = 300,
                height: int = 170):
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

