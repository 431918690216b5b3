"""Parity of fewstep.py's ctm, ld3 and pd with their authors' code, on fixtures that tools/official_fixtures_ctm.py
wrote by running that code (tests/data/official/{ctm_*,ld3_*,pd}.pt, each with its provenance: repository, commit,
file, function). The same tiny float64 network is rebuilt here from the fixture's weights; conventions are mapped
explicitly (fewstep: t = 0 noise, x_t = (1 - t) x0 + t x1; sony/ctm: EDM's sigma = (1 - t) / t on x_sigma = x_t / t;
LD3: its schedule time tau = 1 - t).

ctm (sony/ctm): the estimate G_sg(G_theta(x_t, t, s), s, end) and the target G_sg(G_sg(x_u, u, s), s, end), the loss
and its gradient (stop-gradients), the teacher's k Heun steps (in t here, in sigma there: a stated bound), the
(k, i, j) draws (k from 1..17 with p(k) proportional to k; chi-square and KS against 20,000 of the authors' draws)
and the deterministic sampler along Karras levels. The grid's ends (0 and 1 here, sigma_max and sigma_min there) are
set to the authors' for the comparison; gamma > 0 is not compared (the authors' sigma' keeps sigma_min, here 0).
ld3 (vinhsuhi/LD3): the time grid from its parameters (time mode) and its gradients, the Euler solve (equal to the
authors' when the network times are the grid times; with shifted network times the authors' VP form is this
file's step with v scaled by s_i / t_i, the deviation LD3's docstring names), and one whole training iteration with
the slack (loss, parameters after RMSprop / SGD with clipping, the moved and the rejected noises). LD3 draws no
times: its only random choice, the order of the pairs, is a uniform permutation on both sides and is not compared.
pd (google-research's diffusion_distillation, JAX; a copy of dpm.py and utils.py taken line by line from the
stored text, the monorepo being over the fetch limit): the x-target of two teacher DDIM steps, the truncated-SNR
loss against fewstep's weight-1 velocity loss, fewstep's batch loss, and the DDIM sampler. The student's step
index is drawn uniformly on both sides (jax.random.randint over 0..N-1, torch.randint here) and is not compared; no
gradient is compared either: the target is built from the frozen teacher alone on both sides.
"""
import math
import pathlib

import numpy as np
import scipy.stats
import torch

import fewstep
from fewstep import CTM, LD3, LD3Optimizer

DATA = pathlib.Path(__file__).parent / "data" / "official"


def load(name):
    path = DATA / f"{name}.pt"
    assert path.exists(), f"missing fixture {path}: run tools/official_fixtures.py --repos DIR --only {name}"
    return torch.load(path, weights_only=True)


class TinyNet(torch.nn.Module):
    """The fixtures' network: tanh(a x + b T + c S) d + e x per channel, T and S the network's time inputs."""

    def __init__(self, weights):
        super().__init__()
        for name, value in weights.items():
            setattr(self, name, torch.nn.Parameter(value.clone()))

    def forward(self, x, T, cond=None):
        T = T.to(x.dtype).reshape(-1, 1, 1, 1)
        S = torch.zeros_like(T) if cond is None else cond.to(x.dtype).reshape(-1, 1, 1, 1)
        return torch.tanh(self.a * x + self.b * T + self.c * S) * self.d + self.e * x


def close(got, want, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(got, want.to(got.dtype), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------------------------
# ctm
# ---------------------------------------------------------------------------------------------------------------
def ctm_setup(fx):
    """CTM with the authors' grid t = 1 / (1 + sigma) (ends not moved) and the fixture's student, EMA and teacher."""
    method = CTM(lambda_dsm=0.0)
    method.grid = 1 / (1 + fx["inputs"]["sigmas"])
    nets = {k: TinyNet(w) for k, w in fx["weights"].items()}
    for name in ("ema", "teacher"):
        nets[name].requires_grad_(False)
    method.teacher = nets["teacher"]
    return method, nets


HEUN_BOUND = {1: 3.5e-3, 4: 2.7e-2, 17: 4.8e-2}


def test_ctm_estimate_target_and_loss_match_sony_ctm():
    """For k = 1, 4, 17 teacher steps: x_t, the estimate and the target (sony/ctm's are x_sigma at sigma_min: times
    t_end = 1 / (1 + sigma_min) here) agree to float64 rounding when the target starts from the authors' x_u; the
    loss and its gradient w.r.t. the student agree to float32 rounding (fewstep takes the mean squared error in
    float32) and carry the factor t_end^2 of the two scales. The teacher's k Heun steps are in t here, in sigma
    there: the same Euler predictors, corrections that differ at second order, which on the 18-level grid's long
    middle steps (0.17 in t) add up; HEUN_BOUND is 1.5 times what the two differ by on this fixture (2.2e-3, 1.8e-2,
    3.2e-2), and an Euler solve misses the authors' by 4 times as much (9.4e-3, 7.6e-2, 0.13)."""
    fx = load("ctm_loss")
    method, nets = ctm_setup(fx)
    x1, z = fx["inputs"]["x1"], fx["inputs"]["z"]
    grid = method.grid
    t_end = grid[-1]
    for key, out in fx["outputs"].items():
        k, i, j = int(key), out["i"], out["j"]
        t, u, s = grid[i], grid[i + k], grid[j]
        end = t_end.expand_as(s)
        x_t = fewstep.interpolate(z, x1, t)
        x_u = fewstep.expand_t(u, x_t) * out["x_u_sigma"]
        with torch.no_grad():
            solved = method.teacher_solve(x_t, i, k)
            target = method.G(nets["ema"], method.G(nets["student"], x_u, u, s), s, end)
            estimate = method.G(nets["ema"], method.G(nets["student"], x_t, t, s), s, end)
        close(target, t_end * out["target_sigma"])
        close(estimate, t_end * out["estimate_sigma"])
        assert (solved - x_u).abs().max() < HEUN_BOUND[k], (k, (solved - x_u).abs().max())

        method.sample_indices = lambda b, device, k=k, i=i, j=j: (k, i, j)
        method.teacher_solve = lambda x, i_, k_, teacher=None, x_u=x_u: x_u
        nets["student"].zero_grad()
        loss = method.loss(nets["student"], x1, x0=z, ema=nets["ema"])
        loss.backward()
        close(loss.double(), t_end ** 2 * out["loss"].mean(), rtol=1e-6)
        for name, p in nets["student"].named_parameters():
            close(p.grad, t_end ** 2 * out["grad"][name], rtol=1e-5, atol=1e-9)
        del method.sample_indices, method.teacher_solve


def test_ctm_teacher_steps_and_times_follow_the_authors_draws():
    """8,000 draws of (k, i, j) at the CIFAR-10 defaults (18 scales, at most 17 steps) against the authors' 20,000:
    k's counts (chi-square; a uniform k fails by far), two-sample KS tests of i (t's index) and j (s's)."""
    kij = load("ctm_indices")["outputs"]["kij"].long()
    method = CTM()
    torch.manual_seed(0)
    ours = torch.tensor([[k, int(i[0]), int(j[0])] for k, i, j in (method.sample_indices(1, "cpu")
                                                                    for _ in range(8000))])
    counts = np.stack([np.bincount(kij[:, 0], minlength=18)[1:], np.bincount(ours[:, 0], minlength=18)[1:]])
    assert scipy.stats.chi2_contingency(counts).pvalue > 1e-3
    for col in (1, 2):
        assert scipy.stats.ks_2samp(kij[:, col].numpy(), ours[:, col].numpy()).pvalue > 1e-3, col
    assert abs(ours[:, 0].double().mean().item() - 35 / 3) < 0.1  # E k = sum k^2 / sum k = 35 / 3


def test_ctm_sampler_matches_sony_ctms_exact_sampler(monkeypatch):
    """gamma = 0, 1, 2 and 4 jumps along the authors' Karras levels from x_T = sigma_max z (their clamps off):
    fewstep's sample on the same times (t = 1 / (1 + sigma)) gives t_end times their x at sigma_min."""
    fx = load("ctm_sampler")
    net = TinyNet(fx["weights"]["net"])
    z = fx["inputs"]["z"]
    for key, out in fx["outputs"].items():
        taus = (1 / (1 + out["sigmas"])).tolist()
        monkeypatch.setattr(fewstep, "grid_times", lambda nfe, given=None, taus=taus: taus)
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # the sampler's times in float64, like the authors' here
        try:
            with torch.no_grad():
                got = CTM().sample(net, taus[0] * 80.0 * z, int(key))
        finally:
            torch.set_default_dtype(old)
        close(got, taus[-1] * out["x_sigma_min"])


# ---------------------------------------------------------------------------------------------------------------
# ld3
# ---------------------------------------------------------------------------------------------------------------
def set_ld3_params(method, n, params1, params2):
    """The authors' params1 (n + 1 logits; the first drops out of the normalisation) run from the data end: xi_k =
    params1[n - k]; their params2 shift tau = 1 - t, so eta = -params2 (the last one is masked there)."""
    method.grid[f"xi{n}"] = torch.nn.Parameter(params1[1:].flip(0).clone())
    method.grid[f"eta{n}"] = torch.nn.Parameter(-params2[:n].clone())


def test_ld3_time_grid_and_its_gradients_match_ld3():
    """t_i and s_i from (xi, eta) are 1 - the authors' tau1, tau2 (time mode, window 0.5), and the gradients of the
    fixture's linear functional of the grid agree, the detached window and the pinned s_0 included."""
    for key, out in load("ld3_grid")["outputs"].items():
        n = int(key)
        method = LD3(nfes=(n,))
        set_ld3_params(method, n, out["params1"], out["params2"])
        t, s = method.times(n)
        close(t, 1 - out["tau1"], atol=1e-15)
        close(s, 1 - out["tau2"][:n], atol=1e-15)
        loss = (out["c1"] * (1 - t)).sum() + (out["c2"][:n] * (1 - s)).sum()
        loss.backward()
        close(method.grid[f"xi{n}"].grad, out["grad1"][1:].flip(0), atol=1e-15)
        close(method.grid[f"eta{n}"].grad, -out["grad2"][:n], atol=1e-15)
        assert out["grad1"][0].abs() < 1e-12  # the authors' spare logit has no effect


def test_ld3_euler_solve_matches_ld3_and_its_shifted_form_is_the_named_deviation(monkeypatch):
    """On the fixture's grid (from t = 0.05, where the authors' VP form is defined): with network times equal to the
    grid times fewstep's solve equals the authors' Euler with the flow as a VP-type model and as its own drift;
    with shifted network times it equals the drift form, and the VP form is this solve with v scaled by s_i / t_i."""
    fx = load("ld3_solve")
    net = TinyNet(fx["weights"]["net"])
    x, t, s_shift = fx["inputs"]["x"], fx["inputs"]["t"], fx["inputs"]["s_shifted"]
    method = LD3(nfes=(3,))
    for name, s in (("equal", t[:-1]), ("shifted", s_shift)):
        monkeypatch.setattr(method, "times", lambda n, s=s: (t, s))
        with torch.no_grad():
            got = method.solve(net, x, 3)
            calls = iter((s / t[:-1]).tolist())
            scaled = method.solve(lambda x_, T: next(calls) * net(x_, T), x, 3)
        close(got, fx["outputs"][f"drift_{name}"])
        close(scaled, fx["outputs"][f"vp_{name}"])
    assert not torch.allclose(fx["outputs"]["vp_shifted"], fx["outputs"]["drift_shifted"], atol=1e-3)


def test_ld3_training_iteration_matches_ld3_trainer():
    """One iteration on 4 pairs at NFE 2 (phase 2): the loss and per-pair distances, xi and eta after RMSprop / SGD
    (gradients clipped to norm 1), the noises moved by 12 / n times their gradient and projected into the slack ball
    (r = 1e-3 D / n^2), and pair 0, whose move made it worse, left where it was. fewstep takes d in float32."""
    fx = load("ld3_train")
    inp, out = fx["inputs"], fx["outputs"]
    n = inp["n"]
    method = LD3(nfes=(n,), num_pairs=4, batch_size=4, phase1_epochs=0, lr_time=inp["lr_time_1"],
                 lr_shift=inp["lr_time_2"] * n, slack=inp["prior_bound"] * n ** 2 / inp["ori"][0].numel())
    assert math.isclose(12.0 / n, inp["shift_lr"]) and math.isclose(method.slack, 1e-3)
    set_ld3_params(method, n, inp["params1"], inp["params2"])
    method.teacher = TinyNet(fx["weights"]["net"]).requires_grad_(False)
    method.pairs = {"x0": inp["ori"], "x1": inp["img"], "y": None}
    method.latents = {str(n): inp["latent"].float()}  # kept in float32, as fewstep keeps them
    opt = LD3Optimizer(method)
    method.on_step(0, None, None)
    loss = method.loss(None, inp["img"])
    pending_d = method._pending[0][3]
    idx = method._pending[0][1]
    close(pending_d.double(), out["loss_vector"][idx], rtol=1e-6, atol=1e-7)
    close(loss.double(), out["loss"], rtol=1e-6)
    loss.backward()
    opt.step()
    close(method.grid[f"xi{n}"].detach(), out["params1"][1:].flip(0), rtol=1e-6, atol=1e-8)
    close(method.grid[f"eta{n}"].detach(), -out["params2"][:n], rtol=1e-6, atol=1e-8)
    moved = method.latents[str(n)].double()
    close(moved, out["latent"], rtol=1e-5, atol=1e-6)
    assert torch.equal(moved[0], inp["latent"][0].float().double())  # rejected: kept
    assert ((moved[1:] - inp["latent"][1:]).flatten(1).norm(dim=1) > 1e-2).all()


# ---------------------------------------------------------------------------------------------------------------
# pd
# ---------------------------------------------------------------------------------------------------------------
def test_pd_target_loss_and_sampler_match_diffusion_distillation(monkeypatch):
    """diffusion_distillation's Model.training_losses at N = 4 (the VP process z = x_t / sqrt(t^2 + (1 - t)^2),
    logsnr = 2 log(t / (1 - t)), its time u = 1 - t; its step index i is t = 1 - (i + 1) / N here): the x-target
    implied by two teacher DDIM steps is x_t + (1 - t) v~ with fewstep's velocity target v~; its 'snr_trunc' loss
    is fewstep's per-sample velocity error times max(t^2, (1 - t)^2) (the weight docstring names); fewstep's loss is
    the batch mean of that error; Model.sample_loop ('ddim', no clip) at 1, 2, 4 steps is fewstep's sampler."""
    fx = load("pd")
    inp, out = fx["inputs"], fx["outputs"]
    n = inp["n"]
    student, teacher = TinyNet(fx["weights"]["student"]), TinyNet(fx["weights"]["teacher"])
    method = fewstep.ProgressiveDistillation(start_steps=2 * n, end_steps=n)
    method.teacher = teacher.requires_grad_(False)
    t = 1 - (inp["i"] + 1).double() / n
    x_t = fewstep.interpolate(inp["eps"], inp["x1"], t)
    with torch.no_grad():
        v_target = method.target(teacher, x_t, t, n)
        v_err = ((method.velocity(student, x_t, t) - v_target) ** 2).flatten(1).mean(1)
    close(x_t + fewstep.expand_t(1 - t, x_t) * v_target, out["x_target"])
    close(torch.maximum(t, 1 - t) ** 2 * v_err, out["loss"])
    monkeypatch.setattr(torch, "randint", lambda lo, hi, size, device=None: (n - 1 - inp["i"]).to(device))
    with torch.no_grad():
        close(method.loss(student, inp["x1"], x0=inp["eps"]), v_err.mean())
    sampler = fewstep.ProgressiveDistillation(start_steps=8, end_steps=1)
    for key, want in out["samples"].items():
        with torch.no_grad():
            close(sampler.sample(student, inp["z"], int(key)), want)
