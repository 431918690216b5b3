"""Every script's command line on every kind of bad input, run as a user runs it: exit status 2, one line
"<script>: error: ..." naming the problem, and no traceback. Each command must fail before any real work (training,
sampling, feature extraction), so the inputs are tiny.

A new Python process per case spent most of its time importing torch (about 4 CPU seconds each, 42 cases: over
100 s of the suite). So each script's cases run in one process of their own (WORKER): every case executes the
script file afresh as __main__ (runpy.run_path, the same code path as `python script.py ...`) with its own
sys.argv and environment, and its exit status is the code of the SystemExit that ends it (what the interpreter
would return); anything else that escapes is recorded with its traceback, as the interpreter would print it."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import rundir
import unet

ROOT = Path(__file__).resolve().parents[1]


def make_inputs(d):
    """A regular file to put an --out under, a file that is not a checkpoint, a raw tiny state dict, a cfm-like and
    a ddpm-like run directory (tiny preset, untrained), and a folder of two PNGs."""
    (d / "afile").write_text("a file, so afile/sub cannot be created")
    (d / "text.pt").write_text("not a torch file")
    sd = unet.create("tiny").state_dict()
    torch.save(sd, d / "tiny_raw.pt")
    kwargs = unet.preset_kwargs("tiny")
    for name, config in (("cfm_run", {"method": "cfm", "data": "mnist5k", "sigma_min": 0.0, "unet": kwargs}),
                         ("ddpm_run", {"method": "ddpm", "data": "mnist5k", "image_size": None, "unet": kwargs,
                                       "diffusion": {"T": 1000, "schedule": "linear"}})):
        (d / name).mkdir()
        torch.save({"model": sd, "ema": sd, "step": 1, "config": config}, d / name / "ckpt.pt")
    (d / "imgs").mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(d / "imgs" / f"{i}.png")


RAW = ["--ckpt", "tiny_raw.pt", "--arch", "tiny"]
NO_WEIGHTS = {"FID_WEIGHTS": "no_such_weights.pt"}
# (script, arguments, extra environment, words the error line must contain)
CASES = [
    ("ddpm.py", ["--data", "nonexistent", "--out", "r"], {}, "unknown dataset 'nonexistent'"),
    ("ddpm.py", ["--data", "folder:no_such_dir", "--out", "r"], {}, "no_such_dir"),
    ("ddpm.py", ["--arch", "nope", "--out", "r"], {}, "invalid choice: 'nope'"),
    ("ddpm.py", ["--data", "mnist5k", "--out", "afile/sub"], {}, "cannot write to --out afile/sub"),
    ("ddpm.py", ["--ckpt", "missing.pt"], {}, "missing.pt does not exist"),
    ("ddpm.py", ["--ckpt", "text.pt"], {}, "not a torch checkpoint"),
    ("ddpm.py", ["--ckpt", "cfm_run/ckpt.pt"], {}, "cfm run"),
    ("ddpm.py", ["--ckpt", "tiny_raw.pt"], {}, "--arch"),
    ("ddpm.py", ["--ckpt", "tiny_raw.pt", "--arch", "mnist"], {}, "shape mismatch"),
    ("ddpm.py", RAW + ["--out", "afile/sub"], {}, "cannot write to --out"),
    ("ddpm.py", RAW + ["--num-samples", "0", "--fid", "4", "--out", "o"], NO_WEIGHTS, "no_such_weights.pt"),
    ("ddpm.py", RAW + ["--num-samples", "0", "--fid", "4", "--fid-ref", "nonexistent", "--out", "o"], {},
     "--fid-ref 'nonexistent'"),
    ("ddpm.py", ["--ckpt", "ddpm_run/ckpt.pt", "--num-samples", "0", "--fid", "4", "--fid-ref", "none.npz"], {},
     "none.npz does not exist"),
    ("ddpm.py", RAW + ["--device", "tpu9"], {}, "--device"),
    ("ddpm.py", RAW + ["--respace", "abc", "--out", "o"], {}, "--respace 'abc'"),
    ("ddim.py", RAW + ["--steps", "5000", "--out", "o"], {}, "--steps 5000"),
    ("ddim.py", ["--ckpt", "missing.pt"], {}, "missing.pt does not exist"),
    ("ddim.py", ["--ckpt", "text.pt"], {}, "not a torch checkpoint"),
    ("ddim.py", ["--ckpt", "cfm_run/ckpt.pt"], {}, "cfm run"),
    ("ddim.py", ["--ckpt", "tiny_raw.pt", "--arch", "nope"], {}, "invalid choice: 'nope'"),
    ("ddim.py", RAW + ["--out", "afile/sub"], {}, "cannot write to --out"),
    ("ddim.py", RAW + ["--num-instances", "0", "--fid", "4", "--out", "o"], NO_WEIGHTS, "no_such_weights.pt"),
    ("ddim.py", RAW + ["--num-instances", "0", "--fid", "4", "--fid-ref", "nonexistent", "--out", "o"], {},
     "--fid-ref 'nonexistent'"),
    ("cfm_mnist.py", ["train", "--data", "nonexistent", "--out", "r"], {}, "unknown dataset 'nonexistent'"),
    ("cfm_mnist.py", ["train", "--arch", "nope", "--out", "r"], {}, "invalid choice: 'nope'"),
    ("cfm_mnist.py", ["train", "--data", "mnist5k", "--out", "afile/sub"], {}, "cannot write to --out"),
    ("cfm_mnist.py", ["train", "--data", "mnist5k", "--out", "ddpm_run"], {}, "ddpm run"),
    ("cfm_mnist.py", ["sample", "--solver", "heun", "--out", "cfm_run"], {}, "invalid choice: 'heun'"),
    ("cfm_mnist.py", ["sample", "--out", "no_run"], {}, "no checkpoint at no_run"),
    ("cfm_mnist.py", ["sample", "--out", "ddpm_run"], {}, "ddpm run"),
    ("cfm_mnist.py", ["sample", "--out", "cfm_run", "--fid", "4"], NO_WEIGHTS, "no_such_weights.pt"),
    ("cfm_mnist.py", ["sample", "--out", "cfm_run", "--fid", "4", "--fid-ref", "nonexistent"], {},
     "--fid-ref 'nonexistent'"),
    ("cfm_mnist.py", ["sample", "--out", "cfm_run", "--fid", "1"], {}, "at least 2"),
    ("fid.py", ["imgs", "imgs", "--weights", "no_such_weights.pt"], {}, "no_such_weights.pt"),
    ("fid.py", ["imgs", "imgs"], NO_WEIGHTS, "no_such_weights.pt"),
    ("fid.py", ["imgs", "imgs", "--weights", "text.pt"], {}, "neither"),
    ("fid.py", ["no_such_dir", "imgs"], {}, "no_such_dir is neither a folder nor an .npz"),
    ("fid.py", ["imgs", "--save-stats", "afile/x.npz"], {}, "cannot write to --save-stats"),
    ("sde_toy.py", ["--out", "afile/sub"], {}, "cannot write to --out"),
    ("sde_toy.py", ["--out", "r", "--particles", "0"], {}, "argument --particles: must be >= 1, got 0"),
    ("ddim.py", RAW + ["--adm-config", "{not json", "--out", "o"], {}, "argument --adm-config: not valid JSON"),
    ("cfm_mnist.py", ["train", "--data", "mnist5k", "--ema-decay", "1", "--out", "r"], {},
     "argument --ema-decay: must be in [0, 1), got 1"),
    ("data.py", ["nonexistent"], {}, "unknown dataset 'nonexistent'"),
    ("data.py", ["mnist5k", "--out", "afile/sub/x.png"], {}, "cannot write to --out"),
]


# Runs the cases given as JSON in argv[1] ([script path, args, extra env] each) one after another in this process and
# prints one JSON list of {returncode, stdout, stderr} as its last line.
WORKER = r"""
import contextlib, io, json, os, runpy, sys, traceback
cases, results = json.loads(sys.argv[1]), []
for path, args, extra in cases:
    environ = dict(os.environ)
    os.environ.update(extra)
    sys.argv = [os.path.basename(path), *args]  # argparse and rundir.run_cli name the script from argv[0]
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as e:  # the interpreter exits with e.code: 0 for None; a message it prints, and exits 1
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            err.write(f"{e.code}\n")
            code = 1
    except BaseException:
        err.write(traceback.format_exc())
        code = 1
    finally:
        os.environ.clear()
        os.environ.update(environ)
    results.append({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


def run_in_one_process(cases, cwd, env):
    """cases: [(script file, args, extra env)] run by WORKER one after another in one new process with cwd and env
    (PYTHONPATH: the project, so that the scripts import data, unet, fid from beside them as `python script.py`
    does); one namespace per case with returncode, stdout and stderr."""
    r = subprocess.run([sys.executable, "-c", WORKER, json.dumps([(str(p), list(a), e) for p, a, e in cases])],
                       cwd=cwd, env=dict(env, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [SimpleNamespace(**res) for res in json.loads(r.stdout.strip().splitlines()[-1])]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    make_inputs(d)
    env = dict(os.environ, FID_CACHE=str(d / "fid_cache"), DIFFUSION_DATA=str(d / "data"))
    env.pop("FID_WEIGHTS", None)
    scripts = sorted({case[0] for case in CASES})

    def run(script):
        return run_in_one_process([(ROOT / s, args, extra) for s, args, extra, _ in CASES if s == script], d, env)

    with ThreadPoolExecutor(2) as pool:  # one process per script, two at a time for two cores
        by_script = {s: iter(res) for s, res in zip(scripts, pool.map(run, scripts))}
    return d, [next(by_script[case[0]]) for case in CASES]  # back into CASES order


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_bad_input_exits_2_with_one_line_and_no_traceback(results, i):
    d, done = results
    script, args, _, words = CASES[i]
    r = done[i]
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stderr)
    errors = [line for line in r.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith(script), r.stderr  # argparse's usage line may precede it
    assert words in errors[0], errors[0]
    assert not (d / "r").exists()  # a bad --data leaves no run directory behind


def test_run_cli_exit_status_and_bugs(capsys):
    def user_mistake():
        raise rundir.UsageError("first line\n  second line of the same message")

    with pytest.raises(SystemExit) as e:
        rundir.run_cli(user_mistake, prog="x.py")
    assert e.value.code == 2
    assert capsys.readouterr().err == "x.py: error: first line second line of the same message\n"

    def bug():
        raise KeyError("a bug")

    with pytest.raises(KeyError):  # anything that is not a UsageError keeps its traceback
        rundir.run_cli(bug, prog="x.py")
