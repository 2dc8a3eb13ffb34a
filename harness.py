"""The bookkeeping of a training run, which every trainer's loop calls explicitly (`Run`): refuse to
overwrite a run, exact resume (every state dict and every rank's RNG), log lines and checkpoints at
their cadence (one file, or a sharded folder under FSDP: checkpoints.py), a graceful stop on
SIGTERM/Ctrl-C, a guard against non-finite losses; and the run's log file (`read_log`) and curves
(`plot_curves`).
"""

import json
import os
import signal
import sys
import time
import warnings

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from tqdm import tqdm

import checkpoints
import flops
from common import DistEnv, Logger, UserError, atomic_write, check_writable, use_bf16, use_compile


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
    """Restore this rank's RNG state. A rank the checkpoint did not have (resumed on more ranks)
    gets a seed drawn from a saved state and its rank: a copy of another rank's would repeat that
    rank's noise."""
    if env.rank < len(states):
        torch.set_rng_state(states[env.rank]["torch"])
        if "cuda" in states[env.rank] and env.device.type == "cuda":
            torch.cuda.set_rng_state(states[env.rank]["cuda"], env.device)
        return
    saved = torch.Generator().set_state(states[env.rank % len(states)]["torch"])
    torch.manual_seed(int(torch.randint(0, 2 ** 62, (), generator=saved)) + env.rank)


class NonFiniteGuard:
    """Remembers on the device the first step with a non-finite loss: `update` needs no host
    sync; `check`, before anything is logged or saved, stops the run, so no checkpoint is written
    after it."""

    NONE = 2 ** 62  # no bad step yet: above every step, so that the ranks' minimum is the first

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), self.NONE, dtype=torch.long, device=device)

    def update(self, values: torch.Tensor, step: int):
        bad = (self.first_bad == self.NONE) & ~torch.isfinite(values.detach()).all()
        self.first_bad = torch.where(bad, step, self.first_bad)

    def check(self, env: DistEnv, ckpt_path: str, advice: str):
        bad = self.first_bad.clone()
        if env.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        if bad.item() != self.NONE:
            raise UserError(f"non-finite loss at step {bad.item()}: the run is stopped and no "
                            f"checkpoint was written after it; the last good one is {ckpt_path}. "
                            f"{advice}")


class StopSignal:
    """SIGTERM (pre-emption, `kill`) and a first Ctrl-C become a flag the loop checks between steps,
    so that it saves and exits cleanly; a second Ctrl-C aborts at once."""

    def __init__(self, every: int = 10):
        self.requested, self.every = False, every
        signals = (signal.SIGTERM, signal.SIGINT)
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def should_stop(self, env: DistEnv, step: int) -> bool:
        """Under DDP all ranks must agree, which is a host sync, so they compare flags every
        `every` steps (not only at log steps: torchrun kills its workers 30 s after
        forwarding a SIGTERM)."""
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
        name = signal.Signals(signum).name
        print(f"\n[rank {os.environ.get('RANK', 0)}] received {name}: saving a checkpoint "
              "and stopping (Ctrl-C again to abort)", file=sys.stderr, flush=True)


class Run:
    """The bookkeeping of one training run, called explicitly by the trainer's loop (nanoGPT-style):

        with Run(env, args, run_dir, identity, state, ...) as run:
            start = run.resume() if args.resume else 0
            for step in range(start, args.steps):
                ...                              # batch, loss, backward, optimiser step, EMA
                run.record(loss=loss, **parts)   # device values: summed, NaN-watched, no host sync
                done = step + 1
                if run.due(args.log_every, done):
                    run.log(done, lr=...)        # ranks' means -> console, log.jsonl, TensorBoard
                stop = run.stop_requested(done)  # SIGTERM/Ctrl-C, agreed by all ranks
                if run.due(args.ckpt_every, done) or stop:
                    run.save(done)               # ckpt.pt or ckpt/ (+ kept copies)
                if stop:
                    break

    `identity` (e.g. kind, stage, architecture) goes into every checkpoint and must match on
    `--resume`; `state` maps names to the parts with a state dict (models, EMA, optimisers, data
    position), which a checkpoint saves with every rank's RNG and `resume` restores exactly. `log`
    and `save` refuse to go past a non-finite recorded value. Leaving the `with` block closes the
    progress bar and the signal handlers and, after a run that was not interrupted by an error,
    draws the curves; after a sharded (--fsdp) run that reached its last step, it writes export.pt,
    the single file that sample.py loads (checkpoints.export). `stopped` is True after a
    SIGTERM/Ctrl-C stop (script_main then exits with EXIT_STOPPED).
    """

    def __init__(self, env, args, run_dir: str, identity: dict, state: dict,
                 meta: dict | None = None, batch_size: int = 1, skipped=None, nan_advice: str = "",
                 show=("loss",), flops_per_image: int | None = None):
        self.env, self.args, self.dir, self.total = env, args, run_dir, args.steps
        self.identity, self.state, self.meta = identity, state, meta or {}
        self.batch_size, self.flops_per_image = batch_size, flops_per_image
        self.skipped = skipped or (lambda: 0)  # unreadable files so far (a collective)
        self.nan_advice, self.show = nan_advice, show
        self.sharded = bool(getattr(args, "fsdp", None))
        if env.is_main:
            checkpoints.ShardedCheckpoint(run_dir).recover()  # after a kill during a sharded save
        env.barrier()
        self.checkpoint = checkpoints.open_checkpoint(run_dir, self.sharded, args.resume)
        self.ckpt_path = self.checkpoint.path
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
        self.step, self._t0, self._n = 0, time.time(), 0  # steps done (every rank counts them)
        if not args.resume:
            self._log_event("start", 0)

    def info(self, msg: str):
        self.logger.info(msg)

    def resume(self) -> int:
        """Restore every part and every rank's RNG from the checkpoint; returns the step to continue
        from. The optimisers keep this run's lr, betas and weight decay, so that `--resume --lr
        1e-5` after a loss spike does lower the lr. A sharded checkpoint resumes on any number of
        ranks (DCP reshards it); ranks it did not have get RNG streams of their own
        (set_rng_states)."""
        ckpt = self.checkpoint.read()
        differ = {k: (ckpt.get(k), v) for k, v in self.identity.items() if ckpt.get(k) != v}
        if differ:
            why = "; ".join(f"{k} is {a!r} there but {b!r} here" for k, (a, b) in differ.items())
            raise UserError(f"{self.ckpt_path} comes from a different run: " + why
                            + " (other architecture flags, or other latents/tokenizer?)")
        opts = [p for p in self.state.values() if isinstance(p, torch.optim.Optimizer)]
        hyper = [[{k: g[k] for k in ("lr", "betas", "weight_decay") if k in g}
                  for g in opt.param_groups] for opt in opts]
        self.checkpoint.load(self.state, ckpt)
        for opt, groups in zip(opts, hyper):
            for group, h in zip(opt.param_groups, groups):
                group.update(h)
        set_rng_states(ckpt["rng"], self.env)
        ranks = (f" (saved on {len(ckpt['rng'])} ranks)" if len(ckpt["rng"]) != self.env.world_size
                 else "")
        self.info(f"resumed at step {ckpt['step']} from {self.ckpt_path}{ranks}")
        # A resumed run re-runs the steps after its checkpoint: its records replace the earlier
        # records of those steps (`read_log` keeps the last).
        self._log_event("resume", ckpt["step"])
        self.pbar.update(ckpt["step"])
        self.step, self._t0 = ckpt["step"], time.time()  # the first step's time: from here
        return ckpt["step"]

    def record(self, **values: torch.Tensor):
        """This step's scalar device tensors: summed on the device for the next log line (no host
        sync) and watched for NaN/inf. A value may be missing in some steps
        (GAN terms before the GAN)."""
        self.step += 1
        self.guard.update(torch.stack([v.detach().float() for v in values.values()]), self.step)
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
        postfix = " ".join(f"{k} {record[k]:.4g}" for k in self.show if k in record)
        self.pbar.set_postfix_str(postfix)
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
        """Every state dict and every rank's RNG: all a resume needs; also kept as ckpt_<step>
        every --keep_every steps. A collective: all ranks call it."""
        self.guard.check(self.env, self.ckpt_path, self.nan_advice)  # never save past a NaN
        extras = {**self.identity, "step": done, **self.meta, "rng": rng_states(self.env),
                  "args": vars(self.args)}
        keep = self.args.keep_every and done % self.args.keep_every == 0
        self.checkpoint.save(self.state, extras, self.env, f"ckpt_{done:07d}" if keep else None)
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
                self.info(f"{skipped} unusable samples were skipped (see the warnings above)")
            if self.logger.path:
                self._draw_curves()
            if self.sharded and not self.stopped and self.env.is_main:
                self.info(f"EMA weights for sample.py -> {checkpoints.export(self.dir)}")
            self.env.barrier()

    def _log_event(self, event: str, step: int):
        args = self.args
        plain = (str, int, float, bool, type(None))
        meta = {k: v for k, v in self.meta.items() if isinstance(v, plain)}
        self.logger.log({"event": event, "step": step, "args": vars(args), **meta})

    def _draw_curves(self):
        self._drawn = time.time()
        plot_curves(read_log(self.logger.path), os.path.join(self.dir, "curves.png"))


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
            if r.get("event") == "start":  # a new run in this folder (an earlier one left no
                by_step = {}                # checkpoint): its records replace all earlier ones
            elif r.get("event") == "resume":
                by_step = {s: rec for s, rec in by_step.items() if s <= r["step"]}
            elif "step" in r and "event" not in r:
                by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def plot_curves(records: list[dict], path: str, width: int = 300, height: int = 170,
                x: str = "step"):
    """A PNG of every logged number over the steps (or over another key `x`, the records sorted by
    it), one small panel each (losses, lr, images/s; FID over the CFG scale)."""
    keys = list(dict.fromkeys(k for r in records for k, v in r.items()
                              if k not in ("time", x, "epoch") and isinstance(v, (int, float))))
    cols = min(3, max(1, len(keys)))
    canvas = Image.new("RGB", (cols * width, max(1, -(-len(keys) // cols)) * height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, key in enumerate(keys):
        points = [(r[x], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        # the panel's plot area: (x0, y0) + w x h
        x0, y0 = (i % cols) * width + 45, (i // cols) * height + 20
        w, h = width - 60, height - 45
        lo, hi = min(v for _, v in points), max(v for _, v in points)
        s_lo = points[0][0]
        s_hi = points[-1][0] if points[-1][0] > s_lo else s_lo + 1
        xy = [(x0 + w * (s - s_lo) / (s_hi - s_lo), y0 + h * (1 - (v - lo) / ((hi - lo) or 1)))
              for s, v in points]
        draw.rectangle([x0, y0, x0 + w, y0 + h], outline=(180, 180, 180))
        draw.line(xy if len(xy) > 1 else xy * 2, fill=(30, 90, 200), width=2)
        draw.text((x0, y0 - 15), key, fill="black")
        draw.text((x0 - 42, y0 - 4), f"{hi:.3g}", fill=(90, 90, 90))
        draw.text((x0 - 42, y0 + h - 8), f"{lo:.3g}", fill=(90, 90, 90))
        draw.text((x0, y0 + h + 3), f"{x} {s_lo}", fill=(90, 90, 90))
        draw.text((x0 + w - 60, y0 + h + 3), f"{points[-1][0]}", fill=(90, 90, 90))
    atomic_write(path, lambda f: canvas.save(f, format="PNG"))
