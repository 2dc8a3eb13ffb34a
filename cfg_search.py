"""CFG search: the paper's gFID "at the best-searched CFG scale". For each guidance scale of
--cfg_scales (and each guidance-interval start of --interval_starts), sample N images (default 10K)
with sample.py's --npz machinery and compute FID, sFID and IS against a reference with fid.py; then
write a table (results.json, results.csv, printed), the metrics over the scale (fid_vs_cfg.png) and
the best setting (best.json), all in --out.

    torchrun --nproc_per_node=8 cfg_search.py ref.npz --steps 30 --cfg_scales 1.2 1.4 1.6 1.8 2.0
    python cfg_search.py ref.npz --cfg_channels 3 --cfg_scales 6 8 10 --interval_starts 0 0.1

(ref.npz: ADM's reference batch VIRTUAL_imagenet256_labeled.npz; the model: --ckpt.) Each setting
is sampled into <out>/cfg<w>_from<t>/ (split over the torchrun ranks; an interrupted setting resumes
from its shards), then evaluated. Every setting draws the same noise and labels (same --seed), so
the curve compares guidance, not luck. A reference of images is featurised once, into
<out>/reference_stats.npz. A setting whose fid.json exists is read back, not redone, if sweep.json
records the same model, tokenizer, sampler and reference. Samples are deleted once evaluated
(--keep_samples keeps them). Then sample the final 50K images at the best setting.
"""

import argparse
import copy
import os

import fid
import sample
from common import (HelpFormatter, Logger, at_least, atomic_write, cleanup_distributed, in_range,
                    load_json, plot_curves, save_json, script_main, setup_distributed)


def parse_args(argv=None):
    # no abbreviations: sample.py's `--cfg 2` must not pass for --cfg_scales 2
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                allow_abbrev=False)
    p.add_argument("reference", help="FID reference, as fid.py's (ADM's reference batch, "
                   "statistics, a folder or an .npz of images)")
    p.add_argument("--cfg_scales", type=in_range(0), nargs="+", required=True,
                   help="guidance scales w")
    p.add_argument("--interval_starts", type=in_range(0, 1, hi_open=True), nargs="+",
                   default=[0.0], help="guidance-interval starts t (sample.py's "
                   "--cfg_interval_start), each with every scale")
    p.add_argument("--num_samples", type=at_least(2), default=10_000,  # 1 gives a NaN covariance
                   help="samples per setting")
    p.add_argument("--out", default="runs/cfg_search", help="output folder (a subfolder a setting)")
    p.add_argument("--keep_samples", action="store_true", help="keep each setting's samples.npz")
    sample.add_label_args(p)
    p.add_argument("--fid_batch_size", type=int, default=50, help="Inception images a pass a rank")
    p.add_argument("--num_workers", type=int, default=4, help="workers for a reference folder")
    p.add_argument("--no_sfid", action="store_true", help="no sFID (a reference without mu_s)")
    p.add_argument("--inception_ckpt", help="local FID Inception weights (as fid.py's)")
    p.add_argument("--random_inception", action="store_true", help="tests and the demo only")
    p.add_argument("--rank_by", choices=["fid", "fd_dinov2"], default="fid",
                   help="the best setting's metric (fd_dinov2: computed too, as fid.py's)")
    p.add_argument("--dinov2_ckpt", help="local DINOv2 ViT-L/14 weights (as fid.py's)")
    p.add_argument("--random_dinov2", action="store_true", help="tests and the demo only")
    sample.add_model_args(p, "runs/dit/ckpt.pt")
    return p.parse_args(argv)


def write_results(rows: list[dict], out: str, log, rank_by: str = "fid") -> dict:
    """results.json, .csv, fid_vs_cfg.png, best.json (lowest `rank_by`); prints table and best."""
    rows = sorted(rows, key=lambda r: (r["cfg_interval_start"], r["cfg"]))
    save_json(rows, os.path.join(out, "results.json"))
    keys = ["cfg", "cfg_interval_start", "fid", "sfid", "inception_score", "num_samples"]
    keys[5:5] = ["fd_dinov2"] if rank_by == "fd_dinov2" else []
    table = [[f"{r[k]:.4f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
             for r in rows]
    csv = "\n".join(",".join(line) for line in [keys, *table]) + "\n"
    atomic_write(os.path.join(out, "results.csv"), lambda f: f.write(csv.encode()))
    for line in [keys, *table]:
        log("  ".join(f"{v:>18}" for v in line))
    several = len({r["cfg_interval_start"] for r in rows}) > 1  # a curve per interval start
    plot_curves([{"cfg": r["cfg"], **{name + (f" (t >= {r['cfg_interval_start']:g})" if several
                                              else ""): r[k]
                                      for name, k in (("FID", "fid"), ("sFID", "sfid"),
                                                      ("IS", "inception_score"),
                                                      ("FD_DINOv2", "fd_dinov2")) if k in r}}
                 for r in sorted(rows, key=lambda r: r["cfg"])],
                os.path.join(out, "fid_vs_cfg.png"), x="cfg")
    best = min(rows, key=lambda r: r[rank_by])
    log(f"best by {rank_by}: cfg {best['cfg']:g} from t={best['cfg_interval_start']:g}: "
        f"{fid.result_line(best)}; table, plot, best.json in {out}")
    best = {k: best[k] for k in [*keys, "reference", "labelling"] if k in best}
    save_json(best, os.path.join(out, "best.json"))
    return best


def main(argv=None):
    args = parse_args(argv)
    env = setup_distributed(args.device)
    log = Logger(env).info
    inception = fid.load_inception(args.inception_ckpt, args.random_inception, env.device)
    dinov2 = (fid.load_dinov2(args.dinov2_ckpt, args.random_dinov2, env.device)
              if args.rank_by == "fd_dinov2" else None)
    source = fid.load_source(args.reference, log=log)
    if isinstance(source, fid.FIDStatistics):  # before any sampling: can it give what is asked?
        fid.check_statistics(source, "reference", inception, False, not args.no_sfid, dinov2)
    s = copy.copy(args)  # sample.py's settings, each setting's guidance and folder filled in below
    s.cfg, s.cfg_interval_start, s.npz, s.keep_shards = 1.0, 0.0, True, False
    sampler = sample.class_sampler(s, env)
    # What every result depends on besides its guidance: a resumed sweep must match it.
    sweep = {k: v for k, v in sampler.settings().items() if k not in ("cfg", "cfg_interval_start")}
    sweep.update(reference=os.path.abspath(args.reference), no_sfid=args.no_sfid,
                 inception=args.inception_ckpt or ("random" if args.random_inception else ""),
                 dinov2=getattr(dinov2, "weights_name", None))
    if env.is_main:
        sample.match_settings(os.path.join(args.out, "sweep.json"), sweep, "a sweep")
    stats = os.path.join(args.out, "reference_stats.npz")  # a reference of images, featurised once
    rows = []
    for t in args.interval_starts:
        for w in args.cfg_scales:
            s.cfg, s.cfg_interval_start = w, t
            s.out = os.path.join(args.out, f"cfg{w:g}_from{t:g}")
            done = os.path.join(s.out, "fid.json")
            if os.path.exists(done):  # finished before, with the same sweep.json: read back
                rows.append(load_json(done, "sweep result"))
                log(f"cfg {w:g} from t={t:g}: {fid.result_line(rows[-1])} (done before)")
                continue
            path = sample.run_npz(sampler, log)
            result = fid.evaluate(path, stats if os.path.exists(stats) else args.reference,
                                  model=inception, env=env, batch_size=args.fid_batch_size,
                                  num_workers=args.num_workers, sfid=not args.no_sfid,
                                  save_stats=stats, log=log, dinov2=dinov2)
            rows.append({"cfg": w, "cfg_interval_start": t, **result})
            log(f"cfg {w:g} from t={t:g}: {fid.result_line(result)}")
            if env.is_main:
                save_json(rows[-1], done)
                if not args.keep_samples:
                    os.remove(path)
            env.barrier()  # no rank goes on before rank 0 has finished this setting
    best = write_results(rows, args.out, log, args.rank_by) if env.is_main else None
    cleanup_distributed()
    return best


if __name__ == "__main__":
    script_main(main)
