"""Class-conditional fewstep.py: labels bound to the batch's rows, label dropout, classifier-free guidance.

Known answers (derived here): two classes of 1-D Gaussian data, N(MU[y], S^2) with prior PI[y]. Given the class,
the rectified-flow velocity is test_fewstep.py's closed form with that mean; without it (the null label), the
velocity of the mixture is E[x1 - x0 | x_t] = sum_y p(y | x_t) v(x_t, t | y), p(y | x_t) proportional to
PI[y] N(x_t; t MU[y], sigma_t^2) with sigma_t^2 = (1 - t)^2 + t^2 S^2 the same for both classes. Guidance at scale
w is v_null + w (v_y - v_null).
"""
import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn as nn

import fewstep
import trainer
from fewstep import Conditioned, Guided, RectifiedFlow, expand_t
from test_fewstep import stationarity_z
from test_fewstep import one_thread  # noqa: F401  (autouse fixture: small MLPs on one thread)

MU, S, PI, K = torch.tensor([-1.0, 2.0]), 0.5, torch.tensor([0.3, 0.7]), 2


def sigma2(t):
    return (1 - t) ** 2 + t ** 2 * S ** 2


def class_velocity(x, t, m):
    return m + (t * S ** 2 - (1 - t)) / sigma2(t) * (x - t * m)


def mixture_velocity(x, t):
    logp = torch.stack([torch.log(PI[c]) - (x - t * MU[c]) ** 2 / (2 * sigma2(t)) for c in range(K)])
    w = torch.softmax(logp, 0)
    return sum(w[c] * class_velocity(x, t, MU[c]) for c in range(K))


class ExactClassNet(nn.Module):
    """net(x, 1000 t, y=y): the class's velocity for y in 0..K-1, the mixture's for the null label K."""

    def forward(self, x, t, cond=None, y=None):
        t = expand_t(t / 1000, x)
        m = MU[y.clamp(max=K - 1)][:, None]
        return torch.where((y == K)[:, None], mixture_velocity(x, t), class_velocity(x, t, m))


def test_guided_velocity_is_the_w_mixture_in_one_call_of_two_rows_per_image():
    x, t = torch.linspace(-2, 3, 8)[:, None], torch.full((8,), 400.0)
    y = torch.tensor([0, 1] * 4)
    counter = trainer.NFECounter(ExactClassNet())
    for w in (1.0, 2.5):
        counter.rows = 0
        v = Guided(counter, y, K, w)(x, t)
        tt = expand_t(t / 1000, x)
        v_c, v_u = class_velocity(x, tt, MU[y][:, None]), mixture_velocity(x, tt)
        torch.testing.assert_close(v, v_u + w * (v_c - v_u))
        assert counter.per_image(len(x)) == (1 if w == 1 else 2)  # w = 1 is the conditional net alone
    torch.testing.assert_close(Conditioned(ExactClassNet(), y, K).null()(x, t), mixture_velocity(x, tt))


def test_rf_with_label_dropout_is_stationary_at_the_exact_conditional_and_null_velocities():
    """rf's loss with labels and dropout 0.3: the exact net (class velocity for labels, mixture velocity for the
    null label) is a stationary point; a net that gives the null rows a class velocity is not."""
    method = RectifiedFlow()
    method.num_classes, method.label_dropout = K, 0.3

    def loss(net):
        y = (torch.rand(4096) < PI[1]).long()
        x1 = MU[y][:, None] + S * torch.randn(4096, 1)
        return method.loss(net, x1, y=y)

    assert stationarity_z(loss, ExactClassNet()) < 4

    class NullIsClassOne(ExactClassNet):
        def forward(self, x, t, cond=None, y=None):
            return super().forward(x, t, cond, y=y.clamp(max=K - 1))
    assert stationarity_z(loss, NullIsClassOne()) > 8


def test_guided_rf_counts_two_nfe_per_step_and_refuses_odd_nfes():
    method = RectifiedFlow(guidance=2.0)
    method.num_classes = K
    with pytest.raises(fewstep.UnsupportedNFE, match="even NFEs"):
        method.check_nfe(1)
    counter = trainer.NFECounter(ExactClassNet())
    y = torch.tensor([0, 1, 1, 0])
    method.sample(counter, torch.randn(4, 1), 4, y=y)
    assert counter.per_image(4) == 4


@pytest.mark.parametrize("name", ["cm", "scm"])
def test_consistency_from_scratch_refuses_guidance_that_only_a_teacher_gives(name, tmp_path, capsys):
    """cm and scm learn a guided field from a teacher's guided velocity; from scratch --guidance would change
    nothing, so it is refused in one line, before a run directory exists."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        trainer.main(fewstep.METHODS, ["--method", name, "--data", "mnist5k", "--class-cond", "--guidance", "2",
                                       "--arch", "tiny", "--steps", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith(f"fewstep.py: --guidance 2: {name} learns a guided field only from a "
                                                "teacher;") and "\n" not in err
    assert not out.exists()


def test_conditional_samples_of_the_exact_net_follow_their_class():
    """64 Euler steps of the exact conditional velocity: each class's samples pass a KS test against its own
    Gaussian (and fail against the other's)."""
    method = RectifiedFlow()
    method.num_classes = K
    for c in range(K):
        y = torch.full((2000,), c)
        with torch.no_grad():
            x = method.sample(ExactClassNet(), torch.randn(2000, 1, generator=torch.Generator().manual_seed(c)), 64,
                              y=y)
        assert scipy.stats.kstest(x[:, 0].numpy(), "norm", args=(float(MU[c]), S)).pvalue > 1e-3
        assert scipy.stats.kstest(x[:, 0].numpy(), "norm", args=(float(MU[1 - c]), S)).pvalue < 1e-6
    assert np.isfinite(x.numpy()).all()


class GuidedExactNet(nn.Module):
    """u(x, t, t) of the exact guided field: v(x | null) + w (v(x | y) - v(x | null)) for labels y, v(x | null) for
    the null label; t as given divided by t_scale. w: a fixed scale, or (with_input) 1 + w_in / t_scale from the
    network's guidance input (imf's)."""

    def __init__(self, w=1.0, t_scale=1.0, with_input=False):
        super().__init__()
        self.w, self.t_scale, self.with_input = w, t_scale, with_input

    def forward(self, x, t, cond=None, y=None, w=None):
        tt = expand_t(t / self.t_scale, x)
        v_u, v_c = mixture_velocity(x, tt), class_velocity(x, tt, MU[y.clamp(max=K - 1)][:, None])
        scale = 1 + expand_t(w, x) / self.t_scale if self.with_input else self.w
        return torch.where((y == K)[:, None], v_u, v_u + scale * (v_c - v_u))


class PerClass(nn.Module):
    """exact + a on class 0's rows + b on class 1's (the null rows unchanged): errors that depend on the label
    average out over the labels at each x, so the label-blind a + b x cannot see them."""

    def __init__(self, exact):
        super().__init__()
        self.exact, self.ab = exact, nn.Parameter(torch.zeros(2))

    def forward(self, x, t, cond=None, y=None, **kw):
        return self.exact(x, t, cond, y=y, **kw) + (self.ab[0] * (y == 0) + self.ab[1] * (y == 1))[:, None]


def labelled_batch(n=4096):
    y = (torch.rand(n) < PI[1]).long()
    return MU[y][:, None] + S * torch.randn(n, 1), y


def test_meanflow_guided_target_is_stationary_at_the_field_guided_at_w():
    """MeanFlow's guided target (omega, kappa) on s = t rows: the exact field guided at w = omega / (1 - kappa) is a
    stationary point of the loss; the field guided at omega (reading omega as the scale) is not."""
    method = fewstep.MeanFlow(ratio=0.0, adaptive_p=0.0, guidance=2.5, kappa=0.5)
    method.num_classes, method.label_dropout = K, 0.2

    def loss(net):
        x1, y = labelled_batch()
        return method.loss(net, x1, y=y)

    assert stationarity_z(loss, GuidedExactNet(2.5)) < 4
    assert stationarity_z(loss, GuidedExactNet(2.5), wrap=PerClass) < 4
    assert stationarity_z(loss, GuidedExactNet(2.5 * 0.5), wrap=PerClass) > 8


def test_imf_guidance_input_is_stationary_at_the_guided_field_of_every_w():
    """imf with the guidance scale as an input (w drawn log-uniform on [1, 8]): the net that returns the field
    guided at the w it is given is a stationary point; one that ignores its input (always w = 2) is not."""
    method = fewstep.ImprovedMeanFlow(ratio=0.0, adaptive_p=0.0, time_scale=1.0)
    method.num_classes, method.label_dropout = K, 0.2

    def loss(net):
        x1, y = labelled_batch()
        return method.loss(net, x1, y=y)

    exact = GuidedExactNet(with_input=True)
    assert stationarity_z(loss, exact) < 4 and stationarity_z(loss, exact, wrap=PerClass) < 4
    assert stationarity_z(loss, GuidedExactNet(2.0), wrap=PerClass) > 8


def test_imf_samples_at_the_chosen_guidance_in_one_nfe_per_step():
    """imf's sampler gives the network w = `guidance` as its input and calls it once per step."""
    method = fewstep.ImprovedMeanFlow(guidance=3.0, time_scale=1.0)
    method.num_classes = K
    counter = trainer.NFECounter(GuidedExactNet(with_input=True))
    y = torch.tensor([0, 1, 1, 0])
    x = method.sample(counter, torch.zeros(4, 1), 1, y=y)
    assert counter.per_image(4) == 1
    t0 = torch.zeros(4, 1)
    v_u, v_c = mixture_velocity(torch.zeros(4, 1), t0), class_velocity(torch.zeros(4, 1), t0, MU[y][:, None])
    torch.testing.assert_close(x, v_u + 3.0 * (v_c - v_u))  # one step of size 1 from x = 0 along u(0, 0, 1)


@pytest.mark.parametrize("name", ["cm", "scm", "ctm", "pd", "dmd2"])
def test_distillers_learn_the_teachers_conditional_velocity_at_scale_1_and_the_w_mixture_above(name):
    """What every distiller reads from its teacher (guided_teacher): at --guidance 1 the conditional velocity in one
    row per image, at w the closed-form w-mixture of the conditional and the null velocities in two."""
    x, t, y = torch.linspace(-2, 3, 6)[:, None], torch.full((6,), 300.0), torch.tensor([0, 1, 0, 1, 1, 0])
    tt = expand_t(t / 1000, x)
    v_c, v_u = class_velocity(x, tt, MU[y][:, None]), mixture_velocity(x, tt)
    for w in (1.0, 3.0):
        method = fewstep.METHODS[name](guidance=w)
        method.num_classes, method.teacher = K, trainer.NFECounter(ExactClassNet())
        torch.testing.assert_close(method.guided_teacher(y)(x, t), v_u + w * (v_c - v_u))
        assert method.teacher.per_image(len(x)) == (1 if w == 1 else 2)
