"""Fixtures for the shortcut, rf and reflow parity tests (tests/test_official_parity_shortcut.py).

Runs the authors' code from local clones under --repos, on a tiny float64 network written here (a JAX twin for
kvfrans/shortcut-models, a torch one for the PyTorch references), and writes what it computed, with provenance, to
tests/data/official/{shortcut,rf,reflow}_*.pt. Needs jax (x64), numpy and torch; no line of the authors' code is
copied here: it is imported from the clones at run time and only its random draws (and a few stubs for its logging,
data and device plumbing) are replaced.

    python tools/official_fixtures.py --repos DIR [--only NAME ...]   (the entry point; this is the shortcut group)

Clones (directory names under --repos): shortcut-models (kvfrans/shortcut-models), RectifiedFlow
(gnobitab/RectifiedFlow), minRF (cloneofsimo/minRF), each at the commit pinned in PINNED.

The tiny network, the same function on both sides (channels C, images of 1x1 pixels):
    f(x, t, d, y) = p tanh(a x + b t + c d + E[y]) + e x,   per-channel a, b, c, p, e; E: (classes + 1, C)
with t the physical time of fewstep.py's convention (0 noise, 1 data) and d shortcut's step size. The maps to each
code's own convention are written where the net is handed to it.
"""
import contextlib
import importlib
import subprocess
import sys
import types

import numpy as np
import torch

PINNED = {"shortcut-models": ("kvfrans/shortcut-models", "601004348667094e1b71f30942199759412d4432"),
          "RectifiedFlow": ("gnobitab/RectifiedFlow", "5a1fd4dd3ea7db764ce370a84ce35f9c8b15fde6"),
          "minRF": ("cloneofsimo/minRF", "4fc10e0cc8ba976152c7936a1af9717209f03e18")}
C, CLASSES = 3, 4  # channels of the tiny images, class labels (the null label is CLASSES)
SIGMA_MIN = 1e-5  # shortcut-models' x_t = (1 - (1 - 1e-5) t) x0 + t x1 (targets_shortcut.py)


def provenance(repos, name, file, function, note):
    repo, commit = PINNED[name]
    try:  # a clone with git metadata must be at the pinned commit
        head = subprocess.run(["git", "-C", str(repos / name), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        head = commit
    if head != commit:
        raise SystemExit(f"{repos / name} is at {head}, the fixtures pin {commit}: check out the pinned commit")
    return {"repository": repo, "commit": commit, "file": file, "function": function, "note": note}


def tiny_weights(seed, scale=1.0):
    """Per-channel parameters of f; scale > 1 makes outputs that reach shortcut's clip at 4."""
    g = np.random.default_rng(seed)
    return {"a": g.uniform(0.5, 1.5, C), "b": g.uniform(-1.5, 1.5, C), "c": g.uniform(-2.0, 2.0, C),
            "p": scale * g.uniform(1.0, 2.0, C), "e": scale * g.uniform(0.8, 1.4, C),
            "E": g.normal(0.0, 0.7, (CLASSES + 1, C))}


def as_torch(tree):
    if isinstance(tree, dict):
        return {k: as_torch(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [as_torch(v) for v in tree]
    if isinstance(tree, (str, int, float, bool)) or tree is None:
        return tree
    a = np.asarray(tree)
    return torch.from_numpy(np.array(a, dtype=np.float64 if a.dtype.kind == "f" else np.int64))


def stub_missing(*names):
    """Import each module, or put an empty stand-in in sys.modules where it is missing (what only the authors'
    logging and plotting import); tqdm.tqdm becomes the identity where tqdm is a stand-in."""
    for name in names:
        if name not in sys.modules:
            try:
                importlib.import_module(name)
            except ImportError:
                sys.modules[name] = types.ModuleType(name)
    sys.modules["tqdm"].tqdm = getattr(sys.modules["tqdm"], "tqdm", lambda it, **kw: it)


# %% shortcut: kvfrans/shortcut-models (JAX) -------------------------------------------------------------------------
def shortcut_modules(repos):
    """The authors' targets_shortcut.py and helper_inference.py, importable: x64 on, stub modules for what only their
    logging imports (wandb, matplotlib, tqdm), jax.spmd_mode (gone from current JAX) as a no-op context."""
    import jax
    jax.config.update("jax_enable_x64", True)
    stub_missing("wandb", "matplotlib", "matplotlib.pyplot", "tqdm")
    if not hasattr(jax, "spmd_mode"):
        jax.spmd_mode = lambda *a, **k: contextlib.nullcontext()
    root = str(repos / "shortcut-models")
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("targets_shortcut"), importlib.import_module("helper_inference")


def jax_net(params, x, t, dt_base, labels):
    """f in the authors' convention: x (B, 1, 1, C) channels last, t in [0, 1] (0 noise, as fewstep.py), dt_base the
    integer log2(1/d) of their DiT's step input (d = 2^-dt_base)."""
    import jax.numpy as jnp
    d = 2.0 ** (-jnp.asarray(dt_base, jnp.float64))
    col = lambda v: jnp.asarray(v, jnp.float64)[:, None, None, None]  # noqa: E731
    h = params["a"] * x + params["b"] * col(t) + params["c"] * col(d) + params["E"][labels][:, None, None, :]
    return params["p"] * jnp.tanh(h) + params["e"] * x


def tiny_state_class():
    import jax

    @jax.tree_util.register_pytree_node_class
    class TinyState:
        """Stands in for their flax TrainStateEma: call_model (online weights) and call_model_ema, same signature."""
        def __init__(self, params, params_ema, calls=None):
            self.params, self.params_ema, self.calls = params, params_ema, calls

        def tree_flatten(self):
            return (self.params, self.params_ema), None

        @classmethod
        def tree_unflatten(cls, aux, children):
            return cls(*children)

        def run(self, params, which, x, t, dt_base, labels):
            out = jax_net(params, x, t, dt_base, labels)
            if self.calls is not None:
                self.calls.append({"which": which, "x": x, "t": t, "dt_base": dt_base, "labels": labels, "out": out})
            return out

        def call_model(self, x, t, dt_base, labels, train=False, **kw):
            return self.run(self.params, "online", x, t, dt_base, labels)

        def call_model_ema(self, x, t, dt_base, labels, train=False, **kw):
            return self.run(self.params_ema, "ema", x, t, dt_base, labels)
    return TinyState


class Config(dict):  # their FLAGS.model is an ml_collections ConfigDict: read as .key and ['key']
    __getattr__ = dict.__getitem__


def shortcut_flags(batch, every, m=128, cfg_scale=1.0):
    model = Config(bootstrap_every=every, denoise_timesteps=m, bootstrap_dt_bias=0, bootstrap_ema=1,
                   bootstrap_cfg=0, class_dropout_prob=0.1, num_classes=CLASSES, cfg_scale=cfg_scale, use_ema=0,
                   use_stable_vae=0, train_type="shortcut")
    return types.SimpleNamespace(batch_size=batch, model=model, mode="inference", save_dir=None)


def shortcut_targets(repos, batch, every, seed):
    """get_targets on fixed draws: their jax.random calls answer from the arrays below (keys are labels)."""
    import jax
    import jax.numpy as jnp
    targets, _ = shortcut_modules(repos)
    g = np.random.default_rng(seed)
    nb = batch // every
    images = g.uniform(-1, 1, (batch, 1, 1, C))
    labels = g.integers(0, CLASSES, batch)
    u_boot, u_flow = g.uniform(size=nb), g.uniform(size=batch)  # their randint draws as floor(u * maxval)
    x0_boot, x0_flow = g.normal(size=(nb, 1, 1, C)), g.normal(size=(batch, 1, 1, C))
    drop = g.uniform(size=batch) < 0.3  # more drops than their 0.1, so a short batch has some

    class Draws:  # their draws: split -> named keys; randint/normal/bernoulli answer by key and shape
        @staticmethod
        def split(key, n):
            assert n == 3
            return ("label", "time", "noise")

        @staticmethod
        def randint(key, shape, minval, maxval):
            assert key == "time" and minval == 0
            u = {(nb,): u_boot, (batch,): u_flow}[tuple(shape)]
            return jnp.floor(u * jnp.asarray(maxval)).astype(jnp.int32)

        @staticmethod
        def normal(key, shape):
            assert key == "noise"
            return jnp.asarray({(nb, 1, 1, C): x0_boot, (batch, 1, 1, C): x0_flow}[tuple(shape)])

        @staticmethod
        def bernoulli(key, p, shape):
            assert key == "label" and tuple(shape) == (batch,)
            return jnp.asarray(drop)

    targets.jax = types.SimpleNamespace(random=Draws)  # the module's only use of jax is jax.random
    try:
        w, w_ema = tiny_weights(seed + 1, scale=2.0), tiny_weights(seed + 2, scale=2.0)
        params = {k: jnp.asarray(v) for k, v in w.items()}
        params_ema = {k: jnp.asarray(v) for k, v in w_ema.items()}
        calls = []
        state = tiny_state_class()(params, params_ema, calls)
        x_t, v_t, t, dt_base, labels_out, _ = targets.get_targets(
            shortcut_flags(batch, every), "key", state, jnp.asarray(images), jnp.asarray(labels))
    finally:
        targets.jax = jax

    def loss_fn(p):  # train.py's update.loss_fn (nested in main): the batch mean of each row's mean squared error
        return jnp.mean(jnp.mean((jax_net(p, x_t, t, dt_base, labels_out) - v_t) ** 2, axis=(1, 2, 3)))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    first, second = calls  # the EMA's step at (x_t, t) and at the clipped half step
    half = np.asarray(first["x"]) + (2.0 ** -np.asarray(first["dt_base"]))[:, None, None, None] * np.asarray(
        first["out"])
    clipped_half = int((np.abs(half) > 4).sum())
    clipped_target = int((np.abs((np.asarray(first["out"]) + np.asarray(second["out"])) / 2) > 4).sum())
    assert clipped_half and clipped_target, "weights too small: the clip at 4 never acts"
    chw = lambda a: np.moveaxis(np.asarray(a), -1, 1)  # noqa: E731  (B, 1, 1, C) -> torch's (B, C, 1, 1)
    return {
        "provenance": provenance(repos, "shortcut-models", "targets_shortcut.py", "get_targets",
                                 "jax_enable_x64; their jax.random.split/randint/normal/bernoulli replaced by fixed "
                                 "draws (randint = floor(u * maxval)); train_state: a stand-in with call_model / "
                                 "call_model_ema on the tiny net; loss and gradients: train.py update.loss_fn's "
                                 "formula (nested in main), restated; arrays here are (B, C, 1, 1)"),
        "config": {"batch": batch, "bootstrap_every": every, "max_steps": 128, "num_classes": CLASSES,
                   "sigma_min": SIGMA_MIN},
        "inputs": as_torch({"images": chw(images), "labels": labels, "x0_boot": chw(x0_boot),
                            "x0_flow": chw(x0_flow), "u_boot": u_boot, "u_flow": u_flow, "drop": drop.astype(int)}),
        "weights": as_torch(w), "ema_weights": as_torch(w_ema),
        "outputs": {**as_torch({"x_t": chw(x_t), "target": chw(v_t), "t": t, "dt_base": dt_base,
                                "labels": labels_out,
                                "pred": chw(jax_net(params, x_t, t, dt_base, labels_out)),
                                "loss": float(loss), "grads": {k: np.asarray(v) for k, v in grads.items()},
                                "ema_calls": [{"x": chw(c["x"]), "t": c["t"], "dt_base": c["dt_base"],
                                               "labels": c["labels"], "out": chw(c["out"])} for c in calls]}),
                    "clipped_half_step_entries": clipped_half, "clipped_target_entries": clipped_target},
    }


def shortcut_targets_even(repos):  # 112 // 4 = 28 bootstrap rows: 4 at each of the 7 step sizes
    return shortcut_targets(repos, batch=112, every=4, seed=11)


def shortcut_targets_uneven(repos):  # their defaults: 256 // 8 = 32 rows, 32 = 7 * 4 + 4: 8 at 2d = 1
    return shortcut_targets(repos, batch=256, every=8, seed=12)


def shortcut_draws(repos, calls=625, batch=256, every=8):
    """Their own jax.random over `calls` batches (a zero network): 2d per bootstrap row, t of bootstrap and flow
    rows."""
    import jax
    import jax.numpy as jnp
    targets, _ = shortcut_modules(repos)
    zero = {"a": jnp.zeros(C), "b": jnp.zeros(C), "c": jnp.zeros(C), "p": jnp.zeros(C), "e": jnp.zeros(C),
            "E": jnp.zeros((CLASSES + 1, C))}
    state = tiny_state_class()(zero, zero)
    images, labels = jnp.zeros((batch, 1, 1, C)), jnp.zeros(batch, jnp.int32)
    run = jax.jit(lambda key: targets.get_targets(shortcut_flags(batch, every), key, state, images, labels)[2:4])
    nb = batch // every
    t_boot, t_flow, dt = [], [], None
    for i in range(calls):
        t, dt_base = run(jax.random.PRNGKey(i))
        t_boot.append(np.asarray(t[:nb]))
        t_flow.append(np.asarray(t[nb:]))
        dt = np.asarray(dt_base[:nb]) if dt is None else dt
        assert (np.asarray(dt_base[:nb]) == dt).all()  # the step sizes are a fixed layout, not a draw
    return {
        "provenance": provenance(repos, "shortcut-models", "targets_shortcut.py", "get_targets",
                                 "their own jax.random (PRNGKey(i), i < calls), jit, zero network; bootstrap rows "
                                 "first; x64"),
        "config": {"batch": batch, "bootstrap_every": every, "max_steps": 128, "calls": calls},
        "outputs": {"dt_base": torch.from_numpy(dt.astype(np.int64)),
                    "t_boot": torch.from_numpy(np.concatenate(t_boot).astype(np.float32)),
                    "t_flow": torch.from_numpy(np.concatenate(t_flow)[:20000].astype(np.float32))},
    }


def shortcut_sampler(repos, batch=8):
    """helper_inference.do_inference (their FID loop: Euler with d = 1/n, optional guidance) with the I/O stubbed;
    x0 (their jax.random noise), labels and the samples are caught where they gather them."""
    import jax.numpy as jnp
    _, inference = shortcut_modules(repos)
    w = tiny_weights(21)
    params = {k: jnp.asarray(v) for k, v in w.items()}
    state = tiny_state_class()(params, params)
    gathered = []
    from jax.experimental import multihost_utils as multihost
    original = multihost.process_allgather

    def gather(x, *a, **k):
        gathered.append(np.asarray(x))
        return x
    data = iter(lambda: (jnp.zeros((batch, 1, 1, C)), jnp.zeros(batch, jnp.int32)), None)
    runs = []
    multihost.process_allgather = gather
    try:
        for steps, cfg in ((1, 1.0), (2, 1.0), (4, 1.0), (128, 1.0), (4, 1.5)):
            flags = shortcut_flags(batch, 8, cfg_scale=cfg)
            flags.inference_timesteps, flags.inference_generations, flags.inference_cfg_scale = steps, batch, cfg
            gathered.clear()
            inference.do_inference(flags, state, 0, data, data, lambda *a: a if len(a) > 1 else a[0], None, None,
                                   None, lambda x: jnp.zeros((x.shape[0], 1, 1, 4)), None, None,
                                   lambda *a: 0.0, {"mu": 0, "sigma": 0})
            x0, x1, labels = gathered[:3]  # their order: noise, sample, labels, then activations
            runs.append({"steps": steps, "cfg_scale": cfg, "x0": torch.from_numpy(np.moveaxis(x0, -1, 1)),
                         "x1": torch.from_numpy(np.moveaxis(x1, -1, 1)),
                         "labels": torch.from_numpy(labels.astype(np.int64))})
    finally:
        multihost.process_allgather = original
    return {
        "provenance": provenance(repos, "shortcut-models", "helper_inference.py", "do_inference",
                                 "train_type shortcut, use_ema 0, use_stable_vae 0, one batch; data, FID network, "
                                 "fid_from_stats and sharding stubbed; outputs caught at process_allgather; x64"),
        "config": {"max_steps": 128, "num_classes": CLASSES},
        "weights": as_torch(w), "outputs": {"runs": runs},
    }


# %% rf / reflow: gnobitab/RectifiedFlow and cloneofsimo/minRF (PyTorch) -----------------------------------------------
def torch_f(w, x, t, y=None):
    """f(x, t, 0, y) on (B, C, 1, 1) tensors; t (B,) physical time (0 noise); y None: no class term."""
    col = lambda v: v[None, :, None, None]  # noqa: E731
    h = col(w["a"]) * x + col(w["b"]) * t[:, None, None, None]
    if y is not None:
        h = h + w["E"][y][:, :, None, None]
    return col(w["p"]) * torch.tanh(h) + col(w["e"]) * x


class LiuNet(torch.nn.Module):
    """gnobitab's convention: model(x, labels) with labels = 999 t, t in [eps, 1] (0 noise, as fewstep.py); the same
    velocity direction. Records every time input."""
    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.as_tensor(v)) for k, v in w.items()})
        self.times, self.outs = [], []

    def forward(self, x, labels):
        self.times.append(labels.detach().clone())
        self.outs.append(torch_f(self.w, x, labels / 999))
        return self.outs[-1]


class MinRFNet(torch.nn.Module):
    """minRF's convention: t = 1 noise, z_t = (1 - t) x + t z1, velocity z1 - x: model(z, t, cond) = -f(z, 1 - t, y)."""
    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.as_tensor(v)) for k, v in w.items()})
        self.times = []

    def forward(self, z, t, cond):
        self.times.append(t.detach().clone())
        return -torch_f(self.w, z, 1 - t, cond)


class Fixed:
    """A stand-in for a module's `torch`: the named random calls answer from fixed tensors, the rest is torch."""
    def __init__(self, **answers):
        self.answers = answers

    def __getattr__(self, name):
        if name in self.answers:
            return self.answers[name]
        return getattr(torch, name)


def liu_modules(repos):
    stub_missing("matplotlib", "matplotlib.pyplot", "torchvision", "tqdm")
    root = str(repos / "RectifiedFlow" / "ImageGeneration")
    if root not in sys.path:
        sys.path.insert(0, root)
    return [importlib.import_module(m) for m in ("sde_lib", "losses", "sampling")]


def grads_of(net):
    return {k: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for k, p in net.w.items()}


def liu_loss(repos, reflow=None, batch=16, seed=31):
    """losses.get_rectified_flow_loss_fn on fixed z0 and u (t = u (1 - eps) + eps), reduce_mean as their CIFAR-10
    config; reflow: None (rf), 'uniform' (reflow) or 't0' (distillation, run at eps = 0: see the note)."""
    sde_lib, losses, _ = liu_modules(repos)
    torch.set_default_dtype(torch.float64)
    g = torch.Generator().manual_seed(seed)
    x1 = torch.rand(batch, C, 1, 1, generator=g) * 2 - 1
    z0 = torch.randn(batch, C, 1, 1, generator=g)
    u = torch.rand(batch, generator=g)
    eps = 0.0 if reflow == "t0" else 1e-3
    sde = sde_lib.RectifiedFlow(init_type="gaussian", noise_scale=1.0, reflow_flag=reflow is not None,
                                reflow_t_schedule=reflow or "uniform", reflow_loss="l2", use_ode_sampler="euler")
    sde.get_z0 = lambda batch_, train=True: z0  # their torch.randn(shape) * noise_scale, fixed
    residuals = []

    def square(r):
        residuals.append(r.detach().clone())
        return torch.square(r)
    losses.torch = Fixed(rand=lambda n, device=None: u, square=square)
    try:
        net = LiuNet(tiny_weights(seed + 1))
        loss = losses.get_rectified_flow_loss_fn(sde, train=True, reduce_mean=True, eps=eps)(
            net, [z0, x1] if reflow else x1)
        loss.backward()
    finally:
        losses.torch = torch
        torch.set_default_dtype(torch.float32)
    t = torch.zeros(batch) if reflow == "t0" else u * (1.0 - eps) + eps
    assert torch.equal(net.times[0], t * 999)  # the time their net saw is the t fed to the test
    draws = None
    if reflow is None:  # their own torch.rand: 20,000 times of the rf loss
        torch.manual_seed(seed)
        counter = LiuNet(tiny_weights(seed + 1))
        with torch.no_grad():
            losses.get_rectified_flow_loss_fn(sde_lib.RectifiedFlow(), train=True, reduce_mean=True)(
                counter, torch.zeros(20000, C, 1, 1))
        draws = (counter.times[0] / 999).float()
    note = ("their torch.rand (losses.py) and sde.get_z0 answer from fixed u and z0; torch.square wrapped to read "
            "each row's residual; model = the tiny net at labels = 999 t; float64")
    if reflow == "t0":
        note += "; run with eps = 0 (their default 1e-3 trains at t = 1e-3, a deviation named in Reflow's docstring)"
    return {
        "provenance": provenance(repos, "RectifiedFlow", "ImageGeneration/losses.py",
                                 "get_rectified_flow_loss_fn", note),
        "config": {"eps": eps, "reflow_t_schedule": reflow or "none"},
        "inputs": {"x1": x1, "z0": z0, "u": u, "t": t},
        "weights": as_torch(tiny_weights(seed + 1)),
        "outputs": {"loss": loss.detach(), "target": net.outs[0].detach() - residuals[0], "grads": grads_of(net),
                    **({} if draws is None else {"t_draws": draws})},
    }


def rf_liu_loss(repos):
    return liu_loss(repos)


def reflow_liu_loss(repos):
    return liu_loss(repos, reflow="uniform", seed=32)


def reflow_liu_distill_loss(repos):
    return liu_loss(repos, reflow="t0", seed=33)


def rf_liu_sampler(repos, batch=8):
    """sampling.get_rectified_flow_sampler's Euler sampler (sigma_var = 0) and sde.euler_ode (online reflow's pairs)
    at n = 1, 2, 4, 16 steps; the clones' RK45 (sde.ode, their default pair generator) once."""
    sde_lib, _, sampling = liu_modules(repos)
    torch.set_default_dtype(torch.float64)
    try:
        w = tiny_weights(41)
        z = torch.randn(batch, C, 1, 1, generator=torch.Generator().manual_seed(41))
        runs = []
        for n in (1, 2, 4, 16):
            sde = sde_lib.RectifiedFlow(init_type="gaussian", noise_scale=1.0, use_ode_sampler="euler", sample_N=n)
            net = LiuNet(w)
            sampler = sampling.get_rectified_flow_sampler(sde, (batch, C, 1, 1), lambda x: x, device="cpu")
            with torch.no_grad():
                x, nfe = sampler(net, z=z)
                pairs = sde.euler_ode(z, LiuNet(w), N=n)
            runs.append({"n": n, "sample": x, "nfe": nfe, "times": torch.stack(net.times) / 999,
                         "euler_ode": pairs})
        sde = sde_lib.RectifiedFlow(init_type="gaussian", noise_scale=1.0, use_ode_sampler="rk45")
        rk45 = sde.ode(z.float(), LiuNet({k: torch.as_tensor(v).float() for k, v in w.items()}).float()).double()
    finally:
        torch.set_default_dtype(torch.float32)
    return {
        "provenance": provenance(repos, "RectifiedFlow", "ImageGeneration/sampling.py + sde_lib.py",
                                 "get_rectified_flow_sampler (euler_sampler), RectifiedFlow.euler_ode, "
                                 "RectifiedFlow.ode", "inverse_scaler = identity, sigma_var 0, float64 (ode: their "
                                 "float32, scipy RK45, rtol = atol = 1e-5); model = the tiny net at labels = 999 t"),
        "config": {"eps": 1e-3},
        "inputs": {"z": z}, "weights": as_torch(w),
        "outputs": {"runs": runs, "rk45": rk45},
    }


def minrf_module(repos):
    root = str(repos / "minRF")
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("rf")


def rf_minrf(repos, batch=16, draws=20000):
    """minRF's RF.forward (logit-normal t, ln=True) on fixed draws, its sampler with and without guidance, and its
    own draws of t."""
    rf = minrf_module(repos)
    torch.set_default_dtype(torch.float64)
    try:
        g = torch.Generator().manual_seed(51)
        w = tiny_weights(51)
        x = torch.rand(batch, C, 1, 1, generator=g) * 2 - 1
        y = torch.randint(0, CLASSES, (batch,), generator=g)
        nt, z1 = torch.randn(batch, generator=g), torch.randn(batch, C, 1, 1, generator=g)
        rf.torch = Fixed(randn=lambda *a, **k: nt, randn_like=lambda v: z1)
        try:
            net = MinRFNet(w)
            loss, _ = rf.RF(net, ln=True).forward(x, y)
            loss.backward()
        finally:
            rf.torch = torch
        z = torch.randn(batch, C, 1, 1, generator=g)
        runs = []
        for steps, cfg in ((1, None), (2, None), (4, None), (4, 2.0)):
            with torch.no_grad():
                null = None if cfg is None else torch.full_like(y, CLASSES)
                out = rf.RF(MinRFNet(w)).sample(z, y, null, sample_steps=steps, cfg=cfg or 2.0)[-1]
            runs.append({"steps": steps, "cfg": cfg or 1.0, "sample": out})
        torch.manual_seed(52)
        counter = MinRFNet(w)
        with torch.no_grad():
            rf.RF(counter, ln=True).forward(torch.zeros(draws, C, 1, 1), torch.zeros(draws, dtype=torch.long))
    finally:
        torch.set_default_dtype(torch.float32)
    return {
        "provenance": provenance(repos, "minRF", "rf.py", "RF.forward, RF.sample",
                                 "rf.torch.randn / randn_like answer from fixed nt and z1 (forward); model = the tiny "
                                 "net in minRF's convention (t = 1 noise, velocity z1 - x); float64; draws: its own "
                                 "torch RNG (seed 52)"),
        "inputs": {"x": x, "y": y, "nt": nt, "z1": z1, "z": z}, "weights": as_torch(w),
        "outputs": {"loss": loss.detach(), "grads": grads_of(net), "runs": runs,
                    "t_draws": counter.times[0].float()},
    }


GENERATORS = {"shortcut_targets_even": shortcut_targets_even, "shortcut_targets_uneven": shortcut_targets_uneven,
              "shortcut_draws": shortcut_draws, "shortcut_sampler": shortcut_sampler,
              "rf_liu_loss": rf_liu_loss, "rf_liu_sampler": rf_liu_sampler, "rf_minrf": rf_minrf,
              "reflow_liu_loss": reflow_liu_loss, "reflow_liu_distill_loss": reflow_liu_distill_loss}
