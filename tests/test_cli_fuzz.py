"""Property-based fuzzing of every script's command line (hypothesis): whatever a user types ends either in a
finished run or in exit status 2 with exactly one line on stderr, naming the script, and nothing written; never in
a traceback.

Each script's argv is built from its real argparse parser (captured from its main(), so every flag, alias, nargs,
choice and type the script has is in play, including flags added later): a cheap baseline run (tiny network, one
step, two samples, offline data) plus a few of its options, each with a value drawn from valid values, boundary
values, wrong types, negative, zero and huge numbers, missing and foreign files and unknown names. A flag whose
value sets the cost of a run (steps, samples, batch, image size, ...) gets valid values only up to a small cap, so
that a valid command stays a test-sized run; its invalid values are drawn in full. The command runs in-process as
`python SCRIPT ARGV` runs it (rundir.run_cli around main(argv), sys.argv[0] the script) in a fresh copy of a folder
of inputs, which is the working directory and holds every --out. A failing argv is shrunk to a minimal one; each
argv found that way stays below as a plain regression case (REGRESSIONS).

Profiles (HYPOTHESIS_PROFILE): ci (the default: derandomized, EXAMPLES argv per script, about two minutes in all on
two cores) and long (FUZZ_EXAMPLES argv per script, default 300, random). tests/conftest.py prints how many argv
each command line was given and how they ended; FUZZ_LOG=FILE appends every argv, its exit status, last stderr line
and what it wrote. No example database is written.
"""
import argparse
import collections
import contextlib
import io
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from PIL import Image

import cfm_mnist
import data
import ddim
import ddpm
import fewstep
import fid
import rundir
import sde_toy
import trainer
import unet

_COMMON = dict(database=None, deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("ci", derandomize=True, **_COMMON)
settings.register_profile("long", derandomize=False, **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
LONG = PROFILE == "long"
# argv per script in the ci profile: about 2 minutes for the file on two cores, most argv ending at parse time
EXAMPLES = {"fewstep.py": 80, "ddpm.py": 50, "ddim.py": 40, "cfm_mnist.py train": 30, "cfm_mnist.py sample": 30,
            "sde_toy.py": 25, "fid.py": 30, "data.py": 40}
SECONDS = 120 if LONG else 60  # one argv that runs longer than this fails: a strategy let a costly value through

class Pool:
    """The values one flag draws from: `valid` (three draws in four) and `odd` (wrong types, out of range, missing or
    foreign files, unknown names). Shrinking prefers valid values, so a found argv keeps only the odd value that
    matters."""

    def __init__(self, valid, odd=()):
        self.valid, self.odd = [str(v) for v in valid], [str(v) for v in odd]

    def __add__(self, other):
        return Pool(self.valid + other.valid, self.odd + other.odd)

    def strategy(self):
        if not self.odd:
            return st.sampled_from(self.valid)
        valid = st.sampled_from(self.valid) if self.valid else st.nothing()
        return st.one_of(valid, valid, valid, st.sampled_from(self.odd))


WRONG = ["abc", "", "-", "--", "1.5", "nan", "inf", "-inf", "1e999", "0x10", "é", " "]
INTS = Pool([0, 1, 2, 3], ["-1", "7", "-2147483649", "2147483648", "18446744073709551616", "10" * 15] + WRONG)
FLOATS = Pool([0, 0.5, 1, 2.5, "1e-3"], ["-0.0", "1e-12", "-1", "1e30", "-1e30", "nan", "inf", "-inf", "1e-320",
                                          "1e999", "abc", "", "1,5", "0x1p-3"])
NAMES = ["nope", "NONE", "rf ", "x" * 300]
PATHS = Pool([], ["missing", "missing.pt", "afile", "afile/sub", "text.pt", "imgs", "empty", "/proc/forbidden",
                  "/dev/null/x", "", "."])
DATA = Pool(["mnist5k", "folder:imgs"], ["folder:missing", "folder:afile", "folder:", "folder:empty", "nonexistent",
                                         "pokemon:missing", "mnist5k:x", ""])  # only specs that need no download
OUTS = Pool(["run", "run/sub/deep"], ["afile", "afile/sub", "/proc/forbidden", "/dev/null/x", "", ".", "imgs",
                                      "empty"])
FID_REFS = Pool(["imgs", "folder:imgs", "imgs_rgb"], ["missing", "nonexistent", "afile", "bad.npz", "small.npz",
                                                      "text.pt", "empty", ""])  # a data spec would be minutes
DEVICES = Pool(["auto", "cpu", "cpu:0"], ["cuda", "cuda:0", "cuda:7", "tpu9", "mps", "", "meta", "cpu:x"])
PRESETS = Pool(["tiny", "tiny", "small"], NAMES + ["mnist", "challenge "])  # big presets: seconds of allocation


# torch.compile on a CPU spends minutes compiling C++ before the first step: a flag for long runs, not for a fuzzer
NOT_FUZZED = {"--compile"}


def ints_upto(cap, odd=()):
    """Counts 1..cap (their cap keeps a valid run test-sized: the flags that set its cost) and the invalid ones."""
    return Pool(range(1, cap + 1), ["0", "-1", "-2147483649", *odd] + WRONG)


# What each dest may be given, where its type alone does not say (strings) or a valid value can be costly.
COMMON_POOLS = {"out": OUTS, "device": DEVICES, "data": DATA, "fid_ref": FID_REFS, "arch": PRESETS,
                "preset": PRESETS, "image_size": ints_upto(4, ["7", "30"]) + Pool([8, 16, 28, 32]),
                "steps": ints_upto(3), "batch_size": ints_upto(4), "num_samples": ints_upto(3),
                "fid": Pool([0, 2, 3], ["1", "-1"] + WRONG), "fid_ref_n": ints_upto(3), "n": ints_upto(4),
                "minutes": Pool(["1e-9", "0.001", "0.01"], ["0", "-1", "1e-320"] + WRONG), "seed": INTS}


def pools(**extra):
    return {**COMMON_POOLS, **extra}


class Spec:
    """One command line: how to call it, its cheapest valid run, and the values its dests draw from."""

    def __init__(self, prog, main, baseline, pools, subcommand=None):
        self.prog, self.main, self.baseline, self.pools, self.subcommand = prog, main, baseline, pools, subcommand


TEACHER_ARGS = {"reflow": ["--num-pairs", "4", "--teacher-steps", "2"], "pd": ["--pd-start-steps", "8"],
                "ld3": ["--num-pairs", "2", "--teacher-steps", "2", "--ld3-epochs", "1", "--ld3-phase1-epochs", "1"],
                "ctm": ["--ctm-heun-steps", "2", "--ctm-scales", "3"], "dmd2": ["--dmd-fake-updates", "1"]}
FEWSTEP = ["--data", "mnist5k", "--arch", "tiny", "--steps", "1", "--num-samples", "2", "--no-fid", "--device",
           "cpu", "--out", "run"]
RUNS = Pool(["teacher"], ["ddpm_run", "cfm_run"]) + PATHS
CKPTS = Pool(["ddpm_run/ckpt.pt", "tiny_raw.pt"], ["cfm_run/ckpt.pt", "teacher/ckpt.pt"]) + PATHS
ADM = Pool(["{}", '{"num_channels": 8}'], ["{not json", "[]", '{"image_size": 28}', '""', "null", '{"foo": 1}',
                                          '{"num_res_blocks": -1}'])
RESPACE = Pool(["2", "ddim2", "1,1"], ["ddim0", "abc", "0", "5000", "-1", "", "2,,3", "ddim", "1e3", "ddim-1"])
SPECS = {
    "fewstep.py": Spec("fewstep.py", fewstep.main, FEWSTEP, pools(
        method=Pool(fewstep.METHODS, NAMES), teacher=RUNS, eval_batch_size=ints_upto(4),
        samples_per_class=ints_upto(1), nfe=ints_upto(6) + Pool([64]), fid_every=Pool([0, 1000000], ["-1"] + WRONG),
        net=Pool(["unet"], ["course:missing", "course:", "nope"]) + PATHS, export_submission=OUTS,
        export_fastgen=OUTS, fastgen_course=PATHS, one_nfe_run=RUNS, few_nfe_run=RUNS,
        # method options that set a run's cost
        m_teacher_steps=ints_upto(3), m_num_pairs=ints_upto(3), m_ld3_epochs=ints_upto(2),
        m_ld3_phase1_epochs=ints_upto(2), m_ld3_batch=ints_upto(2), m_pd_start_steps=ints_upto(8),
        m_pd_end_steps=ints_upto(4), m_ctm_heun_steps=ints_upto(3), m_ctm_scales=ints_upto(4),
        m_dmd_fake_updates=ints_upto(2), m_max_steps=ints_upto(8) + Pool([128]), m_bootstrap_every=ints_upto(4))),
    "ddpm.py": Spec("ddpm.py", ddpm.main,
                    ["--data", "mnist5k", "--arch", "tiny", "--steps", "1", "--num-samples", "2", "--T", "25",
                     "--sample-respace", "2", "--fid-ref", "imgs", "--device", "cpu", "--out", "run"], pools(
        T=Pool([21, 25, 30], ["20", "1", "0", "-1"] + WRONG), ckpt=CKPTS, respace=RESPACE + Pool([""]),
        sample_respace=RESPACE, adm_config=ADM, ckpt_every=ints_upto(2, ["1000000"]),
        sample_every=Pool([0, 1, 1000000], ["-1"] + WRONG))),
    "ddim.py": Spec("ddim.py", ddim.main,
                    ["--ckpt", "ddpm_run/ckpt.pt", "--steps", "2", "--num-instances", "2", "--fid-ref", "imgs",
                     "--device", "cpu", "--out", "o"], pools(
        ckpt=CKPTS, steps=ints_upto(4, ["1001", "5000", "100000000000000000000"]) + Pool([25]),
        num_instances=Pool([0, 1, 2], ["-1"] + WRONG), steps_list=Pool(["1,2", "3"], ["abc", "", "0", "2,5000",
                                                                                        "-1", "1e3", "2,,3"]),
        eta_list=Pool(["0", "0,1"], ["-1", "nan", "abc", "inf", "", "0,,1"]), adm_config=ADM)),
    "cfm_mnist.py train": Spec("cfm_mnist.py", cfm_mnist.main,
                               ["--data", "mnist5k", "--arch", "tiny", "--steps", "1", "--no-grid", "--device", "cpu",
                                "--out", "run"], pools(out=OUTS + Pool(["cfm_run"], ["ddpm_run", "teacher"]),
                                                       ckpt_every=ints_upto(2)),
                               subcommand="train"),
    "cfm_mnist.py sample": Spec("cfm_mnist.py", cfm_mnist.main,
                                ["--out", "cfm_run", "--n", "2", "--steps", "2", "--fid-ref", "imgs", "--device",
                                 "cpu"], pools(out=Pool(["cfm_run"], ["ddpm_run", "teacher", "no_run"]) + OUTS,
                                               rtol=Pool(["1e-3", "0.1", "1", "1e30"], ["0", "-1"] + WRONG),
                                               atol=Pool(["1e-3", "0.1", "1", "1e30"], ["0", "-1"] + WRONG)),
                                subcommand="sample"),
    "sde_toy.py": Spec("sde_toy.py", sde_toy.main, ["--particles", "20", "--steps", "5", "--out", "run"], pools(
        particles=ints_upto(20), steps=ints_upto(6))),
    "fid.py": Spec("fid.py", fid.main, ["--device", "cpu", "--batch-size", "2"], pools(
        paths=Pool(["imgs", "imgs_rgb", "small.npz"], ["bad.npz", "missing", "empty", "afile", "text.pt",
                                                       "folder:imgs", "imgs/0.png", ""]),
        weights=Pool([], ["text.pt", "missing.pt", "afile", "imgs", "tiny_raw.pt", ""]),
        save_stats=Pool(["s.npz", "sub/s.npz"], ["afile/x.npz", "afile", "/proc/x.npz", "s", "", "imgs",
                                                 "small.npz"]),
        device=Pool(["auto", "cpu"], ["cuda"] + NAMES))),
    "data.py": Spec("data.py", data.main, ["--n", "2", "--out", "p.png"], pools(
        split=Pool(["train", "test", "even"], ["val", "odd", "all", "nope", ""]),
        root=Pool(["root"], ["afile", "afile/x", "/proc/x", "", "imgs"]),
        out=Pool(["p.png", "sub/p.png", "p.jpg"], ["afile/x.png", "afile", "/proc/x.png", "imgs", "p", "p.xyz", "",
                                                   "/dev/null/x.png"]))),
}


# ----------------------------------------------------------------------------------------------------------------
# The real parser of each command line
# ----------------------------------------------------------------------------------------------------------------

class _Parsed(Exception):
    pass


def real_parser(spec):
    """The ArgumentParser a script's main() builds, taken at its first parse (which then stops the script), or the
    subcommand's parser under it."""
    found = []

    def grab(self, *args, **kwargs):
        found.append(self)
        raise _Parsed

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", grab), \
            mock.patch.object(sys, "argv", [spec.prog]):
        with contextlib.suppress(_Parsed):
            spec.main([])
    parser = found[0]
    if spec.subcommand:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[spec.subcommand]
    return parser


def nargs_range(nargs):
    if nargs is None:
        return 1, 1
    if isinstance(nargs, int):
        return nargs, nargs
    return {"?": (0, 1), "*": (0, 3), "+": (1, 3)}.get(nargs, (1, 1))


def value_pool(action, pools):
    """The Pool one value of `action` is drawn from: its dest's pool, else what its choices or type call for."""
    if action.dest in pools:
        return pools[action.dest]
    if action.choices is not None:
        return Pool(action.choices, NAMES + WRONG)
    kind = getattr(action.type, "__name__", "") if action.type else ""
    if action.type is int or kind.endswith("_int") or kind == "count":
        return INTS
    if action.type is float or kind.endswith(("_float", "_arg")):
        return FLOATS
    if kind == "times_arg":
        return Pool(["2:0.5", "4:0.25,0.5,0.75", "1:"], ["2:1.5", "2:nan", "0:", "x:1", "2:0.5,0.6", ":", "2:0.7,"]
                    + WRONG)
    return Pool([], NAMES) + PATHS + Pool([], WRONG)


def option_argv(action, pools):
    """argv words of one option: a flag of it (any alias) and as many values as its nargs takes (or a wrong count)."""
    flag = st.sampled_from(action.option_strings)
    if action.nargs == 0:
        return flag.map(lambda f: [f])
    lo, hi = nargs_range(action.nargs)
    value = value_pool(action, pools).strategy()
    right = st.lists(value, min_size=lo, max_size=hi)
    values = st.one_of(right, right, right, st.lists(value, max_size=hi + 1))
    return st.tuples(flag, values).map(lambda t: [t[0], *t[1]])


@st.composite
def argv_for(draw, spec, parser):
    """The baseline, a few of the parser's options (any of them, values from their pools) and the positionals."""
    options = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)
               and not isinstance(a, argparse._VersionAction) and not set(a.option_strings) & NOT_FUZZED]
    positionals = [a for a in parser._actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]
    argv = [spec.subcommand] if spec.subcommand else []
    for a in positionals:  # first, before any option's values
        lo, hi = nargs_range(a.nargs)
        value = value_pool(a, spec.pools).strategy()
        two = st.lists(value, min_size=2, max_size=2) if lo <= 2 <= hi else st.nothing()  # fid.py A B
        argv += draw(st.one_of(two, two, st.lists(value, min_size=lo, max_size=hi)))
    likely = st.sampled_from(options)
    if spec.prog == "fewstep.py":  # a method, its teacher if it learns from one, and its cheapest schedule
        name = draw(st.sampled_from(list(fewstep.METHODS)))
        argv += ["--method", name, *TEACHER_ARGS.get(name, [])]
        if fewstep.METHODS[name].teacher_methods and (fewstep.METHODS[name].needs_teacher or draw(st.booleans())):
            argv += ["--teacher", "teacher"]
        # most draws from the options this method has: another method's option is refused at once
        others = {f for f, e in trainer.method_flags(fewstep.METHODS).items() if name not in e["fields"]}
        likely = st.sampled_from([a for a in options if not set(a.option_strings) & others])
    argv += spec.baseline
    for a in draw(st.lists(st.one_of(likely, likely, likely, st.sampled_from(options)), max_size=3)):
        argv += draw(option_argv(a, spec.pools))
    return argv


# ----------------------------------------------------------------------------------------------------------------
# Running one argv as `python SCRIPT ARGV` runs it
# ----------------------------------------------------------------------------------------------------------------

class TooSlow(BaseException):  # not an Exception: no `except Exception` in a script swallows it
    pass


@contextlib.contextmanager
def time_limit(seconds):
    def stop(*_):
        raise TooSlow(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def snapshot(root):
    """Every path under root with its size and modification time: what a run wrote, created or changed."""
    root = Path(root)
    return {str(p.relative_to(root)): (p.is_dir(), 0 if p.is_dir() else p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def run(spec, argv, template):
    """Run argv in a fresh copy of `template` as the working directory; (exit status, stderr, written paths)."""
    with tempfile.TemporaryDirectory() as d:
        cwd = Path(d) / "w"
        shutil.copytree(template, cwd, symlinks=True)
        before = snapshot(cwd)
        err, code = io.StringIO(), 0
        old_cwd, old_argv, threads = os.getcwd(), sys.argv, torch.get_num_threads()
        os.chdir(cwd)
        sys.argv = [spec.prog, *argv]  # argparse and run_cli name the script from argv[0]
        torch.set_num_threads(1)  # two threads on two busy cores cost several times the CPU time of one
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err), time_limit(SECONDS):
                rundir.run_cli(lambda: spec.main(argv), prog=spec.prog)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) or e.code is None else 1
        finally:
            os.chdir(old_cwd)
            sys.argv = old_argv
            torch.set_num_threads(threads)
        after = snapshot(cwd)
        written = sorted(p + "/" * after[p][0] for p in after if before.get(p) != after[p]) + \
            sorted(set(before) - set(after))  # a folder made or changed ends in /
        return code or 0, err.getvalue(), written


TRIED = collections.Counter()  # (command line, outcome) -> argv run; conftest.py prints it after the tests


def spec_name(spec):
    return next(k for k, v in SPECS.items() if v is spec)


# A run that diverged (NaN loss or weights) stops in one line but keeps what it wrote, by design: its checkpoint is
# the last good one; progress bars of the steps it ran come before that line.
DIVERGED = ("training stopped; the last good checkpoint", "weights are not finite at step",
            "left the finite numbers")  # the last: sde_toy.py's processes, after their bars; it writes nothing


def check(spec, argv, template):
    """A run passes iff it succeeds, or exits with status 2, one line on stderr that names the script, and nothing
    written. An exception escapes with its traceback (hypothesis shrinks it)."""
    note(f"python {spec.prog} {' '.join(map(repr, argv))}")
    code, err, written = run(spec, argv, template)
    TRIED[spec_name(spec), "ran" if code == 0 else f"exit {code}"] += 1
    if os.environ.get("FUZZ_LOG"):  # every argv and how it ended, to see what the strategies reach
        with open(os.environ["FUZZ_LOG"], "a") as f:
            f.write(f"{spec_name(spec)}\t{code}\t{argv}\t{err.splitlines()[-1] if err.strip() else ''}\t"
                    f"{written[:3]}\n")
    if code == 0:
        return
    lines = err.splitlines()
    if code == 2 and lines and any(w in lines[-1] for w in DIVERGED):
        lines = lines[-1:]
        written = []
    assert code == 2, f"exit status {code}:\n{err[-2000:]}"
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{err[-2000:]}"
    assert lines[0].startswith(spec.prog), lines[0]  # fewstep.py: ..., cfm_mnist.py sample: error: ...
    assert not written, f"exit status 2 after writing {written[:5]}: {lines[0]}"


# ----------------------------------------------------------------------------------------------------------------
# Inputs: the folder every argv runs in
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """Input files of every kind a flag may name: a regular file, a non-torch file, a raw tiny state dict, runs of
    ddpm.py, cfm_mnist.py and fewstep.py (tiny, one step), image folders, .npz files good and bad. Data and FID
    caches live outside it, in a folder of their own (the environment variables)."""
    root = tmp_path_factory.mktemp("fuzz")
    d = root / "template"
    d.mkdir()
    env = {"DIFFUSION_DATA": str(root / "data"), "FID_CACHE": str(root / "fid_cache")}
    saved = {k: os.environ.get(k) for k in [*env, "FID_WEIGHTS"]}
    os.environ.update(env)
    os.environ.pop("FID_WEIGHTS", None)
    (d / "afile").write_text("a file, so afile/sub cannot be created")
    (d / "text.pt").write_text("not a torch file")
    (d / "bad.npz").write_text("not an npz file")
    np.savez(d / "small.npz", mu=np.zeros(4), sigma=np.eye(4))
    (d / "empty").mkdir()
    torch.save(unet.create("tiny").state_dict(), d / "tiny_raw.pt")
    for name, mode, size in (("imgs", "L", 8), ("imgs_rgb", "RGB", 16)):
        (d / name).mkdir()
        for i in range(2):
            Image.new(mode, (size, size), 60 * i + 20).save(d / name / f"{i}.png")
    cwd, threads = os.getcwd(), torch.get_num_threads()
    try:
        os.chdir(d)
        torch.set_num_threads(1)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            fewstep.main(["--method", "rf", *FEWSTEP[:-1], "teacher"])
            ddpm.main([*SPECS["ddpm.py"].baseline[:-1], "ddpm_run"])
            cfm_mnist.main(["train", *SPECS["cfm_mnist.py train"].baseline[:-1], "cfm_run"])
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    for run_dir in ("teacher", "ddpm_run", "cfm_run"):  # only what a later command reads: smaller copies
        for p in (d / run_dir).iterdir():
            if p.name not in ("ckpt.pt", "config.json", "metrics.jsonl"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    yield d
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# ----------------------------------------------------------------------------------------------------------------
# The property, per command line
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SPECS))
def test_any_argv_ends_in_a_run_or_one_line(name, template):
    spec = SPECS[name]
    parser = real_parser(spec)
    examples = int(os.environ.get("FUZZ_EXAMPLES", 300)) if LONG else EXAMPLES[name]

    @settings(settings.get_profile(PROFILE), max_examples=examples)
    @given(argv_for(spec, parser))
    def prop(argv):
        check(spec, argv, template)

    prop()


def test_the_strategies_reach_every_flag_of_every_parser():
    """Each option of each parser can be drawn, with values from a pool of its own or by its type."""
    for name, spec in SPECS.items():
        parser = real_parser(spec)
        flags = {s for a in parser._actions for s in a.option_strings}
        assert {"--out", "--device"} & flags or name == "fid.py", name
        for a in parser._actions:
            if a.option_strings and a.nargs != 0:
                pool = value_pool(a, spec.pools)
                assert pool.valid + pool.odd, (name, a.dest)


# ----------------------------------------------------------------------------------------------------------------
# Every argv the fuzzer found, as plain regression cases: (command line, argv, expected exit status, words of the
# error line)
# ----------------------------------------------------------------------------------------------------------------

def base(name, *extra):
    """The baseline argv of a command line with `extra` after it (the later of two equal flags wins)."""
    spec = SPECS[name]
    return [*([spec.subcommand] if spec.subcommand else []), *spec.baseline, *extra]


REGRESSIONS = [
    # argparse printed its whole usage (three to forty lines) above the error line: rundir.ArgumentParser
    ("sde_toy.py", base("sde_toy.py", "--out"), 2, "argument --out: expected one argument"),
    ("cfm_mnist.py sample", base("cfm_mnist.py sample", "--out"), 2, "argument --out: expected one argument"),
    ("ddpm.py", base("ddpm.py", "--arch", "nope"), 2, "invalid choice: 'nope'"),
    ("fid.py", ["imgs"], 2, "give two paths"),
    # ddpm.py --T 10: the linear schedule scaled by 1000 / T has betas up to 2, x_t is NaN, the loss NaN at step 1
    ("ddpm.py", base("ddpm.py", "--T", "10"), 2, "--T 10: the linear schedule's last beta"),
    ("ddpm.py", base("ddpm.py", "--T", "10", "--schedule", "cosine"), 0, ""),
    # ddim.py --sweep steps on a run with T = 25: the default --steps-list holds 50; the check came after --out was
    # made and named "--steps 50", which the user never typed
    ("ddim.py", base("ddim.py", "--sweep", "steps"), 2, "--steps-list 10,20,50,100,1000: --steps 50 must be"),
    ("ddim.py", base("ddim.py", "--sweep", "steps", "--steps-list", "1,2"), 0, ""),
    # data.py --out FILE without an image extension: PIL's ValueError after the dataset had loaded
    ("data.py", ["mnist5k", *base("data.py", "--out", "afile")], 2, "--out afile: the preview's name must end"),
    ("data.py", ["mnist5k", *base("data.py", "--out", "p.psd")], 2, "--out p.psd"),
    # --seed -1: np.random.seed's ValueError in rundir.seed_everything, after the data had loaded; --seed 2**64:
    # torch's "Overflow when unpacking long". rundir.seed_arg: [0, 2**32) in every script
    ("ddpm.py", base("ddpm.py", "--seed", "-1"), 2, "argument --seed: must be in [0, 2**32), got -1"),
    ("fewstep.py", ["--method", "rf", *base("fewstep.py", "--seed", "18446744073709551616")], 2, "argument --seed"),
    ("cfm_mnist.py train", base("cfm_mnist.py train", "--seed", "-1"), 2, "argument --seed"),
    ("ddpm.py", base("ddpm.py", "--seed", "4294967295"), 0, ""),
    # --device mps / meta: torch.device parses them; the model's .to() raised RuntimeError / NotImplementedError
    ("ddim.py", base("ddim.py", "--device", "mps"), 2, "--device mps: these scripts run on auto, cpu or cuda"),
    ("ddim.py", base("ddim.py", "--device", "meta"), 2, "--device meta"),
    ("fewstep.py", ["--method", "rf", *base("fewstep.py", "--device", "meta")], 2, "--device meta"),
    # ddpm.py --minutes 1e-9 (or 0): no step ran, no metrics.jsonl, and the final save's loss plot raised
    # FileNotFoundError; cfm_mnist.py already skipped the plot then
    ("ddpm.py", base("ddpm.py", "--minutes", "1e-9"), 0, ""),
    ("ddpm.py", base("ddpm.py", "--minutes", "0"), 0, ""),
    # sde_toy.py --beta-max 1e300: the Euler steps overflowed to NaN and a plot of NaN was written (exit 0); in
    # the long profile --beta-max 1e30 left numbers near 1e143 (a numpy warning in the histogram, still exit 0)
    ("sde_toy.py", base("sde_toy.py", "--beta-max", "1e300"), 2, "left the finite numbers"),
    # --lr inf was accepted (rundir.positive_float): NaN weights after one step; now refused with every float flag
    ("cfm_mnist.py train", base("cfm_mnist.py train", "--lr", "inf"), 2, "argument --lr: must be a finite number"),
    ("ddim.py", base("ddim.py", "--eta", "inf"), 2, "argument --eta: must be a finite number, got inf"),
    # cfm_mnist.py train made --out before checking --device and the data; data.py and fid.py made --out's /
    # --save-stats' folder before loading the data / finding the weights: an empty folder was left behind. A refusal
    # now removes the folders make_out_dir made that stayed empty (rundir.run_cli)
    ("cfm_mnist.py train", base("cfm_mnist.py train", "--device", "tpu9"), 2, "--device 'tpu9'"),
    ("cfm_mnist.py train", base("cfm_mnist.py train", "--data", "folder:missing"), 2, "folder:missing"),
    ("data.py", ["folder:missing", "--n", "2", "--out", "sub/p.png"], 2, "folder:missing"),
    ("fid.py", ["imgs", "--save-stats", "sub/s.npz", "--weights", "missing.pt"], 2, "missing.pt"),
]


@pytest.mark.parametrize("name, argv, status, words", REGRESSIONS,
                         ids=[f"{v[0]} {' '.join(v[1])}" for v in (getattr(r, "values", r) for r in REGRESSIONS)])
def test_found_argv(name, argv, status, words, template):
    spec = SPECS[name]
    code, err, written = run(spec, argv, template)
    assert code == status, err[-3000:]
    if status == 2:
        lines = err.splitlines()
        if lines and any(w in lines[-1] for w in DIVERGED):  # the bars of the steps it ran come first, as in check
            lines = lines[-1:]
        assert len(lines) == 1 and words in lines[0], err
        assert not written, written
