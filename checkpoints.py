"""Where a training run keeps its state: one file under DDP, a sharded folder under FSDP.

- `FileCheckpoint`: <run_dir>/ckpt.pt, every state dict in one file written by rank 0 (under DDP
  every rank holds all of it). sample.py loads it directly.
- `ShardedCheckpoint`: <run_dir>/ckpt/, a torch.distributed.checkpoint (DCP) folder. Every rank
  writes its own shards of the model, EMA and optimiser (no rank ever holds them whole), keyed by
  parameter name, so that DCP reshards them when a run resumes on another number of ranks; rank 0
  adds train_state.pt with the rest (step, identity, every rank's RNG and data position).
  `export` turns it into the single file that sample.py loads.

Both are written so that a crash or a kill at any moment leaves the previous checkpoint loadable.
"""

import os
import shutil
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from common import EMA, UserError, load_checkpoint, save_checkpoint

TRAIN_STATE = "train_state.pt"  # in a sharded checkpoint: all but the sharded tensors
EXPORT = "export.pt"  # beside it: the file for sample.py


def open_checkpoint(run_dir: str, sharded: bool, resume: bool):
    """The run's checkpoint of the kind its flags ask for. Refuses to overwrite a run without
    --resume, and to resume a checkpoint of the other kind."""
    file, folder = FileCheckpoint(run_dir), ShardedCheckpoint(run_dir)
    found = [c for c in (file, folder) if os.path.exists(c.path)]
    if found and not resume:
        raise UserError(f"{found[0].path} exists: pass --resume to continue that run, or use "
                        "another --run_dir (we do not overwrite training progress)")
    if resume and found and found[0].sharded != sharded:
        fix = "resume with --fsdp" if found[0].sharded else "resume without --fsdp (DDP)"
        raise UserError(f"{found[0].path} is a {found[0].kind} checkpoint: {fix}, or start another "
                        "--run_dir")
    return folder if sharded else file


class FileCheckpoint:
    """<run_dir>/ckpt.pt, and ckpt_<step>.pt copies; written atomically (common.atomic_write)."""

    sharded, kind = False, "single-file (DDP)"

    def __init__(self, run_dir: str):
        self.dir, self.path = run_dir, os.path.join(run_dir, "ckpt.pt")

    def read(self) -> dict:
        return load_checkpoint(self.path, "training checkpoint to resume")

    def load(self, parts: dict, ckpt: dict):
        for name, part in parts.items():
            part.load_state_dict(ckpt[name])

    def save(self, parts: dict, extras: dict, env, keep: str | None):
        """A collective: some state dicts gather from all ranks; rank 0 writes."""
        state = {name: part.state_dict() for name, part in parts.items()}
        if env.is_main:
            save_checkpoint({**extras, **state}, self.path)
            if keep:
                save_checkpoint({**extras, **state}, os.path.join(self.dir, keep + ".pt"))


class ShardedCheckpoint:
    """<run_dir>/ckpt/ (DCP), and ckpt_<step>/ copies. A new checkpoint is written to ckpt.tmp/,
    then swapped in: ckpt -> ckpt.old, ckpt.tmp -> ckpt, ckpt.old deleted. `recover` (at start)
    finds the good one after a kill at any point: ckpt.tmp is never used, even when complete."""

    sharded, kind = True, "sharded (--fsdp)"

    def __init__(self, run_dir: str):
        self.dir, self.path = run_dir, os.path.join(run_dir, "ckpt")
        self.tmp, self.old = self.path + ".tmp", self.path + ".old"

    def recover(self):
        """Rank 0, before anything reads or writes the checkpoint."""
        if os.path.isdir(self.old):
            if os.path.isdir(self.path):  # killed after the swap
                shutil.rmtree(self.old)
            else:  # killed between the two renames: the old one is the good one
                os.rename(self.old, self.path)
        if os.path.isdir(self.tmp):  # killed while writing
            shutil.rmtree(self.tmp)

    def read(self) -> dict:
        if not os.path.isdir(self.path):
            raise UserError(f"training checkpoint to resume not found: {self.path}")
        return load_checkpoint(os.path.join(self.path, TRAIN_STATE), "training state to resume")

    def load(self, parts: dict, ckpt: dict):
        """The sharded parts from the DCP files (each rank reads what its shards need), the others
        from train_state.pt."""
        sharded = {name: part for name, part in parts.items() if isinstance(part, SHARDED)}
        state = dcp_state(sharded)
        dcp.load(state, checkpoint_id=self.path)
        model = _the_model(sharded)
        for name, part in sharded.items():
            if isinstance(part, torch.optim.Optimizer):
                set_optimizer_state_dict(model, part, state[name])
            else:
                set_model_state_dict(_module(part), state[name])
        for name, part in parts.items():
            if name not in sharded:
                part.load_state_dict(ckpt[name])

    def save(self, parts: dict, extras: dict, env, keep: str | None):
        """A collective: every rank writes its shards; rank 0 then writes train_state.pt (the
        per-rank values gathered) and swaps the folder in."""
        plain = {name: part.state_dict() for name, part in parts.items()
                 if not isinstance(part, SHARDED)}  # some gather (every rank's data position)
        dcp.save(dcp_state({n: p for n, p in parts.items() if isinstance(p, SHARDED)}),
                 checkpoint_id=self.tmp)  # returns when every rank's files are written and synced
        if env.is_main:
            save_checkpoint({**extras, **plain}, os.path.join(self.tmp, TRAIN_STATE))
            if os.path.isdir(self.path):
                os.rename(self.path, self.old)
            os.rename(self.tmp, self.path)
            if os.path.isdir(self.old):
                shutil.rmtree(self.old)
            if keep:  # hard links: files are never changed in place, only replaced by new folders
                shutil.copytree(self.path, self.tmp, copy_function=os.link)
                shutil.rmtree(os.path.join(self.dir, keep), ignore_errors=True)
                os.rename(self.tmp, os.path.join(self.dir, keep))
        env.barrier()


SHARDED = (torch.nn.Module, torch.optim.Optimizer, EMA)  # the parts whose tensors FSDP shards


def _module(part):
    return part.model if isinstance(part, EMA) else part


def _the_model(parts: dict) -> torch.nn.Module:
    """The trained model: an optimiser's state is saved keyed by its parameters' names in it."""
    models = [p for p in parts.values() if isinstance(p, torch.nn.Module)]
    assert len(models) == 1, "a sharded checkpoint holds one trained model (and its EMA)"
    return models[0]


def dcp_state(parts: dict) -> dict:
    """What DCP saves, and loads in place: each part's state dict of sharded tensors (DTensors),
    keyed by parameter names (optimisers too, which keep their state by parameter order)."""
    return {name: get_optimizer_state_dict(_the_model(parts), part)
            if isinstance(part, torch.optim.Optimizer) else get_model_state_dict(_module(part))
            for name, part in parts.items()}


def export(run_dir: str) -> str:
    """<run_dir>/export.pt from the sharded checkpoint <run_dir>/ckpt/: what sample.py loads (the
    run's identity and configuration, latent statistics, step, and the EMA weights whole), without
    the training state. One process reads only the EMA's tensors: one full copy in CPU memory.
    Under torchrun, call it on rank 0 only."""
    ckpt = ShardedCheckpoint(run_dir)
    ckpt.recover()
    if not os.path.isdir(ckpt.path):
        raise UserError(f"no sharded (--fsdp) checkpoint {ckpt.path} to export")
    reader = dcp.FileSystemReader(ckpt.path)
    ema = {key.removeprefix("ema."): torch.empty(m.size, dtype=m.properties.dtype)
           for key, m in reader.read_metadata().state_dict_metadata.items()
           if key.startswith("ema.") and isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():  # DCP's note that it reads in one process, as meant here
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load({"ema": ema}, storage_reader=reader, no_dist=True)
    state = ckpt.read()
    path = os.path.join(run_dir, EXPORT)
    save_checkpoint({**{k: v for k, v in state.items() if k not in ("rng", "data")}, "ema": ema},
                    path)
    return path


def export_run(run_dir: str):
    """`train_dit.py/train_t2i.py --export --run_dir RUN`: `export`, in one process."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError("--export reads the checkpoint in one process: run it with python, not "
                        "torchrun")
    print(f"EMA weights for sample.py -> {export(run_dir)}")
