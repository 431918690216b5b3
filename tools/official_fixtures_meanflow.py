"""Fixtures for the parity tests of fewstep.py's meanflow, imf and pmf against their authors' JAX code (issue 46).

Each generator imports the authors' Flax module from a local clone under --repos at run time, swaps its DiT for a
tiny float64 network (the same function as the test's TinyNet, in the authors' convention), feeds it fixed draws in
place of jax.random's and records what their code computes: per-sample target, JVP, adaptive weight, loss and its
gradient w.r.t. the network's parameters; their (t, r) sampler's draws; their sampler on fixed noise. Nothing of the
authors' code is copied here. Needs jax (x64 on CPU) and flax, which the project does not.

    python tools/official_fixtures.py --repos DIR [--only NAME ...]   (the entry point; this is the meanflow group)

Clones expected under --repos: meanflow (Gsunshine/meanflow: MeanFlow, JAX), imeanflow (Lyy-iiis/imeanflow: iMF,
JAX) and pMF (Lyy-iiis/pMF: pMF, JAX), each the official code of its paper.

Conventions. The authors' z_t = (1 - t') x + t' e runs from data (t' = 0) to noise (t' = 1); fewstep.py's t = 1 - t',
x0 = e, x1 = x. Their u' = -u, v' = -v, V' = -V; their h = t' - r' is fewstep's span s - t; their JVP along
(v', 1, 0) in (z, t', r') is fewstep's du/dt along (v, 1, 0) in (x, t, s) with the same sign (both directions flip).
Their images are NHWC, fewstep's NCHW. Everything in `outputs` is mapped to fewstep's convention and layout.
"""
import importlib.util
import sys
import types

import numpy as np
import torch

COMMITS = {  # the commits these fixtures were generated from (the clones carry no .git)
    "Gsunshine/meanflow": "d70cb55d298ee03c53bf6da67bec281082e4e2d9",
    "Lyy-iiis/imeanflow": "bf60cd7cb653f6628e59d48034b333c5eba445e2",
    "Lyy-iiis/pMF": "75f6073042c21f7104686261a0c4784db4ede9d1",
}
C, H, W, K, B = 2, 2, 2, 3, 12  # channels, image size, classes (the null label is K), loss batch
PARAMS = ("a", "b", "c", "d", "e", "g", "k")  # see tiny_weights


def tiny_weights(seed):
    """The tiny net's float64 parameters; in fewstep's convention (t = 1 - t', span = s - t, guidance input w - 1):
    net(x, t, span, y, win) = tanh(a x + b t + c span + g[y] + k win) d + e x, per channel (g: (K + 1, C))."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda lo, hi, *shape: lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    return {"a": r(0.5, 1.2, C), "b": r(-1.5, 1.5, C), "c": r(-1.5, 1.5, C), "d": r(0.3, 0.8, C),
            "e": r(-0.3, 0.3, C), "g": r(-0.5, 0.5, K + 1, C), "k": r(-0.4, 0.4, C)}


def provenance(repo, file, function, note):
    return {"repository": repo, "commit": COMMITS[repo], "file": file, "function": function, "note": note}


def nchw(a):  # a JAX NHWC array as a float64 NCHW tensor
    return torch.from_numpy(np.asarray(a, dtype=np.float64).copy()).permute(0, 3, 1, 2).contiguous()


def flat(a):  # a JAX (B, 1, 1, 1) or (B,) array as a float64 (B,) tensor
    return torch.from_numpy(np.asarray(a, dtype=np.float64).reshape(-1).copy())


class Proxy:
    """A stand-in for a module the authors' file imported (jax, jax.random, jax.lax, jnp): the given attributes
    replace the real ones, everything else is the real module's."""

    def __init__(self, real, **over):
        self._real = real
        self.__dict__.update(over)

    def __getattr__(self, name):
        return getattr(self._real, name)


class Harness:
    """Loads one of the authors' files with its jax / jnp replaced by proxies: jax.random's draws come from a
    script of fixed arrays (checked for shape, in call order per kind), and jax.jvp, jax.lax.stop_gradient and
    jnp.sum over (1, 2, 3) record their values. jnp.clip's a_min / a_max (removed from recent jax) become min / max."""

    def __init__(self, path, name):
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp
        self.jax, self.jnp = jax, jnp
        models = types.ModuleType("models")  # their DiT modules: never built (setup is replaced), never imported
        models.__path__ = []
        for m in ("models_dit", "imfDiT", "pmfDiT"):
            setattr(models, m, types.ModuleType(f"models.{m}"))
            sys.modules[f"models.{m}"] = getattr(models, m)
        sys.modules["models"] = models
        spec = importlib.util.spec_from_file_location(name, path)
        self.module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.module)
        self.script, self.rec = {}, {"jvp": [], "sg": [], "sum": []}
        rand = Proxy(jax.random, normal=self.draw("normal"), uniform=self.draw("uniform"),
                     randint=self.draw("randint"))
        self.module.jax = Proxy(jax, random=rand, jvp=self.jvp, lax=Proxy(jax.lax, stop_gradient=self.sg))
        self.module.jnp = Proxy(jnp, sum=self.sum, clip=self.clip)

    def draw(self, kind):
        def fn(key, shape=(), *args, **kwargs):
            value = self.script[kind].pop(0)
            assert tuple(value.shape) == tuple(shape), (kind, value.shape, shape)
            return self.jnp.asarray(value)
        return fn

    def run(self, script, fn):
        self.script = {k: list(v) for k, v in script.items()}
        self.rec = {"jvp": [], "sg": [], "sum": []}
        out = fn()
        assert not any(self.script.values()), f"draws left over: {self.script}"
        return out

    def jvp(self, fun, primals, tangents, has_aux=False):
        out = self.jax.jvp(fun, primals, tangents, has_aux=has_aux)
        self.rec["jvp"].append((primals, tangents, out))
        return out

    def sg(self, x):
        self.rec["sg"].append(x)
        return self.jax.lax.stop_gradient(x)

    def sum(self, x, axis=None, **kw):
        out = self.jnp.sum(x, axis=axis, **kw)
        if axis == (1, 2, 3):
            self.rec["sum"].append(out)
        return out

    def clip(self, x, a_min=None, a_max=None, **kw):
        return self.jnp.clip(x, kw.pop("min", a_min), kw.pop("max", a_max), **kw)


def twin(nn, jnp, kind):
    """The tiny net in the authors' convention, as the submodule "net" their setup() would build. kind "meanflow":
    net(x, t', h, y, ...) -> u' = -f(x, 1 - t', h, y, 0); "imf": net(x, t', h, w, t_min, t_max, y) -> (u', v') with
    u' = -f_u(x, 1 - t', h, y, w - 1) and the v-head v' = -f_v(x, 1 - t', 0, y, w - 1); "pmf": the same with f as
    the image x_hat and u' = (z - x_hat) / clip(t', 0.05, 1) (their pmfDiT's output map). f_u and f_v have the same
    values but separate parameters, so the gradient w.r.t. the u-head is that of their u-loss alone (fewstep has no
    v-head: its velocity is u at s = t, which f_v equals)."""

    def f(p, x, t, span, y, win):
        ch = lambda v: v.reshape(1, 1, 1, C)  # noqa: E731
        col = lambda v: jnp.asarray(v, jnp.float64).reshape(-1, 1, 1, 1)  # noqa: E731
        pre = ch(p["a"]) * x + ch(p["b"]) * col(t) + ch(p["c"]) * col(span) + p["g"][y][:, None, None, :]
        return jnp.tanh(pre + ch(p["k"]) * col(win)) * ch(p["d"]) + ch(p["e"]) * x

    class Twin(nn.Module):
        @nn.compact
        def __call__(self, x, t, h, *args, **kwargs):
            shapes = {"a": (C,), "b": (C,), "c": (C,), "d": (C,), "e": (C,), "g": (K + 1, C), "k": (C,)}
            heads = ("u",) if kind == "meanflow" else ("u", "v")
            p = {hd: {n: self.param(f"{hd}_{n}", nn.initializers.zeros, s, jnp.float64) for n, s in shapes.items()}
                 for hd in heads}
            tt = 1 - jnp.asarray(t, jnp.float64)  # fewstep's t = 1 - t'
            if kind == "meanflow":
                return -f(p["u"], x, tt, h, args[0], 0.0)
            w, y = jnp.asarray(args[0], jnp.float64), args[3]
            if kind == "imf":
                return -f(p["u"], x, tt, h, y, w - 1), -f(p["v"], x, tt, 0.0 * h, y, w - 1)
            clip = jnp.clip(jnp.asarray(t, jnp.float64).reshape(-1, 1, 1, 1), 0.05, 1.0)
            return ((x - f(p["u"], x, tt, h, y, w - 1)) / clip, (x - f(p["v"], x, tt, 0.0 * h, y, w - 1)) / clip)
    return Twin


def load(repos, kind):
    file = {"meanflow": "meanflow/meanflow.py", "imf": "imeanflow/imf.py", "pmf": "pMF/pmf.py"}[kind]
    h = Harness(repos / file, f"official_{kind}")
    import flax.linen as nn
    base = {"meanflow": "MeanFlow", "imf": "iMeanFlow", "pmf": "pixelMeanFlow"}[kind]
    Twin = twin(nn, h.jnp, kind)

    class WithTwin(getattr(h.module, base)):
        def setup(self):
            self.net = Twin(name="net")
    return h, WithTwin


def variables(h, weights, kind):
    heads = ("u",) if kind == "meanflow" else ("u", "v")
    return {"params": {"net": {f"{hd}_{n}": h.jnp.asarray(weights[n].numpy()) for hd in heads for n in PARAMS}}}


def fixed_inputs(seed):
    """The batch, noise, the raw normal draws of t' and r' (NHWC numpy, float64) and the labels."""
    rng = np.random.default_rng(seed)
    x = np.tanh(rng.standard_normal((B, H, W, C))).astype(np.float32).astype(np.float64)  # their forward casts the
    # images to float32 (model.dtype): given as float32 values, the cast is exact
    e = rng.standard_normal((B, H, W, C))
    zt, zr = rng.standard_normal((B, 1, 1, 1)), rng.standard_normal((B, 1, 1, 1))
    y = rng.integers(0, K, B)
    return x, e, zt, zr, y


def drop_uniforms(count, seed):
    """B uniforms of which exactly `count` fall below 0.1 (their cond_drop drops that many rows)."""
    rng = np.random.default_rng(seed)
    u = 0.1 + 0.9 * rng.random(B)
    u[rng.permutation(B)[:count]] = 0.1 * rng.random(count)
    return u


def loss_fixture(repos, kind, seed, count, omega=1.0, kappa=0.0):
    """Their forward() on a fixed batch: per-sample pieces from the recorded calls and the u-head's gradient."""
    h, Model = load(repos, kind)
    jax, jnp = h.jax, h.jnp
    weights = tiny_weights(seed)
    x, e, zt, zr, y = fixed_inputs(seed + 1)
    u_drop = drop_uniforms(count, seed + 2)
    if kind == "meanflow":  # fewstep's defaults: ratio 0.75 -> data_proportion 0.25; logit-normal(-2, 2); p = 0.75
        model = Model(model_str="tiny", model_config={}, num_classes=K, P_mean=-2.0, P_std=2.0, data_proportion=0.25,
                      omega=omega, kappa=kappa, class_dropout_prob=0.1, norm_p=0.75, norm_eps=1e-3)
        script = {"normal": [zt, zr, e], "uniform": [u_drop]}
        call = lambda v: model.apply(v, jnp.asarray(x), jnp.asarray(y), method=model.forward,  # noqa: E731
                                     rngs={"gen": jax.random.PRNGKey(0)})
    else:  # fewstep's imf / pmf defaults (the authors' released configs): ratio 0.5, p = 1, c = 0.01
        mean, std = (-0.4, 1.0) if kind == "imf" else (0.8, 0.8)
        model = Model(model_str="tiny", num_classes=K, P_mean=mean, P_std=std, data_proportion=0.5,
                      class_dropout_prob=0.1, norm_p=1.0, norm_eps=0.01)
        u_omega = np.random.default_rng(seed + 3).random((B, 1, 1, 1))
        # t_min = 0, t_max = 1 on every row: the CFG interval covers every t (fewstep has no interval)
        script = {"normal": [zt, zr, e], "uniform": [np.zeros((B, 1, 1, 1)), np.ones((B, 1, 1, 1)), u_omega, u_drop]}
        call = lambda v: model.apply(v, jnp.asarray(x), jnp.asarray(y), method=model.forward,  # noqa: E731
                                     rngs={"gen": jax.random.PRNGKey(0)})
    v = variables(h, weights, kind)
    loss, _ = h.run(script, lambda: call(v))
    rec = h.rec
    (z, t, r), (tangent, _, _), out = rec["jvp"][0]
    u, dudt = out[0], out[1]
    if kind == "meanflow":
        target, adp = rec["sg"][0], rec["sg"][1]
        err = rec["sum"][0]
        loss_main = loss
    else:
        target, adp = rec["sg"][1], rec["sg"][2]
        err = rec["sum"][0]
        loss_main = jnp.mean(err / adp)  # their loss_u, before the v-head's loss is added
    if kind != "meanflow":
        omega_rows = h.run({"uniform": [u_omega]}, lambda: model.apply(
            {}, B, method=model.sample_cfg_scale, rngs={"gen": jax.random.PRNGKey(0)},
            **({"s_max": model.cfg_max} if kind == "pmf" else {})))
    grads = h.run(script, lambda: jax.grad(lambda p: call({"params": p})[0])(v["params"]))["net"]
    tp, rp = flat(t), flat(r)
    assert kind != "pmf" or float(tp.min()) > 0.05, "pmf's target equals fewstep's only for t' > 0.05"
    inputs = {"x1": nchw(x), "x0": nchw(e), "y": torch.as_tensor(y, dtype=torch.long), "t": 1 - tp, "s": 1 - rp,
              "drop_count": int((u_drop < 0.1).sum())}
    if kind != "meanflow":
        inputs["w"] = flat(omega_rows)
    outputs = {"loss": float(loss_main), "u": -nchw(u), "dudt": nchw(dudt), "tangent": -nchw(tangent),
               "target": -nchw(target), "err": flat(err), "weight": 1 / flat(adp),
               "grads": {n: torch.from_numpy(np.asarray(grads[f"u_{n}"]).copy()) for n in PARAMS}}
    return h, model, weights, inputs, outputs


def meanflow_note(kappa):
    return ("MeanFlow.forward (sample_tr, guidance_fn, cond_drop, jax.jvp, adaptive weight) with the DiT replaced by "
            "the tiny net (setup overridden); jax.random.normal / uniform fed the fixed draws (t', r' normals, noise, "
            "the cond_drop uniforms); jnp.clip's a_min/a_max mapped to min/max; fewstep's ratio 0.75 is "
            f"data_proportion 0.25; omega = w (1 - kappa), kappa = {kappa}")


def meanflow_loss(repos, omega, kappa, count, seed):
    h, model, weights, inputs, outputs = loss_fixture(repos, "meanflow", seed, count, omega, kappa)
    return {"provenance": provenance("Gsunshine/meanflow", "meanflow.py", "MeanFlow.forward", meanflow_note(kappa)),
            "config": {"omega": omega, "kappa": kappa, "guidance": omega / (1 - kappa), "label_dropout": 0.1,
                       "num_classes": K},
            "inputs": inputs, "weights": weights, "outputs": outputs}


def times_fixture(repos, kind, n=20000, seed=0):
    """n draws of (t', r') from their sample_tr with jax's own RNG (fixed key)."""
    h, Model = load(repos, kind)
    jax = h.jax
    kw = {"model_str": "tiny", "num_classes": K}
    if kind == "meanflow":
        kw |= {"model_config": {}, "P_mean": -2.0, "P_std": 2.0, "data_proportion": 0.25}
    else:
        kw |= {"P_mean": -0.4, "P_std": 1.0} if kind == "imf" else {"P_mean": 0.8, "P_std": 0.8}
        kw["data_proportion"] = 0.5
    model = Model(**kw)
    h.module.jax = jax  # the real RNG here
    out = model.apply({}, n, method=model.sample_tr, rngs={"gen": jax.random.PRNGKey(seed)})
    return {"tp": flat(out[0]).float(), "rp": flat(out[1]).float(), "config": {k: v for k, v in kw.items()
                                                                               if k != "model_config"}}


def sampler_fixture(repos, kind, seed, omega=2.0, nfes=(1, 2)):
    """Their generate() on fixed noise and labels (jax.random.normal / randint fed), nfe steps each."""
    h, Model = load(repos, kind)
    jax, jnp = h.jax, h.jnp
    weights = tiny_weights(seed)
    rng = np.random.default_rng(seed + 1)
    n = 4
    noise, y = rng.standard_normal((n, H, W, C)), rng.integers(0, K, n)
    cfg = types.SimpleNamespace(dataset=types.SimpleNamespace(num_classes=K, image_size=H, image_channels=C))
    out = {}
    for nfe in nfes:
        cfg.sampling = types.SimpleNamespace(num_steps=nfe)
        if kind == "meanflow":
            model = Model(model_str="tiny", model_config={}, num_classes=K,
                          sampling_timesteps=jnp.linspace(1.0, 0.0, nfe + 1))
            v = variables(h, weights, kind)
            x = h.run({"normal": [noise], "randint": [y]}, lambda: h.module.generate(
                v, model, jax.random.PRNGKey(0), n, cfg))
        else:
            model = Model(model_str="tiny", num_classes=K)
            v = variables(h, weights, kind)
            x = h.run({"normal": [noise], "randint": [y]}, lambda: h.module.generate(
                v, model, jax.random.PRNGKey(0), n, cfg, nfe, omega, 0.0, 1.0))
        out[nfe] = nchw(x)
    return {"inputs": {"noise": nchw(noise), "y": torch.as_tensor(y, dtype=torch.long)}, "weights": weights,
            "guidance": omega, "outputs": out}


def meanflow(repos):
    sampler = sampler_fixture(repos, "meanflow", seed=30)
    note = ("generate / MeanFlow.sample_one_step with sampling_timesteps linspace(1, 0, nfe + 1) (fewstep's k / nfe "
            "grid); sample_tr with jax's RNG, key 0, fewstep's defaults (P_mean -2, P_std 2, data_proportion 0.25)")
    return {"provenance": provenance("Gsunshine/meanflow", "meanflow.py", "MeanFlow.sample_tr, generate", note),
            "times": times_fixture(repos, "meanflow"), "sampler": sampler,
            "loss": meanflow_loss(repos, 1.0, 0.0, count=4, seed=10),
            "guided_loss": meanflow_loss(repos, 1.25, 0.5, count=5, seed=20)}


def improved(repos, kind, seed, count):
    h, model, weights, inputs, outputs = loss_fixture(repos, kind, seed, count)
    repo, file, cls = {"imf": ("Lyy-iiis/imeanflow", "imf.py", "iMeanFlow"),
                       "pmf": ("Lyy-iiis/pMF", "pmf.py", "pixelMeanFlow")}[kind]
    note = (f"{cls}.forward with the DiT replaced by the tiny net (setup overridden; u- and v-heads with equal "
            "values, separate parameters: grads are the u-head's, loss is their loss_u); jax.random fed the fixed "
            "draws (t', r' normals, noise, t_min = 0 and t_max = 1 on every row, the cfg-scale uniform, the cond_drop "
            "uniforms); generate fed noise and labels, t_min 0, t_max 1; sample_tr with jax's RNG, key 0"
            + ("; no perceptual loss (lpips, convnext False: their default); every t' > 0.05, where their target "
               "(z_t - x) / clip(t') equals fewstep's x1 - x0" if kind == "pmf" else ""))
    return {"provenance": provenance(repo, file, f"{cls}.forward, {cls}.sample_tr, generate", note),
            "loss": {"config": {"label_dropout": 0.1, "num_classes": K, "guidance_max": 8.0},
                     "inputs": inputs, "weights": weights, "outputs": outputs},
            "times": times_fixture(repos, kind), "sampler": sampler_fixture(repos, kind, seed + 5)}


GENERATORS = {"meanflow": meanflow, "imf": lambda repos: improved(repos, "imf", 40, 2),
              "pmf": lambda repos: improved(repos, "pmf", 50, 7)}
