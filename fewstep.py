"""Few-step generation: flow models trained from scratch to be good at 1, 2 and 4 network evaluations (NFE).

Twelve methods, one class each (the protocol: class Method), its docstring the paper (summary, `Paper:`, equations,
every deviation and why). Options are dataclass fields `x: float = option(default, "help")` (saved with the run,
made flags by trainer.py); `loss(net, x1, x0=None, ema=None, y=None)` trains any `net(x, t, cond=None, y=None)` (y:
class labels, or None); `sample(net, noise, nfe, y=None)` runs it exactly nfe times per image; `check_nfe(nfe)`
raises UnsupportedNFE for an NFE it cannot do exactly; the runner sets `teacher` and `training_step`. trainer.py
holds the loop, CLI, evaluation and report; cs492c.py and aic313.py the course exports. Copy this file anywhere.

    rf        RectifiedFlow            Liu et al., arXiv:2209.03003; Lipman et al., arXiv:2210.02747
    reflow    Reflow                   Liu et al., arXiv:2209.03003 (Sec. 2.3)
    shortcut  Shortcut                 Frans et al., arXiv:2410.12557
    meanflow  MeanFlow                 Geng et al., arXiv:2505.13447
    imf       ImprovedMeanFlow         Geng et al., arXiv:2512.02012
    pmf       PixelMeanFlow            Lu et al., arXiv:2601.22158
    cm        ConsistencyModel         Song et al., arXiv:2303.01469; Song & Dhariwal, arXiv:2310.14189
    scm       ContinuousConsistency    Lu & Song, arXiv:2410.11081
    ctm       CTM                      Kim et al., arXiv:2310.02279
    pd        ProgressiveDistillation  Salimans & Ho, arXiv:2202.00512
    ld3       LD3                      Tong et al., arXiv:2405.15506
    dmd2      DMD2                     Yin et al., arXiv:2405.14867
Time convention: t in [0, 1], t = 0 is noise x0 ~ N(0, I), t = 1 is data x1 (an image in [-1, 1]); the path is
x_t = (1 - t) x0 + t x1 and sampling integrates FORWARD from 0 to 1. Other conventions (MeanFlow's t', EDM's sigma,
TrigFlow's tau) are mapped in their class's docstring. The network sees TIME_SCALE t (a second scalar alike).
"""
import copy
import dataclasses
import math

import torch
import torch.nn.functional as F

TIME_SCALE, TIME_DISTS = 1000.0, ("uniform", "logit-normal")  # 1000 t: unet.py embeds DDPM's integer steps 0..999
SAMPLING_GUIDANCE = "class-conditional runs: classifier-free guidance scale w at sampling (a guided step: 2 NFE)"


def option(default, help, flag=None, choices=None):  # default: the paper's unless the help says otherwise
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "choices": choices})


def expand_t(t, x):  # a (B,) tensor as (B, 1, ..., 1), so that it broadcasts against x: (B, C, H, W)
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def interpolate(x0, x1, t):  # x_t = (1 - t) x0 + t x1, the straight path from noise x0 to data x1; t: (B,)
    return (1 - expand_t(t, x1)) * x0 + expand_t(t, x1) * x1


class UnsupportedNFE(ValueError): pass  # an NFE that a method cannot do with exactly that many network evaluations


@dataclasses.dataclass(eq=False)
class Method:
    """The protocol every method follows; the defaults are those of a plain loss over batches."""
    name = "method"
    uses_cond, second_scalar, time_scale = False, None, TIME_SCALE  # a second scalar? its meaning; net sees scale t
    time_input = "t"  # the time the network is given (times time_scale): this file's t, or scm's TrigFlow tau
    teacher_methods, needs_teacher, init_from_teacher = (), False, False  # --teacher: which runs, required, init
    couples_with_teacher = False  # trains on (noise, teacher output) pairs instead of images (reflow)
    sampling_options = ()  # options of sample() alone: a resumed or re-scored run may replace them
    uses_jvp, state_for_sampling = False, False  # forward-mode AD (no compile); sampling needs state_dict()
    teacher, training_step, last_metrics = None, 0, {}  # set by the runner; extra numbers a loss logs
    num_classes, label_dropout = None, 0.1  # set by the runner for a class-conditional run (null label: num_classes)
    guidance_input, not_options = False, ()  # the net takes a guidance scale (imf); inherited fields it ignores

    def config(self):  # the options as JSON values (what config.json keeps)
        def plain(v):
            if isinstance(v, dict):
                return {str(k): plain(x) for k, x in sorted(v.items())}
            return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v
        fields = [f for f in dataclasses.fields(self) if f.name not in self.not_options]
        return {f.name: plain(getattr(self, f.name)) for f in fields}

    def check_nfe(self, nfe):
        if not isinstance(nfe, int) or nfe < 1:
            raise UnsupportedNFE(f"NFE must be an integer >= 1, got {nfe!r}")

    def teacher_ok(self, teacher_config):  # None if that run can teach the method, else why not
        if teacher_config["method"] not in self.teacher_methods or teacher_config["method_args"].get("distill"):
            return f"{self.name} learns from a flow teacher: a {' or '.join(self.teacher_methods)} run" + \
                (" (reflow: without --distill)" if "reflow" in self.teacher_methods else "")

    def make_optimizer(self, net, lr, weight_decay):
        return torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)

    def on_step(self, step, net, ema): pass  # called before every step's loss and on resume
    def sampling_net(self, nfe, ema): return ema  # the network that samples at this NFE
    def state_dict(self): return {}  # the method's own training state, saved with the checkpoint
    def load_state_dict(self, state): pass
    def default_steps(self): return None  # the training length without --steps (None: the runner's budget)
    def describe_run(self): return ""  # a sentence for report.md on this run's own choices
    def bound(self, net, y): return Conditioned(net, y, self.num_classes)  # net with the batch's labels (or None)
    def guided_teacher(self, y): return Guided(self.teacher, y, self.num_classes, self.guidance)  # the teacher's w
    def guided(self): return self.num_classes is not None and self.guidance != 1  # rf, shortcut: 2 NFE per step


# %% rf: rectified flow / flow matching ----------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class RectifiedFlow(Method):
    r"""Rectified flow: the network regresses the velocity x1 - x0 of the straight line from a noise sample x0 to a
    data sample x1 at a random time t; samples integrate the learned ODE with n = NFE uniform Euler steps.

    Paper: Liu, Gong, Liu. Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow.
    ICLR 2023, arXiv:2209.03003. Lipman, Chen, Ben-Hamu, Nickel, Le. Flow Matching for Generative Modeling.
    ICLR 2023, arXiv:2210.02747 (the same loss, sigma_min = 0).

        $$ L = E_{t, x_0, x_1} \| v_\theta(x_t, t) - (x_1 - x_0) \|^2, \quad x_t = (1 - t)\, x_0 + t\, x_1
           \qquad \text{(Liu et al. Eq. 1)} $$
        $$ x_{k+1} = x_k + \tfrac{1}{n} v_\theta(x_k, k/n), \quad k = 0, \dots, n - 1 \qquad \text{(Euler, NFE } n) $$
    The minimiser $v(x, t) = E[x_1 - x_0 | x_t = x]$ carries N(0, I) to the data, on paths that curve where lines of
    different (x0, x1) cross: one Euler step lands on a blurry average. The other methods fix that.
    The authors' code (gnobitab/RectifiedFlow) against this class, one line each:
    - times: theirs t in [eps, 1], eps = 1e-3, in the loss and Euler times eps + k (1 - eps) / n (step 1/n); here
      [0, 1] and k / n, as Eq. 1: the velocity is finite at t = 0 (the eps comes from their score-SDE base code).
    - their CIFAR-10 configs sample with scipy's RK45 (rtol = atol = 1e-5); here Euler at exactly NFE calls."""
    name = "rf"
    sampling_options = ("guidance",)  # applied at sampling: a re-scored run may change it
    time_dist: str = option("uniform", "time distribution (logit-normal: Esser et al. 2024)", choices=TIME_DISTS)
    logit_mean: float = option(0.0, "mean of the logit-normal time distribution")
    logit_std: float = option(1.0, "std of the logit-normal time distribution")
    guidance: float = option(1.0, SAMPLING_GUIDANCE, flag="--guidance")

    def __post_init__(self):
        require(self.time_dist in TIME_DISTS, f"unknown time distribution; use one of {TIME_DISTS}", self, "time_dist")

    def check_nfe(self, nfe):
        super().check_nfe(nfe)
        if self.guided() and nfe % 2:
            raise UnsupportedNFE(f"{self.name} with guidance {self.guidance:g}: each Euler step runs the network on "
                                 f"the labelled and the null branch (2 NFE), so it can do even NFEs, not {nfe}; "
                                 f"--guidance 1 samples without guidance")

    def velocity(self, net, x, t): return net(x, TIME_SCALE * t)  # v_theta(x, t) for t: (B,) in [0, 1]

    def loss(self, net, x1, x0=None, ema=None, y=None):
        """x1: (B, C, H, W) data in [-1, 1]; x0: its noise partner (default: fresh N(0, I), independent of x1);
        y: class labels or None, dropped to the null label at label_dropout (the guidance's unconditional net)."""
        net = Conditioned(net, drop_labels(y, self.label_dropout, self.num_classes), self.num_classes)
        x0 = torch.randn_like(x1) if x0 is None else x0
        t = sample_time(x1.shape[0], x1.device, self.time_dist, self.logit_mean, self.logit_std)
        return F.mse_loss(self.velocity(net, interpolate(x0, x1, t), t), x1 - x0)  # Eq. 1; fp32 under autocast

    def sample(self, net, noise, nfe, y=None):
        """nfe Euler steps; guided (class labels y and guidance != 1): nfe / 2 steps of 2 NFE each."""
        self.check_nfe(nfe)
        if self.guided() and y is not None:
            return euler(Guided(net, y, self.num_classes, self.guidance), noise, nfe // 2)
        return euler(Conditioned(net, y, self.num_classes), noise, nfe)


def sample_time(n, device, dist="uniform", logit_mean=0.0, logit_std=1.0):  # logit-normal: arXiv:2403.03206
    if dist == "logit-normal":
        return torch.sigmoid(logit_mean + logit_std * torch.randn(n, device=device))
    return torch.rand(n, device=device)


def require(ok, why, method=None, *fields):  # an option check on method's fields: `ratio=1.5: why`; the runner
    if not ok:  # prints e.values by their flags and the values typed (`--ratio 1.5: why`), e.why in the words of --help
        values = {f: getattr(method, f) for f in fields}
        e = ValueError(", ".join(f"{k}={v!r}" for k, v in values.items()) + ": " * bool(values) + why)
        e.why, e.values = why, values
        raise e


def euler(net, x, nfe, t0=0.0):
    r"""nfe Euler steps (nfe calls) of dx/dt = net(x, TIME_SCALE t) from t0 to 1: $x_{k+1} = x_k + h\, v(x_k, t_k)$."""
    for k in range(nfe):
        t = torch.full((x.shape[0],), t0 + (1 - t0) * k / nfe, device=x.device)  # k / n, not a running sum
        x = x + (1 - t0) / nfe * net(x, TIME_SCALE * t)
    return x


# %% class labels and classifier-free guidance (used by every method; unlabelled runs pass y = None) -------------------
class Conditioned:
    """A network with the batch's class labels bound to its rows: calling it is net(x, t, cond, y=y), v(x, t | y).
    y None: an unlabelled run, the network is called as before. rows / repeat keep the labels aligned when a method
    takes some rows of the batch or stacks copies of it; null() is the same rows with the null label (guidance's
    unconditional branch, index num_classes). w: a per-row guidance input for a network that takes one (imf)."""
    def __init__(self, net, y=None, null_label=None, w=None):
        self.net, self.y, self.null_label, self.w = net, y, null_label, w

    def __call__(self, x, t, cond=None):
        kw = ({} if self.y is None else {"y": self.y}) | ({} if self.w is None else {"w": self.w})
        return self.net(x, t, **kw) if cond is None else self.net(x, t, cond, **kw)

    def like(self, y, w, net=None):  # the same kind of wrapper on other rows (or on the unwrapped network)
        return Conditioned(self.net if net is None else net, y, self.null_label, w)

    def rows(self, idx):
        return self if self.y is None else self.like(self.y[idx], None if self.w is None else self.w[idx])

    def repeat(self, k):
        return self if self.y is None else self.like(self.y.repeat(k), None if self.w is None else self.w.repeat(k))

    def null(self): return self if self.y is None else self.like(torch.full_like(self.y, self.null_label), self.w)

    def with_null(self):  # for the rows stacked twice: labels [y, null], guidance input [w, none] (one call, 2 NFE)
        w = None if self.w is None else torch.cat([self.w, torch.zeros_like(self.w)])
        return Conditioned(self.net, torch.cat([self.y, torch.full_like(self.y, self.null_label)]), self.null_label, w)

    @property
    def module(self):  # the unwrapped network (DDP's .module) with the same labels
        return self.like(self.y, self.w, getattr(self.net, "module", self.net))

    @property
    def distributed(self):
        return isinstance(self.net, torch.nn.parallel.DistributedDataParallel)


class Guided(Conditioned):
    r"""Classifier-free guidance at sampling time (Ho & Salimans, arXiv:2207.12598):
        $$ v = v(x | \text{null}) + w\, (v(x | y) - v(x | \text{null})), $$
    from one call on the batch stacked twice with labels [y, null]: two network evaluations per image, which the
    runner's counter counts (it counts rows). $w = 1$: the conditional network alone, one call."""
    def __init__(self, net, y, null_label, w):
        super().__init__(net, y, null_label)
        self.scale = w

    def like(self, y, w, net=None):
        return Guided(self.net if net is None else net, y, self.null_label, self.scale)

    def __call__(self, x, t, cond=None):
        if self.scale == 1 or self.y is None:
            return super().__call__(x, t, cond)
        two = lambda v: None if v is None else torch.cat([v, v])  # noqa: E731
        v_c, v_u = self.with_null()(two(x), two(t), two(cond)).chunk(2)
        return v_u + self.scale * (v_c - v_u)


TEACHER_GUIDANCE = ("class-conditional runs with --teacher: the guidance scale w of the teacher's velocity, which this "
                    "method learns (its own steps stay 1 NFE)")


def drop_labels(y, p, null_label):
    """Label dropout for classifier-free guidance: each label becomes the null label with probability p."""
    if y is None or not p:
        return y
    return torch.where(torch.rand(y.shape, device=y.device) < p, torch.full_like(y, null_label), y)


# %% reflow: k-rectified flow from a trained teacher's couplings ---------------------------------------------------
@dataclasses.dataclass(eq=False)
class Reflow(RectifiedFlow):
    r"""Reflow (2-rectified flow): pairs (x0, x1) are generated by integrating a trained rectified flow (the teacher)
    from noise x0 with many Euler steps; a rectified flow initialised from the teacher is then trained on these
    deterministic couplings, which straightens its paths so that few Euler steps suffice.

    Paper: Liu, Gong, Liu. Flow Straight and Fast. ICLR 2023, arXiv:2209.03003 (Sec. 2.3, "reflow").

        $$ (x_0, x_1) := (x_0, \mathrm{ODE}_\text{teacher}(x_0)), \quad \text{then rf's loss on these pairs} $$
    The teacher's flow does not cross itself, so the new lines cross less. distill=True trains only at $t = 0$,
    $L = \| x_0 + v_\theta(x_0, 0) - x_1 \|^2$, the one-step map; the paper's distillation adds LPIPS (weights not
    offline). The authors' code (gnobitab/RectifiedFlow) against this class, one line each:
    - pairs: theirs by rf's RK45 from t = 1e-3 (online: 20 Euler steps); here teacher_steps Euler steps from 0, batched.
    - distillation: theirs at t = eps = 1e-3 (reflow_t_schedule t0); here t = 0, the map from the noise itself."""
    name = "reflow"
    sampling_options = ()  # its guidance is in the teacher's pairs
    teacher_methods, needs_teacher, init_from_teacher = ("rf", "reflow"), True, True  # Liu et al. start from it
    couples_with_teacher = True
    distill: bool = option(False, "train the one-step map (t = 0 only)")
    teacher_steps: int = option(100, "Euler steps of the teacher's ODE for each pair")
    num_pairs: int = option(None, "pairs drawn from the teacher (default: as many as training images)")
    guidance: float = option(1.0, "class-conditional runs: the teacher's guidance scale when it makes the pairs "
                                  "(the student then samples at 1 NFE per step)", flag="--guidance")

    def __post_init__(self):
        super().__post_init__()
        require(isinstance(self.teacher_steps, int) and self.teacher_steps >= 1, "must be an integer >= 1", self,
                "teacher_steps")

    def check_nfe(self, nfe):
        super().check_nfe(nfe)
        if self.distill and nfe != 1:
            raise UnsupportedNFE(f"reflow with distill=True is trained for one step only: it can sample at NFE 1, "
                                 f"not {nfe}; drop --distill for NFE {nfe}")

    def guided(self): return False  # the guidance is in the pairs: the student's own steps are single calls

    def make_pairs(self, teacher, noise, y=None):
        """x1 = the teacher's many-step Euler solution from noise x0 (teacher: a net(x, t) velocity), guided with
        scale `guidance` for labels y (then each teacher step costs two calls; pairs are made once)."""
        return euler(Guided(teacher, y, self.num_classes, self.guidance), noise, self.teacher_steps)

    def loss(self, net, x1, x0=None, ema=None, y=None):
        if x0 is None:
            raise ValueError("reflow trains on (noise, teacher output) pairs: pass the noise x0 of each x1")
        if not self.distill:
            return super().loss(net, x1, x0, y=y)
        net = Conditioned(net, drop_labels(y, self.label_dropout, self.num_classes), self.num_classes)
        t = torch.zeros(x1.shape[0], device=x1.device)
        return F.mse_loss(x0 + self.velocity(net, x0, t), x1)  # one Euler step from t = 0 must land on x1


# %% shortcut: shortcut models -------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class Shortcut(Method):
    r"""Shortcut model: one network s(x_t, t, d) predicts the step of size d of an ideal ODE solver, trained with flow
    matching at d = 0 and with self-consistency: one step of size 2d must equal two steps of size d taken by the EMA
    network (stop-gradient). NFE n uses d = 1/n: NFE 1, 2 and 4 are one model at three step sizes.

    Paper: Frans, Hafner, Levine, Abbeel. One Step Diffusion via Shortcut Models. ICLR 2025, arXiv:2410.12557.

        $$ x_{t+d} = x_t + d\, s(x_t, t, d), \qquad s(x, t, 0) = v(x, t) $$
        $$ L = E \| s_\theta(x_t, t, 0) - (x_1 - x_0) \|^2
           + E \| s_\theta(x_t, t, 2d) - \mathrm{sg}[(s(x_t, t, d) + s(x'_{t+d}, t + d, d)) / 2] \|^2 $$
    The first term is flow matching, the second self-consistency (Frans Eq. 5), with the EMA network's half step
    $x'_{t+d} = x_t + d\, s(x_t, t, d)$. Sampling at NFE n (a power of two up to M) takes $d = 1/n$:
        $$ x_{k+1} = x_k + d\, s_\theta(x_k, k d, d), \quad k = 0, \dots, n - 1 $$
    Batch (Sec. 3.2, the authors' code): 1/bootstrap_every of it gets self-consistency targets, in one forward with the
    flow-matching rows; 2d and t as their targets_shortcut.py (bootstrap_rows: t on 2d's grid keeps the targets inside
    the unit interval). fm_d: "zero" (the paper: flow matching at d = 0, which also stands for 1/M) or "min" (their
    code). The authors' code (kvfrans/shortcut-models) against this class, one line each:
    - bootstrap share: the paper's 1/4 here; their train.py defaults to bootstrap_every 8 (1/8), their README too.
    - sigma_min: theirs 1e-5, x_t = (1 - (1 - 1e-5) t) x0 + t x1; here 0, rf's path (theirs: data x1 + 1e-5 x0).
    - flow-matching t: theirs on the grid i/M; here continuous (time_dist), as the paper writes flow matching.
    - labels: theirs drop on flow-matching rows (so null learns d = 1/M only); here on all rows, for guided d > 1/M.
    - their flow-matching rows reuse the bootstrap rows' images (their issue #10); here each image once.
    - their ImageNet commands add bootstrap_cfg (guided targets at 2d = 2/M, w 1.5); here guidance acts at sampling.
    - they sample with the online weights (use_ema 0); here with the EMA, as every method of this file."""
    name = "shortcut"
    uses_cond, second_scalar, sampling_options = True, "step size d", ("guidance",)
    max_steps: int = option(128, "M, the finest step 1/M (a power of two; NFE 1, 2, 4, ..., M)")
    bootstrap_every: int = option(4, "1/k of the batch gets self-consistency targets (4: the paper's; their code: 8)")
    fm_d: str = option("zero", "d of the flow-matching rows: zero (the paper) or min = 1/M (the authors' code)",
                       choices=("zero", "min"))
    bootstrap_ema: bool = option(True, "bootstrap targets from the online net, not the EMA", flag="--no-bootstrap-ema")
    time_dist: str = option("uniform", "time distribution (logit-normal: Esser et al. 2024)", choices=TIME_DISTS)
    guidance: float = option(1.0, SAMPLING_GUIDANCE, flag="--guidance")
    clip = 4.0  # the authors' bound on the EMA half step x'_{t+d} and the target (data in [-1, 1]), kept

    def __post_init__(self):
        m, k = self.max_steps, self.bootstrap_every
        require(isinstance(m, int) and m >= 2 and not m & (m - 1), "must be a power of two >= 2 (the paper uses 128)",
                self, "max_steps")
        require(isinstance(k, int) and k >= 2, "must be an integer >= 2 (the paper: 4)", self, "bootstrap_every")
        require(self.fm_d in ("zero", "min") and self.time_dist in TIME_DISTS,
                f"fm_d must be zero or min and time_dist one of {TIME_DISTS}", self, "fm_d", "time_dist")

    def check_nfe(self, nfe):
        per_step = 2 if self.guided() else 1  # a guided step runs the labelled and the null branch
        ok = [per_step * 2 ** k for k in range(int(math.log2(self.max_steps)) + 1)]
        if nfe not in ok:
            raise UnsupportedNFE("shortcut samples with d = 1/steps and is trained on power-of-two steps"
                                 + (f" of {per_step} NFE each (guidance {self.guidance:g})" if per_step > 1 else "")
                                 + f": it can do NFE {', '.join(map(str, ok))}, not {nfe!r}")

    def step(self, net, x, t, d):
        r"""$s_\theta(x, t, d)$ for t, d: (B,). The smallest step 1/M is the flow-matching one (see fm_d)."""
        d_fm = 0.0 if self.fm_d == "zero" else 1.0 / self.max_steps
        d = torch.where(d <= 1.0 / self.max_steps, torch.full_like(d, d_fm), d)
        return net(x, TIME_SCALE * t, cond=TIME_SCALE * d)

    def loss(self, net, x1, x0=None, ema=None, y=None):
        y = drop_labels(y, self.label_dropout, self.num_classes)
        net, ema = Conditioned(net, y, self.num_classes), None if ema is None else Conditioned(ema, y, self.num_classes)
        b, dev = x1.shape[0], x1.device
        nb = b // self.bootstrap_every  # self-consistency share of the batch
        x0 = torch.randn_like(x1) if x0 is None else x0
        two_d, t_sc = self.bootstrap_rows(nb, dev)
        d = two_d / 2
        x_sc = interpolate(x0[:nb], x1[:nb], t_sc)
        with torch.no_grad():
            teacher = (ema if (self.bootstrap_ema and ema is not None) else net).rows(slice(0, nb))
            s1 = self.step(teacher, x_sc, t_sc, d)
            x_mid = (x_sc + expand_t(d, x_sc) * s1).clamp(-self.clip, self.clip)  # x'_{t+d} = x_t + d s(x_t, t, d)
            target_sc = ((s1 + self.step(teacher, x_mid, t_sc + d, d)) / 2).clamp(-self.clip, self.clip)  # Eq. 5
        t_fm = sample_time(b - nb, dev, self.time_dist)  # flow matching on the rest, at d = 0
        x_fm = interpolate(x0[nb:], x1[nb:], t_fm)
        pred = self.step(net, torch.cat([x_sc, x_fm]), torch.cat([t_sc, t_fm]),
                         torch.cat([two_d, torch.zeros(b - nb, device=dev)]))
        return F.mse_loss(pred, torch.cat([target_sc.to(pred.dtype), x1[nb:] - x0[nb:]]))

    def bootstrap_rows(self, nb, device):
        """2d and t of the nb self-consistency rows, the authors' split: nb // log2 M rows at each 2d = 2/M, ..., 1/2, 1
        (finest first), the rest (all, if fewer than levels) at 2d = 1; t uniform on 2d's grid {0, 2d, ..., 1 - 2d}."""
        levels = int(math.log2(self.max_steps))
        k = torch.arange(levels - 1, -1, -1, device=device).repeat_interleave(nb // levels)  # 2d = 2^-k
        k = torch.cat([k, torch.zeros(nb - len(k), dtype=k.dtype, device=device)])
        two_d = 2.0 ** (-k.float())
        return two_d, torch.floor(torch.rand(nb, device=device) / two_d) * two_d

    def sample(self, net, noise, nfe, y=None):
        self.check_nfe(nfe)
        guided = self.guided() and y is not None
        net = Guided(net, y, self.num_classes, self.guidance) if guided else Conditioned(net, y, self.num_classes)
        n = nfe // 2 if guided else nfe  # steps
        x, d = noise, torch.full((noise.shape[0],), 1.0 / n, device=noise.device)
        for k in range(n):
            x = x + self.step(net, x, torch.full_like(d, k / n), d) / n  # x_{k+1} = x_k + d s(x_k, k d, d)
        return x


def grid_times(nfe, given=None):
    r"""$0 = t_0 < t_1 < \dots < t_n = 1$, n = nfe: the uniform grid $t_k = k / n$, or the times `given` at nfe."""
    return (0.0, *((given or {}).get(nfe) or (k / nfe for k in range(1, nfe))), 1.0)


def parse_times(method, field, lo=0.0, hi=1.0):
    """{NFE: (t_1 < ... < t_(NFE-1))} from method.<field> {NFE: [t, ...]} (keys int or str, as JSON gives them back),
    each grid checked: one time fewer than its NFE, strictly increasing, inside (lo, hi)."""
    out = {}
    for key, ts in dict(getattr(method, field) or {}).items():
        nfe, ts = int(key), tuple(float(t) for t in ts)
        require(nfe >= 2 and len(ts) == nfe - 1, f"NFE {nfe} re-enters the path at {nfe - 1} intermediate times, got "
                                                 f"{len(ts)}", method, field)
        require(all(a < b for a, b in zip(ts, ts[1:])) and all(lo < t < hi for t in ts),
                f"the times of NFE {nfe} must increase strictly inside ({lo:.4g}, {hi:.4g}) (t = 0 noise, t = 1 data), "
                f"got {','.join(map(str, ts))}", method, field)
        out[nfe] = ts
    return out


# %% meanflow / imf: average-velocity models -----------------------------------------------------------------------
def jvp(fn, primals, tangents):
    """torch.func.jvp, attention on the math backend (matmul + softmax have forward-mode rules; fused ones may not)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(fn, primals, tangents)


@dataclasses.dataclass(eq=False)
class MeanFlow(Method):
    r"""MeanFlow: the network predicts the average velocity u(x_t, t, s) over [t, s], so that x_s = x_t + (s - t) u. It
    is trained on the MeanFlow identity u = v + (s - t) du/dt, whose total derivative du/dt is a Jacobian-vector product
    of the network, with the regression target stopped from the gradient; one step from noise is x1 = x0 + u(x0, 0, 1).

    Paper: Geng, Deng, Bai, Kolter, He. Mean Flows for One-step Generative Modeling. NeurIPS 2025, arXiv:2505.13447.

        $$ u(x_t, t, s) = \frac{1}{s - t} \int_t^s v(x_\tau, \tau)\, d\tau, \qquad s \ge t $$
        $$ u(x_t, t, s) = v(x_t, t) + (s - t) \frac{du}{dt}, \qquad \frac{du}{dt} = v \cdot \partial_x u + \partial_t u
           \qquad \text{(Geng Eq. 6)} $$
        $$ L = E\, w \| u_\theta(x_t, t, s) - \mathrm{sg}[v + (s - t) \tfrac{d u_\theta}{dt}] \|^2, \quad v = x_1 - x_0
           \qquad \text{(Eq. 9-10)} $$
        $$ w = \mathrm{sg}[1 / (\|\delta\|^2 + c)^p] \qquad \text{(adaptive weight, Sec. 4.3; } \|\delta\|^2
           \text{ summed over pixels)} $$
        $$ x_{k+1} = x_k + (t_{k+1} - t_k)\, u(x_k, t_k, t_{k+1}), \quad 0 = t_0 < \dots < t_n = 1
           \qquad \text{(Alg. 2)} $$
    Convention: the paper's $z_{t'} = (1 - t') x + t' \epsilon$ runs backwards: $t' = 1 - t$, $r' = 1 - s$, $v' = -v$,
    $u' = -u$; its $u = v - (t' - r')\, du/dt$ is the same equation. du/dt: the JVP along the tangent
    $(\dot x, \dot t, \dot s) = (v, 1, 0)$. Times: t', r' ~ logit-normal(time_mean, time_std) in the paper's convention,
    sorted t' >= r', and r' := t' on a share 1 - ratio of the batch (plain flow matching; each row with probability
    1 - ratio as py-meanflow; the JAX codes of MeanFlow, iMF, pMF take a fixed count, the same in expectation);
    defaults: the paper's CIFAR-10 U-Net recipe. Second scalar: the span s - t (Table 1c), 0 at s = t, where unet.py's
    zero-initialised cond embedding gives a plain flow net. The network sees time_scale t and time_scale (s - t),
    time_scale = 1 as the authors' (an embedding of 1000 t turns 1000 times faster; its JVP derivative makes the target
    unstable). This project's options: `times` (any grid: the identity holds at every (t, s)); grid_share (that share of
    the s != t rows takes grid jumps (k/n, (k+1)/n), n in grid_nfes, where the logit-normal puts little mass);
    fd_step = $h > 0$: du/dt by a central difference, one no-grad forward of 2n rows (du/dt enters the loss stopped),
    error $O(h^2) + O(\epsilon / h)$, $\epsilon$ the float32 rounding; without forward-mode AD, torch.compile applies.
    Labelled runs (Sec. 4.2, guidance trained in): on rows that kept their label, v in the target and tangent becomes
        $$ v_g = \omega v + \kappa\, u(x_t, t, t | y) + (1 - \omega - \kappa)\, u(x_t, t, t | \text{null}),
           \quad \omega = w (1 - \kappa) $$
    (both u stopped; guided_velocity): its fixed point is the field guided at scale w, at 1 NFE per step. Label dropout
    as the authors' code (dropped_rows): a Binomial(B, p) count of rows, the s = t rows first, takes the null label and
    keeps v, teaching the u(x_t, t, t | null) that v_g reads."""
    name = "meanflow"
    uses_cond, second_scalar = True, "span s - t"
    sort_first = True  # sample_times: sort (t', r') before setting r' = t' on the flow-matching share (pmf: after)
    sampling_options = ("times",)
    ratio: float = option(0.75, "share of the batch with s != t")
    time_mean: float = option(-2.0, "logit-normal mean of the times (paper convention)")
    time_std: float = option(2.0, "logit-normal std of the times")
    adaptive_p: float = option(0.75, "adaptive weight power p, 0 = plain L2")
    adaptive_c: float = option(1e-3, "adaptive weight constant c")
    time_scale: float = option(1.0, "the net sees this times t and s - t (other methods: 1000)", flag="--mf-time-scale")
    grid_share: float = option(0.0, "share of the s != t rows whose (t, s) is a jump of a sampling grid")
    grid_nfes: tuple = option((1, 2, 4), "the NFEs whose sampling grids --grid-share draws from", flag="--nfe")
    times: dict = option(None, "sampling grid of an NFE, e.g. 2:0.6 (default k/NFE)", flag="--mf-times")
    fd_step: float = option(0.0, "du/dt by a central finite difference with step H (e.g. 3e-3) instead of the "
                                 "exact JVP; 0 = exact", flag="--jvp-fd-step")
    guidance: float = option(1.0, "class-conditional runs: the guidance scale w trained into the network (1: none; "
                                  "sampling stays 1 NFE per step)", flag="--guidance")
    kappa: float = option(0.5, "kappa of the guided target: the share of the network's own conditional velocity "
                               "in it (omega = w (1 - kappa))", flag="--mf-kappa")

    def __post_init__(self):
        self.times = parse_times(self, "times")
        self.grid_nfes = tuple(sorted(set(self.grid_nfes)))
        require(0.0 <= self.fd_step < 0.1, "must be in [0, 0.1) (0 = exact JVP; 3e-3 suits float32)", self, "fd_step")
        require(0.0 <= self.grid_share <= 1.0, "must be in [0, 1]", self, "grid_share")
        require(self.grid_nfes and all(isinstance(n, int) and n >= 1 for n in self.grid_nfes),
                "NFEs must be integers >= 1", self, "grid_nfes")
        require(0.0 <= self.ratio <= 1.0, "the share of the batch with s != t must be in [0, 1]", self, "ratio")
        for field in ("time_std", "time_scale", "adaptive_c"):
            require(getattr(self, field) > 0, "must be > 0", self, field)
        require(self.adaptive_p >= 0, "the adaptive weight's power must be >= 0", self, "adaptive_p")
        require(self.guidance >= 1 and 0 <= self.kappa < 1, "need w >= 1 and 0 <= kappa < 1", self, "guidance", "kappa")

    @property
    def uses_jvp(self): return not self.fd_step

    def describe_run(self):
        return "" if not self.fd_step else (
            f"This run computes du/dt by a central finite difference instead of the JVP along the same tangent (dx/dt, "
            f"1, 0) (--jvp-fd-step {self.fd_step:g}, this project's option): [u(x_t + h dx/dt, t + h, s) - u(x_t - h "
            f"dx/dt, t - h, s)] / 2h with h = {self.fd_step:g}, one forward without a graph.")

    def average_velocity(self, net, x, t, s):
        r"""$u_\theta(x, t, s)$ for $t \le s$: (B,) in [0, 1]; the network sees time_scale t and time_scale (s - t)."""
        return net(x, self.time_scale * t, cond=self.time_scale * (s - t))

    def total_derivative(self, net, x, t, s, dxdt):
        r"""$(u_\theta, du_\theta/dt)$ by one forward-mode JVP along $(\dot x, \dot t, \dot s) = (dxdt, 1, 0)$."""
        return jvp(lambda x, t, s: self.average_velocity(net, x, t, s), (x, t, s),
                   (dxdt, torch.ones_like(t), torch.zeros_like(s)))

    @torch.no_grad()
    def finite_difference_derivative(self, net, x, t, s, dxdt):
        r"""$du/dt \approx [u(x + h \dot x, t + h, s) - u(x - h \dot x, t - h, s)] / 2h$, h = fd_step, $\dot x$ = dxdt:
        both points in one forward of 2n rows, float32 even under bf16 autocast (whose rounding / 2h would swamp it)."""
        h = self.fd_step
        pm = torch.cat([torch.ones_like(t), -torch.ones_like(t)]) * h  # +h for the first n rows, -h for the rest
        x2, dxdt2 = torch.cat([x, x]).float(), torch.cat([dxdt, dxdt]).float()
        net = net if isinstance(net, Conditioned) else Conditioned(net)
        with torch.autocast(x.device.type, enabled=False):
            u = self.average_velocity(net.repeat(2), x2 + expand_t(pm, x2) * dxdt2, torch.cat([t, t]) + pm,
                                      torch.cat([s, s])).float()
        u_plus, u_minus = u.chunk(2)
        return (u_plus - u_minus) / (2 * h)

    def sample_times(self, b, device):
        r"""(t, s), $t \le s$, drawn in the paper's convention and mapped to this file's. sort_first: t' >= r' by a
        sort of the two draws, then r' := t' on the flow-matching share (MeanFlow's and iMF's code: t' is the larger
        of two draws on every row); False: r' := t' first, then the sort (pMF's code: t' is one draw on those rows)."""
        tp = torch.sigmoid(self.time_mean + self.time_std * torch.randn(b, device=device))
        rp = torch.sigmoid(self.time_mean + self.time_std * torch.randn(b, device=device))
        flat = torch.rand(b, device=device) < 1 - self.ratio  # r' = t' on 1 - ratio of them
        if self.sort_first:  # t' >= r', then r' := t' on the flow-matching share
            tp, rp = torch.maximum(tp, rp), torch.minimum(tp, rp)
            rp = torch.where(flat, tp, rp)
        else:  # r' := t' first, then t' >= r'
            rp = torch.where(flat, tp, rp)
            tp, rp = torch.maximum(tp, rp), torch.minimum(tp, rp)
        t, s = 1 - tp, 1 - rp  # t = 1 - t' (nearer the noise), s = 1 - r'
        if self.grid_share:  # (k / n, (k + 1) / n): n uniform from grid_nfes, k uniform from 0 .. n - 1
            nfes = torch.tensor(self.grid_nfes, device=device, dtype=torch.float32)
            n = nfes[torch.randint(len(nfes), (b,), device=device)]
            k = torch.floor(torch.rand(b, device=device) * n).clamp(max=n - 1)
            on_grid = (s != t) & (torch.rand(b, device=device) < self.grid_share)
            t, s = torch.where(on_grid, k / n, t), torch.where(on_grid, (k + 1) / n, s)
        return t, s

    def adaptive_loss(self, delta):
        r"""delta: (B, C, H, W) prediction - target; the batch mean of $\mathrm{sg}(w) \|\delta\|^2$ (w: Sec. 4.3's)."""
        err = delta.pow(2).flatten(1).sum(1)
        w = 1.0 / (err.detach() + self.adaptive_c) ** self.adaptive_p
        self.last_metrics = {"mse": delta.detach().pow(2).mean().item()}  # unweighted, per pixel, for logs
        return (w * err).mean()

    def jumps_first(self, b, device, *tensors):
        """(n, t, s, tensors) with the n rows that have s != t first (a None among the tensors stays None). The loss is
        a mean over independent rows (GroupNorm and attention act within an image): the order does not change it."""
        t, s = self.sample_times(b, device)
        flat = s == t
        order = torch.argsort(flat.to(torch.uint8), stable=True)  # s != t (key 0) first, draw order kept
        return b - int(flat.sum()), t[order], s[order], [None if x is None else x[order] for x in tensors]

    def dropped_rows(self, y, n):
        """(B,) bool: the rows that take the null label, after jumps_first (the first n rows jump), by the authors' rule
        of the class docstring: a Binomial(B, label_dropout) count, the s = t rows first, then the jumps."""
        count = self.drop_count(len(y), y.device)
        return (torch.arange(len(y), device=y.device) - n) % len(y) < count  # rows n.., then 0..n - 1

    def drop_count(self, b, device):  # how many of b rows lose their label: Binomial(b, label_dropout)
        return (torch.rand(b, device=device) < self.label_dropout).sum()

    def with_derivative(self, net, x, t, s, n, tangent):
        r"""($u_\theta(x, t, s)$ with its graph, $du_\theta/dt$) for a batch whose first n rows have $s \ne t$; du/dt is
        0 on the others. tangent(rows) gives dx/dt on rows :n (a callable: iMF's tangent is a network call)."""
        jump, flat = slice(0, n), slice(n, None)
        net = net if isinstance(net, Conditioned) else Conditioned(net)
        if self.fd_step or net.distributed:
            # One forward of the whole batch with its graph, du/dt of the jump rows apart and without a graph. DDP's
            # gradient hooks cannot run inside torch.func.jvp, so there du/dt comes from the wrapped module.
            u = self.average_velocity(net, x, t, s)
            dudt = torch.zeros_like(x, dtype=torch.float32)
            if n:
                module = net.module.rows(jump)
                with torch.no_grad():
                    dudt[jump] = (self.finite_difference_derivative(module, x[jump], t[jump], s[jump], tangent(jump))
                                  if self.fd_step else
                                  self.total_derivative(module, x[jump], t[jump], s[jump], tangent(jump))[1])
            return u, dudt
        parts = []  # (u, du/dt) of the jump rows, then of the s = t rows
        if n:
            parts.append(self.total_derivative(net.rows(jump), x[jump], t[jump], s[jump], tangent(jump)))
        if n < len(x):  # s = t: a plain forward, the instantaneous velocity
            parts.append((self.average_velocity(net.rows(flat), x[flat], t[flat], s[flat]), torch.zeros_like(x[flat])))
        u, dudt = zip(*parts)
        return torch.cat(u), torch.cat(dudt)

    def guided_velocity(self, net, xt, t, v):
        r"""The target $v_g$ of a guided run (Sec. 4.2) on rows whose label was kept, both u stopped, from one no-grad
        call on [x_t, x_t] with labels [y, null]; dropped rows keep v. The network at s = t learns $E[v_g | x_t, y]$,
        whose fixed point $u(\cdot | y) = u(\cdot | \text{null}) + w\, (v(\cdot | y) - u(\cdot | \text{null}))$ is the
        guided field at scale w, $u(\cdot | \text{null})$ the unconditional velocity that the dropped rows teach. kappa:
        how much of the target is the network's own (stable, but slower to move)."""
        if net.y is None or self.guidance == 1:
            return v
        omega = self.guidance * (1 - self.kappa)
        with torch.no_grad():
            pair = net.module.with_null()  # unwrapped: no DDP hooks for a no-grad call
            two = torch.cat([t, t])
            u_c, u_u = self.average_velocity(pair, torch.cat([xt, xt]), two, two).float().chunk(2)
        v_g = omega * v + self.kappa * u_c + (1 - omega - self.kappa) * u_u
        return torch.where(expand_t(net.y != self.num_classes, v), v_g, v)

    def loss(self, net, x1, x0=None, ema=None, y=None):
        x0 = torch.randn_like(x1) if x0 is None else x0
        n, t, s, (x1, x0, y) = self.jumps_first(x1.shape[0], x1.device, x1, x0, y)
        y = y if y is None else torch.where(self.dropped_rows(y, n), self.num_classes, y)
        net = Conditioned(net, y, self.num_classes)
        xt = interpolate(x0, x1, t)
        v = self.guided_velocity(net, xt, t, x1 - x0)  # dx_t/dt: the conditional velocity (guided: v_g)
        u, dudt = self.with_derivative(net, xt, t, s, n, lambda rows: v[rows])
        u_tgt = (v + expand_t(s - t, v) * dudt.float()).detach()  # MeanFlow identity (Eq. 6), sg[.] (Eq. 9)
        return self.adaptive_loss(u.float() - u_tgt)

    def sample(self, net, noise, nfe, y=None):
        self.check_nfe(nfe)
        net, x, ts = self.bound(net, y), noise, grid_times(nfe, self.times)
        for a, b in zip(ts, ts[1:]):
            t, s = torch.full((x.shape[0],), a, device=x.device), torch.full((x.shape[0],), b, device=x.device)
            x = x + expand_t(s - t, x) * self.average_velocity(net, x, t, s)  # x_s = x_t + (s - t) u(x_t, t, s)
        return x


@dataclasses.dataclass(eq=False)
class ImprovedMeanFlow(MeanFlow):
    r"""Improved MeanFlow: the network predicts the average velocity u(x_t, t, s) as in MeanFlow, but is trained by a
    loss on the instantaneous velocity: V = u - (s - t) sg[du/dt] must equal the conditional velocity x1 - x0, with
    du/dt a Jacobian-vector product along the network's own velocity u(x_t, t, t), so the regression target is
    independent of the network; sampled as MeanFlow.

    Paper: Geng, Lu, Wu, Shechtman, Kolter, He. Improved Mean Flows: On the Challenges of Fastforward Generative Models.
    CVPR 2026, arXiv:2512.02012.

        $$ V_\theta(x_t, t, s) = u_\theta(x_t, t, s) - (s - t)\, \mathrm{sg}[\tfrac{du_\theta}{dt}], \quad
           \tfrac{du}{dt} \text{ along } v_\theta = u_\theta(x_t, t, t) $$
        $$ L = E\, w \| V_\theta - (x_1 - x_0) \|^2 \qquad \text{(iMF Sec. 4.1)} $$
    The tangent is the network's own velocity at the boundary s = t, so that $V_\theta$ is a function of $x_t$ alone
    (iMF Alg. 1 with the boundary condition instead of an extra v-head: a U-Net has one head). Their V' is -V here.
    Defaults: the authors' released recipe. Options as MeanFlow's; guidance is a network input (guidance conditioning):
    labelled runs feed w as time_scale (w - 1), w log-uniform on [1, guidance_max] per row, and regress V onto
        $$ v_g = v + (1 - 1/w)\, \mathrm{sg}[u_\theta(x_t, t, t | y, w) - u_\theta(x_t, t, t | \text{null}, 1)],
           \quad v = x_1 - x_0 $$
    whose fixed point is the guided field $u(\cdot | \text{null}) + w\, (v(\cdot | y) - u(\cdot | \text{null}))$ at
    every w; sampling picks w (`guidance`) at 1 NFE per step. Label dropout as the authors' code (MeanFlow's rule, the
    s = t rows first): dropped rows keep their w as input and v as target; the tangent and u_c use the true label. Not
    kept: the CFG interval as an input (guidance acts at every t), in-context conditioning (a transformer's)."""
    name = "imf"
    guidance_input, not_options = True, ("kappa",)
    sampling_options = ("times", "guidance")
    ratio: float = option(0.5, "share of the batch with s != t")
    time_mean: float = option(-0.4, "logit-normal mean of the times (paper convention)")
    time_std: float = option(1.0, "logit-normal std of the times")
    adaptive_p: float = option(1.0, "adaptive weight power p, 0 = plain L2")
    adaptive_c: float = option(0.01, "adaptive weight constant c")
    guidance: float = option(1.0, "class-conditional runs: the guidance scale w given to the network at sampling "
                                  "(an input: any w costs 1 NFE per step)", flag="--guidance")
    guidance_max: float = option(8.0, "class-conditional training: w log-uniform on [1, W] (the paper: 1 + 7)",
                                 flag="--imf-guidance-max")

    def __post_init__(self):
        super().__post_init__()
        require(self.guidance_max >= 1, "must be >= 1 (1: no guidance)", self, "guidance_max")
        require(self.guidance_max >= self.guidance >= 1, f"must be in [1, guidance_max = {self.guidance_max:g}]", self,
                "guidance")

    def bound(self, net, y, w=None):
        """net with labels y and, in a labelled run, the guidance input time_scale (w - 1) (w: `guidance`)."""
        if y is None:
            return Conditioned(net)
        w = torch.full(y.shape, float(self.guidance), device=y.device) if w is None else w
        return Conditioned(net, y, self.num_classes, self.time_scale * (w - 1))

    def loss(self, net, x1, x0=None, ema=None, y=None):
        x0 = torch.randn_like(x1) if x0 is None else x0
        n, t, s, (x1, x0, y) = self.jumps_first(x1.shape[0], x1.device, x1, x0, y)
        xt, v = interpolate(x0, x1, t), x1 - x0
        if y is None:
            return self.adaptive_loss(self.compound_velocity(Conditioned(net), xt, t, s, n) - v)
        dropped = self.dropped_rows(y, n)
        w = self.sample_guidance(len(y), y.device)
        with torch.no_grad():  # u(x_t, t, t | y, w) and u(x_t, t, t | null, 1): one call of 2B rows, true labels
            pair = self.bound(net, y, w).module.with_null()  # guidance input w - 1 = 0 on the null rows
            tt = torch.cat([t, t])
            u_c, u_u = self.average_velocity(pair, torch.cat([xt, xt]), tt, tt).float().chunk(2)
        v_g = torch.where(expand_t(dropped, v), v, v + expand_t(1 - 1 / w, v) * (u_c - u_u))  # dropped rows: v
        net = self.bound(net, torch.where(dropped, self.num_classes, y), w)  # dropped rows keep their w
        return self.adaptive_loss(self.compound_velocity(net, xt, t, s, n, v_self=u_c) - v_g)

    def sample_guidance(self, b, device):  # w log-uniform on [1, guidance_max] for each row of a labelled batch
        return torch.exp(torch.rand(b, device=device) * math.log(self.guidance_max))

    def compound_velocity(self, net, xt, t, s, n=None, v_self=None):
        r"""$V_\theta(x_t, t, s)$; the first n rows have $s \ne t$ (jumps_first; None: all rows); v_self: the tangent
        $u_\theta(x_t, t, t)$ if known. For any flow's exact average velocity, V is that flow's velocity, whatever s."""
        n = len(xt) if n is None else n
        net = net if isinstance(net, Conditioned) else Conditioned(net)

        def tangent(rows):
            if v_self is not None:
                return v_self[rows]
            with torch.no_grad():  # the tangent only enters the stopped du/dt
                return self.average_velocity(net.rows(rows), xt[rows], t[rows], t[rows])  # v = u(x_t, t, t)
        u, dudt = self.with_derivative(net, xt, t, s, n, tangent)
        return u.float() - expand_t(s - t, u) * dudt.float().detach()  # V = u - (s - t) sg[du/dt]


@dataclasses.dataclass(eq=False)
class PixelMeanFlow(ImprovedMeanFlow):
    r"""Pixel MeanFlow: improved MeanFlow whose network outputs an image x_hat(x_t, t, s) (x-prediction) instead of a
    velocity; the average velocity is derived from it in closed form and trained by iMF's velocity-space loss, and one
    step from noise returns x_hat(x0, 0, 1) itself, so the output lives on the image manifold.

    Paper: Lu, Lu, Sun, Zhao, Jiang, Wang, Li, Geng, He. One-step Latent-free Image Generation with Pixel Mean Flows.
    ICML 2026, arXiv:2601.22158.

        $$ u_\theta(x_t, t, s) = (\hat x_\theta(x_t, t, s) - x_t) / \max(1 - t, \text{clip})
           \qquad \text{(x-prediction} \to u) $$
        $$ V_\theta = u_\theta - (s - t)\, \mathrm{sg}[\tfrac{du_\theta}{dt}], \quad \tfrac{du}{dt} \text{ along }
           v_\theta = u_\theta(x_t, t, t) \qquad \text{(as imf)} $$
        $$ L = E\, w \| V_\theta - (x_1 - x_0) \|^2, \qquad \text{sample: } x_s = x_t + (s - t)\, u_\theta(x_t, t, s) $$
    Why $\hat x$: $x_t + (1 - t)\, u(x_t, t, s)$ is where a straight line from x_t at the average velocity reaches
    t = 1; at s = t it is the denoiser $E[x_1 | x_t]$, and $\hat x(x_0, 0, 1)$ is the one-step sample. Convention: the
    paper's z_t = (1 - t') x + t' e with t' = 1 - t gives its u' = (z_t - x_hat) / t' = -u here; its clip of t' at 0.05
    is clip on 1 - t. Kept: x-prediction, iMF's loss and tangent, the adaptive weight (p = 1, c = 0.01), r = t on half
    the batch, logit-normal(0.8, 0.8) times (the paper's ImageNet recipe: most rows near noise, where the one-step jump
    starts; a lower `--time-mean` moves rows toward the data, where the last jumps of NFE 2 and 4 start: a trade between
    the two), drawn in the authors' order (sort_first = False, see sample_times). Deviations: (1) the target is the
    conditional velocity x1 - x0, where the authors divide (z_t - x) by the same clipped t' (the two agree for
    1 - t >= clip; with x1 - x0 the minimiser is the exact average velocity at every t); (2) no perceptual loss: the
    paper adds LPIPS and ConvNeXt losses on x_hat for t' < 0.8, whose ImageNet-pretrained weights a from-scratch entry
    may not use, so x_hat learns from the velocity loss alone. Options as imf's."""
    name = "pmf"
    time_mean: float = option(0.8, "logit-normal mean of the times (paper convention)")
    time_std: float = option(0.8, "logit-normal std of the times")
    clip: float = option(0.05, "u = (x_hat - x_t) / max(1 - t, CLIP): the paper's clip of t'", flag="--pmf-clip")
    sort_first = False  # pMF's code sets r' = t' on the flow-matching share before it sorts (t', r')

    def __post_init__(self):
        super().__post_init__()
        require(0 < self.clip <= 1, "must be in (0, 1] (the paper: 0.05)", self, "clip")

    def average_velocity(self, net, x, t, s):
        r"""$u_\theta(x, t, s)$ from the network's image x_hat(x, t, s); it sees time_scale t and time_scale (s - t)."""
        x_hat = net(x, self.time_scale * t, cond=self.time_scale * (s - t))
        return (x_hat - x) / expand_t((1 - t).clamp_min(self.clip), x)


# %% cm and ctm: consistency models and consistency trajectory models ----------------------------------------------
# Both papers use EDM's $x_\sigma = x_1 + \sigma z$ ($\sigma = 0$ data). Ours: $x_t / t = x_1 + ((1 - t) / t)\, x_0$,
# so $x_t$ is t times an EDM point at $\sigma = (1 - t) / t$, $t = 1 / (1 + \sigma)$: $x_\sigma = (1 + \sigma)\, x_t$,
# exact (the same noise, the same data), so EDM's levels, preconditioning and ODE carry over.
def sigma_to_t(sigma): return 1.0 / (1.0 + sigma)
def t_to_sigma(t): return (1.0 - t) / t


def karras_sigmas(n, sigma_min, sigma_max, rho, device="cpu"):
    r"""$\sigma_i = (\sigma_\min^{1/\rho} + \tfrac{i - 1}{n - 1} (\sigma_\max^{1/\rho} - \sigma_\min^{1/\rho}))^\rho$,
    $i = 1..n$ (Karras et al. 2022, Eq. 5), ascending; float64 keeps the ends sigma_min, sigma_max to the last bit."""
    i = torch.arange(n, dtype=torch.float64, device=device) / (n - 1)
    s = (sigma_min ** (1 / rho) + i * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho
    s[0], s[-1] = sigma_min, sigma_max
    return s


@dataclasses.dataclass(eq=False)
class ConsistencyModel(Method):
    r"""Consistency model: one network f(x_t, t) maps any point of a trajectory of the probability-flow ODE to its data
    end, with f the identity at the smallest noise level by construction. It is trained from scratch by making f agree
    at adjacent noise levels of the same noise draw (improved consistency training), or distilled from a trained rf run;
    NFE 1 is one call of f on noise, NFE 2 and 4 re-noise f's output and apply f again.

    Paper: Song, Dhariwal, Chen, Sutskever. Consistency Models. ICML 2023, arXiv:2303.01469. Song, Dhariwal. Improved
    Techniques for Training Consistency Models. ICLR 2024, arXiv:2310.14189 (iCT).

        $$ f(x_t, \sigma) = c_\text{skip}\, x_\sigma + c_\text{out}\, F_\theta(c_\text{in}\, x_\sigma, 1000\, t)
           \qquad \text{(Song et al. App. C)} $$
        $$ c_\text{skip} = \sigma_d^2 / ((\sigma - \sigma_\min)^2 + \sigma_d^2), \quad
           c_\text{out} = (\sigma - \sigma_\min)\, \sigma_d / \sqrt{\sigma_d^2 + \sigma^2}, \quad
           c_\text{in} = 1 / \sqrt{\sigma^2 + \sigma_d^2} $$
        $$ L = E\, \lambda(\sigma_i)\, d(f_\theta(x_{\sigma_{i+1}}, \sigma_{i+1}),
           \mathrm{sg}\, f_\theta(x_{\sigma_i}, \sigma_i)) \qquad \text{(iCT)} $$
    At $\sigma_\min$, $c_\text{skip} = 1$ and $c_\text{out} = 0$ exactly: the boundary condition holds whatever the
    network. iCT (Sec. 3): N(k) Karras levels at step k ($\rho = 7$, $\sigma \in [0.002, 80]$), level i by p(i):
        $$ N(k) = \min(s_0\, 2^{\lfloor k / K' \rfloor}, s_1) + 1, \quad
           K' = \lfloor K / (\log_2 \lfloor s_1 / s_0 \rfloor + 1) \rfloor $$
        $$ p(i) \propto \mathrm{erf}((\ln \sigma_{i+1} - P_\text{mean}) / (\sqrt 2\, P_\text{std}))
           - \mathrm{erf}((\ln \sigma_i - P_\text{mean}) / (\sqrt 2\, P_\text{std})), \quad
           \lambda = 1 / (\sigma_{i+1} - \sigma_i) $$
    pseudo-Huber $d(x, y) = \sqrt{\|x - y\|^2 + c^2} - c$, $c = 0.00054 \sqrt{C H W}$; $\theta^- = \theta$ (no EMA, the
    same dropout masks). CT: $x_{\sigma_i} = x_1 + \sigma_i z$, the same z. CD (--teacher, an rf run): $x_{t_i}$ is one
    Heun step of the teacher's ODE from $x_{t_{i+1}}$, $\theta^- = \theta$ too (Song et al.'s CD used an EMA target).
    The Heun step is in t (openai's: in $\sigma$ on $x_\sigma = x_t / t$; same Euler predictor, the corrections differ).
    Deviation: K, the curriculum's length, is the option total_steps (a run bounded by minutes does not know it).
    Sampling (Alg. 1): $x = f(x_{\sigma_\max}, \sigma_\max)$, then at each intermediate time t (default k / NFE, or
    `times`): $x = f(t\, (x + \sqrt{\sigma^2 - \sigma_\min^2}\, z), \sigma)$. The first input is
    $x_{t_\min} = (1 - t_\min)\, z$, the paper's $x_T = \sigma_\max z$ rescaled.
    Against the authors' code (openai/consistency_models; iCT's has no official code, its ports stand in):
    - time input: openai's $250 \ln \sigma$ (EDM's $c_\text{noise}$ times 1000); ours 1000 t, as every method here;
    - openai's multistep sampler clamps each denoised estimate to [-1, 1]; ours does not (the runner clamps the final
      images only): the method assumes no data range (the tests' Gaussian data lies outside [-1, 1]);
    - pseudo-Huber: the iCT ports (Kinyugo's, diffusers') per pixel; ours on the image's norm, as in the iCT paper."""
    name = "cm"
    teacher_methods = ("rf",)  # optional: consistency distillation
    sampling_options = ("times",)
    sigma_min: float = option(0.002, "smallest noise level", flag="--cm-sigma-min")
    sigma_max: float = option(80.0, "largest noise level", flag="--cm-sigma-max")
    sigma_data: float = option(0.5, "sigma_d of the preconditioning", flag="--cm-sigma-data")
    rho: float = option(7.0, "rho of the Karras levels", flag="--cm-rho")
    s0: int = option(10, "initial discretisation steps s0", flag="--cm-s0")
    s1: int = option(1280, "final discretisation steps s1", flag="--cm-s1")
    total_steps: int = option(100_000, "K, the length of the discretisation curriculum (the paper: 400,000 at "
                                       "batch 1024)", flag="--cm-total-steps")
    p_mean: float = option(-1.1, "P_mean of the lognormal level choice", flag="--cm-p-mean")
    p_std: float = option(2.0, "P_std of the lognormal level choice", flag="--cm-p-std")
    huber_c: float = option(None, "pseudo-Huber c (default 0.00054 sqrt(C H W))", flag="--cm-huber-c")
    times: dict = option(None, "intermediate times of multistep sampling, e.g. 2:0.5 4:0.25,0.5,0.75 "
                               "(default k/NFE)", flag="--cm-times")
    guidance: float = option(1.0, TEACHER_GUIDANCE, flag="--guidance")

    def __post_init__(self):
        require(0 < self.sigma_min < self.sigma_max, "need 0 < sigma_min < sigma_max", self, "sigma_min", "sigma_max")
        require(isinstance(self.s0, int) and isinstance(self.s1, int) and 2 <= self.s0 <= self.s1,
                "the curriculum needs integers 2 <= s0 <= s1 (the paper: 10, 1280)", self, "s0", "s1")
        stages = math.ceil(math.log2(self.s1 // self.s0)) + 1  # the distinct N(k); K >= stages keeps K' >= 1
        require(isinstance(self.total_steps, int) and self.total_steps >= stages,
                f"shorter than the curriculum's {stages} stages (s0 = {self.s0} doubling to s1 = {self.s1}); give at "
                f"least {stages}", self, "total_steps")
        self.t_min, self.t_max = sigma_to_t(self.sigma_max), sigma_to_t(self.sigma_min)
        self.times = parse_times(self, "times", self.t_min, self.t_max)

    def num_scales(self, k):
        r"""$N(k) = \min(s_0\, 2^{\lfloor k / K' \rfloor}, s_1) + 1$ (iCT's exponential curriculum)."""
        k_prime = math.floor(self.total_steps / (math.log2(self.s1 // self.s0) + 1))  # the real log2, not floored
        return min(self.s0 * 2 ** (k // k_prime), self.s1) + 1

    def consistency_fn(self, net, x_t, sigma):
        r"""$f_\theta(x_t, \sigma)$ for sigma: (B,) float64; $x_t$ in this file's scale. Returns the data scale."""
        sd, smin = self.sigma_data, self.sigma_min
        c_skip = sd ** 2 / ((sigma - smin) ** 2 + sd ** 2)  # exactly 1 at sigma_min
        c_out = (sigma - smin) * sd / torch.sqrt(sd ** 2 + sigma ** 2)  # exactly 0 at sigma_min
        c_in = 1 / torch.sqrt(sigma ** 2 + sd ** 2)
        x_sigma = expand_t((1 + sigma).to(x_t.dtype), x_t) * x_t  # x_sigma = x_t / t
        F_theta = net(expand_t(c_in.to(x_t.dtype), x_t) * x_sigma, TIME_SCALE * sigma_to_t(sigma).to(x_t.dtype))
        return expand_t(c_skip.to(x_t.dtype), x_t) * x_sigma + expand_t(c_out.to(x_t.dtype), x_t) * F_theta

    def target_point(self, x_hi, x1, z, t_hi, t_lo, teacher=None):
        """x at the lower level t_lo (nearer the data) on the trajectory through x_hi at t_hi: CT the same noise z,
        CD one Heun step of the teacher's ODE $dx/dt = v(x, t)$ (teacher: the loss's guided one, else self.teacher)."""
        teacher = self.teacher if teacher is None else teacher
        if teacher is None:
            return interpolate(z, x1, t_lo)
        h = expand_t(t_lo - t_hi, x_hi)
        v_hi = teacher(x_hi, TIME_SCALE * t_hi)
        return x_hi + h * (v_hi + teacher(x_hi + h * v_hi, TIME_SCALE * t_lo)) / 2  # Heun (trapezoid in t)

    def loss(self, net, x1, x0=None, ema=None, y=None):
        r"""x0: the noise z (default fresh N(0, I)). ema is not used: $\theta^- = \theta$."""
        y = drop_labels(y, self.label_dropout, self.num_classes)
        net, teacher = self.bound(net, y), None if self.teacher is None else self.guided_teacher(y)
        z = torch.randn_like(x1) if x0 is None else x0
        b, dev = x1.shape[0], x1.device
        sigmas = karras_sigmas(self.num_scales(self.training_step), self.sigma_min, self.sigma_max, self.rho, dev)
        cdf = torch.erf((torch.log(sigmas) - self.p_mean) / (math.sqrt(2) * self.p_std))  # lognormal levels
        i = torch.multinomial((cdf[1:] - cdf[:-1]).float(), b, replacement=True)
        sigma_lo, sigma_hi = sigmas[i], sigmas[i + 1]
        t_lo, t_hi = sigma_to_t(sigma_lo).to(x1.dtype), sigma_to_t(sigma_hi).to(x1.dtype)
        x_hi = interpolate(z, x1, t_hi)  # x_(sigma_(i+1)) = x1 + sigma_(i+1) z, rescaled
        with torch.no_grad():
            x_lo = self.target_point(x_hi, x1, z, t_hi, t_lo, teacher)
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):  # same dropout masks below
                target = self.consistency_fn(net, x_lo, sigma_lo)  # sg(f_theta): no EMA (iCT)
        pred = self.consistency_fn(net, x_hi, sigma_hi)
        c = self.huber_c if self.huber_c is not None else 0.00054 * math.sqrt(x1[0].numel())
        d = torch.sqrt(((pred.float() - target.float()) ** 2).flatten(1).sum(1) + c ** 2) - c  # pseudo-Huber
        return (d / (sigma_hi - sigma_lo).float()).mean()  # lambda = 1 / (sigma_(i+1) - sigma_i)

    def sample(self, net, noise, nfe, y=None):
        self.check_nfe(nfe)
        b, dev, net = noise.shape[0], noise.device, self.bound(net, y)
        x = self.consistency_fn(net, (1 - self.t_min) * noise, torch.full((b,), self.sigma_max, dtype=torch.float64,
                                                                          device=dev))  # x_T = sigma_max z
        for t in grid_times(nfe, self.times)[1:-1]:
            sigma = t_to_sigma(t)
            x_t = t * (x + math.sqrt(sigma ** 2 - self.sigma_min ** 2) * torch.randn_like(x))  # re-noise, rescale
            x = self.consistency_fn(net, x_t, torch.full((b,), sigma, dtype=torch.float64, device=dev))
        return x


def average_over_ranks(grads):  # a network outside DDP (a method's own): its gradients averaged as DDP would
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for g in grads:
            torch.distributed.all_reduce(g)
            g /= torch.distributed.get_world_size()


# %% scm: continuous-time consistency models on TrigFlow ------------------------------------------------------------
# TrigFlow: $x_\tau = \cos(\tau)\, x_1 + \sin(\tau)\, z$, $z \sim N(0, \sigma_d^2 I)$, $\tau \in [0, \pi/2]$, $\tau = 0$
# data. Dividing by $\cos(\tau) + \sigma_d \sin(\tau)$ gives this file's $x_t = (1 - t)\, x_0 + t\, x_1$ with
# $x_0 = z / \sigma_d$: exact, both ways.
def trig_to_t(tau, sigma_d): return torch.cos(tau) / (torch.cos(tau) + sigma_d * torch.sin(tau))
def t_to_trig(t, sigma_d): return torch.atan2(1 - t, sigma_d * t)  # tan(tau) = sigma / sigma_d, sigma = (1 - t) / t


class AdaptiveWeight(torch.nn.Module):
    """sCM's learned loss weight: logvar(tau) = a linear layer on Fourier features of tau, zero at the start."""
    def __init__(self, features=16):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.arange(features // 2, dtype=torch.float32))
        self.linear = torch.nn.Linear(features, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, tau):
        arg = tau.float()[:, None] * self.freqs
        return self.linear(torch.cat([torch.cos(arg), torch.sin(arg)], 1))[:, 0]


@dataclasses.dataclass(eq=False)
class ContinuousConsistency(Method):
    r"""Continuous-time consistency model (sCM): a consistency function f(x_tau, tau) on TrigFlow, trained with the
    limit of the consistency loss as adjacent levels merge, whose gradient is a tangent g built from a JVP of the
    network; from scratch (sCT) or, with --teacher, along the ODE of a trained rf run (sCD).

    Paper: Lu, Song. Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models. ICLR 2025,
    arXiv:2410.11081.

        $$ x_\tau = \cos(\tau)\, x_1 + \sin(\tau)\, z, \quad z \sim N(0, \sigma_d^2 I), \quad \tau \in [0, \pi/2],
           \quad \tau = 0 \text{ data} $$
        $$ f_\theta(x_\tau, \tau) = \cos(\tau)\, x_\tau - \sin(\tau)\, \sigma_d F_\theta(x_\tau / \sigma_d, \tau) $$
        $$ dx/d\tau = \cos(\tau)\, z - \sin(\tau)\, x_1 \text{ (sCT)}, \quad \text{or the teacher's } \sigma_d F^*
           \text{ (sCD, below)} $$
        $$ g = -\cos^2(\tau)\, (\sigma_d F_{\theta^-} - dx/d\tau) - r \cos(\tau) \sin(\tau)\, (x_\tau + \sigma_d\,
           dF_{\theta^-}/d\tau) $$
        $$ L = E\Big[\frac{e^{-l(\tau)}}{\sigma_d \tan\tau}\, \mathrm{mean}\big((F_\theta - F_{\theta^-}
           - g / (\mathrm{rms}(g) + c))^2\big) + l(\tau)\Big] $$
    With $r = 1$, $g = \cos(\tau)\, df/d\tau$: the loss's gradient pushes f to be constant along the ODE. $dF/d\tau$ is
    one JVP along $(\cos \sin\, dx/d\tau, \cos \sin)$ ("JVP rearrangement": the factor cos sin goes into the tangent);
    $\theta^- = \theta$ without gradient, the same dropout masks. Stability measures kept: $c_\text{noise}(\tau) = \tau$
    (time_scale 1), tangent warm-up (r: 0 -> 1 over warmup_steps), tangent normalisation (c = 0.1, on the RMS:
    independent of the image size), prior weight $1 / (\sigma_d \tan\tau)$, adaptive weight $l(\tau)$ (AdaptiveWeight,
    its own Adam at the run's lr). Not kept: adaptive double normalisation (an architecture change: unet.py keeps ADM's
    scale-shift norm). Times: $\sigma_d \tan(\tau) \sim$ lognormal(p_mean, p_std). sCD: an rf teacher v is a TrigFlow
    velocity in closed form, at $t = \cos / (\cos + \sigma_d \sin)$, $x_t = x_\tau / (\cos + \sigma_d \sin)$:
        $$ \sigma_d F^* = \sigma_d \cos(\tau)\, (x_t - t v) - \sin(\tau)\, (x_t + (1 - t)\, v)
           \qquad (E[z] \text{ and } E[x_1] \text{ given } x_t) $$
    and the student starts from random weights (the teacher's network speaks another parametrisation). Alg. 1 sampling:
    $x = \sigma_d x_0$ at $\tau = \pi/2$ (t = 0), $x_1 = f(x, \pi/2)$; then at each intermediate time (default k / NFE
    in this file's t, which for NFE 2 is $\tau = 1.107$, the paper's 1.1): $x = \cos x_1 + \sin z$, $x_1 = f$. Against
    NVlabs/FastGen's sCM (no official code is public), what it does / what we do / why:
    - weight: pixel mean / D again (divide_x_0_spatial_dim) / $e^{-l}\|\cdot\|^2/D$ / the paper's (l absorbs log D);
    - $l(\tau)$: a head of the network / its own small network and Adam / unet.py has no such head;
    - the times: lognormal truncated to [0.002, 80] / untruncated / the paper's (a 2e-4 share differs)."""
    name = "scm"
    teacher_methods = ("rf",)  # optional: sCD
    uses_jvp, sampling_options, time_input = True, ("times",), "tau"
    sigma_data: float = option(0.5, "sigma_d of TrigFlow", flag="--scm-sigma-data")
    p_mean: float = option(-1.0, "mean of log(sigma_d tan tau) (the paper's CIFAR-10)", flag="--scm-p-mean")
    p_std: float = option(1.4, "std of log(sigma_d tan tau)", flag="--scm-p-std")
    warmup_steps: int = option(10_000, "tangent warm-up: r rises linearly from 0 to 1 over these steps",
                               flag="--scm-warmup-steps")
    tangent_c: float = option(0.1, "c of the tangent normalisation g / (rms(g) + c)", flag="--scm-tangent-c")
    tangent_norm: bool = option(True, "turn the tangent normalisation off", flag="--scm-no-tangent-norm")
    adaptive: bool = option(True, "turn the learned weight l(tau) off", flag="--scm-no-adaptive-weight")
    time_scale: float = option(1.0, "the net sees this times tau (paper: c_noise(tau) = tau)", flag="--scm-time-scale")
    times: dict = option(None, "intermediate times of multistep sampling in this file's t, e.g. 2:0.5 "
                               "(default k/NFE)", flag="--scm-times")
    guidance: float = option(1.0, TEACHER_GUIDANCE, flag="--guidance")

    def __post_init__(self):
        for field in ("sigma_data", "p_std", "time_scale", "tangent_c"):
            require(getattr(self, field) > 0, "must be > 0", self, field)
        require(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "must be an integer >= 0", self,
                "warmup_steps")
        self.times = parse_times(self, "times")
        self.weighting = self.weight_opt = None  # built at the first step, on the data's device
        self.weight_pending, self.lr = {}, 1e-3

    def F(self, net, x_tau, tau):  # F_theta(x_tau / sigma_d, tau): the network sees time_scale tau
        return net(x_tau / self.sigma_data, self.time_scale * tau)

    def consistency_fn(self, net, x_tau, tau):
        r"""$f_\theta(x_\tau, \tau) = \cos\tau\, x_\tau - \sin\tau\, \sigma_d F_\theta$: the trajectory's data end."""
        c, s = expand_t(torch.cos(tau), x_tau), expand_t(torch.sin(tau), x_tau)
        return c * x_tau - s * self.sigma_data * self.F(net, x_tau, tau)

    def teacher_velocity(self, x_tau, tau, teacher=None):
        r"""$\sigma_d F^* = dx_\tau / d\tau$ of the rf teacher, in closed form (the docstring's sCD line)."""
        c, s = expand_t(torch.cos(tau), x_tau), expand_t(torch.sin(tau), x_tau)
        t, x_t = trig_to_t(tau, self.sigma_data), x_tau / (c + self.sigma_data * s)
        v = (teacher or self.teacher)(x_t, TIME_SCALE * t)
        tt = expand_t(t, x_t)
        return self.sigma_data * c * (x_t - tt * v) - s * (x_t + (1 - tt) * v)  # sigma_d cos E[x0] - sin E[x1]

    def derivative(self, net, x_tau, tau, dxdt):
        r"""$(F_{\theta^-}, \cos\tau \sin\tau\, dF_{\theta^-}/d\tau)$: the class docstring's JVP, without gradient
        ($\theta^-$), on the unwrapped network (no DDP hooks inside the JVP), with the loss's dropout masks."""
        module, dev, cs = getattr(net, "module", net), x_tau.device, torch.cos(tau) * torch.sin(tau)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            return jvp(lambda x, tt: self.F(module, x, tt), (x_tau, tau), (expand_t(cs, x_tau) * dxdt, cs))

    def tangent(self, x_tau, tau, dxdt, F_minus, F_jvp, r):
        r"""The class docstring's tangent g, $\cos\tau\, df_{\theta^-}/d\tau$ at r = 1 (r: the warm-up ratio)."""
        c, s = expand_t(torch.cos(tau), x_tau), expand_t(torch.sin(tau), x_tau)
        return -c ** 2 * (self.sigma_data * F_minus - dxdt) - r * (c * s * x_tau + self.sigma_data * F_jvp)

    def make_optimizer(self, net, lr, weight_decay):
        self.lr = lr  # the adaptive weight's Adam runs at the run's base rate
        return super().make_optimizer(net, lr, weight_decay)

    def weight_net(self, device):
        if self.weighting is None:
            with torch.random.fork_rng(devices=[]):  # nn.Linear's init draws: keep a resumed run's stream exact
                self.weighting = AdaptiveWeight().to(device)
            self.weight_opt = torch.optim.Adam(self.weighting.parameters(), lr=self.lr)
            if self.weight_pending:
                self.weighting.load_state_dict(self.weight_pending["weighting"])
                self.weight_opt.load_state_dict(self.weight_pending["weight_opt"])
            self.weight_pending = {}
        return self.weighting

    def state_dict(self):
        return dict(self.weight_pending) if self.weighting is None else {
            "weighting": self.weighting.state_dict(), "weight_opt": self.weight_opt.state_dict()}

    def load_state_dict(self, state): self.weighting, self.weight_opt, self.weight_pending = None, None, dict(state)

    def loss(self, net, x1, x0=None, ema=None, y=None):
        r"""x1: data; x0: its noise ($z = \sigma_d x_0$); y: labels or None. ema is not used: $\theta^- = \theta$."""
        y = drop_labels(y, self.label_dropout, self.num_classes)
        net, teacher = self.bound(net, y), None if self.teacher is None else self.guided_teacher(y)
        sd, dev = self.sigma_data, x1.device
        z = sd * (torch.randn_like(x1) if x0 is None else x0)
        tau = torch.atan(torch.exp(self.p_mean + self.p_std * torch.randn(x1.shape[0], device=dev)) / sd)
        c, s = expand_t(torch.cos(tau), x1), expand_t(torch.sin(tau), x1)
        x_tau = c * x1 + s * z
        with torch.no_grad():
            dxdt = c * z - s * x1 if teacher is None else self.teacher_velocity(x_tau, tau, teacher)
            F_minus, F_jvp = self.derivative(net, x_tau, tau, dxdt)
            r = min(1.0, self.training_step / self.warmup_steps) if self.warmup_steps else 1.0
            g = self.tangent(x_tau, tau, dxdt, F_minus.float(), F_jvp.float(), r)
            if self.tangent_norm:
                g = g / (expand_t(g.pow(2).flatten(1).mean(1).sqrt(), g) + self.tangent_c)
        F_theta = self.F(net, x_tau, tau)
        mse = (F_theta.float() - F_minus.float() - g).pow(2).flatten(1).mean(1)
        prior = 1.0 / (sd * torch.tan(tau))  # 1 / sigma
        if not self.adaptive:
            return (prior * mse).mean()
        weighting = self.weight_net(dev)
        logvar = weighting(tau)
        w_loss = (prior * mse.detach() * torch.exp(-logvar) + logvar).mean()  # l's own step, DDP-averaged
        grads = torch.autograd.grad(w_loss, list(weighting.parameters()))
        average_over_ranks(grads)
        for p, gr in zip(weighting.parameters(), grads):
            p.grad = gr
        self.weight_opt.step()
        self.last_metrics = {"mse": mse.mean().item()}
        return (prior * mse * torch.exp(-logvar.detach()) + logvar.detach()).mean()

    def sample(self, net, noise, nfe, y=None):
        self.check_nfe(nfe)
        b, dev, sd, net = noise.shape[0], noise.device, self.sigma_data, self.bound(net, y)
        full = lambda t: torch.full((b,), float(t), device=dev)  # noqa: E731
        ts = grid_times(nfe, self.times)
        x1 = self.consistency_fn(net, sd * noise, t_to_trig(full(ts[0]), sd))  # x_(pi/2) = z = sigma_d x0
        for t in ts[1:-1]:
            tau = t_to_trig(full(t), sd)
            x_tau = expand_t(torch.cos(tau), x1) * x1 + expand_t(torch.sin(tau), x1) * sd * torch.randn_like(x1)
            x1 = self.consistency_fn(net, x_tau, tau)
        return x1


@dataclasses.dataclass(eq=False)
class CTM(Method):
    r"""Consistency trajectory model: one network G(x_t, t, s) = x_t + (s - t) u(x_t, t, s) jumps from any time t of the
    probability-flow ODE to any later time s; distilled from a trained rectified flow (the teacher, whose weights it
    starts from) by soft consistency matching plus flow matching at s = t.

    Paper: Kim, Lai, Liao, Murata, Takida, Uesaka, He, Mitsufuji, Ermon. Consistency Trajectory Models: Learning
    Probability Flow ODE Trajectory of Diffusion. ICLR 2024, arXiv:2310.02279.

        $$ G_\theta(x_t, t, s) = x_t + (s - t)\, u_\theta(x_t, t, s), \quad
           u_\theta = \mathrm{net}(x_t, 1000\, t, \text{cond} = 1000\, s) $$
        $$ L_\text{CTM} = \| G_\mathrm{sg}(G_\theta(x_t, t, s), s, 1)
           - G_\mathrm{sg}(G_{\mathrm{sg}(\theta)}(x_u, u, s), s, 1) \|^2, \quad t < u \le s $$
        $$ L = L_\text{CTM} + \lambda_\text{dsm} \| u_\theta(x_{t'}, t', t') - (x_1 - x_0') \|^2
           \quad [+\ \text{gan_weight}\ \lambda\, \mathrm{softplus}(-d(x_\text{est}))] $$
    Parametrisation: Kim et al.'s $G = (s/t) x_t + (1 - s/t) g_\theta$ (EDM's sigma) on the straight path, with the rf
    teacher's denoiser $D = x_t + (1 - t) v$: $G(x, t, t) = x$ exactly; a student from the teacher is its Euler step.
    Soft matching (the authors' defaults): num_scales Karras levels ($\rho = 7$, $\sigma \in [0.002, 80]$) at
    $t = 1 / (1 + \sigma)$, ends moved to 0 and 1; u = t + k grid steps, one k per batch, $p(k) \propto k$ on
    1..heun_steps (sony/ctm's heun_step_strategy 'weighted', kept by its CIFAR-10 commands), s uniform on the grid from
    u to 1; $x_u$ = k Heun steps of the teacher in t (sony/ctm's in EDM's $\sigma$, as openai's in cm: corrections
    differ at second order; here the grid starts at $t = 0$, $\sigma = \infty$). Both sides are carried to the data by
    the EMA net $\theta^-$ (gradient through its input only); the inner target is the student's own net, stop-gradient.
    Deviations: L2 instead of LPIPS (weights unavailable offline); DSM as flow matching at uniform t with a fixed weight
    lambda_dsm (instead of EDM's weight and the authors' gradient-norm balance of the two terms). GAN (off by default):
    Eq. 8, non-saturating, on $x_\text{est} = G_\mathrm{sg}(G_\theta(x_t, t, s), s, 1)$ from step gan_start on, weighted
    by Esser et al.'s adaptive $\lambda$ (arXiv:2012.09841; adaptive_weight). The paper's critic reads frozen ImageNet
    feature networks, unavailable here (fid.py's Inception would train against the metric): instead a small patch
    discriminator with spectral norm (Miyato et al., arXiv:1802.05957), trained from scratch on pixels, in one process.
    Sampling, gamma-sampling (NFE n: n jumps): on $0 = \tau_0 < \dots < \tau_n = 1$ jump from $\tau_k$ to the time of
    $\sigma' = \sqrt{1 - \gamma^2}\, \sigma(\tau_{k+1})$, then $x_\sigma \mathrel{+}= \gamma\, \sigma(\tau_{k+1})\, z$;
    $\gamma = 0$ deterministic, 1 CM's sampler; the last jump to $\sigma = 0$, unclamped (theirs:
    $\sigma' = \sqrt{1 - \gamma^2}\, (\sigma - \sigma_\min) + \sigma_\min$, clamped to [-1, 1])."""
    name = "ctm"
    uses_cond, second_scalar = True, "target time s"
    teacher_methods, needs_teacher, init_from_teacher = ("rf",), True, True  # Kim et al. start from the teacher
    sampling_options = ("times",)
    num_scales: int = option(18, "N, points of the time grid (the paper's CIFAR-10 value)", flag="--ctm-scales")
    heun_steps: int = option(17, "at most this many teacher steps t -> u", flag="--ctm-heun-steps")
    sigma_min: float = option(0.002, "smallest level of the grid", flag="--ctm-sigma-min")
    sigma_max: float = option(80.0, "largest level of the grid", flag="--ctm-sigma-max")
    rho: float = option(7.0, "rho of the grid's Karras levels", flag="--ctm-rho")
    lambda_dsm: float = option(1.0, "weight of the DSM (flow matching) term", flag="--ctm-lambda-dsm")
    gamma: float = option(0.0, "gamma of gamma-sampling (0 deterministic)", flag="--ctm-gamma")
    times: dict = option(None, "intermediate times of gamma-sampling, e.g. 2:0.5 (default k/NFE)", flag="--ctm-times")
    gan_weight: float = option(0.0, "weight of the GAN term (times the adaptive weight), 0 = off; a pixel "
                                    "discriminator trained from scratch", flag="--ctm-gan-weight")
    gan_start: int = option(0, "training step at which the GAN term starts", flag="--ctm-gan-start")
    gan_lr: float = option(2e-4, "the discriminator's Adam learning rate", flag="--ctm-gan-lr")
    guidance: float = option(1.0, TEACHER_GUIDANCE, flag="--guidance")

    def __post_init__(self):
        n, k = self.num_scales, self.heun_steps
        require(isinstance(n, int) and n >= 2, "must be an integer >= 2 (the paper: 18)", self, "num_scales")
        require(isinstance(k, int) and 1 <= k <= n - 1, f"must be in 1 .. num_scales - 1 = {n - 1} (a teacher solve "
                                                         f"stays on the grid)", self, "heun_steps")
        require(0.0 <= self.gamma <= 1.0, "must be in [0, 1] (0: deterministic, 1: CM's)", self, "gamma")
        require(self.gan_weight >= 0, "must be >= 0 (0: no GAN term)", self, "gan_weight")
        require(isinstance(self.gan_start, int) and self.gan_start >= 0 and self.gan_lr > 0,
                "the GAN term needs an integer gan_start >= 0 and gan_lr > 0", self, "gan_start", "gan_lr")
        self.times = parse_times(self, "times")
        self.grid = sigma_to_t(karras_sigmas(self.num_scales, self.sigma_min, self.sigma_max, self.rho).flip(0))
        self.grid[0], self.grid[-1] = 0.0, 1.0  # ascending t, its ends moved to this file's noise and data ends
        self.disc = self.disc_opt = None  # built at the first GAN step, on the data's device
        self.disc_pending = {}  # a checkpoint's discriminator state, loaded when the discriminator is built

    def state_dict(self):  # training state only: sampling needs the network alone
        return dict(self.disc_pending) if self.disc is None else {
            "disc": self.disc.state_dict(), "disc_opt": self.disc_opt.state_dict(), "disc_channels": self.disc.channels}

    def load_state_dict(self, state): self.disc, self.disc_opt, self.disc_pending = None, None, dict(state)

    def discriminator(self, x):
        """The discriminator and its optimiser, built on x's device at the first GAN step."""
        if self.disc is None:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                raise ValueError("ctm's GAN term runs in one process only (each rank would train a discriminator "
                                 "of its own): run without torchrun, or with --ctm-gan-weight 0")
            with torch.random.fork_rng(devices=[]):  # its initial weights must not move the training RNG stream,
                torch.manual_seed(0)  # or a run resumed after the GAN start would differ from an uninterrupted one
                self.disc = PatchDiscriminator(self.disc_pending.get("disc_channels", x.shape[1])).to(x.device)
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
        r"""$\lambda = \|\nabla_W L_\text{rec}\| / (\|\nabla_W L_\text{GAN}\| + \delta)$ clamped to [0, 1e4], W the
        network's last weight with more than one dimension (unet.py's output conv), without gradient (Esser et al.)."""
        w = [p for p in getattr(net, "module", net).parameters() if p.requires_grad and p.dim() > 1][-1]
        g_rec = torch.autograd.grad(loss_rec, w, retain_graph=True)[0]
        g_gan = torch.autograd.grad(loss_gan, w, retain_graph=True)[0]
        return (g_rec.norm() / (g_gan.norm() + delta)).clamp(0.0, 1e4).detach()

    def G(self, net, x, t, s):  # G_theta(x_t, t, s) = x_t + (s - t) u_theta(x_t, t, s) for t, s: (B,)
        return x + expand_t(s - t, x) * net(x, TIME_SCALE * t, cond=TIME_SCALE * s)

    def teacher_solve(self, x, i, k, teacher=None):
        """k Heun steps of the teacher's ODE $dx/dt = v(x, t)$ along the grid, from grid index i (a (B,) tensor)."""
        grid, teacher = self.grid.to(x.device, x.dtype), teacher or self.teacher
        for j in range(k):
            ta, tb = grid[i + j], grid[i + j + 1]
            h = expand_t(tb - ta, x)
            v_a = teacher(x, TIME_SCALE * ta)
            x = x + h * (v_a + teacher(x + h * v_a, TIME_SCALE * tb)) / 2
        return x

    def sample_indices(self, b, device):
        """(k, i, j): k teacher steps t -> u, one per batch, p(k) proportional to k; per row t = grid[i] with i
        uniform such that u = grid[i + k] is on the grid, and s = grid[j] with j uniform in [i + k, num_scales - 1]."""
        n = self.num_scales
        k = 1 + int(torch.multinomial(torch.arange(1.0, self.heun_steps + 1, dtype=torch.float64), 1))
        i = torch.randint(0, n - k, (b,), device=device)
        j = i + k + (torch.rand(b, device=device) * (n - i - k)).long()
        return k, i, j

    def loss(self, net, x1, x0=None, ema=None, y=None):
        if self.teacher is None:
            raise ValueError("ctm learns from a teacher: set method.teacher (--teacher RUN_DIR, an rf run)")
        y = drop_labels(y, self.label_dropout, self.num_classes)
        raw, net, teacher = net, self.bound(net, y), self.guided_teacher(y)
        x0 = torch.randn_like(x1) if x0 is None else x0
        b, dev = x1.shape[0], x1.device
        target_net = self.bound(ema, y) if ema is not None else net  # theta^-: the EMA (Kim et al.: decay 0.999)
        grid = self.grid.to(dev, x1.dtype)
        k, i, j = self.sample_indices(b, dev)
        t, u, s = grid[i], grid[i + k], grid[j]
        ones = grid[-1].expand_as(s)  # the grid's data end, 1
        x_t = interpolate(x0, x1, t)
        with torch.no_grad():
            target = self.G(target_net, self.G(net, self.teacher_solve(x_t, i, k, teacher), u, s), s, ones)
        t_fm, x0_fm = torch.rand(b, device=dev), torch.randn_like(x1)  # DSM: flow matching at s = t, same forward
        u_all = net.repeat(2)(torch.cat([x_t, interpolate(x0_fm, x1, t_fm)]), TIME_SCALE * torch.cat([t, t_fm]),
                              cond=TIME_SCALE * torch.cat([s, t_fm]))
        estimate = self.G(target_net, x_t + expand_t(s - t, x_t) * u_all[:b], s, ones)  # to the data by theta^-
        l_ctm = F.mse_loss(estimate.float(), target.float())
        loss = l_ctm + self.lambda_dsm * F.mse_loss(u_all[b:].float(), (x1 - x0_fm).float())
        if self.gan_weight > 0 and self.training_step >= self.gan_start:
            d_loss = self.discriminator_step(x1, estimate)  # first the critic, on sg[x_est] ...
            l_gan = F.softplus(-self.disc.requires_grad_(False)(estimate.float())).mean()  # ... then the student
            lam = self.adaptive_weight(raw, l_ctm, l_gan)
            loss = loss + self.gan_weight * lam * l_gan
            self.last_metrics = {"d_loss": d_loss.item(), "g_loss": l_gan.item(), "gan_lambda": lam.item()}
        return loss

    def sample(self, net, noise, nfe, y=None):
        self.check_nfe(nfe)
        taus, x, net = grid_times(nfe, self.times), noise, self.bound(net, y)
        full = lambda v: torch.full((x.shape[0],), v, device=x.device)  # noqa: E731
        c = math.sqrt(1 - self.gamma ** 2)
        for tau_a, tau_b in zip(taus[:-1], taus[1:]):
            t_jump = tau_b / (tau_b + c * (1 - tau_b))  # the time of sigma' = sqrt(1 - gamma^2) sigma(tau_b)
            x = self.G(net, x, full(tau_a), full(t_jump))
            if self.gamma > 0 and tau_b < 1:  # noise back up to sigma(tau_b): x_sigma += gamma sigma(tau_b) z
                x = tau_b * (x / t_jump + self.gamma * t_to_sigma(tau_b) * torch.randn_like(x))
        return x


class PatchDiscriminator(torch.nn.Module):
    """ctm's optional critic: three stride-2 4x4 convolutions (64, 128, 256 channels, LeakyReLU 0.2) and a 3x3 one
    to a logit per patch, averaged per image; spectral norm on every convolution keeps it Lipschitz."""
    def __init__(self, channels, width=64):
        super().__init__()
        nn, sn, w, self.channels = torch.nn, torch.nn.utils.parametrizations.spectral_norm, width, channels
        self.layers = nn.Sequential(sn(nn.Conv2d(channels, w, 4, 2, 1)), nn.LeakyReLU(0.2),
                                    sn(nn.Conv2d(w, 2 * w, 4, 2, 1)), nn.LeakyReLU(0.2),
                                    sn(nn.Conv2d(2 * w, 4 * w, 4, 2, 1)), nn.LeakyReLU(0.2),
                                    sn(nn.Conv2d(4 * w, 1, 3, 1, 1)))

    def forward(self, x): return self.layers(x).flatten(1).mean(1)


# %% pd: progressive distillation ----------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class ProgressiveDistillation(Method):
    r"""Progressive distillation: starting from a trained rectified flow sampled with 2N Euler steps, a student
    initialised from its teacher learns, at each point i/N of its own grid, the velocity whose single Euler step of size
    1/N lands where two consecutive teacher steps of size 1/(2N) land. Each round halves N and the student becomes the
    next round's teacher, down to end_steps; sampling at NFE n uses the student of the round with N = n.

    Paper: Salimans, Ho. Progressive Distillation for Fast Sampling of Diffusion Models. ICLR 2022, arXiv:2202.00512.

        $$ x_t = (1 - t)\, x_0 + t\, x_1, \quad t = i / N, \quad i \sim U\{0, \dots, N - 1\}
           \qquad \text{(the student's own grid)} $$
        $$ x' = x_t + h\, v_T(x_t, t), \quad x'' = x' + h\, v_T(x', t + h), \quad h = 1 / (2N)
           \qquad \text{(two teacher steps)} $$
        $$ \tilde v = (x'' - x_t) / (2h) = (v_T(x_t, t) + v_T(x', t + h)) / 2
           \qquad \text{(one student step lands on } x'') $$
        $$ L = \| v_S(x_t, t) - \mathrm{sg}[\tilde v] \|^2 \qquad \text{(Alg. 2, x-target} \to \text{velocity)} $$
    A flow model's DDIM step is an Euler step (along the line through its x0- and x1-predictions): the paper's two DDIM
    steps are two Euler steps. Deviations: weight 1 on the velocity error instead of the truncated SNR on the x-error
    (the velocity error times $\max(t^2, (1 - t)^2)$; the endpoint error is this times $1/N^2$ for every t of a round);
    the loop's EMA is the student, kept at a round's end (`students`) as the next round's frozen teacher (the authors'
    CIFAR-10 config: ema_decay 0); the grid is uniform in this file's t (theirs: in their cosine schedule's); no
    x-prediction clip at sampling (their eval_clip_denoised); the CIFAR-10 config starts from 8192 teacher steps."""
    name = "pd"
    teacher_methods, needs_teacher, init_from_teacher = ("rf", "reflow"), True, True  # Alg. 2: from the teacher
    state_for_sampling = True  # a student per NFE
    start_steps: int = option(1024, "Euler steps of the first round's teacher (students take half, a quarter, ...)",
                              flag="--pd-start-steps")
    end_steps: int = option(1, "steps of the last round's student", flag="--pd-end-steps")
    round_steps: int = option(50_000, "training iterations per round (the paper's)", flag="--pd-round-steps")
    guidance: float = option(1.0, TEACHER_GUIDANCE, flag="--guidance")

    def __post_init__(self):
        for key in ("start_steps", "end_steps", "round_steps"):
            require(isinstance(getattr(self, key), int) and getattr(self, key) >= 1, "must be an integer >= 1", self,
                    key)
        ratio = self.start_steps // self.end_steps
        require(not (self.start_steps % self.end_steps or ratio < 2 or ratio & (ratio - 1)),
                "start_steps / end_steps must be a power of two >= 2 (each round halves the steps)", self,
                "start_steps", "end_steps")
        self.rounds = [self.start_steps >> k for k in range(1, int(math.log2(ratio)) + 1)]  # N of round 1, 2, ...
        self.students = {}  # str(N) -> state dict of the finished student of that round
        self.round, self._first_teacher = -1, None

    def default_steps(self): return len(self.rounds) * self.round_steps

    def check_nfe(self, nfe):
        if nfe not in self.rounds:
            raise UnsupportedNFE(f"pd trains one student per round, N = {', '.join(map(str, self.rounds))} steps "
                                 f"(from a {self.start_steps}-step teacher): it can do those NFEs, not {nfe!r}; "
                                 f"change --pd-start-steps / --pd-end-steps")

    def on_step(self, step, net, ema):
        """Start round min(step // round_steps, last); a round that ended keeps its student (the EMA), which becomes
        the next round's frozen teacher and the online network's start."""
        r = min(step // self.round_steps, len(self.rounds) - 1)
        if self._first_teacher is None:
            self._first_teacher = self.teacher  # the teacher run's network, set by the runner
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
        """The student of the round with N = nfe, or the EMA (the newest student) if that round has not ended."""
        sd = self.students.get(str(nfe))
        return ema if sd is None else self.frozen(ema, sd)

    def state_dict(self): return {"students": self.students}
    def load_state_dict(self, state): self.students = dict(state["students"])
    def velocity(self, net, x, t): return net(x, TIME_SCALE * t)

    def target(self, teacher, xt, t, n):
        r"""$\tilde v = (v_T(x_t, t) + v_T(x', t + h)) / 2$, $h = 1/(2n)$."""
        h = 1.0 / (2 * n)
        x_mid = xt + h * self.velocity(teacher, xt, t)  # x' = x_t + h v_T(x_t, t)
        x_end = x_mid + h * self.velocity(teacher, x_mid, t + h)  # x'' = x' + h v_T(x', t + h)
        return (x_end - xt) / (2 * h)

    def loss(self, net, x1, x0=None, ema=None, y=None):
        if self.teacher is None:
            raise ValueError("pd needs method.teacher (the runner sets it from --teacher)")
        y = drop_labels(y, self.label_dropout, self.num_classes)
        # the first round's teacher is the guided rf run; later teachers are students that learnt the guided flow
        teacher = self.guided_teacher(y) if self.round <= 0 else self.bound(self.teacher, y)
        n = self.rounds[max(self.round, 0)]
        x0 = torch.randn_like(x1) if x0 is None else x0
        t = torch.randint(0, n, (x1.shape[0],), device=x1.device).float() / n  # the student's grid i / N
        xt = interpolate(x0, x1, t)
        with torch.no_grad():
            target = self.target(teacher, xt, t, n)
        pred = self.velocity(self.bound(net, y), xt, t)
        return F.mse_loss(pred, target.to(pred.dtype))

    def sample(self, net, noise, nfe, y=None):
        """n Euler steps of the network the runner passes: sampling_net(n, ema), the student of that round."""
        self.check_nfe(nfe)
        return euler(self.bound(net, y), noise, nfe)


# %% ld3: learning to discretise the ODE of a trained flow ---------------------------------------------------------
@dataclasses.dataclass(eq=False)
class LD3(Method):
    r"""LD3 (learning to discretise): for each NFE n, the n + 1 time points of an Euler solver of a trained rectified
    flow (the teacher, kept fixed) and the n times fed to its network are fitted so that the n-step solution matches the
    teacher's many-step one from the same noise (each noise may move inside a small ball). No network trains.

    Paper: Tong, Nguyen-Tang, Tran, Luong, Dinh, Nguyen, Le, Bui. Learning to Discretize Denoising Diffusion ODEs.
    ICLR 2025, arXiv:2405.15506.

        $$ 0 = t_0 < t_1 < \dots < t_n = 1, \quad t_i = \sum_{k<i} \mathrm{softmax}(\xi)_k
           \qquad \text{(ordered inside [0, 1] by design)} $$
        $$ s_i = t_i + \mathrm{clip}(\eta_i, -w, w), \quad w = \text{win_rate} \min_k (t_{k+1} - t_k)
           \qquad \text{(decoupled inputs; } s_0 = 0 \text{ pinned)} $$
        $$ x_{i+1} = x_i + (t_{i+1} - t_i)\, v(x_i, s_i) \qquad \text{(Euler, } n \text{ network calls)} $$
        $$ L = E_i \min_{\|x_0' - x_{0,i}\| \le r} d(\Psi_\xi(x_0'), \Psi^*(x_{0,i}))
           \qquad \text{(Tong et al. Eq. 8, slack)} $$
    (the paper integrates EDM's sigma or logSNR the other way). $\Psi^*$: the teacher's teacher_steps-step Euler
    solution from num_pairs noises drawn once; $r = \text{slack}\, D / n^2$ ($D = C H W$). As the authors' trainer.py:
    each step moves each batch noise by a slack_step; RMSprop (lr_time, momentum 0.9) on $\xi$, SGD (lr_shift / n) on
    $\eta$, gradients clipped to norm 1; the first phase1_epochs epochs learn $\xi$ only. Deviations: d is the per-pixel
    MSE (the authors' "L2"; LPIPS needs VGG weights, unavailable offline); shift_first (not the authors'):
    $s_0 = \mathrm{clip}(\eta_0, 0, w)$, giving NFE 1 a parameter; no validation set with patience-based decay: the last
    parameters are used. The decoupled step: the authors turn every model into a noise prediction at $s_i$ and keep the
    schedule's coefficients at $t_i$: $x_i + (t_{i+1} - t_i)(s_i / t_i)\, v(x_i, s_i)$ on this path ($\alpha = t$,
    $\sigma = 1 - t$); here the drift v is taken at $s_i$, as their Euler on EDM's $\sigma$ takes
    $dx/d\sigma = \hat\epsilon$ at the shifted input: $s_i / t_i$ is 0/0 at $t_0 = 0$, this grid's start (theirs stop
    short of pure noise), infinite with shift_first; at $s_i = t_i$ both are one Euler step. Labelled runs: pairs take
    labels in turn; the teacher's solution and the fitted solver are guided at `guidance` (NFE n: n/2 guided steps)."""
    name = "ld3"
    teacher_methods, needs_teacher, init_from_teacher = ("rf", "reflow"), True, True  # the network stays the teacher's
    state_for_sampling = True  # learned time grids
    nfes: tuple = option((1, 2, 4), "NFEs to learn grids for", flag="--nfe")
    num_pairs: int = option(50, "noises and teacher outputs to fit")
    batch_size: int = option(2, "pairs per optimisation step", flag="--ld3-batch")
    epochs: int = option(7, "passes over the pairs", flag="--ld3-epochs")
    phase1_epochs: int = option(2, "first epochs that learn the time points only", flag="--ld3-phase1-epochs")
    teacher_steps: int = option(100, "Euler steps of the teacher's ODE for each pair")
    lr_time: float = option(5e-3, "RMSprop learning rate of the time points", flag="--ld3-lr-time")
    lr_shift: float = option(0.1, "SGD learning rate of the decoupled inputs (/ n)", flag="--ld3-lr-shift")
    win_rate: float = option(0.5, "decoupled inputs move at most this share of a gap", flag="--ld3-win-rate")
    slack: float = option(1e-3, "slack radius r = S * C*H*W / n^2, 0 = off", flag="--ld3-slack")
    shift_first: bool = option(False, "learn the first network time too (the authors: 0)", flag="--ld3-shift-first")
    seed: int = option(0, "seed of the pairs and of the epochs' order", flag="--ld3-seed")
    guidance: float = option(1.0, "class-conditional runs: the guidance scale of the teacher's pairs and of the "
                                  "fitted solver (a guided step costs 2 NFE)", flag="--guidance")

    def __post_init__(self):
        self.nfes = tuple(sorted(set(self.nfes)))
        require(self.nfes and all(isinstance(n, int) and n >= 1 for n in self.nfes), "NFEs must be integers >= 1",
                self, "nfes")
        require(self.guidance == 1 or all(n % 2 == 0 for n in self.nfes),
                f"ld3 with guidance {self.guidance:g}: each step runs the teacher on the labelled and the null branch "
                f"(2 NFE), so its NFEs must be even; pass --nfe 2 4", self, "nfes", "guidance")
        for key in ("num_pairs", "batch_size", "epochs", "teacher_steps"):
            require(isinstance(getattr(self, key), int) and getattr(self, key) >= 1, "must be an integer >= 1", self,
                    key)
        require(0 <= self.phase1_epochs <= self.epochs, f"must be in [0, epochs = {self.epochs}]", self,
                "phase1_epochs")
        require(0 <= self.win_rate <= 0.5, "must be in [0, 0.5] (decoupled times stay between their neighbours)",
                self, "win_rate")
        require(self.slack >= 0, "must be >= 0 (0: no slack)", self, "slack")
        # xi: logits of the n step sizes (zeros: the uniform grid, i.e. rf's sampler); eta: decoupled offsets.
        self.grid = torch.nn.ParameterDict({f"{k}{n}": torch.nn.Parameter(torch.zeros(self.steps(n)))
                                            for n in self.nfes for k in ("xi", "eta")})
        self.pairs, self.latents, self.step, self._pending = None, None, 0, []

    def steps(self, nfe): return nfe // 2 if self.guidance != 1 else nfe  # solver steps: a guided step costs 2 NFE
    def steps_per_epoch(self): return math.ceil(self.num_pairs / self.batch_size)
    def default_steps(self): return self.epochs * self.steps_per_epoch()

    def check_nfe(self, nfe):
        if nfe not in self.nfes:
            raise UnsupportedNFE(f"ld3 learns one time grid per NFE and has grids for NFE "
                                 f"{', '.join(map(str, self.nfes))} (--nfe of the run): it can do those, not {nfe!r}")

    def times(self, n):
        """(t: (n + 1,) the solver's time points, s: (n,) the times fed to the network), differentiable."""
        p = torch.softmax(self.grid[f"xi{n}"], 0)
        t = torch.cat([p.new_zeros(1), torch.cumsum(p, 0)[:-1], p.new_ones(1)])  # t_0 = 0, t_n = 1 exactly
        w = self.win_rate * (t[1:] - t[:-1]).min().detach()  # half the smallest gap at most: s stays ordered
        eta = self.grid[f"eta{n}"]
        first = torch.clamp(eta[:1], 0 * w, w) if self.shift_first else eta[:1] * 0  # s_0 >= 0: no time before noise
        return t, t[:-1] + torch.cat([first, torch.clamp(eta, -w, w)[1:]])

    def solve(self, net, x, n):
        r"""$x_{i+1} = x_i + (t_{i+1} - t_i)\, v(x_i, s_i)$: the grid of NFE n (n steps, or n / 2 guided ones)."""
        t, s = (v.to(x.device) for v in self.times(n))
        for i in range(len(s)):
            x = x + (t[i + 1] - t[i]) * net(x, TIME_SCALE * s[i].expand(x.shape[0]))
        return x

    def sample(self, net, noise, nfe, y=None):
        self.check_nfe(nfe)
        return self.solve(Guided(net, y, self.num_classes, self.guidance), noise, nfe)

    def on_step(self, step, net, ema): self.step = step  # batch and phase: functions of the step (exact resume)

    def batch_indices(self, step):
        """Pairs of `step`: epoch e is a permutation seeded by (seed, e), cut into batches (the last one smaller)."""
        e, j = divmod(step, self.steps_per_epoch())
        perm = torch.randperm(self.num_pairs, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + e))
        return perm[j * self.batch_size:(j + 1) * self.batch_size]

    def per_sample_distance(self, x, y): return (x - y).float().pow(2).flatten(1).mean(1)  # d: per-pixel MSE

    def loss(self, net, x1, x0=None, ema=None, y=None):
        """Sum over the NFEs of the batch-mean distance. net, x1's values and x0 are not used: the flow is
        self.teacher and the data are its own pairs (drawn on the first call, x1 gives their shape)."""
        if self.teacher is None:
            raise ValueError("ld3 needs method.teacher (the runner sets it from --teacher)")
        if self.guidance != 1 and self.num_classes is None:
            raise ValueError(f"ld3 with guidance {self.guidance:g} needs a class-conditional run (--class-cond)")
        dev = x1.device
        if self.pairs is None:  # the small set of noises (and labels, in turn) with the teacher's outputs, kept
            x0_all = torch.randn((self.num_pairs, *x1.shape[1:]), generator=torch.Generator().manual_seed(self.seed))
            y_all = None if self.num_classes is None else torch.arange(self.num_pairs) % self.num_classes
            with torch.no_grad():
                target = torch.cat([euler(self.guided_teacher(None if y_all is None else y_all[k:k + 250].to(dev)),
                                          x0_all[k:k + 250].to(dev), self.teacher_steps)
                                    .float().cpu() for k in range(0, self.num_pairs, 250)])
            self.pairs = {"x0": x0_all, "x1": target, "y": y_all}
            self.latents = {str(n): x0_all.clone() for n in self.nfes}
        idx = self.batch_indices(self.step)
        x0b, x1b = self.pairs["x0"][idx].to(dev), self.pairs["x1"][idx].to(dev)
        yb = None if self.pairs.get("y") is None else self.pairs["y"][idx].to(dev)
        teacher, total, self._pending = self.guided_teacher(yb), 0.0, []
        for n in self.nfes:
            latent = self.latents[str(n)][idx].to(dev).requires_grad_(self.slack > 0)
            d = self.per_sample_distance(self.solve(teacher, latent, n), x1b)
            total = total + d.mean()
            self._pending.append((n, idx, latent, d.detach(), x0b, x1b, teacher))
        return total

    def slack_step(self):
        r"""$x_0' \gets x_0' - (12 / n) \mathrm{grad}$, projected into $\|x_0' - x_0\| \le r = \text{slack } D / n^2$,
        kept only for the samples whose distance went down (the authors' _update_latents)."""
        for n, idx, latent, before, x0b, x1b, teacher in self._pending:
            if latent.grad is None:
                continue
            with torch.no_grad():
                r = self.slack * latent[0].numel() / n ** 2
                diff = latent - (12.0 / n) * latent.grad - x0b
                norm = diff.flatten(1).norm(dim=1)
                scale = torch.where(norm > r, r / norm.clamp_min(1e-12), torch.ones_like(norm))
                cand = x0b + expand_t(scale, diff) * diff
                better = (self.per_sample_distance(self.solve(teacher, cand, n), x1b) < before).cpu()
                self.latents[str(n)][idx[better]] = cand[better.to(cand.device)].float().cpu()
        self._pending = []

    def make_optimizer(self, net, lr, weight_decay):
        """The time grids instead of the U-Net (whose weights stay the teacher's); the runner's lr does not apply."""
        self.grid.to(next(net.parameters()).device)
        return LD3Optimizer(self)

    def state_dict(self): return {"grid": self.grid.state_dict(), "pairs": self.pairs, "latents": self.latents}

    def load_state_dict(self, state):
        self.grid.load_state_dict(state["grid"])
        self.pairs, self.latents = state["pairs"], state["latents"]


class LD3Optimizer:
    r"""LD3's optimiser (its docstring) and slack step; no param_groups: the runner's lr schedule does not apply."""
    param_groups = ()

    def __init__(self, method):
        self.method, g = method, method.grid
        self.rms = torch.optim.RMSprop([{"params": [g[f"xi{n}"]]} for n in method.nfes], lr=method.lr_time,
                                       momentum=0.9)
        self.sgd = torch.optim.SGD([{"params": [g[f"eta{n}"]], "lr": method.lr_shift / n} for n in method.nfes],
                                   lr=method.lr_shift)

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

    def state_dict(self): return {"rms": self.rms.state_dict(), "sgd": self.sgd.state_dict()}

    def load_state_dict(self, state):
        self.rms.load_state_dict(state["rms"])
        self.sgd.load_state_dict(state["sgd"])


# %% dmd2: distribution matching distillation ----------------------------------------------------------------------
class FeatureHead(torch.nn.Module):
    """dmd2's classifier on the fake score's bottleneck: conv 4x4 stride 2, GroupNorm, SiLU, 1x1 conv to a logit per
    position, averaged per image."""
    def __init__(self, channels):
        super().__init__()
        nn = torch.nn
        self.layers = nn.Sequential(nn.Conv2d(channels, channels, 4, 2, 1), nn.GroupNorm(min(32, channels), channels),
                                    nn.SiLU(), nn.Conv2d(channels, 1, 1))

    def forward(self, h): return self.layers(h.float()).flatten(1).mean(1)


@dataclasses.dataclass(eq=False)
class DMD2(Method):
    r"""DMD2: a generator started from a flow teacher is trained so that its samples' distribution matches the data: the
    gradient is the difference of two denoisers at re-noised generator samples, the teacher's (the data's score) and
    that of a fake-score network trained online by flow matching on the generator's own samples; a GAN term through a
    classifier head on the fake network's features adds real data. No regression loss.

    Paper: Yin, Gharbi, Park, Zhang, Shechtman, Durand, Freeman. Improved Distribution Matching Distillation for Fast
    Image Synthesis. NeurIPS 2024, arXiv:2405.14867. Yin, Gharbi, Zhang, Shechtman, Durand, Freeman, Park. One-step
    Diffusion with Distribution Matching Distillation. CVPR 2024, arXiv:2311.18828 (DMD).

        $$ \hat x = G(x_{t_k}, t_k) = x_{t_k} + (1 - t_k)\, v_G(x_{t_k}, t_k)
           \qquad \text{(one call; started from the teacher: its denoiser)} $$
        $$ x_t = (1 - t)\, n + t \hat x, \quad t \sim U[t_\min, t_\max], \quad
           D_\text{net}(x_t) = x_t + (1 - t)\, v_\text{net}(x_t, t) $$
        $$ \mathrm{grad} = (D_\text{fake}(x_t) - D_\text{real}(x_t)) / \mathrm{mean}|\hat x - D_\text{real}(x_t)|
           \qquad \text{(DMD Eq. 7-8, per image)} $$
        $$ L_G = 0.5 \| \hat x - \mathrm{sg}(\hat x - \mathrm{grad}) \|^2
           + \text{gan_weight}\, \mathrm{softplus}(-h(\phi_\text{fake}(x_t))) \qquad (dL/d\hat x = \mathrm{grad}) $$
        $$ L_\text{fake} = \| v_\text{fake}(x_t, t) - (\mathrm{sg}\, \hat x - n) \|^2
           + \text{cls_weight}\, [\mathrm{softplus}(h(\phi(x_t))) + \mathrm{softplus}(-h(\phi(x_{1,t'})))] $$
    Why: the score of $x_t$'s law is $(t D(x_t) - x_t) / (1 - t)^2$, so
    $s_\text{real} - s_\text{fake} = t (D_\text{real} - D_\text{fake}) / (1 - t)^2$: -grad is the KL's descent direction
    up to that positive factor. Two time-scale rule: fake_updates fake-score steps (fresh generator samples each, its
    own AdamW) per generator step. The fake network starts from the teacher, the head from scratch; the head reads the
    fake network's middle block (DMD2 Sec. 4.3), so the GAN needs no external backbone. Multistep (Sec. 4.4): the
    generator trains at the times of the grids k / n of the run's NFEs, its input at t_k made by backward simulation
    (its own chain from noise, re-noised to t_k: what it meets at sampling), not by noising real images. Sampling:
    $\hat x = G(x, t_0)$; $x = (1 - t_{k+1})\, n + t_{k+1} \hat x$; ... (NFE n: n calls). Deviations (against
    tianweiy/DMD2's EDM code), what they do / what we do / why:
    - gradient times: EDM's Karras levels 20..980 of 1000 / t ~ U[t_min, t_max] / the rf teacher's uniform time;
    - fake-score loss: x0 error weighted by EDM's $1/\sigma^2 + 1/\sigma_d^2$ / flow matching (x0 error weighted by
      $1/(1 - t)^2$) / each the teacher's own loss: the fake score, a teacher copy, learns as it did;
    - fake-score times: all 1000 levels / [t_min, t_max] / where the gradient reads the fake score;
    - the normaliser: mean|x - D_real| and nan_to_num after / mean|x - D_real| + 1e-6 / the same but at an exact 0;
    - one-step start: $\sigma_\max = 80$ (t = 1/81) / t = 0 / this file's path starts from pure noise;
    - GAN's real side: a fresh real batch per fake step / the step's batch for all fake steps / the runner gives one."""
    name = "dmd2"
    teacher_methods, needs_teacher, init_from_teacher = ("rf", "reflow"), True, True
    nfes: tuple = option((1, 2, 4), "NFEs whose grids k / n the generator trains on", flag="--nfe")
    fake_updates: int = option(5, "fake-score steps per generator step (two-timescale rule)", flag="--dmd-fake-updates")
    fake_lr: float = option(None, "the fake score's AdamW rate (default: the run's --lr)", flag="--dmd-fake-lr")
    t_min: float = option(0.02, "smallest re-noising time", flag="--dmd-t-min")
    t_max: float = option(0.98, "largest re-noising time", flag="--dmd-t-max")
    gan_weight: float = option(3e-3, "weight of the generator's GAN term, 0 = off", flag="--dmd-gan-weight")
    cls_weight: float = option(1e-2, "weight of the head's classifier loss in the fake update", flag="--dmd-cls-weight")
    guidance: float = option(1.0, TEACHER_GUIDANCE, flag="--guidance")

    def __post_init__(self):
        self.nfes = tuple(sorted(set(self.nfes)))
        require(self.nfes and all(isinstance(n, int) and n >= 1 for n in self.nfes), "NFEs must be integers >= 1",
                self, "nfes")
        require(isinstance(self.fake_updates, int) and self.fake_updates >= 1, "must be an integer >= 1 (the paper: 5)",
                self, "fake_updates")
        require(0 < self.t_min < self.t_max < 1, "need 0 < t_min < t_max < 1", self, "t_min", "t_max")
        require(self.gan_weight >= 0 and self.cls_weight >= 0, "gan_weight and cls_weight must be >= 0", self,
                "gan_weight", "cls_weight")
        require(self.fake_lr is None or self.fake_lr > 0, "must be > 0", self, "fake_lr")
        self.grid = sorted({k / n for n in self.nfes for k in range(n)})  # the generator's input times
        self.fake = self.head = self.fake_opt = None  # built at the first step from the teacher
        self.fake_pending, self.lr, self._feat = {}, 1e-3, None

    def check_nfe(self, nfe):
        if nfe not in self.nfes:
            raise UnsupportedNFE(f"dmd2 trains its generator on the grids of NFE {', '.join(map(str, self.nfes))} "
                                 f"(--nfe of the run): it can do those, not {nfe!r}")

    @staticmethod
    def denoise(net, x_t, t):
        r"""$x_t + (1 - t)\, v(x_t, t)$: a flow net's data prediction (generator output; teacher: $E[x_1 | x_t]$)."""
        return x_t + expand_t(1 - t, x_t) * net(x_t, TIME_SCALE * t)

    def simulate(self, net, noise, k):
        """The generator's input at grid[k] by backward simulation: its own chain from noise, re-noised. k calls."""
        x = noise
        for j in range(k):
            t = torch.full((len(x),), self.grid[j], device=x.device)
            x = (1 - self.grid[j + 1]) * torch.randn_like(x) + self.grid[j + 1] * self.denoise(net, x, t)
        return x

    def generate(self, net, noise, y=None):
        r"""$(\hat x, t_k)$: the generator's sample from its input at a random grid time (the chain without gradient,
        through the unwrapped network: its calls differ in number between ranks and need no DDP)."""
        k = int(torch.randint(len(self.grid), ()))
        with torch.no_grad():
            x = self.simulate(self.bound(getattr(net, "module", net), y), noise, k)
        t = torch.full((len(x),), self.grid[k], device=x.device)
        return self.denoise(self.bound(net, y), x, t), t

    def make_optimizer(self, net, lr, weight_decay):
        self.lr, self.weight_decay = lr, weight_decay
        return super().make_optimizer(net, lr, weight_decay)

    def networks(self, like):
        """The fake score (a copy of the teacher), its head and their AdamW, built on like's device."""
        if self.fake is None:
            self.fake = copy.deepcopy(self.teacher).train().requires_grad_(True)
        if self.head is None and self.gan_weight > 0:
            block = getattr(self.fake, "middle_block", None)
            if block is None:
                raise ValueError("dmd2's GAN head reads the fake score's middle_block (a unet.py network): use "
                                 "--dmd-gan-weight 0 with this network")
            block.register_forward_hook(lambda m, i, out: setattr(self, "_feat", out))
            with torch.random.fork_rng(devices=[]):  # its initial weights must not move the training RNG stream
                torch.manual_seed(0)
                channels = [m for m in block.modules() if isinstance(m, torch.nn.Conv2d)][-1].out_channels
                self.head = FeatureHead(channels).to(like.device)
        if self.fake_opt is None:
            params = list(self.fake.parameters()) + (list(self.head.parameters()) if self.head is not None else [])
            self.fake_opt = torch.optim.AdamW(params, lr=self.fake_lr or self.lr,
                                              weight_decay=getattr(self, "weight_decay", 0.0))
            if "fake" in self.fake_pending:
                self.fake.load_state_dict(self.fake_pending["fake"])
                if self.head is not None:
                    self.head.load_state_dict(self.fake_pending["head"])
                self.fake_opt.load_state_dict(self.fake_pending["fake_opt"])
            self.fake_pending = {}
        return self.fake, self.head

    def state_dict(self):
        return dict(self.fake_pending) if self.fake_opt is None else {
            "fake": self.fake.state_dict(), "fake_opt": self.fake_opt.state_dict(),
            **({"head": self.head.state_dict()} if self.head is not None else {})}

    def load_state_dict(self, state):
        self.fake, self.head, self.fake_opt, self.fake_pending = None, None, None, dict(state)

    def renoise(self, x):
        t, n = self.t_min + (self.t_max - self.t_min) * torch.rand(len(x), device=x.device), torch.randn_like(x)
        return interpolate(n, x, t), t, n

    def fake_loss(self, fake, head, x_hat, x1):  # fake: the fake score with the batch's labels bound
        """Flow matching of the fake score on (detached) generator samples, plus the head's real/fake loss."""
        x_t, t, n = self.renoise(x_hat.detach())
        loss = F.mse_loss(fake(x_t, TIME_SCALE * t).float(), (x_hat.detach() - n).float())
        if head is not None:
            logit_fake = head(self._feat)
            x1_t, t1, _ = self.renoise(x1)
            fake(x1_t, TIME_SCALE * t1)
            loss = loss + self.cls_weight * (F.softplus(logit_fake).mean() + F.softplus(-head(self._feat)).mean())
            self._feat = None
        return loss

    def fake_step(self, net, x1, y=None):
        """One AdamW step of the fake score (and head) on fresh generator samples with the batch's labels y (the
        real side of the GAN: x1 with the same labels); gradients averaged over ranks."""
        fake, head = self.networks(x1)
        fake.requires_grad_(True)
        with torch.no_grad():
            x_hat, _ = self.generate(getattr(net, "module", net), torch.randn_like(x1), y)
        loss = self.fake_loss(self.bound(fake, y), head, x_hat, x1)
        self.fake_opt.zero_grad(set_to_none=True)
        loss.backward()
        average_over_ranks([p.grad for g in self.fake_opt.param_groups for p in g["params"] if p.grad is not None])
        self.fake_opt.step()
        return loss.detach()

    def generator_loss(self, net, x_hat, y=None):
        """DMD's distribution-matching loss (whose gradient in x_hat is `grad`) plus the GAN term; labels y: the
        teacher's score is its guided one (scale `guidance`), the fake score's conditional."""
        fake, head = self.networks(x_hat)
        fake.requires_grad_(False)  # the generator's step: gradient through the fake network's input only
        x_t, t, _ = self.renoise(x_hat)
        with torch.no_grad():
            d_real = self.denoise(self.guided_teacher(y), x_t, t).float()
        with torch.set_grad_enabled(head is not None):  # a graph to x_hat only for the GAN term's features
            d_fake = self.denoise(self.bound(fake, y), x_t, t).float()
        x = x_hat.float()
        with torch.no_grad():
            weight = 1.0 / ((x - d_real).abs().flatten(1).mean(1) + 1e-6)  # DMD's per-image normalisation
            grad = (d_fake.detach() - d_real) * expand_t(weight, x)
        loss = 0.5 * F.mse_loss(x, (x - grad).detach())
        if head is not None and self.gan_weight > 0:
            g_loss = F.softplus(-head(self._feat)).mean()
            self._feat = None  # no graph (with DDP's hooks) kept alive past the step
            self.last_metrics = {**self.last_metrics, "g_gan": g_loss.item()}
            loss = loss + self.gan_weight * g_loss
        return loss

    def loss(self, net, x1, x0=None, ema=None, y=None):
        """y: the batch's labels (no dropout: the generator is always conditional; guidance is the teacher's)."""
        if self.teacher is None:
            raise ValueError("dmd2 needs method.teacher (the runner sets it from --teacher)")
        fake_losses = [self.fake_step(net, x1, y) for _ in range(self.fake_updates)]
        self.last_metrics = {"fake_loss": torch.stack(fake_losses).mean().item()}
        x_hat, _ = self.generate(net, torch.randn_like(x1) if x0 is None else x0, y)
        return self.generator_loss(net, x_hat, y)

    def sample(self, net, noise, nfe, y=None):
        self.check_nfe(nfe)
        x, net = noise, self.bound(net, y)
        for k in range(nfe):
            x_hat = self.denoise(net, x, torch.full((len(x),), k / nfe, device=x.device))
            if k < nfe - 1:
                x = interpolate(torch.randn_like(x), x_hat, torch.full((len(x),), (k + 1) / nfe, device=x.device))
        return x_hat


METHODS = {m.name: m for m in (RectifiedFlow, Reflow, Shortcut, MeanFlow, ImprovedMeanFlow, PixelMeanFlow,
                               ConsistencyModel, ContinuousConsistency, CTM, ProgressiveDistillation, LD3, DMD2)}


def main(argv=None):
    """Train, evaluate, report or export with these methods (trainer.py's command line)."""
    import trainer  # the machinery is handed the methods; it never imports this file
    return trainer.main(METHODS, argv)


# %% Try it: a minute of rf on mnist5k ----------------------------------------------------------------------------
# As a script, this is the command line (python fewstep.py --help). As a notebook (jupytext --to notebook
# fewstep.py), the kernel's arguments are no command: the cell trains rf for a minute on mnist5k and shows its
# samples at NFE 1, 2, 4 (runs/notebook-rf; run it again to train on from where it stopped).
if __name__ == "__main__":
    import sys
    if "ipykernel" not in sys.modules:
        main()
    else:
        main(["--method", "rf", "--data", "mnist5k", "--arch", "mnist", "--minutes", "1", "--no-fid",
              "--num-samples", "64", "--out", "runs/notebook-rf"])
        from IPython.display import Image, display
        display(*(Image(f"runs/notebook-rf/samples_nfe{n}.png") for n in (1, 2, 4)))
