r"""DDPM: training on the eps objective, ancestral sampling, respacing, ADM checkpoints.

Papers
    Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. NeurIPS 2020, arXiv:2006.11239.
    Nichol, Dhariwal. Improved Denoising Diffusion Probabilistic Models. ICML 2021, arXiv:2102.09672
        (cosine schedule, learned variance, respacing a trained model to fewer steps).
    Dhariwal, Nichol. Diffusion Models Beat GANs on Image Synthesis. NeurIPS 2021, arXiv:2105.05233
        (the ADM U-Net whose checkpoints this script can sample from).

Time convention: integer timesteps t in {0, ..., T-1} (Ho et al. count 1..T: our t is their t - 1, as in
improved-diffusion); x_t has been noised t + 1 times, x_{T-1} is almost pure noise, abar_{-1} = 1 (clean).
The network gets t as a float tensor of shape (B,), always the ORIGINAL timestep index, also when sampling
from a respaced (shorter) schedule.

Forward process and loss (Ho et al. Eq. 4 and Algorithm 1, Eq. 14): betas linear 1e-4 .. 0.02 over T = 1000 (or
cosine, Nichol & Dhariwal Eq. 17), $\alpha_t = 1 - \beta_t$ and $\bar\alpha_t = \prod_{s \le t} \alpha_s$
(alphas_cumprod):
    $$ q(x_t | x_0):\quad x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon,
       \quad \epsilon \sim N(0, I) $$
    $$ L_\text{simple} = E_{t, x_0, \epsilon} \| \epsilon - \epsilon_\theta(x_t, t) \|^2 $$
Posterior $q(x_{t-1} | x_t, x_0) = N(\tilde\mu_t, \tilde\beta_t I)$ (Ho Eq. 6, 7):
    $$ \tilde\mu_t(x_0, x_t) = \frac{\sqrt{\bar\alpha_{t-1}}\, \beta_t}{1 - \bar\alpha_t} x_0
       + \frac{\sqrt{\alpha_t}\, (1 - \bar\alpha_{t-1})}{1 - \bar\alpha_t} x_t,
       \qquad \tilde\beta_t = \frac{1 - \bar\alpha_{t-1}}{1 - \bar\alpha_t} \beta_t $$
Reverse step (Ho Algorithm 2, Eq. 11), two equal ways to write the mean, the eps form and the x0 form through
Tweedie's $\hat x_0$ (predict_x0_hat):
    $$ \mu = \frac{1}{\sqrt{\alpha_t}} \Big( x_t - \frac{\beta_t}{\sqrt{1 - \bar\alpha_t}} \hat\epsilon \Big)
       = \tilde\mu_t(\hat x_0, x_t),
       \qquad \hat x_0 = \frac{x_t - \sqrt{1 - \bar\alpha_t}\, \hat\epsilon}{\sqrt{\bar\alpha_t}} $$
    $$ x_{t-1} = \mu + \sigma_t z,\quad z \sim N(0, I) \quad \text{(no noise at the final step } t = 0 \text{)} $$
with $\sigma_t^2 = \beta_t$ or $\tilde\beta_t$ (fixed), or learned (Nichol & Dhariwal Eq. 15) from the v of the
network's extra output channels:
    $$ \log \sigma_t^2 = f \log \beta_t + (1 - f) \log \tilde\beta_t, \qquad f = (v + 1) / 2 $$
Respacing (Nichol & Dhariwal Sec. 4): keep a subset S of timesteps; $\bar\alpha$ stays the same on S, and for
consecutive kept steps $t' < t$ the new schedule is $\beta^\text{new}_t = 1 - \bar\alpha_t / \bar\alpha_{t'}$.

Usage
    python ddpm.py --data mnist5k --arch mnist --minutes 20 --out runs/ddpm-mnist      # train (rerun = resume)
    python ddpm.py --ckpt runs/ddpm-mnist/ckpt.pt                                      # 1000-step samples
    python ddpm.py --ckpt runs/ddpm-mnist/ckpt.pt --respace 250 --fid 1000             # 250 steps + FID
    python ddpm.py --ckpt ffhq_10m.pt --arch adm-ffhq256 --respace 100 --num-samples 1 # pretrained ADM

Pretrained ADM checkpoints (raw guided-diffusion state dicts; sampled with the learned sigma):
    ffhq_10m.pt (FFHQ 256x256, the model DPS uses): Google Drive folder linked from the README of
    github.com/DPS2022/diffusion-posterior-sampling; --arch adm-ffhq256.
    256x256_diffusion_uncond.pt (ImageNet, unconditional), from github.com/openai/guided-diffusion:
    --adm-config '{"image_size": 256, "num_channels": 256, "num_res_blocks": 2, "learn_sigma": true,
    "attention_resolutions": "32,16,8", "num_head_channels": 64, "resblock_updown": true,
    "use_scale_shift_norm": true}'
    Both use the linear schedule with T = 1000.
"""
import argparse
import copy
import json
import math
import pathlib
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import fid
import rundir
import unet


# %% Schedule ----------------------------------------------------------------------------------------------
def make_betas(T=1000, schedule="linear"):
    r"""$\beta_1, \dots, \beta_T$ as a float64 tensor of shape (T,)."""
    if schedule == "linear":
        scale = 1000 / T  # Ho et al.'s 1e-4..0.02 is for T = 1000; keep the same total noise for other T (as ADM)
        return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    if schedule == "cosine":
        # Nichol & Dhariwal Eq. 17:
        # $$ \bar\alpha(t) = \frac{f(t)}{f(0)}, \quad f(t) = \cos\Big(\frac{t/T + s}{1 + s} \cdot \frac{\pi}{2}\Big)^2,
        #    \quad s = 0.008 $$
        s = 0.008
        f = lambda u: torch.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2
        t = torch.arange(T + 1, dtype=torch.float64)
        abar = f(t) / f(torch.zeros(()))
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)  # clip avoids a singular last step
    raise ValueError(f"unknown schedule {schedule!r}; use 'linear' or 'cosine'")


def extract_and_expand(arr, t, x):
    """arr: (T,) tensor, t: (B,) long timesteps, x: (B, C, H, W) -> arr[t] as (B, 1, 1, 1) in x's dtype/device."""
    out = arr.to(x.device)[t.to(x.device)].to(x.dtype)
    return out.reshape(-1, *([1] * (x.dim() - 1)))


class Diffusion:
    """All schedule quantities, precomputed once under their paper names (each a float64 tensor of shape (T,)).

    timestep_map[i] is the ORIGINAL timestep of schedule index i (identity unless respaced); the network
    always sees timestep_map[t].
    """

    def __init__(self, betas, timestep_map=None):
        self.betas = betas = torch.as_tensor(betas, dtype=torch.float64)
        self.T = len(betas)
        self.timestep_map = torch.arange(self.T) if timestep_map is None else torch.as_tensor(timestep_map)
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)                             # abar_t
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64),
                                              self.alphas_cumprod[:-1]])              # abar_{t-1}, abar_{-1} = 1
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        # $\tilde\beta_t$ (Ho Eq. 7); it is 0 at t = 0, so the log is clipped to its t = 1 value (as ADM)
        self.posterior_variance = betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1 - self.alphas_cumprod)

    # $q(x_t | x_0)$: $x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon$
    def q_sample(self, x0, t, eps):
        return (extract_and_expand(self.sqrt_alphas_cumprod, t, x0) * x0
                + extract_and_expand(self.sqrt_one_minus_alphas_cumprod, t, x0) * eps)

    # Tweedie: $E[x_0 | x_t] = (x_t - \sqrt{1 - \bar\alpha_t}\, \hat\epsilon) / \sqrt{\bar\alpha_t}$
    def predict_x0_hat(self, x_t, t, eps):
        return ((x_t - extract_and_expand(self.sqrt_one_minus_alphas_cumprod, t, x_t) * eps)
                / extract_and_expand(self.sqrt_alphas_cumprod, t, x_t))

    # mean of $q(x_{t-1} | x_t, x_0)$ (Ho Eq. 7)
    def q_posterior_mean(self, x0, x_t, t):
        return (extract_and_expand(self.posterior_mean_coef1, t, x_t) * x0
                + extract_and_expand(self.posterior_mean_coef2, t, x_t) * x_t)

    def respace(self, section_counts):
        r"""A shorter Diffusion on the timesteps space_timesteps(T, section_counts) keeps (same $\bar\alpha$ there)."""
        kept = sorted(space_timesteps(self.T, section_counts))
        return Diffusion(recreate_alphas(self.alphas_cumprod, kept), self.timestep_map[kept])


def space_timesteps(T, section_counts):
    """The set of original timesteps to keep (Nichol & Dhariwal Sec. 4; same sets as improved-diffusion).

    section_counts "90,60,60,20,20": cut 0..T-1 into 5 near-equal sections (the first T % 5 get one extra step)
    and take 90, 60, ... evenly spaced (rounded) steps from each, including both ends of a section.
    "ddimN": the DDIM paper's uniform stride, range(0, T, k) with the integer k that gives exactly N steps.
    """
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        n = int(section_counts[len("ddim"):]) if section_counts[len("ddim"):].isdigit() else 0
        if n < 1:
            raise rundir.UsageError(f"{section_counts!r}: write the DDIM step count as 'ddimN' with N >= 1, "
                                    f"e.g. 'ddim25'")
        for stride in range(1, T):
            if len(range(0, T, stride)) == n:
                return set(range(0, T, stride))
        raise rundir.UsageError(f"'ddim{n}': no integer stride gives exactly {n} of {T} steps; "
                                f"use a count like '{n}' (sections) instead")
    if isinstance(section_counts, str):
        try:
            section_counts = [int(c) for c in section_counts.split(",")]
        except ValueError:
            raise rundir.UsageError(f"--respace {section_counts!r}: use a step count ('250'), section counts "
                                    f"('90,60,60,20,20') or 'ddimN'") from None
    size, extra = divmod(T, len(section_counts))
    kept, start = [], 0
    for i, count in enumerate(section_counts):
        n = size + (1 if i < extra else 0)  # steps in this section
        if not 1 <= count <= n:
            raise rundir.UsageError(f"section {i} has {n} of the T={T} steps and cannot hold {count}; "
                                    f"use counts between 1 and {n} (or fewer sections)")
        stride = (n - 1) / (count - 1) if count > 1 else 1
        kept += [start + round(j * stride) for j in range(count)]  # round() is Python's (half to even)
        start += n
    return set(kept)


def recreate_alphas(alphas_cumprod, kept):
    r"""New betas for the kept timesteps: $\beta^\text{new}_t = 1 - \bar\alpha_t / \bar\alpha_{t_\text{prev}}$, so
    $\bar\alpha$ is unchanged on kept."""
    abar = alphas_cumprod[sorted(kept)]
    abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    return 1 - abar / abar_prev


# %% Loss --------------------------------------------------------------------------------------------------
def loss_fn(net, diffusion, x0):
    r"""$L_\text{simple}$ (Ho Eq. 14). x0: (B, C, H, W) in [-1, 1]."""
    t = torch.randint(0, diffusion.T, (x0.shape[0],), device=x0.device)
    eps = torch.randn_like(x0)
    x_t = diffusion.q_sample(x0, t, eps)
    eps_hat = net(x_t, diffusion.timestep_map.to(x0.device)[t].float())
    return F.mse_loss(eps_hat[:, :x0.shape[1]], eps)  # [:, :C]: a learned-sigma net's extra channels are unused


# %% Sampler -----------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_ddpm(net, diffusion, x_t, t, z, param="eps", var_type="beta_tilde", clip_x0=False):
    r"""One reverse step $x_t \to x_{t-1}$ (Ho Algorithm 2).

    :param x_t: [B x C x H x W] current state.   :param t: int index into diffusion's (maybe respaced) schedule.
    :param z: [B x C x H x W] standard normal noise (ignored at t = 0).
    :param param: "eps" (mu from eps_hat) or "x0" (mu = posterior mean at x0_hat); equal unless clip_x0.
    :param var_type: "beta", "beta_tilde" or "learned" (net outputs 2C channels: eps_hat and v).
    :param clip_x0: clamp x0_hat to [-1, 1] (x0 form only, as ADM's clip_denoised).
    :return: (x_{t-1}, x0_hat)
    """
    B, C = x_t.shape[:2]
    tt = torch.full((B,), t, device=x_t.device, dtype=torch.long)
    out = net(x_t, diffusion.timestep_map.to(x_t.device)[tt].float())
    eps_hat = out[:, :C]
    x0_hat = diffusion.predict_x0_hat(x_t, tt, eps_hat)
    if param == "eps":
        if clip_x0:
            raise ValueError("clip_x0 needs param='x0' (the eps form never forms x0_hat)")
        # $\mu = (x_t - \beta_t / \sqrt{1 - \bar\alpha_t}\, \hat\epsilon) / \sqrt{\alpha_t}$  (Ho Eq. 11)
        mu = ((x_t - extract_and_expand(diffusion.betas / diffusion.sqrt_one_minus_alphas_cumprod, tt, x_t) * eps_hat)
              / extract_and_expand(diffusion.alphas.sqrt(), tt, x_t))
    elif param == "x0":
        if clip_x0:
            x0_hat = x0_hat.clamp(-1, 1)
        mu = diffusion.q_posterior_mean(x0_hat, x_t, tt)                                      # (Ho Eq. 7)
    else:
        raise ValueError(f"unknown param {param!r}; use 'eps' or 'x0'")

    if var_type == "beta":
        log_var = extract_and_expand(diffusion.betas.log(), tt, x_t)
    elif var_type == "beta_tilde":
        log_var = extract_and_expand(diffusion.posterior_log_variance_clipped, tt, x_t)
    elif var_type == "learned":
        if out.shape[1] != 2 * C:
            raise ValueError(f"var_type 'learned' needs a net with {2 * C} output channels, got {out.shape[1]}")
        frac = (out[:, C:] + 1) / 2  # v in [-1, 1] -> frac in [0, 1]                     (Nichol & Dhariwal Eq. 15)
        log_var = (frac * extract_and_expand(diffusion.betas.log(), tt, x_t)
                   + (1 - frac) * extract_and_expand(diffusion.posterior_log_variance_clipped, tt, x_t))
    else:
        raise ValueError(f"unknown var_type {var_type!r}; use 'beta', 'beta_tilde' or 'learned'")
    sigma = torch.exp(0.5 * log_var)
    x_prev = mu + sigma * z if t > 0 else mu  # the final step adds no noise
    return x_prev, x0_hat


def get_noise_x_t(num_instances, shape, seed=0, device="cpu"):
    r"""Fixed-seed $x_T \sim N(0, I)$ of shape (num_instances, *shape), so runs compare sample for sample."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((num_instances, *shape), generator=g).to(device)


TRAJECTORY_T = (999, 750, 500, 250, 50, 0)


@torch.no_grad()
def sample_loop(net, diffusion, x_T, seed=0, record_t=(), progress=True, **step_kwargs):
    """Run sample_ddpm from x_T down to t = 0. z comes from a generator seeded with `seed`.

    record_t: original timesteps whose (x_t, x0_hat) to keep; the nearest kept timestep is used when respaced.
    :return: (x_0, {original t: (x_t, x0_hat)})
    """
    g = torch.Generator().manual_seed(seed)
    tmap = diffusion.timestep_map.tolist()
    record = {min(range(diffusion.T), key=lambda i: abs(tmap[i] - r)) for r in record_t}
    x, traj = x_T, {}
    for t in tqdm(range(diffusion.T - 1, -1, -1), desc=f"DDPM {diffusion.T} steps", disable=not progress,
                  leave=False):
        z = torch.randn(x.shape, generator=g).to(x.device)
        x_prev, x0_hat = sample_ddpm(net, diffusion, x, t, z, **step_kwargs)
        if t in record:
            traj[tmap[t]] = (x.cpu(), x0_hat.cpu())
        x = x_prev
    return x, traj


def save_trajectory(traj, path, title=""):
    """2 rows (x_t, x0_hat) x len(traj) columns, for instance 0, labelled with t."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ts = sorted(traj, reverse=True)
    fig, axes = plt.subplots(2, len(ts), figsize=(1.6 * len(ts), 3.6), squeeze=False)
    for j, t in enumerate(ts):
        for i, (img, name) in enumerate(zip(traj[t], ("x_t", "x0_hat"))):
            im = data.to_uint8(img[0].clamp(-1, 1)).permute(1, 2, 0).numpy()
            axes[i, j].imshow(im.squeeze(-1) if im.shape[-1] == 1 else im, cmap="gray", vmin=0, vmax=255)
            axes[i, j].set_xticks([]), axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(f"t={t}")
            if j == 0:
                axes[i, j].set_ylabel(name)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# %% Training loop -----------------------------------------------------------------------------------------
def train(args):
    device = rundir.get_device(args.device)
    Diffusion(make_betas(args.T, args.schedule)).respace(args.sample_respace)  # fails now, not at the first grid
    rundir.check_out_dir(args.out)  # before the data: nothing is created until the data has loaded
    halvings = len(unet.PRESETS[args.arch]["channel_mult"]) - 1
    if args.image_size:
        rundir.check_image_size(args.image_size, halvings, f"preset {args.arch}")
    images = data.load(args.data, split="train", image_size=args.image_size)      # uint8 (N, C, H, W)
    rundir.check_image_size(images.shape[2], halvings, f"preset {args.arch}", typed=bool(args.image_size))
    out = rundir.make_out_dir(args.out)  # after the data: a dataset that fails to load leaves no empty run dir
    config = {"method": "ddpm", "data": args.data, "image_size": args.image_size, "arch": args.arch,
              "unet": unet.preset_kwargs(args.arch, learn_sigma=False, image_size=images.shape[2],
                                         in_channels=images.shape[1]),
              "diffusion": {"T": args.T, "schedule": args.schedule},
              "batch_size": args.batch_size, "lr": args.lr, "ema_decay": args.ema_decay, "seed": args.seed,
              "grad_clip": args.grad_clip}
    config = json.loads(json.dumps(config))  # tuples -> lists, so config.json and ckpt["config"] compare equal
    rundir.seed_everything(args.seed)
    net = unet.UNetModel(**config["unet"]).to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    diffusion = Diffusion(make_betas(args.T, args.schedule))
    step = 0
    ckpt_path = out / "ckpt.pt"
    if ckpt_path.exists():  # resume: same run dir, same command
        ckpt = rundir.load_checkpoint(ckpt_path)
        for key in ("data", "image_size", "unet", "diffusion"):
            if ckpt["config"][key] != config[key]:
                raise rundir.UsageError(f"{ckpt_path} was trained with {key}={ckpt['config'][key]!r}, this "
                                        f"command asks for {config[key]!r}; use another --out or the original options")
        unet.load_state_dict_checked(net, ckpt["model"])
        unet.load_state_dict_checked(ema, ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        rundir.set_rng_state(ckpt["rng"])
        print(f"resumed from {ckpt_path} at step {step}")
    rundir.write_config(out, config)
    print(f"{unet.count_parameters(net) / 1e6:.2f}M parameters, {len(images)} training images, device {device}")

    def save():
        rundir.save_checkpoint(ckpt_path, {"model": net.state_dict(), "ema": ema.state_dict(),
                                           "optimizer": opt.state_dict(), "step": step, "rng": rundir.rng_state(),
                                           "config": config})
        if (out / "metrics.jsonl").exists():  # not before the first logged step (--minutes ended the run first)
            rundir.plot_metrics(out)

    def sample_grid():  # 10 EMA samples from fixed noise, on a short respaced schedule to keep it cheap
        x_T = get_noise_x_t(10, images.shape[1:], seed=args.seed, device=device)
        x0, _ = sample_loop(ema, diffusion.respace(args.sample_respace), x_T, seed=args.seed)
        data.save_grid(x0.clamp(-1, 1), out / f"samples_step{step:07d}.png", nrow=5)

    # batches are reseeded from (seed, step) so a resumed run does not replay the first batches
    batches = data.infinite_batches(images, args.batch_size, torch.Generator().manual_seed(args.seed + step), device)
    t_start = time.time()
    deadline = t_start + 60 * args.minutes if args.minutes else float("inf")
    bar = tqdm(total=args.steps, initial=step, desc="train", dynamic_ncols=True)
    while step < args.steps and time.time() < deadline:
        net.train()
        loss = loss_fn(net, diffusion, next(batches))
        try:
            rundir.check_finite(loss, step + 1, ckpt_path, args.lr)  # before the step: ckpt.pt stays good
        except rundir.NonFiniteLoss:
            bar.close()
            raise
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip)
        opt.step()
        step += 1
        # EMA with a warm-up ($(1+n)/(10+n)$) so short runs are not dominated by the random init
        unet.ema_update(ema, net, min(args.ema_decay, (1 + step) / (10 + step)))
        bar.update(1)
        if step % 10 == 0 or step == 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            rundir.log_metrics(out, {"step": step, "loss": loss.item(), "time": time.time() - t_start})
        if step % args.ckpt_every == 0:
            save()
        if args.sample_every and step % args.sample_every == 0:
            sample_grid()
    bar.close()
    save()
    sample_grid()
    print(f"step {step}: saved {ckpt_path} ({time.time() - t_start:.0f} s this run)")
    return ckpt_path


# %% Sampling from a checkpoint (ours or ADM): grids, trajectory, FID --------------------------------------
def sample(args):
    device = rundir.get_device(args.device)
    net, config = unet.load_model(args.ckpt, args.arch, args.adm_config, device)
    out = rundir.make_out_dir(args.out or pathlib.Path(args.ckpt).parent)
    if args.fid:  # weights and reference first: a mistake there ends the command before minutes of sampling
        ref = fid.reference_for(args.fid_ref, config.get("data"), out, args.fid_ref_n,
                                image_size=config.get("image_size"))
    if args.compile:  # a one-off compile per batch shape, repaid by long sampling runs (FID)
        net = torch.compile(net)
    diffusion = Diffusion(make_betas(config["diffusion"]["T"], config["diffusion"]["schedule"]))
    if args.respace:
        diffusion = diffusion.respace(args.respace)
    shape = config["shape"]
    var_type = args.var if args.var != "auto" else ("learned" if config["learn_sigma"] else "beta_tilde")
    if var_type == "learned" and not config["learn_sigma"]:
        raise rundir.UsageError(f"--var learned needs a net that outputs a variance (learn_sigma); {args.ckpt} has "
                                f"none: use --var auto, beta or beta_tilde")
    param = "x0" if args.clip_x0 else args.param
    kw = dict(param=param, var_type=var_type, clip_x0=args.clip_x0)
    tag = f"ddpm{diffusion.T}"
    print(f"sampling {tag} ({param} form, sigma^2 {var_type}{', x0 clipped' if args.clip_x0 else ''}) -> {out}")

    if args.num_samples:  # one instance with its trajectory, then the 10-instance grid, both from fixed noise
        x_T = get_noise_x_t(1, shape, seed=args.seed, device=device)
        t0 = time.time()
        _, traj = sample_loop(net, diffusion, x_T, seed=args.seed, record_t=TRAJECTORY_T, **kw)
        print(f"trajectory: {time.time() - t0:.2f} s per image (batch 1)")
        save_trajectory(traj, out / f"trajectory_{tag}.png", f"{tag}: x_t and x0_hat for one sample")
        x_T = get_noise_x_t(args.num_samples, shape, seed=args.seed, device=device)
        t0 = time.time()
        x0, _ = sample_loop(net, diffusion, x_T, seed=args.seed, **kw)
        dt = time.time() - t0
        print(f"{args.num_samples} samples: {dt / args.num_samples:.3f} s per image (batch {args.num_samples}); "
              f"range [{x0.min():.2f}, {x0.max():.2f}], {(x0.abs() > 1.1).float().mean():.1%} of pixels beyond "
              f"1.1 in magnitude (the grid clamps to [-1, 1])")  # drift out of range is what --clip-x0 cures
        print("wrote", data.save_grid(x0.clamp(-1, 1), out / f"samples_{tag}.png", nrow=5))

    if args.fid:
        samples, t0 = [], time.time()
        for k in tqdm(range(0, args.fid, args.batch_size), desc=f"FID samples ({tag})"):
            n = min(args.batch_size, args.fid - k)
            x_T = get_noise_x_t(n, shape, seed=args.seed + 10**6 + k, device=device)
            x0, _ = sample_loop(net, diffusion, x_T, seed=args.seed + 2 * 10**6 + k, progress=False, **kw)
            samples.append(data.to_uint8(x0.clamp(-1, 1)).cpu())
        samples = torch.cat(samples)
        sec = (time.time() - t0) / args.fid
        score = fid.compute_fid(samples, ref)
        ref_label = pathlib.Path(ref).name
        print(f"FID {tag} ({args.fid} samples vs {ref_label}): {score:.2f}   [{sec:.3f} s per image]")
        rundir.log_metrics(out, {"fid": score, "step": config.get("step"), "sampler": tag, "param": param,
                                 "var": var_type, "clip_x0": args.clip_x0, "n": args.fid, "ref": ref_label,
                                 "sec_per_image": sec})



# %% CLI ---------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = rundir.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=rundir.seed_arg, default=0)
    p.add_argument("--out", default=None, help="run dir (train) / output dir (sample; default: the ckpt's dir)")
    g = p.add_argument_group("training (when no --ckpt is given)")
    g.add_argument("--data", default="mnist5k", type=data.data_spec, help="mnist | mnist5k | simpsons | folder:PATH")
    g.add_argument("--image-size", type=rundir.positive_int, default=None, help="resize the data (default: as stored)")
    g.add_argument("--arch", default=None, choices=sorted(unet.PRESETS),
                   help="unet preset (train default: mnist); with --ckpt: the ADM preset")
    g.add_argument("--T", type=rundir.positive_int, default=1000)
    g.add_argument("--schedule", default="linear", choices=["linear", "cosine"])
    g.add_argument("--steps", type=rundir.positive_int, default=100_000, help="total optimiser steps")
    g.add_argument("--minutes", type=rundir.non_negative_float, default=None,
                   help="stop this invocation after so many minutes")
    g.add_argument("--batch-size", type=rundir.positive_int, default=128,
                   help="training batch; with --ckpt: FID sampling batch")
    g.add_argument("--lr", type=rundir.positive_float, default=2e-4)
    g.add_argument("--ema-decay", type=rundir.below_one_arg, default=0.999)
    g.add_argument("--grad-clip", type=rundir.non_negative_float, default=1.0)
    g.add_argument("--ckpt-every", type=rundir.positive_int, default=1000)
    g.add_argument("--sample-every", type=rundir.non_negative_int, default=5000,
                   help="10-sample grid every N steps (0: only at the end)")
    g.add_argument("--sample-respace", default="100", help="schedule of those periodic grids (see --respace)")
    s = p.add_argument_group("sampling")
    s.add_argument("--ckpt", default=None, help="ddpm.py ckpt.pt or a raw ADM state dict (then --arch)")
    s.add_argument("--adm-config", default=None, type=unet.adm_config_arg,
                   help="JSON of guided-diffusion create_model kwargs (raw ADM)")
    s.add_argument("--respace", default="", help="'' (all T), '250', '90,60,60,20,20', 'ddim25'")
    s.add_argument("--param", default="eps", choices=["eps", "x0"])
    s.add_argument("--var", default="auto", choices=["auto", "beta", "beta_tilde", "learned"],
                   help="auto: learned for 2C-channel nets, else beta_tilde")
    s.add_argument("--clip-x0", action="store_true", help="clamp x0_hat to [-1, 1] (uses the x0 form)")
    s.add_argument("--num-samples", type=rundir.non_negative_int, default=10,
                   help="grid size (0: no grid, no trajectory)")
    s.add_argument("--compile", action="store_true", help="torch.compile the net (worth it for long FID runs)")
    fid.add_arguments(p)
    args = p.parse_args(argv)
    if args.schedule == "linear" and args.T <= 20:  # make_betas scales 0.02 by 1000 / T: a beta >= 1 turns x_t to NaN
        p.error(f"--T {args.T}: the linear schedule's last beta, 0.02 * 1000 / T, is {20 / args.T:g} >= 1; "
                f"use --T 21 or more, or --schedule cosine")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.ckpt:
        return sample(args)
    args.arch = args.arch or "mnist"
    args.out = args.out or f"runs/ddpm-{args.data.replace(':', '_').replace('/', '_')}-{args.arch}"
    return train(args)


if __name__ == "__main__":
    rundir.run_cli(main)  # a user's mistake or a NaN loss: one line, exit status 2; a bug: a traceback
