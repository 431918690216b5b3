"""Tests for fewstep.py's scm (continuous-time consistency on TrigFlow) and dmd2 (distribution matching distillation).

Known answers (derived here, independently of fewstep.py), for 1-D Gaussian data N(M, S^2) as in test_fewstep.py:
- TrigFlow's x_tau = cos(tau) x1 + sin(tau) sigma_d x0 is this file's x_t times cos + sigma_d sin, at the t with
  (1 - t) / t = sigma_d tan(tau); so the exact consistency function is the closed-form flow map to t = 1,
  f(x_tau, tau) = flow(x_tau / (cos + sigma_d sin), t -> 1), and F = (cos x_tau - f) / (sigma_d sin).
- The TrigFlow velocity of the exact rf velocity: the time derivative of x_tau along the flow, by a central
  difference of the closed-form flow map (not by the conversion formula the method uses).
- dmd2: the exact generator is the flow map to t = 1 from each of its grid times; any generator's samples are then
  N(M, S^2), re-noised they follow the data path exactly, and the fake score's flow-matching loss on them is
  stationary at the exact velocity.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import fewstep
from fewstep import ContinuousConsistency, expand_t
from test_fewstep import ROOT, TINY, M, S, ExactVelocityNet, exact_flow, ks_pvalue, losses, stationarity_z
from test_fewstep import rf_teacher  # noqa: F401  (module fixture: a 30-step rf run)
from test_fewstep import one_thread  # noqa: F401  (autouse fixture: small MLPs on one thread)

SD = 0.8  # sigma_d, not the data's S: with S = sigma_d and mean 0 TrigFlow's paths are arcs where F = F*


def flow_point(x_tau, tau):
    """(x_t, t) of this file for TrigFlow's (x_tau, tau)."""
    c, s = torch.cos(tau), torch.sin(tau)
    return x_tau / (c + SD * s), c / (c + SD * s)


class ExactTrigNet(nn.Module):
    """F(x_tau / sigma_d, tau) of N(M, S^2) data as a net(x_in, time_scale tau)."""

    def __init__(self, time_scale=1.0):
        super().__init__()
        self.time_scale = time_scale

    def forward(self, x_in, c_noise, cond=None):
        tau = expand_t(c_noise / self.time_scale, x_in)
        x_tau = SD * x_in
        x_t, t = flow_point(x_tau, tau)
        f = exact_flow(x_t, t, torch.ones_like(t))
        return (torch.cos(tau) * x_tau - f) / (SD * torch.sin(tau))


def trig_velocity_by_difference(x_tau, tau, h=1e-4):
    """d x_tau / d tau along the exact flow: move x_tau's flow point to the times of tau +- h and back."""
    tau = tau[:, None]
    x_t, t = flow_point(x_tau, tau)

    def at(tau2):
        _, t2 = flow_point(x_tau, tau2)
        return exact_flow(x_t, t, t2) * (torch.cos(tau2) + SD * torch.sin(tau2))
    return (at(tau + h) - at(tau - h)) / (2 * h)


def test_scm_teacher_conversion_is_the_trigflow_velocity_of_the_exact_flow():
    method = ContinuousConsistency(sigma_data=SD)
    method.teacher = ExactVelocityNet()
    tau = torch.linspace(0.2, 1.4, 7, dtype=torch.float64)
    x_tau = torch.cos(tau)[:, None] * M + 0.3 * torch.ones(7, 1, dtype=torch.float64)
    torch.testing.assert_close(method.teacher_velocity(x_tau, tau), trig_velocity_by_difference(x_tau, tau),
                               rtol=1e-6, atol=1e-6)


class SCMSignError(ContinuousConsistency):
    """g = -cos^2 (sigma_d F - dx/dtau) + r cos sin (x_tau + sigma_d dF/dtau): the second term's sign flipped."""

    def tangent(self, x_tau, tau, dxdt, F_minus, F_jvp, r):
        return super().tangent(x_tau, tau, dxdt, F_minus, F_jvp, -r)


class SCMTimeTangentWithoutFactor(ContinuousConsistency):
    """The JVP along (cos sin dx/dtau, 1): the factor cos sin left off the time tangent."""

    def derivative(self, net, x_tau, tau, dxdt):
        cs = expand_t(torch.cos(tau) * torch.sin(tau), x_tau)
        return torch.func.jvp(lambda x, tt: self.F(net, x, tt), (x_tau, tau), (cs * dxdt, torch.ones_like(tau)))


class SCDTeacherDataAndNoiseSwapped(ContinuousConsistency):
    """sigma_d F* = sigma_d cos E[x1] - sin E[x0]: the teacher's two predictions exchanged."""

    def teacher_velocity(self, x_tau, tau, teacher=None):
        c, s = expand_t(torch.cos(tau), x_tau), expand_t(torch.sin(tau), x_tau)
        t = fewstep.trig_to_t(tau, self.sigma_data)
        x_t = x_tau / (c + self.sigma_data * s)
        v, tt = (teacher or self.teacher)(x_t, 1000 * t), expand_t(t, x_t)
        return self.sigma_data * c * (x_t + (1 - tt) * v) - s * (x_t - tt * v)


def scm_loss(method, batch=4096):
    method.training_step = 10 ** 9  # after the warm-up: r = 1
    return lambda net: method.loss(net, M + S * torch.randn(batch, 1))


@pytest.mark.parametrize("teacher", [False, True])
def test_scm_exact_consistency_function_is_a_stationary_point_and_samples_the_target(teacher):
    """sCT and sCD from the exact teacher, with the defaults: tangent normalisation and the adaptive weight on.
    The normalisation moves no stationary point here: at the exact F, sCD's g vanishes, and sCT's g is
    cos^2 (dx/dtau - E[dx/dtau | x_tau]), which for Gaussian data is Gaussian and centred given x_tau; g / (rms(g) + c)
    is odd in g, so its conditional mean vanishes too (measured z 0.7 and 0.6). The adaptive weight is a positive
    function of tau: it moves no stationary point either."""
    method = ContinuousConsistency(sigma_data=SD)
    if teacher:
        method.teacher = ExactVelocityNet()
    z = stationarity_z(scm_loss(method), ExactTrigNet())
    assert z < 4, z
    for nfe in (1, 2, 4):
        assert ks_pvalue(method, ExactTrigNet(), nfe) > 1e-3, nfe


@pytest.mark.parametrize("cls, teacher", [(SCMSignError, True), (SCMTimeTangentWithoutFactor, False),
                                          (SCDTeacherDataAndNoiseSwapped, True)])
def test_scm_stationarity_fails_for_a_wrong_loss(cls, teacher):
    """With the defaults (tangent normalisation on). Measured z: 68 (time tangent without cos sin, sCT), 66
    (teacher's predictions swapped), and for the sign flip 75 with sCD; with sCT its mean shift hides in the noise
    of x1 - z at this batch (z 7)."""
    method = cls(sigma_data=SD)
    if teacher:
        method.teacher = ExactVelocityNet()
    z = stationarity_z(scm_loss(method), ExactTrigNet())
    assert z > 8, z


# ---- dmd2 --------------------------------------------------------------------------------------------------------
def velocity_of(m, s):
    """The rf velocity of N(m, s^2) data (test_fewstep.py's closed form with the mean and std as arguments)."""
    def v(x, t):
        var = (1 - t) ** 2 + t ** 2 * s ** 2
        return m + (t * s ** 2 - (1 - t)) / var * (x - t * m)
    return v


class VelocityNet(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.v = v

    def forward(self, x, t, cond=None):
        return self.v(x, expand_t(t / 1000, x))


class ShiftedGenerator(nn.Module):
    """A generator whose data prediction is the exact flow map to t = 1 plus a: its samples are N(M + a, S^2)."""

    def __init__(self, a=0.0):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a)))

    def forward(self, x, t, cond=None):
        t = expand_t(t / 1000, x)
        return (exact_flow(x, t, torch.ones_like(t)) + self.a - x) / (1 - t)


def test_dmd2_exact_generator_samples_the_target_at_nfe_1_2_4_and_its_fake_score_is_stationary_at_the_truth():
    """Backward simulation and multistep sampling re-noise exact samples onto the data path, so every NFE is exact;
    the fake score's flow matching on those samples is stationary at the data's velocity (measured z 1.9), and
    not when it is told the other time convention (1 - t; z 145)."""
    method = fewstep.DMD2(gan_weight=0.0)
    for nfe in (1, 2, 4):
        assert ks_pvalue(method, ShiftedGenerator(), nfe) > 1e-3, nfe

    def fake_loss(m):
        def loss(fake):
            x_hat, _ = m.generate(ShiftedGenerator(), torch.randn(4096, 1))
            return m.fake_loss(fake, None, x_hat, None)
        return loss
    assert stationarity_z(fake_loss(method), ExactVelocityNet()) < 4

    class WrongTime(fewstep.DMD2):
        def renoise(self, x):
            x_t, t, n = super().renoise(x)
            return x_t, 1 - t, n
    assert stationarity_z(fake_loss(WrongTime(gan_weight=0.0)), ExactVelocityNet()) > 8


@pytest.mark.parametrize("swapped", [False, True])
def test_dmd2_gradient_moves_a_shifted_generator_back_to_the_data(swapped):
    """A generator off by a in the mean, with the fake score at its own samples' exact velocity: the expected
    gradient of the generator loss in a has a's sign in every batch (descent moves it back): per sample, D_fake -
    D_real = (1 - t)^2 a / sigma_t^2 has a's sign, so even the heavy-tailed 1-D normalisation cannot flip it.
    Exchanging the two denoisers (the sign error DMD's Eq. 7 invites) flips every batch."""
    for a in (0.3, -0.3):
        method = fewstep.DMD2(gan_weight=0.0)
        real, fake = ExactVelocityNet(), VelocityNet(velocity_of(M + a, S))
        method.teacher, method.fake, method.fake_opt = (fake, real, 0) if swapped else (real, fake, 0)
        grads = []
        for k in range(10):
            torch.manual_seed(k)
            gen = ShiftedGenerator(a)
            x_hat, _ = method.generate(gen, torch.randn(4096, 1))
            method.generator_loss(gen, x_hat).backward()
            grads.append(gen.a.grad.item())
        g = np.array(grads)
        assert np.all(np.sign(g) == (-1 if swapped else 1) * np.sign(a)), g


# ---- machinery: resume and DDP with the methods' own networks (scm's weight l(tau), dmd2's fake score and head) ----
@pytest.mark.parametrize("name, extra", [("scm", ["--scm-warmup-steps", "4"]),
                                         ("dmd2", ["--dmd-fake-updates", "2", "--dmd-gan-weight", "0.5"])])
def test_resume_gives_the_same_losses_weights_and_method_state_as_an_uninterrupted_run(
        name, extra, tmp_path, rf_teacher):  # noqa: F811
    """scm as sCD (the teacher's conversion on a real network) and dmd2 with its GAN head: 3 + 3 steps equal 6,
    the method's own networks and optimisers included (saved in ckpt.pt's method_state)."""
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--method", name, *TINY, "--teacher", str(rf_teacher), "--nfe", "1", "2", *extra]
    fewstep.main([*args, "--steps", "6", "--out", str(a), "--num-samples", "4", "--no-fid"])
    fewstep.main([*args, "--steps", "3", "--out", str(b), "--num-samples", "4", "--no-fid"])
    fewstep.main([*args, "--steps", "6", "--out", str(b), "--num-samples", "4", "--no-fid"])
    assert losses(a) == losses(b) and len(losses(a)) == 6
    sa, sb = torch.load(a / "ckpt.pt", weights_only=True), torch.load(b / "ckpt.pt", weights_only=True)
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    state_a, state_b = sa["method_state"], sb["method_state"]
    keys = {"scm": ("weighting",), "dmd2": ("fake", "head")}[name]
    for key in keys:
        assert state_a[key] and state_a[key].keys() == state_b[key].keys()
        for k in state_a[key]:
            assert torch.equal(state_a[key][k], state_b[key][k]), (key, k)
    if name == "dmd2":
        records = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines() if "loss" in line]
        assert all(np.isfinite(r["fake_loss"]) and np.isfinite(r["g_gan"]) for r in records)


def test_torchrun_two_gloo_processes_train_scm_and_dmd2_with_their_own_networks_in_step(
        tmp_path, rf_teacher):  # noqa: F811
    """Both methods keep a network outside DDP (scm's l(tau), dmd2's fake score and head) whose gradients they
    average over the ranks themselves; the runs finish with identical generator weights on both ranks."""
    for name, extra in (("scm", []), ("dmd2", ["--teacher", str(rf_teacher), "--dmd-fake-updates", "1"])):
        out = tmp_path / name
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(ROOT / "fewstep.py"), "--method", name, *TINY, "--steps", "3", "--device", "cpu",
                            "--out", str(out), "--nfe", "1", "--num-samples", "4", "--no-fid", *extra],
                           capture_output=True, text=True, cwd=ROOT, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        assert "all 2 ranks hold identical weights at step 3" in r.stdout
