"""CFG search for the paper's gFID "at the best-searched CFG scale": sample.py --npz, then fid.py.

    torchrun --nproc_per_node=8 cfg_search.py ref.npz --steps 30 --cfg_scales 1.2 1.4 1.6 1.8 2.0
    python cfg_search.py ref.npz --cfg_channels 3 --cfg_scales 6 8 10 --interval_starts 0 0.1
"""

import argparse
import itertools
import os

import fid
import sample
from common import (HelpFormatter, Logger, at_least, atomic_write, cleanup_distributed, in_range,
                    load_json, plot_curves, save_json, script_main, setup_distributed)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                allow_abbrev=False)  # sample.py's --cfg 2 is no --cfg_scales 2
    p.add_argument("reference", help="FID reference: ADM's batch, statistics, images (as fid.py)")
    p.add_argument("--cfg_scales", type=in_range(0), nargs="+", required=True, help="scales w")
    p.add_argument("--interval_starts", type=in_range(0, 1, hi_open=True), nargs="+",
                   default=[0.0], help="guidance-interval starts t, each with every scale")
    p.add_argument("--num_samples", type=at_least(2), default=10_000, help="a setting's samples")
    p.add_argument("--out", default="runs/cfg_search", help="output folder (a subfolder a setting)")
    p.add_argument("--keep_samples", action="store_true", help="keep each setting's samples.npz")
    p.add_argument("--num_workers", type=int, default=4, help="workers for a reference folder")
    p.add_argument("--no_sfid", action="store_true", help="no sFID (a reference without mu_s)")
    p.add_argument("--rank_by", choices=["fid", "fd_dinov2"], default="fid", help="best by this")
    for net in ("inception", "dinov2"):
        p.add_argument(f"--{net}_ckpt", help=f"local {net} weights (as fid.py's)")
        p.add_argument(f"--random_{net}", action="store_true", help="tests and the demo only")
    sample.add_args(p, "runs/dit/ckpt.pt", output=False)
    return p.parse_args(argv)


def write_results(rows: list[dict], out: str, log, rank_by: str = "fid") -> dict:
    """`rows` by t, then cfg -> results.json, .csv, fid_vs_cfg.png, best.json (lowest `rank_by`)."""
    save_json(rows, os.path.join(out, "results.json"))
    names = {"fid": "FID", "sfid": "sFID", "inception_score": "IS", "fd_dinov2": "FD_DINOv2"}
    keys = [k for k in ("cfg", "cfg_interval_start", *names, "num_samples") if k in rows[0]]
    table = [keys] + [[f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k]) for k in keys]
                      for r in rows]
    csv = "".join(",".join(line) + "\n" for line in table)
    atomic_write(os.path.join(out, "results.csv"), lambda f: f.write(csv.encode()))
    log("\n".join("  ".join(f"{v:>18}" for v in line) for line in table))
    curves = [{"cfg": r["cfg"], **{f"{name} (t >= {r['cfg_interval_start']:g})": r[k]
                                   for k, name in names.items() if k in r}} for r in rows]
    plot_curves(curves, os.path.join(out, "fid_vs_cfg.png"), x="cfg")
    best = min(rows, key=lambda r: r[rank_by])
    log(f"best by {rank_by}: cfg {best['cfg']:g} from t={best['cfg_interval_start']:g} ({out})")
    save_json(best, os.path.join(out, "best.json"))
    return best


def main(argv=None):
    args = parse_args(argv)
    env = setup_distributed(args.device)
    log = Logger(env).info
    inception = fid.load_inception(args.inception_ckpt, args.random_inception, env.device)
    dinov2 = (fid.load_dinov2(args.dinov2_ckpt, args.random_dinov2, env.device)
              if args.rank_by == "fd_dinov2" else None)
    source = fid.load_source(args.reference, log=log)  # checked before any sampling
    fid.check_statistics(source, "reference", inception, False, not args.no_sfid, dinov2)
    out, args.keep_shards = args.out, False  # args becomes sample.py's, guidance and folder below
    args.cfg = args.cfg_interval_start = None  # as sweep.json records them: in no result's folder
    sampler = sample.class_sampler(args, env)
    sweep = dict(sampler.settings(), no_sfid=args.no_sfid, inception=inception.weights_name,
                 reference=os.path.abspath(args.reference), dinov2=dinov2 and dinov2.weights_name)
    if env.is_main:  # what every result depends on besides its guidance: a resumed sweep must match
        sample.match_settings(os.path.join(out, "sweep.json"), sweep, "a sweep")
    stats = os.path.join(out, "reference_stats.npz")  # a reference of images, featurised once
    scoring = dict(model=inception, env=env, batch_size=args.batch_size, dinov2=dinov2,
                   num_workers=args.num_workers, sfid=not args.no_sfid, save_stats=stats)
    rows = []
    for t, w in itertools.product(sorted(args.interval_starts), sorted(args.cfg_scales)):
        args.cfg, args.cfg_interval_start, args.out = w, t, os.path.join(out, f"cfg{w:g}_from{t:g}")
        done = os.path.join(args.out, "fid.json")  # finished before, with the same sweep.json
        if not os.path.exists(done):
            path = sample.run_npz(sampler, log)  # the same noise and labels in every setting
            result = fid.evaluate(path, stats if os.path.exists(stats) else source, **scoring)
            if env.is_main:
                save_json({"cfg": w, "cfg_interval_start": t, **result}, done)
                if not args.keep_samples:
                    os.remove(path)
            env.barrier()  # no rank goes on before rank 0 has finished this setting
        rows.append(load_json(done, "sweep result"))  # a shared folder, as for sample.py
        log(f"cfg {w:g} from t={t:g}: {fid.result_line(rows[-1])}")
    best = write_results(rows, out, log, args.rank_by) if env.is_main else None
    cleanup_distributed()
    return best


if __name__ == "__main__":
    script_main(main)
