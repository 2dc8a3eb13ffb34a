"""CFG search: the paper's gFID "at the best-searched CFG scale". For each guidance scale of
--cfg_scales (and each guidance-interval start of --interval_starts), sample N images (default 10K)
with sample.py and compute FID, sFID and IS against a reference with fid.py; then write a table
(results.json, results.csv, printed), a plot of the metrics against the scale (fid_vs_cfg.png) and
the best setting (best.json), all in --out.

    torchrun --nproc_per_node=8 cfg_search.py ref.npz --steps 30 --cfg_scales 1.2 1.4 1.6 1.8 2.0
    python cfg_search.py ref.npz --cfg_channels 3 --cfg_scales 6 8 10 --interval_starts 0 0.1

(ref.npz: ADM's reference batch VIRTUAL_imagenet256_labeled.npz; the DiT: sample.py's --ckpt.)

Every flag not listed below is sample.py's (--ckpt, --steps, --cfg_channels, --batch_size, --seed,
...). Each setting is `sample.py --npz` into <out>/cfg<w>_from<t>/ (split over the torchrun ranks;
an interrupted setting resumes from its shards), then fid.py's evaluation. Every setting draws the
same noise and labels (same --seed), so the curve compares guidance, not luck. A reference of images
is featurised once into <out>/reference_stats.npz. A setting whose fid.json exists is read back,
not redone: an interrupted sweep resumes where it stopped. Samples are deleted once evaluated
(--keep_samples keeps them). Then sample the 50K images of the final number at the best setting.
"""

import argparse
import os

import fid
import sample
from common import (
    HelpFormatter,
    Logger,
    UserError,
    at_least,
    atomic_write,
    check_writable,
    cleanup_distributed,
    load_json,
    save_json,
    script_main,
    setup_distributed,
)
from harness import plot_curves

SET_BY_THE_SWEEP = (
    "--cfg",
    "--cfg_interval_start",
    "--npz",
    "--out",
    "--num_samples",
    "--prompt",
    "--prompts",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=HelpFormatter,
        allow_abbrev=False,
        epilog="Any other flag is sample.py's: python sample.py --help",
    )
    p.add_argument(
        "reference",
        help="FID reference, as fid.py's REFERENCE (ADM's reference batch, statistics, "
        "a folder or an .npz of images)",
    )
    p.add_argument(
        "--cfg_scales",
        type=at_least(0.0, float),
        nargs="+",
        required=True,
        help="guidance scales w",
    )
    p.add_argument(
        "--interval_starts",
        type=at_least(0.0, float),
        nargs="+",
        default=[0.0],
        help="guidance-interval starts t (sample.py --cfg_interval_start), each with every scale",
    )
    p.add_argument("--num_samples", type=at_least(2), default=10_000, help="samples per setting")
    p.add_argument(
        "--out", default="runs/cfg_search", help="output folder (one subfolder per setting)"
    )
    p.add_argument("--keep_samples", action="store_true", help="keep each setting's samples.npz")
    p.add_argument(
        "--fid_batch_size", type=at_least(1), default=50, help="Inception images per pass per rank"
    )
    p.add_argument(
        "--num_workers", type=at_least(0), default=4, help="decoding workers for a reference folder"
    )
    p.add_argument(
        "--no_sfid", action="store_true", help="no sFID (a reference without mu_s/sigma_s)"
    )
    p.add_argument("--inception_ckpt", help="local FID Inception weights (as fid.py)")
    p.add_argument(
        "--random_inception", action="store_true", help="random Inception weights: tests/demo only"
    )
    args, rest = p.parse_known_args(argv)
    taken = [flag for flag in SET_BY_THE_SWEEP if any(a.split("=")[0] == flag for a in rest)]
    if taken:
        p.error(
            f"{', '.join(taken)}: set by the sweep (--cfg_scales, --interval_starts, "
            "--num_samples, --out); class-conditional models only"
        )
    if any(t >= 1 for t in args.interval_starts):
        p.error(
            "argument --interval_starts: each must be in [0, 1) (1 would mean no guidance at all)"
        )
    args.sample = sample.parse_args([*rest, "--npz", "--num_samples", str(args.num_samples)])
    return args


def reference_path(args, inception, env, log) -> str:
    """The reference as fid.evaluate takes it: statistics as they are, or images featurised once."""
    source = fid.load_source(args.reference, log=log)
    if isinstance(source, fid.FIDStatistics):
        return args.reference
    path = os.path.join(args.out, "reference_stats.npz")
    if not os.path.exists(path):
        pool, _, spatial = fid.compute_activations(
            source,
            inception,
            env,
            args.fid_batch_size,
            args.num_workers,
            spatial=True,
            desc="reference features",
        )
        if env.is_main:
            fid.FIDStatistics.from_features(pool, name=args.reference, spatial=spatial).save(path)
            log(
                f"statistics of the {len(pool)} images of {args.reference} written to {path}"
            )
    env.barrier()
    return path


def write_results(rows: list[dict], out: str, log):
    """results.json, results.csv, fid_vs_cfg.png and best.json; prints the table and the best."""
    rows = sorted(rows, key=lambda r: (r["cfg_interval_start"], r["cfg"]))
    save_json(rows, os.path.join(out, "results.json"))
    keys = ["cfg", "cfg_interval_start", "fid", "sfid", "inception_score", "num_samples"]
    table = [
        [
            f"{r.get(k, float('nan')):.4f}" if isinstance(r.get(k), float) else str(r.get(k, ""))
            for k in keys
        ]
        for r in rows
    ]
    atomic_write(
        os.path.join(out, "results.csv"),
        lambda f: f.write("\n".join(",".join(line) for line in [keys, *table]).encode() + b"\n"),
    )
    log("  ".join(f"{k:>18}" for k in keys))
    for line in table:
        log("  ".join(f"{v:>18}" for v in line))
    starts = sorted({r["cfg_interval_start"] for r in rows})
    name = (lambda key, t: f"{key} (t >= {t:g})") if len(starts) > 1 else (lambda key, t: key)
    plot_curves(
        [
            {
                "cfg": r["cfg"],
                **{
                    name(k, r["cfg_interval_start"]): r[m]
                    for k, m in (("FID", "fid"), ("sFID", "sfid"), ("IS", "inception_score"))
                    if m in r
                },
            }
            for r in sorted(rows, key=lambda r: r["cfg"])
        ],
        os.path.join(out, "fid_vs_cfg.png"),
        x="cfg",
    )
    best = min(rows, key=lambda r: r["fid"])
    log(
        f"best: cfg {best['cfg']:g} from t={best['cfg_interval_start']:g}: FID {best['fid']:.4f} "
        f"({best['num_samples']} samples vs {best['reference']}); table, plot, best.json in {out}"
    )
    best = {k: best[k] for k in [*keys, "reference"] if k in best}
    save_json(best, os.path.join(out, "best.json"))
    return best


def main(argv=None):
    args = parse_args(argv)
    s = sample.complete_args(args.sample)
    env = setup_distributed(s.device)
    log = Logger(env).info
    if not os.path.exists(args.reference):
        raise UserError(f"the reference {args.reference} does not exist")
    settings = [(t, w) for t in args.interval_starts for w in args.cfg_scales]
    folder = {(t, w): os.path.join(args.out, f"cfg{w:g}_from{t:g}") for t, w in settings}
    # What every result depends on, besides its own setting: a resumed sweep must match it.
    sweep = dict(
        reference=os.path.abspath(args.reference),
        ckpt=os.path.abspath(s.ckpt),
        num_samples=s.num_samples,
        steps=s.steps,
        shift=s.shift,
        solver=s.solver,
        seed=s.seed,
        cfg_channels=s.cfg_channels,
        classes=s.classes,
        raw_weights=s.raw_weights,
        no_sfid=args.no_sfid,
        inception=args.inception_ckpt or ("random" if args.random_inception else "default"),
    )
    sweep_path = os.path.join(args.out, "sweep.json")
    if env.is_main:
        check_writable(sweep_path, "sweep settings")
        old = load_json(sweep_path, "sweep settings") if os.path.exists(sweep_path) else sweep
        if old != sweep:
            raise UserError(
                f"{args.out} holds a sweep with other settings (was, now: "
                f"{ {k: (old.get(k), v) for k, v in sweep.items() if old.get(k) != v} }); choose "
                "another --out or delete that folder"
            )
        save_json(sweep, sweep_path)
    s.out = folder[settings[0]]
    model, tokenizer, meta, task, bf16 = sample.setup(s, env, log)
    inception = fid.load_inception(args.inception_ckpt, args.random_inception, env.device)
    reference = reference_path(args, inception, env, log)
    rows = []
    for t, w in settings:
        done = os.path.join(folder[t, w], "fid.json")
        if os.path.exists(done):  # finished before this run: read back, not redone
            rows.append(load_json(done, "sweep result"))
            log(f"cfg {w:g} from t={t:g}: {fid.result_line(rows[-1])} (done before)")
            continue
        s.cfg, s.cfg_interval_start, s.out = w, t, folder[t, w]
        path = sample.run_npz(s, env, model, tokenizer, meta, task, bf16, log)
        result = fid.evaluate(
            path,
            reference,
            model=inception,
            dist_env=env,
            batch_size=args.fid_batch_size,
            num_workers=args.num_workers,
            sfid=not args.no_sfid,
            log=log,
        )
        rows.append({"cfg": w, "cfg_interval_start": t, **result})
        log(f"cfg {w:g} from t={t:g}: {fid.result_line(result)}")
        if env.is_main:
            save_json(rows[-1], done)
            if not args.keep_samples:
                os.remove(path)
        env.barrier()  # no rank goes on before rank 0 has finished this setting
    best = write_results(rows, args.out, log) if env.is_main else None
    cleanup_distributed()
    return best


if __name__ == "__main__":
    script_main(main)
