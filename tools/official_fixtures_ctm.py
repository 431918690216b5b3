"""Fixtures for the parity tests of fewstep.py's ctm, pd and ld3 against their authors' code (issue 46).

Each generator imports the authors' code from a local clone under --repos at run time, runs it on fixed inputs
with a tiny float64 network and returns a plain dict (provenance, inputs, weights, outputs) that the tests in
tests/test_official_parity_ctm.py read. No line of the authors' code is copied here: what is written below is
the tiny network, the maps between conventions and the calls.

    --repos DIR   holds ctm (github.com/sony/ctm), LD3 (github.com/vinhsuhi/LD3) and google-research-dd (the
                  diffusion_distillation package of github.com/google-research/google-research: dpm.py, utils.py
                  and an empty __init__.py); a checkout without .git names its commit in a file COMMIT
    (run through tools/official_fixtures.py --repos DIR [--only NAME ...], the entry point; this is the ctm group)
The authors' code needs torch, numpy, jax (float64 enabled here), flax and absl, in a scratch environment; the
modules it imports but these functions never call (blobfile, torchvision, lpips, PIL, ...) are stubbed.

Conventions. fewstep.py: t in [0, 1], t = 0 noise, x_t = (1 - t) x0 + t x1, a flow network v(x_t, 1000 t).
sony/ctm: EDM's sigma = (1 - t) / t on x_sigma = x_t / t, network time 250 log(sigma). LD3: its solvers run a
schedule's time tau from noise to data; the flow is written in tau = 1 - t. diffusion_distillation: variance
preserving z = alpha x + sigma eps with logsnr = 2 log(t / (1 - t)) and z = x_t / sqrt(t^2 + (1 - t)^2).
"""
import contextlib
import math
import pathlib
import subprocess
import sys
import tempfile
import types

import numpy as np
import torch

CHANNELS = 3


class TinyNet(torch.nn.Module):
    """out = tanh(a x + b T + c S) d + e x per channel (T, S: the network's time inputs, 1000 t and 1000 s here)."""

    def __init__(self, seed, channels=CHANNELS):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        r = lambda scale, shift=0.0: torch.nn.Parameter(  # noqa: E731
            shift + scale * torch.randn(channels, 1, 1, generator=g, dtype=torch.float64))
        self.a, self.b, self.c, self.d, self.e = r(0.5, 0.8), r(1e-3, 1e-3), r(1e-3), r(0.5, 1.0), r(0.3)

    def forward(self, x, T, cond=None):
        T = T.to(x.dtype).reshape(-1, 1, 1, 1)
        S = torch.zeros_like(T) if cond is None else cond.to(x.dtype).reshape(-1, 1, 1, 1)
        return torch.tanh(self.a * x + self.b * T + self.c * S) * self.d + self.e * x


def git_commit(path):  # a clone's HEAD, or the file COMMIT of a checkout without .git
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return (pathlib.Path(path) / "COMMIT").read_text().strip()


def stub_modules(**modules):
    """Stand-ins for modules the authors' files import but the functions used here never call."""
    for name, attrs in modules.items():
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules.setdefault(name, m)


@contextlib.contextmanager
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def state(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------
# ctm: sony/ctm, code/cm/karras_diffusion.py (KarrasDenoiser), code/cm/resample.py, code/cm/sample_util.py
# ---------------------------------------------------------------------------------------------------------------
SIGMA_DATA, SIGMA_MIN, SIGMA_MAX, RHO, N_SCALES, HEUN_STEPS = 0.5, 0.002, 80.0, 7.0, 18, 17


def import_ctm(repos):
    code = pathlib.Path(repos) / "ctm" / "code"
    sys.path.insert(0, str(code))
    stub_modules(**{"blobfile": {}, "torchvision": {}, "torchvision.utils": {"make_grid": None, "save_image": None},
                    "cm.enc_dec_lib": {"get_xl_feature": None, "gaussian_blur": None,
                                       "get_classifier_guidance": None, "vpsde": None}})
    import cm.script_util  # noqa: F401  (first: karras_diffusion and script_util import each other)
    import cm.karras_diffusion as kd
    import cm.resample as resample
    import cm.sample_util as sample_util
    return code.parent, kd, resample, sample_util


class EDMFromFlow(torch.nn.Module):
    """A fewstep.py network seen as sony/ctm's model: it is called with (c_in(sigma) x_sigma, 250 log sigma,
    s = 250 log sigma_s) and returns F with EDM's c_skip x_sigma + c_out F = g, the data estimate. Here g =
    x_t + (1 - t) net(x_t, 1000 t[, 1000 s]) on x_t = t x_sigma, t = 1 / (1 + sigma) (the teacher: s = None)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x_in, rescaled_t, s=None, teacher=False, **kwargs):
        sigma = torch.exp(rescaled_t / 250.0)
        sig = sigma.reshape(-1, 1, 1, 1)
        x_sigma = x_in * torch.sqrt(sig ** 2 + SIGMA_DATA ** 2)
        t = 1.0 / (1.0 + sigma)
        x_t = t.reshape(-1, 1, 1, 1) * x_sigma
        S = None if s is None else 1000.0 / (1.0 + torch.exp(s / 250.0))
        g = x_t + (1 - t).reshape(-1, 1, 1, 1) * self.net(x_t, 1000.0 * t, S)
        c_skip = SIGMA_DATA ** 2 / (sig ** 2 + SIGMA_DATA ** 2)
        c_out = sig * SIGMA_DATA / torch.sqrt(sig ** 2 + SIGMA_DATA ** 2)
        return (g - c_skip * x_sigma) / c_out


def ctm_args(**over):
    a = dict(sigma_data=SIGMA_DATA, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO, start_scales=N_SCALES,
             num_heun_step=HEUN_STEPS, num_heun_step_random=True, heun_step_strategy="weighted",
             heun_step_multiplier=1.0, time_continuous=False, sample_s_strategy="uniform", training_mode="ctm",
             inner_parametrization="edm", outer_parametrization="euler", target_subtract=False, rescaling=False,
             ctm_estimate_outer_type="target_model_sg", ctm_estimate_inner_type="model",
             ctm_target_inner_type="model_sg", ctm_target_matching=False, self_learn=False, large_log=False,
             weight_schedule="uniform", weight_schedule_multiplier=1.0, diffusion_training=False, gan_training=False,
             g_learning_period=1, save_png=False, loss_norm="l2")
    a.update(over)
    return types.SimpleNamespace(**a)


def ctm_provenance(root, function, note):
    return {"repository": "sony/ctm", "commit": git_commit(root), "file": "code/cm/karras_diffusion.py",
            "function": function, "note": note}


def gen_ctm_loss(repos):
    """KarrasDenoiser.ctm_losses on one batch: the per-sample consistency loss (get_CTM_loss replaced by the
    per-sample mean squared error, as fewstep's L2), its estimate and target, the teacher's Heun solution
    x_u, and the gradient of the batch-mean loss w.r.t. the student's parameters."""
    root, kd, resample, _ = import_ctm(repos)
    with float64_default():
        args = ctm_args()
        student, ema, teacher = TinyNet(1), TinyNet(2), TinyNet(3)
        for p in [*ema.parameters(), *teacher.parameters()]:
            p.requires_grad_(False)
        den = kd.KarrasDenoiser(args, resample.UniformSampler(N_SCALES), None)
        den.teacher_model = EDMFromFlow(teacher)
        seen = {}
        real_t, real_s = den.schedule_sampler.sample_t, den.schedule_sampler.sample_s
        den.schedule_sampler.sample_t = lambda *a, **k: seen.setdefault("i", real_t(*a, **k))
        den.schedule_sampler.sample_s = lambda *a, **k: seen.setdefault("j", real_s(*a, **k))
        real_heun = den.heun_solver
        den.heun_solver = lambda *a, **k: seen.setdefault("x_u", real_heun(*a, **k))

        def l2(estimate, target, weights, step):
            seen["estimate"], seen["target"] = estimate, target
            return ((estimate - target) ** 2).flatten(1).mean(1) * weights

        den.get_CTM_loss = l2
        g = torch.Generator().manual_seed(10)
        b = 8
        x1 = torch.rand(b, CHANNELS, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
        z = torch.randn(b, CHANNELS, 2, 2, generator=g, dtype=torch.float64)
        outputs = {}
        for k in (1, 4, 17):
            np.random.seed(k)
            seen.clear()
            student.zero_grad()
            terms = den.ctm_losses(0, EDMFromFlow(student), x1, target_model=EDMFromFlow(ema), noise=z,
                                   num_heun_step=k)
            loss = terms["consistency_loss"]
            loss.mean().backward()
            i, j = seen["i"][0], seen["j"]
            outputs[str(k)] = {"i": i.clone(), "j": j.clone(), "loss": loss.detach().clone(),
                               "x_u_sigma": seen["x_u"].detach().clone(),
                               "estimate_sigma": seen["estimate"].detach().clone(),
                               "target_sigma": seen["target"].detach().clone(),
                               "grad": {n: p.grad.clone() for n, p in student.named_parameters()}}
        sigmas = den.get_t(torch.arange(N_SCALES))
    note = ("get_CTM_loss (LPIPS / feature networks only) replaced by the per-sample mean squared error; the nets "
            "are fewstep-convention flow nets seen through EDMFromFlow; sample_t / sample_s / heun_solver wrapped to "
            "record their results; estimate, target and x_u are in EDM's x_sigma; diffusion_training and "
            "gan_training off")
    return {"provenance": ctm_provenance(root, "KarrasDenoiser.ctm_losses", note),
            "inputs": {"x1": x1, "z": z, "sigmas": sigmas, "num_scales": N_SCALES, "sigma_min": SIGMA_MIN},
            "weights": {"student": state(student), "ema": state(ema), "teacher": state(teacher)},
            "outputs": outputs}


def gen_ctm_indices(repos):
    """20,000 draws of (k, i, j): get_num_heun_step (the defaults: 17 steps, 'weighted'), UniformSampler.sample_t
    and sample_s ('uniform') at the CIFAR-10 defaults (18 scales)."""
    root, kd, resample, _ = import_ctm(repos)
    args = ctm_args()
    den = kd.KarrasDenoiser(args, resample.UniformSampler(N_SCALES), None)
    np.random.seed(0)
    draws = []
    for _ in range(20_000):
        k = int(den.get_num_heun_step(num_heun_step=HEUN_STEPS))
        i = den.schedule_sampler.sample_t(1, "cpu", k)[0]
        j = den.schedule_sampler.sample_s(args, 1, "cpu", i, k, N=N_SCALES)
        draws.append((k, int(i[0]), int(j[0])))
    return {"provenance": ctm_provenance(root, "KarrasDenoiser.get_num_heun_step; resample.py "
                                               "UniformSampler.sample_t, ScheduleSampler.sample_s",
                                         "numpy seeded 0, one (k, i, j) per call as in ctm_losses"),
            "inputs": {"num_scales": N_SCALES, "heun_steps": HEUN_STEPS},
            "weights": {}, "outputs": {"kij": torch.tensor(draws, dtype=torch.int16)}}


def gen_ctm_sampler(repos):
    """sample_util.karras_sample(sampler='exact') on fixed noise, 1, 2 and 4 jumps along Karras levels; the
    output clamps (clip_denoised, clip_output) off."""
    root, kd, resample, sample_util = import_ctm(repos)
    with float64_default():
        args = ctm_args()
        den = kd.KarrasDenoiser(args, resample.UniformSampler(N_SCALES), None)
        net = TinyNet(4)
        z = torch.randn(6, CHANNELS, 2, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
        outputs = {}
        with torch.no_grad():
            for steps in (1, 2, 4):
                x = sample_util.karras_sample(den, EDMFromFlow(net), z.shape, steps, model_kwargs={}, device="cpu",
                                              sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, sampler="exact", ctm=True,
                                              x_T=SIGMA_MAX * z, clip_denoised=False, clip_output=False)
                sig = sample_util.get_sigmas_karras(steps + 1, SIGMA_MIN, SIGMA_MAX, RHO)[:-1]
                outputs[str(steps)] = {"x_sigma_min": x, "sigmas": sig}
    prov = ctm_provenance(root, "sample_util.karras_sample, sample_exact", "x_T = sigma_max z; clamps off")
    prov["file"] = "code/cm/sample_util.py"
    return {"provenance": prov, "inputs": {"z": z}, "weights": {"net": state(net)}, "outputs": outputs}


# ---------------------------------------------------------------------------------------------------------------
# ld3: vinhsuhi/LD3, trainer.py (discretize_model_wrapper, LD3Trainer), samplers/euler.py (Euler)
# ---------------------------------------------------------------------------------------------------------------
def import_ld3(repos):
    root = pathlib.Path(repos) / "LD3"
    sys.path.insert(0, str(root))
    stub_modules(**{"lpips": {}, "imageio": {}, "PIL": {}, "matplotlib": {}, "matplotlib.pyplot": {},
                    "yaml": {}})
    import trainer
    import utils
    from samplers.euler import Euler
    return root, trainer, utils, Euler


class FlowSchedule:
    """This file's flow in LD3's schedule interface, time tau = 1 - t from noise (1) to data (0): alpha = 1 - tau,
    sigma = tau, lambda = log(alpha / sigma). drift=True: ft = 0, gt^2 / (2 sigma) = 1, so that Euler.sample_simple
    steps with the model's output itself (the drift dx/dtau); drift=False: the schedule's own ft, gt (a VP-type
    model whose output is the noise prediction)."""

    def __init__(self, drift):
        self.drift, self.lambda_min, self.lambda_max = drift, -math.inf, math.inf

    def inverse_lambda(self, lamb):
        return 1.0 / (1.0 + torch.exp(torch.as_tensor(lamb, dtype=torch.float64)))

    def marginal_lambda(self, tau):
        tau = torch.as_tensor(tau, dtype=torch.float64)
        return torch.log(1 - tau) - torch.log(tau)

    def marginal_std(self, tau):
        return torch.as_tensor(tau, dtype=torch.float64)

    def ft(self, tau):
        return 0.0 if self.drift else -1.0 / (1.0 - tau)

    def gt(self, tau):
        return torch.sqrt(2 * tau) if self.drift else torch.sqrt(2 * tau / (1 - tau))

    def prior_transformation(self, latents):
        return latents


def flow_model_fn(net, drift):
    """LD3's model_fn(x, tau, condition, uncondition) from a flow network v(x_t, 1000 t), t = 1 - tau: drift=True
    returns dx/dtau = -v; drift=False the noise prediction x - t v (the flow's x0 estimate)."""
    def model_fn(x, tau, *args):
        t = (1.0 - tau).reshape(-1, 1, 1, 1)
        v = net(x, 1000.0 * (1.0 - tau))
        return -v if drift else x - t * v
    return model_fn


def ld3_provenance(root, file, function, note):
    return {"repository": "vinhsuhi/LD3", "commit": git_commit(root), "file": file, "function": function,
            "note": note}


def gen_ld3_grid(repos):
    """discretize_model_wrapper in time mode: the n + 1 time points and the n + 1 network times from (params1,
    params2), and their gradients for a fixed linear functional, for n = 1, 2, 4."""
    root, trainer, _, _ = import_ld3(repos)
    g = torch.Generator().manual_seed(20)
    outputs = {}
    for n in (1, 2, 4):
        p1 = torch.nn.Parameter(torch.randn(n + 1, generator=g, dtype=torch.float64))
        p2 = torch.nn.Parameter(0.2 * torch.randn(n + 1, generator=g, dtype=torch.float64))
        sched = FlowSchedule(drift=True)
        tau1, tau2 = trainer.discretize_model_wrapper(p1, p2, sched.lambda_max, sched.lambda_min, sched, "time",
                                                      0.5)()
        c1 = torch.randn(n + 1, generator=g, dtype=torch.float64)
        c2 = torch.randn(n + 1, generator=g, dtype=torch.float64)
        ((c1 * tau1).sum() + (c2 * tau2).sum()).backward()
        outputs[str(n)] = {"params1": p1.detach().clone(), "params2": p2.detach().clone(), "tau1": tau1.detach(),
                           "tau2": tau2.detach(), "c1": c1, "c2": c2, "grad1": p1.grad.clone(),
                           "grad2": p2.grad.clone()}
    return {"provenance": ld3_provenance(root, "trainer.py", "discretize_model_wrapper (model_time_fn)",
                                         "time mode, window_rate 0.5; the schedule is the flow in tau = 1 - t, "
                                         "t_max = 1 (noise), t_min = 0 (data)"),
            "inputs": {}, "weights": {}, "outputs": outputs}


def gen_ld3_solve(repos):
    """Euler.sample_simple on fixed noise and a grid that starts at t = 0.05 (the VP form needs alpha > 0): with
    the flow as a VP-type model (noise prediction at the network time, the schedule's coefficients at the grid
    time) and as its own drift; network times equal to the grid times and shifted."""
    root, _, _, Euler = import_ld3(repos)
    net = TinyNet(5)
    x = torch.randn(5, CHANNELS, 2, 2, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    t = torch.tensor([0.05, 0.3, 0.55, 1.0], dtype=torch.float64)
    shifted = torch.tensor([0.05, 0.37, 0.5], dtype=torch.float64)
    outputs = {}
    with torch.no_grad():
        for form in ("vp", "drift"):
            sched = FlowSchedule(drift=form == "drift")
            solver = Euler(sched)
            for name, s in (("equal", t[:-1]), ("shifted", shifted)):
                tau1, tau2 = 1 - t, 1 - torch.cat([s, t[-1:]])
                out = solver.sample_simple(flow_model_fn(net, form == "drift"), x, tau1, tau2, NFEs=len(s))
                outputs[f"{form}_{name}"] = out
    return {"provenance": ld3_provenance(root, "samplers/euler.py", "Euler.sample_simple (general_solver.py "
                                         "ODESolver.dx_dt_for_blackbox_solvers)",
                                         "the flow through FlowSchedule / flow_model_fn of the generator"),
            "inputs": {"x": x, "t": t, "s_shifted": shifted}, "weights": {"net": state(net)}, "outputs": outputs}


def gen_ld3_train(repos):
    """One training iteration of LD3Trainer._train_one_round (its train loader: one batch of 4 pairs; phase 2, both
    parameter vectors learn; L2 loss; slack radius, latent step and lr2 from utils.adjust_hyper) on the flow as its
    own drift: the loss and loss vector, the parameters after the step, the moved latents."""
    root, trainer, utils, Euler = import_ld3(repos)
    n, res, b = 2, 4, 4
    cli = types.SimpleNamespace(gits_ts=None, use_gits=False, solver_name="euler", shift_lr=None, fix_bound=False,
                                prior_bound=None, steps=n, lr_time_2=0.1)
    hyper = utils.adjust_hyper(cli, resolution=res, channel=CHANNELS)
    g = torch.Generator().manual_seed(22)
    net = TinyNet(6)
    ori = torch.randn(b, CHANNELS, res, res, generator=g, dtype=torch.float64)
    latent = ori + 0.01 * torch.randn(b, CHANNELS, res, res, generator=g, dtype=torch.float64)
    img = torch.rand(b, CHANNELS, res, res, generator=g, dtype=torch.float64) * 2 - 1
    p1 = torch.randn(n + 1, generator=g, dtype=torch.float64)
    p2 = 0.05 * torch.randn(n + 1, generator=g, dtype=torch.float64)
    sched = FlowSchedule(drift=True)
    with torch.no_grad():  # row 0's target is its own solution: loss 0, so any move of its noise is rejected
        tau1, tau2 = trainer.discretize_model_wrapper(p1, p2, sched.lambda_max, sched.lambda_min, sched, "time", 0.5)()
        img[0] = Euler(sched).sample_simple(flow_model_fn(net, True), latent[:1], tau1, tau2, NFEs=n)[0]
    data = trainer.LD3Dataset(list(ori), list(latent), list(img), [None] * b, [None] * b)
    recorded = []
    trainer.LD3Trainer._initialize_params = lambda self: (torch.nn.Parameter(p1.clone()),
                                                          torch.nn.Parameter(p2.clone()))
    trainer.LD3Trainer._create_train_loader = lambda self: setattr(self, "train_loader", torch.utils.data.DataLoader(
        self.train_data, batch_size=self.train_batch_size, shuffle=False, collate_fn=trainer.custom_collate_fn))
    trainer.LD3Trainer._examine_checkpoint = lambda self, it: None  # validation, patience, snapshots: not compared
    with tempfile.TemporaryDirectory() as tmp:
        mc = trainer.ModelConfig(net=flow_model_fn(net, True), decoding_fn=lambda x: x, noise_schedule=sched,
                                 solver=Euler(sched), solver_name="euler", order=1, steps=n,
                                 prior_bound=hyper.prior_bound, resolution=res, channels=CHANNELS, time_mode="time",
                                 snapshot_path=tmp, device=torch.device("cpu"))
        tc = trainer.TrainingConfig(train_data=data, valid_data=data, train_batch_size=b, valid_batch_size=b,
                                    lr_time_1=5e-3, lr_time_2=hyper.lr_time_2, shift_lr=hyper.shift_lr,
                                    loss_type="L2")
        tr = trainer.LD3Trainer(mc, tc)
        real_solve = tr._solve_ode

        def solve(*a, **k):
            out = real_solve(*a, **k)
            recorded.append((out[0].detach().clone(), tr.loss_vector.detach().clone()))
            return out

        tr._solve_ode = solve
        tr.training_rounds_v1, tr.cur_round = 0, 0
        p1_before, p2_before = tr.params1.detach().clone(), tr.params2.detach().clone()
        tr._train_one_round()
        out = {"loss": recorded[0][0], "loss_vector": recorded[0][1], "loss_vector_moved": recorded[1][1],
               "params1": tr.params1.detach().clone(), "params2": tr.params2.detach().clone(),
               "latent": torch.stack(list(tr.train_data.latent)).to(torch.float64)}
    return {"provenance": ld3_provenance(root, "trainer.py", "LD3Trainer._train_one_round, _solve_ode, "
                                         "_update_latents; utils.adjust_hyper",
                                         "train loader unshuffled (one batch), _examine_checkpoint a no-op, params "
                                         "float64 on the CPU; the flow as its own drift (FlowSchedule drift=True)"),
            "inputs": {"ori": ori, "latent": latent, "img": img, "params1": p1_before, "params2": p2_before,
                       "n": n, "prior_bound": float(hyper.prior_bound), "shift_lr": float(hyper.shift_lr),
                       "lr_time_2": float(hyper.lr_time_2), "lr_time_1": 5e-3},
            "weights": {"net": state(net)}, "outputs": out}


# ---------------------------------------------------------------------------------------------------------------
# pd: google-research/google-research diffusion_distillation/dpm.py (Model.training_losses, Model.sample_loop)
# ---------------------------------------------------------------------------------------------------------------
def import_pd(repos):
    root = pathlib.Path(repos) / "google-research-dd"
    sys.path.insert(0, str(root))
    stub_modules(PIL={})
    import jax
    jax.config.update("jax_enable_x64", True)
    from diffusion_distillation import dpm
    return root, jax, dpm


def jax_flow_x_model(jax, weights):
    """The tiny flow network as the authors' model_fn(z, logsnr) with mean_type 'x': t = sigmoid(logsnr / 2) (logsnr
    = 2 log(t / (1 - t))), x_t = sqrt(t^2 + (1 - t)^2) z, x1 estimate x_t + (1 - t) v(x_t, 1000 t)."""
    jnp = jax.numpy
    w = {k: jnp.asarray(v.numpy()) for k, v in weights.items()}

    def model_fn(z, logsnr):
        t = jax.nn.sigmoid(logsnr / 2).reshape(-1, 1, 1, 1)
        x_t = jnp.sqrt(t ** 2 + (1 - t) ** 2) * z
        v = jnp.tanh(w["a"] * x_t + w["b"] * 1000.0 * t) * w["d"] + w["e"] * x_t
        return x_t + (1 - t) * v
    return model_fn


def gen_pd(repos):
    """Model.training_losses with a teacher (distillation, mean_type 'x', 'snr_trunc' as the CIFAR-10 config) at N =
    4 student steps, its draws (eps, i) replaced by the fixture's: the per-sample loss and the x-target (recorded
    where training_losses turns it into a v-target); Model.sample_loop ('ddim', clip_x off) on fixed noise."""
    root, jax, dpm = import_pd(repos)
    jnp = jax.numpy
    student, teacher = TinyNet(7), TinyNet(8)
    n, b = 4, 12
    g = torch.Generator().manual_seed(30)
    x1 = torch.rand(b, CHANNELS, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(b, CHANNELS, 2, 2, generator=g, dtype=torch.float64)
    i = torch.arange(b) % n

    def logsnr_fn(u):  # the flow's own schedule in the authors' time u = 1 - t (u = 1 noise)
        return 2 * (jnp.log1p(-u) - jnp.log(u))

    model = dpm.Model(jax_flow_x_model(jax, state(student)), mean_type="x", logvar_type="fixed_large",
                      logvar_coeff=0.0, target_model_fn=jax_flow_x_model(jax, state(teacher)))
    seen = []
    real_v, real_normal, real_randint = dpm.predict_v_from_x_and_eps, jax.random.normal, jax.random.randint
    dpm.predict_v_from_x_and_eps = lambda **kw: seen.append(kw["x"]) or real_v(**kw)
    jax.random.normal = lambda key, shape, dtype: jnp.asarray(eps.numpy())
    jax.random.randint = lambda key, shape, minval, maxval: jnp.asarray(i.numpy())
    try:
        loss = model.training_losses(x=jnp.asarray(x1.numpy()), rng=jax.random.PRNGKey(0), logsnr_schedule_fn=logsnr_fn,
                                     num_steps=n, mean_loss_weight_type="snr_trunc")["loss"]
    finally:
        dpm.predict_v_from_x_and_eps, jax.random.normal, jax.random.randint = real_v, real_normal, real_randint
    x_target = seen[2]  # after the teacher's two _run_model calls, the v-target's
    z = torch.randn(5, CHANNELS, 2, 2, generator=g, dtype=torch.float64)
    samples = {}
    for steps in (1, 2, 4):
        samples[str(steps)] = torch.from_numpy(np.array(model.sample_loop(
            rng=jax.random.PRNGKey(1), init_x=jnp.asarray(z.numpy()), num_steps=steps, logsnr_schedule_fn=logsnr_fn,
            sampler="ddim", clip_x=False)))
    prov = {"repository": "google-research/google-research", "commit": git_commit(root),
            "file": "diffusion_distillation/diffusion_distillation/dpm.py",
            "function": "Model.training_losses (distillation branch), Model.sample_loop / ddim_step",
            "note": "a copy of dpm.py (stored version 1d4d2f1a) and utils.py (30adf0ec) taken line by line (the "
                    "monorepo is over the fetch limit); jax.random.normal / randint return the fixture's eps and i; "
                    "the nets are fewstep flow nets through jax_flow_x_model; logsnr(u) = 2 log((1 - u) / u), "
                    "t = 1 - u"}
    return {"provenance": prov, "inputs": {"x1": x1, "eps": eps, "i": i, "n": n, "z": z},
            "weights": {"student": state(student), "teacher": state(teacher)},
            "outputs": {"loss": torch.from_numpy(np.array(loss)), "x_target": torch.from_numpy(np.array(x_target)),
                        "samples": samples}}


GENERATORS = {"ctm_loss": gen_ctm_loss, "ctm_indices": gen_ctm_indices, "ctm_sampler": gen_ctm_sampler,
              "ld3_grid": gen_ld3_grid, "ld3_solve": gen_ld3_solve, "ld3_train": gen_ld3_train, "pd": gen_pd}
