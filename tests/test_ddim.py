"""Tests for ddim.py: Eq. 12/16 against a numpy float64 evaluation, eta = 1 against DDPM's beta_tilde step,
eta = 0 determinism, checkpoints (ddpm.py run dirs and raw ADM state dicts) and bad input."""
import json

import numpy as np
import pytest
import torch

import ddim
import ddpm
import unet

T = 1000
ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, T))


def stand_in(x, t, cond=None):
    """A fixed nonlinear eps_theta(x_t, t)."""
    return torch.tanh(0.7 * x + torch.cos(t.float()[:, None, None, None] / 300))


def test_schedule_and_timesteps():
    np.testing.assert_allclose(ddim.make_alphas_cumprod(T).numpy(), ABAR, rtol=1e-12)
    f = lambda u: np.cos((u / T + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(ddim.make_alphas_cumprod(T, "cosine").numpy()[:990], f(np.arange(1, 991)) / f(0),
                               rtol=1e-9)
    for steps in (10, 20, 25, 50, 100, 1000):  # the DDIM paper's uniform stride = improved-diffusion's "ddimN"
        assert ddim.ddim_timesteps(T, steps) == list(range(0, T, T // steps))
    assert ddim.ddim_timesteps(T, 3) == [0, 333, 666]
    with pytest.raises(ValueError, match="steps"):
        ddim.ddim_timesteps(T, 0)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_step_matches_eq12_in_float64(eta):
    g = torch.Generator().manual_seed(0)
    x_t, z = torch.randn((2, 1, 6, 6), generator=g), torch.randn((2, 1, 6, 6), generator=g)
    abar = ddim.make_alphas_cumprod(T)
    for t, tp in ((999, 959), (500, 480), (40, 0), (0, -1)):
        got, _ = ddim.ddim_step(stand_in, x_t, t, tp, abar, eta, z)
        e = stand_in(x_t, torch.full((2,), float(t))).double().numpy()
        a, ap = ABAR[t], (ABAR[tp] if tp >= 0 else 1.0)
        x0 = (x_t.double().numpy() - np.sqrt(1 - a) * e) / np.sqrt(a)
        sigma = eta * np.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
        ref = np.sqrt(ap) * x0 + np.sqrt(1 - ap - sigma ** 2) * e + sigma * z.double().numpy()
        np.testing.assert_allclose(got.double().numpy(), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kept", [list(range(0, T, 40)), list(range(T))])
def test_eta1_equals_ddpm_beta_tilde_step_by_step(kept):
    """Same x_t, same z at every step: DDIM(eta=1) == DDPM ancestral step with sigma^2 = beta_tilde (respaced)."""
    d = ddpm.Diffusion(ddpm.recreate_alphas(ddpm.Diffusion(ddpm.make_betas(T)).alphas_cumprod, kept), kept)
    abar = ddim.make_alphas_cumprod(T)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, 1, 6, 6), generator=g)
    pairs = list(zip(kept[::-1], kept[::-1][1:] + [-1]))
    for i, (t, tp) in zip(range(len(kept) - 1, -1, -1), pairs):
        if len(kept) == T and 30 < i < 970:
            continue  # the full schedule: check both ends only (time budget)
        z = torch.randn(x.shape, generator=g)
        a, _ = ddim.ddim_step(stand_in, x, t, tp, abar, 1.0, z)
        b, _ = ddpm.sample_ddpm(stand_in, d, x, i, z, param="eps", var_type="beta_tilde")
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)
        x = a


def test_eta0_is_deterministic():
    abar = ddim.make_alphas_cumprod(T)
    x_T = ddim.get_noise_x_t(2, (1, 6, 6), seed=3)
    a = ddim.sample_ddim(stand_in, x_T, ddim.ddim_timesteps(T, 20), abar, eta=0.0, seed=0, progress=False)
    b = ddim.sample_ddim(stand_in, x_T, ddim.ddim_timesteps(T, 20), abar, eta=0.0, seed=1, progress=False)
    assert torch.equal(a, b)
    c = ddim.sample_ddim(stand_in, x_T, ddim.ddim_timesteps(T, 20), abar, eta=0.5, seed=1, progress=False)
    assert not torch.allclose(a, c)
    torch.testing.assert_close(ddim.get_noise_x_t(2, (1, 6, 6), seed=3), ddpm.get_noise_x_t(2, (1, 6, 6), seed=3))


SMALL_ADM = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16",
                 num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True)


def random_adm(path):
    """A small ADM net with every weight random (no zero-initialised layers), saved as a raw state dict."""
    torch.manual_seed(0)
    net = unet.adm(**SMALL_ADM).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    torch.save(net.state_dict(), path)
    return net


def test_adm_checkpoint_round_trip(tmp_path, capsys):
    path = tmp_path / "adm.pt"
    ref = random_adm(path)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10.0, 900.0])
    with torch.no_grad():
        y = ref(x, t)
    assert y.shape == (2, 6, 32, 32)
    net, info = unet.load_model(path, adm_config=SMALL_ADM)
    assert info["shape"] == (3, 32, 32) and info["diffusion"] == {"T": 1000, "schedule": "linear"}
    with torch.no_grad():
        torch.testing.assert_close(net(x, t), y)
    # both samplers from the CLI: ddpm.py picks the learned sigma, ddim.py uses the first 3 channels as eps
    cfg = json.dumps(SMALL_ADM)
    common = ["--ckpt", str(path), "--adm-config", cfg, "--out", str(tmp_path)]
    ddpm.main(common + ["--respace", "4", "--num-samples", "2"])
    assert "sigma^2 learned" in capsys.readouterr().out
    ddim.main(common + ["--steps", "4", "--num-instances", "2"])
    assert (tmp_path / "samples_ddpm4.png").exists() and (tmp_path / "samples_ddim4_eta0.png").exists()
    # a preset by name: learn_sigma is read off the checkpoint's output layer
    tiny = unet.create("tiny", learn_sigma=True)
    torch.save(tiny.state_dict(), tmp_path / "tiny_raw.pt")
    net, info = unet.load_model(tmp_path / "tiny_raw.pt", arch="tiny")
    assert info["shape"] == (1, 28, 28) and net.out[-1].weight.shape[0] == 2


def test_ddim_cli_on_ddpm_checkpoint(tmp_path):
    run = tmp_path / "run"
    ddpm.main(["--data", "mnist5k", "--image-size", "16", "--arch", "tiny", "--steps", "2", "--batch-size", "4",
               "--sample-respace", "10", "--out", str(run)])
    ddim.main(["--ckpt", str(run / "ckpt.pt"), "--sweep", "steps", "--steps-list", "2,5", "--num-instances", "2"])
    ddim.main(["--ckpt", str(run / "ckpt.pt"), "--sweep", "eta", "--eta-list", "0,1", "--num-instances", "1"])
    for name in ("ddim_sweep_steps.png", "ddim_sweep_eta.png", "samples_ddim5_eta0.png", "samples_ddim100_eta1.png"):
        assert (run / name).exists(), name


def test_bad_input(tmp_path):
    path = tmp_path / "adm.pt"
    random_adm(path)
    with pytest.raises(ValueError, match="unknown --arch"):
        unet.load_model(path, arch="no-such-arch")
    with pytest.raises(ValueError, match="--arch"):
        unet.load_model(path)
    with pytest.raises(ValueError, match=r"shape mismatch: input_blocks\.0\.0\.weight"):
        unet.load_model(path, arch="tiny")  # 3-channel 32x32 ADM weights into the 1-channel tiny preset
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="neither"):
        unet.load_model(tmp_path / "other.pt")
    abar = ddim.make_alphas_cumprod(T)
    with pytest.raises(ValueError, match="eta"):
        ddim.sample_ddim(stand_in, torch.zeros(1, 1, 2, 2), [0, 500], abar, eta=-0.1)
    with pytest.raises(SystemExit):
        ddim.main(["--ckpt", str(path), "--adm-config", json.dumps(SMALL_ADM), "--eta", "-1"])


def test_every_eta_samples_a_gaussian_with_the_exact_eps():
    # data x0 ~ N(m, s^2): x_t ~ N(sqrt(abar) m, abar s^2 + 1 - abar), and the exact (MMSE) eps prediction is
    # E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) m) / (abar s^2 + 1 - abar). DDIM's family of processes all
    # share these marginals (Song et al. Lemma 1), so with the exact eps every eta must end at N(m, s^2).
    m, s = 0.3, 0.5
    abar = ddim.make_alphas_cumprod(T)

    def exact_eps(x, t):
        a = abar[t.long()].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * m) / (a * s ** 2 + 1 - a)

    x_T = torch.randn(20_000, 1, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for eta in (0.0, 0.2, 0.5, 1.0):
        x0 = ddim.sample_ddim(exact_eps, x_T, ddim.ddim_timesteps(T, T), abar, eta, seed=2, progress=False)
        assert abs(x0.mean().item() - m) < 0.015, eta  # standard error 0.0035
        assert abs(x0.std().item() - s) < 0.01, eta    # standard error 0.0025; a wrong sigma or eps weight: 0.1
