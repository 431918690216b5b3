"""Tests for rundir.py: atomic checkpoints and their errors, RNG state through weights_only, config and metrics
files, the loss plot, --device, the argparse validators, NonFiniteLoss / check_finite and run_cli, the --out check,
a disk that fills up mid-write, a damaged metrics.jsonl, the run directory's lock and the image-size check. Expected
values are built in the tests (a simulated crash mid-write, seeded draws, hand-written records and option strings)."""

import argparse
import errno
import functools
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rundir

ROOT = Path(__file__).resolve().parents[1]


def test_imports_no_project_module():
    """rundir.py is the bottom of the import graph: importing it loads no script and not data.py."""
    code = ("import sys, rundir; print(sorted(m for m in ('data', 'unet', 'fid', 'ddpm', 'ddim', 'cfm_mnist', "
            "'sde_toy', 'fewstep', 'trainer', 'matplotlib') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_atomic_checkpoint_survives_crash(tmp_path, monkeypatch):
    path = tmp_path / "run" / "ckpt.pt"
    rundir.save_checkpoint(path, {"step": 1, "w": torch.arange(1000.0)})
    real_save = torch.save

    def crash_halfway(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        raise KeyboardInterrupt("simulated kill mid-write")

    monkeypatch.setattr(torch, "save", crash_halfway)
    with pytest.raises(KeyboardInterrupt):
        rundir.save_checkpoint(path, {"step": 2, "w": torch.zeros(1000)})
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = rundir.load_checkpoint(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.arange(1000.0))
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temp file left behind

    rundir.save_checkpoint(path, {"step": 2})
    assert rundir.load_checkpoint(path)["step"] == 2


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        rundir.load_checkpoint(tmp_path / "nothere.pt")
    good = tmp_path / "good.pt"
    rundir.save_checkpoint(good, {"w": torch.ones(10_000)})
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(rundir.CheckpointError, match="truncated.pt"):
        rundir.load_checkpoint(bad)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"f": functools.partial(print)}, unsafe)  # an arbitrary Python object
    with pytest.raises(rundir.CheckpointError, match="weights_only"):
        rundir.load_checkpoint(unsafe)


def test_rng_state_round_trip(tmp_path):
    rundir.seed_everything(0)
    np.random.standard_normal(), random.gauss(0, 1)  # leave a cached Gaussian in numpy and python

    def draw():
        return (torch.rand(4).tolist(), torch.randn(2).tolist(), np.random.rand(3).tolist(),
                np.random.standard_normal(3).tolist(), [random.random(), random.gauss(0, 1), random.randint(0, 99)])

    rundir.save_checkpoint(tmp_path / "ckpt.pt", {"rng": rundir.rng_state()})
    first = draw()
    rundir.seed_everything(123)
    draw()
    rundir.set_rng_state(rundir.load_checkpoint(tmp_path / "ckpt.pt")["rng"])  # through weights_only=True
    assert draw() == first


def test_config_metrics_and_plot(tmp_path):
    rundir.write_config(tmp_path, {"lr": 1e-4, "mult": (1, 2), "out": tmp_path, "device": torch.device("cpu")})
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg == {"lr": 1e-4, "mult": [1, 2], "out": str(tmp_path), "device": "cpu"}
    for step in range(0, 100):
        rundir.log_metrics(tmp_path, {"step": step, "loss": torch.tensor(1.0 / (step + 1)), "gap": np.float32(-step)})
    rundir.log_metrics(tmp_path, {"step": 50, "loss": 0.5})  # a resumed run logs step 50 again
    records = rundir.read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(100)) and records[50]["loss"] == 0.5
    path = rundir.plot_metrics(tmp_path)
    assert path == tmp_path / "loss.png" and Image.open(path).size[0] > 100
    both = rundir.plot_metrics(tmp_path, keys=("loss", "gap"), path=tmp_path / "both.png")  # negative: linear scale
    assert Image.open(both).size[1] > Image.open(path).size[1]
    with pytest.raises(ValueError, match="none of the asked keys"):
        rundir.plot_metrics(tmp_path, keys=("fid",))


def test_log_scale_only_for_positive_series_spanning_a_decade():
    assert rundir.log_scale_suits([1.9, 0.8, 0.19])  # a falling loss: 10x between its ends
    assert not rundir.log_scale_suits([1.9, 0.8, 0.2])  # 9.5x: one decade is not spanned, linear
    assert not rundir.log_scale_suits(1 - 1e-5 * np.arange(100))  # imf's weighted loss: near-constant, linear
    assert not rundir.log_scale_suits([5.0, -1.0, 0.01]) and not rundir.log_scale_suits([0.0, 1.0])  # not positive
    assert not rundir.log_scale_suits([])


def test_get_device():
    assert rundir.get_device("cpu") == torch.device("cpu")
    assert rundir.get_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="--device cpu"):
            rundir.get_device("cuda")


# ---------------------------------------------------------------------------------------------------- validators

@pytest.mark.parametrize("fn, good, bad", [
    (rundir.positive_int, {"1": 1, "250": 250}, {"0": "must be >= 1, got 0", "-3": "must be >= 1, got -3",
                                                  "2.5": "expected an integer >= 1, got '2.5'",
                                                  "x": "expected an integer >= 1, got 'x'"}),
    (rundir.non_negative_int, {"0": 0, "7": 7}, {"-1": "must be >= 0, got -1",
                                                 "x": "expected an integer >= 0, got 'x'"}),
    (rundir.positive_float, {"2e-4": 2e-4, "5": 5.0}, {"0": "must be > 0, got 0", "-1e-3": "must be > 0, got -1e-3",
                                                       "nan": "must be > 0, got nan",
                                                       "x": "expected a number > 0, got 'x'"}),
    (rundir.non_negative_float, {"0": 0.0, "1.5": 1.5}, {"-0.1": "must be >= 0, got -0.1",
                                                         "nan": "must be >= 0, got nan",
                                                         "x": "expected a number >= 0, got 'x'"}),
    (rundir.share_arg, {"0": 0.0, "0.3": 0.3, "1": 1.0}, {"1.5": "must be a share in [0, 1], got 1.5",
                                                           "-0.1": "must be a share in [0, 1], got -0.1",
                                                           "x": "expected a share in [0, 1], got 'x'"}),
    (rundir.below_one_arg, {"0": 0.0, "0.999": 0.999}, {"1": "must be in [0, 1), got 1",
                                                        "-0.5": "must be in [0, 1), got -0.5",
                                                        "x": "expected a number in [0, 1), got 'x'"}),
])
def test_validators(fn, good, bad):
    for s, value in good.items():
        assert fn(s) == value and type(fn(s)) is type(value)
    for s, message in bad.items():
        with pytest.raises(argparse.ArgumentTypeError) as e:
            fn(s)
        assert str(e.value) == message


def test_validator_in_a_parser_exits_2_naming_the_option(capsys):
    p = argparse.ArgumentParser(prog="x.py")
    p.add_argument("--steps", type=rundir.positive_int, default=10)
    assert p.parse_args([]).steps == 10 and p.parse_args(["--steps", "3"]).steps == 3
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--steps", "0"])
    assert e.value.code == 2
    assert "x.py: error: argument --steps: must be >= 1, got 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- NaN loss

def test_check_finite_names_the_step_the_checkpoint_and_the_lr(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    for good in (torch.tensor(0.5), 1.25, torch.tensor([0.1])):
        rundir.check_finite(good, 3, ckpt, 1e-3)  # returns quietly
    with pytest.raises(rundir.NonFiniteLoss) as e:
        rundir.check_finite(torch.tensor(float("nan")), 1, ckpt, 1e-3)
    assert str(e.value) == (f"loss is nan at step 1: training stopped; the last good checkpoint {ckpt} (step none "
                            f"yet) is untouched. Lower --lr (now 0.001) or --grad-clip and rerun the command to "
                            f"resume from it.")
    rundir.save_checkpoint(ckpt, {"step": 40})
    with pytest.raises(rundir.NonFiniteLoss, match=r"loss is inf at step 41: .*\(step 40\) is untouched"):
        rundir.check_finite(torch.tensor(float("inf")), 41, ckpt, 2e-4)
    assert issubclass(rundir.NonFiniteLoss, RuntimeError) and not issubclass(rundir.NonFiniteLoss, rundir.UsageError)


# ---------------------------------------------------------------------------------------------------- run_cli

def test_run_cli_prints_user_errors_and_nan_losses_in_one_line(capsys):
    for error in (rundir.UsageError("first line\n  second line"), rundir.MissingFileError("no such file"),
                  rundir.NonFiniteLoss("loss is nan at step 8:\n training stopped")):
        def main():
            raise error

        with pytest.raises(SystemExit) as e:
            rundir.run_cli(main, prog="x.py")
        assert e.value.code == 2
        assert capsys.readouterr().err == f"x.py: error: {' '.join(str(error).split())}\n"
    assert rundir.run_cli(lambda: 7, prog="x.py") == 7

    def bug():
        raise KeyError("a bug")

    with pytest.raises(KeyError):  # anything else is a bug and keeps its traceback
        rundir.run_cli(bug, prog="x.py")


def test_run_cli_says_a_full_disk_in_one_line_and_keeps_other_os_errors_as_bugs(capsys):
    def full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "run/grid.png")

    with pytest.raises(SystemExit) as e:
        rundir.run_cli(full, prog="x.py")
    assert e.value.code == 2
    assert capsys.readouterr().err == ("x.py: error: cannot write run/grid.png (No space left on device); the files "
                                       "written before it are intact: free space on that disk and rerun the command "
                                       "(a training run resumes from its last checkpoint)\n")

    def bug():
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))  # a closed descriptor: the program's fault

    with pytest.raises(OSError):
        rundir.run_cli(bug, prog="x.py")


# ---------------------------------------------------------------------------------------------------- --out, faults

def test_check_out_dir_refuses_what_cannot_be_a_folder_and_creates_nothing(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    monkeypatch.chdir(tmp_path)
    assert rundir.check_out_dir("new/run") == Path("new/run") and not Path("new").exists()  # checked, not made
    assert rundir.make_out_dir("new/run").is_dir()
    cases = {"afile": "cannot write to --out afile (it is a file); pass a folder you can write to",
             "afile/sub": "cannot write to --out afile/sub (afile is a file, not a folder); pass a folder you can "
                          "write to",
             "/dev/null/x": "cannot write to --out /dev/null/x (/dev/null is a file, not a folder); pass a folder you "
                            "can write to"}
    if Path("/proc/self").exists():  # root may write anywhere permissions decide; procfs makes no folder for anyone
        cases["/proc/forbidden"] = ("cannot write to --out /proc/forbidden (/proc takes no new files: No such file "
                                    "or directory); pass a folder you can write to")
    for path, message in cases.items():
        with pytest.raises(rundir.UsageError) as e:
            rundir.make_out_dir(path)
        assert str(e.value) == message
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on "
                                                                                             "device")))
    with pytest.raises(rundir.UsageError) as e:
        rundir.make_out_dir("other/run", "--save-stats")
    assert str(e.value) == (f"cannot write to --save-stats other/run ({tmp_path} takes no new files: No space left on "
                            f"device); free space on that disk or pass a folder on another")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "new"]  # nothing else, no probe left


def test_a_failed_write_keeps_the_old_file_and_says_so_in_one_line(tmp_path, monkeypatch):
    """A disk that fills up while torch.save writes: torch reports it as a RuntimeError of its zip writer, whose
    cause is the OSError; both reach the user as a RunDirError naming the file, and the old file stays whole."""
    path = tmp_path / "ckpt.pt"
    rundir.save_checkpoint(path, {"step": 1, "w": torch.arange(1000.0)})
    real_fdopen = os.fdopen

    class FillsUp:  # the file object write_atomic writes through: the disk is full after 1000 bytes
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FillsUp(real_fdopen(fd, mode)))
    for write in (lambda: rundir.save_checkpoint(path, {"step": 2, "w": torch.zeros(1000)}),
                  lambda: rundir.write_config(tmp_path, {"text": "x" * 2000})):
        with pytest.raises(rundir.RunDirError, match=r"cannot write .* \(No space left on device\); the files "
                                                     r"written before it are intact: free space on that disk"):
            write()
    monkeypatch.undo()
    assert rundir.load_checkpoint(path)["step"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_read_metrics_drops_a_last_line_cut_short_and_names_a_damaged_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')  # killed mid-append
    assert rundir.read_metrics(tmp_path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]
    for text, line in (('{"step": 1, "loss": 0.5}\n{"step": 2, "lo\n{"step": 3}\n', 2), ("[1, 2]\n", 1),
                       ('{"step": 1}\n{"step": 2, "lo\n', 2)):  # a cut line that ends in a newline is damage
        path.write_text(text)
        with pytest.raises(rundir.RunDirError) as e:
            rundir.read_metrics(tmp_path)
        message = str(e.value)
        assert message.startswith(f"{path}, line {line}, is not a JSON record") and "delete that line" in message


def test_run_lock_lets_one_holder_at_a_time_and_the_os_frees_it_when_the_process_dies(tmp_path):
    lock = rundir.RunLock(tmp_path)
    with pytest.raises(rundir.RunDirError, match=f"--out {tmp_path} is in use by another process"):
        rundir.RunLock(tmp_path)  # another open of the folder conflicts, even in this process
    lock.release()
    rundir.RunLock(tmp_path).release()
    assert list(tmp_path.iterdir()) == []  # the lock is on the folder: no file written
    holder = subprocess.Popen([sys.executable, "-c", f"import rundir, sys; lock = rundir.RunLock({str(tmp_path)!r}); "
                                                     "print('held', flush=True); sys.stdin.read()"],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(rundir.RunDirError):
            rundir.RunLock(tmp_path)
    finally:
        holder.kill()  # no release(): the OS drops the lock with the process
        holder.wait()
    rundir.RunLock(tmp_path).release()


def test_check_image_size_names_the_sizes_that_work():
    rundir.check_image_size(28, 2, "preset tiny")
    with pytest.raises(rundir.UsageError) as e:
        rundir.check_image_size(30, 2, "preset tiny")
    assert str(e.value) == ("--image-size 30: preset tiny halves the image 2 times, so the size must be a multiple "
                            "of 4: pass --image-size 28 or 32")
    with pytest.raises(rundir.UsageError) as e:
        rundir.check_image_size(7, 3, "preset challenge", typed=False)
    assert str(e.value) == ("the data's 7x7 images: preset challenge halves the image 3 times, so the size must be a "
                            "multiple of 8: pass --image-size 8")
