"""Tests for benchmarks/bench_fewstep.py, the equal-compute benchmark (its wiring, not its numbers).

Inception is replaced by a stand-in score that the test can recompute from the sample PNGs on disk (the mean pixel
value of a set), so that each cell of the table is checked against the samples of the run and NFE it names: a row
scored from the wrong run, NFE or seed fails. The goal ratios printed under the table are recomputed here from
results.json; a second invocation must neither train nor score anything (resume) and write the same table; the grid
PNG has a row per method whose first cell is that method's first NFE-1 sample.
No test asserts a time or a real FID.
"""
import importlib.util
import json
import pathlib
import re

import numpy as np
import pytest
import torch
from PIL import Image

import fewstep
import fid
from test_fewstep import one_thread  # noqa: F401  (autouse fixture: these tiny runs are fastest on one thread)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_fewstep", ROOT / "benchmarks" / "bench_fewstep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stand_in_score(images, ref=None, **kwargs):
    """Not an FID: the mean pixel value of the set, recomputable from the PNGs the run wrote."""
    return float(np.asarray(images, dtype=np.float64).mean())


def score_of_pngs(folder):
    return round(stand_in_score(np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])), 2)


@pytest.fixture
def stand_in_fid(monkeypatch):
    monkeypatch.setattr(fid, "resolve_weights", lambda *a, **k: None)
    monkeypatch.setattr(fid, "reference_statistics", lambda *a, **k: "stand-in reference")  # None means no FID
    monkeypatch.setattr(fid, "compute_fid", stand_in_score)


def test_bench_scores_each_row_from_its_own_samples_resumes_and_states_the_goal_ratios(tmp_path, stand_in_fid,
                                                                                      monkeypatch, capsys):
    bench = load_bench()
    out = tmp_path / "bench"
    argv = ["--minutes", "0.1", "--arch", "tiny", "--num-samples", "20", "--methods", "rf", "reflow",
            "--method-args", "reflow=--num-pairs 32 --teacher-steps 2", "--spread-seeds", "1",
            "--no-training-spread", "--out", str(out)]
    bench.main(argv)
    res = json.loads((out / "results.json").read_text())
    rows = res["results"]
    assert list(rows) == ["rf", "reflow", "rf teacher (reference)", "rf, 100 Euler steps"]

    # Every cell is the score of the samples of the run and NFE it names (the same noise, so a swapped run or NFE
    # would give another mean).
    where = {"rf": "rf", "reflow": "reflow", "rf teacher (reference)": "teacher-rf",
             "rf, 100 Euler steps": "rf-100-steps"}
    for row, run in where.items():
        nfes = ["100"] if run == "rf-100-steps" else ["1", "2", "4"]
        assert sorted(rows[row]["fid"]) == sorted(nfes), row
        for nfe in nfes:
            folder = out / run / "samples" / f"nfe={nfe}"
            assert len(list(folder.glob("*.png"))) == 20, (row, nfe)
            assert rows[row]["fid"][nfe] == score_of_pngs(folder), (row, nfe)
        ckpt = torch.load(out / run / "ckpt.pt", weights_only=True)
        assert rows[row]["steps"] == ckpt["step"]  # (a 3-second budget may end at step 0: wiring, not quality)
    # The many-step reference is the rf run itself, sampled with 100 steps: the same weights.
    a = torch.load(out / "rf" / "ckpt.pt", weights_only=True)["ema"]
    b = torch.load(out / "rf-100-steps" / "ckpt.pt", weights_only=True)["ema"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The distiller's teacher minutes are the shared teacher's training time; rf's are zero.
    teacher_minutes = torch.load(out / "teacher-rf" / "ckpt.pt", weights_only=True)["train_seconds"] / 60
    assert rows["reflow"]["teacher_minutes"] == pytest.approx(teacher_minutes)
    assert rows["rf"]["teacher_minutes"] == 0.0
    assert "--teacher" in rows["reflow"]["options"] and "--num-pairs 32" in rows["reflow"]["options"]

    # Sampling-seed spread: seed 1 draws other noise, so its NFE-1 samples differ from seed 0's.
    spread = res["spread"]
    seed1 = out / "spread-sampling-seed1" / "samples"
    assert spread["sampling seed 1"] == {n: score_of_pngs(seed1 / f"nfe={n}") for n in ("1", "4")}
    assert spread["sampling seed 0 / training seed 0"] == {n: rows["rf"]["fid"][n] for n in ("1", "4")}
    s0 = np.asarray(Image.open(out / "rf" / "samples" / "nfe=1" / "0000.png"))
    assert not np.array_equal(s0, np.asarray(Image.open(seed1 / "nfe=1" / "0000.png")))
    # The floor: 2 real digits per class (20 / 10), scored by the same stand-in.
    floor = json.loads((out / "floor.json").read_text())
    assert floor["n"] == 20 and res["floor"] == floor["fid"]

    # The goal ratios, recomputed from results.json: the best over the competitors only (not the reference rows).
    md = (out / "results.md").read_text()
    rf100 = rows["rf, 100 Euler steps"]["fid"]["100"]
    for nfe, denominator in (("1", rf100), ("4", floor["fid"])):  # the goals: 2 x rf at 100 steps, 2 x the floor
        best_value, best_name = min((rows[k]["fid"][nfe], k) for k in ("rf", "reflow"))
        m = re.search(rf"Best NFE {nfe}: (\S+) (\S+) = (\S+) x", md)
        assert m, md
        assert (m.group(1), float(m.group(2))) == (best_name, best_value)
        assert float(m.group(3)) == pytest.approx(best_value / denominator, abs=5e-4)
    assert re.search(r"\| rf \| [\d.]+ \| 0\.0 \| [\d,]+ \| ", md)

    # The grid: a row per method (rf, reflow), 3 x 4 cells of 28 px with 4-px bars, scaled 3x, 80 px of labels and
    # 16 px of header; the first cell of the rf row is rf's first NFE-1 sample.
    g = np.asarray(Image.open(out / "grid.png"))
    assert g.shape == (16 + 3 * 2 * 32, 80 + 3 * (3 * 4 * 28 + 2 * 4))
    assert np.array_equal(g[16 + 3 * 2: 16 + 3 * 30: 3, 80: 80 + 3 * 28: 3], s0)

    # Resume: everything is done, so nothing is trained or scored again, and the table is the same.
    capsys.readouterr()
    monkeypatch.setattr(bench.fewstep, "main", lambda *a, **k: pytest.fail("trained or scored again"))
    bench.main(argv)
    assert (out / "results.md").read_text() == md
    assert "more min" not in capsys.readouterr().out  # the "training N more min" line of bench.train


def test_bench_resumes_an_interrupted_run_for_the_rest_of_its_budget(tmp_path, monkeypatch):
    """A run whose checkpoint holds part of the budget is trained only for what is left (read from ckpt.pt); a run
    whose invocation ended (eval.json written) is not entered again for the seconds its start-up took."""
    bench = load_bench()
    run = tmp_path / "rf"
    fewstep.main(["--method", "rf", "--data", "mnist5k", "--arch", "tiny", "--batch-size", "16", "--steps", "2",
                  "--no-fid", "--num-samples", "4", "--nfe", "1", "--out", str(run)])
    held = torch.load(run / "ckpt.pt", weights_only=True)["train_seconds"] / 60
    asked = []
    monkeypatch.setattr(bench.fewstep, "main", lambda argv: asked.append(argv))
    bench.train(run, ["--method", "rf"], held + 0.5, print)  # ended: eval.json
    assert asked == []
    (run / "eval.json").unlink()  # killed before its closing evaluation
    bench.train(run, ["--method", "rf"], held + 0.5, print)
    assert len(asked) == 1
    minutes = float(asked[0][asked[0].index("--minutes") + 1])
    assert minutes == pytest.approx(0.5, abs=1e-4)
    asked.clear()
    bench.train(run, ["--method", "rf"], held, print)  # nothing left of the budget: not trained
    assert asked == []


def test_bench_class_conditional_adds_a_guided_row_per_method_at_equal_nfe(tmp_path, stand_in_fid):
    """--class-cond --guidance W: rf's guided row samples the rf run again at W (same weights, 2 NFE per step, so
    no NFE 1), meanflow's is a second run trained with W; samples are class-balanced; the closing lines compare the
    best score at each NFE with and without guidance, recomputed here."""
    bench = load_bench()
    out = tmp_path / "bench"
    bench.main(["--minutes", "0.02", "--arch", "tiny", "--num-samples", "10", "--methods", "rf", "meanflow",
                "--method-args", "meanflow=--arch tiny", "--class-cond", "--guidance", "2", "--spread-seeds", "0",
                "--no-training-spread", "--out", str(out)])
    rows = json.loads((out / "results.json").read_text())["results"]
    assert set(rows) == {"rf", "meanflow", "meanflow, w=2", "rf, w=2", "rf, 100 Euler steps"}
    assert sorted(rows["rf, w=2"]["fid"]) == ["2", "4"] and sorted(rows["rf"]["fid"]) == ["1", "2", "4"]
    a = torch.load(out / "rf" / "ckpt.pt", weights_only=True)["ema"]
    b = torch.load(out / "rf-w2" / "ckpt.pt", weights_only=True)["ema"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # sampled again, not trained again
    assert json.loads((out / "rf-w2" / "eval.json").read_text())["guidance"] == 2
    cfg = json.loads((out / "meanflow-w2" / "config.json").read_text())
    assert cfg["method_args"]["guidance"] == 2 and cfg["classes"] == [str(k) for k in range(10)]
    assert json.loads((out / "meanflow" / "config.json").read_text())["method_args"]["guidance"] == 1
    for row, run in (("rf, w=2", "rf-w2"), ("meanflow, w=2", "meanflow-w2"), ("meanflow", "meanflow")):
        for nfe, value in rows[row]["fid"].items():
            assert value == score_of_pngs(out / run / "samples" / f"nfe={nfe}"), (row, nfe)
    md = (out / "results.md").read_text()
    for nfe in ("1", "2", "4"):
        plain = min((rows[k]["fid"][nfe], k) for k in ("rf", "meanflow"))
        guided = min((rows[k]["fid"][nfe], k) for k in ("rf, w=2", "meanflow, w=2") if nfe in rows[k]["fid"])
        m = re.search(rf"Guidance at NFE {nfe}: best without (\S+) (\S+), best with w = 2 (.+?) (\S+) \(", md)
        assert m and (m.group(1), float(m.group(2))) == (plain[1], plain[0]), md
        assert (m.group(3), float(m.group(4))) == (guided[1], guided[0]), md
