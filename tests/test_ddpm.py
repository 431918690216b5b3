"""Tests for ddpm.py against independent math (numpy float64 closed forms, the Gaussian-product posterior,
improved-diffusion's respacing index sets written in by value) and short CPU runs of the tiny preset."""
import json
import math

import numpy as np
import pytest
import torch

import data
import ddim
import ddpm
import rundir
import unet

T = 1000
BETAS = np.linspace(1e-4, 0.02, T)                       # Ho et al.: linear 1e-4 .. 0.02, T = 1000
ABAR = np.cumprod(1 - BETAS)


class StandIn(torch.nn.Module):
    """A fixed nonlinear eps_theta(x_t, t) (and v in [-1, 1] when learned); records the timesteps it is called with."""

    def __init__(self, learned=False):
        super().__init__()
        self.learned, self.calls = learned, []

    def forward(self, x, t, cond=None):
        self.calls.append(t[0].item())
        tt = t.float()[:, None, None, None]
        eps = torch.tanh(0.7 * x + torch.cos(tt / 300))
        return torch.cat([eps, torch.sin(x + tt / 500)], 1) if self.learned else eps


def test_schedule_matches_closed_forms():
    d = ddpm.Diffusion(ddpm.make_betas(T, "linear"))
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), ABAR, rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod_prev.numpy(), np.r_[1.0, ABAR[:-1]], rtol=1e-12)
    # beta_tilde from 1 / (1/(1-abar_{t-1}) + alpha_t/beta_t), the precision sum of q(x_{t-1}|x_0) q(x_t|x_{t-1})
    bt = 1 / (1 / (1 - ABAR[:-1]) + (1 - BETAS[1:]) / BETAS[1:])
    np.testing.assert_allclose(d.posterior_variance.numpy()[1:], bt, rtol=1e-10)
    assert d.posterior_variance[0] == 0 and d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]
    # cosine: abar_t = f(t+1)/f(0) with f(u) = cos((u/T + s)/(1 + s) pi/2)^2 (the clip at 0.999 only acts at the end)
    c = ddpm.Diffusion(ddpm.make_betas(T, "cosine"))
    f = lambda u: np.cos((u / T + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(c.alphas_cumprod.numpy()[:990], f(np.arange(1, 991)) / f(0), rtol=1e-9)
    with pytest.raises(ValueError, match="schedule"):
        ddpm.make_betas(T, "quadratic")


def test_q_sample_equals_iterated_one_step_noising():
    """Closed-form x_t has the moments of t+1 one-step noisings x_s = sqrt(alpha_s) x_{s-1} + sqrt(beta_s) n."""
    d = ddpm.Diffusion(ddpm.make_betas(T))
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1, 1, 1), 0.8, dtype=torch.float64)
    x = x0.clone()
    for s in range(300):
        x = math.sqrt(1 - BETAS[s]) * x + math.sqrt(BETAS[s]) * torch.randn(x.shape, generator=g, dtype=x.dtype)
    t = torch.full((x0.shape[0],), 299)
    xt = d.q_sample(x0, t, torch.randn(x.shape, generator=g, dtype=x.dtype))
    for a in (x, xt):
        assert abs(a.mean().item() - 0.8 * math.sqrt(ABAR[299])) < 5e-3
        assert abs(a.var().item() - (1 - ABAR[299])) < 5e-3


def closed_form_step(x_t, eps_hat, t, z, abar, betas, var="beta_tilde"):
    """x_{t-1} from the Gaussian product q(x_{t-1}|x_0) q(x_t|x_{t-1}) at x_0 = Tweedie's x0_hat (float64 numpy)."""
    x_t, eps_hat, z = (a.double().numpy() for a in (x_t, eps_hat, z))
    x0 = (x_t - np.sqrt(1 - abar[t]) * eps_hat) / np.sqrt(abar[t])
    abar_prev = abar[t - 1] if t > 0 else 1.0
    alpha = 1 - betas[t]
    if t == 0:
        return x0  # q(x_{-1} | x_0, x_0) puts all mass on x_0
    prec = 1 / (1 - abar_prev) + alpha / betas[t]
    mean = (np.sqrt(abar_prev) * x0 / (1 - abar_prev) + np.sqrt(alpha) * x_t / betas[t]) / prec
    return mean + np.sqrt(1 / prec if var == "beta_tilde" else betas[t]) * z


@pytest.mark.parametrize("respace", ["", "25"])
@pytest.mark.parametrize("var", ["beta_tilde", "beta"])
def test_two_parametrisations_agree_with_closed_form_posterior(respace, var):
    d = ddpm.Diffusion(ddpm.make_betas(T))
    abar, betas = ABAR, BETAS
    if respace:
        d = d.respace(respace)
        abar = ABAR[d.timestep_map.numpy()]                      # abar unchanged at kept steps
        betas = 1 - abar / np.r_[1.0, abar[:-1]]
    net = StandIn()
    g = torch.Generator().manual_seed(1)
    for t in sorted({d.T - 1, d.T // 2, 1, 0}):
        x_t, z = torch.randn((3, 1, 8, 8), generator=g), torch.randn((3, 1, 8, 8), generator=g)
        a, x0a = ddpm.sample_ddpm(net, d, x_t, t, z, param="eps", var_type=var)
        b, x0b = ddpm.sample_ddpm(net, d, x_t, t, z, param="x0", var_type=var)
        eps_hat = net(x_t, d.timestep_map[torch.full((3,), t)].float())
        ref = closed_form_step(x_t, eps_hat, t, z, abar, betas, var)
        np.testing.assert_allclose(a.double().numpy(), ref, atol=2e-4, rtol=1e-4)
        np.testing.assert_allclose(b.double().numpy(), ref, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(x0a, x0b)


def test_learned_sigma_interpolates_log_variances_and_last_step_is_noiseless():
    d = ddpm.Diffusion(ddpm.make_betas(T))
    t, x_t, z = 400, torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    for v, var in ((1.0, BETAS[t]), (-1.0, BETAS[t] * (1 - ABAR[t - 1]) / (1 - ABAR[t])), (0.0, None)):
        net = lambda x, tt, cond=None: torch.cat([torch.zeros_like(x), torch.full_like(x, v)], 1)
        x_prev, _ = ddpm.sample_ddpm(net, d, x_t, t, z, var_type="learned")
        mu, _ = ddpm.sample_ddpm(net, d, x_t, t, torch.zeros_like(z), var_type="learned")
        if var is None:  # frac = 1/2: geometric mean of beta and beta_tilde
            var = math.sqrt(BETAS[t] * BETAS[t] * (1 - ABAR[t - 1]) / (1 - ABAR[t]))
        torch.testing.assert_close(x_prev - mu, math.sqrt(var) * z, atol=1e-6, rtol=1e-5)
    net = StandIn(learned=True)
    a, _ = ddpm.sample_ddpm(net, d, x_t, 0, z, var_type="learned")
    b, _ = ddpm.sample_ddpm(net, d, x_t, 0, 5 * z, var_type="learned")
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="output channels"):
        ddpm.sample_ddpm(StandIn(), d, x_t, 5, z, var_type="learned")


# improved-diffusion's space_timesteps(1000, ...), computed with its respace.py and written in by value
EXPECTED = {
    "90,60,60,20,20": [
        0, 2, 4, 7, 9, 11, 13, 16, 18, 20, 22, 25, 27, 29, 31, 34, 36, 38, 40, 42, 45, 47, 49, 51, 54, 56,
        58, 60, 63, 65, 67, 69, 72, 74, 76, 78, 80, 83, 85, 87, 89, 92, 94, 96, 98, 101, 103, 105, 107, 110,
        112, 114, 116, 119, 121, 123, 125, 127, 130, 132, 134, 136, 139, 141, 143, 145, 148, 150, 152, 154,
        157, 159, 161, 163, 165, 168, 170, 172, 174, 177, 179, 181, 183, 186, 188, 190, 192, 195, 197, 199,
        200, 203, 207, 210, 213, 217, 220, 224, 227, 230, 234, 237, 240, 244, 247, 251, 254, 257, 261, 264,
        267, 271, 274, 278, 281, 284, 288, 291, 294, 298, 301, 305, 308, 311, 315, 318, 321, 325, 328, 332,
        335, 338, 342, 345, 348, 352, 355, 359, 362, 365, 369, 372, 375, 379, 382, 386, 389, 392, 396, 399,
        400, 403, 407, 410, 413, 417, 420, 424, 427, 430, 434, 437, 440, 444, 447, 451, 454, 457, 461, 464,
        467, 471, 474, 478, 481, 484, 488, 491, 494, 498, 501, 505, 508, 511, 515, 518, 521, 525, 528, 532,
        535, 538, 542, 545, 548, 552, 555, 559, 562, 565, 569, 572, 575, 579, 582, 586, 589, 592, 596, 599,
        600, 610, 621, 631, 642, 652, 663, 673, 684, 694, 705, 715, 726, 736, 747, 757, 768, 778, 789, 799,
        800, 810, 821, 831, 842, 852, 863, 873, 884, 894, 905, 915, 926, 936, 947, 957, 968, 978, 989, 999],
    "250": [
        0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64, 68, 72, 76, 80, 84, 88, 92, 96,
        100, 104, 108, 112, 116, 120, 124, 128, 132, 136, 140, 144, 148, 152, 156, 160, 164, 169, 173, 177,
        181, 185, 189, 193, 197, 201, 205, 209, 213, 217, 221, 225, 229, 233, 237, 241, 245, 249, 253, 257,
        261, 265, 269, 273, 277, 281, 285, 289, 293, 297, 301, 305, 309, 313, 317, 321, 325, 329, 333, 337,
        341, 345, 349, 353, 357, 361, 365, 369, 373, 377, 381, 385, 389, 393, 397, 401, 405, 409, 413, 417,
        421, 425, 429, 433, 437, 441, 445, 449, 453, 457, 461, 465, 469, 473, 477, 481, 485, 489, 493, 497,
        502, 506, 510, 514, 518, 522, 526, 530, 534, 538, 542, 546, 550, 554, 558, 562, 566, 570, 574, 578,
        582, 586, 590, 594, 598, 602, 606, 610, 614, 618, 622, 626, 630, 634, 638, 642, 646, 650, 654, 658,
        662, 666, 670, 674, 678, 682, 686, 690, 694, 698, 702, 706, 710, 714, 718, 722, 726, 730, 734, 738,
        742, 746, 750, 754, 758, 762, 766, 770, 774, 778, 782, 786, 790, 794, 798, 802, 806, 810, 814, 818,
        822, 826, 830, 835, 839, 843, 847, 851, 855, 859, 863, 867, 871, 875, 879, 883, 887, 891, 895, 899,
        903, 907, 911, 915, 919, 923, 927, 931, 935, 939, 943, 947, 951, 955, 959, 963, 967, 971, 975, 979,
        983, 987, 991, 995, 999],
    "10,10,10,10,10": [
        0, 22, 44, 66, 88, 111, 133, 155, 177, 199, 200, 222, 244, 266, 288, 311, 333, 355, 377, 399, 400,
        422, 444, 466, 488, 511, 533, 555, 577, 599, 600, 622, 644, 666, 688, 711, 733, 755, 777, 799, 800,
        822, 844, 866, 888, 911, 933, 955, 977, 999],
    "17,5,3": [
        0, 21, 42, 62, 83, 104, 125, 146, 166, 187, 208, 229, 250, 271, 291, 312, 333, 334, 417, 500, 583,
        666, 667, 833, 999],
    "ddim25": list(range(0, 1000, 40)),
    "ddim50": list(range(0, 1000, 20)),
}


@pytest.mark.parametrize("counts", list(EXPECTED))
def test_space_timesteps_matches_improved_diffusion(counts):
    assert ddpm.space_timesteps(1000, counts) == set(EXPECTED[counts])


def test_space_timesteps_bad_counts():
    for bad in ("300,300,300,300", "0", "ddim999", "600,600"):
        with pytest.raises(ValueError):
            ddpm.space_timesteps(1000, bad)


@pytest.mark.parametrize("counts", ["250", "ddim25", "90,60,60,20,20"])
def test_recreate_alphas_keeps_alphas_cumprod_and_net_sees_original_t(counts):
    d = ddpm.Diffusion(ddpm.make_betas(T)).respace(counts)
    kept = np.array(sorted(EXPECTED[counts]))
    np.testing.assert_array_equal(d.timestep_map.numpy(), kept)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), ABAR[kept], rtol=1e-12)
    np.testing.assert_allclose(d.betas.numpy()[1:], 1 - ABAR[kept[1:]] / ABAR[kept[:-1]], rtol=1e-10)
    net = StandIn()
    ddpm.sample_loop(net, d, torch.randn(1, 1, 4, 4), progress=False)
    assert net.calls == [float(k) for k in kept[::-1]]


def test_train_lowers_loss_resumes_and_all_loops_run(tmp_path, capsys):
    """tiny preset on mnist5k (16x16 to fit the CPU budget), a few hundred steps; then every sampler end to end."""
    out = tmp_path / "run"
    args = ["--data", "mnist5k", "--image-size", "16", "--arch", "tiny", "--batch-size", "8", "--lr", "2e-3",
            "--ckpt-every", "1000", "--sample-respace", "10", "--out", str(out)]
    ddpm.main(args + ["--steps", "200"])
    ckpt = rundir.load_checkpoint(out / "ckpt.pt")
    assert ckpt["step"] == 200 and set(ckpt) >= {"model", "ema", "optimizer", "step", "rng", "config"}
    assert json.loads((out / "config.json").read_text())["unet"] == ckpt["config"]["unet"]
    assert (out / "loss.png").exists()

    # loss on one fixed batch, fixed t and eps: fresh net (exactly 1: zero-initialised output) vs trained EMA net
    x0 = data.to_float(data.load("mnist5k", image_size=16)[:256])
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, T, (256,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    d = ddpm.Diffusion(ddpm.make_betas(T))
    x_t = d.q_sample(x0, t, eps)
    trained, _ = unet.load_model(out / "ckpt.pt")
    fresh = unet.UNetModel(**ckpt["config"]["unet"]).eval()
    with torch.no_grad():
        loss0 = ((fresh(x_t, t.float()) - eps) ** 2).mean().item()
        loss1 = ((trained(x_t, t.float()) - eps) ** 2).mean().item()
    assert loss1 < 0.3 * loss0, (loss0, loss1)

    ddpm.main(args + ["--steps", "203"])  # the same command resumes
    assert "resumed from" in capsys.readouterr().out
    assert rundir.load_checkpoint(out / "ckpt.pt")["step"] == 203

    x_T = ddpm.get_noise_x_t(1, (1, 16, 16), seed=0)
    abar = ddim.make_alphas_cumprod(T)
    # Respaced loops only: the full 1,000-step loops (20 s of U-Net calls here) run on closed-form nets in
    # test_exact_eps_of_a_point_mass_brings_every_sampler_to_the_point and in test_ddim.py.
    for counts, steps in (("250", 250), ("25", 25)):
        dd = d.respace(counts)
        x, traj = ddpm.sample_loop(trained, dd, x_T, record_t=ddpm.TRAJECTORY_T, progress=False)
        assert dd.T == steps and len(traj) == 6 and torch.isfinite(x).all()
        y = ddim.sample_ddim(trained, x_T, ddim.ddim_timesteps(T, steps), abar, eta=0.0, progress=False)
        assert y.shape == x_T.shape and torch.isfinite(y).all()
    ddpm.main(["--ckpt", str(out / "ckpt.pt"), "--respace", "ddim25", "--num-samples", "4", "--out", str(tmp_path)])
    assert (tmp_path / "samples_ddpm25.png").exists() and (tmp_path / "trajectory_ddpm25.png").exists()


def test_nan_loss_stops_training_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["--data", "mnist5k", "--image-size", "16", "--arch", "tiny", "--batch-size", "4", "--sample-respace", "2",
            "--out", str(out)]
    ddpm.main(args + ["--steps", "2"])
    good = rundir.load_checkpoint(out / "ckpt.pt")
    monkeypatch.setattr(ddpm, "loss_fn", lambda net, diffusion, x0: net(x0, torch.zeros(len(x0))).sum() * float("nan"))
    with pytest.raises(rundir.NonFiniteLoss, match=r"loss is nan at step 3: .*\(step 2\) is untouched"):
        ddpm.main(args + ["--steps", "5"])
    kept = rundir.load_checkpoint(out / "ckpt.pt")
    assert kept["step"] == 2 and all(torch.equal(kept["model"][k], v) for k, v in good["model"].items())


def test_bad_input():
    with pytest.raises(SystemExit) as e:  # argparse: exit status 2, "invalid choice: 'nope'"
        ddpm.main(["--arch", "nope", "--steps", "1"])
    assert e.value.code == 2
    with pytest.raises(ValueError, match="section"):
        ddpm.Diffusion(ddpm.make_betas(100)).respace("60,60")
    with pytest.raises(ValueError, match="param"):
        ddpm.sample_ddpm(StandIn(), ddpm.Diffusion(ddpm.make_betas(10)), torch.zeros(1, 1, 2, 2), 3,
                         torch.zeros(1, 1, 2, 2), param="mu")


def test_exact_eps_of_a_point_mass_brings_every_sampler_to_the_point():
    """If the data is one image x*, the exact noise prediction is eps*(x_t, t) = (x_t - sqrt(abar_t) x*) / sqrt(1 -
    abar_t) (invert q(x_t|x_0)). With it the posterior mean at x0_hat = x* is exact, so DDPM (full and respaced, the
    last step adds no noise) and DDIM (eta = 0) must land on x* from any x_T: an end-to-end check of the loops'
    timestep bookkeeping that a trained model's blurry samples could not give."""
    x_star = torch.rand(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    abar = torch.from_numpy(ABAR)

    def eps_star(x, t, cond=None):
        a = abar[t.long()].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x_star) / (1 - a).sqrt()

    x_T = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    d = ddpm.Diffusion(ddpm.make_betas(T))
    for diffusion in (d, d.respace("25"), d.respace("90,60,60,20,20")):
        x0, _ = ddpm.sample_loop(eps_star, diffusion, x_T, progress=False)
        assert (x0 - x_star).abs().max() < 1e-9
    x0 = ddim.sample_ddim(eps_star, x_T, ddim.ddim_timesteps(T, 10), ddim.make_alphas_cumprod(T), eta=0.0,
                          progress=False)
    assert (x0 - x_star).abs().max() < 1e-9
