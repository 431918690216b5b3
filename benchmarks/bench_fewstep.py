"""Every few-step method of fewstep.py side by side at equal compute, scored the challenge's way.

Each method of fewstep.METHODS trains for the same wall-clock budget (--minutes) on mnist5k (train = even rows,
scored against the odd rows) with one preset and one set of training options, then is scored at NFE 1, 2, 4 with
--num-samples samples each (fid.py, clean mode). A method that learns from a trained run gets one shared `rf`
teacher of --teacher-minutes, and trains itself for the rest of the budget (minutes - teacher minutes), so that
teacher plus student cost what every other method costs; the teacher's minutes are shown in their own column. As
references: `rf` sampled with 100 Euler steps (the many-step quality at the same budget) and the data floor, the
FID of 1,000 real training digits (100 per class) against the same held-out half, i.e. real images at the sample
size of a generated set.

The spread of a 1,000-sample FID, printed with the table so that a reader knows which differences mean something:
the rf run re-sampled with --spread-seeds other sampling seeds at NFE 1 and 4, and rf trained again from
another seed at the same budget.

Everything is a run directory under --out, and the benchmark resumes where it stopped: a finished run (its
bench.json) is not trained or scored again, an interrupted one resumes from its ckpt.pt for the rest of its budget
(the budget counts the training seconds its checkpoint holds). Writes OUT/results.json, OUT/results.md and
OUT/grid.png (a row per method, columns of samples at NFE 1, 2, 4 from the same noise: evaluation noise is a function
of the seed only, so every method starts from the same images).

Usage:
    python benchmarks/bench_fewstep.py --minutes 10 --out runs/bench-fewstep          # every method, 10 min each
    python benchmarks/bench_fewstep.py --minutes 0.2 --num-samples 50 --methods rf shortcut --out /tmp/b  # smoke
"""
import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import fewstep  # noqa: E402
import fid  # noqa: E402

# Options every run shares (the README's mnist5k demo settings); per-method extras come from --method-args.
COMMON = ["--data", "mnist5k", "--batch-size", "64", "--lr", "1e-3", "--ema-decay", "0.999", "--warmup", "100"]


def trained_minutes(run):
    ckpt = Path(run) / "ckpt.pt"
    return torch.load(ckpt, weights_only=True).get("train_seconds", 0.0) / 60 if ckpt.exists() else 0.0


def train_and_score(run, argv, minutes, nfes, num_samples, log):
    """Train `run` for what is left of `minutes`, score it at `nfes`; the scores are kept in run/bench.json."""
    run = Path(run)
    done = run / "bench.json"
    if done.exists():
        log(f"{run.name}: finished earlier, {done}")
        return json.loads(done.read_text())
    left = minutes - trained_minutes(run)
    t0 = time.time()
    if left > 0.01:
        fewstep.main([*argv, "--minutes", f"{left:.4f}", "--out", str(run), "--no-fid", "--nfe", "1",
                      "--num-samples", "8"])  # training's own closing evaluation kept cheap; scored below
    result = score(run, nfes, num_samples)
    result.update(minutes=trained_minutes(run), steps=torch.load(run / "ckpt.pt", weights_only=True)["step"],
                  wall_minutes=(time.time() - t0) / 60)
    data.write_atomic(done, lambda f: f.write(json.dumps(result, indent=2) + "\n"), mode="w")
    return result


def score(run, nfes, num_samples, seed=0):
    ev = fewstep.main(["--out", str(run), "--eval-only", "--nfe", *map(str, nfes), "--num-samples",
                       str(num_samples), "--seed", str(seed)])
    return {"fid": {k: round(v, 2) for k, v in ev["fid"].items()}, "fid_ref": ev["fid_ref"]}


def copy_run(src, dst):
    """A copy of a trained run (checkpoint and config) to score again without touching the original's samples."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("ckpt.pt", "config.json"):
        shutil.copy2(src / name, dst / name)
    return dst


def data_floor(num_samples, out):
    """FID of real training digits (num_samples / 10 per class of the even half) against the odd half."""
    path = out / "floor.json"
    if path.exists():
        return json.loads(path.read_text())["fid"]
    even = data.load("mnist5k", split="even")  # (2500, 1, 28, 28), 250 per class in class order
    per = num_samples // 10
    real = torch.cat([even[250 * k: 250 * k + per] for k in range(10)])
    ref = fid.reference_statistics("mnist5k", fid.cache_dir() / "refs", split="odd", image_size=28, channels=1)
    value = round(fid.compute_fid(real.numpy(), ref), 2)
    data.write_atomic(path, lambda f: f.write(json.dumps({"fid": value, "n": len(real)}) + "\n"), mode="w")
    return value


def grid(out, methods, cols=4):
    """Row per method: the first `cols` samples at NFE 1, then 2, then 4 (the same evaluation noise for all)."""
    rows = []
    for name in methods:
        row = []
        for nfe in (1, 2, 4):
            folder = out / name / "samples" / f"nfe={nfe}"
            imgs = [np.asarray(Image.open(folder / f"{i:04d}.png")) for i in range(cols)] if folder.exists() else []
            imgs = imgs or [np.zeros((28, 28), np.uint8)] * cols  # an NFE the method cannot do: a black cell
            row += imgs + [np.full_like(imgs[0], 255)[:, :4]]  # a white bar between NFEs
        rows.append(np.concatenate(row[:-1], axis=1))
    img = np.concatenate([np.pad(r, ((2, 2), (0, 0)), constant_values=255) for r in rows], axis=0)
    Image.fromarray(img).resize((img.shape[1] * 3, img.shape[0] * 3), Image.NEAREST).save(out / "grid.png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="training budget per method (teacher included)")
    p.add_argument("--teacher-minutes", type=float, default=None, help="the shared rf teacher (default: half)")
    p.add_argument("--arch", default="mnist")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--methods", nargs="+", default=list(fewstep.METHODS))
    p.add_argument("--method-args", action="append", default=[],
                   help="METHOD=ARGS, extra fewstep.py options of one method, e.g. 'shortcut=--fm-d min'")
    p.add_argument("--spread-seeds", type=int, default=3, help="extra sampling seeds of the rf run")
    p.add_argument("--out", default="runs/bench-fewstep")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda *a: print("bench_fewstep:", *a, flush=True)  # noqa: E731
    extra = dict(s.split("=", 1) for s in args.method_args)
    teacher_minutes = args.minutes / 2 if args.teacher_minutes is None else args.teacher_minutes
    common = [*COMMON, "--arch", args.arch]

    teacher = out / "teacher-rf"
    if any(getattr(fewstep.METHODS[m], "needs_teacher", False) for m in args.methods):
        if trained_minutes(teacher) < teacher_minutes - 0.01:
            fewstep.main(["--method", "rf", *common, "--minutes", f"{teacher_minutes - trained_minutes(teacher):.4f}",
                          "--out", str(teacher), "--no-fid", "--nfe", "1", "--num-samples", "8"])
    results = {}
    for name in args.methods:
        cls = fewstep.METHODS[name]
        distills = getattr(cls, "needs_teacher", False)  # cm can distil but trains from scratch (iCT) by default
        nfes = [n for n in (1, 2, 4) if fewstep._supports(cls(), n)]
        argv_m = ["--method", name, *common, *extra.get(name, "").split()]
        if distills:
            argv_m += ["--teacher", str(teacher)]
        budget = args.minutes - (teacher_minutes if distills else 0.0)
        r = train_and_score(out / name, argv_m, budget, nfes, args.num_samples, log)
        r["teacher_minutes"] = trained_minutes(teacher) if distills else 0.0
        results[name] = r
        log(f"{name}: {r}")

    spread = {}
    if "rf" in results:
        rf100 = out / "rf-100-steps"
        if not (rf100 / "bench.json").exists():
            r = score(copy_run(out / "rf", rf100), [100], args.num_samples)
            data.write_atomic(rf100 / "bench.json", lambda f: f.write(json.dumps(r) + "\n"), mode="w")
        results["rf, 100 Euler steps"] = dict(json.loads((rf100 / "bench.json").read_text()),
                                              minutes=results["rf"]["minutes"], steps=results["rf"]["steps"])
        for seed in range(1, args.spread_seeds + 1):
            d = out / f"spread-sampling-seed{seed}"
            if not (d / "bench.json").exists():
                r = score(copy_run(out / "rf", d), [1, 4], args.num_samples, seed=seed)
                data.write_atomic(d / "bench.json", lambda f: f.write(json.dumps(r) + "\n"), mode="w")
            spread[f"sampling seed {seed}"] = json.loads((d / "bench.json").read_text())["fid"]
        r = train_and_score(out / "spread-training-seed1", ["--method", "rf", *common, "--seed", "1"],
                            args.minutes, [1, 4], args.num_samples, log)
        spread["training seed 1"] = r["fid"]
        spread["sampling seed 0 / training seed 0"] = {k: results["rf"]["fid"][k] for k in ("1", "4")}
    floor = data_floor(args.num_samples, out)

    lines = [f"Budget {args.minutes:g} min per method (teacher included), preset {args.arch}, mnist5k even -> odd, "
             f"{args.num_samples} samples per NFE, fid.py clean mode.", "",
             "| method | minutes | teacher minutes | iterations | FID NFE 1 | NFE 2 | NFE 4 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        f = r["fid"]
        cells = [f.get(k, "-") for k in ("1", "2", "4")] if "100" not in f else [f"{f['100']} (NFE 100)", "", ""]
        lines.append(f"| {name} | {r['minutes']:.1f} | {r.get('teacher_minutes', 0):.1f} | {r['steps']:,} | "
                     + " | ".join(map(str, cells)) + " |")
    lines += ["", f"Data floor (1,000 real training digits vs the held-out half): {floor}"]
    if spread:
        for nfe in ("1", "4"):
            vals = [v[nfe] for v in spread.values()]
            lines.append(f"Spread of rf's NFE-{nfe} FID over {len(vals)} runs (sampling and training seeds): "
                         f"{min(vals)} .. {max(vals)} (sd {statistics.pstdev(vals):.2f}); " +
                         ", ".join(f"{k}: {v[nfe]}" for k, v in spread.items()))
    text = "\n".join(lines) + "\n"
    print(text)
    data.write_atomic(out / "results.md", lambda f: f.write(text), mode="w")
    data.write_atomic(out / "results.json", lambda f: f.write(json.dumps(
        {"results": results, "spread": spread, "floor": floor, "minutes": args.minutes,
         "teacher_minutes": teacher_minutes, "arch": args.arch, "num_samples": args.num_samples}, indent=2)), mode="w")
    grid(out, [m for m in args.methods if (out / m / "samples").exists()])
    log(f"{out / 'results.md'}, {out / 'results.json'}, {out / 'grid.png'}")


if __name__ == "__main__":
    main()
