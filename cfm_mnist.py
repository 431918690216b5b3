r"""Conditional flow matching on MNIST.

Lipman, Chen, Ben-Hamu, Nickel, Le. Flow Matching for Generative Modeling. ICLR 2023, arXiv:2210.02747.
Related: Liu, Gong, Liu. Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow.
ICLR 2023, arXiv:2209.03003 (the same straight path at sigma_min = 0, plus reflow); Tong, Fatras, Malkin, Huguet,
Zhang, Rector-Brooks, Wolf, Bengio. Improving and Generalizing Flow-Based Generative Models with Minibatch Optimal
Transport. TMLR 2024, arXiv:2302.00482 (CFM as a family of such losses).

Time convention (Lipman's): t in [0, 1], t = 0 is noise x0 ~ N(0, I), t = 1 is data x1 (an image in [-1, 1]).
Sampling integrates $dx/dt = v(x, t)$ FORWARD from t = 0 to t = 1. The network receives 1000 * t (a float in
[0, 1000]) so its sinusoidal time embedding sees the same range as a DDPM's integer timesteps 0..999.

The Gaussian probability path conditioned on one data point x1 (Lipman Sec. 4.1, "optimal transport" path):
    $$ p_t(x | x_1) = N(x; \mu_t(x_1), \sigma_t^2 I) $$
    $$ \mu_t(x_1) = t\, x_1, \qquad \sigma_t = 1 - (1 - \sigma_\text{min})\, t \;(= t\, \sigma_\text{min} + 1 - t)
       \qquad \text{(Eq. 20)} $$
    $$ \psi_t(x_0) = \sigma_t x_0 + \mu_t(x_1)
       \qquad \text{(the flow that pushes } N(0, I) \text{ onto } p_t(x | x_1) \text{)} $$
    $$ u_t(x | x_1) = \frac{x_1 - (1 - \sigma_\text{min})\, x}{1 - (1 - \sigma_\text{min})\, t}
       \qquad \text{(Eq. 21)} $$
    $$ L_\text{CFM} = E_{t \sim U[0,1],\, x_1 \sim \text{data},\, x_0 \sim N(0,I)}
       \| v_\theta(\psi_t(x_0), t) - (x_1 - (1 - \sigma_\text{min})\, x_0) \|^2 \qquad \text{(Eq. 23)} $$
$\sigma_\text{min} = 0$ (the default) is the rectified-flow path $x_t = t\, x_1 + (1 - t)\, x_0$ with velocity
$x_1 - x_0$.

Usage:
    python cfm_mnist.py train --out runs/cfm-mnist                       # MNIST (downloads once), --steps 20000
    python cfm_mnist.py train --out runs/cfm-mnist --data mnist5k --minutes 20   # offline, CPU-sized budget
    python cfm_mnist.py sample --out runs/cfm-mnist --solver euler --steps 20 --fid 1000
    python cfm_mnist.py sample --out runs/cfm-mnist --solver adaptive --rtol 1e-4 --atol 1e-4 --fid 1000
Rerunning the same train command resumes from RUN/ckpt.pt. FID's reference (fid.reference_for) is the held-out split
of the run's training data where one exists (mnist: the 10,000 test digits), else the training data itself (mnist5k:
all 5,000), at 28x28, 1 channel; --fid-ref SPEC picks another. Its Inception statistics are computed once and cached
in RUN/fid_ref_<spec>_<split>_28px_1ch.npz.
"""
import argparse
import copy
import json
import math
import pathlib
import time

import numpy as np
import scipy.integrate
import torch
from tqdm import tqdm

import data
import fid
import rundir
import unet

TIME_SCALE = 1000.0  # the net sees TIME_SCALE * t for t in [0, 1]
SOLVERS = ("euler", "midpoint", "rk4", "adaptive")


# %% Probability path and loss -----------------------------------------------------------------------------------
def pad_t_like_x(t, x):
    """Reshape a (B,) time tensor to (B, 1, 1, 1) so it broadcasts against x: (B, C, H, W); floats pass through."""
    if isinstance(t, (float, int)):
        return t
    return t.reshape(-1, *([1] * (x.dim() - 1)))


class ConditionalFlowMatcher:
    """The Gaussian conditional path of Lipman et al. (Eq. 20-23) and its CFM loss.

    :param sigma_min: standard deviation of p_1(x | x1) around the data point; 0 gives the straight
        (rectified-flow) path whose end point is exactly x1.
    """

    def __init__(self, sigma_min=0.0):
        if not 0.0 <= sigma_min < 1.0:
            raise ValueError(f"sigma_min must be in [0, 1), got {sigma_min}")
        self.sigma_min = sigma_min

    def compute_mu_t(self, x1, t):
        r"""$\mu_t(x_1) = t\, x_1$ (Eq. 20). x1: (B, C, H, W); t: (B,) or float."""
        return pad_t_like_x(t, x1) * x1

    def compute_sigma_t(self, t):
        r"""$\sigma_t = 1 - (1 - \sigma_\text{min})\, t = t\, \sigma_\text{min} + 1 - t$ (Eq. 20): 1 at t = 0,
        $\sigma_\text{min}$ at t = 1."""
        return 1.0 - (1.0 - self.sigma_min) * t

    def compute_conditional_velocity_field(self, x1, t, xt):
        r"""$u_t(x | x_1)$ at x = xt (Eq. 21).

        Derivation: the path is $x_t = \psi_t(x_0) = \mu_t + \sigma_t x_0$ for a fixed noise x0, so
            $$ \frac{d}{dt} x_t = \mu_t' + \sigma_t' x_0 = x_1 - (1 - \sigma_\text{min})\, x_0 $$
        The velocity field must be written as a function of the position x, not of x0: invert the path,
        $x_0 = (x - \mu_t) / \sigma_t = (x - t\, x_1) / \sigma_t$, and substitute:
            $$ u_t(x | x_1) = x_1 - (1 - \sigma_\text{min}) (x - t\, x_1) / \sigma_t
                            = [x_1 (\sigma_t + (1 - \sigma_\text{min})\, t) - (1 - \sigma_\text{min})\, x] / \sigma_t
                            = \frac{x_1 - (1 - \sigma_\text{min})\, x}{1 - (1 - \sigma_\text{min})\, t}
               \qquad \text{since } \sigma_t + (1 - \sigma_\text{min})\, t = 1 $$
        At $\sigma_\text{min} = 0$ and $t \to 1$ this divides 0 by 0; the loss below uses the x0 form instead.
        """
        sigma_t = pad_t_like_x(self.compute_sigma_t(t), x1)
        return (x1 - (1.0 - self.sigma_min) * xt) / sigma_t

    def sample_xt(self, x0, x1, t):
        r"""$x_t = \psi_t(x_0) = \mu_t(x_1) + \sigma_t x_0$, a draw from $p_t(x | x_1) = N(\mu_t, \sigma_t^2 I)$ when
        $x_0 \sim N(0, I)$.

        x0: (B, C, H, W) standard normal noise; x1: (B, C, H, W) data; t: (B,).
        """
        return self.compute_mu_t(x1, t) + pad_t_like_x(self.compute_sigma_t(t), x1) * x0

    def loss(self, net, x1):
        """CFM loss (Eq. 23) for one batch x1: (B, C, H, W) in [-1, 1]; returns a scalar tensor."""
        t = torch.rand(x1.shape[0], device=x1.device)  # t ~ U[0, 1]
        x0 = torch.randn_like(x1)  # x0 ~ N(0, I)
        xt = self.sample_xt(x0, x1, t)
        # Target velocity $\frac{d}{dt} \psi_t(x_0) = x_1 - (1 - \sigma_\text{min})\, x_0$. It equals
        # compute_conditional_velocity_field(x1, t, xt) (tested), but has no $1 / \sigma_t$, which at
        # $\sigma_\text{min} = 0$ and t close to 1 would amplify float32 rounding of xt.
        ut = x1 - (1.0 - self.sigma_min) * x0
        vt = net(xt, TIME_SCALE * t)
        return ((vt - ut) ** 2).mean()


def velocity(net):
    """Wrap a net(x, 1000 t) as v(x, t) with t a Python float, the form every solver below takes."""

    def v(x, t):
        return net(x, torch.full((x.shape[0],), TIME_SCALE * t, device=x.device, dtype=x.dtype))

    return v


# %% ODE solvers for dx/dt = v(x, t): fixed-step (one function per step rule) and adaptive (scipy RK45) ----------
def euler_step(v, x, t, h):
    r"""Euler, order 1: $x_{n+1} = x_n + h\, v(x_n, t_n)$. 1 NFE."""
    return x + h * v(x, t)


def midpoint_step(v, x, t, h):
    """Explicit midpoint, order 2: half an Euler step, then the full step with the midpoint slope. 2 NFE."""
    x_mid = x + 0.5 * h * v(x, t)
    return x + h * v(x_mid, t + 0.5 * h)


def rk4_step(v, x, t, h):
    """Classical Runge-Kutta, order 4. 4 NFE."""
    k1 = v(x, t)
    k2 = v(x + 0.5 * h * k1, t + 0.5 * h)
    k3 = v(x + 0.5 * h * k2, t + 0.5 * h)
    k4 = v(x + h * k3, t + h)
    return x + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


FIXED_STEP = {"euler": (euler_step, 1), "midpoint": (midpoint_step, 2), "rk4": (rk4_step, 4)}  # (rule, NFE/step)


def odeint_fixed(v, x, solver="euler", steps=10, t0=0.0, t1=1.0):
    """Integrate $dx/dt = v(x, t)$ from t0 to t1 with `steps` equal steps. Returns (x(t1), NFE)."""
    step_fn, nfe_per_step = FIXED_STEP[solver]
    h = (t1 - t0) / steps
    for n in range(steps):
        x = step_fn(v, x, t0 + n * h, h)  # t_n = t0 + n h, not a running sum, so t_N lands on t1
    return x, steps * nfe_per_step


def odeint_adaptive(v, x, t0=0.0, t1=1.0, rtol=1e-4, atol=1e-4):
    """Integrate $dx/dt = v(x, t)$ with scipy's RK45 (Dormand-Prince 5(4), error control on the flattened batch).

    The whole batch is one ODE state, so the step size is shared by all samples and the error norm is the RMS
    over every pixel of every sample. Returns (x(t1), NFE), NFE = scipy's count of calls to v.
    """
    shape, dtype, device = x.shape, x.dtype, x.device

    def f(t, y):  # y: flat float64 numpy state
        xt = torch.from_numpy(y).reshape(shape).to(device=device, dtype=dtype)
        return v(xt, float(t)).reshape(-1).to("cpu", torch.float64).numpy()

    y0 = x.reshape(-1).to("cpu", torch.float64).numpy()
    sol = scipy.integrate.solve_ivp(f, (t0, t1), y0, method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"adaptive solver failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1]).reshape(shape).to(device=device, dtype=dtype), int(sol.nfev)


def check_solver(solver, steps):
    """Bad input -> a clear error before any work is done."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if solver != "adaptive" and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be an integer >= 1 for solver {solver!r}, got {steps!r}")


def odeint(v, x, solver="euler", steps=10, rtol=1e-4, atol=1e-4):
    """Integrate $dx/dt = v(x, t)$ from t = 0 to t = 1 with the named solver. Returns (x(1), NFE)."""
    check_solver(solver, steps)
    if solver == "adaptive":
        return odeint_adaptive(v, x, rtol=rtol, atol=atol)
    return odeint_fixed(v, x, solver, steps)


@torch.no_grad()
def sample(net, n, solver="euler", steps=20, rtol=1e-4, atol=1e-4, batch_size=250, shape=(1, 28, 28),
           generator=None, device="cpu", progress=True):
    r"""Draw n images: $x_0 \sim N(0, I)$, integrate $dx/dt = v_\theta(x, t)$ from 0 to 1.

    Returns (images float (n, C, H, W) clamped to [-1, 1], NFE per batch averaged over batches).
    """
    check_solver(solver, steps)
    v = velocity(net)
    images, nfes = [], []
    for i in tqdm(range(0, n, batch_size), desc=f"sampling {solver}", disable=not progress, leave=False):
        b = min(batch_size, n - i)
        x0 = torch.randn((b, *shape), generator=generator, device="cpu").to(device)  # CPU draws: same on any device
        x1, nfe = odeint(v, x0, solver, steps, rtol, atol)
        images.append(x1.clamp(-1, 1).cpu())
        nfes.append(nfe)
    return torch.cat(images), float(np.mean(nfes))


# %% Training ----------------------------------------------------------------------------------------------------
def load_training_images(spec):
    """uint8 (N, 1, 28, 28); a failed MNIST download says how to run offline (data.DatasetUnavailable)."""
    return data.load(spec, split="train", image_size=28, channels=1)


def train(args):
    out = rundir.make_out_dir(args.out)
    device = rundir.get_device(args.device)
    ckpt_path = out / "ckpt.pt"
    config = {"method": "cfm", "data": args.data, "preset": args.preset, "sigma_min": args.sigma_min,
              "batch_size": args.batch_size, "lr": args.lr, "ema_decay": args.ema_decay, "grad_clip": args.grad_clip,
              "seed": args.seed, "time_scale": TIME_SCALE, "unet": dict(unet.PRESETS[args.preset])}
    fm = ConditionalFlowMatcher(config["sigma_min"])  # checks sigma_min before any work
    state = None
    if ckpt_path.exists():
        state = rundir.load_checkpoint(ckpt_path)
        rundir.check_run_method(state, "cfm", ckpt_path)
        for key in ("data", "preset", "sigma_min", "batch_size"):  # what defines the run; budgets may change
            if state["config"][key] != config[key]:
                raise rundir.UsageError(f"{ckpt_path} was trained with {key}={state['config'][key]!r}, this "
                                        f"command asks for {config[key]!r}. Use a new --out, or the original value "
                                        f"to resume.")
        config = dict(state["config"], method="cfm", lr=args.lr, ema_decay=args.ema_decay, grad_clip=args.grad_clip)

    rundir.seed_everything(args.seed)
    images = load_training_images(config["data"])  # uint8 (N, 1, 28, 28)
    steps_per_epoch = math.ceil(len(images) / config["batch_size"])
    config["steps_per_epoch"] = steps_per_epoch

    net = unet.UNetModel(**config["unet"]).to(device)  # the saved kwargs, so a later preset change cannot break resume
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=config["lr"])
    step = 0
    if state is not None:
        unet.load_state_dict_checked(net, state["model"])
        unet.load_state_dict_checked(ema, state["ema"])
        opt.load_state_dict(state["optimizer"])
        for group in opt.param_groups:
            group["lr"] = config["lr"]
        step = state["step"]
        rundir.set_rng_state(state["rng"])
        # Forget losses logged after the checkpoint (a crash between checkpoints): they will be redone.
        metrics = out / "metrics.jsonl"
        kept = [r for r in rundir.read_metrics(out) if r.get("step", 0) <= step] if metrics.exists() else []
        metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))
        print(f"resuming {ckpt_path} at step {step}")
    rundir.write_config(out, config)
    print(f"cfm_mnist: {unet.count_parameters(net):,} parameters, {len(images)} images ({config['data']}), "
          f"{steps_per_epoch} steps per epoch, device {device}")

    # Data order after a resume is a fresh shuffle (seeded by seed + step), not the exact continuation.
    batches = data.infinite_batches(images, config["batch_size"],
                                    generator=torch.Generator().manual_seed(args.seed + step), device=device)
    grid_noise_gen = torch.Generator().manual_seed(args.seed)  # same noise for every grid: progress is comparable

    def save():
        if not all(torch.isfinite(p).all() for p in net.parameters()):  # NaN weights never replace a good ckpt.pt
            raise rundir.NonFiniteLoss(f"weights are not finite at step {step}; {ckpt_path} kept as it was")
        rundir.save_checkpoint(ckpt_path, {"model": net.state_dict(), "ema": ema.state_dict(),
                                           "optimizer": opt.state_dict(), "step": step, "rng": rundir.rng_state(),
                                           "config": config})
        if step > 0 and (out / "metrics.jsonl").exists():  # no loss yet if the time ran out before the first step
            rundir.plot_metrics(out)
        if args.grid:
            grid_noise_gen.manual_seed(args.seed)
            imgs, _ = sample(ema, 64, "euler", 20, generator=grid_noise_gen, device=device, progress=False)
            data.save_grid(imgs, out / f"samples_step{step:07d}.png", nrow=8)

    start = time.time()
    deadline = start + 60.0 * args.minutes if args.minutes is not None else math.inf
    last_save = time.time()
    net.train()
    bar = tqdm(total=args.steps, initial=min(step, args.steps), desc="train cfm", dynamic_ncols=True)
    while step < args.steps and time.time() < deadline:
        x1 = next(batches)  # (B, 1, 28, 28) in [-1, 1]
        loss = fm.loss(net, x1)
        try:
            rundir.check_finite(loss, step + 1, ckpt_path, config["lr"])  # before the step: ckpt.pt stays good
        except rundir.NonFiniteLoss:
            bar.close()
            raise
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), config["grad_clip"])
        opt.step()
        step += 1
        # EMA with the usual warm-up (decay grows from 0.1 towards ema_decay) so short runs are not dominated by
        # the random initial weights.
        unet.ema_update(ema, net, min(config["ema_decay"], (1 + step) / (10 + step)))
        rundir.log_metrics(out, {"step": step, "loss": loss.item()})
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", epoch=step // steps_per_epoch)
        if step % args.ckpt_every == 0 or time.time() - last_save > 60.0 * args.ckpt_minutes:
            save()
            last_save = time.time()
    bar.close()
    save()
    minutes = (time.time() - start) / 60.0
    print(f"stopped at step {step} after {minutes:.1f} min this run; checkpoint {ckpt_path}, loss curve "
          f"{out / 'loss.png'}")
    return step


# %% Sampling and FID from a run directory -----------------------------------------------------------------------
def sample_main(args):
    out = pathlib.Path(args.out)
    ckpt_path = out / "ckpt.pt"
    if not ckpt_path.exists():
        raise rundir.MissingFileError(f"no checkpoint at {ckpt_path}; train first: python cfm_mnist.py train --out "
                                      f"{out}")
    check_solver(args.solver, args.steps)
    device = rundir.get_device(args.device)
    state = rundir.load_checkpoint(ckpt_path)
    rundir.check_run_method(state, "cfm", ckpt_path, allow_raw=False)  # a ddpm eps-net is no velocity field
    config = state["config"]
    net = unet.UNetModel(**config["unet"])
    unet.load_state_dict_checked(net, state["ema"] if args.ema else state["model"])
    net = net.to(device).eval()
    rundir.make_out_dir(out)  # the grid and eval.jsonl go there
    if args.fid:  # weights and reference first: a mistake there ends the command before minutes of sampling
        ref = fid.reference_for(args.fid_ref, config["data"], out, args.fid_ref_n, image_size=28, channels=1)
    n = max(args.n, args.fid)  # the grid shows the first 64 of the samples that FID scores
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    imgs, nfe = sample(net, n, args.solver, args.steps, args.rtol, args.atol, args.batch_size,
                       generator=gen, device=device)
    seconds = time.time() - t0
    tag = (f"{args.solver}{args.steps}" if args.solver != "adaptive"
           else f"adaptive_rtol{args.rtol:g}_atol{args.atol:g}")
    grid = data.save_grid(imgs[:64], out / f"samples_{tag}.png", nrow=8)
    record = {"step": state["step"], "solver": args.solver, "steps": args.steps if args.solver != "adaptive" else None,
              "rtol": args.rtol, "atol": args.atol, "nfe": nfe, "n": n, "ema": args.ema,
              "sample_seconds": round(seconds, 1)}
    print(f"{n} samples, {args.solver}, NFE {nfe:g} per batch of {args.batch_size}, {seconds:.0f} s -> {grid}")
    if args.fid:
        record.update(fid=fid.compute_fid(data.to_uint8(imgs[:args.fid]), ref), fid_n=args.fid,
                      fid_ref=pathlib.Path(ref).name)
        print(f"FID {record['fid']:.2f} ({args.fid} samples vs {record['fid_ref']}, step {state['step']}, "
              f"{args.solver}, NFE {nfe:g})")
    with open(out / "eval.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


# %% CLI ---------------------------------------------------------------------------------------------------------
def build_parser():
    p = rundir.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default="runs/cfm-mnist", help="run directory (config, ckpt.pt, metrics, PNGs)")
    common.add_argument("--device", default="auto", help="auto | cpu | cuda")
    common.add_argument("--seed", type=rundir.seed_arg, default=0)

    t = sub.add_parser("train", parents=[common], help="train (or resume) a velocity net with the CFM loss")
    t.add_argument("--data", default="mnist", type=data.data_spec,
                   help="mnist | mnist5k | folder:PATH (28x28 grayscale)")
    t.add_argument("--arch", "--preset", dest="preset", default="mnist", choices=sorted(unet.PRESETS),
                   help="unet.py preset (tiny for quick tests); --arch as in ddpm.py")
    t.add_argument("--sigma-min", type=rundir.below_one_arg, default=0.0)
    t.add_argument("--batch-size", type=rundir.positive_int, default=128)
    t.add_argument("--lr", type=rundir.positive_float, default=5e-4)
    t.add_argument("--ema-decay", type=rundir.below_one_arg, default=0.999)
    t.add_argument("--grad-clip", type=rundir.non_negative_float, default=1.0, help="max gradient norm, 0 = off")
    t.add_argument("--steps", type=rundir.positive_int, default=20000, help="total training steps (across resumes)")
    t.add_argument("--minutes", type=rundir.positive_float, default=None,
                   help="stop this invocation after this wall time")
    t.add_argument("--ckpt-every", type=rundir.positive_int, default=2000, help="checkpoint every N steps ...")
    t.add_argument("--ckpt-minutes", type=rundir.positive_float, default=5.0, help="... or every M minutes")
    t.add_argument("--no-grid", dest="grid", action="store_false", help="skip the 8x8 sample grid at checkpoints")

    s = sub.add_parser("sample", parents=[common], help="sample a trained run, optionally with FID")
    s.add_argument("--solver", default="euler", choices=SOLVERS)
    s.add_argument("--steps", type=rundir.positive_int, default=20, help="steps of a fixed-step solver")
    s.add_argument("--rtol", type=rundir.positive_float, default=1e-4, help="adaptive solver relative tolerance")
    s.add_argument("--atol", type=rundir.positive_float, default=1e-4, help="adaptive solver absolute tolerance")
    s.add_argument("--n", type=rundir.positive_int, default=64, help="samples to draw for the grid (at least --fid N)")
    s.add_argument("--batch-size", type=rundir.positive_int, default=250)
    s.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights instead of the EMA")
    fid.add_arguments(s)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return train(args)
    return sample_main(args)


if __name__ == "__main__":
    rundir.run_cli(main)  # a user's mistake or a NaN loss: one line, exit status 2; a bug: a traceback
