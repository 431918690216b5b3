"""Fixtures for the parity tests of fewstep.py's cm, scm and dmd2 against their authors' code (issue 46).

Each generator imports the authors' code from a local clone under --repos at run time, runs it on fixed inputs with
a tiny float64 network, and returns a plain dict (provenance, inputs, weights, outputs) that tests/test_official_
parity_cm.py reads. Nothing of the authors' code is copied here: their random draws are replaced (monkeypatched) by
the fixed inputs, and modules their code imports but these pieces never use (LPIPS, MPI, diffusers, FastGen's
trainer classes) are stubbed.

    python tools/official_fixtures.py --repos DIR [--only NAME ...]   (the entry point; this is the cm group)

Clones expected under --repos: consistency_models (openai/consistency_models), kinyugo_consistency_models
(Kinyugo/consistency_models: an iCT port; no official iCT code is public), FastGen (NVlabs/FastGen: sCM; no
official sCM code is public), DMD2 (tianweiy/DMD2).
"""
import contextlib
import importlib
import importlib.util
import sys
import types

import torch

COMMITS = {  # the commits these fixtures were generated from (the clones carry no .git)
    "openai/consistency_models": "e32b69ee436d518377db86fb2127a3972d0d8716",
    "Kinyugo/consistency_models": "2e6618d4b908f7ef7f5424d83afe0eb5c6c85957",
    "NVlabs/FastGen": "34f30e8ff1a563555fc0c7d59f1c1409dacd8af2",
    "tianweiy/DMD2": "8d8fa55633d47cfb81bbc7a892e7248f9518763f",
}
C, H, W = 2, 2, 2  # the tiny images: per-channel parameters, D = C H W = 8 pixels


def tiny_weights(seed):
    """The tiny net's float64 parameters, per channel: net(x, s) = tanh(a x + b s / scale + c) d + e x."""
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: lo + (hi - lo) * torch.rand(C, generator=g, dtype=torch.float64)  # noqa: E731
    return {"a": r(0.5, 1.2), "b": r(-1.5, 1.5), "c": r(-0.3, 0.3), "d": r(0.3, 0.6), "e": r(-0.3, 0.3)}


def tiny(w, x, s, scale):
    """The same function as the test's TinyNet: s is the time input the network sees, divided by scale."""
    p = {k: v.reshape(1, C, 1, 1) for k, v in w.items()}
    s = s.reshape(-1, 1, 1, 1) / scale
    return torch.tanh(p["a"] * x + p["b"] * s + p["c"]) * p["d"] + p["e"] * x


def leaf(w):
    return {k: v.clone().requires_grad_(True) for k, v in w.items()}


def stub(name, path=None, **attrs):
    """A module in sys.modules (a package when path is given) that skips its __init__'s imports."""
    m = types.ModuleType(name)
    if path is not None:
        m.__path__ = [str(path)]
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def patched(obj, **attrs):
    old = {k: getattr(obj, k) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


def queue(*tensors):
    """A replacement for a random draw that hands out the given tensors in order."""
    items = list(tensors)
    return lambda *args, **kwargs: items.pop(0).clone()


def provenance(repo, file, function, note):
    return {"repository": repo, "commit": COMMITS[repo], "file": file, "function": function, "note": note}


# ---- cm: openai/consistency_models (levels, scalings, CT pair, sampler) + Kinyugo's iCT port (N(k), p(i), lambda)
def cm(repos):
    torch.set_default_dtype(torch.float64)  # openai's linspace and index arithmetic in float64, not float32
    try:
        return _cm(repos)
    finally:
        torch.set_default_dtype(torch.float32)


def _cm(repos):
    openai_dir, ict_dir = repos / "consistency_models", repos / "kinyugo_consistency_models"
    stub("piq", LPIPS=None)
    stub("torchvision", path="")
    stub("torchvision.transforms", RandomCrop=None)
    stub("cm", path=openai_dir / "cm")
    stub("cm.dist_util", dev=lambda: "cpu")
    kd = importlib.import_module("cm.karras_diffusion")
    sys.path.insert(0, str(ict_dir))
    ict = importlib.import_module("consistency_models.consistency_models")

    # openai's network sees c_in x_sigma and 250 ln(sigma); fewstep's sees c_in x_sigma and 1000 t, t = 1 / (1 + sigma).
    # The tiny net is written in fewstep's input; openai's side maps its time input back to t (exact to rounding).
    w = tiny_weights(1)

    def openai_model(weights):
        def model(x_in, rescaled_t):
            sigma = torch.exp(rescaled_t / 250.0)
            return tiny(weights, x_in, 1000.0 / (1.0 + sigma), 1000.0)
        return model

    diffusion = kd.KarrasDenoiser(sigma_data=0.5, sigma_max=80.0, sigma_min=0.002, rho=7.0,
                                  weight_schedule="uniform", distillation=True, loss_norm="l2")
    # distillation=True: the boundary-condition scalings (c_skip = 1, c_out = 0 at sigma_min), which cm_train.py's
    # consistency training and distillation both use

    # the curriculum N(k) (Kinyugo's improved_timesteps_schedule), power-of-two ratios and not
    cases = []
    for s0, s1, K in ((10, 1280, 100_000), (2, 150, 100_000), (10, 150, 1000), (3, 100, 5000), (5, 1000, 20_000)):
        for k in sorted({0, 1, K // 7, K // 3, K // 2, 13_850 % K, K - 1, K, 2 * K} | {K * j // 9 for j in range(9)}):
            cases.append([s0, s1, K, k, int(ict.improved_timesteps_schedule(k, K, s0, s1))])

    # the loss at N = 41 (k = 25,000 of K = 100,000 with s0, s1 = 10, 1280)
    N = int(ict.improved_timesteps_schedule(25_000, 100_000, 10, 1280))
    g = torch.Generator().manual_seed(2)
    B = 8
    i = torch.tensor([0, 3, 10, 17, 25, 31, 38, 39])  # the lower level of each pair, ascending index (fewstep's)
    x1 = 0.8 * torch.tanh(torch.randn(B, C, H, W, generator=g, dtype=torch.float64))
    z = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    j = (N - 2 - i).to(torch.float64)  # openai's index counts down from sigma_max: j = N - 2 - i is the upper level

    denoised, inputs = [], []
    orig = diffusion.denoise

    def recording(model, x_t, sigmas, **kw):
        out = orig(model, x_t, sigmas, **kw)
        denoised.append(out[1])
        inputs.append((x_t.detach().clone(), sigmas.detach().clone()))
        return out

    lw = leaf(w)
    with patched(diffusion, denoise=recording), patched(kd.th, randint=queue(j)):
        diffusion.consistency_losses(openai_model(lw), x1, N, target_model=openai_model(lw), noise=z)
    pred, target = denoised  # f_theta(x_(sigma_(i+1))) with graph, sg f_theta(x_(sigma_i))
    (x_hi, sigma_hi), (x_lo, sigma_lo) = inputs

    ict_sigmas = ict.karras_schedule(N, 0.002, 80.0, 7.0)
    lam = ict.improved_loss_weighting(ict_sigmas)[i]
    # c of the iCT port's pseudo-Huber for this image size, read off its output at a difference of 1 per pixel:
    # h = sqrt(1 + c^2) - c  =>  c = (1 - h^2) / (2 h)
    h = ict.pseudo_huber_loss(torch.ones(1, C, H, W), torch.zeros(1, C, H, W)).flatten()[0]
    c = (1 - h ** 2) / (2 * h)
    # the iCT paper's loss: lambda(sigma_i) (sqrt(||f - sg f||^2 + c^2) - c), on the image's norm (the port applies
    # it per pixel; fewstep follows the paper)
    d = torch.sqrt(((pred - target) ** 2).flatten(1).sum(1) + c ** 2) - c
    loss = (lam * d).mean()
    grads = torch.autograd.grad(loss, list(lw.values()))

    # the level probabilities p(i) (captured from the port's multinomial call) and 20,000 of its draws
    captured = {}
    real_multinomial = torch.multinomial

    def capture(p, n, replacement=False, **kw):
        captured["p"] = p.clone()
        return real_multinomial(p, n, replacement=replacement, **kw)
    torch.manual_seed(0)
    with patched(torch, multinomial=capture):
        draws = ict.lognormal_timestep_distribution(20_000, ict_sigmas, -1.1, 2.0)

    # the multistep sampler (openai's stochastic_iterative_sampler through karras_sample, 40 Karras steps); fixed
    # noise: x_T = 80 z0 and one draw per re-noising
    sampler = {}
    for nfe, ts in ((1, (0, 39)), (2, (0, 22, 39)), (4, (0, 10, 20, 30, 39))):
        gs = torch.Generator().manual_seed(10 + nfe)
        noises = [torch.randn(4, C, H, W, generator=gs, dtype=torch.float64) for _ in range(len(ts))]
        gen = types.SimpleNamespace(randn=queue(noises[0]), randn_like=queue(*noises[1:]))
        with torch.no_grad():
            out = kd.karras_sample(diffusion, openai_model(w), (4, C, H, W), steps=40, clip_denoised=False,
                                   model_kwargs={}, device="cpu", sampler="multistep", ts=ts, generator=gen)
        levels = [(80.0 ** (1 / 7) + s / 39 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7 for s in ts]
        sampler[str(nfe)] = {"ts": list(ts), "sigmas": torch.tensor(levels), "noise": noises[0],
                             "renoise": torch.stack(noises[1:]), "output": out}

    return {
        "provenance": {
            "openai": provenance("openai/consistency_models", "cm/karras_diffusion.py",
                                 "KarrasDenoiser.consistency_losses, KarrasDenoiser.denoise, karras_sample, "
                                 "stochastic_iterative_sampler",
                                 "th.randint replaced by the fixed upper-level indices (float64, so that the levels "
                                 "are float64), denoise wrapped to record f and its inputs, the sampler's generator "
                                 "by fixed noise; distillation=True (boundary-condition scalings); target_model = "
                                 "model (iCT's theta^- = theta); clip_denoised=False (fewstep does not clamp the "
                                 "intermediate estimates; karras_sample still clamps its output); LPIPS, "
                                 "torchvision and MPI stubbed (unused)"),
            "ict": provenance("Kinyugo/consistency_models", "consistency_models/consistency_models.py",
                              "improved_timesteps_schedule, karras_schedule, lognormal_timestep_distribution, "
                              "improved_loss_weighting, pseudo_huber_loss",
                              "a PyTorch port of iCT (no official iCT code is public); torch.multinomial wrapped to "
                              "record p(i); the loss combines openai's f and sg f with the port's lambda and c on "
                              "the image norm as in the iCT paper (the port applies pseudo-Huber per pixel)"),
        },
        "weights": w,
        "curriculum": torch.tensor(cases),  # rows: s0, s1, K, k, N(k)
        "loss": {"N": N, "k": 25_000, "K": 100_000, "i": i, "x1": x1, "z": z,
                 "sigma_hi": sigma_hi, "sigma_lo": sigma_lo, "x_sigma_hi": x_hi, "x_sigma_lo": x_lo,
                 "pred": pred.detach(), "target": target.detach(), "lambda": lam, "huber_c": float(c),
                 "loss": loss.detach(), "grads": dict(zip(lw.keys(), grads)), "sigmas": ict_sigmas,
                 "openai_sigmas": kd.get_sigmas_karras(N, 0.002, 80.0, 7.0)},
        "levels": {"N": N, "p": captured["p"], "draws": draws.to(torch.int16)},
        "sampler": sampler,
    }


# ---- scm: NVlabs/FastGen's sCM (TrigFlow loss, tangent, JVP, adaptive weight) ---------------------------------------
def adaptive_logvar(w, tau):
    """The twin of fewstep's AdaptiveWeight (its parameterisation, not FastGen's, whose logvar is a head of the net):
    l(tau) = linear([cos(2^k tau), sin(2^k tau)]), k = 0..7, in float64."""
    arg = tau[:, None] * 2.0 ** torch.arange(8, dtype=torch.float64)
    return (torch.cat([torch.cos(arg), torch.sin(arg)], 1) @ w["weight"].T)[:, 0] + w["bias"]


def scm(repos):
    root = repos / "FastGen"
    sys.path.insert(0, str(root))
    stub("diffusers", DDIMScheduler=object, CogVideoXDPMScheduler=object)
    stub("fastgen", path=root / "fastgen")
    stub("fastgen.utils.basic_utils", PRECISION_MAP={"float64": torch.float64, "float32": torch.float32},
         convert_cfg_to_dict=dict)
    stub("fastgen.networks", path=root / "fastgen" / "networks")
    stub("fastgen.networks.network", FastGenNetwork=torch.nn.Module)
    stub("fastgen.methods", path=root / "fastgen" / "methods", CMModel=object)
    stub("fastgen.methods.consistency_model", path=root / "fastgen" / "methods" / "consistency_model")
    ns = importlib.import_module("fastgen.networks.noise_schedule")
    scm_mod = load("fastgen.methods.consistency_model.sCM",
                   root / "fastgen" / "methods" / "consistency_model" / "sCM.py")

    sd = 0.5
    w = tiny_weights(3)
    gw = torch.Generator().manual_seed(4)
    ww = {"weight": 0.3 * torch.randn(1, 16, generator=gw, dtype=torch.float64),
          "bias": 0.2 * torch.randn(1, generator=gw, dtype=torch.float64)}

    class TrigNet(torch.nn.Module):  # FastGen's F_theta(x_tau / sigma_d, tau): the tiny net sees tau (time_scale 1)
        def __init__(self, weights, logvar_weights):
            super().__init__()
            self.weights, self.logvar_weights = weights, logvar_weights
            self.noise_scheduler = ns.TrigNoiseSchedule()

        def forward(self, x_t_hat, t_hat, condition=None, return_logvar=False, return_x0_pred=False, **kw):
            F_theta = tiny(self.weights, x_t_hat / sd, t_hat, 1.0)
            out = (F_theta,)
            if return_logvar:
                out += (adaptive_logvar(self.logvar_weights, t_hat)[:, None],)
            if return_x0_pred:
                out += (torch.cos(t_hat).reshape(-1, 1, 1, 1) * x_t_hat
                        - torch.sin(t_hat).reshape(-1, 1, 1, 1) * sd * F_theta,)
            return out if len(out) > 1 else out[0]

    def model(weights, logvar_weights):
        m = scm_mod.SCMModel.__new__(scm_mod.SCMModel)
        m.config = types.SimpleNamespace(guidance_scale=None, skip_layers=None)
        m.sample_t_cfg = types.SimpleNamespace(quantize=False, sigma_data=sd)
        m.loss_config = types.SimpleNamespace(use_cd=False, tangent_warmup_steps=10_000, tangent_warmup_const=0.1,
                                              prior_weighting_enabled=True, g_norm_spatial_invariance=True,
                                              divide_x_0_spatial_dim=False, use_jvp_finite_diff=False)
        m.sigma_data, m.precision_amp_jvp, m.device = sd, None, torch.device("cpu")
        m.net = types.SimpleNamespace(noise_scheduler=ns.EDMNoiseSchedule())
        m.net_trigflow = TrigNet(weights, logvar_weights)
        return m

    g = torch.Generator().manual_seed(5)
    B = 8
    x1 = 0.8 * torch.tanh(torch.randn(B, C, H, W, generator=g, dtype=torch.float64))
    x0 = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)  # fewstep's x0; FastGen's z = sigma_d x0
    sigma = torch.tensor([0.003, 0.02, 0.1, 0.3, 0.7, 1.5, 6.0, 60.0], dtype=torch.float64)  # EDM sigma = sd tan(tau)
    cases = {}
    for iteration in (4000, 10 ** 6):  # r = 0.4 (tangent warm-up) and r = 1
        lw, lv = leaf(w), leaf(ww)
        m = model(lw, lv)
        recorded = {}
        real_jvp, real_norm = m._jvp, torch.linalg.vector_norm

        def jvp(*args, **kw):
            recorded["F_jvp"] = real_jvp(*args, **kw)
            return recorded["F_jvp"]

        def norm(g_, *args, **kw):
            recorded["g"] = g_.detach().clone()  # the tangent before its normalisation
            return real_norm(g_, *args, **kw)
        m._jvp = jvp
        with patched(torch, randn_like=queue(x0)), patched(torch.linalg, vector_norm=norm):
            loss_i, mse, logvar, _, r = m._compute_scm_loss(x1, sigma.clone(), iteration=iteration)
        loss = loss_i.mean()
        grads = torch.autograd.grad(loss, list(lw.values()) + list(lv.values()))
        cases[str(iteration)] = {"iteration": iteration, "r": float(r), "loss_per_sample": loss_i.detach(),
                                 "mse": mse.detach(), "logvar": logvar.detach()[:, 0], "loss": loss.detach(),
                                 "F_jvp": recorded["F_jvp"].detach(), "g": recorded["g"],
                                 "grads": dict(zip(lw.keys(), grads[:len(lw)])),
                                 "logvar_grads": dict(zip(lv.keys(), grads[len(lw):]))}

    es = ns.EDMNoiseSchedule()
    torch.manual_seed(0)
    draws = es.sample_t(20_000, time_dist_type="lognormal", train_p_mean=-1.0, train_p_std=1.4)
    tau_draws = torch.atan2(es.sigma(draws), es.alpha(draws) * sd)  # as _compute_scm_loss converts them
    return {
        "provenance": provenance("NVlabs/FastGen", "fastgen/methods/consistency_model/sCM.py",
                                 "SCMModel._compute_scm_loss, SCMModel._jvp, SCMModel._scm_pred_to_loss; "
                                 "fastgen/networks/noise_schedule.py EDMNoiseSchedule.sample_t",
                                 "FastGen stands in for the sCM authors' code (none is public). SCMModel built "
                                 "without its trainer base class (stubbed), its EDM-to-TrigFlow wrapper replaced by "
                                 "the tiny net seen as F(x_tau / sigma_d, tau), its logvar head by fewstep's "
                                 "AdaptiveWeight form; torch.randn_like replaced by the fixed noise; _jvp and "
                                 "torch.linalg.vector_norm wrapped to record F_jvp and the tangent; "
                                 "divide_x_0_spatial_dim=False (FastGen's default True divides the weighted term by D "
                                 "once more); the rest FastGen's sCT defaults (config_scm.py)"),
        "weights": w, "logvar_weights": ww, "sigma_data": sd,
        "inputs": {"x1": x1, "x0": x0, "sigma": sigma, "tau": torch.atan2(sigma, torch.full_like(sigma, sd))},
        "cases": cases,
        "times": {"p_mean": -1.0, "p_std": 1.4, "tau_draws": tau_draws.float()},
    }


# ---- dmd2: tianweiy/DMD2 (the distribution-matching gradient and the fake-score loss, EDM ImageNet code) -----------
def dmd2(repos):
    root = repos / "DMD2"
    sys.path.insert(0, str(root))
    stub("main", path=root / "main")
    stub("main.edm", path=root / "main" / "edm")
    stub("main.edm.edm_network", get_edm_network=None)  # the EDM U-Net is replaced by the tiny net
    stub("dnnlib", util=None)
    eg = load("main.edm.edm_guidance", root / "main" / "edm" / "edm_guidance.py")

    # DMD2's networks are EDM denoisers D(x_sigma, sigma); fewstep's are flow velocities v(x_t, 1000 t). The tiny net
    # is a velocity; the authors' side sees it as a denoiser through the exact map t = 1 / (1 + sigma),
    # x_t = t x_sigma, D = x_t + (1 - t) v(x_t, 1000 t).
    w_real, w_fake = tiny_weights(6), tiny_weights(7)

    def edm_denoiser(weights):
        def D(x_sigma, sigma, labels=None):
            t = (1.0 / (1.0 + sigma)).reshape(-1, 1, 1, 1)
            x_t = t * x_sigma
            return x_t + (1 - t) * tiny(weights, x_t, 1000.0 * t.flatten(), 1000.0)
        return D

    guidance = eg.EDMGuidance.__new__(eg.EDMGuidance)
    torch.nn.Module.__init__(guidance)
    guidance.real_unet, guidance.fake_unet = edm_denoiser(w_real), edm_denoiser(w_fake)
    guidance.sigma_data, guidance.sigma_max, guidance.sigma_min, guidance.rho = 0.5, 80.0, 0.002, 7.0
    guidance.num_train_timesteps = 1000
    guidance.karras_sigmas = torch.flip(eg.get_sigmas_karras(1000, sigma_max=80.0, sigma_min=0.002, rho=7.0),
                                        dims=[0]).double()
    guidance.min_step, guidance.max_step = int(0.02 * 1000), int(0.98 * 1000)  # train_edm.py's defaults

    g = torch.Generator().manual_seed(8)
    B = 8
    x_hat = 0.8 * torch.tanh(torch.randn(B, C, H, W, generator=g, dtype=torch.float64))
    noise = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    steps = torch.tensor([20, 80, 200, 400, 600, 800, 950, 980]).reshape(B, 1, 1, 1)

    latents = x_hat.clone().requires_grad_(True)
    with patched(torch, randint=queue(steps), randn_like=queue(noise)):
        losses, log = guidance.compute_distribution_matching_loss(latents, None)
    (latents_grad,) = torch.autograd.grad(losses["loss_dm"], latents)
    dm = {"steps": steps.flatten(), "sigma": guidance.karras_sigmas[steps.flatten()], "noise": noise,
          "x_hat": x_hat, "pred_real": log["dmtrain_pred_real_image"], "pred_fake": log["dmtrain_pred_fake_image"],
          "grad": log["dmtrain_grad"], "loss": losses["loss_dm"].detach(), "x_hat_grad": latents_grad}

    fake_steps = torch.tensor([0, 5, 100, 300, 500, 700, 900, 999]).reshape(B, 1, 1, 1)
    lw = leaf(w_fake)
    guidance.fake_unet = edm_denoiser(lw)
    with patched(torch, randint=queue(fake_steps), randn_like=queue(noise)):
        losses, log = guidance.compute_loss_fake(x_hat, None)
    fake = {"steps": fake_steps.flatten(), "sigma": guidance.karras_sigmas[fake_steps.flatten()], "noise": noise,
            "x_hat": x_hat, "x0_pred": log["faketrain_x0_pred"].detach(), "loss": losses["loss_fake_mean"].detach()}

    torch.manual_seed(0)
    dm_times = 1 / (1 + guidance.karras_sigmas[torch.randint(guidance.min_step, guidance.max_step + 1, (20_000,))])
    fake_times = 1 / (1 + guidance.karras_sigmas[torch.randint(0, 1000, (20_000,))])
    return {
        "provenance": provenance("tianweiy/DMD2", "main/edm/edm_guidance.py",
                                 "EDMGuidance.compute_distribution_matching_loss, EDMGuidance.compute_loss_fake",
                                 "EDMGuidance built without its checkpoint (__new__): real and fake U-Nets replaced by "
                                 "the tiny velocity net seen as an EDM denoiser (t = 1 / (1 + sigma), x_t = t "
                                 "x_sigma); torch.randint and torch.randn_like replaced by the fixed levels and noise; "
                                 "min/max_step from train_edm.py's defaults (0.02, 0.98 of 1000 levels)"),
        "weights_real": w_real, "weights_fake": w_fake, "sigma_data": 0.5,
        "dm": dm, "fake": fake,
        "times": {"dm": dm_times.float(), "fake": fake_times.float()},
    }


GENERATORS = {"cm": cm, "scm": scm, "dmd2": dmd2}
