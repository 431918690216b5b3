r"""DDIM sampling from a trained DDPM (eps-prediction) model, with eta, on any subsequence of timesteps.

Paper
    Song, Meng, Ermon. Denoising Diffusion Implicit Models. ICLR 2021, arXiv:2010.02502.
    (Models: ddpm.py checkpoints; Dhariwal & Nichol, NeurIPS 2021, arXiv:2105.05233, ADM checkpoints.)

Time convention: integer timesteps t in {0, ..., T-1} (t = 0: least noisy), the net gets t as a float
tensor of shape (B,), the ORIGINAL index, also when only a subsequence $\tau_1 < \dots < \tau_S$ is visited.
$\bar\alpha_t = \prod_{s \le t} (1 - \beta_s)$ of the model's training schedule; $\bar\alpha_{-1} = 1$ (the clean end).

One step from t to the previous kept timestep t' (Song et al. Eq. 12; written t-1 in the paper):
    $$ \hat x_0 = \frac{x_t - \sqrt{1 - \bar\alpha_t}\, \hat\epsilon}{\sqrt{\bar\alpha_t}}
       \qquad \text{("predicted } x_0 \text{")} $$
    $$ x_{t'} = \sqrt{\bar\alpha_{t'}}\, \hat x_0 + \sqrt{1 - \bar\alpha_{t'} - \sigma_t^2}\, \hat\epsilon
       + \sigma_t z $$
    $$ \sigma_t = \eta \sqrt{\frac{1 - \bar\alpha_{t'}}{1 - \bar\alpha_t}}
       \sqrt{1 - \frac{\bar\alpha_t}{\bar\alpha_{t'}}} \qquad \text{(Eq. 16)} $$
$\eta = 0$: deterministic (the same x_T always gives the same x_0); $\eta = 1$: DDPM's ancestral step with
$\sigma^2 = \tilde\beta$ of the respaced schedule. The last step ($t' = -1$) returns $\hat x_0$.
A learned-sigma (ADM) net outputs 2C channels; DDIM uses only the first C (eps_hat).

Usage
    python ddim.py --ckpt runs/ddpm-mnist/ckpt.pt --steps 50 --eta 0              # 10-sample grid
    python ddim.py --ckpt runs/ddpm-mnist/ckpt.pt --sweep steps                   # 10,20,50,100,1000 steps
    python ddim.py --ckpt runs/ddpm-mnist/ckpt.pt --sweep eta --num-instances 1   # eta 0,0.2,0.5,1 at 100
    python ddim.py --ckpt runs/ddpm-mnist/ckpt.pt --steps 25 --fid 1000           # FID of 1,000 samples
    python ddim.py --ckpt ffhq_10m.pt --arch adm-ffhq256 --steps 50 --num-instances 1   # pretrained ADM
"""
import argparse
import math
import pathlib
import time

import torch
from tqdm import tqdm

import data
import fid
import rundir
import unet


# %% Schedule (the training schedule of the model; DDIM only needs abar_t) ---------------------------------
def make_alphas_cumprod(T=1000, schedule="linear"):
    """abar_t, t = 0..T-1, float64 (T,): linear betas 1e-4..0.02 (Ho et al.) or cosine (Nichol & Dhariwal Eq. 17)."""
    if schedule == "linear":
        betas = torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64)
    elif schedule == "cosine":
        f = lambda u: torch.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2
        abar = f(torch.arange(T + 1, dtype=torch.float64))
        betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; use 'linear' or 'cosine'")
    return torch.cumprod(1 - betas, 0)


def ddim_timesteps(T, steps):
    r"""The DDIM paper's "uniform" subsequence $\tau_i = \lfloor i T / S \rfloor$, $i = 0, \dots, S - 1$
    (= range(0, T, T // S) when S | T)."""
    if not 1 <= steps <= T:
        raise rundir.UsageError(f"--steps {steps} must be between 1 and T={T}")
    return [i * T // steps for i in range(steps)]


# %% Sampler -----------------------------------------------------------------------------------------------
@torch.no_grad()
def ddim_step(net, x_t, t, t_prev, alphas_cumprod, eta, z, clip_x0=False):
    """One DDIM step x_t -> x_{t_prev} (Eq. 12). t, t_prev: original timesteps (t_prev = -1: the clean end).

    :param x_t: [B x C x H x W].  :param z: [B x C x H x W] standard normal (unused when sigma_t = 0).
    :return: (x_{t_prev}, x0_hat)
    """
    if eta < 0:
        raise ValueError(f"eta={eta} < 0; eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like)")
    B, C = x_t.shape[:2]
    abar_t = alphas_cumprod[t].item()
    abar_prev = alphas_cumprod[t_prev].item() if t_prev >= 0 else 1.0
    eps_hat = net(x_t, torch.full((B,), float(t), device=x_t.device))[:, :C]  # learned-sigma nets: first C
    x0_hat = (x_t - math.sqrt(1 - abar_t) * eps_hat) / math.sqrt(abar_t)
    if clip_x0:  # clamp, then re-derive the eps consistent with the clamped x0_hat (as ADM's ddim_sample)
        x0_hat = x0_hat.clamp(-1, 1)
        eps_hat = (x_t - math.sqrt(abar_t) * x0_hat) / math.sqrt(1 - abar_t)
    sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar_t)) * math.sqrt(1 - abar_t / abar_prev)      # Eq. 16
    x_prev = (math.sqrt(abar_prev) * x0_hat                                  # "predicted x_0"
              + math.sqrt(max(1 - abar_prev - sigma ** 2, 0.0)) * eps_hat    # "direction pointing to x_t"
              + sigma * z)                                                   # random noise
    return x_prev, x0_hat


@torch.no_grad()
def sample_ddim(net, x_T, timesteps, alphas_cumprod, eta=0.0, seed=0, clip_x0=False, progress=True):
    """Run DDIM over the kept timesteps (any increasing subsequence of 0..T-1), from x_T to x_0.

    z for eta > 0 comes from a generator seeded with `seed`, so runs are comparable.
    :return: x_0, [B x C x H x W]
    """
    if eta < 0:
        raise ValueError(f"eta={eta} < 0; eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like)")
    timesteps = sorted(int(t) for t in timesteps)
    g = torch.Generator().manual_seed(seed)
    x = x_T
    pairs = list(zip(timesteps[::-1], timesteps[::-1][1:] + [-1]))  # (t, t_prev), ..., (tau_1, -1)
    for t, t_prev in tqdm(pairs, desc=f"DDIM {len(pairs)} steps, eta {eta}", disable=not progress, leave=False):
        z = torch.randn(x.shape, generator=g).to(x.device)
        x, _ = ddim_step(net, x, t, t_prev, alphas_cumprod, eta, z, clip_x0)
    return x


def get_noise_x_t(num_instances, shape, seed=0, device="cpu"):
    r"""Fixed-seed $x_T \sim N(0, I)$ of shape (num_instances, *shape) (the same noise as ddpm.py's for equal seeds)."""
    return torch.randn((num_instances, *shape), generator=torch.Generator().manual_seed(seed)).to(device)


# %% Experiments (CLI) -------------------------------------------------------------------------------------
def save_comparison(columns, path, title):
    """columns: {label: (N, C, H, W) in [-1, 1]}; one column per setting, one row per instance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = list(columns)
    n = columns[labels[0]].shape[0]
    fig, axes = plt.subplots(n, len(labels), figsize=(1.3 * len(labels), 1.3 * n + 0.5), squeeze=False)
    for j, label in enumerate(labels):
        for i in range(n):
            im = data.to_uint8(columns[label][i].clamp(-1, 1)).permute(1, 2, 0).numpy()
            axes[i, j].imshow(im.squeeze(-1) if im.shape[-1] == 1 else im, cmap="gray", vmin=0, vmax=255)
            axes[i, j].set_xticks([]), axes[i, j].set_yticks([])
        axes[0, j].set_title(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path



def main(argv=None):
    p = rundir.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--ckpt", required=True, help="ddpm.py ckpt.pt or a raw ADM state dict (then --arch)")
    p.add_argument("--arch", default=None, choices=sorted(unet.PRESETS),
                   help="unet preset of a raw ADM checkpoint, e.g. adm-ffhq256")
    p.add_argument("--adm-config", default=None, type=unet.adm_config_arg,
                   help="JSON of guided-diffusion create_model kwargs (raw ADM)")
    p.add_argument("--steps", type=rundir.positive_int, default=50)
    p.add_argument("--eta", type=rundir.non_negative_float, default=0.0)
    p.add_argument("--sweep", default="none", choices=["none", "steps", "eta"],
                   help="steps: --steps-list at --eta; eta: --eta-list at 100 steps")
    p.add_argument("--steps-list", default="10,20,50,100,1000")
    p.add_argument("--eta-list", default="0,0.2,0.5,1.0")
    p.add_argument("--num-instances", type=rundir.non_negative_int, default=10,
                   help="instances per setting (1, 10; 0: no grids)")
    p.add_argument("--clip-x0", action="store_true", help="clamp x0_hat to [-1, 1] at every step")
    p.add_argument("--batch-size", type=rundir.positive_int, default=500, help="FID sampling batch")
    p.add_argument("--compile", action="store_true", help="torch.compile the net (worth it for long FID runs)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=rundir.seed_arg, default=0)
    p.add_argument("--out", default=None, help="output dir (default: the checkpoint's dir)")
    fid.add_arguments(p).title = "FID (of samples at --steps, --eta)"
    args = p.parse_args(argv)
    try:
        steps_list = [int(v) for v in args.steps_list.split(",")]
        eta_list = [float(v) for v in args.eta_list.split(",")]
    except ValueError:
        p.error(f"--steps-list / --eta-list must be comma-separated numbers, got {args.steps_list!r} / "
                f"{args.eta_list!r}")
    if any(e < 0 for e in eta_list):
        p.error(f"eta must be >= 0 (got --eta-list {args.eta_list})")

    device = rundir.get_device(args.device)
    net, info = unet.load_model(args.ckpt, args.arch, args.adm_config, device)
    T = info["diffusion"]["T"]
    if args.sweep == "steps":
        settings = [(s, args.eta) for s in steps_list]
    elif args.sweep == "eta":
        settings = [(100, e) for e in eta_list]
    else:
        settings = [(args.steps, args.eta)]
    named = {"steps": f"--steps-list {args.steps_list}", "eta": "--sweep eta (100 steps)"}.get(args.sweep, "")
    for steps, flag in [(s, named) for s, _ in settings] + [(args.steps, "")]:
        try:  # a step count the schedule cannot hold fails now, before anything is written
            ddim_timesteps(T, steps)
        except rundir.UsageError as e:
            raise rundir.UsageError(f"{flag}: {e}" if flag else str(e)) from None
    out = rundir.make_out_dir(args.out or pathlib.Path(args.ckpt).parent)
    if args.fid:  # weights and reference first: a mistake there ends the command before minutes of sampling
        ref = fid.reference_for(args.fid_ref, info.get("data"), out, args.fid_ref_n,
                                image_size=info.get("image_size"))
    if args.compile:  # a one-off compile per batch shape, repaid by long sampling runs (FID)
        net = torch.compile(net)
    abar = make_alphas_cumprod(T, info["diffusion"]["schedule"])
    x_T = get_noise_x_t(args.num_instances, info["shape"], seed=args.seed, device=device)

    columns = {}
    for steps, eta in settings if args.num_instances else []:
        t0 = time.time()
        x0 = sample_ddim(net, x_T, ddim_timesteps(T, steps), abar, eta, seed=args.seed, clip_x0=args.clip_x0)
        dt = (time.time() - t0) / args.num_instances
        tag = f"ddim{steps}_eta{eta:g}"
        columns[f"{steps} steps\neta {eta:g}"] = x0.cpu()
        path = data.save_grid(x0.clamp(-1, 1), out / f"samples_{tag}.png", nrow=5)
        print(f"{tag}: {dt:.3f} s per image (batch {args.num_instances}), range [{x0.min():.2f}, {x0.max():.2f}], "
              f"{(x0.abs() > 1.1).float().mean():.1%} of pixels beyond 1.1 in magnitude -> {path}")
    if args.sweep != "none":
        path = save_comparison(columns, out / f"ddim_sweep_{args.sweep}.png",
                               f"DDIM, same x_T (seed {args.seed}); columns: {args.sweep}")
        print("wrote", path)

    if args.fid:
        samples, t0 = [], time.time()
        for k in tqdm(range(0, args.fid, args.batch_size), desc=f"FID samples (ddim{args.steps}, eta {args.eta:g})"):
            n = min(args.batch_size, args.fid - k)
            x_T = get_noise_x_t(n, info["shape"], seed=args.seed + 10**6 + k, device=device)
            x0 = sample_ddim(net, x_T, ddim_timesteps(T, args.steps), abar, args.eta,
                                seed=args.seed + 2 * 10**6 + k, clip_x0=args.clip_x0, progress=False)
            samples.append(data.to_uint8(x0.clamp(-1, 1)).cpu())
        sec = (time.time() - t0) / args.fid
        score = fid.compute_fid(torch.cat(samples), ref)
        tag = f"ddim{args.steps}_eta{args.eta:g}"
        ref_label = pathlib.Path(ref).name
        print(f"FID {tag} ({args.fid} samples vs {ref_label}): {score:.2f}   [{sec:.3f} s per image]")
        rundir.log_metrics(out, {"fid": score, "step": info.get("step"), "sampler": tag, "clip_x0": args.clip_x0,
                                 "n": args.fid, "ref": ref_label, "sec_per_image": sec})


if __name__ == "__main__":
    rundir.run_cli(main)  # a user's mistake (rundir.UsageError): one line, exit status 2; a bug: a traceback
