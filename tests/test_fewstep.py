"""Tests for fewstep.py.

Exactness: for 1-D Gaussian data x1 ~ N(m, s^2) and noise x0 ~ N(0, 1), the rectified-flow ODE is linear and its
flow map is affine in x with closed-form coefficients (derived here, independently of fewstep.py):
    x_t = (1 - t) x0 + t x1 ~ N(t m, sigma_t^2),  sigma_t^2 = (1 - t)^2 + t^2 s^2
    v(x, t) = E[x1 - x0 | x_t = x] = m + (t s^2 - (1 - t)) / sigma_t^2 (x - t m)   (jointly Gaussian regression)
    flow(x, t -> r) = r m + sigma_r (x - t m) / sigma_t                          (monotone map between Gaussians)
A small network that is affine in x with MLP coefficients of (t, cond) can represent all of them; each method must
train to the exact function and its few-step samples must pass a KS test against N(m, s^2).
Machinery: tiny preset on mnist5k, falling loss, exact NFE (counted with a forward hook), resume, DDP with gloo,
bad input. CS492(C): a run around a stand-in for the course's U-Net (--net course:PATH), exported as a submission
(--export-submission) and sampled in a fresh process the way the official loader does.
"""
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn as nn
from PIL import Image

import cs492c
import data
import fewstep
import rundir
import trainer
from fewstep import CTM, ConsistencyModel, Reflow, RectifiedFlow, Shortcut
from test_cli import run_in_one_process

M, S = 1.5, 0.5  # target N(M, S^2)
ROOT = pathlib.Path(__file__).resolve().parents[1]


def sigma(t):
    t = torch.as_tensor(t, dtype=torch.get_default_dtype() if not torch.is_tensor(t) else t.dtype)
    return torch.sqrt((1 - t) ** 2 + t ** 2 * S ** 2)


def exact_velocity(x, t):
    return M + (t * S ** 2 - (1 - t)) / sigma(t) ** 2 * (x - t * M)


def exact_flow(x, t, r):
    return r * M + sigma(r) * (x - t * M) / sigma(t)


class ExactVelocityNet(nn.Module):
    """The closed-form velocity as a net(x, 1000 t): the teacher of the reflow test."""

    def forward(self, x, t, cond=None):
        return exact_velocity(x, fewstep.expand_t(t / 1000, x))


class GaussNet(nn.Module):
    """f(x, t, cond) = a(t, cond) x + b(t, cond), a and b from an MLP of (t / 1000, cond / 1000). x: (B, 1)."""

    def __init__(self, hidden=64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2))

    def forward(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0]) / 1000
        c = torch.zeros_like(t) if cond is None else torch.as_tensor(cond, dtype=x.dtype).expand(x.shape[0]) / 1000
        a, b = self.mlp(torch.stack([t, c], dim=1)).unbind(1)
        return a[:, None] * x + b[:, None]


@pytest.fixture(autouse=True)
def one_thread():
    """Small MLPs run fastest on one thread (and several threads thrash when other jobs share the cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fit(method, steps=1500, batch=512, pairs=None, seed=0):
    """Train a GaussNet with method.loss (EMA of decay 0.99 passed as `ema`, as the training loop does)."""
    torch.manual_seed(seed)
    net = GaussNet()
    ema = GaussNet().requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for k in range(steps):
        if hasattr(method, "training_step"):  # as the training loop does (cm's curriculum)
            method.training_step = k
        if pairs is None:
            batch_args = (M + S * torch.randn(batch, 1),)
        else:
            idx = torch.randint(0, len(pairs[0]), (batch,))
            batch_args = (pairs[0][idx], pairs[1][idx])
        loss = method.loss(net, *batch_args, ema=ema)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.mul_(0.99).add_(p, alpha=0.01)
    return ema.eval()  # averaged weights: less minibatch noise in the fitted function


def ks_pvalue(method, net, nfe, n=2000, seed=1):
    noise = torch.randn(n, 1, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        x = method.sample(net, noise, nfe)
    return scipy.stats.kstest(x[:, 0].numpy(), "norm", args=(M, S)).pvalue


class Perturbed(nn.Module):
    """exact(x, t, cond) + a + b x with (a, b) = 0: the exact solution, with two directions to differentiate in."""

    def __init__(self, exact):
        super().__init__()
        self.exact, self.ab = exact, nn.Parameter(torch.zeros(2))

    def forward(self, x, t, cond=None, **labels):
        return self.exact(x, t, cond, **labels) + self.ab[0] + self.ab[1] * x


def stationarity_z(loss_fn, exact, batches=30, wrap=None):
    """The largest |mean| / standard error of d loss / d(a, b) over independent batches, at a = b = 0: the
    expected gradient vanishes at a stationary point (z of order 1), not elsewhere (z grows with the batches).
    wrap: another two-parameter perturbation (default Perturbed: a + b x)."""
    net, grads = (wrap or Perturbed)(exact), []
    for k in range(batches):
        torch.manual_seed(1000 + k)
        net.zero_grad()
        loss_fn(net).backward()
        grads.append(net.ab.grad.clone())
    g = torch.stack(grads).double()
    return (g.mean(0) / (g.std(0) / batches ** 0.5 + 1e-30)).abs().max().item()


def grid_x(t):
    """Points where x_t has its mass: t M + sigma_t z for z in [-2, 2] (the net never sees the far tails)."""
    return t * M + sigma(t) * torch.linspace(-2, 2, 11)[:, None]


def test_closed_form_velocity_is_the_derivative_of_the_flow_map():
    """The test's own closed forms: d/dr flow(x, t -> r) at r = t is v(x, t) (central difference), and the flow
    carries N(0, 1) at t = 0 to N(M, S^2) at t = 1."""
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    for t in (0.1, 0.5, 0.9):
        t_ = torch.tensor(t, dtype=torch.float64)
        h = 1e-6
        fd = (exact_flow(x, t_, t_ + h) - exact_flow(x, t_, t_ - h)) / (2 * h)
        torch.testing.assert_close(fd, exact_velocity(x, t_), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(exact_flow(x, torch.tensor(0.0, dtype=torch.float64),
                                          torch.tensor(1.0, dtype=torch.float64)), M + S * x)


def test_rf_one_euler_step_of_the_exact_velocity_collapses_to_the_mean():
    """Why few-step methods exist: with the exact rf velocity, one Euler step sends every noise to E[x1] = M."""
    noise = torch.randn(100, 1)
    x = RectifiedFlow().sample(ExactVelocityNet(), noise, 1)
    torch.testing.assert_close(x, torch.full_like(x, M))


def test_rf_learns_the_exact_velocity_and_many_steps_sample_the_target():
    method = RectifiedFlow()
    net = fit(method)
    with torch.no_grad():
        for t in (0.1, 0.3, 0.5, 0.7, 0.9):
            x = grid_x(t)
            err = (net(x, torch.full((len(x),), 1000 * t)) - exact_velocity(x, t)).abs().max().item()
            assert err < 0.1, (t, err)
    assert ks_pvalue(method, net, 64) > 1e-3


def euler_composite_step(x, t, d, m):
    """Shortcut's exact fixed point for finite M: flow matching pins s(x, t, 1/M) to v(x, t), and each level is the
    average of two steps of the level below, so s(x, t, d) = (d M Euler steps of size 1/M of v - x) / d."""
    y = x.clone()
    for k in range(round(d * m)):
        y = y + exact_velocity(y, t + k / m) / m
    return (y - x) / d


def test_shortcut_learns_its_exact_fixed_point_and_samples_the_target_at_nfe_1_and_4():
    """M = 32: Euler with 32 steps of the exact velocity ends at std 0.478 (target 0.5), close enough for a KS test
    at 2,000 samples; with M = 8 it is 0.415 and the test could not pass even for a perfect shortcut model."""
    method = Shortcut(max_steps=32)
    net = fit(method, steps=2500)
    with torch.no_grad():
        for d in (1.0, 0.5, 0.25):
            for t in np.arange(0, 1, d):
                x = grid_x(float(t))
                tt, dd = torch.full((len(x),), float(t)), torch.full((len(x),), d)
                err = (method.step(net, x, tt, dd) - euler_composite_step(x, float(t), d, 32)).abs().max().item()
                assert err < 0.2, (t, d, err)
    assert ks_pvalue(method, net, 1) > 1e-3
    assert ks_pvalue(method, net, 4) > 1e-3


class ShortcutWithDoubledTarget(Shortcut):
    """A deliberate factor error: the bootstrap half steps (d > 0) are taken with twice the network's output."""

    def loss(self, net, x1, x0=None, ema=None, y=None):  # unlabelled: y stays None
        teacher = ema if ema is not None else net

        class Doubled(nn.Module):
            def forward(self, x, t, cond=None):
                return teacher(x, t, cond) * (1 if cond is None or bool((cond == 0).all()) else 2)
        return super().loss(net, x1, x0, ema=Doubled())


def test_shortcut_exactness_test_catches_a_factor_error_in_the_target():
    """The KS test has power: the same training with a wrong self-consistency target fails it at NFE 1."""
    method = ShortcutWithDoubledTarget(max_steps=32)
    net = fit(method, steps=2500)
    assert ks_pvalue(method, net, 1) < 1e-3


@pytest.mark.parametrize("distill", [False, True])
def test_reflow_on_exact_teacher_pairs_samples_the_target_in_one_step(distill):
    """Pairs from the exact teacher ODE (200 Euler steps) are x1 = M + S x0 (straight lines), so one Euler step of
    the reflowed velocity is exact; distill trains that one step directly."""
    method = Reflow(distill=distill, teacher_steps=200)
    x0 = torch.randn(8192, 1, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x1 = method.make_pairs(ExactVelocityNet(), x0)
    torch.testing.assert_close(x1, M + S * x0, rtol=0, atol=0.02)  # Euler's error at 200 steps
    net = fit(method, pairs=(x1, x0))
    assert ks_pvalue(method, net, 1) > 1e-3
    if not distill:
        assert ks_pvalue(method, net, 4) > 1e-3


def test_reflow_counts_the_seconds_of_its_pairs_as_training_time_once(tmp_path, rf_teacher):
    """Generating the teacher's pairs is reflow's compute too (equal-compute comparisons need it): a new run's
    train_seconds include every chunk's seconds; a resumed run, whose saved seconds hold them already, does not
    add them again (the chunks are marked 10^4 s here, so a second count would show)."""
    out = tmp_path / "reflow"
    args = ["--method", "reflow", "--teacher", str(rf_teacher), *TINY, "--num-pairs", "600", "--teacher-steps", "2",
            "--nfe", "1", "--out", str(out)]
    fewstep.main([*args, "--steps", "2"])
    chunks = sorted((out / "pairs").glob("*.pt"))
    assert len(chunks) == 2  # 500 + 100 pairs
    pair_seconds = sum(torch.load(c, weights_only=True)["seconds"] for c in chunks)
    first = torch.load(out / "ckpt.pt", weights_only=True)["train_seconds"]
    assert 0 < pair_seconds <= first
    for c in chunks:
        rundir.save_checkpoint(c, dict(torch.load(c, weights_only=True), seconds=1e4))
    fewstep.main([*args, "--steps", "3"])
    resumed = torch.load(out / "ckpt.pt", weights_only=True)
    assert resumed["step"] == 3 and first <= resumed["train_seconds"] < 1e4


# ---------------------------------------------------------------------------------------------------------------
# Sampling costs exactly n network calls (counted by a forward hook on the U-Net, not by fewstep's counter)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(fewstep.METHODS))
def test_sampling_uses_exactly_nfe_network_calls(name):
    import unet
    net = unet.create("tiny", extra_cond=True).eval()
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    method = fewstep.METHODS[name]()
    assert all(trainer.supports(method, n) for n in (1, 2, 4))
    for nfe in [n for n in (1, 2, 4, 8) if trainer.supports(method, n)]:  # ld3's grids: 1, 2, 4 by default
        calls.clear()
        with torch.no_grad():
            x = method.sample(net, torch.randn(3, 1, 28, 28), nfe)
        assert len(calls) == nfe and x.shape == (3, 1, 28, 28)


def test_unsupported_nfe_is_refused_and_names_what_works():
    with pytest.raises(fewstep.UnsupportedNFE, match="1, 2, 4, 8"):
        Shortcut(max_steps=8).check_nfe(3)
    with pytest.raises(fewstep.UnsupportedNFE, match="NFE 1"):
        Reflow(distill=True).check_nfe(2)
    with pytest.raises(fewstep.UnsupportedNFE):
        RectifiedFlow().check_nfe(0)


def test_batches_cover_each_epoch_once_and_ranks_split_the_global_batch():
    images = torch.arange(10, dtype=torch.float32)[:, None]  # float tensors pass through unchanged
    full = trainer.Batches((images,), 4, seed=5)
    seen = torch.cat([full(s)[0][:, 0] for s in range(5)])  # 20 positions = 2 epochs of 10
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    r0, r1 = trainer.Batches((images,), 4, 5, rank=0, world=2), trainer.Batches((images,), 4, 5, rank=1, world=2)
    for s in range(5):
        assert sorted(torch.cat([r0(s)[0], r1(s)[0]])[:, 0].tolist()) == sorted(full(s)[0][:, 0].tolist())
    assert torch.equal(trainer.Batches((images,), 4, seed=5)(3)[0], full(3)[0])  # a pure function of the step


# ---------------------------------------------------------------------------------------------------------------
# The training loop on real data (tiny preset, mnist5k)
# ---------------------------------------------------------------------------------------------------------------
TINY = ["--data", "mnist5k", "--arch", "tiny", "--batch-size", "16", "--lr", "1e-3", "--warmup", "0",
        "--num-samples", "8", "--no-fid"]


def losses(out):
    """The logged loss per step; for adaptively weighted losses (meanflow, imf: w = 1 / (err + c)^p, nearly
    constant at p = 1) the unweighted squared error "mse" that they log next to it."""
    records = [r for r in map(json.loads, (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines())
               if "loss" in r]
    return [r.get("mse", r["loss"]) for r in records]


@pytest.fixture(scope="module")
def rf_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    fewstep.main(["--method", "rf", *TINY, "--steps", "30", "--out", str(out), "--nfe", "1"])
    return out


@pytest.mark.parametrize("name", [n for n in fewstep.METHODS if n not in ("pd", "ld3")])  # tests/test_fewstep_pd_ld3.py
def test_each_method_trains_with_falling_loss_and_writes_its_samples(name, tmp_path, rf_teacher):
    extra = {"reflow": ["--teacher", str(rf_teacher), "--num-pairs", "64", "--teacher-steps", "4"],
             "ctm": ["--teacher", str(rf_teacher), "--ctm-scales", "6", "--ctm-heun-steps", "2"],
             "dmd2": ["--teacher", str(rf_teacher), "--dmd-fake-updates", "2"]}.get(name, [])
    result = fewstep.main(["--method", name, *TINY, "--steps", "24", "--out", str(tmp_path), *extra, "--report"])
    loss = losses(tmp_path)
    # scm's squared error is that of the normalised tangent g at theta = theta- (its gradient, not a distance to a
    # target): it does not fall as the model improves, so only its length and finiteness are checked
    falls = name == "scm" or np.mean(loss[:6]) > np.mean(loss[-6:])
    assert len(loss) == 24 and np.isfinite(loss).all() and falls, loss
    assert result["nfe_checked"] == {"1": 1, "2": 2, "4": 4}
    for nfe in (1, 2, 4):
        assert len(list((tmp_path / "samples" / f"nfe={nfe}").glob("*.png"))) == 8
    assert (tmp_path / "grids" / "step0000000.png").exists() and (tmp_path / "grids" / "step0000024.png").exists()
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["step"] == 24 and ev["num_samples"] == 8
    # report.md: the challenge's write-up. Every image it links exists, it names the run's own numbers, the method's
    # papers, and says plainly that --no-fid left the FID column empty.
    report = (tmp_path / "report.md").read_text()
    links = re.findall(r"\]\(([^)]+\.png)\)", report)
    assert "loss.png" in links and "grids/step0000024.png" in links
    assert all((tmp_path / link).exists() for link in links), links
    assert "iterations: 24, global batch size 16" in report and "8 samples per NFE, not scored (--no-fid)" in report
    assert all(f"| {n} | - |" in report for n in (1, 2, 4))
    assert "against" not in report.split("## FID")[1].split("## References")[0]
    time_fed = {"meanflow": "1 t", "imf": "1 t", "pmf": "1 t", "scm": "1 tau"}.get(name, "1000 t")  # what the net sees
    assert f"time fed as {time_fed}" in report
    summary, citations = trainer.docstring_parts(fewstep.METHODS[name])  # the class docstring, described once
    assert summary in report and citations and all(c in report for c in citations)
    assert all(re.search(r"arXiv:\d{4}\.\d{4,5}", c) for c in citations), citations


def test_resume_gives_the_same_losses_and_weights_as_an_uninterrupted_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--method", "shortcut", *TINY, "--nfe", "1"]
    fewstep.main([*args, "--steps", "12", "--out", str(a)])
    fewstep.main([*args, "--steps", "6", "--out", str(b)])
    fewstep.main([*args, "--steps", "12", "--out", str(b)])  # resumes at step 6
    assert losses(a) == losses(b)  # bit for bit: same data order, noise, times, optimizer and EMA state
    sa, sb = torch.load(a / "ckpt.pt", weights_only=True), torch.load(b / "ckpt.pt", weights_only=True)
    assert sb["step"] == 12
    for key in ("model", "ema"):
        for k in sa[key]:
            assert torch.equal(sa[key][k], sb[key][k]), (key, k)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    fewstep.main(["--method", "rf", *TINY, "--steps", "4", "--out", str(tmp_path), "--nfe", "1"])
    before = (tmp_path / "ckpt.pt").read_bytes()
    calls = []
    real_loss = RectifiedFlow.loss

    def poisoned(self, *a, **k):
        calls.append(1)
        out = real_loss(self, *a, **k)
        return out * float("nan") if len(calls) >= 3 else out

    monkeypatch.setattr(RectifiedFlow, "loss", poisoned)
    with pytest.raises(SystemExit) as e:
        fewstep.main(["--method", "rf", *TINY, "--steps", "20", "--out", str(tmp_path), "--nfe", "1",
                      "--ckpt-every", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "loss is nan at step 7" in err and "(step 6) is untouched" in err
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 6  # steps 5, 6 were good and saved
    assert (tmp_path / "ckpt.pt").read_bytes() != before


def assert_refused(args, message, capsys):
    """fewstep.main(args) in-process ends as a user error: SystemExit(2) and one stderr line `fewstep.py: ...` that
    contains message (main prints data.UsageError's message, no traceback)."""
    with pytest.raises(SystemExit) as e:
        fewstep.main(args)
        pytest.fail(f"no error for {args}")
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert err.startswith("fewstep.py: ") and "Traceback" not in err, err


def test_bad_input_is_one_line_without_traceback_and_writes_nothing(tmp_path, rf_teacher):
    other = tmp_path / "other"
    fewstep.main(["--method", "shortcut", *TINY, "--steps", "2", "--out", str(other), "--nfe", "1"])
    ckpt_bytes = (other / "ckpt.pt").read_bytes()
    grid = tmp_path / "grid"  # --grid-share stores the NFEs of its grids, taken from the run's --nfe
    fewstep.main(["--method", "imf", *TINY, "--steps", "1", "--grid-share", "0.5", "--out", str(grid)])
    cases = [
        (["--method", "nope", "--out", str(tmp_path / "x")], "unknown method 'nope'"),
        (["--method", "rf", "--nfe", "0", "--out", str(tmp_path / "x")], "NFE must be an integer >= 1"),
        (["--method", "shortcut", "--nfe", "3", "--out", str(tmp_path / "x")], "it can do NFE 1, 2, 4"),
        (["--method", "reflow", "--teacher", str(tmp_path / "missing"), "--out", str(tmp_path / "x")],
         "no checkpoint"),
        (["--method", "reflow", "--teacher", str(other), "--out", str(tmp_path / "x")], "is a shortcut run"),
        (["--method", "rf", "--out", str(other)], "holds a shortcut run"),
        (["--method", "shortcut", *TINY[:2], "--arch", "mnist", "--out", str(other)],
         "holds a run with --arch tiny, this command asks for --arch mnist"),
        (["--method", "shortcut", "--max-steps", "64", "--out", str(other)],
         "other shortcut options (--max-steps 128 in the run, --max-steps 64 asked)"),
        (["--method", "imf", "--grid-share", "0.3", "--nfe", "1", "--steps", "2", "--out", str(grid)],
         "other imf options (--grid-share 0.5 in the run, --grid-share 0.3 asked)"),  # --nfe alone: resume and score
    ]
    # One process for the nine commands, each run as `python fewstep.py ARGS` (test_cli.run_in_one_process).
    done = run_in_one_process([(ROOT / "fewstep.py", args, {}) for args, _ in cases], ROOT, os.environ)
    for (args, message), r in zip(cases, done):
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr + r.stdout, r.stderr
        assert message in r.stderr, (message, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (other / "ckpt.pt").read_bytes() == ckpt_bytes  # the foreign run was not touched
    assert not (tmp_path / "x").exists()


def test_torchrun_two_gloo_processes_keep_identical_weights_and_write_one_checkpoint(tmp_path):
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "fewstep.py"), "--method", "shortcut", *TINY, "--steps", "6", "--device", "cpu",
                        "--out", str(out), "--nfe", "1"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "all 2 ranks hold identical weights at step 6" in r.stdout
    assert "global batch 16 = 2 x 8" in r.stdout
    assert sorted(p.name for p in out.glob("*.pt")) == ["ckpt.pt"]
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 6
    assert len(losses(out)) == 6  # one writer: each step logged once


# ---------------------------------------------------------------------------------------------------------------
# CS492(C): the course's U-Net (--net course:PATH) and the submission folder (--export-submission)
# ---------------------------------------------------------------------------------------------------------------
# Stand-ins written for these tests (not the course's code): the constructor and forward signature of the course's
# UNet and the abstract methods of its src/base_model.py, around a two-layer conv net that uses timestep and
# condition through sinusoidal features (any error in what the export feeds it changes its output).
STANDIN_NETWORK = """
import math

import torch
import torch.nn as nn


def features(v, dim=16):
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    a = v.float()[:, None] * freqs[None]
    return torch.cat([a.cos(), a.sin()], dim=1)


class UNet(nn.Module):
    def __init__(self, ch=128, ch_mult=[1, 2, 2, 2], attn=[1], num_res_blocks=4, dropout=0.1,
                 use_additional_condition=False):
        super().__init__()
        self.use_additional_condition = use_additional_condition
        self.head, self.tail = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 3, padding=1)
        self.time = nn.Linear(16, 8)
        if use_additional_condition:
            self.condition = nn.Linear(16, 8)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, timestep, condition=None):
        h = self.head(x) + self.time(features(timestep))[:, :, None, None]
        if self.use_additional_condition:
            if condition is None:
                raise ValueError("Condition is expected but not provided")
            h = h + self.condition(features(condition))[:, :, None, None]
        return self.tail(self.dropout(torch.nn.functional.silu(h)))
"""

STANDIN_BASE = """
from abc import ABC, abstractmethod

import torch.nn as nn


class BaseScheduler(ABC, nn.Module):
    def __init__(self, num_train_timesteps=1000, **kwargs):
        super().__init__()
        self.num_train_timesteps = num_train_timesteps

    @abstractmethod
    def sample_timesteps(self, batch_size, device): ...

    @abstractmethod
    def forward_process(self, data, noise, t): ...

    @abstractmethod
    def reverse_process_step(self, xt, pred, t, t_next): ...

    @abstractmethod
    def get_target(self, data, noise, t): ...


class BaseGenerativeModel(ABC, nn.Module):
    def __init__(self, network, scheduler, **kwargs):
        super().__init__()
        self.network, self.scheduler = network, scheduler

    @property
    def device(self):
        return next(self.network.parameters()).device

    @abstractmethod
    def compute_loss(self, data, noise, **kwargs): ...

    @abstractmethod
    def predict(self, xt, t, **kwargs): ...

    @abstractmethod
    def sample(self, shape, num_inference_timesteps=20, return_traj=False, verbose=False, **kwargs): ...
"""

# The official loader's steps (src/utils.load_model + sampling.py), then shortcut's sampler written out by hand on
# the same U-Net loaded directly: x_{k+1} = x_k + (1/n) UNet(x_k, timestep = 1000 k/n, condition = 1000/n).
# Run with -E in the submission folder: fewstep.py and this project's modules are not importable there.
OFFICIAL_ROLE = """
import json, os, sys, torch
from custom_model import create_custom_model
from src.base_model import BaseGenerativeModel, BaseScheduler
from src.network import UNet
cfg = json.load(open("checkpoints/model_config.json"))
model = create_custom_model(device="cpu", **cfg)
ckpt = torch.load("checkpoints/best_model.pt", map_location="cpu", weights_only=False)
model.load_state_dict(ckpt["state_dict"])
model.eval()
fed = []
model.network.register_forward_hook(lambda m, args, out: fed.append((args[1].tolist(), args[2].tolist())))
net = UNet(**cfg["network"]).eval()
net.load_state_dict({k[len("network."):]: v for k, v in ckpt["state_dict"].items()})
res = {"bases": isinstance(model, BaseGenerativeModel) and isinstance(model.scheduler, BaseScheduler),
       "project_modules": sorted({"fewstep", "trainer", "cs492c", "rundir", "unet", "data", "fid"} & set(sys.modules)),
       "fewstep_here": os.path.dirname(os.path.abspath(sys.modules["fewstep"].__file__)) == os.getcwd()}
for n in (1, 2, 4):
    fed.clear()
    torch.manual_seed(n)
    with torch.no_grad():
        x = model.sample((3, 3, 64, 64), num_inference_timesteps=n, verbose=False)
        torch.manual_seed(n)
        y = torch.randn(3, 3, 64, 64)
        for k in range(n):
            y = y + net(y, torch.full((3,), 1000.0 * k / n), torch.full((3,), 1000.0 / n)) / n
    res[n] = {"fed": fed[:], "diff": (x - y.clamp(-1, 1)).abs().max().item(), "range": [x.min().item(), x.max().item()],
              "moved": (y - y.clamp(-1, 1)).abs().max().item()}
print(json.dumps(res))
"""

COURSE = ["--data", "mnist5k", "--batch-size", "8", "--lr", "1e-3", "--warmup", "0", "--num-samples", "4", "--no-fid",
          "--nfe", "1"]


def standin_checkout(root):
    (root / "src").mkdir(parents=True)
    (root / "src" / "__init__.py").write_text("")
    (root / "src" / "network.py").write_text(STANDIN_NETWORK)
    (root / "src" / "base_model.py").write_text(STANDIN_BASE)
    return root


@pytest.fixture(scope="module")
def course_run(tmp_path_factory):
    """A shortcut run (second scalar: condition) trained around the stand-in course U-Net at 3x64x64."""
    root = standin_checkout(tmp_path_factory.mktemp("checkout"))
    out = tmp_path_factory.mktemp("course_run")
    fewstep.main(["--method", "shortcut", "--net", f"course:{root}", *COURSE, "--steps", "20", "--out", str(out)])
    return root, out


def test_course_net_run_exports_a_submission_that_samples_alone_like_the_official_loader(course_run, tmp_path):
    root, out = course_run
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["net"] == {"course": str(root.resolve()), "kwargs": {
        "ch": 128, "ch_mult": [1, 2, 2, 2], "attn": [1], "num_res_blocks": 4, "dropout": 0.1,
        "use_additional_condition": True}}  # every constructor argument; the condition carries shortcut's d
    assert cfg["unet"] == {"image_size": 64, "in_channels": 3, "extra_cond": True}
    assert len(losses(out)) == 20
    sub = tmp_path / "submission"
    fewstep.main(["--out", str(out), "--export-submission", str(sub)])
    assert sorted(str(p.relative_to(sub)) for p in sub.rglob("*") if p.is_file()) == [
        "checkpoints/best_model.pt", "checkpoints/fewstep_export.json", "checkpoints/model_config.json",
        "custom_model.py", "fewstep.py", "src/__init__.py", "src/base_model.py", "src/network.py"]
    # the methods file verbatim, and the adapter: this project's cs492c_model.py, a module the tests import
    assert (sub / "fewstep.py").read_bytes() == (ROOT / "fewstep.py").read_bytes()
    assert (sub / "custom_model.py").read_bytes() == (ROOT / "cs492c_model.py").read_bytes()
    assert (sub / "src" / "network.py").read_text() == STANDIN_NETWORK  # the student's file, as it was
    ema = torch.load(out / "ckpt.pt", weights_only=True)["ema"]
    exported = torch.load(sub / "checkpoints" / "best_model.pt", weights_only=True)
    assert list(exported) == ["state_dict"] and all(torch.equal(ema[k], exported["state_dict"][k]) for k in ema)
    r = subprocess.run([sys.executable, "-E", "-c", OFFICIAL_ROLE], cwd=sub, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["bases"] and res["project_modules"] == ["fewstep"], res  # the copy in the folder, nothing else
    assert res["fewstep_here"]
    for n in (1, 2, 4):
        got = res[str(n)]
        # exactly n calls, fed timestep = 1000 k/n and condition = 1000/n (shortcut's d = 1/n)
        assert got["fed"] == [[[1000.0 * k / n] * 3, [1000.0 / n] * 3] for k in range(n)], got["fed"]
        assert got["diff"] < 1e-5, got["diff"]
        assert -1 <= got["range"][0] and got["range"][1] <= 1


# A generic stand-in for the official loader: load the submission, sample at NFE 1, 2, 4, count the U-Net's calls.
OFFICIAL_SAMPLE = """
import json, torch
from custom_model import create_custom_model
cfg = json.load(open("checkpoints/model_config.json"))
model = create_custom_model(device="cpu", **cfg)
model.load_state_dict(torch.load("checkpoints/best_model.pt", map_location="cpu", weights_only=False)["state_dict"])
model.eval()
calls = []
model.network.register_forward_hook(lambda m, args, out: calls.append(1))
res = {}
for n in (1, 2, 4):
    calls.clear()
    with torch.no_grad():
        x = model.sample((2, 3, 64, 64), num_inference_timesteps=n, verbose=False)
    res[n] = {"calls": len(calls), "finite": bool(torch.isfinite(x).all()), "range": [x.min().item(), x.max().item()]}
print(json.dumps(res))
"""


def test_distilled_course_net_run_starts_from_its_teacher_and_exports_without_its_discriminator(tmp_path):
    """ctm feeds a second scalar (s) that its rf teacher never had: on the course U-Net the student takes every
    teacher weight and keeps its own condition layer (the stand-in's network.condition); with the GAN term on, the
    submission holds the U-Net alone (the discriminator is training state) and samples in n calls."""
    root = standin_checkout(tmp_path / "checkout")
    teacher_dir, ctm_dir, sub = tmp_path / "rf", tmp_path / "ctm", tmp_path / "submission"
    fewstep.main(["--method", "rf", "--net", f"course:{root}", *COURSE, "--steps", "3", "--out", str(teacher_dir)])
    teacher = torch.load(teacher_dir / "ckpt.pt", weights_only=True)["ema"]
    student = cs492c.course_net(cs492c.course_net_config(root, uses_cond=True))
    own = {k: v.clone() for k, v in student.state_dict().items()}
    trainer.init_from(student, teacher)
    loaded = student.state_dict()
    assert set(own) - set(teacher) == {"network.condition.weight", "network.condition.bias"}
    assert all(torch.equal(loaded[k], teacher[k]) for k in teacher)
    assert all(torch.equal(loaded[k], own[k]) for k in set(own) - set(teacher))
    other = {k: (v[:1] if k == "network.head.weight" else v) for k, v in teacher.items()}  # another shape: refused
    with pytest.raises(ValueError, match="0 missing, 0 unexpected, 1 shape-mismatched"):
        trainer.init_from(student, other)

    fewstep.main(["--method", "ctm", "--teacher", str(teacher_dir), "--net", f"course:{root}", *COURSE,
                  "--steps", "4", "--ctm-gan-weight", "0.5", "--ctm-gan-start", "1", "--out", str(ctm_dir)])
    assert "disc" in torch.load(ctm_dir / "ckpt.pt", weights_only=True)["method_state"]
    fewstep.main(["--out", str(ctm_dir), "--export-submission", str(sub)])
    exported = torch.load(sub / "checkpoints" / "best_model.pt", weights_only=True)["state_dict"]
    assert set(exported) == set(own)  # the U-Net's keys, nothing of the discriminator
    r = subprocess.run([sys.executable, "-E", "-c", OFFICIAL_SAMPLE], cwd=sub, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    for n, got in json.loads(r.stdout).items():
        assert got["calls"] == int(n) and got["finite"] and -1 <= got["range"][0] <= got["range"][1] <= 1, (n, got)


class ShortcutRoundedByData(Shortcut):
    """Samples through this project's data.py (quantised to uint8): cannot run where only torch and numpy are."""

    def sample(self, net, noise, nfe, y=None):
        return data.to_float(data.to_uint8(super().sample(net, noise, nfe, y)))


class ShortcutSamplingWithTeacher(Shortcut):
    """Needs state that its config() does not hold (a teacher net set by the training loop) to sample."""

    def sample(self, net, noise, nfe, y=None):
        return self.teacher(noise, torch.zeros(noise.shape[0]))


class ShortcutWithStudentsPerNFE(Shortcut):
    """Samples each NFE with a network of its own (pd's students): a submission of one network cannot hold that."""
    state_for_sampling = True

    def sampling_net(self, nfe, ema):
        return ema


class ShortcutOneStepOnly(Shortcut):
    def check_nfe(self, nfe):
        if nfe != 1:
            raise fewstep.UnsupportedNFE(f"NFE 1 only, not {nfe}")


def test_course_net_and_export_refuse_bad_input_in_one_line(course_run, tmp_path, rf_teacher, monkeypatch, capsys):
    """main() in-process: SystemExit(2) and one stderr line (main prints data.UsageError's message, no traceback)."""
    root, out = course_run
    refused = lambda args, message: assert_refused(args, message, capsys)  # noqa: E731

    refused(["--method", "rf", "--net", f"course:{tmp_path / 'no-checkout'}", "--out", str(tmp_path / "x")],
            "there is no src/network.py")
    assert not (tmp_path / "x").exists()

    other = tmp_path / "theirs"  # a folder that holds someone else's submission (here: the course's template)
    (other / "checkpoints").mkdir(parents=True)
    (other / "custom_model.py").write_text("def create_custom_model(device='cpu', **kwargs): ...\n")
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    refused(["--out", str(out), "--export-submission", str(other)],
            "already holds a different submission (custom_model.py)")
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before  # nothing written
    dest = tmp_path / "sub"
    export = ["--out", str(out), "--export-submission", str(dest)]
    refused(["--out", str(rf_teacher), "--export-submission", str(dest)], "the challenge requires the course's U-Net")
    for cls, message in ((ShortcutRoundedByData, "not fewstep.py's registered class"),  # the export ships
                         (ShortcutSamplingWithTeacher, "not fewstep.py's registered class"),  # fewstep.py as it is
                         (ShortcutOneStepOnly, "cannot sample at NFE 2, 4"),
                         (ShortcutWithStudentsPerNFE, "samples with state of its own")):
        monkeypatch.setitem(fewstep.METHODS, "shortcut", cls)
        refused(export, message)
    monkeypatch.setitem(fewstep.METHODS, "shortcut", Shortcut)
    # The fresh-process check: a sampler that differs from the shipped file's (here: patched in this process only).
    sample = Shortcut.sample
    monkeypatch.setattr(Shortcut, "sample", lambda self, net, noise, nfe: sample(self, net, noise, nfe) * 0.5)
    refused(export, "differs from fewstep's sampler")
    monkeypatch.setattr(Shortcut, "sample", sample)
    assert not dest.exists()

    fewstep.main(["--out", str(out), "--export-submission", str(other), "--force"])  # replaces theirs
    assert (other / "custom_model.py").read_bytes() == (ROOT / "cs492c_model.py").read_bytes()
    fewstep.main(["--out", str(out), "--export-submission", str(other)])  # the same run again: no --force needed


# ---------------------------------------------------------------------------------------------------------------
# cm and ctm: consistency models and consistency trajectory models
# ---------------------------------------------------------------------------------------------------------------
def exact_consistency_fn(x, t, t_end):
    """The exact consistency function of the Gaussian data: the flow map t -> t_end (the boundary time), read in
    EDM's scale x_sigma = x_t / t_end (the test's own closed form, see the module docstring)."""
    return exact_flow(x, t, t_end) / t_end


def test_cm_boundary_condition_holds_exactly_at_the_smallest_noise_level():
    """f(x, sigma_min) = x_sigma_min = (1 + sigma_min) x_t to the last bit, for any network (two random U-Nets),
    because c_skip = 1 and c_out = 0 there; one level up the network matters."""
    import unet
    method = ConsistencyModel()
    x = torch.randn(3, 1, 28, 28)
    sigma = torch.full((3,), 0.002, dtype=torch.float64)
    t_max = 1 / 1.002  # sigma = (1 - t) / t
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = unet.create("tiny").eval()
        with torch.no_grad():
            f = method.consistency_fn(net, x, sigma)
            f_up = method.consistency_fn(net, x, sigma * 1.5)
        assert torch.equal(f, x * torch.tensor(1.002, dtype=torch.float32))
        torch.testing.assert_close(f.double(), x.double() / t_max, rtol=1e-6, atol=0)
        assert not torch.allclose(f_up, x / t_max, atol=1e-3)


def test_cm_curriculum_and_levels_follow_the_paper():
    """N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / 8) for s0, s1 = 10, 1280 (iCT Eq. 8), and the
    Karras levels (rho = 7) from 0.002 to 80, computed here from the formula."""
    method = ConsistencyModel(total_steps=8000)
    assert [method.num_scales(k) for k in (0, 999, 1000, 2000, 6999, 7000, 10 ** 6)] == [11, 11, 21, 41, 641,
                                                                                          1281, 1281]
    s = fewstep.karras_sigmas(11, 0.002, 80.0, 7.0)
    ref = [(0.002 ** (1 / 7) + i / 10 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7 for i in range(11)]
    np.testing.assert_allclose(s.numpy(), ref, rtol=1e-12)


def cm_ks_and_error(method, net, nfe):
    with torch.no_grad():
        err = 0.0
        for t in (0.2, 0.5, 0.8):
            x = grid_x(t)
            f = method.consistency_fn(net, x, torch.full((len(x),), (1 - t) / t, dtype=torch.float64))
            err = max(err, (f - exact_consistency_fn(x, t, method.t_max)).abs().max().item())
    return ks_pvalue(method, net, nfe), err


def test_cm_trained_from_scratch_learns_the_exact_consistency_function():
    """iCT from scratch (curriculum over the 1,500 steps): f matches the exact flow map to the data end where x_t
    has its mass, and its 1-, 2- and 4-step samples pass the KS test."""
    method = ConsistencyModel(total_steps=1500)
    net = fit(method, steps=1500)
    for nfe in (1, 2, 4):
        p, err = cm_ks_and_error(method, net, nfe)
        assert p > 1e-3 and err < 0.1, (nfe, p, err)


def test_cm_distillation_target_is_the_teachers_ode_step_between_adjacent_levels():
    """With --teacher (consistency distillation) the point at the lower level is one Heun step of the teacher's
    ODE: with the exact velocity it is the exact flow map between the two levels up to Heun's local error, and
    without a teacher (CT) it is x1 + sigma_lo z on the same noise. (An Euler step would miss by up to 1e-3.)"""
    method = ConsistencyModel()
    method.teacher = ExactVelocityNet()
    sig = fewstep.karras_sigmas(41, 0.002, 80.0, 7.0)
    for i in (5, 20, 35):
        t_lo, t_hi = 1 / (1 + sig[i].item()), 1 / (1 + sig[i + 1].item())
        x = grid_x(t_hi)
        got = method.target_point(x, None, None, torch.full((len(x),), t_hi), torch.full((len(x),), t_lo))
        torch.testing.assert_close(got, exact_flow(x, t_hi, t_lo), rtol=0, atol=1e-4)
    method.teacher = None
    x1, z = torch.randn(5, 1), torch.randn(5, 1)
    t = torch.full((5,), 0.25)
    torch.testing.assert_close(method.target_point(None, x1, z, t * 0, t), 0.25 * x1 + 0.75 * z)


class CMWithDoubledTarget(ConsistencyModel):
    """A deliberate error in the target: the point at the lower level is moved twice as far along the path."""

    def target_point(self, x_hi, x1, z, t_hi, t_lo, teacher=None):
        return x_hi + 2 * (super().target_point(x_hi, x1, z, t_hi, t_lo, teacher) - x_hi)


def test_cm_exactness_test_catches_an_error_in_the_target():
    method = CMWithDoubledTarget(total_steps=1000)
    net = fit(method, steps=1000)
    assert ks_pvalue(method, net, 1) < 1e-3


def test_ctm_distilled_from_the_exact_teacher_learns_the_flow_map():
    """Teacher: the exact velocity. G(x, t, s) matches the exact flow map t -> s where x_t has its mass (on and
    off the training grid: 0.2349 and 0.6308 are grid points, 0.3, 0.5, 0.8 are not), and the 1-step samples pass
    the KS test."""
    method = CTM()
    method.teacher = ExactVelocityNet()
    net = fit(method, steps=1500)
    with torch.no_grad():
        for t, s in ((0.0, 1.0), (0.0, 0.5), (0.2349, 0.6308), (0.5, 1.0), (0.3, 0.8)):
            x = grid_x(t)
            g = method.G(net, x, torch.full((len(x),), t), torch.full((len(x),), s))
            err = (g - exact_flow(x, t, s)).abs().max().item()
            assert err < 0.15, (t, s, err)  # 0.03 to 0.1 at 1,500 steps, falling with more (0.03 at 5,000)
    assert ks_pvalue(method, net, 1) > 1e-3


class CTMWithDoubledTeacherStep(CTM):
    """A deliberate error in the target: the teacher's solution t -> u moved twice as far from x_t."""

    def teacher_solve(self, x, i, k, teacher=None):
        return x + 2 * (super().teacher_solve(x, i, k, teacher) - x)


def test_ctm_exactness_test_catches_an_error_in_the_target():
    method = CTMWithDoubledTeacherStep()
    method.teacher = ExactVelocityNet()
    net = fit(method, steps=1000)
    assert ks_pvalue(method, net, 1) < 1e-3


def test_ctm_jump_is_the_identity_at_s_equal_t_and_gamma_one_is_cm_sampling():
    """G(x, t, t) = x exactly for any net; with gamma = 1 each step jumps to the data and re-noises on this file's
    path: x_tau = tau x_hat + (1 - tau) z (checked with a net whose jumps we know: u = 1 - x)."""
    import unet
    net = unet.create("tiny", extra_cond=True).eval()
    x = torch.randn(2, 1, 28, 28)
    t = torch.full((2,), 0.3)
    with torch.no_grad():
        assert torch.equal(CTM().G(net, x, t, t), x)

    class Known(nn.Module):
        def forward(self, x, t, cond=None):
            return 1 - x  # G(x, t, 1) = x + (1 - t)(1 - x)

    noise = torch.randn(1000, 1, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    got = CTM(gamma=1.0).sample(Known(), noise, 2)
    torch.manual_seed(5)
    z = torch.randn_like(noise)
    x_half = 0.5 * (noise + 1 * (1 - noise)) + 0.5 * z  # jump 0 -> 1, back to tau = 1/2
    torch.testing.assert_close(got, x_half + 0.5 * (1 - x_half))


def test_cm_distilled_from_the_exact_teacher_learns_the_exact_consistency_function():
    """Consistency distillation (--teacher): with the exact velocity as the teacher, f matches the exact flow map to
    the data end where x_t has its mass, and the 1-, 2- and 4-step samples pass the KS test."""
    method = ConsistencyModel(total_steps=1500)
    method.teacher = ExactVelocityNet()
    net = fit(method, steps=1500)
    for nfe in (1, 2, 4):
        p, err = cm_ks_and_error(method, net, nfe)
        assert p > 1e-3 and err < 0.1, (nfe, p, err)


def test_ctm_gan_adaptive_weight_is_the_ratio_of_the_last_layers_gradient_norms():
    """lambda = ||dL_rec/dW|| / (||dL_gan/dW|| + 1e-4) for W the last weight: here L_rec = 3 sum(W) + sum(W0^2)
    and L_gan = -5 sum(W) on a net whose last weight is W (4 x 3), so lambda = 3 sqrt(12) / (5 sqrt(12) + 1e-4),
    and the first layer's W0 does not enter; clamped at 1e4 when the GAN gradient vanishes."""
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 4))
    w0, w = net[0].weight, net[1].weight
    rec = 3 * w.sum() + (w0 ** 2).sum()
    lam = CTM.adaptive_weight(net, rec, -5 * w.sum())
    assert not lam.requires_grad
    torch.testing.assert_close(lam, torch.tensor(3 * 12 ** 0.5 / (5 * 12 ** 0.5 + 1e-4)))
    assert CTM.adaptive_weight(net, 3 * w.sum(), 0 * w.sum()).item() == 1e4


def test_ctm_gan_discriminator_tells_real_from_fake_images():
    """A few dozen discriminator steps on real digits against blurred ones: its logits separate them (every real
    digit above every blurred one) and its loss falls to under half its first value."""
    torch.manual_seed(0)
    real = data.load("mnist5k", split="even")[:64].float()
    fake = torch.nn.functional.avg_pool2d(real, 5, 1, 2)  # the blur of rf's one-step samples, same pixels
    method = CTM(gan_weight=1.0)
    first = method.discriminator_step(real, fake).item()
    for _ in range(40):
        last = method.discriminator_step(real, fake).item()
    with torch.no_grad():
        assert method.disc(real).min() > method.disc(fake).max()
    assert last < 0.5 * first, (first, last)


def test_ctm_gan_run_logs_its_terms_and_resumes_bit_for_bit(tmp_path, rf_teacher):
    """--ctm-gan-weight: the discriminator's loss, the GAN loss and lambda are logged from --ctm-gan-start on; the
    discriminator and its optimizer are saved in ckpt.pt and restored, so 3 + 3 steps equal 6 steps."""
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--method", "ctm", *TINY, "--teacher", str(rf_teacher), "--ctm-scales", "6", "--ctm-heun-steps", "2",
            "--ctm-gan-weight", "0.5", "--ctm-gan-start", "2", "--nfe", "1"]
    fewstep.main([*args, "--steps", "6", "--out", str(a)])
    fewstep.main([*args, "--steps", "3", "--out", str(b)])
    fewstep.main([*args, "--steps", "6", "--out", str(b)])
    records = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert [("d_loss" in r) for r in records] == [False, False, True, True, True, True]
    assert all(r["gan_lambda"] > 0 for r in records[2:])
    assert losses(a) == losses(b)
    sa, sb = torch.load(a / "ckpt.pt", weights_only=True), torch.load(b / "ckpt.pt", weights_only=True)
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    for k in sa["method_state"]["disc"]:
        assert torch.equal(sa["method_state"]["disc"][k], sb["method_state"]["disc"][k]), k
    assert fewstep.main(["--out", str(a), "--eval-only", "--nfe", "1", "--num-samples", "4", "--no-fid"])


def test_cm_and_ctm_bad_input_is_one_line_and_writes_nothing(tmp_path, rf_teacher, capsys):
    """A teacher of the wrong kind, a curriculum or time grid that does not fit: one line, status 2, no files."""
    cm_run = tmp_path / "cm"
    fewstep.main(["--method", "cm", *TINY, "--steps", "2", "--out", str(cm_run), "--nfe", "1"])
    capsys.readouterr()
    x = tmp_path / "x"
    cases = [
        (["--method", "ctm", "--teacher", str(cm_run)], "is a cm run; ctm learns from a flow teacher: a rf run"),
        (["--method", "cm", "--teacher", str(cm_run)], "is a cm run; cm learns from a flow teacher: a rf run"),
        (["--method", "ctm"], "ctm needs --teacher RUN_DIR"),
        (["--method", "cm", "--cm-total-steps", "5"], "--cm-total-steps 5: shorter than the curriculum's 8 stages"),
        (["--method", "cm", "--cm-s0", "100", "--cm-s1", "10"],
         "--cm-s0 100, --cm-s1 10: the curriculum needs integers 2 <= --cm-s0 <= --cm-s1"),
        (["--method", "cm", "--cm-times", "4:0.5"], "--cm-times 4:0.5: NFE 4 re-enters the path at 3 intermediate"),
        (["--method", "cm", "--cm-times", "2:0.999"], "must increase strictly inside (0.01235, 0.998)"),
        (["--method", "ctm", "--teacher", str(rf_teacher), "--ctm-times", "3:0.6,0.3"], "must increase strictly"),
        (["--method", "ctm", "--teacher", str(rf_teacher), "--ctm-times", "2-0.5"], "expected NFE:T1"),
        (["--method", "ctm", "--teacher", str(rf_teacher), "--ctm-heun-steps", "18"],
         "--ctm-heun-steps 18: must be in 1 .. --ctm-scales - 1 = 17"),  # the flags typed, not the fields behind them
        (["--method", "ctm", "--teacher", str(rf_teacher), "--ctm-gan-weight", "-1"], "--ctm-gan-weight -1: must be"),
    ]
    for args, message in cases:
        assert_refused([*args, *TINY, "--steps", "2", "--out", str(x)], message, capsys)
    assert not x.exists()


def test_lr_decay_falls_linearly_to_zero_at_the_end_of_the_run():
    """lr_factor against the schedule written out: warmup 10, then 1 until the last 40 % of the run, then linear
    to 0; by steps (1,000), by time (a deadline 100 s after the run started, 20 s of it trained before this
    invocation), and the earlier of the two ends when both are given."""
    cfg = {"warmup": 10, "steps": 1000, "lr_decay": 0.4}
    got = [trainer.lr_factor(k, cfg, now=0.0) for k in (0, 4, 9, 500, 600, 700, 800, 999)]
    assert got == pytest.approx([0.1, 0.5, 1, 1, 1, 0.75, 0.5, 0.0025])
    assert trainer.lr_factor(800, dict(cfg, lr_decay=0.0), now=0.0) == 1.0  # no decay: constant after warmup
    by_time = dict(cfg, steps=10 ** 9)  # a run bounded by --minutes only (the CPU default)
    deadline, run_seconds = 1080.0, 100.0  # 20 s trained before, this invocation's 80 s end at t = 1080
    for now, want in ((1000.0, 1.0), (1040.0, 1.0), (1060.0, 0.5), (1080.0, 0.0), (1090.0, 0.0)):
        assert trainer.lr_factor(500, by_time, now, deadline, run_seconds) == pytest.approx(want), now
    # steps say 95 % of the run is ahead, the clock says 10 %: the clock ends first
    assert trainer.lr_factor(50, cfg, 1070.0, deadline, run_seconds) == pytest.approx(0.25)


def test_lr_decay_by_minutes_ends_near_zero_and_bad_shares_are_refused(tmp_path, capsys):
    fewstep.main(["--method", "rf", *TINY, "--minutes", "0.05", "--lr-decay", "1", "--out", str(tmp_path / "a"),
                  "--nfe", "1"])
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())]
    assert len(lrs) >= 3 and all(b < a for a, b in zip(lrs, lrs[1:])), lrs  # warmup 0: falling from step 1
    assert lrs[-1] < 0.25e-3 and lrs[0] > 0.5e-3, lrs  # the last step is near the deadline
    capsys.readouterr()
    for share, why in (("1.5", "must be a share in [0, 1]"), ("-0.1", "must be a share"), ("x", "expected a share")):
        with pytest.raises(SystemExit) as e:  # argparse: exit status 2, the option and the problem named
            fewstep.main(["--method", "rf", *TINY, "--steps", "1", "--lr-decay", share, "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "argument --lr-decay" in err and why in err, err
    assert not (tmp_path / "x").exists()


def test_eval_only_uses_the_runs_own_method_options(tmp_path, capsys):
    """--eval-only needs no method options: a cm run with a non-default curriculum is evaluated as trained."""
    fewstep.main(["--method", "cm", *TINY, "--steps", "2", "--cm-total-steps", "64", "--out", str(tmp_path),
                  "--nfe", "1"])
    result = fewstep.main(["--out", str(tmp_path), "--eval-only", "--nfe", "1", "2", "--num-samples", "4",
                           "--no-fid"])
    assert result["nfe_checked"] == {"1": 1, "2": 2}


def test_multistep_cm_scores_the_same_images_whatever_the_global_rng_state(tmp_path):
    """cm re-noises between its jumps. Those draws must come from the sampling seed, not from the global RNG:
    two --eval-only scorings of one run on one grid, after different global states, write the same images (they
    did not before seed_sampling)."""
    fewstep.main(["--method", "cm", *TINY, "--steps", "2", "--out", str(tmp_path), "--nfe", "1"])
    ev = ["--out", str(tmp_path), "--eval-only", "--nfe", "2", "--num-samples", "6", "--eval-batch-size", "3",
          "--no-fid"]

    def images():
        fewstep.main(ev)
        return np.stack([np.asarray(Image.open(f)) for f in sorted((tmp_path / "samples" / "nfe=2").glob("*.png"))])

    torch.manual_seed(1)
    first = images()
    torch.manual_seed(2)
    torch.randn(1000)
    assert np.array_equal(first, images())


def test_a_new_run_without_steps_starts_for_a_method_with_a_total_steps_hyperparameter(tmp_path):
    """cm's curriculum length is a hyperparameter named total_steps; the loop's default-steps hook is another name
    (default_steps(), pd and ld3), so a new cm run bounded by --minutes alone starts (it raised TypeError once)."""
    fewstep.main(["--method", "cm", *TINY, "--minutes", "0.02", "--out", str(tmp_path), "--nfe", "1"])
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] >= 1
