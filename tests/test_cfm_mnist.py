"""Tests for cfm_mnist.py against independent math: finite differences of the path, closed-form ODE solutions,
and the textbook orders of the fixed-step solvers; plus a short real training run on mnist5k."""
import json
import math

import numpy as np
import pytest
import torch

import cfm_mnist
import fid
import rundir
import unet
from cfm_mnist import ConditionalFlowMatcher, main, odeint


# ---------------------------------------------------------------------------------------------------------------
# Probability path
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma_min", [0.0, 0.1])
def test_conditional_velocity_is_time_derivative_of_path(sigma_min):
    """u_t(x_t | x1) = d/dt x_t for fixed noise x0 (central difference), at points x_t on the path."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    x1 = torch.rand(5, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.tensor([0.0, 0.2, 0.5, 0.8, 0.97], dtype=torch.float64)
    fm = ConditionalFlowMatcher(sigma_min)
    h = 1e-5
    fd = (fm.sample_xt(x0, x1, t + h) - fm.sample_xt(x0, x1, t - h)) / (2 * h)
    u = fm.compute_conditional_velocity_field(x1, t, fm.sample_xt(x0, x1, t))
    torch.testing.assert_close(u, fd, rtol=1e-7, atol=1e-7)
    # and the x0-form target of the loss (Eq. 23) is the same vector
    torch.testing.assert_close(u, x1 - (1 - sigma_min) * x0, rtol=1e-10, atol=1e-10)


def test_path_values_and_endpoints():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 1, 5, 5, generator=g)
    x1 = torch.rand(3, 1, 5, 5, generator=g) * 2 - 1
    fm = ConditionalFlowMatcher(0.0)
    ones, zeros = torch.ones(3), torch.zeros(3)
    assert torch.equal(fm.sample_xt(x0, x1, ones), x1)  # t = 1: exactly the data point
    assert torch.equal(fm.sample_xt(x0, x1, zeros), x0)  # t = 0: exactly the noise
    # hand-computed values of Eq. 20 for sigma_min = 0.1, t = 0.25: mu = 0.25 x1, sigma = 1 - 0.9 * 0.25 = 0.775
    fm = ConditionalFlowMatcher(0.1)
    t = torch.full((3,), 0.25)
    torch.testing.assert_close(fm.compute_mu_t(x1, t), 0.25 * x1)
    torch.testing.assert_close(fm.compute_sigma_t(t), torch.full((3,), 0.775))
    torch.testing.assert_close(fm.compute_sigma_t(ones), torch.full((3,), 0.1))  # p_1(x|x1) = N(x1, sigma_min^2)
    # p_t(x | x1) = N(t x1, sigma_t^2): empirical mean and std of many draws at one (x1, t)
    x1_one = torch.full((20000, 1, 1, 1), 0.6)
    xt = fm.sample_xt(torch.randn(20000, 1, 1, 1, generator=g), x1_one, torch.full((20000,), 0.25))
    assert abs(xt.mean().item() - 0.15) < 0.02 and abs(xt.std().item() - 0.775) < 0.02


# ---------------------------------------------------------------------------------------------------------------
# Solvers on dx/dt = a x, x(1) = x(0) exp(a)
# ---------------------------------------------------------------------------------------------------------------
A = -1.3


def linear_field(x, t):
    return A * x


@pytest.mark.parametrize("solver,order,nfe_per_step", [("euler", 1, 1), ("midpoint", 2, 2), ("rk4", 4, 4)])
def test_fixed_step_solver_order(solver, order, nfe_per_step):
    x0 = torch.tensor([[1.0, -0.5, 2.0]], dtype=torch.float64)
    exact = x0 * math.exp(A)
    errors = []
    for steps in (8, 16, 32):
        x1, nfe = odeint(linear_field, x0, solver, steps)
        assert nfe == steps * nfe_per_step
        errors.append((x1 - exact).abs().max().item())
    for coarse, fine in zip(errors, errors[1:]):
        observed = math.log2(coarse / fine)  # halving h divides the error by 2^order
        assert abs(observed - order) < 0.15, (solver, errors)


def test_adaptive_solver_accuracy_and_nfe():
    x0 = torch.randn(4, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    exact = x0 * math.exp(A)
    x_tight, nfe_tight = odeint(linear_field, x0, "adaptive", rtol=1e-9, atol=1e-9)
    x_loose, nfe_loose = odeint(linear_field, x0, "adaptive", rtol=1e-3, atol=1e-3)
    assert (x_tight - exact).abs().max().item() < 1e-7
    assert (x_loose - exact).abs().max().item() < 1e-2
    assert x_tight.shape == x0.shape and x_tight.dtype == x0.dtype
    # one RK45 step costs at least 6 evaluations; a tighter tolerance takes more steps
    assert nfe_loose >= 7 and nfe_tight > nfe_loose


def test_bad_input_errors(tmp_path):
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="euler, midpoint, rk4, adaptive"):
        odeint(linear_field, x, "heun", 10)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        odeint(linear_field, x, "euler", 0)
    with pytest.raises(ValueError, match="sigma_min"):
        ConditionalFlowMatcher(1.0)
    for argv in (["sample", "--solver", "heun"], ["sample", "--steps", "0"], ["train", "--steps", "-3"]):
        with pytest.raises(SystemExit) as e:  # argparse: exit status 2 with a message naming the problem
            main(argv + ["--out", str(tmp_path)])
        assert e.value.code == 2
    with pytest.raises(rundir.MissingFileError, match="no checkpoint"):
        main(["sample", "--out", str(tmp_path / "nothing")])


# ---------------------------------------------------------------------------------------------------------------
# Training on real digits (mnist5k, offline), sampling with every solver, NaN handling, resume
# ---------------------------------------------------------------------------------------------------------------
def losses(run):
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_loss_and_every_solver_samples(tmp_path, monkeypatch):
    run = tmp_path / "run"
    main(["train", "--out", str(run), "--data", "mnist5k", "--preset", "tiny", "--steps", "150", "--batch-size",
          "16", "--lr", "2e-3", "--no-grid", "--device", "cpu"])
    loss = losses(run)
    assert len(loss) == 150 and all(np.isfinite(loss))
    # At init the net outputs ~0, so the loss is E|x1 - x0|^2 per pixel ~ 1 + E[x1^2] ~ 1.8 for MNIST.
    assert np.mean(loss[:10]) > 1.2
    assert np.mean(loss[-30:]) < 0.6 * np.mean(loss[:10])
    assert (run / "loss.png").stat().st_size > 0 and (run / "config.json").exists()

    # FID code path with a cheap stand-in feature extractor (the Inception net is tested in test_fid.py)
    def quadrant_statistics(x, *args):  # 4 features: mean brightness of each 14x14 quadrant of the uint8 images
        f = torch.as_tensor(x).double().reshape(len(x), 2, 14, 2, 14).mean((2, 4)).reshape(len(x), 4).numpy()
        return f.mean(0), np.cov(f, rowvar=False)

    monkeypatch.setattr(fid, "compute_statistics", quadrant_statistics)
    for solver, steps in (("euler", 3), ("midpoint", 2), ("rk4", 1), ("adaptive", 1)):
        rec = main(["sample", "--out", str(run), "--solver", solver, "--steps", str(steps), "--n", "20",
                    "--batch-size", "10", "--rtol", "1e-2", "--atol", "1e-2", "--fid", "20", "--device", "cpu"])
        expected_nfe = {"euler": 3, "midpoint": 4, "rk4": 4}.get(solver)
        if expected_nfe is not None:
            assert rec["nfe"] == expected_nfe
        else:
            assert rec["nfe"] >= 7
        assert np.isfinite(rec["fid"]) and rec["n"] == rec["fid_n"] == 20
        # default reference of a run trained on mnist5k: all 5,000 digits (no held-out part), at 28x28, 1 channel
        assert rec["fid_ref"] == "fid_ref_mnist5k_train_28px_1ch.npz"
        assert int(np.load(run / rec["fid_ref"])["n"]) == 5000
    assert len((run / "eval.jsonl").read_text().splitlines()) == 4
    assert (run / "samples_euler3.png").exists()


def test_resume_and_nan_loss_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    cmd = ["train", "--out", str(run), "--data", "mnist5k", "--preset", "tiny", "--batch-size", "4", "--device", "cpu"]
    main(cmd + ["--steps", "3"])
    assert (run / "samples_step0000003.png").exists()
    main(cmd + ["--steps", "5", "--no-grid"])  # the same command with a larger budget resumes at step 3
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    good = rundir.load_checkpoint(run / "ckpt.pt")
    assert good["step"] == 5

    calls = {"n": 0}
    real_loss = ConditionalFlowMatcher.loss

    def loss_turning_nan(self, net, x1):  # two good steps, then a NaN
        calls["n"] += 1
        loss = real_loss(self, net, x1)
        return loss if calls["n"] <= 2 else loss * float("nan")

    monkeypatch.setattr(ConditionalFlowMatcher, "loss", loss_turning_nan)
    with pytest.raises(rundir.NonFiniteLoss, match=r"loss is nan at step 8.*untouched") as e:
        main(cmd + ["--steps", "20", "--no-grid"])
    assert "step 5" in str(e.value)
    kept = rundir.load_checkpoint(run / "ckpt.pt")
    assert kept["step"] == 5
    for k, v in good["model"].items():
        assert torch.equal(kept["model"][k], v)
    net = unet.UNetModel(**kept["config"]["unet"])
    unet.load_state_dict_checked(net, kept["ema"])
    assert all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize("solver", ["euler", "midpoint", "rk4", "adaptive"])
def test_exact_velocity_of_a_point_mass_carries_noise_to_the_point(solver):
    """If the data is one image x*, the marginal velocity is the conditional one, u_t(x) = (x* - (1 - s) x) /
    (1 - (1 - s) t) (written here from Lipman Eq. 21, not taken from cfm_mnist), and its flow is the straight line
    x(t) = t x* + (1 - (1 - s) t) x0. The velocity along that line is constant, so every solver follows it exactly
    (up to rounding) and must end at x* + s x0. Checks sample()'s plumbing end to end: the noise, the 1000 t time
    scale the net receives, the time grid and the final time."""
    s, n, shape = 0.01, 6, (1, 4, 4)
    x_star = torch.linspace(-0.5, 0.5, 16).reshape(shape)

    def net(x, t_scaled, cond=None):
        t = (t_scaled / 1000.0).view(-1, 1, 1, 1)
        return (x_star - (1 - s) * x) / (1 - (1 - s) * t)

    images, nfe = cfm_mnist.sample(net, n, solver=solver, steps=5, rtol=1e-8, atol=1e-8, batch_size=n, shape=shape,
                                   generator=torch.Generator().manual_seed(0), progress=False)
    x0 = torch.randn((n, *shape), generator=torch.Generator().manual_seed(0))  # the noise sample() drew
    assert (images - (x_star + s * x0).clamp(-1, 1)).abs().max() < 1e-4
    assert nfe >= 5
