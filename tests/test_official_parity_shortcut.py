"""fewstep.py's shortcut, rf and reflow against numbers their authors' code produced on the same inputs.

Fixtures: tests/data/official/{shortcut,rf,reflow}_*.pt, written by tools/official_fixtures_shortcut.py from
kvfrans/shortcut-models (JAX, x64), gnobitab/RectifiedFlow (Liu et al.'s PyTorch code) and cloneofsimo/minRF (a
reference PyTorch rectified flow); each file names its repository, commit and function. A missing fixture fails.

The tiny network (written here; the generator has its twin): f(x, t, d, y) = p tanh(a x + b t + c d + E[y]) + e x,
per channel, float64, with t the time of fewstep.py (0 noise, 1 data), d shortcut's step, y a class label (none:
no E term). fewstep.py calls it as net(x, 1000 t, cond=1000 d, y=y); the maps to the other codes' conventions are
in the generator and in each test below.

What is compared, per method:
- shortcut: the flow-matching and bootstrap targets row by row (the EMA's two calls, the clip at 4), the predicted
  rows, the loss and its gradients, where the bootstrap rows divide evenly over the log2 M step sizes (112 // 4 =
  28 rows: 4 each) and where not (their defaults, 256 // 8 = 32 rows: 8 at 2d = 1, 4 at each other); the 2d layout
  exactly and the times by KS; the sampler (NFE 1, 2, 4, 128, and guided) on their noise. Every row weighs the
  same in both (a plain mean): there is no weight to compare.
- rf: Liu et al.'s loss (per-row target, loss, gradients), their time draws (KS) and Euler sampler; minRF's loss
  with labels and logit-normal times, its time draws (KS), its sampler with and without guidance.
- reflow: Liu et al.'s reflow loss on pairs and their distillation loss (t = 0), pair generation by their Euler
  ODE (online reflow) exactly and by their RK45 (their default) within a stated bound. Reflow samples with rf's
  sampler (inherited; compared above); Liu et al.'s code has no separate reflow sampler.
"""
import pathlib
import types

import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

import fewstep

DATA = pathlib.Path(__file__).resolve().parent / "data" / "official"
EPS_LIU = 1e-3  # Liu et al.'s code: t in [eps, 1] in the loss, Euler times eps + k (1 - eps) / n


def fixture(name):
    path = DATA / f"{name}.pt"
    assert path.exists(), f"missing fixture {path}: run tools/official_fixtures.py --repos DIR"
    return torch.load(path, weights_only=True)


def close(mine, theirs, rtol=1e-10, atol=1e-12):  # both sides float64: agreement to rounding
    torch.testing.assert_close(torch.as_tensor(mine).double(), torch.as_tensor(theirs).double(), rtol=rtol,
                               atol=atol)


def close32(mine, theirs):  # where the authors' code rounds to float32 (see the test)
    close(mine, theirs, rtol=1e-5, atol=1e-6)


class Tiny(nn.Module):
    """f(x, t, d, y) = p tanh(a x + b t + c d + E[y]) + e x on (B, C, 1, 1); fewstep.py feeds 1000 t and 1000 d.
    Records each call's input and output (the shortcut test reads the EMA's two calls)."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.ParameterDict({k: nn.Parameter(v.clone().double()) for k, v in w.items()})
        self.calls = []

    def forward(self, x, t, cond=None, y=None):
        col = lambda v: v[None, :, None, None]  # noqa: E731
        t = torch.as_tensor(t).double().expand(x.shape[0]) / 1000
        h = col(self.w["a"]) * x + col(self.w["b"]) * t[:, None, None, None]
        if cond is not None:
            h = h + col(self.w["c"]) * (torch.as_tensor(cond).double().expand(x.shape[0]) / 1000)[:, None, None, None]
        if y is not None:
            h = h + self.w["E"][y][:, :, None, None]
        out = col(self.w["p"]) * torch.tanh(h) + col(self.w["e"]) * x
        self.calls.append({"x": x.detach(), "out": out.detach()})
        return out


class LiuTimes(nn.Module):
    """Liu et al.'s Euler grid on fewstep.py's: fewstep's k / n becomes eps + (k / n)(1 - eps), in their order of
    operations, so that both integrate the same field; what is compared is the update x + v / n and the steps."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, cond=None):
        return self.net(x, 1000 * (t.double() / 1000 * (1.0 - EPS_LIU) + EPS_LIU))


def grads(net):
    return {k: torch.zeros_like(p) if p.grad is None else p.grad for k, p in net.w.items()}


def catch_mse(monkeypatch):
    """fewstep's F.mse_loss, with its (prediction, target) kept: the per-row targets the test compares."""
    seen = {}

    def mse_loss(pred, target):
        seen.update(pred=pred, target=target)
        return F.mse_loss(pred, target)
    monkeypatch.setattr(fewstep, "F", types.SimpleNamespace(mse_loss=mse_loss))
    return seen


# %% shortcut -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["shortcut_targets_even", "shortcut_targets_uneven"])
def test_shortcut_targets_loss_and_gradients_are_the_authors(name, monkeypatch):
    """targets_shortcut.get_targets on fixed draws. Their rows: bootstrap rows on images[:nb], flow-matching rows on
    images[:B - nb] (their batch reuse, named in the docstring), so fewstep's batch is built as those rows; their
    sigma_min = 1e-5 path is flow matching on data x1 + 1e-5 x0, so that is fewstep's x1. fm_d = "min" (their
    d = 1/M on flow-matching rows); their dropout falls on flow-matching rows only, which is one of fewstep's
    draws (it drops on any row); fewstep's own 2d layout must equal theirs row by row. Targets and the bootstrap
    rows agree in float64; their flow-matching rows' x_t is float32-rounded (their t there is
    randint(...).astype(float32), so (1 - (1 - 1e-5) t) is computed in float32 even with x64): those rows'
    predictions, the loss and the gradients agree to that rounding (rtol 1e-5, atol 1e-6)."""
    fx = fixture(name)
    cfg, inp, out = fx["config"], fx["inputs"], fx["outputs"]
    b, nb = cfg["batch"], cfg["batch"] // cfg["bootstrap_every"]
    x0 = torch.cat([inp["x0_boot"], inp["x0_flow"][:b - nb]])
    x1 = torch.cat([inp["images"][:nb], inp["images"][:b - nb]]) + cfg["sigma_min"] * x0
    y = torch.cat([inp["labels"][:nb], inp["labels"][:b - nb]])
    assert torch.equal(out["labels"][:nb], y[:nb])  # theirs: true labels on every bootstrap row
    method = fewstep.Shortcut(max_steps=cfg["max_steps"], bootstrap_every=cfg["bootstrap_every"], fm_d="min")
    method.num_classes = cfg["num_classes"]
    own_rows, t = method.bootstrap_rows, out["t"]

    def bootstrap_rows(n, device):
        two_d, _ = own_rows(n, device)
        torch.testing.assert_close(two_d.double(), 2.0 ** -out["dt_base"][:nb], rtol=0, atol=0)
        return two_d, t[:nb].float()
    monkeypatch.setattr(method, "bootstrap_rows", bootstrap_rows)
    monkeypatch.setattr(fewstep, "sample_time", lambda n, device, *a: t[nb:].float())
    monkeypatch.setattr(fewstep, "drop_labels", lambda labels, p, null: out["labels"])
    seen = catch_mse(monkeypatch)
    net, ema = Tiny(fx["weights"]), Tiny(fx["ema_weights"]).requires_grad_(False)
    loss = method.loss(net, x1, x0, ema=ema, y=y)
    loss.backward()
    close(seen["target"], out["target"])
    close(seen["pred"][:nb], out["pred"][:nb])
    close32(seen["pred"][nb:], out["pred"][nb:])
    close32(net.calls[0]["x"][nb:], out["x_t"][nb:])
    assert len(ema.calls) == 2  # the EMA's step at x_t, then at the clipped half step x'_{t+d}
    for mine, theirs in zip(ema.calls, out["ema_calls"]):
        close(mine["x"], theirs["x"])
        close(mine["out"], theirs["out"])
    assert out["clipped_half_step_entries"] > 0 and out["clipped_target_entries"] > 0  # the clip acts here
    close32(loss, out["loss"])
    for k, g in grads(net).items():
        close32(g, out["grads"][k])


def test_shortcut_step_sizes_and_times_are_drawn_as_the_authors_draw_them():
    """Their own jax.random over 625 batches of 256 (bootstrap_every 8): the 2d of each bootstrap row is a fixed
    layout (4 rows at each 2d = 2/M .. 1/2, and 8 at 2d = 1), compared exactly; the bootstrap times by a KS test on
    each 2d's rows and pooled; the flow-matching times (theirs on the grid i/M, fewstep's continuous: the
    docstring's deviation, a CDF gap of at most 1/M, below what 20,000 draws resolve) by a KS test."""
    fx = fixture("shortcut_draws")
    cfg, out = fx["config"], fx["outputs"]
    nb = cfg["batch"] // cfg["bootstrap_every"]
    method = fewstep.Shortcut(max_steps=cfg["max_steps"], bootstrap_every=cfg["bootstrap_every"])
    torch.manual_seed(0)
    draws = [method.bootstrap_rows(nb, "cpu") for _ in range(cfg["calls"])]
    two_d = draws[0][0]
    torch.testing.assert_close(two_d.double(), 2.0 ** -out["dt_base"].double(), rtol=0, atol=0)
    t_mine = torch.stack([t for _, t in draws])  # (calls, nb), rows in the layout's order
    t_theirs = out["t_boot"].reshape(cfg["calls"], nb)
    for level in out["dt_base"].unique():
        rows = out["dt_base"] == level
        assert scipy.stats.ks_2samp(t_mine[:, rows].flatten(), t_theirs[:, rows].flatten()).pvalue > 1e-3, level
    assert scipy.stats.ks_2samp(t_mine.flatten(), t_theirs.flatten()).pvalue > 1e-3
    t_fm = fewstep.sample_time(len(out["t_flow"]), "cpu", method.time_dist)
    assert scipy.stats.ks_2samp(t_fm, out["t_flow"]).pvalue > 1e-3


def test_shortcut_sampler_is_the_authors():
    """helper_inference.do_inference's Euler loop (d = 1/n, t = k/n, guidance v_u + w (v_c - v_u)) on their noise
    and labels: n = 1, 2, 4, 128 unguided and n = 4 at w = 1.5 (2 NFE a step here). fm_d = "min": their d = 1/M
    at n = M (fewstep's default "zero" feeds d = 0 there, the paper's)."""
    fx = fixture("shortcut_sampler")
    for run in fx["outputs"]["runs"]:
        method = fewstep.Shortcut(max_steps=fx["config"]["max_steps"], fm_d="min", guidance=run["cfg_scale"])
        method.num_classes = fx["config"]["num_classes"]
        nfe = run["steps"] * (1 if run["cfg_scale"] == 1 else 2)
        with torch.no_grad():
            x = method.sample(Tiny(fx["weights"]), run["x0"], nfe, y=run["labels"])
        close(x, run["x1"])


# %% rf ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, method", [("rf_liu_loss", fewstep.RectifiedFlow), ("reflow_liu_loss", fewstep.Reflow)])
def test_rf_and_reflow_loss_target_and_gradients_are_liu_et_al(name, method, monkeypatch):
    """losses.get_rectified_flow_loss_fn (reduce_mean, their CIFAR-10 config) on fixed z0 and t = u (1 - eps) + eps
    (their t; fewstep's times start at 0, a deviation named in its docstring); reflow: their reflow loss
    (reflow_t_schedule 'uniform', l2) on fixed pairs (z0, x1) and times."""
    fx = fixture(name)
    inp, out = fx["inputs"], fx["outputs"]
    monkeypatch.setattr(fewstep, "sample_time", lambda n, device, *a: inp["t"])
    seen = catch_mse(monkeypatch)
    net = Tiny(fx["weights"])
    loss = method().loss(net, inp["x1"], inp["z0"])
    loss.backward()
    close(seen["target"], out["target"])
    close(loss, out["loss"])
    for k, g in grads(net).items():
        close(g, out["grads"][k])


def test_rf_times_are_drawn_as_liu_et_al_draw_them():
    """Their 20,000 times, uniform on [eps, 1], against fewstep's uniform on [0, 1] (a gap of eps in the CDF)."""
    draws = fixture("rf_liu_loss")["outputs"]["t_draws"]
    torch.manual_seed(0)
    t = fewstep.sample_time(len(draws), "cpu", "uniform")
    assert scipy.stats.ks_2samp(t, draws).pvalue > 1e-3


def test_rf_euler_sampler_is_liu_et_al():
    """sampling.get_rectified_flow_sampler's Euler sampler (sigma_var 0) at n = 1, 2, 4, 16 on the same noise: n
    calls at their times eps + k (1 - eps) / n (mapped by LiuTimes), steps of 1/n."""
    fx = fixture("rf_liu_sampler")
    for run in fx["outputs"]["runs"]:
        n = run["n"]
        assert run["nfe"] == n
        close(run["times"][:, 0], EPS_LIU + torch.arange(n, dtype=torch.float64) / n * (1 - EPS_LIU))
        with torch.no_grad():
            x = fewstep.RectifiedFlow().sample(LiuTimes(Tiny(fx["weights"])), fx["inputs"]["z"], n)
        close(x, run["sample"])


def test_rf_loss_with_labels_and_logit_normal_times_is_minrf(monkeypatch):
    """minRF's RF.forward (ln=True) on fixed draws, mapped: its t = 1 noise is fewstep's 1 - t, its velocity
    z1 - x is minus fewstep's, its noise z1 is fewstep's x0. Its rf.py drops no labels (its DiT does, inside), so
    the test's label draw keeps every label."""
    fx = fixture("rf_minrf")
    inp, out = fx["inputs"], fx["outputs"]
    t = 1 - torch.sigmoid(inp["nt"])
    monkeypatch.setattr(fewstep, "sample_time", lambda n, device, *a: t)
    monkeypatch.setattr(fewstep, "drop_labels", lambda y, p, null: y)
    method = fewstep.RectifiedFlow(time_dist="logit-normal")
    method.num_classes = 4
    net = Tiny(fx["weights"])
    loss = method.loss(net, inp["x"], inp["z1"], y=inp["y"])
    loss.backward()
    close(loss, out["loss"])
    for k, g in grads(net).items():
        close(g, out["grads"][k])


def test_rf_logit_normal_times_are_drawn_as_minrf_draws_them():
    """minRF's own 20,000 t = sigmoid(N(0, 1)) (t = 1 noise), as fewstep's 1 - t, against logit-normal(0, 1)."""
    draws = fixture("rf_minrf")["outputs"]["t_draws"]
    torch.manual_seed(0)
    t = fewstep.sample_time(len(draws), "cpu", "logit-normal", 0.0, 1.0)
    assert scipy.stats.ks_2samp(t, 1 - draws).pvalue > 1e-3


def test_rf_sampler_with_and_without_guidance_is_minrf():
    """RF.sample: steps of 1/n from its t = 1 (fewstep's 0), guidance vu + w (vc - vu) with the null label 4."""
    fx = fixture("rf_minrf")
    for run in fx["outputs"]["runs"]:
        method = fewstep.RectifiedFlow(guidance=run["cfg"])
        method.num_classes = 4
        nfe = run["steps"] * (1 if run["cfg"] == 1 else 2)
        with torch.no_grad():
            x = method.sample(Tiny(fx["weights"]), fx["inputs"]["z"], nfe, y=fx["inputs"]["y"])
        close(x, run["sample"])


# %% reflow -----------------------------------------------------------------------------------------------------------
def test_reflow_distillation_loss_is_liu_et_al():
    """Their distillation (reflow_t_schedule 't0', l2) at eps = 0, i.e. t = 0 (their default eps = 1e-3 trains at
    t = 1e-3: named in Reflow's docstring); their LPIPS variants are not compared (no offline weights)."""
    fx = fixture("reflow_liu_distill_loss")
    inp, out = fx["inputs"], fx["outputs"]
    net = Tiny(fx["weights"])
    loss = fewstep.Reflow(distill=True).loss(net, inp["x1"], inp["z0"])
    loss.backward()
    close(loss, out["loss"])
    for k, g in grads(net).items():
        close(g, out["grads"][k])


class OnLiuInterval(nn.Module):
    """The ODE on Liu et al.'s interval [eps, 1] in fewstep's time t in [0, 1]: s = eps + (1 - eps) t, dx/dt =
    (1 - eps) v(x, s)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, cond=None):
        return (1 - EPS_LIU) * self.net(x, 1000 * (EPS_LIU + (1 - EPS_LIU) * t.double() / 1000))


def test_reflow_pairs_are_liu_et_al():
    """make_pairs against their sde.euler_ode (online reflow's pairs) at n = 1, 2, 4, 16 steps exactly (times mapped
    by LiuTimes), and against their default pair generator, sde.ode (scipy RK45, rtol = atol = 1e-5, float32, on
    [eps, 1]): Euler on the same interval converges to it at first order (error / 4 when n * 4), to within 2.5e-3
    at n = 4096, so both solve the same ODE in the same direction."""
    fx = fixture("rf_liu_sampler")
    z = fx["inputs"]["z"]
    for run in fx["outputs"]["runs"]:
        with torch.no_grad():
            pairs = fewstep.Reflow(teacher_steps=run["n"]).make_pairs(LiuTimes(Tiny(fx["weights"])), z)
        close(pairs, run["euler_ode"])
    err = {}
    for n in (1024, 4096):
        with torch.no_grad():
            pairs = fewstep.Reflow(teacher_steps=n).make_pairs(OnLiuInterval(Tiny(fx["weights"])), z)
        err[n] = (pairs - fx["outputs"]["rk45"]).abs().max().item()
    assert err[4096] < 2.5e-3 and err[1024] / err[4096] > 3, err
