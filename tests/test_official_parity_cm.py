"""Parity of fewstep.py's cm, scm and dmd2 with their authors' code (issue 46), on fixtures that the authors' code
wrote (tools/official_fixtures_cm.py; provenance in each file): the same tiny float64 network, batch, noise and
levels on both sides, compared after mapping the conventions (EDM's sigma = (1 - t) / t and x_sigma = x_t / t;
TrigFlow's sigma_d tan(tau) = sigma).

- cm: openai/consistency_models (Karras levels, c_skip / c_out / c_in, the CT pair on one noise draw, the multistep
  sampler) and Kinyugo/consistency_models, a PyTorch iCT port (no official iCT code is public): N(k), p(i), lambda,
  pseudo-Huber's c. The iCT loss is the paper's, on the image norm (the port applies pseudo-Huber per pixel).
- scm: NVlabs/FastGen's sCM (no official sCM code is public): the JVP, the tangent, the loss and its gradients
  (network and adaptive weight), the time law. Not compared: the sampler (FastGen samples through its EDM
  denoiser's generic multistep loop, not TrigFlow's Alg. 1; the toy tests in test_fewstep_scm_dmd2.py cover ours).
- dmd2: tianweiy/DMD2's EDM code: the distribution-matching gradient, its loss and the gradient it sends into the
  generator's sample, the fake score's per-sample target and weight. Not compared: the times (a named deviation:
  the authors draw EDM's Karras levels 20..980 of 1000, we draw t uniform on [t_min, t_max]; checked here against
  those two laws) and the sampler (the authors' ImageNet generator is one call at sigma = 80; ours one call at t = 0).
fewstep computes some pieces in float32 on purpose (losses under autocast): those are compared to a float32 bound;
the rest agrees in float64 to 1e-10.
"""
import contextlib
import math
import pathlib

import pytest
import scipy.stats
import torch
import torch.nn as nn

import fewstep

DATA = pathlib.Path(__file__).resolve().parent / "data" / "official"
F32 = dict(rtol=2e-5, atol=1e-7)  # a float32 computation against float64 numbers


def fixture(name):
    path = DATA / f"{name}.pt"
    assert path.exists(), f"missing fixture {path}: run tools/official_fixtures.py --repos DIR"
    return torch.load(path, weights_only=True)


class TinyNet(nn.Module):
    """net(x, s) = tanh(a x + b s / scale + c) d + e x with per-channel float64 parameters (the generator's twin)."""

    def __init__(self, weights, scale):
        super().__init__()
        self.scale = scale
        for k, v in weights.items():
            setattr(self, k, nn.Parameter(v.clone()))

    def forward(self, x, s, cond=None):
        p = lambda v: v.reshape(1, -1, 1, 1)  # noqa: E731
        s = s.reshape(-1, 1, 1, 1).to(x.dtype) / self.scale
        return torch.tanh(p(self.a) * x + p(self.b) * s + p(self.c)) * p(self.d) + p(self.e) * x


@contextlib.contextmanager
def replaced(obj, name, fn):
    old = getattr(obj, name)
    setattr(obj, name, fn)
    try:
        yield
    finally:
        setattr(obj, name, old)


def close(a, b, **tol):
    torch.testing.assert_close(a.double(), b.double(), **(tol or dict(rtol=1e-10, atol=1e-12)))


# ---- cm ------------------------------------------------------------------------------------------------------------
def ict_num_scales(s0, s1, K, k):
    """iCT's N(k), computed here: K' = floor(K / (log2 floor(s1 / s0) + 1)), N = min(s0 2^floor(k / K'), s1) + 1."""
    k_prime = math.floor(K / (math.log2(s1 // s0) + 1))
    return min(s0 * 2 ** (k // k_prime), s1) + 1


def test_cm_curriculum_is_icts_with_the_real_log2():
    """N(k) against the iCT port at power-of-two ratios and not (5 at s0 = 2, s1 = 150, K = 100k, k = 13,850: a
    floored log2 gives 3), and against the closed form on a grid of k."""
    rows = fixture("cm")["curriculum"].tolist()
    assert [2, 150, 100_000, 13_850, 5] in rows
    for s0, s1, K, k, n in rows:
        assert fewstep.ConsistencyModel(s0=s0, s1=s1, total_steps=K).num_scales(k) == n, (s0, s1, K, k)
    for s0, s1, K in ((2, 150, 100_000), (10, 150, 1000), (3, 100, 5000), (7, 1280, 3333)):
        method = fewstep.ConsistencyModel(s0=s0, s1=s1, total_steps=K)
        assert [method.num_scales(k) for k in range(0, 2 * K, 97)] == \
            [ict_num_scales(s0, s1, K, k) for k in range(0, 2 * K, 97)]


def cm_loss(method, net, f, record=None):
    """fewstep's loss on the fixture's batch, its level draw replaced by the fixture's levels (record: p(i))."""
    loss = f["loss"]

    def levels(p, n, replacement=False):
        if record is not None:
            record.append(p.clone())
        return loss["i"].clone()
    method.training_step = loss["k"]
    with replaced(torch, "multinomial", levels):
        return method.loss(net, loss["x1"], x0=loss["z"])


def test_cm_levels_consistency_function_target_loss_and_gradients_match_openai_and_ict():
    """Levels (openai's and the port's), f at the upper level and sg f at the CT point of the same noise (float64),
    then fewstep's loss (lambda, pseudo-Huber on the norm; float32) and its gradients, stop-gradient included."""
    f = fixture("cm")
    loss, N = f["loss"], f["loss"]["N"]
    method = fewstep.ConsistencyModel(total_steps=loss["K"])
    assert method.num_scales(loss["k"]) == N
    sig = fewstep.karras_sigmas(N, 0.002, 80.0, 7.0)
    close(sig, loss["sigmas"])
    close(sig, loss["openai_sigmas"][:-1].flip(0))  # openai: descending, a 0 appended
    i = loss["i"]
    close(sig[i], loss["sigma_lo"])
    close(sig[i + 1], loss["sigma_hi"])
    net = TinyNet(f["weights"], 1000.0)
    t_hi, t_lo = fewstep.sigma_to_t(sig[i + 1]), fewstep.sigma_to_t(sig[i])
    x_hi = fewstep.interpolate(loss["z"], loss["x1"], t_hi)
    close(x_hi / fewstep.expand_t(t_hi, x_hi), loss["x_sigma_hi"])
    x_lo = method.target_point(x_hi, loss["x1"], loss["z"], t_hi, t_lo)
    close(x_lo / fewstep.expand_t(t_lo, x_lo), loss["x_sigma_lo"])
    with torch.no_grad():
        close(method.consistency_fn(net, x_hi, sig[i + 1]), loss["pred"])
        close(method.consistency_fn(net, x_lo, sig[i]), loss["target"])
    value = cm_loss(method, net, f)
    close(value, loss["loss"], **F32)
    value.backward()
    for k, g in loss["grads"].items():
        close(getattr(net, k).grad, g, rtol=1e-4, atol=1e-6)


def test_cm_level_probabilities_and_draws_match_the_ict_port():
    """p(i) from the lognormal CDF at the level edges (fewstep casts to float32), and a two-sample KS test of 20,000
    draws from fewstep's p(i) against the port's 20,000."""
    f = fixture("cm")
    method, record = fewstep.ConsistencyModel(total_steps=f["loss"]["K"]), []
    cm_loss(method, TinyNet(f["weights"], 1000.0), f, record)
    p = record[0].double()
    close(p / p.sum(), f["levels"]["p"] / f["levels"]["p"].sum(), rtol=1e-5, atol=1e-8)
    ours = torch.multinomial(record[0], 20_000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert scipy.stats.ks_2samp(ours.numpy(), f["levels"]["draws"].numpy()).pvalue > 1e-3


@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_cm_multistep_sampler_matches_openai_on_fixed_noise(nfe):
    """openai's stochastic_iterative_sampler (40 Karras steps, levels ts) against fewstep's sample() at the same
    levels (its `times`, t = 1 / (1 + sigma)), the same noise; both outputs clamped to [-1, 1] at the end (openai's
    karras_sample; trainer.py for fewstep), neither in between (a named deviation)."""
    s = fixture("cm")["sampler"][str(nfe)]
    times = {nfe: [1 / (1 + x) for x in s["sigmas"][1:-1].tolist()]} if nfe > 1 else None
    method = fewstep.ConsistencyModel(times=times)
    draws = list(s["renoise"])
    with replaced(torch, "randn_like", lambda x, **kw: draws.pop(0).clone()), torch.no_grad():
        out = method.sample(TinyNet(fixture("cm")["weights"], 1000.0), s["noise"], nfe)
    assert len(draws) == 1  # openai's last draw re-noises to sigma_min with zero weight
    assert 0.5 < (out.abs() < 1).double().mean()  # mostly inside the clamp: the comparison sees the values
    close(out.clamp(-1, 1), s["output"], rtol=1e-10, atol=1e-9)  # openai's last step to sigma_min adds its draw
    # times sqrt(sigma^2 - sigma_min^2) with sigma = sigma_min up to rounding: 1e-10, not 0


# ---- scm -----------------------------------------------------------------------------------------------------------
class Recorder:
    """A stand-in for the adaptive weight's Adam: keeps the gradients it is asked to step with."""

    def __init__(self, params):
        self.params, self.grads = list(params), None

    def step(self):
        self.grads = [p.grad.clone() for p in self.params]


def scm_method(f, case):
    method = fewstep.ContinuousConsistency(sigma_data=f["sigma_data"])
    method.training_step = case["iteration"]
    method.weighting = fewstep.AdaptiveWeight()
    method.weighting.load_state_dict({"freqs": method.weighting.freqs, "linear.weight": f["logvar_weights"]["weight"],
                                      "linear.bias": f["logvar_weights"]["bias"]})
    method.weight_opt = Recorder(method.weighting.parameters())
    return method


def scm_tau_noise(method, f):
    """fewstep draws tau = atan(exp(p_mean + p_std n) / sigma_d): the n that gives the fixture's sigma."""
    return (torch.log(f["inputs"]["sigma"]) - method.p_mean) / method.p_std


@pytest.mark.parametrize("iteration", ["4000", "1000000"])
def test_scm_jvp_tangent_loss_and_gradients_match_fastgen(iteration):
    """At r = 0.4 (tangent warm-up) and r = 1: the JVP and the tangent before normalisation (float64), the loss with
    the prior and adaptive weights and its gradients in the network and in l(tau) (fewstep: float32)."""
    f = fixture("scm")
    case, inp = f["cases"][iteration], f["inputs"]
    method, net = scm_method(f, case), TinyNet(f["weights"], 1.0)
    sd, tau = f["sigma_data"], inp["tau"]
    c, s = fewstep.expand_t(torch.cos(tau), inp["x1"]), fewstep.expand_t(torch.sin(tau), inp["x1"])
    z = sd * inp["x0"]
    x_tau, dxdt = c * inp["x1"] + s * z, c * z - s * inp["x1"]
    F_minus, F_jvp = method.derivative(net, x_tau, tau, dxdt)
    close(F_jvp, case["F_jvp"])
    r = min(1.0, case["iteration"] / method.warmup_steps)
    assert r == case["r"]
    close(method.tangent(x_tau, tau, dxdt, F_minus.detach(), F_jvp, r), case["g"])
    with replaced(torch, "randn", lambda *a, **kw: scm_tau_noise(method, f)):
        loss = method.loss(net, inp["x1"], x0=inp["x0"])
    close(loss, case["loss"], **F32)
    loss.backward()
    for k, g in case["grads"].items():
        close(getattr(net, k).grad, g, rtol=1e-4, atol=1e-6)
    for mine, theirs in zip(method.weight_opt.grads, (case["logvar_grads"]["weight"], case["logvar_grads"]["bias"])):
        close(mine, theirs, rtol=1e-4, atol=1e-6)


def test_scm_prior_weighted_loss_without_the_adaptive_weight_matches_fastgens_unweighted_loss():
    """FastGen's per-sample mean of (F - F^- - g / (rms(g) + c))^2 with its weight 1 / sigma: fewstep's loss with
    the adaptive weight off."""
    f = fixture("scm")
    case = f["cases"]["1000000"]
    method = fewstep.ContinuousConsistency(sigma_data=f["sigma_data"], adaptive=False)
    method.training_step = case["iteration"]
    with replaced(torch, "randn", lambda *a, **kw: scm_tau_noise(method, f)):
        loss = method.loss(TinyNet(f["weights"], 1.0), f["inputs"]["x1"], x0=f["inputs"]["x0"])
    close(loss, (case["mse"] / f["inputs"]["sigma"]).mean(), **F32)


def test_scm_time_law_matches_fastgen():
    """tau = atan(sigma / sigma_d), sigma lognormal(-1, 1.4): a two-sample KS test of 20,000 of fewstep's taus (read
    off its network calls) against FastGen's (which truncates sigma to [0.002, 80], a 2e-4 share)."""
    f = fixture("scm")
    method = fewstep.ContinuousConsistency(sigma_data=f["sigma_data"], adaptive=False)
    taus, real_F = [], method.F

    def F(net, x, tau):
        taus.append(tau.detach().clone())
        return real_F(net, x, tau)
    method.F = F
    torch.manual_seed(0)
    method.loss(TinyNet(fixture("scm")["weights"], 1.0), torch.zeros(20_000, 2, 1, 1, dtype=torch.float64))
    assert scipy.stats.ks_2samp(taus[0].numpy(), f["times"]["tau_draws"].numpy()).pvalue > 1e-3


# ---- dmd2 ----------------------------------------------------------------------------------------------------------
def dmd2_method(f):
    method = fewstep.DMD2(gan_weight=0.0)
    method.teacher, method.fake = TinyNet(f["weights_real"], 1000.0), TinyNet(f["weights_fake"], 1000.0)
    method.fake_opt = 0  # built: networks() keeps these
    return method


def fixed_renoise(part, rows=slice(None)):
    """fewstep's renoise with the fixture's levels (t = 1 / (1 + sigma)) and noise."""
    t, n = (1 / (1 + part["sigma"]))[rows], part["noise"][rows]
    return lambda x: (fewstep.interpolate(n, x, t), t, n)


def test_dmd2_distribution_matching_gradient_matches_the_authors():
    """The two denoisers at the re-noised sample (float64), the gradient (D_fake - D_real) / mean|x - D_real| and the
    loss and gradient it sends into x_hat (fewstep: float32). The normaliser: theirs has no epsilon (nan_to_num
    after), ours + 1e-6; the comparison rescales theirs by m / (m + 1e-6)."""
    f = fixture("dmd2")
    dm, method = f["dm"], dmd2_method(f)
    x_t, t, _ = fixed_renoise(dm)(dm["x_hat"])
    with torch.no_grad():
        close(method.denoise(method.teacher, x_t, t), dm["pred_real"])
        close(method.denoise(method.fake, x_t, t), dm["pred_fake"])
    m = (dm["x_hat"] - dm["pred_real"]).abs().flatten(1).mean(1)
    eps = fewstep.expand_t(m / (m + 1e-6), dm["x_hat"])
    x_hat = dm["x_hat"].clone().requires_grad_(True)
    with replaced(method, "renoise", fixed_renoise(dm)):
        loss = method.generator_loss(None, x_hat)
    loss.backward()
    close(loss, dm["loss"] * (eps.flatten(1)[:, 0] ** 2 * (dm["grad"] ** 2).flatten(1).mean(1)).sum() /
          (dm["grad"] ** 2).flatten(1).mean(1).sum(), **F32)
    expected = dm["x_hat_grad"] * eps  # D_fake - D_real cancels in float32: an absolute bound at the gradient's scale
    close(x_hat.grad, expected, rtol=2e-5, atol=1e-5 * expected.abs().max().item())


def test_dmd2_fake_score_target_and_weight():
    """Per sample: fewstep's flow-matching error times (1 - t)^2 is the authors' x0 error (the same residual, D -
    x_hat = (1 - t)(v - (x_hat - n))); their weight is EDM's 1 / sigma^2 + 1 / sigma_d^2 (checked on their loss),
    ours 1 / (1 - t)^2 (a named deviation: the fake score keeps the teacher's own loss)."""
    f = fixture("dmd2")
    fk, method = f["fake"], dmd2_method(f)
    x0_err = ((fk["x0_pred"] - fk["x_hat"]) ** 2).flatten(1).mean(1)
    weight = 1 / fk["sigma"] ** 2 + 1 / f["sigma_data"] ** 2
    close((weight * x0_err).mean(), fk["loss"])
    for b in range(len(x0_err)):
        with replaced(method, "renoise", fixed_renoise(fk, slice(b, b + 1))):
            mine = method.fake_loss(method.fake, None, fk["x_hat"][b:b + 1], None)
        t = 1 / (1 + fk["sigma"][b])
        close(mine * (1 - t) ** 2, x0_err[b], **F32)


def test_dmd2_time_laws_are_the_documented_ones():
    """The authors' distribution-matching times are t = 1 / (1 + sigma_k), k uniform on 20..980 of EDM's 1000 Karras
    levels (ascending), their fake-score times k on 0..999; fewstep's are uniform on [t_min, t_max] (a named
    deviation), and the two laws differ."""
    f = fixture("dmd2")
    ramp = torch.linspace(0, 1, 1000, dtype=torch.float64)
    levels = (80.0 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7  # Karras, descending
    levels = levels.flip(0)
    g = torch.Generator().manual_seed(1)
    law = lambda lo, hi: (1 / (1 + levels[torch.randint(lo, hi + 1, (20_000,), generator=g)])).numpy()  # noqa: E731
    assert scipy.stats.ks_2samp(f["times"]["dm"].numpy(), law(20, 980)).pvalue > 1e-3
    assert scipy.stats.ks_2samp(f["times"]["fake"].numpy(), law(0, 999)).pvalue > 1e-3
    method = fewstep.DMD2()
    torch.manual_seed(0)
    _, t, _ = method.renoise(torch.zeros(20_000, 1))
    assert scipy.stats.kstest(t.numpy(), scipy.stats.uniform(method.t_min, method.t_max - method.t_min).cdf).pvalue \
        > 1e-3
    assert scipy.stats.ks_2samp(t.numpy(), f["times"]["dm"].numpy()).pvalue < 1e-3
