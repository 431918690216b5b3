r"""Score SDE vs probability-flow ODE on a Gaussian mixture whose score is known in closed form.

Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole. Score-Based Generative Modeling through Stochastic
Differential Equations. ICLR 2021, arXiv:2011.13456.
Anderson. Reverse-time diffusion equation models. Stochastic Processes and their Applications 12(3), 1982.

Time convention: t in [0, 1]; t = 0 is data (the mixture p_0), t = 1 is noise ($p_1 \approx N(0, I)$).

VP-SDE with linear $\beta(t)$ (Eq. 11; $\beta_\text{min} = 0.1$, $\beta_\text{max} = 20$ as in the paper):
    $$ dx = f(x, t)\, dt + g(t)\, dw, \qquad f(x, t) = -\tfrac{1}{2} \beta(t)\, x, \quad g(t) = \sqrt{\beta(t)}
       \qquad \text{(Eq. 5, 11)} $$
    $$ \beta(t) = \beta_\text{min} + t\, (\beta_\text{max} - \beta_\text{min}) $$
    $$ \bar\alpha(t) = \exp\Big(-\int_0^t \beta(s)\, ds\Big)
       = \exp\Big(-\big(\beta_\text{min} t + \tfrac{1}{2} (\beta_\text{max} - \beta_\text{min}) t^2\big)\Big) $$
    $$ p_{t|0}(x_t | x_0) = N\big(x_t; \sqrt{\bar\alpha(t)}\, x_0, (1 - \bar\alpha(t)) I\big) \qquad \text{(App. B)} $$
Reverse-time SDE (Anderson 1982), run from t = 1 down to t = 0, $dt < 0$, $\bar w$ a reverse-time Wiener process:
    $$ dx = [f(x, t) - g(t)^2 \nabla_x \log p_t(x)]\, dt + g(t)\, d\bar w \qquad \text{(Eq. 6)} $$
Probability-flow ODE: no noise, same marginals p_t; run forward ($dt > 0$) or backward ($dt < 0$):
    $$ \frac{dx}{dt} = f(x, t) - \tfrac{1}{2} g(t)^2 \nabla_x \log p_t(x) \qquad \text{(Eq. 13)} $$
Both are integrated with fixed steps of size $|dt| = 1 / \text{steps}$: Euler-Maruyama for the SDEs, Euler for the
ODEs.

Closed-form marginal score. The data are $p_0 = \sum_k w_k N(\mu_k, \mathrm{diag}(s_k^2))$. Pushing one component
through the Gaussian kernel above gives again a Gaussian, so p_t is a mixture with the same weights and
    $$ m_k(t) = \sqrt{\bar\alpha(t)}\, \mu_k, \qquad v_k(t) = \bar\alpha(t)\, s_k^2 + 1 - \bar\alpha(t) $$
    $$ \nabla_x \log p_t(x) = \sum_k r_k(x, t) \frac{m_k(t) - x}{v_k(t)}, $$
    $$ r_k(x, t) = \mathrm{softmax}_k \big( \log w_k + \log N(x; m_k(t), \mathrm{diag}(v_k(t))) \big)
       \qquad \text{(responsibilities, via log-sum-exp)} $$
so the score stays finite far out in the tails, where every $N(x; m_k, v_k)$ underflows to 0.

Usage:
    python sde_toy.py --out runs/sde_toy                     # 1-D: trajectories of the 4 processes + histograms
    python sde_toy.py --out runs/sde_toy2d --dim 2           # 2-D: scatter panels at a few times
    python sde_toy.py --out runs/sde_toy --particles 5000 --steps 1000 --seed 0
"""

import math
import os

import torch
from tqdm import tqdm

import rundir

DTYPE = torch.float64  # the toy is tiny; float64 lets the tests hold the closed forms to 1e-9 and tighter


# %% Schedule: the VP-SDE with linear beta(t) --------------------------------------------------------------------

class VPSDE:
    r"""$dx = -\tfrac{1}{2} \beta(t)\, x\, dt + \sqrt{\beta(t)}\, dw$ on t in [0, 1],
    $\beta(t) = \beta_\text{min} + t\, (\beta_\text{max} - \beta_\text{min})$."""

    def __init__(self, beta_min=0.1, beta_max=20.0):
        if not (0.0 <= beta_min <= beta_max and beta_max > 0.0):
            raise ValueError(f"need 0 <= beta_min <= beta_max and beta_max > 0, got beta_min={beta_min}, "
                             f"beta_max={beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def abar(self, t):
        # $\bar\alpha(t) = \exp(-\int_0^t \beta(s)\, ds)$, and
        # $\int_0^t \beta(s)\, ds = \beta_\text{min} t + \tfrac{1}{2} (\beta_\text{max} - \beta_\text{min}) t^2$
        return math.exp(-(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t ** 2))

    def f(self, x, t):
        return -0.5 * self.beta(t) * x  # pulls x towards 0: the variance stays bounded ("variance preserving")

    def g(self, t):
        return math.sqrt(self.beta(t))  # diffusion coefficient

    def marginal(self, p0, t):
        r"""p_t as a GaussianMixture: each component $N(\mu_k, s_k^2)$ becomes
        $N(\sqrt{\bar\alpha}\, \mu_k, \bar\alpha s_k^2 + 1 - \bar\alpha)$."""
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t must lie in [0, 1] (t = 0 data, t = 1 noise), got t={t}")
        abar = self.abar(t)
        return GaussianMixture(p0.weights, math.sqrt(abar) * p0.means,
                               torch.sqrt(abar * p0.stds ** 2 + (1.0 - abar)), check=False)


# %% Data: a mixture of axis-aligned Gaussians, closed under the VP-SDE ------------------------------------------

class GaussianMixture:
    r"""$p(x) = \sum_k w_k N(x; \mu_k, \mathrm{diag}(s_k^2))$.

    :param weights: [K] mixture weights, positive, summing to 1.
    :param means: [K x D] component means ([K] is read as D = 1).
    :param stds: [K x D] per-dimension standard deviations, or [K] for isotropic components; all > 0.
    """

    def __init__(self, weights, means, stds, check=True):
        w = torch.as_tensor(weights, dtype=DTYPE)
        mu = torch.as_tensor(means, dtype=DTYPE)
        s = torch.as_tensor(stds, dtype=DTYPE)
        if mu.ndim == 1:
            mu = mu[:, None]  # [K] -> [K x 1]
        if check:
            if w.ndim != 1 or len(w) == 0:
                raise ValueError(f"weights must be a non-empty 1-D list, got shape {tuple(w.shape)}")
            if mu.ndim != 2 or mu.shape[0] != len(w):
                raise ValueError(f"means must have shape [K] or [K, D] with K = {len(w)} (one per weight), "
                                 f"got {tuple(mu.shape)}")
            if s.ndim == 2 and s.shape != mu.shape or s.ndim == 1 and len(s) != len(w) or s.ndim > 2:
                raise ValueError(f"stds must have shape [K] or [K, D] = {tuple(mu.shape)}, got {tuple(s.shape)}")
            if (w <= 0).any():
                raise ValueError(f"weights must be positive, got {w.tolist()}")
            if abs(w.sum().item() - 1.0) > 1e-6:
                raise ValueError(f"weights sum to {w.sum().item():.6g}; they must sum to 1 (divide them by their sum)")
            if not torch.isfinite(mu).all():
                raise ValueError("means must be finite")
            if not (s > 0).all() or not torch.isfinite(s).all():
                raise ValueError(f"stds must be finite and > 0 (standard deviations, not variances), got {s.tolist()}")
        if s.ndim == 1:
            s = s[:, None].expand_as(mu)  # isotropic: one std per component
        self.weights, self.means, self.stds = w, mu, s.clone()

    @property
    def dim(self):
        return self.means.shape[1]

    def sample(self, n, generator=None):
        r"""n samples, [n x D]: pick a component $k \sim w$, then $x = \mu_k + s_k \odot z$."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=DTYPE)
        return self.means[k] + self.stds[k] * z

    def log_joint(self, x):
        r"""$\log w_k + \log N(x; \mu_k, \mathrm{diag}(s_k^2))$ for every particle and component, [N x K], for
        x: [N x D]."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [N, {self.dim}], got {tuple(x.shape)}")
        var = self.stds ** 2                                        # [K x D]
        diff = x[:, None, :] - self.means[None, :, :]               # [N x K x D]
        log_normal = -0.5 * (diff ** 2 / var + torch.log(2 * math.pi * var)).sum(-1)
        return torch.log(self.weights) + log_normal

    def log_prob(self, x):
        r"""$\log p(x)$, [N], for x: [N x D]."""
        return torch.logsumexp(self.log_joint(x), dim=1)

    def score(self, x):
        r"""$\nabla_x \log p(x)$, [N x D]: $\sum_k r_k(x) (\mu_k - x) / s_k^2$ with softmax responsibilities r_k."""
        r = torch.softmax(self.log_joint(x), dim=1)                # [N x K], stable: softmax subtracts the max
        return (r[:, :, None] * (self.means - x[:, None, :]) / self.stds ** 2).sum(1)

    def cdf(self, x):
        """CDF of a 1-D mixture, [N], for x: [N] or [N x 1]."""
        if self.dim != 1:
            raise ValueError("cdf is defined here for 1-D mixtures only")
        x = torch.as_tensor(x, dtype=DTYPE).reshape(-1, 1)
        return (self.weights * torch.special.ndtr((x - self.means[:, 0]) / self.stds[:, 0])).sum(1)


def mixture_score(sde, p0):
    r"""The closed-form score $s(x, t) = \nabla_x \log p_t(x)$ of the VP-SDE marginals of p0; x: [N x D], t: float."""
    return lambda x, t: sde.marginal(p0, t).score(x)


# default toys: separated modes with unequal weights and widths, so a wrong sampler shows up as wrong mode masses
MIXTURES = {
    1: dict(weights=[0.3, 0.45, 0.25], means=[-2.0, 0.5, 2.5], stds=[0.3, 0.4, 0.25]),
    2: dict(weights=[0.4, 0.35, 0.25], means=[[-1.5, -1.0], [1.5, -1.0], [0.0, 1.6]],
            stds=[[0.35, 0.35], [0.25, 0.5], [0.5, 0.25]]),
}


# %% Samplers ----------------------------------------------------------------------------------------------------
# Each takes x: [N x D] at its start time and returns x at its end time, or (ts, xs) with the whole path
# xs: [steps + 1 x N x D] at times ts: [steps + 1] when path=True. score(x, t) -> [N x D].

def _check(steps, x, t_start, t_end, forward):
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps}")
    if x.ndim != 2:
        raise ValueError(f"x must have shape [N, D], got {tuple(x.shape)}")
    if not (0.0 <= min(t_start, t_end) and max(t_start, t_end) <= 1.0 and (t_start < t_end) == forward
            and t_start != t_end):
        want = "0 <= t_start < t_end <= 1 (forward in time)" if forward else "1 >= t_start > t_end >= 0 (backward)"
        raise ValueError(f"need {want}, got t_start={t_start}, t_end={t_end}")


def _loop(t_start, t_end, steps, desc, progress):
    r"""Yield (t, dt) for the fixed grid $t_i = t_\text{start} + i\, (t_\text{end} - t_\text{start}) / \text{steps}$,
    $i = 0, \dots, \text{steps} - 1$."""
    dt = (t_end - t_start) / steps  # negative when running backwards in time
    for i in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        yield t_start + i * dt, dt


def _result(t_start, t_end, steps, x, xs, path):
    return (torch.linspace(t_start, t_end, steps + 1, dtype=DTYPE), torch.stack(xs)) if path else x


def forward_sde(x, sde, steps, t_start=0.0, t_end=1.0, generator=None, path=False, progress=False):
    r"""Euler-Maruyama on $dx = f\, dt + g\, dw$ from t_start to t_end > t_start (data -> noise)."""
    _check(steps, x, t_start, t_end, forward=True)
    xs = [x]
    for t, dt in _loop(t_start, t_end, steps, "forward SDE", progress):
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = x + sde.f(x, t) * dt + sde.g(t) * math.sqrt(dt) * z  # Brownian increment dw ~ N(0, dt)
        if path:
            xs.append(x)
    return _result(t_start, t_end, steps, x, xs, path)


def reverse_sde(score, x, sde, steps, t_start=1.0, t_end=0.0, generator=None, path=False, progress=False):
    """Euler-Maruyama on the reverse-time SDE (Eq. 6) from t_start down to t_end < t_start (noise -> data)."""
    _check(steps, x, t_start, t_end, forward=False)
    xs = [x]
    for t, dt in _loop(t_start, t_end, steps, "reverse SDE", progress):
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        # drift $f - g^2\, \text{score}$, multiplied by $dt < 0$. Signs: $f\, dt = +\tfrac{1}{2} \beta x |dt|$
        # undoes the forward shrinking; $-g^2\, \text{score}\, dt = +g^2\, \text{score}\, |dt|$ climbs the density.
        # The $g^2$ (not $\tfrac{1}{2} g^2$ as in the ODE) is $\tfrac{1}{2} g^2$ to transport p_t backwards plus
        # $\tfrac{1}{2} g^2$ to cancel the spreading by the fresh noise below (Anderson 1982).
        # The reverse-time Wiener increment has variance $|dt|$, hence $\sqrt{-dt}$.
        x = x + (sde.f(x, t) - sde.g(t) ** 2 * score(x, t)) * dt + sde.g(t) * math.sqrt(-dt) * z
        if path:
            xs.append(x)
    return _result(t_start, t_end, steps, x, xs, path)


def forward_ode(score, x, sde, steps, t_start=0.0, t_end=1.0, path=False, progress=False):
    """Euler on the probability-flow ODE (Eq. 13) from t_start to t_end > t_start (data -> noise), no noise."""
    _check(steps, x, t_start, t_end, forward=True)
    xs = [x]
    for t, dt in _loop(t_start, t_end, steps, "forward ODE", progress):
        # velocity $f - \tfrac{1}{2} g^2\, \text{score}$: Fokker-Planck
        # $dp/dt = -\nabla \cdot (f p) + \tfrac{1}{2} g^2 \Delta p$, and
        # $\tfrac{1}{2} g^2 \Delta p = \nabla \cdot (\tfrac{1}{2} g^2 p \nabla \log p)$, so diffusion acts on p_t like
        # transport by $-\tfrac{1}{2} g^2\, \text{score}$.
        # With $dt > 0$ the score term pushes particles down the density, spreading them as the noise would.
        x = x + (sde.f(x, t) - 0.5 * sde.g(t) ** 2 * score(x, t)) * dt
        if path:
            xs.append(x)
    return _result(t_start, t_end, steps, x, xs, path)


def reverse_ode(score, x, sde, steps, t_start=1.0, t_end=0.0, path=False, progress=False):
    """Euler on the probability-flow ODE (Eq. 13) from t_start down to t_end < t_start (noise -> data), no noise."""
    _check(steps, x, t_start, t_end, forward=False)
    xs = [x]
    for t, dt in _loop(t_start, t_end, steps, "reverse ODE", progress):
        # same velocity as forward_ode; $dt < 0$ flips both terms: $+\tfrac{1}{2} \beta x |dt|$ expands,
        # $+\tfrac{1}{2} g^2\, \text{score}\, |dt|$ concentrates particles onto the modes. Deterministic, so it inverts
        # forward_ode up to $O(|dt|)$ error.
        x = x + (sde.f(x, t) - 0.5 * sde.g(t) ** 2 * score(x, t)) * dt
        if path:
            xs.append(x)
    return _result(t_start, t_end, steps, x, xs, path)


# %% Figures -----------------------------------------------------------------------------------------------------

def _ks_pvalue(samples, p0):
    """One-sample KS test of 1-D samples against the exact mixture CDF: (statistic, p-value)."""
    from scipy.stats import kstest
    res = kstest(samples.numpy(), lambda v: p0.cdf(torch.as_tensor(v)).numpy())
    return res.statistic, res.pvalue


def plot_1d(runs, sde, p0, path, n_lines=250):
    """2 x 2 panels of paths x(t) with p_0 (left) and N(0, 1) (right) at the sides, plus histograms of the
    reverse samples against p_0. runs: name -> (ts, xs) as returned with path=True.
    Returns {"reverse SDE": (KS D, p), "reverse ODE": (KS D, p)} of the t = 0 samples against the exact p_0."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.gridspec import GridSpec

    lim = 4.0
    xg = torch.linspace(-lim, lim, 400, dtype=DTYPE)
    # p_t(x) on a (x, t) grid, drawn behind the paths; sqrt tames the tall narrow modes near t = 0
    dens = torch.stack([sde.marginal(p0, t).log_prob(xg[:, None]).exp() for t in torch.linspace(0, 1, 300).tolist()], 1)
    p_data = p0.log_prob(xg[:, None]).exp()
    p_noise = torch.exp(-0.5 * xg ** 2) / math.sqrt(2 * math.pi)
    colors = plt.get_cmap("tab10")([0, 2, 3, 1, 4])

    fig = plt.figure(figsize=(15, 12))
    gs = GridSpec(3, 7, figure=fig, width_ratios=[1, 5, 1, 0.5, 1, 5, 1], height_ratios=[1, 1, 0.8],
                  wspace=0.05, hspace=0.3)
    for name, row, col in (("forward SDE", 0, 0), ("forward ODE", 0, 4), ("reverse SDE", 1, 0), ("reverse ODE", 1, 4)):
        ts, xs = runs[name]
        forward = ts[0] < ts[-1]
        x_at_0, x_at_1 = (xs[0, :, 0], xs[-1, :, 0]) if forward else (xs[-1, :, 0], xs[0, :, 0])
        left = fig.add_subplot(gs[row, col])
        ax = fig.add_subplot(gs[row, col + 1], sharey=left)
        right = fig.add_subplot(gs[row, col + 2], sharey=left)
        ax.imshow(dens.sqrt().numpy(), origin="lower", aspect="auto", extent=(0, 1, -lim, lim), cmap="Blues",
                  alpha=0.5, interpolation="bilinear")
        # colour each path by the mode it occupies at t = 0 (its start going forward, its end going backward)
        mode = torch.argmax(p0.log_joint(x_at_0[:n_lines, None]), dim=1)
        segs = torch.stack([ts[None, :].expand(len(mode), -1), xs[:, :n_lines, 0].T], -1)
        ax.add_collection(LineCollection(segs.numpy(), colors=colors[mode.numpy()], linewidths=0.5, alpha=0.5))
        ax.set_xlim(0, 1)
        ax.set_ylim(-lim, lim)
        kind = "Euler-Maruyama" if "SDE" in name else "probability flow, Euler"
        arrow = "0 \u2192 1" if forward else "1 \u2192 0"
        ax.set_title(f"{name}, t: {arrow}  ({kind})", fontsize=11)
        ax.set_xlabel("t")
        ax.tick_params(labelleft=False)
        # sides: exact density (black) over the histogram of all particles at that end
        for side, x_end, curve, label in ((left, x_at_0, p_data, "p_0"), (right, x_at_1, p_noise, "N(0, 1)")):
            side.hist(x_end.numpy(), bins=100, range=(-lim, lim), density=True, orientation="horizontal",
                      histtype="stepfilled", color="0.8")
            side.plot(curve.numpy(), xg.numpy(), color="k", lw=1.0)
            side.set_xticks([])
            side.set_title(label, fontsize=9)
            side.set_xlim(0, 1.1 * max(curve.max().item(), 0.45))
        left.invert_xaxis()  # the data density bulges out to the left, away from the paths
        left.set_ylabel("x")
        right.tick_params(labelleft=False)

    ks = {}
    for col, name in ((slice(0, 3), "reverse SDE"), (slice(4, 7), "reverse ODE")):
        ax = fig.add_subplot(gs[2, col])
        x0 = runs[name][1][-1, :, 0]
        stat, p = ks[name] = _ks_pvalue(x0, p0)
        ax.hist(x0.numpy(), bins=120, range=(-lim, lim), density=True, histtype="stepfilled", color="C0", alpha=0.45,
                label=f"{name} samples at t = 0 (N = {len(x0)})")
        ax.plot(xg.numpy(), p_data.numpy(), "k", lw=1.3, label="exact p_0")
        ax.set_title(f"{name} from N(0, 1), samples at t = 0: KS vs exact p_0: D = {stat:.4f}, p = {p:.2g}",
                     fontsize=10)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(0, 1.3 * p_data.max().item())
        ax.set_xlabel("x")
        ax.legend(fontsize=9, loc="upper left", frameon=False)
    fig.suptitle(f"VP-SDE (beta {sde.beta_min:g} \u2192 {sde.beta_max:g}) on a 1-D Gaussian mixture with closed-form"
                 f" score: {n_lines} paths per panel, shading = p_t(x), colour = mode at t = 0", fontsize=13, y=0.93)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return ks


def plot_2d(runs, sde, p0, path, times=(0.0, 0.1, 0.2, 0.35, 0.5, 1.0), n_points=1500):
    """Rows: the 4 processes; columns: the particles at a few times, coloured by their mode at t = 0, under
    contour lines of the exact p_t. runs: name -> (ts, xs) as returned with path=True."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim = 3.5
    g = torch.linspace(-lim, lim, 200, dtype=DTYPE)
    gx, gy = torch.meshgrid(g, g, indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)             # [200^2 x 2]
    colors = plt.get_cmap("tab10")([0, 2, 3, 1, 4])
    names = ("forward SDE", "reverse SDE", "forward ODE", "reverse ODE")
    fig, axes = plt.subplots(4, len(times), figsize=(2.6 * len(times), 11.2))
    for j, t in enumerate(times):
        dens = sde.marginal(p0, t).log_prob(grid).exp().reshape(gx.shape).numpy()
        for i, name in enumerate(names):
            ts, xs = runs[name]
            x_at_0 = xs[0] if ts[0] < ts[-1] else xs[-1]
            mode = torch.argmax(p0.log_joint(x_at_0[:n_points]), dim=1).numpy()
            pts = xs[int(torch.argmin((ts - t).abs())), :n_points]     # the saved step closest to t
            ax = axes[i, j]
            ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=4, alpha=0.6, c=colors[mode], linewidths=0)
            ax.contour(gx.numpy(), gy.numpy(), dens, levels=6, colors="k", linewidths=0.7, alpha=0.7)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
            ax.tick_params(labelbottom=i == 3, labelleft=j == 0)
            if i == 0:
                ax.set_title(f"t = {t:g}" + ("  (data)" if t == 0 else "  (noise)" if t == 1 else ""))
            if j == 0:
                arrow = "0 \u2192 1" if ts[0] < ts[-1] else "1 \u2192 0"
                ax.set_ylabel(f"{name}\nt: {arrow}")
    fig.suptitle(f"VP-SDE (beta {sde.beta_min:g} \u2192 {sde.beta_max:g}) on a 2-D Gaussian mixture with closed-form"
                 f" score: {n_points} particles per panel, coloured by mode at t = 0; lines: exact p_t", fontsize=12)
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.04, top=0.93, wspace=0.08, hspace=0.12)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# %% CLI ---------------------------------------------------------------------------------------------------------

def main(argv=None):
    ap = rundir.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder; the PNG is written there")
    ap.add_argument("--dim", type=int, default=1, choices=(1, 2), help="1-D (trajectories) or 2-D (scatter) toy")
    ap.add_argument("--particles", type=rundir.positive_int, default=5000,
                    help="particles per process (whole paths are kept: 4 x particles x (steps + 1) x dim floats)")
    ap.add_argument("--steps", type=rundir.positive_int, default=1000,
                    help="integration steps per process, |dt| = 1 / steps")
    ap.add_argument("--seed", type=rundir.seed_arg, default=0)
    ap.add_argument("--beta-min", type=float, default=0.1)
    ap.add_argument("--beta-max", type=float, default=20.0)
    args = ap.parse_args(argv)

    try:
        sde = VPSDE(args.beta_min, args.beta_max)
    except ValueError as e:
        ap.error(str(e))
    out = os.path.join(rundir.make_out_dir(args.out), f"sde_toy_{args.dim}d.png")  # before the simulation
    p0 = GaussianMixture(**MIXTURES[args.dim])
    score = mixture_score(sde, p0)
    gen = torch.Generator().manual_seed(args.seed)
    n, steps = args.particles, args.steps

    x0 = p0.sample(n, gen)                                           # data at t = 0
    x1 = torch.randn(n, p0.dim, generator=gen, dtype=DTYPE)         # prior at t = 1
    runs = {
        "forward SDE": forward_sde(x0, sde, steps, generator=gen, path=True, progress=True),
        "reverse SDE": reverse_sde(score, x1, sde, steps, generator=gen, path=True, progress=True),
        "forward ODE": forward_ode(score, x0, sde, steps, path=True, progress=True),
        "reverse ODE": reverse_ode(score, x1, sde, steps, path=True, progress=True),
    }
    for name, (_, xs) in runs.items():  # Euler steps of beta(t) dt well above 1 blow up: say so, draw nothing
        if not torch.isfinite(xs).all():
            raise rundir.UsageError(f"the {name} left the finite numbers (beta(t) |dt| reaches "
                                    f"{sde.beta_max / steps:.3g} per step); raise --steps or lower --beta-max")
    if args.dim == 1:
        for name, (stat, p) in plot_1d(runs, sde, p0, out).items():
            print(f"{name} samples at t = 0, one-sample KS against the exact p_0: D = {stat:.4f}, p = {p:.3g}")
    else:
        plot_2d(runs, sde, p0, out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    rundir.run_cli(main)  # a user's mistake (rundir.UsageError): one line, exit status 2; a bug: a traceback
