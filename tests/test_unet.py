"""Tests for unet.py against independent computations: closed-form embeddings, attention and residual blocks written
out by hand with einsum / functional ops, and the layout and size of guided-diffusion's ffhq_10m network
(reference values read off guided-diffusion's own UNetModel for that config: 362 tensors, 93,563,910 parameters)."""

import io
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import unet  # noqa: E402


def randomize_zero_layers(model, except_prefix=None, seed=0):
    """Give zero-initialised layers random weights so that every part of the net affects the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if except_prefix and name.startswith(except_prefix):
                continue
            if p.abs().max() == 0:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------- time embedding
@pytest.mark.parametrize("dim", [8, 7])
def test_timestep_embedding_closed_form(dim):
    t = np.array([0.0, 1.0, 2.5, 999.0])
    half = dim // 2
    expected = np.zeros((len(t), dim))
    for i in range(half):
        f = 10000.0 ** (-i / half)  # f_i = 10000^(-i/half), cosines first (ADM order)
        expected[:, i] = np.cos(t * f)
        expected[:, half + i] = np.sin(t * f)
    got = unet.timestep_embedding(torch.tensor(t, dtype=torch.float32), dim).double().numpy()
    assert got.shape == (len(t), dim)
    np.testing.assert_allclose(got, expected, atol=2e-4)  # float32 arguments up to 999 rad
    if dim % 2:
        assert np.all(got[:, -1] == 0)


# ---------------------------------------------------------------- attention, by hand
def hand_group_norm(x, groups, weight, bias, eps=1e-5):
    B, C = x.shape[:2]
    xg = x.reshape(B, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    xn = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, C) + (1,) * (x.dim() - 2)
    return xn * weight.reshape(shape) + bias.reshape(shape)


def hand_attention(block, x, heads, legacy):
    """softmax(q k^T / sqrt(ch)) v per head, reading the 3C qkv channels in ADM's legacy or new order."""
    B, C, H, W = x.shape
    T, ch = H * W, C // heads
    xf = x.reshape(B, C, T)
    xn = hand_group_norm(xf, 32, block.norm.weight, block.norm.bias)
    qkv = torch.einsum("oc,bct->bot", block.qkv.weight[:, :, 0], xn) + block.qkv.bias[:, None]
    outs = []
    for h in range(heads):
        if legacy:  # channels: heads x (q, k, v) x ch
            q, k, v = (qkv[:, (3 * h + j) * ch:(3 * h + j + 1) * ch] for j in range(3))
        else:  # channels: (q, k, v) x heads x ch
            q, k, v = (qkv[:, j * C + h * ch:j * C + (h + 1) * ch] for j in range(3))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch), dim=-1)
        outs.append(torch.einsum("bts,bcs->bct", w, v))
    a = torch.cat(outs, dim=1)
    out = torch.einsum("oc,bct->bot", block.proj_out.weight[:, :, 0], a) + block.proj_out.bias[:, None]
    return x + out.reshape(B, C, H, W)


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("num_heads,num_head_channels,expected_heads", [(4, -1, 4), (1, 16, 4), (1, -1, 1)])
def test_attention_matches_hand_einsum(legacy, num_heads, num_head_channels, expected_heads):
    torch.manual_seed(0)
    block = unet.AttentionBlock(64, num_heads, num_head_channels, use_new_attention_order=not legacy)
    assert block.num_heads == expected_heads
    randomize_zero_layers(block)
    with torch.no_grad():
        block.norm.weight.add_(0.3 * torch.randn(64))
        block.norm.bias.add_(0.3 * torch.randn(64))
        x = torch.randn(2, 64, 5, 6)
        torch.testing.assert_close(block(x), hand_attention(block, x, expected_heads, legacy), atol=1e-5, rtol=1e-5)
        if expected_heads > 1:  # the two channel orders must really differ
            other = hand_attention(block, x, expected_heads, not legacy)
            assert (block(x) - other).abs().max() > 1e-2


# ---------------------------------------------------------------- residual block, by hand
def hand_resblock(block, x, emb, scale_shift, resample):
    n_in, _, c_in = block.in_layers
    n_out, _, _, c_out = block.out_layers
    g_in, g_out = n_in.num_groups, n_out.num_groups
    h = F.silu(hand_group_norm(x, g_in, n_in.weight, n_in.bias))
    if resample == "down":  # BigGAN-style: resample the branch before its conv, and the skip path
        h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    elif resample == "up":
        h, x = F.interpolate(h, scale_factor=2.0), F.interpolate(x, scale_factor=2.0)
    h = F.conv2d(h, c_in.weight, c_in.bias, padding=1)
    e = F.linear(F.silu(emb), block.emb_layers[1].weight, block.emb_layers[1].bias)[:, :, None, None]
    if scale_shift:  # ADM: GN(h) * (1 + scale) + shift, scale is the first half
        C = h.shape[1]
        h = hand_group_norm(h, g_out, n_out.weight, n_out.bias) * (1 + e[:, :C]) + e[:, C:]
    else:
        h = hand_group_norm(h + e, g_out, n_out.weight, n_out.bias)
    h = F.conv2d(F.silu(h), c_out.weight, c_out.bias, padding=1)
    skip = x if isinstance(block.skip_connection, torch.nn.Identity) else F.conv2d(
        x, block.skip_connection.weight, block.skip_connection.bias)
    return skip + h


@pytest.mark.parametrize("scale_shift,resample,c_out", [(True, None, 64), (False, None, 96), (True, "down", 64),
                                                        (True, "up", 64), (False, "down", 64)])
def test_resblock_matches_hand_computation(scale_shift, resample, c_out):
    torch.manual_seed(0)
    block = unet.ResBlock(64, 40, 0.0, c_out, scale_shift, up=resample == "up", down=resample == "down").eval()
    randomize_zero_layers(block)
    x, emb = torch.randn(2, 64, 6, 8), torch.randn(2, 40)
    with torch.no_grad():
        torch.testing.assert_close(block(x, emb), hand_resblock(block, x, emb, scale_shift, resample),
                                   atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- ADM layout: ffhq_10m
def test_adm_ffhq256_layout_matches_guided_diffusion():
    dps_config = dict(image_size=256, num_channels=128, num_res_blocks=1, channel_mult="", learn_sigma=True,
                      class_cond=False, use_checkpoint=False, attention_resolutions=16, num_heads=4,
                      num_head_channels=64, num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0,
                      resblock_updown=True, use_fp16=False, use_new_attention_order=False)  # DPS model_config.yaml
    with torch.device("meta"):  # shapes only, no memory
        nets = [unet.adm(**dps_config), unet.create("adm-ffhq256"), unet.UNetModel(**unet.PRESETS["adm-ffhq256"])]
    for net in nets:
        sd = net.state_dict()
        assert len(sd) == 362 and unet.count_parameters(net) == 93_563_910  # guided-diffusion's numbers
        expected = {
            "time_embed.0.weight": (512, 128), "time_embed.2.weight": (512, 512),
            "input_blocks.0.0.weight": (128, 3, 3, 3),
            "input_blocks.1.0.in_layers.0.weight": (128,),
            "input_blocks.1.0.emb_layers.1.weight": (256, 512),  # scale and shift: 2 x 128
            "input_blocks.2.0.in_layers.2.weight": (128, 128, 3, 3),  # resblock_updown: down block
            "input_blocks.5.0.skip_connection.weight": (256, 128, 1, 1),
            "input_blocks.9.1.qkv.weight": (1536, 512, 1), "input_blocks.9.1.proj_out.weight": (512, 512, 1),
            "input_blocks.11.0.out_layers.3.weight": (512, 512, 3, 3),
            "middle_block.1.qkv.weight": (1536, 512, 1), "middle_block.2.emb_layers.1.weight": (1024, 512),
            "output_blocks.0.0.in_layers.2.weight": (512, 1024, 3, 3),
            "output_blocks.0.0.skip_connection.weight": (512, 1024, 1, 1),
            "output_blocks.3.1.norm.weight": (512,), "output_blocks.3.2.in_layers.2.weight": (512, 512, 3, 3),
            "output_blocks.11.0.in_layers.0.weight": (256,),
            "out.0.weight": (128,), "out.2.weight": (6, 128, 3, 3), "out.2.bias": (6,),
        }
        for k, shape in expected.items():
            assert tuple(sd[k].shape) == shape, k
        assert sorted(k for k in sd if k.endswith("qkv.weight")) == [
            "input_blocks.9.1.qkv.weight", "middle_block.1.qkv.weight",
            "output_blocks.2.1.qkv.weight", "output_blocks.3.1.qkv.weight"]  # attention at 16x16 only (+ middle)
        assert max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks")) == 11
        assert max(int(k.split(".")[1]) for k in sd if k.startswith("output_blocks")) == 11
        assert not any(k.startswith("cond_embed") for k in sd)
        heads = [m.num_heads for m in net.modules() if isinstance(m, unet.AttentionBlock)]
        assert heads == [8, 8, 8, 8]  # 512 channels / 64 per head


def test_adm_builder_defaults_and_attention_sizes():
    with torch.device("meta"):
        net = unet.adm(image_size=64, num_channels=64, num_res_blocks=1, attention_resolutions="32,16,8")
    assert net.channel_mult == (1, 2, 3, 4)  # guided-diffusion's default for 64x64
    sd = net.state_dict()
    # levels 64, 32, 16, 8 (input blocks: conv, [res, down] x 3, res) -> attention in input blocks 3, 5, 7
    assert sorted(k for k in sd if k.startswith("input_blocks") and k.endswith("qkv.weight")) == [
        "input_blocks.3.1.qkv.weight", "input_blocks.5.1.qkv.weight", "input_blocks.7.1.qkv.weight"]
    assert net.out_channels == 3
    with torch.device("meta"):
        assert unet.adm(image_size=32, num_channels=64, num_res_blocks=1, channel_mult=(1, 2),
                        learn_sigma=True).out_channels == 6
    with pytest.raises(ValueError, match="channel_mult"):
        unet.adm(image_size=48, num_channels=64, num_res_blocks=1)


def test_adm_imagenet64_class_conditional_layout_matches_guided_diffusion():
    """The published ImageNet 64x64 model's flags (guided-diffusion's README: class_cond, 192 channels, 3 res
    blocks, attention at 32, 16, 8 with 64 channels per head, new attention order, resblock_updown, scale-shift
    norm, learned sigma). 541 tensors and 295,904,454 parameters are the counts of guided-diffusion's own
    UNetModel built with these flags (instantiated from its code beside this project, not part of it); its
    state dict loaded into this one strictly and gave the same outputs to the last bit."""
    config = dict(image_size=64, num_channels=192, num_res_blocks=3, learn_sigma=True, class_cond=True,
                  attention_resolutions="32,16,8", num_head_channels=64, resblock_updown=True,
                  use_new_attention_order=True, use_scale_shift_norm=True, dropout=0.1, use_fp16=True)
    with torch.device("meta"):
        net = unet.adm(**config)
        plain = unet.adm(**dict(config, class_cond=False))
    sd = net.state_dict()
    assert len(sd) == 541 and unet.count_parameters(net) == 295_904_454
    assert tuple(sd["label_emb.weight"].shape) == (1000, 768)  # ImageNet's classes x 4 * 192
    assert set(sd) - set(plain.state_dict()) == {"label_emb.weight"}
    with pytest.raises(ValueError, match="class labels differ"):
        unet.load_state_dict_checked(plain, sd)


def test_class_labels_enter_the_embedding_and_the_null_label_is_y_none():
    """label_emb(y) is added to the time embedding: another label changes the output, the null row (index K) is
    what y=None means, and a net without labels keeps the initial weights it had before labels existed (the
    embedding is built after the time embeddings, and only when num_classes is given)."""
    torch.manual_seed(0)
    net = unet.create("tiny", num_classes=10, null_label=True).eval()
    with torch.no_grad():  # random weights everywhere (a new net's output layer is zero)
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
        x, t = torch.randn(3, 1, 28, 28), torch.tensor([1.0, 500.0, 999.0])
        out = net(x, t, y=torch.tensor([0, 1, 2]))
        assert (net(x, t, y=torch.tensor([5, 1, 2])) - out)[0].abs().max() > 1e-3
        torch.testing.assert_close((net(x, t, y=torch.tensor([5, 1, 2])) - out)[1:], torch.zeros_like(out[1:]))
        torch.testing.assert_close(net(x, t), net(x, t, y=torch.full((3,), 10)))
    assert net.label_emb.weight.shape == (11, 4 * 16)
    torch.manual_seed(0)
    a = unet.create("tiny").state_dict()
    torch.manual_seed(0)
    b = unet.create("tiny", num_classes=None).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for kwargs, call, message in (
            (dict(num_classes=10), dict(), "pass y"),
            (dict(num_classes=10), dict(y=torch.tensor([10, 0, 0])), "integer labels in 0..9"),
            (dict(num_classes=10, null_label=True), dict(y=torch.tensor([11, 0, 0])), "or 10, the null label"),
            (dict(num_classes=10), dict(y=torch.tensor([0.5, 0, 0])), "integer labels"),
            (dict(), dict(y=torch.tensor([0, 0, 0])), "has no num_classes")):
        with pytest.raises(ValueError, match=message):
            unet.create("tiny", **kwargs)(x, t, **call)
    with pytest.raises(ValueError, match="null_label=True needs num_classes"):
        unet.create("tiny", null_label=True)


# ---------------------------------------------------------------- presets
@pytest.mark.parametrize("name", ["tiny", "mnist", "challenge"])
def test_every_preset_sees_its_time_and_its_second_scalar(name):
    """With random (not zero-initialised) weights, changing t or cond must change the output. An additive time
    embedding followed by a GroupNorm of one channel per group is removed exactly by the norm (the tiny preset
    without scale-shift norm was blind to t and cond: output changes of 0 up to float rounding)."""
    torch.manual_seed(0)
    size = {"challenge": {"image_size": 16}}.get(name, {})  # the challenge net is convolutional: 16x16 is enough
    kw = unet.preset_kwargs(name, extra_cond=True, **size)
    net = unet.UNetModel(**kw).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
        x = torch.randn(2, kw["in_channels"], kw["image_size"], kw["image_size"])
        t, c = torch.tensor([100.0, 600.0]), torch.tensor([0.0, 500.0])
        y = net(x, t, c)
        scale = y.abs().mean()
        assert (net(x, t + 300, c) - y).abs().mean() > 1e-3 * scale
        assert (net(x, t, c + 300) - y).abs().mean() > 1e-3 * scale


def test_presets_forward_at_their_sizes():
    torch.manual_seed(0)
    for name, batch in [("tiny", 3), ("small", 2), ("mnist", 2), ("challenge", 1)]:
        cfg = unet.PRESETS[name]
        net = unet.create(name).eval()
        x = torch.randn(batch, cfg["in_channels"], cfg["image_size"], cfg["image_size"])
        with torch.no_grad():
            y = net(x, torch.rand(batch) * 999)
        assert y.shape == (batch, cfg["out_channels"], cfg["image_size"], cfg["image_size"]), name
        assert torch.isfinite(y).all()
    assert unet.count_parameters(unet.create("tiny")) < 1_000_000
    assert unet.PRESETS["challenge"]["extra_cond"] and unet.PRESETS["challenge"]["attention_resolutions"] == (32,)
    # adm-ffhq256 is fully convolutional: run it at 64x64 (6 levels: 64 -> 2) to keep the test fast.
    net = unet.create("adm-ffhq256").eval()
    randomize_zero_layers(net)
    with torch.no_grad():
        y = net(torch.randn(1, 3, 64, 64), torch.tensor([500.0]))
    assert y.shape == (1, 6, 64, 64) and torch.isfinite(y).all()


def test_create_overrides():
    net = unet.create("tiny", image_size=32, in_channels=3)
    assert net.out_channels == 3
    assert net(torch.randn(2, 3, 32, 32), torch.rand(2)).shape == (2, 3, 32, 32)
    # attention stays at the same level: 7 of 28 (ds=4) becomes 8 of 32
    assert any(isinstance(m, unet.AttentionBlock) for m in net.input_blocks[-1])


def test_learn_sigma_doubles_output_channels():
    assert unet.create("tiny", learn_sigma=True).out_channels == 2
    net = unet.create("tiny", learn_sigma=True, image_size=16, in_channels=3)
    assert net(torch.randn(2, 3, 16, 16), torch.rand(2)).shape == (2, 6, 16, 16)
    with torch.device("meta"):
        assert unet.create("adm-ffhq256").out_channels == 6  # ffhq_10m learned sigma
        assert unet.create("adm-ffhq256", learn_sigma=False).out_channels == 3


# ---------------------------------------------------------------- extra condition
def test_extra_cond_inert_at_init_then_learns():
    torch.manual_seed(0)
    net = unet.create("tiny", extra_cond=True)
    randomize_zero_layers(net, except_prefix="cond_embed")  # everything but cond_embed's zero last layer
    assert net.cond_embed[2].weight.abs().max() == 0
    x, t = torch.randn(4, 1, 28, 28), torch.rand(4) * 999
    d1, d2 = torch.rand(4), torch.rand(4) * 100
    with torch.no_grad():
        y0 = net(x, t)
        assert torch.equal(net(x, t, cond=d1), y0) and torch.equal(net(x, t, cond=d2), y0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    (net(x, t, cond=d2) - x).square().mean().backward()
    opt.step()
    with torch.no_grad():
        assert torch.equal(net(x, t), net(x, t, cond=torch.zeros(4)))  # cond=None means cond = 0
        assert (net(x, t, cond=d1) - net(x, t, cond=d2)).abs().max() > 1e-6


# ---------------------------------------------------------------- loading, EMA, counting
def test_strict_load_of_saved_state_dict():
    torch.manual_seed(0)
    a = unet.create("tiny", extra_cond=True)
    randomize_zero_layers(a)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    torch.manual_seed(1)
    b = unet.create("tiny", extra_cond=True)
    b.load_state_dict(sd, strict=True)
    unet.load_state_dict_checked(b, sd)
    x, t, d = torch.randn(2, 1, 28, 28), torch.rand(2) * 999, torch.rand(2)
    with torch.no_grad():
        assert torch.equal(a(x, t, d), b(x, t, d))


def test_load_state_dict_checked_reports_mismatches():
    sd = unet.create("tiny", learn_sigma=True, extra_cond=True).state_dict()
    sd["module.extra"] = torch.zeros(3)
    with pytest.raises(ValueError) as err:
        unet.load_state_dict_checked(unet.create("tiny"), sd)
    msg = str(err.value)
    assert "out.2.weight" in msg and "(1, 8, 3, 3)" in msg and "(2, 8, 3, 3)" in msg and "learn_sigma" in msg
    assert "unexpected: cond_embed.0.weight" in msg and "extra_cond" in msg and "module." in msg


def test_ema_update_closed_form():
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
        for p in ema.parameters():
            p.fill_(0.5)
    unet.ema_update(ema, model, 0.9)
    for p in ema.parameters():  # 0.9 * 0.5 + 0.1 * 1 = 0.55
        torch.testing.assert_close(p, torch.full_like(p, 0.55))
    assert unet.count_parameters(model) == 3 * 2 + 2


# ---------------------------------------------------------------- clear errors
def test_clear_errors():
    net = unet.create("tiny")  # 3 levels: sizes must be divisible by 4
    with pytest.raises(ValueError, match="not divisible by 4"):
        net(torch.randn(1, 1, 30, 30), torch.rand(1))
    with pytest.raises(ValueError, match="not divisible by 4"):
        unet.create("tiny", image_size=30)
    with pytest.raises(ValueError, match="extra_cond"):
        net(torch.randn(1, 1, 28, 28), torch.rand(1), cond=torch.rand(1))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        net(torch.randn(1, 3, 28, 28), torch.rand(1))
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        net(torch.randn(2, 1, 28, 28), torch.rand(3))
    with pytest.raises(ValueError, match="tiny, small, mnist, challenge, adm-ffhq256"):
        unet.create("cifar")
    with pytest.raises(ValueError, match="pixel sizes"):
        unet.create("tiny", attention_resolutions=(4,))  # a downsampling factor, not a size
    with pytest.raises(ValueError, match="num_head_channels"):
        unet.create("tiny", num_head_channels=24)
    with pytest.raises(FileNotFoundError, match="ffhq_10m"):
        unet.adm(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", model_path="/nonexistent.pt")


def test_from_checkpoint_picks_the_named_weights():
    # a run checkpoint holds two different weight sets; the net must compute with the one asked for
    kwargs = unet.preset_kwargs("tiny", image_size=16)
    assert kwargs["attention_resolutions"] == (4,)  # same level as 7 at 28: 28 // 7 = 16 // 4
    torch.manual_seed(0)
    raw, ema = unet.UNetModel(**kwargs), unet.UNetModel(**kwargs)
    for p in list(raw.parameters()) + list(ema.parameters()):  # zero-init layers would make both nets agree
        torch.nn.init.normal_(p, std=0.05)
    ckpt = {"model": raw.state_dict(), "ema": ema.state_dict(), "config": {"unet": kwargs, "data": "x"}, "step": 7}
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3.0, 900.0])
    with torch.no_grad():
        y_raw, y_ema = raw(x, t), ema(x, t)
        assert (y_raw - y_ema).abs().max() > 1e-3
        net, info = unet.from_checkpoint(ckpt)
        torch.testing.assert_close(net(x, t), y_ema)
        net, info2 = unet.from_checkpoint(ckpt, weights="model")
        torch.testing.assert_close(net(x, t), y_raw)
    assert info == info2 and info["step"] == 7 and info["data"] == "x"
    assert info["shape"] == (1, 16, 16) and info["learn_sigma"] is False and not net.training


def test_load_model_refuses_other_runs_and_parses_adm_config(tmp_path):
    """load_model (ddpm.py and ddim.py): a ddpm run's EMA net with the training schedule; a flow-matching run or a
    missing file is a user error. adm_config_arg: --adm-config JSON -> dict, a clear argparse error otherwise."""
    import argparse

    import rundir

    kwargs = unet.preset_kwargs("tiny")
    sd = unet.UNetModel(**kwargs).state_dict()
    diffusion = {"T": 50, "schedule": "cosine"}
    torch.save({"model": sd, "ema": sd, "step": 3, "config": {"method": "ddpm", "unet": kwargs,
                                                             "diffusion": diffusion}}, tmp_path / "ddpm.pt")
    net, info = unet.load_model(tmp_path / "ddpm.pt")
    assert info["diffusion"] == diffusion and info["step"] == 3 and info["shape"] == (1, 28, 28) and not net.training
    torch.save({"model": sd, "ema": sd, "step": 3, "config": {"method": "cfm", "unet": kwargs}}, tmp_path / "cfm.pt")
    with pytest.raises(rundir.CheckpointError, match="cfm run"):
        unet.load_model(tmp_path / "cfm.pt")
    with pytest.raises(rundir.MissingFileError, match="nothere.pt"):
        unet.load_model(tmp_path / "nothere.pt")
    adm_config = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult=(1, 2), class_cond=True)
    with torch.device("meta"):
        labelled = unet.adm(**adm_config)
    torch.save({k: torch.zeros(v.shape) for k, v in labelled.state_dict().items()}, tmp_path / "adm_cond.pt")
    with pytest.raises(rundir.CheckpointError, match="class-conditional"):  # the samplers pass no labels
        unet.load_model(tmp_path / "adm_cond.pt", adm_config=adm_config)

    assert unet.adm_config_arg('{"image_size": 64}') == {"image_size": 64} and unet.adm_config_arg("") is None
    with pytest.raises(argparse.ArgumentTypeError, match="not valid JSON"):
        unet.adm_config_arg("{image_size: 64}")
    with pytest.raises(argparse.ArgumentTypeError, match="JSON object"):
        unet.adm_config_arg("[64]")
