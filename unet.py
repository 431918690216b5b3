r"""The U-Net every script in this project uses: OpenAI's ADM U-Net, written out in one file.

Papers:
  Ronneberger, Fischer, Brox. U-Net: Convolutional Networks for Biomedical Image Segmentation. MICCAI 2015,
      arXiv:1505.04597
  Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. NeurIPS 2020, arXiv:2006.11239 (the diffusion U-Net:
      residual blocks, self-attention at 16x16, a sinusoidal time embedding added inside every residual block)
  Nichol, Dhariwal. Improved Denoising Diffusion Probabilistic Models. ICML 2021, arXiv:2102.09672 (learned variance:
      learn_sigma doubles the output channels)
  Dhariwal, Nichol. Diffusion Models Beat GANs on Image Synthesis. NeurIPS 2021, arXiv:2105.05233 ("ADM": more heads,
      64 channels per head, BigGAN residual up/downsampling, adaptive group norm = scale-shift norm)

Module layout and parameter names are those of guided-diffusion's UNetModel (time_embed, input_blocks, middle_block,
output_blocks, out; ResBlock.in_layers/emb_layers/out_layers/skip_connection; AttentionBlock.norm/qkv/proj_out), so a
published unconditional ADM checkpoint such as the FFHQ 256x256 model used by DPS (ffhq_10m.pt) loads with strict=True
through unet.adm(**its_published_config), and computes the same function (checked to float32 round-off against
guided-diffusion on random weights; tests/test_unet.py checks the details independently).

Time embedding (Vaswani et al. 2017 / DDPM; ADM puts the cosines first), for a scalar t and d = model_channels:
    $$ f_i = 10000^{-i / (d/2)}, \quad i = 0, \dots, d/2 - 1 $$
    $$ e(t) = [\cos(t f_0), \dots, \cos(t f_{d/2-1}), \sin(t f_0), \dots, \sin(t f_{d/2-1})] $$
    $$ \text{emb} = \text{time_embed}(e(t)) \; [+\, \text{cond_embed}(e(\text{cond})) \text{ if extra_cond}]
       \; [+\, \text{guidance_embed}(e(w)) \text{ if guidance_cond}] \; [+\, \text{label_emb}(y) \text{ if num_classes}]
       \quad \to 4d $$
Residual block ($h = \text{in_layers}(x) = \mathrm{conv}(\mathrm{SiLU}(\mathrm{GN}(x)))$):
    $$ \text{plain:} \quad \mathrm{out} = \mathrm{skip}(x)
       + \mathrm{conv}_0(\mathrm{drop}(\mathrm{SiLU}(\mathrm{GN}(h + W e)))) $$
    $$ \text{scale-shift norm:} \quad \mathrm{out} = \mathrm{skip}(x)
       + \mathrm{conv}_0(\mathrm{drop}(\mathrm{SiLU}(\mathrm{GN}(h) (1 + s) + b))), \quad (s, b) = W e
       \qquad \text{(ADM's AdaGN)} $$
    $\mathrm{conv}_0$ is zero-initialised, so every block starts as its skip path; GN: GroupNorm with 32 groups
    computed in float32 (gcd(32, C) groups for the narrow layers of our small presets, where 32 groups do not fit).
Attention: $\mathrm{softmax}(q k^\top / \sqrt{\text{ch}})\, v$ per head, q, k, v from one 1x1 conv "qkv" with 3C
outputs. The legacy order (all published ADM checkpoints) reads those 3C channels as heads x (q, k, v) x ch;
use_new_attention_order reads them as (q, k, v) x heads x ch.

Time convention: t is embedded exactly as given. Each script states what it passes: the integer DDPM step
0..T-1 as a float (ddpm.py, ADM checkpoints), or a continuous time scaled by 1000, e.g. 1000 * t for t in [0, 1]
(the sinusoid frequencies were chosen for inputs of order 1..1000).
Extra condition (extra_cond=True): a second scalar per sample (shortcut models' step size d, MeanFlow/CTM's end time),
embedded like t by its own MLP "cond_embed" whose last Linear is zero-initialised, so a new model ignores it.
cond=None on such a model means cond = 0 for every sample. A guidance input (guidance_cond=True, improved MeanFlow's
guidance-conditioned network) is one more scalar w per sample, embedded the same way by "guidance_embed" (zero last
layer); w=None means 0, which a caller maps to "no guidance".
Class label (num_classes=K): ADM's label embedding, an nn.Embedding "label_emb" of K rows added to the time
embedding (guided-diffusion's class_cond models: K = 1000, they load strictly). null_label=True adds a row K, the
"no label" of classifier-free guidance's label dropout; y=None on such a model means that row for every sample.

Presets (parameters: count_parameters; timings: benchmarks/bench_unet.py and benchmarks/README.md):
    tiny         199,617  28x28x1, 8/16/32 ch (mult 0.5,1,2 of 16), 1 res block, attention at 7 (2 heads),
                          scale-shift norm; for tests
    small        600,193  28x28x1, 8/16/64 ch (mult 0.5,1,4 of 16), otherwise tiny: 3x its parameters, the width
                          ratio of mnist on tiny's narrow 28x28 level, where most of the compute goes
    mnist      2,389,633  28x28x1, 16/32/128 ch (mult 0.5,1,4 of 32), 1 res block, attention at 7 (4 heads),
                          scale-shift norm
    challenge 59,016,451  64x64x3, 128/256/256/256 ch, 4 res blocks, attention at 32x32, dropout 0.1, extra_cond
                          (the size of the CS492(C) image challenge backbone)
    adm-ffhq256 93,563,910  guided-diffusion's ffhq_10m.pt (DPS's model_config.yaml): 128 ch, mult 1,1,2,2,4,4,
                          1 res block, attention at 16 (64 ch/head), scale-shift norm, resblock_updown, learn_sigma
A 3x3 conv at 28x28 costs as much as one with 2x the channels at 14x14 and 4x at 7x7, so tiny and mnist keep the
28x28 level narrow and their capacity at 7x7. On CPU, net.to(memory_format=torch.channels_last) is faster and gives
the same results up to round-off.

Usage:
    import unet
    net = unet.create("mnist")                                  # (B,1,28,28), t (B,) -> (B,1,28,28)
    net = unet.create("tiny", image_size=32, in_channels=3)     # any preset with overrides
    net = unet.create("challenge"); y = net(x, t, cond=d)       # second scalar condition
    net = unet.adm(image_size=256, num_channels=128, num_res_blocks=1, channel_mult="1,1,2,2,4,4",
                   attention_resolutions="16", num_heads=4, num_head_channels=64, use_scale_shift_norm=True,
                   resblock_updown=True, learn_sigma=True)      # same net as unet.create("adm-ffhq256")
    unet.load_state_dict_checked(net, torch.load("ffhq_10m.pt", map_location="cpu", weights_only=True))
    net = unet.adm(**yaml.safe_load(open("configs/model_config.yaml")))   # DPS's config file as is, loads model_path
    python unet.py          # prints every preset with its parameter count
    net, info = unet.load_model("runs/ddpm-mnist/ckpt.pt")       # eps-net of a ddpm.py run (ddpm.py, ddim.py)
"""

import argparse
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t, dim, max_period=10000):
    r"""Sinusoidal embedding $[\cos(t f), \sin(t f)]$ with $f_i = \text{max_period}^{-i / \text{half}}$
    (see module docstring).

    :param t: (B,) tensor of (possibly fractional) times.
    :return: (B, dim) float32 tensor; an odd dim gets one trailing zero.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that computes in float32 whatever the input dtype (as ADM does, for fp16 stability)."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def normalization(channels):
    # ADM always uses 32 groups. Layers narrower than that (or not a multiple of 32; only in our small presets and
    # never in an ADM config, where GroupNorm(32, C) would fail) use gcd(32, C) groups instead.
    return GroupNorm32(math.gcd(32, channels), channels)


def zero_module(module):
    """Zero-initialise a layer, so that the residual branch it ends starts as the identity (ADM's init)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class EmbedSequential(nn.Sequential):
    """nn.Sequential that hands the embedding to the residual blocks in it (ADM's TimestepEmbedSequential)."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Downsample(nn.Module):
    """Halve H and W: 3x3 conv with stride 2 ("op"), or 2x2 average pooling when use_conv=False."""

    def __init__(self, channels, use_conv=True):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then a 3x3 conv ("conv") when use_conv=True."""

    def __init__(self, channels, use_conv=True):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class ResBlock(nn.Module):
    """Residual block conditioned on the embedding; optionally resamples (BigGAN-style, ADM's resblock_updown).

    :param x: (B, channels, H, W); emb: (B, emb_channels)  ->  (B, out_channels, H', W')
    """

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_scale_shift_norm=False,
                 up=False, down=False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        # Parameter-free resampling of both the branch (between activation and conv) and the skip path.
        self.resample = Upsample(channels, use_conv=False) if up else (
            Downsample(channels, use_conv=False) if down else None)
        # Scale-shift norm needs a scale and a shift per channel, hence 2x outputs.
        self.emb_layers = nn.Sequential(nn.SiLU(),
                                        nn.Linear(emb_channels, (2 if use_scale_shift_norm else 1) * out_channels))
        self.out_layers = nn.Sequential(normalization(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        # The only way the skip path changes width in ADM's U-Net is a 1x1 conv.
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        norm_in, act_in, conv_in = self.in_layers
        h = act_in(norm_in(x))
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = conv_in(h)  # (B, out, H', W')
        e = self.emb_layers(emb).type(h.dtype)[:, :, None, None]  # (B, out or 2*out, 1, 1)
        norm_out, act_out, drop, conv_out = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = norm_out(h) * (1 + scale) + shift  # AdaGN (ADM Sec. 3)
        else:
            h = norm_out(h + e)
        h = conv_out(drop(act_out(h)))
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual, with ADM's fused qkv 1x1 conv.

    num_head_channels > 0 fixes the width per head (heads = C / num_head_channels); otherwise num_heads heads.
    """

    def __init__(self, channels, num_heads=1, num_head_channels=-1, use_new_attention_order=False):
        super().__init__()
        if num_head_channels > 0:
            if channels % num_head_channels:
                raise ValueError(f"attention at {channels} channels: not divisible by num_head_channels="
                                 f"{num_head_channels}; choose a num_head_channels that divides {channels}")
            num_heads = channels // num_head_channels
        if channels % num_heads:
            raise ValueError(f"attention at {channels} channels: not divisible by num_heads={num_heads}; "
                             f"choose num_heads dividing {channels} or set num_head_channels")
        self.num_heads = num_heads
        self.use_new_attention_order = use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        T, ch = H * W, C // self.num_heads
        x = x.reshape(B, C, T)
        qkv = self.qkv(self.norm(x)).transpose(1, 2)  # (B, T, 3C)
        if self.use_new_attention_order:  # channels: (q, k, v) x heads x ch
            q, k, v = qkv.reshape(B, T, 3, self.num_heads, ch).permute(2, 0, 3, 1, 4)
        else:  # legacy: heads x (q, k, v) x ch
            q, k, v = qkv.reshape(B, T, self.num_heads, 3, ch).permute(3, 0, 2, 1, 4)
        # q, k, v: (B, heads, T, ch) with ch contiguous, as the fused SDPA kernels want; SDPA's default scale is
        # $1 / \sqrt{\text{ch}}$, as in ADM.
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, ch)
        a = a.permute(0, 1, 3, 2).reshape(B, C, T)  # back to channels, head-major as ADM
        return (x + self.proj_out(a)).reshape(B, C, H, W)


class UNetModel(nn.Module):
    """ADM U-Net (guided-diffusion's UNetModel, 2-D) with an optional second scalar condition and class label.

    :param image_size: the H = W the model is built for (the net is convolutional; any H, W divisible by
        2^(len(channel_mult)-1) runs, attention stays where it was placed at build time).
    :param in_channels, out_channels: image channels in and out (out = 2 * in for learned sigma).
    :param model_channels: base width; level l has int(channel_mult[l] * model_channels) channels.
    :param num_res_blocks: residual blocks per level on the way down (one more per level on the way up).
    :param attention_resolutions: feature-map sizes in pixels with self-attention, e.g. (16,) or (7,)
        (guided-diffusion's class takes downsampling factors instead; unet.adm converts).
        The middle block always has attention.
    :param num_heads, num_head_channels, num_heads_upsample: heads (-1 for num_heads_upsample: same as num_heads,
        used on the way up); num_head_channels > 0 overrides both with C / num_head_channels heads.
    :param use_scale_shift_norm, resblock_updown, use_new_attention_order, dropout: see the module docstring.
    :param extra_cond: add the embedding of a second scalar cond (B,) to the time embedding.
    :param num_classes, null_label: add the embedding of a class label y (B,) in 0..num_classes-1 (ADM's
        label_emb); null_label adds the index num_classes, the "no label" of guidance dropout (and y=None).
    :param guidance_cond: add the embedding of a guidance input w (B,) to the time embedding.
    """

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks,
                 attention_resolutions=(), dropout=0.0, channel_mult=(1, 2, 4, 8), num_heads=1,
                 num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False,
                 use_new_attention_order=False, extra_cond=False, num_classes=None, null_label=False,
                 guidance_cond=False):
        super().__init__()
        channel_mult = tuple(channel_mult)
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        if not channel_mult:
            raise ValueError("channel_mult is empty; give one multiplier per level, e.g. (1, 2, 4)")
        factor = 2 ** (len(channel_mult) - 1)
        if image_size % factor:
            raise ValueError(f"image_size={image_size} is not divisible by {factor} (= 2^(levels-1) for "
                             f"channel_mult={channel_mult}); use a size divisible by {factor} or fewer levels")
        level_sizes = [image_size // 2 ** level for level in range(len(channel_mult))]
        bad = [r for r in attention_resolutions if r not in level_sizes]
        if bad:
            raise ValueError(f"attention_resolutions {bad} are not feature-map sizes of this net: they are pixel "
                             f"sizes, one of {level_sizes} for image_size={image_size}")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels, self.channel_mult, self.extra_cond = model_channels, channel_mult, extra_cond
        if num_classes is None and null_label:
            raise ValueError("null_label=True needs num_classes (the null label is the index num_classes)")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be an integer >= 1 (or None: no label), got {num_classes!r}")
        self.num_classes, self.null_label, self.guidance_cond = num_classes, bool(null_label), bool(guidance_cond)

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if extra_cond:
            # Zero last layer: the model starts as if unconditioned on cond.
            self.cond_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(),
                                            zero_module(nn.Linear(emb_dim, emb_dim)))
        if num_classes is not None:  # after the embeddings above: an unlabelled net's initial weights stay as they were
            self.label_emb = nn.Embedding(num_classes + int(null_label), emb_dim)
        if guidance_cond:  # last: the weights drawn above stay those of a net without it
            self.guidance_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(),
                                                zero_module(nn.Linear(emb_dim, emb_dim)))

        def res_block(ch_in, ch_out, up=False, down=False):
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm, up=up, down=down)

        def attention(ch, heads):
            return AttentionBlock(ch, heads, num_head_channels, use_new_attention_order)

        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_channels = [ch]  # widths of the activations the way up concatenates, one per input block
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if level_sizes[level] in attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                down = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch)
                self.input_blocks.append(EmbedSequential(down))
                skip_channels.append(ch)

        self.middle_block = EmbedSequential(res_block(ch, ch), attention(ch, num_heads), res_block(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), int(mult * model_channels))]
                ch = int(mult * model_channels)
                if level_sizes[level] in attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level > 0 and i == num_res_blocks:
                    layers.append(res_block(ch, ch, up=True) if resblock_updown else Upsample(ch))
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def _per_sample(self, name, v, batch, device):
        """Accept a (B,) tensor, or a number / 0-d tensor meaning the same value for every sample."""
        v = torch.as_tensor(v, device=device)
        if v.dim() == 0:
            return v.expand(batch)
        if v.shape != (batch,):
            raise ValueError(f"{name} must have shape (B,) = ({batch},) (or be a scalar), got {tuple(v.shape)}")
        return v

    def forward(self, x, t, cond=None, y=None, w=None):
        """
        :param x: (B, in_channels, H, W), H and W divisible by 2^(len(channel_mult)-1).
        :param t: (B,) float times, embedded as given (see "Time convention"); a scalar is broadcast.
        :param cond: (B,) second scalar, only with extra_cond=True; None means 0.
        :param y: (B,) integer class labels, only with num_classes; None means the null label (null_label=True).
        :param w: (B,) guidance input, only with guidance_cond=True, embedded as given; None means 0.
        :return: (B, out_channels, H, W).
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"image size {tuple(x.shape[2:])} is not divisible by {factor} "
                             f"(= 2^(levels-1) for channel_mult={self.channel_mult}); resize or pad the input")
        t = self._per_sample("t", t, x.shape[0], x.device)
        emb = self.time_embed(timestep_embedding(t, self.model_channels))  # (B, 4 model_channels)
        if self.extra_cond:
            cond = torch.zeros_like(t, dtype=torch.float32) if cond is None else cond
            cond = self._per_sample("cond", cond, x.shape[0], x.device)
            emb = emb + self.cond_embed(timestep_embedding(cond, self.model_channels))
        elif cond is not None:
            raise ValueError("cond was given but this model has extra_cond=False; build it with extra_cond=True "
                             "(e.g. unet.create(name, extra_cond=True)) or drop cond")
        if self.guidance_cond:
            w = self._per_sample("w", torch.zeros_like(t, dtype=torch.float32) if w is None else w, x.shape[0],
                                 x.device)
            emb = emb + self.guidance_embed(timestep_embedding(w, self.model_channels))
        elif w is not None:
            raise ValueError("w (a guidance input) was given but this model has guidance_cond=False; build it with "
                             "guidance_cond=True or drop w")
        if self.num_classes is not None:
            if y is None and not self.null_label:
                raise ValueError(f"this model is class-conditional ({self.num_classes} classes, no null label): "
                                 f"pass y, the (B,) class labels")
            y = torch.full((x.shape[0],), self.num_classes, device=x.device) if y is None else \
                self._per_sample("y", y, x.shape[0], x.device)
            if y.dtype.is_floating_point or not bool(((y >= 0) & (y < self.num_classes + self.null_label)).all()):
                raise ValueError(f"y must hold integer labels in 0..{self.num_classes - 1}"
                                 + (f" (or {self.num_classes}, the null label)" if self.null_label else "")
                                 + f", got {y.tolist()[:8]}")
            emb = emb + self.label_emb(y)  # ADM: emb = time_embed(e(t)) + label_emb(y)
        elif y is not None:
            raise ValueError("y (class labels) was given but this model has no num_classes; build it with "
                             "num_classes=K or drop y")

        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)  # U-Net skip: concatenate along channels
        return self.out(h)


# Full UNetModel kwargs; out_channels = in_channels (2x: learned sigma, as in adm-ffhq256).
# tiny and mnist are sized for CPUs: a conv at 28x28 costs 16x its cost at 7x7, so the 28x28 level is narrow
# (8 / 16 channels, where GroupNorm falls back to one channel per group) and the capacity sits at 7x7.
# Both need scale-shift norm: with one channel per group, the additive time embedding of a ResBlock (h + e, then
# GroupNorm) is a per-channel constant that the norm subtracts again, so the net could not see t or cond at all.
PRESETS = {
    "tiny": dict(image_size=28, in_channels=1, model_channels=16, out_channels=1, num_res_blocks=1,
                 attention_resolutions=(7,), channel_mult=(0.5, 1, 2), num_head_channels=16,
                 use_scale_shift_norm=True),
    # small: tiny's narrow 28x28 level with mnist's width ratio (64 channels at 7x7): 3x tiny's parameters.
    "small": dict(image_size=28, in_channels=1, model_channels=16, out_channels=1, num_res_blocks=1,
                  attention_resolutions=(7,), channel_mult=(0.5, 1, 4), num_head_channels=16,
                  use_scale_shift_norm=True),
    "mnist": dict(image_size=28, in_channels=1, model_channels=32, out_channels=1, num_res_blocks=1,
                  attention_resolutions=(7,), channel_mult=(0.5, 1, 4), num_head_channels=32,
                  use_scale_shift_norm=True),
    "challenge": dict(image_size=64, in_channels=3, model_channels=128, out_channels=3, num_res_blocks=4,
                      attention_resolutions=(32,), dropout=0.1, channel_mult=(1, 2, 2, 2), extra_cond=True),
    "adm-ffhq256": dict(image_size=256, in_channels=3, model_channels=128, out_channels=6, num_res_blocks=1,
                        attention_resolutions=(16,), channel_mult=(1, 1, 2, 2, 4, 4), num_heads=4,
                        num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True),
}


def preset_kwargs(name, learn_sigma=None, **overrides):
    """The UNetModel kwargs of a preset, with any of them overridden (what create builds; store it in a run's
    config to rebuild the net later even if the preset changes).

    out_channels follows in_channels unless given; learn_sigma=True doubles it (eps and the variance
    interpolation v of Nichol & Dhariwal). learn_sigma=None keeps the preset's own choice (True only for adm-ffhq256).
    A new image_size keeps attention at the same levels (tiny at 32x32: attention at 8 instead of 7).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    if learn_sigma is None:
        learn_sigma = preset["out_channels"] == 2 * preset["in_channels"]
    kwargs = {**preset, **overrides}
    kwargs["out_channels"] = overrides.get("out_channels", kwargs["in_channels"]) * (2 if learn_sigma else 1)
    if "attention_resolutions" not in overrides:
        # Same downsampling factor ds = preset size / attention size at the new image size.
        kwargs["attention_resolutions"] = tuple(kwargs["image_size"] // (preset["image_size"] // r)
                                                for r in preset["attention_resolutions"])
    return kwargs


def create(name, learn_sigma=None, **overrides):
    """Build a preset, with any UNetModel kwarg overridden, e.g. create("tiny", image_size=32, in_channels=3).
    See preset_kwargs for learn_sigma and what a new image_size does."""
    return UNetModel(**preset_kwargs(name, learn_sigma, **overrides))


ADM_NUM_CLASSES = 1000  # guided-diffusion's class_cond models: ImageNet
# guided-diffusion's create_model default channel_mult per image size (channel_mult="").
ADM_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}


def adm(image_size, num_channels, num_res_blocks, channel_mult="", learn_sigma=False, class_cond=False,
        use_checkpoint=False, attention_resolutions="16", num_heads=1, num_head_channels=-1, num_heads_upsample=-1,
        use_scale_shift_norm=False, dropout=0.0, resblock_updown=False, use_fp16=False,
        use_new_attention_order=False, model_path=None):
    """guided-diffusion's create_model(...) with the same keyword names and defaults: pass a published config as is,
    e.g. DPS's configs/model_config.yaml for ffhq_10m.pt: unet.adm(**yaml.safe_load(open(path))).

    attention_resolutions: pixel sizes, "32,16,8", 16 or (32, 16); a size that is no level of the net is ignored,
    as in ADM. channel_mult: "" (ADM's default for image_size 64/128/256/512), "1,1,2,2,4,4", or a tuple.
    model_path (a key of DPS's config files): if given, the checkpoint is loaded with load_state_dict_checked.
    use_checkpoint (gradient checkpointing) only saves memory in training: accepted, not used here.
    use_fp16: accepted, not used; the model stays float32 (ADM saves its checkpoints in float32 even when trained
    in fp16). For half precision run it under torch.autocast. class_cond=True: ImageNet's 1000 classes (label_emb),
    guided-diffusion's NUM_CLASSES; sample with net(x, t, y=labels).
    """
    if channel_mult == "":
        if image_size not in ADM_CHANNEL_MULT:
            raise ValueError(f"no default channel_mult for image_size={image_size} (ADM has one for "
                             f"{sorted(ADM_CHANNEL_MULT)}); pass channel_mult, e.g. '1,2,2,2'")
        channel_mult = ADM_CHANNEL_MULT[image_size]
    elif isinstance(channel_mult, str):
        channel_mult = tuple(float(m) if "." in m else int(m) for m in channel_mult.split(","))
    if isinstance(attention_resolutions, str):
        attention_resolutions = [int(r) for r in attention_resolutions.split(",") if r.strip()]
    elif isinstance(attention_resolutions, int):  # YAML reads "attention_resolutions: 16" as an int
        attention_resolutions = [attention_resolutions]
    # ADM turns a pixel size r into a downsampling factor ds = image_size // r and attends where ds = 2^level.
    levels = [2 ** level for level in range(len(channel_mult))]
    sizes = tuple(image_size // (image_size // r) for r in attention_resolutions if image_size // r in levels)
    model = UNetModel(image_size=image_size, in_channels=3, model_channels=num_channels,
                      out_channels=6 if learn_sigma else 3, num_res_blocks=num_res_blocks,
                      attention_resolutions=sizes, dropout=dropout, channel_mult=channel_mult, num_heads=num_heads,
                      num_head_channels=num_head_channels, num_heads_upsample=num_heads_upsample,
                      use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
                      use_new_attention_order=use_new_attention_order,
                      num_classes=ADM_NUM_CLASSES if class_cond else None)
    if model_path is not None:
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"model_path {model_path!r} not found; ffhq_10m.pt is distributed through the "
                                    "Google Drive folder linked from github.com/DPS2022/diffusion-posterior-sampling")
        load_state_dict_checked(model, torch.load(model_path, map_location="cpu", weights_only=True))
    return model


def count_parameters(model):
    """Number of scalars in all parameters."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def ema_update(ema_model, model, decay):
    r"""Exponential moving average of the weights, in place:
    $\text{ema} \leftarrow \text{decay} \cdot \text{ema} + (1 - \text{decay}) \cdot \text{model}$."""
    ema_params, params = dict(ema_model.named_parameters()), dict(model.named_parameters())
    if ema_params.keys() != params.keys():
        raise ValueError("ema_model and model have different parameters; build the EMA copy with copy.deepcopy(model)")
    for name, p in params.items():
        ema_params[name].mul_(decay).add_(p.detach(), alpha=1 - decay)
    for b_ema, b in zip(ema_model.buffers(), model.buffers()):
        b_ema.copy_(b)


def load_state_dict_checked(model, state_dict):
    """load_state_dict(strict=True), but on any mismatch raise a ValueError that lists the first offending keys
    with their shapes and says how to fix it."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if not (missing or unexpected or mismatched):
        model.load_state_dict(state_dict, strict=True)
        return
    lines = [f"state dict does not fit {type(model).__name__}: {len(missing)} missing, {len(unexpected)} unexpected, "
             f"{len(mismatched)} shape-mismatched keys"]
    for title, keys, show in (("missing", missing, lambda k: f"model {tuple(own[k].shape)}"),
                              ("unexpected", unexpected, lambda k: f"checkpoint {tuple(state_dict[k].shape)}"),
                              ("shape mismatch", mismatched,
                               lambda k: f"model {tuple(own[k].shape)} vs checkpoint {tuple(state_dict[k].shape)}")):
        for k in keys[:5]:
            lines.append(f"  {title}: {k}  {show(k)}")
        if len(keys) > 5:
            lines.append(f"  ... {len(keys) - 5} more {title}")
    hints = []
    if any(k.startswith("module.") for k in unexpected):
        hints.append("keys start with 'module.' (saved from DistributedDataParallel): strip that prefix")
    if any(k.startswith("label_emb") for k in missing + unexpected + mismatched):
        hints.append("class labels differ: the checkpoint is class-conditional (label_emb) or not; check num_classes "
                     "(adm(class_cond=True): 1000) and null_label")
    if any(k.startswith("cond_embed") for k in missing + unexpected):
        hints.append("extra_cond differs between the checkpoint and the model")
    if any(k.startswith("out.") for k in mismatched):
        hints.append("output channels differ: check learn_sigma / out_channels")
    hints.append("build the model with the config the checkpoint was made with (config['unet'] of a run dir, "
                 "or unet.adm(**published_config) for a guided-diffusion checkpoint)")
    lines.append("fix: " + "; ".join(hints))
    raise ValueError("\n".join(lines))


def from_checkpoint(ckpt, arch=None, adm_config=None, weights="ema", source="checkpoint"):
    """Rebuild and load the net of a loaded checkpoint (a dict from torch.load): a run of this project
    ({"model", "ema", "config": {"unet": kwargs}, "step"}) or a raw guided-diffusion (ADM) state dict.

    A raw ADM dict carries no architecture: give arch (a preset such as "adm-ffhq256"; learn_sigma is read from
    the output layer's shape) or adm_config (guided-diffusion's create_model kwargs, as published with it).
    weights: "ema" or "model" (a run's raw weights); source: the file name, for error messages.
    :return: (net in eval mode, info), info = the run's config plus "step" ({} for ADM), with "shape" (C, H, W)
             and "learn_sigma" (the net outputs eps_hat and v, 2C channels) added.
    """
    if "config" in ckpt and weights in ckpt:  # a run dir's ckpt.pt
        info = dict(ckpt["config"], step=ckpt.get("step"))
        net = UNetModel(**info["unet"])
        load_state_dict_checked(net, ckpt[weights])
        kw = info["unet"]
    elif "time_embed.0.weight" in ckpt:  # raw ADM state dict: parameter names at top level
        if adm_config is not None:
            net = adm(**adm_config)
        elif arch is not None:
            if arch not in PRESETS:
                raise ValueError(f"unknown --arch {arch!r}; choose one of {sorted(PRESETS)}")
            in_ch = ckpt["input_blocks.0.0.weight"].shape[1]
            net = create(arch, learn_sigma=ckpt["out.2.weight"].shape[0] == 2 * in_ch)  # ADM doubles out for sigma
        else:
            raise ValueError(f"{source} is a raw ADM state dict: say which network it is with --arch "
                             f"(e.g. adm-ffhq256) or --adm-config '{{...guided-diffusion kwargs...}}'")
        load_state_dict_checked(net, ckpt)
        info = {}
        kw = {"image_size": net.image_size, "in_channels": net.in_channels, "out_channels": net.out_channels}
    else:
        raise ValueError(f"{source} is neither a run checkpoint (keys '{weights}', 'config') nor an ADM state dict "
                         f"(keys like 'time_embed.0.weight'); found keys {list(ckpt)[:5]}")
    info["shape"] = (kw["in_channels"], kw["image_size"], kw["image_size"])
    info["learn_sigma"] = kw["out_channels"] == 2 * kw["in_channels"]
    return net.eval(), info


def load_model(path, arch=None, adm_config=None, device="cpu"):
    """The eps-prediction net of a ddpm.py run checkpoint (EMA weights) or of a raw guided-diffusion (ADM) state
    dict, for the diffusion samplers (ddpm.py, ddim.py).

    A raw ADM file needs arch (a preset such as "adm-ffhq256") or adm_config (guided-diffusion's create_model kwargs,
    as published with the checkpoint); see from_checkpoint. The checkpoint of another method's run (a flow-matching
    velocity net) is refused: it is no eps predictor.
    :return: (net in eval mode on device, info): from_checkpoint's info, with info["diffusion"] = {"T", "schedule"}
             (T = 1000, linear for raw ADM files, as all published unconditional ADM models), info["shape"] =
             (C, H, W) and info["learn_sigma"] (the net outputs eps_hat and v, 2C channels).
    :raises rundir.MissingFileError, rundir.CheckpointError: a missing, unreadable or foreign checkpoint, or weights
        that do not fit the named architecture.
    """
    import rundir  # here, not at the top: the rest of this file stays a copyable module of torch alone
    ckpt = rundir.load_checkpoint(path)
    rundir.check_run_method(ckpt, "ddpm", path)
    try:
        net, info = from_checkpoint(ckpt, arch, adm_config, source=path)
    except ValueError as e:  # not a model file, or weights that do not fit the named architecture
        raise rundir.CheckpointError(f"{path} cannot be loaded: {e}") from e
    if net.num_classes is not None:  # the samplers call net(x, t): a class-conditional net would need labels
        raise rundir.CheckpointError(f"{path} is class-conditional ({net.num_classes} classes); ddpm.py and ddim.py "
                                     f"sample unconditional models: use an unconditional checkpoint")
    info.setdefault("diffusion", {"T": 1000, "schedule": "linear"})
    return net.to(device), info


def adm_config_arg(text):
    """argparse type of --adm-config: JSON of guided-diffusion create_model kwargs -> dict (for adm(**kwargs));
    an empty string means none given (None)."""
    if not text:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}); quote it like "
                                         f"--adm-config '{{\"image_size\": 256, ...}}'") from None
    if not isinstance(config, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of create_model kwargs, got {text!r}")
    return config


if __name__ == "__main__":
    for name in PRESETS:
        net = create(name)
        print(f"{name:12s} {count_parameters(net):>12,d} parameters   {PRESETS[name]}")
