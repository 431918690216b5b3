"""Tests for sde_toy.py against independent math.

- abar(t) against scipy quadrature of beta(t);
- the closed-form score against torch autograd of a log density written out here with torch.distributions;
- forward SDE and forward ODE marginals against the exact mixture CDF (scipy.stats.norm) at t = 0.1, 0.3, 1;
- reverse SDE / reverse ODE samples started at N(0, 1) against the exact mixture (KS against the exact CDF and
  against exact samples, mode masses, mean and variance), in 1-D and 2-D;
- forward-then-reverse ODE returns each particle (up to the O(dt) Euler error), the SDE does not.
The mixture and the schedule are written out again here rather than read from sde_toy.
"""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

import sde_toy

BETA_MIN, BETA_MAX = 0.1, 20.0
W1, MU1, S1 = [0.3, 0.45, 0.25], [-2.0, 0.5, 2.5], [0.3, 0.4, 0.25]
W2 = [0.4, 0.35, 0.25]
MU2 = [[-1.5, -1.0], [1.5, -1.0], [0.0, 1.6]]
S2 = [[0.35, 0.35], [0.25, 0.5], [0.5, 0.25]]
F64 = torch.float64


def beta_ref(t):
    return BETA_MIN + t * (BETA_MAX - BETA_MIN)


def abar_ref(t):
    return math.exp(-integrate.quad(beta_ref, 0.0, t, epsabs=1e-13, epsrel=1e-13)[0])


def marginal_params_ref(t, mu, s):
    """Means and stds of the components of p_t: sqrt(abar) mu and sqrt(abar s^2 + 1 - abar), as numpy arrays."""
    a = abar_ref(t)
    return math.sqrt(a) * np.asarray(mu), np.sqrt(a * np.asarray(s) ** 2 + 1.0 - a)


def cdf_ref(x, t=0.0):
    """CDF of the 1-D mixture p_t, with scipy."""
    m, sd = marginal_params_ref(t, MU1, S1)
    return sum(w * stats.norm.cdf(x, loc=mk, scale=sk) for w, mk, sk in zip(W1, m, sd))


def exact_samples_ref(n, seed, w, mu, s):
    """Exact draws from the mixture with numpy (not torch, not sde_toy)."""
    rng = np.random.default_rng(seed)
    k = rng.choice(len(w), size=n, p=w)
    mu, s = np.asarray(mu, float).reshape(len(w), -1), np.asarray(s, float).reshape(len(w), -1)
    return mu[k] + s[k] * rng.standard_normal((n, mu.shape[1]))


def log_density_ref(x, t, w, mu, s):
    """log p_t(x) for x: [N x D] via torch.distributions, differentiable in x."""
    a = abar_ref(t)
    mu, s = torch.tensor(mu, dtype=F64).reshape(len(w), -1), torch.tensor(s, dtype=F64).reshape(len(w), -1)
    comp = torch.distributions.Normal(math.sqrt(a) * mu, torch.sqrt(a * s ** 2 + 1.0 - a))
    log_comp = comp.log_prob(x[:, None, :]).sum(-1)                    # [N x K]
    return torch.logsumexp(torch.log(torch.tensor(w, dtype=F64)) + log_comp, dim=1)


@pytest.fixture(autouse=True)
def one_thread():
    """The particle tensors here are small (<= 20k numbers): torch's intra-op threads only add synchronisation,
    4-5x slower per step on the shared 2-core machine (13 ms vs 3 ms for a 10k-particle ODE step)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(dim):
    sde = sde_toy.VPSDE(BETA_MIN, BETA_MAX)
    p0 = sde_toy.GaussianMixture(W1, MU1, S1) if dim == 1 else sde_toy.GaussianMixture(W2, MU2, S2)
    return sde, p0, sde_toy.mixture_score(sde, p0)


# ---------------------------------------------------------------------------------------------------------------
# schedule and score

def test_abar_matches_quadrature_of_beta():
    sde = sde_toy.VPSDE()
    assert (sde.beta_min, sde.beta_max) == (BETA_MIN, BETA_MAX)  # the paper's defaults
    for t in (0.0, 1e-4, 0.05, 0.3, 0.5, 0.77, 0.999, 1.0):
        assert sde.beta(t) == pytest.approx(beta_ref(t), rel=1e-14)
        assert sde.abar(t) == pytest.approx(abar_ref(t), rel=1e-10)
    assert sde.abar(1.0) < 1e-4  # so p_1 is N(0, 1) up to means scaled by sqrt(abar(1)) ~ 0.0066


@pytest.mark.parametrize("dim", [1, 2])
def test_closed_form_score_matches_autograd(dim):
    sde, p0, score = make(dim)
    w, mu, s = (W1, MU1, S1) if dim == 1 else (W2, MU2, S2)
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([4 * torch.randn(200, dim, generator=gen, dtype=F64),
                   torch.full((2, dim), 40.0, dtype=F64), torch.full((2, dim), -40.0, dtype=F64)])  # far tails
    for t in (0.0, 1e-5, 1e-3, 0.1, 0.5, 0.9, 0.999, 1.0):
        xr = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(log_density_ref(xr, t, w, mu, s).sum(), xr)
        got = score(x, t)
        assert torch.isfinite(got).all(), f"non-finite score at t={t}"
        torch.testing.assert_close(got, grad, rtol=1e-9, atol=1e-9, msg=f"score mismatch at t={t}")
        # log p_t itself against the same reference
        torch.testing.assert_close(sde.marginal(p0, t).log_prob(x), log_density_ref(x, t, w, mu, s),
                                   rtol=1e-10, atol=1e-10)


def test_log_prob_and_cdf_match_scipy():
    sde, p0, _ = make(1)
    x = np.linspace(-5, 5, 101)
    for t in (0.0, 0.2, 1.0):
        m, sd = marginal_params_ref(t, MU1, S1)
        pdf = sum(wk * stats.norm.pdf(x, mk, sk) for wk, mk, sk in zip(W1, m, sd))
        pt = sde.marginal(p0, t)
        np.testing.assert_allclose(pt.log_prob(torch.tensor(x)[:, None]).exp().numpy(), pdf, rtol=1e-10)
        np.testing.assert_allclose(pt.cdf(torch.tensor(x)).numpy(), cdf_ref(x, t), rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------------
# samplers against the exact marginals

def _assert_mean_var(x, mean, var, n_se=5.0):
    """Sample mean and variance of 1-D x within n_se standard errors of the exact values."""
    n = len(x)
    assert abs(x.mean() - mean) < n_se * math.sqrt(var / n), f"mean {x.mean():.4f} vs exact {mean:.4f}"
    # se of the sample variance is sqrt((m4 - var^2) / n); m4 <= 5 var^2 covers these mixtures (kurtosis < 3)
    se_var = math.sqrt(4 * var ** 2 / n)
    assert abs(x.var() - var) < n_se * se_var, f"variance {x.var():.4f} vs exact {var:.4f}"


def _mixture_mean_var_ref(t):
    m, sd = marginal_params_ref(t, MU1, S1)
    w = np.asarray(W1)
    mean = (w * m).sum()
    return mean, (w * (sd ** 2 + m ** 2)).sum() - mean ** 2


@pytest.mark.parametrize("process", ["sde", "ode"])
def test_forward_marginals_match_closed_form(process):
    sde, p0, score = make(1)
    gen = torch.Generator().manual_seed(1)
    x = torch.tensor(exact_samples_ref(10000, 1, W1, MU1, S1))
    t_prev = 0.0
    for t in (0.1, 0.3, 1.0):  # continue the same particles from t_prev to t, |dt| = 1/1000
        steps = round(1000 * (t - t_prev))
        if process == "sde":
            x = sde_toy.forward_sde(x, sde, steps, t_start=t_prev, t_end=t, generator=gen)
        else:
            x = sde_toy.forward_ode(score, x, sde, steps, t_start=t_prev, t_end=t)
        t_prev = t
        xn = x[:, 0].numpy()
        p = stats.kstest(xn, lambda v: cdf_ref(v, t)).pvalue
        print(f"forward {process} at t={t}: KS p = {p:.3g} against the closed-form marginal")
        assert p > 0.01, f"forward {process} at t={t}: KS p={p:.3g} against the closed-form marginal"
        _assert_mean_var(xn, *_mixture_mean_var_ref(t))
    p = stats.kstest(x[:, 0].numpy(), stats.norm.cdf).pvalue  # t = 1 is N(0, 1)
    print(f"forward {process} at t=1: KS p = {p:.3g} against N(0, 1)")
    assert p > 0.01, f"forward {process} at t=1: KS p={p:.3g} against N(0, 1)"
    _assert_mean_var(x[:, 0].numpy(), 0.0, 1.0)


def _modes_1d(x):
    """Masses of the three modes, split at the midpoints between the means."""
    return np.array([(x < -0.75).mean(), ((x >= -0.75) & (x < 1.5)).mean(), (x >= 1.5).mean()])


@pytest.mark.parametrize("sampler", ["sde", "ode"])
def test_reverse_1d_samples_match_mixture(sampler):
    sde, p0, score = make(1)
    n = 10000
    gen = torch.Generator().manual_seed(2)
    x1 = torch.randn(n, 1, generator=gen, dtype=F64)  # start at N(0, 1), not at the exact p_1
    if sampler == "sde":
        x0 = sde_toy.reverse_sde(score, x1, sde, 400, generator=gen)[:, 0].numpy()
    else:
        x0 = sde_toy.reverse_ode(score, x1, sde, 400)[:, 0].numpy()
    exact = exact_samples_ref(n, 3, W1, MU1, S1)[:, 0]
    p_cdf = stats.kstest(x0, cdf_ref).pvalue
    p_two = stats.ks_2samp(x0, exact).pvalue
    print(f"reverse {sampler}: KS p (exact CDF) = {p_cdf:.3g}, KS p (vs exact samples) = {p_two:.3g}, "
          f"modes {np.round(_modes_1d(x0), 4)}")
    assert p_cdf > 0.01 and p_two > 0.01, f"reverse {sampler}: KS p={p_cdf:.3g} / {p_two:.3g}"
    # mode masses: the exact mass of each interval from the CDF, within 5 binomial standard errors
    exact_mass = np.diff(np.concatenate([[0.0], cdf_ref(np.array([-0.75, 1.5])), [1.0]]))
    np.testing.assert_allclose(_modes_1d(x0), exact_mass, atol=5 * math.sqrt(0.25 / n))
    _assert_mean_var(x0, *_mixture_mean_var_ref(0.0))


@pytest.mark.parametrize("sampler", ["sde", "ode"])
def test_reverse_2d_samples_match_mixture(sampler):
    sde, p0, score = make(2)
    n = 6000
    gen = torch.Generator().manual_seed(4)
    x1 = torch.randn(n, 2, generator=gen, dtype=F64)
    if sampler == "sde":
        x0 = sde_toy.reverse_sde(score, x1, sde, 300, generator=gen).numpy()
    else:
        x0 = sde_toy.reverse_ode(score, x1, sde, 300).numpy()
    w, mu, s = np.asarray(W2), np.asarray(MU2), np.asarray(S2)
    for d in range(2):  # each coordinate's marginal is a 1-D mixture with the exact CDF below
        p = stats.kstest(x0[:, d], lambda v: sum(w[k] * stats.norm.cdf(v, mu[k, d], s[k, d]) for k in range(3)))
        print(f"reverse {sampler} 2-D, coordinate {d}: KS p = {p.pvalue:.3g}")
        assert p.pvalue > 0.01, f"reverse {sampler} 2-D, coordinate {d}: KS p={p.pvalue:.3g}"

    def nearest_mode(x):  # most likely component under p_0, computed with scipy
        return np.argmax([np.log(w[k]) + stats.norm.logpdf(x, mu[k], s[k]).sum(1) for k in range(3)], 0)

    mass = np.bincount(nearest_mode(x0), minlength=3) / n
    exact = np.bincount(nearest_mode(exact_samples_ref(200000, 5, W2, MU2, S2)), minlength=3) / 200000
    print(f"reverse {sampler} 2-D: mode masses {np.round(mass, 4)}, exact {np.round(exact, 4)}")
    np.testing.assert_allclose(mass, exact, atol=5 * math.sqrt(0.25 / n))
    mean = (w[:, None] * mu).sum(0)
    cov = (w[:, None, None] * (np.einsum("kd,ke->kde", mu, mu) + np.apply_along_axis(np.diag, 1, s ** 2))).sum(0)
    cov -= np.outer(mean, mean)
    np.testing.assert_allclose(x0.mean(0), mean, atol=5 * math.sqrt(cov.diagonal().max() / n))
    np.testing.assert_allclose(np.cov(x0.T), cov, atol=0.08)


def test_forward_then_reverse_ode_returns_each_particle_sde_does_not():
    sde, p0, score = make(1)
    x0 = torch.tensor(exact_samples_ref(2000, 6, W1, MU1, S1))
    err = {}
    for steps in (500, 1000):
        x1 = sde_toy.forward_ode(score, x0, sde, steps)
        err[steps] = (sde_toy.reverse_ode(score, x1, sde, steps) - x0).abs()[:, 0]
    med, worst = err[1000].median().item(), err[1000].max().item()
    print(f"ODE round trip, 1000 steps: median |error| {med:.2e}, max {worst:.3f}")
    # every particle comes back; the worst ones start in the valleys between modes, where the backward flow
    # pulls neighbours apart and so magnifies the Euler error
    assert med < 1e-3 and worst < 0.2, f"ODE round trip: median error {med:.3g}, max {worst:.3g}"
    # what is left is Euler's O(dt) error: halving dt halves it
    ratio = med / err[500].median().item()
    assert 0.45 < ratio < 0.55, f"round-trip error ratio {ratio:.3f} when halving dt, expected ~0.5"
    gen = torch.Generator().manual_seed(7)
    x1 = sde_toy.forward_sde(x0, sde, 250, generator=gen)
    back = sde_toy.reverse_sde(score, x1, sde, 250, generator=gen)
    assert (back - x0).abs().median() > 0.5, "the SDE round trip should forget where each particle started"


def test_path_output_shapes_and_times():
    sde, p0, score = make(2)
    x = p0.sample(7, torch.Generator().manual_seed(0))
    ts, xs = sde_toy.reverse_ode(score, x, sde, 5, path=True)
    assert xs.shape == (6, 7, 2) and torch.equal(xs[0], x)
    torch.testing.assert_close(ts, torch.linspace(1, 0, 6, dtype=F64))
    ts, xs = sde_toy.forward_sde(x, sde, 4, path=True, generator=torch.Generator().manual_seed(0))
    assert xs.shape == (5, 7, 2)
    torch.testing.assert_close(ts, torch.linspace(0, 1, 5, dtype=F64))


# ---------------------------------------------------------------------------------------------------------------
# bad input and the CLI

def test_bad_input_raises_clear_errors():
    sde, p0, score = make(1)
    x = torch.zeros(4, 1, dtype=F64)
    for fn in (lambda s: sde_toy.forward_sde(x, sde, s), lambda s: sde_toy.reverse_sde(score, x, sde, s),
               lambda s: sde_toy.forward_ode(score, x, sde, s), lambda s: sde_toy.reverse_ode(score, x, sde, s)):
        for bad in (0, -3, 2.5):
            with pytest.raises(ValueError, match="steps must be an integer >= 1"):
                fn(bad)
    with pytest.raises(ValueError, match="must sum to 1"):
        sde_toy.GaussianMixture([0.5, 0.6], [0.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="weights must be positive"):
        sde_toy.GaussianMixture([1.5, -0.5], [0.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="stds must be finite and > 0"):
        sde_toy.GaussianMixture([0.5, 0.5], [0.0, 1.0], [1.0, -0.2])
    with pytest.raises(ValueError, match="stds must be finite and > 0"):
        sde_toy.GaussianMixture([0.5, 0.5], [0.0, 1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="means must have shape"):
        sde_toy.GaussianMixture([0.5, 0.5], [0.0, 1.0, 2.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="t must lie in"):
        score(x, 1.5)
    with pytest.raises(ValueError, match="need 0 <= t_start < t_end <= 1"):
        sde_toy.forward_sde(x, sde, 10, t_start=1.0, t_end=0.0)
    with pytest.raises(ValueError, match="need 1 >= t_start > t_end >= 0"):
        sde_toy.reverse_ode(score, x, sde, 10, t_start=0.0, t_end=1.0)
    with pytest.raises(ValueError, match=r"x must have shape \[N, 1\]"):
        score(torch.zeros(4, 2, dtype=F64), 0.5)
    with pytest.raises(ValueError, match="beta_min"):
        sde_toy.VPSDE(beta_min=-0.1)
    with pytest.raises(SystemExit):
        sde_toy.main(["--out", "unused", "--steps", "0"])
    with pytest.raises(SystemExit):
        sde_toy.main(["--out", "unused", "--particles", "0"])
    with pytest.raises(SystemExit):
        sde_toy.main(["--out", "unused", "--beta-min", "-1"])


@pytest.mark.parametrize("dim", [1, 2])
def test_cli_writes_png(tmp_path, capsys, dim):
    out = sde_toy.main(["--out", str(tmp_path), "--dim", str(dim), "--particles", "300", "--steps", "60"])
    with open(out, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in capsys.readouterr().out
