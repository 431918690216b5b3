"""Parity of fewstep.py's meanflow, imf and pmf with their authors' code (issue 46), on numbers that code produced.

Fixtures: tests/data/official/{meanflow,imf,pmf}.pt, written by tools/official_fixtures_meanflow.py from the
official JAX code: Gsunshine/meanflow (MeanFlow.forward with its guided target, sample_tr, generate),
Lyy-iiis/imeanflow (iMeanFlow) and Lyy-iiis/pMF (pixelMeanFlow), each pinned by commit in the fixture's provenance.
Both sides run the same tiny float64 network (TinyNet here, its twin in the generator, in the authors' convention
t' = 1 - t, u' = -u), the same batch, noise, times, dropped-label count and guidance scales; the authors' outputs
are stored mapped to this file's convention. For each method: the loss, its per-sample target, JVP, error and
adaptive weight, the gradient w.r.t. the network's parameters (stop-gradient placement), the (t, s) sampler (a
two-sample KS test against 20,000 draws of the authors' sampler) and the sampler on fixed noise at NFE 1 and 2.
Not compared, by design (fewstep.py's docstrings name them): iMF's and pMF's v-head and its loss (here u at s = t;
the generator's v-head equals it), their CFG interval (fed as [0, 1], which covers every t), pMF's perceptual
losses, and pMF's target below t' = 0.05 (every t' here is above it).

Tolerances: u is a float64 network evaluation on both sides (1e-10). The rest passes through fewstep.py's .float()
casts, made on purpose so that bf16 autocast keeps the loss in float32: relative 1e-5.
"""
import pathlib

import pytest
import scipy.stats
import torch
import torch.nn as nn

from fewstep import ImprovedMeanFlow, MeanFlow, PixelMeanFlow, expand_t

DATA = pathlib.Path(__file__).parent / "data" / "official"
F32 = {"rtol": 1e-5, "atol": 1e-6}  # what fewstep's float32 casts allow
F64 = {"rtol": 1e-10, "atol": 1e-12}
CLASSES = {"meanflow": MeanFlow, "imf": ImprovedMeanFlow, "pmf": PixelMeanFlow}


def load(name):
    path = DATA / f"{name}.pt"
    assert path.exists(), f"missing fixture {path}: python tools/official_fixtures.py --repos DIR"
    return torch.load(path, weights_only=True)


class TinyNet(nn.Module):
    """net(x, t, span, y, win) = tanh(a x + b t + c span + g[y] + k win) d + e x, per channel, float64: smooth and
    nonlinear in x, t and the span s - t; g: a label embedding (the null label K included); win: imf's guidance
    input w - 1 (0 when absent). pmf reads the output as the image x_hat, meanflow and imf as the velocity u."""

    def __init__(self, weights):
        super().__init__()
        for name, value in weights.items():
            setattr(self, name, nn.Parameter(value.clone()))

    def forward(self, x, t, cond=None, y=None, w=None):
        ch, col = (lambda p: p.view(1, -1, 1, 1)), (lambda v: expand_t(v, x))
        pre = ch(self.a) * x + ch(self.b) * col(t) + self.g[y][:, :, None, None]
        pre = pre + (0 if cond is None else ch(self.c) * col(cond)) + (0 if w is None else ch(self.k) * col(w))
        return torch.tanh(pre) * ch(self.d) + ch(self.e) * x


def run_loss(method, fx, monkeypatch):
    """fewstep's loss on the fixture's inputs, its random draws replaced by the authors': the times (t, s), the count
    of dropped labels and imf's guidance scales. Returns (loss, what it computed per row, the row order it used:
    row k of fewstep's batch is row order[k] of the authors', the net)."""
    inp, net = fx["inputs"], TinyNet(fx["weights"])
    t, s = inp["t"], inp["s"]
    order = torch.argsort((s == t).to(torch.uint8), stable=True)  # jumps_first: s != t rows first, draw order kept
    monkeypatch.setattr(method, "sample_times", lambda b, device: (t.clone(), s.clone()))
    monkeypatch.setattr(method, "drop_count", lambda b, device: torch.tensor(inp["drop_count"]))
    if "w" in inp:
        monkeypatch.setattr(method, "sample_guidance", lambda b, device: inp["w"][order])
    seen, with_derivative, adaptive_loss = {}, method.with_derivative, method.adaptive_loss

    def record_derivative(net_, x, t_, s_, n, tangent):
        seen["u"], seen["dudt"] = with_derivative(net_, x, t_, s_, n, tangent)
        seen["n"], seen["tangent"], seen["span"] = n, tangent(slice(0, n)), s_ - t_
        return seen["u"], seen["dudt"]

    def record_loss(delta):
        seen["delta"] = delta
        return adaptive_loss(delta)
    monkeypatch.setattr(method, "with_derivative", record_derivative)
    monkeypatch.setattr(method, "adaptive_loss", record_loss)
    loss = method.loss(net, inp["x1"], x0=inp["x0"], y=inp["y"])
    loss.backward()
    return loss, seen, order, net


def check_loss(method, fx, monkeypatch, imf_target):
    method.num_classes, method.label_dropout = fx["config"]["num_classes"], fx["config"]["label_dropout"]
    loss, seen, order, net = run_loss(method, fx, monkeypatch)
    want, n = fx["outputs"], seen["n"]
    theirs = lambda key: want[key][order]  # noqa: E731  (the authors' rows in fewstep's order)
    torch.testing.assert_close(seen["u"], theirs("u"), **F64)
    torch.testing.assert_close(seen["dudt"][:n], theirs("dudt")[:n], **F32)  # 0 on s = t rows: span 0 there
    torch.testing.assert_close(seen["tangent"].double(), theirs("tangent")[:n], **F32)
    span = expand_t(seen["span"], seen["u"])
    # MeanFlow: delta = u - sg[v + (s - t) du/dt]; iMF: delta = u - (s - t) sg[du/dt] - v_g
    target = (seen["u"] - span * seen["dudt"] if imf_target else seen["u"]) - seen["delta"]
    torch.testing.assert_close(target, theirs("target"), **F32)
    err = seen["delta"].pow(2).flatten(1).sum(1)
    torch.testing.assert_close(err.double(), theirs("err"), **F32)
    torch.testing.assert_close(1 / (err.double() + method.adaptive_c) ** method.adaptive_p, theirs("weight"), **F32)
    assert loss.item() == pytest.approx(want["loss"], rel=1e-5)
    for name, grad in want["grads"].items():  # meanflow's net has no guidance input: k's gradient is 0 there
        ours = getattr(net, name).grad
        torch.testing.assert_close(torch.zeros_like(grad) if ours is None else ours, grad, rtol=1e-5, atol=1e-7)


def test_meanflow_loss_target_jvp_weight_and_gradient_match_the_authors(monkeypatch):
    """Gsunshine/meanflow's MeanFlow.forward without guidance (omega 1, kappa 0): 4 labels dropped on a batch whose
    3 s = t rows are the first to lose theirs (then one jump row)."""
    fx = load("meanflow")["loss"]
    check_loss(MeanFlow(), fx, monkeypatch, imf_target=False)


def test_meanflow_guided_target_matches_the_authors(monkeypatch):
    """Their guided target omega v + kappa u(y) + (1 - omega - kappa) u(null) with omega = 1.25, kappa = 0.5: this
    file's guidance w = omega / (1 - kappa) = 2.5; 5 labels dropped, 2 of them on jump rows, whose tangent is then
    the unguided v."""
    fx = load("meanflow")["guided_loss"]
    assert fx["config"]["guidance"] == 2.5 and fx["config"]["kappa"] == 0.5
    check_loss(MeanFlow(guidance=2.5, kappa=0.5), fx, monkeypatch, imf_target=False)


@pytest.mark.parametrize("name", ["imf", "pmf"])
def test_imf_and_pmf_loss_target_jvp_weight_and_gradient_match_the_authors(name, monkeypatch):
    """iMeanFlow.forward / pixelMeanFlow.forward with guidance scales drawn per row (kept on dropped rows) and the
    tangent from the true label: imf drops 2 labels (s = t rows), pmf 7 (all 6 s = t rows and one jump row)."""
    fx = load(name)["loss"]
    check_loss(CLASSES[name](), fx, monkeypatch, imf_target=True)


@pytest.mark.parametrize("name", ["meanflow", "imf", "pmf"])
def test_time_sampler_draws_match_the_authors(name):
    """20,000 (t', r') from the authors' sample_tr against 20,000 of sample_times (t' = 1 - t, r' = 1 - s): KS on
    t', r' and t' - r'. pmf's code sets r' = t' before it sorts, meanflow's and imf's after."""
    fx = load(name)["times"]
    method = CLASSES[name]()
    cfg = fx["config"]
    assert (method.time_mean, method.time_std, 1 - method.ratio) == (cfg["P_mean"], cfg["P_std"],
                                                                      cfg["data_proportion"])
    torch.manual_seed(0)
    t, s = method.sample_times(len(fx["tp"]), "cpu")
    for ours, theirs in ((1 - t, fx["tp"]), (1 - s, fx["rp"]), (s - t, fx["tp"] - fx["rp"])):
        assert scipy.stats.ks_2samp(ours.numpy(), theirs.numpy()).pvalue > 1e-3


@pytest.mark.parametrize("name", ["meanflow", "imf", "pmf"])
def test_sampler_on_fixed_noise_matches_the_authors(name):
    """generate() at NFE 1 and 2 (t' from 1 to 0 in equal steps), imf and pmf at guidance 2 as the network's input."""
    fx = load(name)["sampler"]
    method = CLASSES[name]() if name == "meanflow" else CLASSES[name](guidance=fx["guidance"])
    method.num_classes = 3
    net = TinyNet(fx["weights"])
    for nfe, want in fx["outputs"].items():
        with torch.no_grad():
            got = method.sample(net, fx["inputs"]["noise"], nfe, y=fx["inputs"]["y"])
        torch.testing.assert_close(got, want, **F64)


def test_fixtures_name_their_source():
    for name in CLASSES:
        prov = load(name)["provenance"]
        assert len(prov["commit"]) == 40 and prov["repository"] and prov["file"] and prov["function"]
