"""What a user can type and what the disk can do to a run, each ending in one line and exit status 2, with nothing
written and the last checkpoint intact and resumable (issue 47):

- an --out that cannot be a folder (a regular file, a path under a file, /proc/x where even root makes nothing, a
  full disk), for every script that takes --out, checked before any work;
- option values that mean nothing (--image-size 7, --warmup -5, --grad-clip -1), method options named by the flag
  the user typed (--nfe 0, --guidance -3), and --num-samples in a class-conditional run honoured, not replaced;
- a full disk or an I/O error while ckpt.pt or config.json is written; a damaged ckpt.pt, config.json or
  metrics.jsonl; a second process on the same --out; SIGTERM in the middle of training.

The scripts run in this process (their main, through rundir.run_cli as `python script.py` does), with budgets of
a step or two on the tiny preset. Expected values come from the tests' own setup: the bytes of a checkpoint before
the fault, and an uninterrupted run of the same length for the bit-exact resumes."""
import errno
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cfm_mnist
import ddpm
import fewstep
import rundir
import sde_toy
from test_fewstep import TINY, losses, one_thread  # noqa: F401  (autouse fixture: one thread for tiny runs)

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(script, argv):
    """The exit status of `python script ARGV` run in this process: main() inside rundir.run_cli, as the script's own
    `if __name__ == "__main__"` line calls it (fewstep.py's main prints its errors itself)."""
    if script == "fewstep.py":
        call = lambda: fewstep.main(argv)  # noqa: E731
    else:
        module = {"ddpm.py": ddpm, "cfm_mnist.py": cfm_mnist, "sde_toy.py": sde_toy}.get(script) or \
            load_benchmark(script[:-3])
        call = lambda: rundir.run_cli(lambda: module.main(argv), script)  # noqa: E731
    argv0, sys.argv[0] = sys.argv[0], script  # argparse names the script from it
    try:
        call()
    except SystemExit as e:
        return e.code
    finally:
        sys.argv[0] = argv0
    return 0


def refused(script, argv, capsys):
    """The stderr line of a command that must end as a user error: status 2, one line, no traceback."""
    capsys.readouterr()
    code = run_script(script, argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(script)]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (script, argv, code, err)
    return lines[0]


# ----------------------------------------------------------------------------------------------------------------
# --out: one checker (rundir.check_out_dir) for every script that takes it
# ----------------------------------------------------------------------------------------------------------------
BUDGETS = {  # the smallest run of each script: what would run if --out were accepted
    "fewstep.py": ["--method", "rf", *TINY, "--steps", "1"],
    "ddpm.py": ["--data", "mnist5k", "--arch", "tiny", "--steps", "1", "--batch-size", "4"],
    "cfm_mnist.py": ["train", "--data", "mnist5k", "--arch", "tiny", "--steps", "1", "--batch-size", "4"],
    "sde_toy.py": ["--particles", "10", "--steps", "10"],
    "bench_fewstep.py": ["--minutes", "0.01", "--arch", "tiny", "--methods", "rf", "--num-samples", "2"],
    "gpu_check.py": ["--device", "cpu", "--arch", "tiny", "--image-size", "16", "--batch-size", "2", "--steps", "2",
                     "--warmup-steps", "0", "--methods", "rf"],
}


def full_disk(monkeypatch):
    """Every fsync says the disk is full (ENOSPC), as a full disk does once the written blocks must be allocated."""
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", fsync)


OUT_CASES = {  # name: (--out under tmp_path, what the line says, set-up)
    "a regular file": ("afile", "(it is a file)", None),
    "a path under a file": ("afile/sub", "afile is a file, not a folder", None),
    "/dev/null/x": ("/dev/null/x", "/dev/null is a file, not a folder", None),
    "/proc/forbidden": ("/proc/forbidden", "/proc takes no new files", None),
    "a full disk": ("new/run", "No space left on device); free space on that disk", full_disk),
}


@pytest.mark.parametrize("case", OUT_CASES)
@pytest.mark.parametrize("script", BUDGETS)
def test_an_out_that_cannot_be_a_folder_is_refused_in_one_line_before_anything_runs(script, case, tmp_path,
                                                                                      monkeypatch, capsys):
    path, words, setup = OUT_CASES[case]
    if path.startswith("/proc") and not Path("/proc/self").exists():
        pytest.skip("no /proc here")
    (tmp_path / "afile").write_text("a file the user has")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    if setup:
        setup(monkeypatch)
    line = refused(script, [*BUDGETS[script], "--out", path], capsys)
    assert f"cannot write to --out {path} " in line and words in line, line
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    assert (tmp_path / "afile").read_text() == "a file the user has"


# ----------------------------------------------------------------------------------------------------------------
# Values that mean nothing, and errors in the words of the flags typed
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script, argv, words", [
    ("fewstep.py", ["--method", "rf", *TINY, "--steps", "1", "--image-size", "7"],
     "--image-size 7: preset tiny halves the image 2 times, so the size must be a multiple of 4: pass --image-size "
     "4 or 8"),
    ("ddpm.py", ["--data", "mnist5k", "--arch", "tiny", "--steps", "1", "--image-size", "30"],
     "--image-size 30: preset tiny halves the image 2 times, so the size must be a multiple of 4: pass --image-size "
     "28 or 32"),
    ("fewstep.py", ["--method", "rf", *TINY, "--steps", "1", "--warmup", "-5"], "--warmup: must be >= 0"),
    ("fewstep.py", ["--method", "rf", *TINY, "--steps", "1", "--grad-clip", "-1"], "--grad-clip: must be >= 0"),
    ("fewstep.py", ["--method", "imf", *TINY, "--steps", "1", "--nfe", "0"], "fewstep.py: --nfe 0: NFEs must be"),
    ("fewstep.py", ["--method", "meanflow", *TINY, "--steps", "1", "--guidance", "-3"],
     "fewstep.py: --guidance -3: need w >= 1"),
    ("fewstep.py", ["--method", "imf", *TINY, "--steps", "1", "--guidance", "9"],
     "fewstep.py: --guidance 9: must be in [1, --imf-guidance-max = 8]"),
    ("fewstep.py", ["--method", "ld3", *TINY, "--steps", "1", "--ld3-phase1-epochs", "9"],
     "fewstep.py: --ld3-phase1-epochs 9: must be in [0, epochs = 7]"),
])
def test_meaningless_values_are_refused_naming_the_flag_typed(script, argv, words, tmp_path, capsys):
    line = refused(script, [*argv, "--out", str(tmp_path / "x")], capsys)
    assert words in line and "{" not in line, line  # never the method's option dict
    assert not (tmp_path / "x").exists()


def test_an_option_error_names_the_field_in_python_and_the_flag_on_the_command_line():
    with pytest.raises(ValueError, match=r"^grid_nfes=\(0,\): NFEs must be integers >= 1$"):
        fewstep.ImprovedMeanFlow(grid_nfes=(0,))


def test_num_samples_in_a_class_conditional_run_is_rounded_to_whole_classes_and_said_once(tmp_path, capsys):
    out = tmp_path / "cc"
    base = ["--method", "rf", *TINY[:-3], "--class-cond", "--no-fid", "--nfe", "1", "--out", str(out)]
    ev = fewstep.main([*base, "--steps", "1", "--num-samples", "16"])
    said = [line for line in capsys.readouterr().out.splitlines() if "--num-samples 16" in line]
    assert said == ["fewstep.py: --num-samples 16 over the run's 10 classes: 2 per class, 20 samples per NFE"]
    assert ev["num_samples"] == 20 and ev["samples_per_class"] == 2
    assert len(list((out / "samples" / "nfe=1").glob("*.png"))) == 20
    ev = fewstep.main([*base, "--eval-only", "--num-samples", "30"])  # a multiple of the classes: as typed, silently
    assert ev["num_samples"] == 30 and "--num-samples" not in capsys.readouterr().out
    line = refused("fewstep.py", [*base, "--eval-only", "--num-samples", "30", "--samples-per-class", "2"], capsys)
    assert "--num-samples 30 and --samples-per-class 2" in line and "give one of them" in line
    line = refused("fewstep.py", ["--method", "rf", *TINY, "--steps", "1", "--samples-per-class", "2", "--out",
                                  str(tmp_path / "plain")], capsys)
    assert "--samples-per-class 2: the run has no class labels; use --num-samples" in line
    assert not (tmp_path / "plain").exists()


# ----------------------------------------------------------------------------------------------------------------
# Faults of the run directory
# ----------------------------------------------------------------------------------------------------------------
ARGS = ["--method", "rf", *TINY, "--nfe", "1", "--ckpt-every", "1"]


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A run of 2 steps (checkpointed at each) and, beside it, the same run carried on to 4 steps without a stop."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("faults")
    fewstep.main([*ARGS, "--steps", "2", "--out", str(d / "base")])
    fewstep.main([*ARGS, "--steps", "4", "--out", str(d / "straight")])
    torch.set_num_threads(n)
    return d / "base", d / "straight"


def same_weights(a, b):
    sa, sb = (torch.load(Path(x) / "ckpt.pt", weights_only=True) for x in (a, b))
    return sa["step"] == sb["step"] and all(torch.equal(sa[k][n], sb[k][n]) for k in ("model", "ema") for n in sa[k])


def fault_line(capsys, argv):
    """The one error line of a fewstep.py run that meets a fault during training (its progress bar, on stderr too,
    is not a second error)."""
    with pytest.raises(SystemExit) as e:
        fewstep.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fewstep.py")]
    assert e.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def fail_ckpt_write(monkeypatch):
    """torch.save writes the start of the archive, then the disk is full."""
    def save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 the first bytes of a zip archive")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", save)


def fail_config_write(monkeypatch):
    """The disk reports an I/O error when config.json's temp file is synced (where a failing disk says so)."""
    real = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith("config.json."):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("name, fail, words", [("ckpt.pt", fail_ckpt_write, "(No space left on device)"),
                                               ("config.json", fail_config_write, "(Input/output error)")])
def test_a_write_that_fails_is_one_line_and_the_last_checkpoint_resumes_bit_for_bit(name, fail, words, two_steps,
                                                                                   tmp_path, monkeypatch, capsys):
    if name == "config.json" and not Path("/proc/self/fd").exists():
        pytest.skip("no /proc/self/fd to tell config.json's descriptor here")
    base, straight = two_steps
    out = shutil.copytree(base, tmp_path / "run")
    before = {p: (out / p).read_bytes() for p in {"ckpt.pt", name}}
    capsys.readouterr()
    with monkeypatch.context() as m:
        fail(m)
        line = fault_line(capsys, [*ARGS, "--steps", "4", "--out", str(out)])
    assert f"cannot write {out / name} {words}" in line and "rerun the command" in line, line
    assert {p: (out / p).read_bytes() for p in before} == before  # the checkpoint and the file that failed: whole
    assert not list(out.glob("*.tmp"))
    fewstep.main([*ARGS, "--steps", "4", "--out", str(out)])
    assert f"resuming {out / 'ckpt.pt'} at step 2" in capsys.readouterr().out
    assert same_weights(out, straight) and losses(out) == losses(straight)


@pytest.mark.parametrize("damage, words, commands", [
    (lambda out: (out / "ckpt.pt").write_bytes((out / "ckpt.pt").read_bytes()[:3000]),
     "ckpt.pt cannot be read, it is damaged", ([], ["--eval-only"])),
    (lambda out: (out / "ckpt.pt").write_text("not a checkpoint"), "ckpt.pt cannot be read, it is damaged",
     ([], ["--eval-only"])),
    (lambda out: (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo\n'),
     "metrics.jsonl, line 2, is not a JSON record", ([],)),  # only training reads it
], ids=["truncated ckpt.pt", "foreign ckpt.pt", "metrics.jsonl damaged inside"])
def test_a_damaged_file_is_one_line_naming_it_and_what_to_do(damage, words, commands, two_steps, tmp_path, capsys):
    out = shutil.copytree(two_steps[0], tmp_path / "run")
    damage(out)
    files = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for extra in commands:
        line = fault_line(capsys, [*ARGS, "--steps", "4", "--out", str(out), *extra])
        assert words in line and ("delete" in line or "restore" in line), line
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files  # nothing written


@pytest.mark.parametrize("damage", [
    lambda out: (out / "config.json").write_text('{"method": "rf", "da'),  # nothing reads it: rewritten
    lambda out: (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text() + '{"step": 3, "loss": 0.'),
], ids=["truncated config.json", "metrics.jsonl cut in its last line"])
def test_a_file_that_a_killed_process_cut_short_is_repaired_by_the_resume(damage, two_steps, tmp_path, capsys):
    base, straight = two_steps
    out = shutil.copytree(base, tmp_path / "run")
    damage(out)
    fewstep.main([*ARGS, "--steps", "4", "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config == json.loads((straight / "config.json").read_text())
    assert same_weights(out, straight) and losses(out) == losses(straight)


def test_a_second_process_on_the_same_out_is_refused_and_sigterm_leaves_a_resumable_checkpoint(tmp_path, capsys):
    """A real training process holds --out; this process, started on it too, is refused in one line. SIGTERM ends the
    first mid-run; its last checkpoint loads, the lock is gone with it, and the rerun resumes bit for bit."""
    out, straight = tmp_path / "run", tmp_path / "straight"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # one thread, as this process
    log = open(tmp_path / "first.log", "w")  # a file, not a pipe: its progress bar never fills a buffer and blocks
    p = subprocess.Popen([sys.executable, str(ROOT / "fewstep.py"), *ARGS, "--steps", "100000", "--out", str(out)],
                         cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        step, deadline = 0, time.time() + 240
        while step < 3 and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
            try:
                step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
            except (FileNotFoundError, RuntimeError, EOFError):
                pass
        assert p.poll() is None and step >= 3, (tmp_path / "first.log").read_text()[-3000:]
        line = fault_line(capsys, [*ARGS, "--steps", "5", "--out", str(out)])
        assert f"--out {out} is in use by another process" in line, line
        line = fault_line(capsys, [*ARGS, "--eval-only", "--out", str(out)])  # its samples would mix too
        assert "is in use by another process" in line, line
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        log.close()
    assert p.returncode == -signal.SIGTERM
    k = rundir.load_checkpoint(out / "ckpt.pt")["step"]  # complete: a kill never leaves half a checkpoint
    (out / "ckpt.pt.k1ll3d.tmp").write_bytes(b"PK\x03\x04")  # what a kill in the middle of a save leaves
    fewstep.main([*ARGS, "--steps", str(k + 2), "--out", str(out)])
    assert f"resuming {out / 'ckpt.pt'} at step {k}" in capsys.readouterr().out
    assert not list(out.glob("*.tmp"))  # removed by the rerun, which holds the lock
    fewstep.main([*ARGS, "--steps", str(k + 2), "--out", str(straight)])
    assert same_weights(out, straight) and losses(out) == losses(straight)
