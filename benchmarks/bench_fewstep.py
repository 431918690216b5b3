"""Every few-step method of fewstep.py side by side at equal compute, scored the challenge's way.

Each method of fewstep.METHODS trains for the same wall-clock budget (--minutes) on mnist5k (train = even rows,
scored against the odd rows) with one preset (--arch, unless BUDGET_ARGS gives a method its own) and one set of
training options, then is scored at NFE 1, 2, 4 with --num-samples samples each (fid.py, clean mode). A method
that learns from a trained run gets one shared `rf` teacher of --teacher-minutes, and trains itself for the rest
of the budget (minutes - teacher minutes), so that teacher plus student cost what every other method costs; the
teacher's minutes are shown in their own column. As references: the shared teacher itself at NFE 1, 2, 4 (what
the distillers start from, at half the budget), `rf` sampled with 100 Euler steps (the many-step quality at the
same budget) and the data floor, the FID of 1,000 real training digits (100 per class) against the same held-out
half, i.e. real images at the sample size of a generated set.

The spread of a 1,000-sample FID, printed with the table so that a reader knows which differences mean something:
the rf run re-sampled with --spread-seeds other sampling seeds at NFE 1 and 4, and rf trained again from
another seed at the same budget (--no-training-spread leaves that run out, e.g. for a second preset).

Options per method: one set of mnist5k settings for all (COMMON), plus BUDGET_ARGS, the schedule lengths that
papers set for hundreds of thousands of iterations cut to what fits the budget (reflow's pairs, cm's curriculum,
ctm's teacher steps, pd's rounds); --method-args METHOD=ARGS replaces a method's entry. Reflow's pair generation
counts as its training time. All training runs come first, then all scoring, so that nothing else in the benchmark
competes with a timed run for the cores (scoring is not timed).

Everything is a run directory under --out, and the benchmark resumes where it stopped: a finished run (its
bench.json) is not trained or scored again, an interrupted one resumes from its ckpt.pt for the rest of its budget
(the budget counts the training seconds its checkpoint holds). Writes OUT/results.json, OUT/results.md and
OUT/grid.png (a row per method, columns of samples at NFE 1, 2, 4 from the same noise: evaluation noise is a function
of the seed only, so every method starts from the same images).

Class-conditional (--class-cond): the digits are the labels, every method trains with label dropout and is scored on
num_samples / 10 samples of each digit. --guidance W adds, for every method, a row guided at scale W at equal NFE:
rf, shortcut, imf and pmf choose their scale at sampling, so that row samples the same run again (a guided rf or
shortcut step costs 2 NFE: no NFE 1); meanflow trains its scale in and the distillers learn the teacher's guided
velocity, so those are trained again with W for the same budget (cm and scm trained from scratch learn no guided
field: no such row). It ends with the best score at each NFE with and without guidance.

Usage:
    python benchmarks/bench_fewstep.py --minutes 10 --out runs/bench-fewstep          # every method, 10 min each
    python benchmarks/bench_fewstep.py --minutes 10 --class-cond --guidance 2 --out runs/bench-cc    # labels
    python benchmarks/bench_fewstep.py --minutes 0.2 --num-samples 50 --methods rf shortcut --out /tmp/b  # smoke
"""
import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import fewstep  # noqa: E402
import fid  # noqa: E402
import rundir  # noqa: E402
import trainer  # noqa: E402

# Options every run shares; per-method extras come from BUDGET_ARGS or --method-args.
COMMON = ["--data", "mnist5k", "--batch-size", "64", "--lr", "1e-3", "--ema-decay", "0.999", "--warmup", "100"]


# Per-method options for a budget of minutes rather than days: the schedule lengths that papers set for hundreds of
# thousands of iterations, cut to what fits. Each is a fewstep.py option; --method-args replaces a method's entry.
# The runs behind each choice are rows of the ablation table in benchmarks/README.md.
BUDGET_ARGS = {
    # Pairs from a 16-step teacher (a 100-step one would spend the whole budget on the pairs), whose generation
    # counts as training time.
    "reflow": "--num-pairs 2000 --teacher-steps 16",
    # iCT's discretisation curriculum must reach its end within the run, on the slower machines too; pd's rounds
    # below are sized the same way.
    "cm": "--cm-total-steps 700",
    # 17 teacher Heun steps per target make a step several rf steps; 4 leave a few hundred steps in the budget.
    "ctm": "--ctm-heun-steps 4",
    # Four rounds (16 -> 8 -> 4 -> 2 -> 1 steps) of 50 iterations each fit the student's half of the budget on the
    # slowest machine so far (a pd step, two teacher calls per target, costs about two rf steps).
    "pd": "--pd-start-steps 16 --pd-round-steps 50",
    # imf: its step costs about two rf steps, so a short budget favours the smaller tiny preset; du/dt by a central
    # finite difference (--jvp-fd-step) halves the cost of a step on the CPU for the same gradient; the network
    # sees 30 t and 30 (s - t): the tiny preset's narrow embedding of t itself is nearly linear over [0, 1].
    "imf": "--arch tiny --jvp-fd-step 3e-3 --mf-time-scale 30",
    # meanflow: the same preset and finite difference for the same reasons.
    "meanflow": "--arch tiny --jvp-fd-step 3e-3",
    # pmf is imf with x-prediction: imf's preset, finite difference and time scale, for imf's reasons; its times
    # between the paper's (0.8, favours one step: its docstring says why) and imf's (-0.4) keep NFE 1 and gain 2, 4.
    "pmf": "--arch tiny --jvp-fd-step 3e-3 --mf-time-scale 30 --time-mean 0.2 --time-std 1.0",
    # scm: the paper's settings except the tangent warm-up, 10,000 steps there, cut to a tenth of the ~1,000 steps
    # that fit here.
    "scm": "--scm-warmup-steps 100",
}


def trained_minutes(run):
    ckpt = Path(run) / "ckpt.pt"
    return torch.load(ckpt, weights_only=True).get("train_seconds", 0.0) / 60 if ckpt.exists() else 0.0


def train(run, argv, minutes, log, nfes=(1,)):
    """Train `run` for what is left of `minutes` of training time (resumes an interrupted run); nfes: the run's
    NFEs (what ld3 fits its grids at and the grids show)."""
    run = Path(run)
    left = minutes - trained_minutes(run)
    # eval.json is written when a training invocation ends at its budget: a finished run is not entered again for
    # the seconds its start-up took (those count against its --minutes but not in its training seconds).
    if any((run / f).exists() for f in ("bench.json", "eval.json")) or left <= 0.01:
        return
    log(f"{run.name}: training {left:.2f} more min")
    fewstep.main([*argv, "--minutes", f"{left:.4f}", "--out", str(run), "--no-fid", "--nfe", *map(str, nfes),
                  "--num-samples", "8"])  # training's own closing evaluation kept cheap; scored below


def score_run(run, nfes, num_samples, log, seed=0, source=None, options=()):
    """FID of `run` (or of a copy of `source`) at `nfes`, kept in run/bench.json (with the run's minutes and steps);
    options: sampling options that replace the run's (a guidance scale)."""
    run = Path(run)
    done = run / "bench.json"
    if not done.exists():
        if source is not None:
            copy_run(Path(source), run)
        log(f"{run.name}: scoring NFE {nfes}, seed {seed}")
        result = score(run, nfes, num_samples, seed, options)
        ckpt = torch.load(run / "ckpt.pt", weights_only=True)
        result.update(minutes=ckpt.get("train_seconds", 0.0) / 60, steps=ckpt["step"])
        rundir.write_atomic(done, lambda f: f.write(json.dumps(result, indent=2) + "\n"), mode="w")
    return json.loads(done.read_text())


def score(run, nfes, num_samples, seed=0, options=()):
    """A class-conditional run is scored class-balanced: num_samples / classes samples of each class."""
    classes = json.loads((Path(run) / "config.json").read_text()).get("classes")
    size = ["--samples-per-class", str(num_samples // len(classes))] if classes else ["--num-samples", str(num_samples)]
    ev = fewstep.main(["--out", str(run), "--eval-only", "--nfe", *map(str, nfes), *size, "--seed", str(seed),
                       *options])
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
    rundir.write_atomic(path, lambda f: f.write(json.dumps({"fid": value, "n": len(real)}) + "\n"), mode="w")
    return value


def grid(out, methods, cols=4, scale=3, label_width=80):
    """Row per method (methods: row name -> its run directory under out, or a list of names that are both): the
    first `cols` samples at NFE 1, then 2, then 4 (the same evaluation noise for all), its name on the left and the
    NFEs on top."""
    from PIL import ImageDraw
    methods = methods if isinstance(methods, dict) else {m: m for m in methods}
    rows = []
    for name, run in methods.items():
        row = []
        for nfe in (1, 2, 4):
            folder = out / run / "samples" / f"nfe={nfe}"
            imgs = [np.asarray(Image.open(folder / f"{i:04d}.png")) for i in range(cols)] if folder.exists() else []
            imgs = imgs or [np.zeros((28, 28), np.uint8)] * cols  # an NFE the method cannot do: a black cell
            row += imgs + [np.full_like(imgs[0], 255)[:, :4]]  # a white bar between NFEs
        rows.append(np.concatenate(row[:-1], axis=1))
    img = np.concatenate([np.pad(r, ((2, 2), (0, 0)), constant_values=255) for r in rows], axis=0)
    img = Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST)
    canvas = Image.new("L", (img.width + label_width, img.height + 16), 255)
    canvas.paste(img, (label_width, 16))
    draw = ImageDraw.Draw(canvas)
    cell, bar, row_h = 28 * scale, 4 * scale, 32 * scale
    for k, nfe in enumerate((1, 2, 4)):
        draw.text((label_width + k * (cols * cell + bar) + 2, 2), f"NFE {nfe}", fill=0)
    for i, name in enumerate(methods):
        draw.text((4, 16 + i * row_h + row_h // 2 - 6), name, fill=0)
    canvas.save(out / "grid.png")


def method_nfes(name, argv, class_cond):
    """The NFEs of 1, 2, 4 that the method, with these options, can do exactly."""
    given = trainer.given_options(fewstep.METHODS, name, trainer.parse_args(fewstep.METHODS, argv))
    method = trainer.make_method(fewstep.METHODS, name, given)
    method.num_classes = 10 if class_cond else None
    return [n for n in (1, 2, 4) if trainer.supports(method, n)]


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
    p.add_argument("--no-training-spread", action="store_true",
                   help="do not train rf again from seed 1 (the spread over training seeds; one budget less)")
    p.add_argument("--class-cond", action="store_true",
                   help="train on mnist5k's digits as labels (10 classes); score --num-samples / 10 of each class")
    p.add_argument("--guidance", type=float, default=None,
                   help="with --class-cond: every method also with --guidance W, in a row of its own (rf, shortcut, "
                        "imf, pmf: the same run sampled at W; meanflow and the distillers: trained again with W)")
    p.add_argument("--out", default="runs/bench-fewstep")
    args = p.parse_args(argv)
    if args.guidance is not None and not args.class_cond:
        p.error("--guidance needs --class-cond (guidance mixes the labelled and the null branch)")
    out = rundir.make_out_dir(args.out)  # a file, a path under one, /proc/x or a full disk: one line, nothing run
    log = lambda *a: print("bench_fewstep:", *a, flush=True)  # noqa: E731
    extra = dict(s.split("=", 1) for s in args.method_args)
    teacher_minutes = args.minutes / 2 if args.teacher_minutes is None else args.teacher_minutes
    common = [*COMMON, "--arch", args.arch, *(["--class-cond"] if args.class_cond else [])]
    w = args.guidance

    # Phase 1: every training run, so that nothing else competes with them for the cores (scoring is not timed).
    teacher = out / "teacher-rf"
    runs = {}  # row -> (run directory, fewstep.py options, training minutes, NFEs, learns from the teacher)
    resampled = {}  # row -> (run directory, the run it samples, its NFEs, sampling options): guidance at sampling
    for name in args.methods:
        cls = fewstep.METHODS[name]
        distills = getattr(cls, "needs_teacher", False)  # cm can distil but trains from scratch (iCT) by default
        argv_m = ["--method", name, *common, *extra.get(name, BUDGET_ARGS.get(name, "")).split()]
        if distills:
            argv_m += ["--teacher", str(teacher)]
        budget = args.minutes - (teacher_minutes if distills else 0.0)
        runs[name] = (out / name, argv_m, budget, method_nfes(name, argv_m, args.class_cond), distills)
        # The same method guided at scale w, in a row of its own; cm and scm trained from scratch have no guided
        # field to learn (theirs is the teacher's), so they have no such row.
        if w is not None and ("--teacher" in argv_m or not cls.teacher_methods):
            argv_w = argv_m + ["--guidance", f"{w:g}"] + (["--nfe", "2", "4"] if name == "ld3" else [])
            nfes_w = method_nfes(name, argv_w, True)  # a guided rf step costs 2 NFE: no NFE 1
            if "guidance" in cls.sampling_options:
                resampled[f"{name}, w={w:g}"] = (out / f"{name}-w{w:g}", out / name, nfes_w, ["--guidance", f"{w:g}"])
            else:
                runs[f"{name}, w={w:g}"] = (out / f"{name}-w{w:g}", argv_w, budget, nfes_w, distills)
    uses_teacher = any(distills for *_, distills in runs.values())
    if uses_teacher:
        train(teacher, ["--method", "rf", *common], teacher_minutes, log)
    for name, (run, argv_m, budget, nfes, distills) in runs.items():
        train(run, argv_m, budget, log, nfes)
    spread_run = out / "spread-training-seed1"
    if "rf" in runs and not args.no_training_spread:
        train(spread_run, ["--method", "rf", *common, "--seed", "1"], args.minutes, log)

    # Phase 2: scores.
    results, spread = {}, {}
    for name, (run, argv_m, budget, nfes, distills) in runs.items():
        results[name] = dict(score_run(run, nfes, args.num_samples, log),
                             teacher_minutes=trained_minutes(teacher) if distills else 0.0,
                             options=" ".join(argv_m[2 + len(common):]))
        log(f"{name}: {results[name]}")
    for name, (run, source, nfes, options) in resampled.items():
        results[name] = dict(score_run(run, nfes, args.num_samples, log, source=source, options=options),
                             options=" ".join(runs[name.split(",")[0]][1][2 + len(common):] + options))
    if uses_teacher:  # what the distillation methods start from (not a competitor: half budget)
        results["rf teacher (reference)"] = score_run(teacher, [1, 2, 4], args.num_samples, log)
    if "rf" in runs:
        results["rf, 100 Euler steps"] = score_run(out / "rf-100-steps", [100], args.num_samples, log,
                                                   source=out / "rf")
        spread_nfes = [n for n in (1, 4) if n in runs["rf"][3]]  # guided rf: no NFE 1
        for seed in range(1, args.spread_seeds + 1):
            r = score_run(out / f"spread-sampling-seed{seed}", spread_nfes, args.num_samples, log, seed=seed,
                          source=out / "rf")
            spread[f"sampling seed {seed}"] = r["fid"]
        if not args.no_training_spread:
            spread["training seed 1"] = score_run(spread_run, spread_nfes, args.num_samples, log)["fid"]
        spread["sampling seed 0 / training seed 0"] = {str(k): results["rf"]["fid"][str(k)] for k in spread_nfes}
    floor = data_floor(args.num_samples, out)

    labels = "class-conditional (10 digits, label dropout 0.1, class-balanced samples), " if args.class_cond else ""
    lines = [f"Budget {args.minutes:g} min per method (teacher included), preset {args.arch}, mnist5k even -> odd, "
             f"{labels}{args.num_samples} samples per NFE, fid.py clean mode.", "",
             "| method | minutes | teacher minutes | iterations | FID NFE 1 | NFE 2 | NFE 4 | options |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        f = r["fid"]
        cells = [f.get(k, "-") for k in ("1", "2", "4")] if "100" not in f else [f"{f['100']} (NFE 100)", "", ""]
        lines.append(f"| {name} | {r['minutes']:.1f} | {r.get('teacher_minutes', 0):.1f} | {r['steps']:,} | "
                     + " | ".join(map(str, cells)) + f" | {r.get('options', '')} |")
    lines += ["", f"Data floor ({args.num_samples} real training digits vs the held-out half): {floor}"]
    if len(spread) > 1:  # rf's own row is always there; one run alone is no spread
        for nfe in [k for k in ("1", "4") if all(k in v for v in spread.values())]:
            vals = [v[nfe] for v in spread.values()]
            lines.append(f"Spread of rf's NFE-{nfe} FID over {len(vals)} runs (sampling and training seeds): "
                         f"{min(vals)} .. {max(vals)} (sd {statistics.pstdev(vals):.2f}); " +
                         ", ".join(f"{k}: {v[nfe]}" for k, v in spread.items()))
    few = {k: r["fid"] for k, r in results.items() if k in runs and ", w=" not in k}  # no reference rows
    if "rf" in results and len(few) > 1:  # the goals, as ratios of the measured numbers
        best1 = min((f["1"], k) for k, f in few.items() if "1" in f)
        best4 = min((f["4"], k) for k, f in few.items() if "4" in f)
        rf1, rf100 = results["rf"]["fid"].get("1"), results["rf, 100 Euler steps"]["fid"]["100"]
        # Three decimals: a ratio of 0.328 and one of 0.336 both print as 0.33, and the goal (1/3) lies between.
        lines += ["", f"Best NFE 1: {best1[1]} {best1[0]} = {best1[0] / rf100:.3f} x rf at 100 steps (goal <= 2)"
                      + (f", {best1[0] / rf1:.3f} x rf's NFE 1 (the earlier goal: <= 1/3)." if rf1 else "."),
                  f"Best NFE 4: {best4[1]} {best4[0]} = {best4[0] / floor:.3f} x the data floor (goal <= 2), "
                  f"{best4[0] / rf100:.3f} x rf at 100 steps (the earlier goal: <= 1.25)."]
    if w is not None:  # what guidance does to the best score at each NFE (equal NFE: a guided rf step costs 2)
        guided = {k: r["fid"] for k, r in results.items() if ", w=" in k}
        lines.append("")
        for nfe in ("1", "2", "4"):
            best = [min(((f[nfe], k) for k, f in rows.items() if nfe in f), default=None) for rows in (few, guided)]
            if all(best):
                lines.append(f"Guidance at NFE {nfe}: best without {best[0][1]} {best[0][0]}, best with w = {w:g} "
                             f"{best[1][1]} {best[1][0]} ({best[1][0] / best[0][0]:.3f} x).")
    text = "\n".join(lines) + "\n"
    print(text)
    rundir.write_atomic(out / "results.md", lambda f: f.write(text), mode="w")
    rundir.write_atomic(out / "results.json", lambda f: f.write(json.dumps(
        {"results": results, "spread": spread, "floor": floor, "minutes": args.minutes,
         "teacher_minutes": teacher_minutes, "arch": args.arch, "num_samples": args.num_samples}, indent=2)), mode="w")
    rows = {k: v[0].name for k, v in {**runs, **resampled}.items()}
    grid(out, {k: d for k, d in rows.items() if (out / d / "samples").exists()})
    log(f"{out / 'results.md'}, {out / 'results.json'}, {out / 'grid.png'}")


if __name__ == "__main__":
    rundir.run_cli(main, "bench_fewstep.py")  # a user's mistake: one line, exit status 2; a bug: a traceback
