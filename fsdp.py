"""Sharded training for models that do not fit one GPU (train_t2i.py --fsdp): FSDP2 keeps 1/N of
the weights, gradients, AdamW state and EMA on each of N ranks; the checkpoint is a DCP folder of
every rank's shards keyed by parameter name (it resumes on any number of ranks); `export` turns it
into the file the samplers load."""

import glob
import os
import shutil
import warnings
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import common
from common import EMA, UserError, save_checkpoint, use_bf16, use_compile

SHARDED = (torch.nn.Module, torch.optim.Optimizer, EMA)  # the parts whose tensors FSDP shards


def parallelize(model: torch.nn.Module, ema: EMA, env, args) -> torch.nn.Module:
    """common.parallelize, or with --fsdp the model (built on the CPU) and its EMA sharded in place,
    each block compiled. Build the optimiser after: the parameters become sharded DTensors."""
    if not args.fsdp:
        return common.parallelize(model, ema, env, args)
    if not dist.is_initialized():  # a plain `python` run: a process group of one
        dist.init_process_group("nccl" if env.device.type == "cuda" else "gloo",
                                store=dist.HashStore(), rank=0, world_size=1)
    if args.fsdp == "shard":
        mesh = init_device_mesh(env.device.type, (env.world_size,))
    else:  # HSDP: shard within a node (fast links), replicate across nodes
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
        mesh = init_device_mesh(env.device.type, (env.world_size // per_node, per_node),
                                mesh_dim_names=("replicate", "shard"))
    # bf16 weights in forward and backward under bf16; gradients reduced and kept in float32
    bf16 = torch.bfloat16 if use_bf16(args.precision, env.device) else None
    policy = MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=torch.float32)
    warnings.filterwarnings("ignore", "FSDP2-wrapped module .* returned a view tensor")
    for net, compiled in ((model, use_compile(args.compile, env.device)), (ema.model, False)):
        # each block of the top-level ModuleLists is one unit (gathered just before it runs, freed
        # after), then the root; a block's compiled forward keeps FSDP's hooks outside the graph
        for blocks in net.children():
            for block in blocks if isinstance(blocks, torch.nn.ModuleList) else ():
                if compiled:
                    block.forward = torch.compile(block.forward)
                fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(net, mesh=mesh, mp_policy=policy)
    # The EMA never runs a backward, after which FSDP would reshard its root: reshard after forward.
    ema.model.set_reshard_after_forward(True)
    return model


def gradient_sync(model: torch.nn.Module, sync: bool):
    """common.gradient_sync; FSDP reduce-scatters every micro-batch (unsynchronised gradients would
    stay whole on each GPU), only HSDP's all-reduce across nodes waits for the last (`sync`)."""
    if not hasattr(model, "set_requires_all_reduce"):
        return common.gradient_sync(model, sync)
    model.set_requires_all_reduce(sync)  # a no-op without replicas; the last sets it back
    return nullcontext()


def recover(run_dir: str):
    """Undo a save that a kill interrupted: half-written *.tmp folders go, their step is redone."""
    path = os.path.join(run_dir, "ckpt")
    if os.path.isdir(path + ".old"):
        if os.path.isdir(path):  # killed after the swap
            shutil.rmtree(path + ".old")
        else:  # killed between the two renames: the old one is the whole one
            os.rename(path + ".old", path)
    for tmp in glob.glob(os.path.join(glob.escape(run_dir), "ckpt*.tmp")):
        shutil.rmtree(tmp)


def dcp_state(parts: dict) -> dict:
    """What DCP saves and loads in place: each part's sharded tensors, keyed by parameter name."""
    model = next(p for p in parts.values() if isinstance(p, torch.nn.Module))
    return {name: get_optimizer_state_dict(model, p) if isinstance(p, torch.optim.Optimizer)
            else get_model_state_dict(p.model if isinstance(p, EMA) else p)
            for name, p in parts.items()}


@contextmanager
def reading(folder: str):
    """A damaged or incomplete checkpoint (a shard, .metadata or train_state.pt missing or cut
    short) is one line naming the kept copy to fall back to."""
    try:
        yield
    except (Exception, CheckpointException) as e:
        run_dir = os.path.dirname(os.path.abspath(folder))
        kept = sorted(glob.glob(os.path.join(glob.escape(run_dir), "ckpt_*[0-9]")))
        fix = (f"the last kept copy is {kept[-1]}: to go on from it, move {folder} away and run "
               f"cp -al {kept[-1]} {folder}" if kept else "and no --keep_every copy to go back to")
        raise UserError(f"the sharded checkpoint {folder} is damaged or incomplete "
                        f"({type(e).__name__}); {fix}") from None


def train_state(folder: str) -> dict:
    with reading(folder):
        return torch.load(f"{folder}/train_state.pt", map_location="cpu", weights_only=True)


class ShardedCheckpoint(common.Checkpoint):
    """<run_dir>/ckpt/: DCP files and train_state.pt (the rest). A save goes to ckpt.tmp/, then
    ckpt -> ckpt.old, ckpt.tmp -> ckpt: a kill at any moment leaves a whole one (`recover`)."""

    name = "ckpt"

    def __init__(self, env, args, run_dir: str, identity: dict, state: dict):
        super().__init__(env, args, run_dir, identity, state)  # refuses a run without --resume
        if env.is_main:  # so that an interrupted save is undone only in the run's own folder
            recover(run_dir)
        env.barrier()
        self.sharded = {n: p for n, p in state.items() if isinstance(p, SHARDED)}

    def read(self) -> dict:
        return train_state(self.path)

    def restore(self, ckpt: dict):
        state = dcp_state(self.sharded)
        with reading(self.path):
            dcp.load(state, checkpoint_id=self.path)  # each rank what its shards need: it reshards
        model = next(p for p in self.sharded.values() if isinstance(p, torch.nn.Module))
        for name, part in self.state.items():
            if isinstance(part, torch.optim.Optimizer):
                set_optimizer_state_dict(model, part, state[name])
            elif name in self.sharded:
                set_model_state_dict(part.model if isinstance(part, EMA) else part, state[name])
            else:
                part.load_state_dict(ckpt[name])

    def save(self, extras: dict, env, keep: str | None):
        tmp = self.path + ".tmp"
        plain = {n: p.state_dict() for n, p in self.state.items() if n not in self.sharded}
        dcp.save(dcp_state(self.sharded), checkpoint_id=tmp)  # returns once all ranks' are synced
        if env.is_main:
            save_checkpoint({**extras, **plain}, os.path.join(tmp, "train_state.pt"))
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


class ShardedRun(common.Run):
    """common.Run with a ShardedCheckpoint; a finished run also writes export.pt."""

    checkpoint_type = ShardedCheckpoint

    def __exit__(self, exc_type, *exc):
        super().__exit__(exc_type, *exc)
        if exc_type is None and not self.stopped and self.env.is_main:
            export(self.checkpoint.path)


def export(folder: str) -> str:
    """--export: the file to sample from (the whole EMA, no training state), <run_dir>/ckpt/ ->
    export.pt, ckpt_<step>/ -> export_<step>.pt. It only reads (a run may be saving meanwhile)."""
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
    print(f"EMA weights of step {ckpt['step']} for sample_t2i.py -> {path}")
    return path
