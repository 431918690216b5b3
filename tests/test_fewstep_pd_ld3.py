"""Tests for fewstep.py's pd (progressive distillation) and ld3 (learned time grids).

pd: on a hand-built teacher v(x, t) = cos(3t) x + t^2 the loss's target is the student velocity whose one step of
1/N lands where two teacher Euler steps of 1/(2N) land (computed here by hand); on 1-D Gaussian data (the exact
velocity of tests/test_fewstep.py as teacher, an affine GaussNet as student) every round's student reproduces the
teacher's 2N-step Euler map, and a wrong midpoint in the target fails that test.
ld3: its time points are ordered inside [0, 1] for any parameters; on Gaussian data its learned two-step grid is the
minimiser found by brute force over t_1 with a hand-written Euler solver; the slack only moves noises inside their
ball and only where that helps.
Both on mnist5k (tiny preset): falling loss, exact NFE, resume bit for bit, bad input as one line.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn

import fewstep
from fewstep import LD3, ProgressiveDistillation
from test_fewstep import (M, S, ExactVelocityNet, GaussNet, assert_refused, exact_velocity, grid_x,  # noqa: F401
                          losses, one_thread)

TINY = ["--data", "mnist5k", "--arch", "tiny", "--batch-size", "16", "--lr", "1e-4", "--warmup", "0",
        "--num-samples", "8", "--no-fid"]


# ---------------------------------------------------------------------------------------------------------------
# pd
# ---------------------------------------------------------------------------------------------------------------
def hand_teacher_velocity(x, t):
    return torch.cos(3 * t) * x + t ** 2


class HandTeacher(nn.Module):
    def forward(self, x, t, cond=None):
        return hand_teacher_velocity(x, fewstep.expand_t(t / 1000, x))


class TwoStepOracle(nn.Module):
    """The student that is exactly right for N steps: two Euler steps of the hand teacher, written out by hand,
    divided by the student's step 1/N. It also checks that the loss asks only at the student's grid points i / N."""

    def __init__(self, n):
        super().__init__()
        self.n, self.seen = n, set()

    def forward(self, x, t, cond=None):
        t = t / 1000
        assert torch.allclose(t * self.n, torch.round(t * self.n), atol=1e-4), t
        self.seen |= set(torch.round(t * self.n).long().tolist())
        t, h = t[:, None], 1 / (2 * self.n)
        x_half = x + h * (torch.cos(3 * t) * x + t ** 2)
        x_full = x_half + h * (torch.cos(3 * (t + h)) * x_half + (t + h) ** 2)
        return (x_full - x) * self.n


def test_pd_target_is_two_teacher_euler_steps_of_a_hand_built_teacher():
    """In every round the oracle of that round's N has loss 0 at all grid points, and the oracle of another N
    (or a student that copies the teacher's one step of 1/N) does not."""
    method = ProgressiveDistillation(start_steps=8, round_steps=10)
    method.teacher = HandTeacher()
    x1 = 1.0 + torch.randn(512, 1)
    for r, n in enumerate(method.rounds):
        method.round = r  # the round, as on_step sets it
        oracle = TwoStepOracle(n)
        assert method.loss(oracle, x1).item() < 1e-10
        assert oracle.seen == set(range(n))  # t = 0, 1/N, ..., (N - 1)/N, all of them
        assert method.loss(TwoStepOracle(2 * n), x1).item() > 1e-4
        assert method.loss(HandTeacher(), x1).item() > 1e-4  # one teacher step of 1/N is not two of 1/(2N)


def test_pd_round_change_keeps_the_student_makes_it_the_teacher_and_restarts_from_it():
    method = ProgressiveDistillation(start_steps=4, round_steps=5)  # rounds N = 2, 1
    first = HandTeacher()
    method.teacher = first
    torch.manual_seed(0)
    net, ema = GaussNet(), GaussNet()
    method.on_step(0, net, ema)
    assert method.teacher is first and method.rounds[method.round] == 2
    method.on_step(4, net, ema)
    assert method.round == 0 and method.students == {}
    method.on_step(5, net, ema)  # round 1 ended: its student is the EMA
    assert method.rounds[method.round] == 1 and list(method.students) == ["2"]
    x, t = torch.randn(7, 1), torch.full((7,), 300.0)
    with torch.no_grad():
        before = ema(x, t)
        torch.testing.assert_close(method.teacher(x, t), before)
        torch.testing.assert_close(net(x, t), before)  # the new student starts from its teacher
        torch.testing.assert_close(method.sampling_net(2, ema)(x, t), before)
        for p in ema.parameters():
            p.add_(1.0)
        torch.testing.assert_close(method.teacher(x, t), before)  # a frozen copy, not the moving EMA
        assert method.sampling_net(1, ema) is ema  # the running round samples with the EMA
    assert not any(p.requires_grad for p in method.teacher.parameters())


def fit_pd(method, batch=512, lr=1e-2, seed=0):
    """Train a GaussNet student with pd's loss, calling on_step as the training loop does (EMA 0.99)."""
    torch.manual_seed(seed)
    net = GaussNet()
    ema = GaussNet().requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for step in range(method.default_steps()):
        method.on_step(step, net, ema)
        loss = method.loss(net, M + S * torch.randn(batch, 1), ema=ema)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.mul_(0.99).add_(p, alpha=0.01)
    return ema


def pd_errors(method):
    """Max |student map - teacher's start_steps-step Euler map| per round, where x0 has its mass."""
    method.teacher = ExactVelocityNet()
    ema = fit_pd(method)
    x = grid_x(0.0)
    with torch.no_grad():
        teacher_map = x.clone()
        for k in range(method.start_steps):  # Euler of the exact velocity, written out here
            teacher_map = teacher_map + exact_velocity(teacher_map, k / method.start_steps) / method.start_steps
        return {n: (method.sample(method.sampling_net(n, ema), x, n) - teacher_map).abs().max().item()
                for n in method.rounds}, (teacher_map - (M + S * x)).abs().max().item()


def test_pd_one_step_student_equals_the_teachers_many_step_map_on_gaussian_data():
    """Rounds N = 4, 2, 1 from the exact velocity sampled with 8 Euler steps: every student's N-step map is the
    teacher's 8-step map (error <= 0.06 measured, 0.1 allowed), which is itself 0.22 away from the exact flow."""
    errors, euler_error = pd_errors(ProgressiveDistillation(start_steps=8, round_steps=400))
    assert euler_error > 0.15  # so matching the teacher's map is a sharper statement than matching the flow
    assert all(e < 0.1 for e in errors.values()), errors


class PDWithWrongMidpoint(ProgressiveDistillation):
    """A deliberate error: the second teacher step starts at x_t + (1/N) v instead of x_t + (1/(2N)) v."""

    def target(self, teacher, xt, t, n):
        h = 1.0 / (2 * n)
        x_mid = xt + 2 * h * self.velocity(teacher, xt, t)
        return (x_mid + h * self.velocity(teacher, x_mid, t + h) - xt) / (2 * h)


def test_pd_exactness_test_catches_a_wrong_midpoint_in_the_target():
    errors, _ = pd_errors(PDWithWrongMidpoint(start_steps=2, round_steps=400))  # one round, N = 1
    assert errors[1] > 0.3, errors


# ---------------------------------------------------------------------------------------------------------------
# ld3
# ---------------------------------------------------------------------------------------------------------------
def check_grid(method, n):
    t, s = (v.detach() for v in method.times(n))
    assert t[0] == 0 and t[-1] == 1 and bool((t[1:] > t[:-1]).all()), t
    gap = (t[1:] - t[:-1]).min()
    assert bool(((s - t[:-1]).abs() <= method.win_rate * gap + 1e-6).all()), (t, s)
    assert bool((s[1:] >= s[:-1]).all()) and bool((s >= 0).all()) and bool((s < 1).all()), s
    if not method.shift_first:
        assert s[0] == 0


@pytest.mark.parametrize("shift_first", [False, True])
def test_ld3_time_points_are_ordered_inside_the_unit_interval_for_any_parameters(shift_first):
    method = LD3(nfes=(1, 2, 4, 8), shift_first=shift_first)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        for p in method.grid.values():
            p.data = 3 * torch.randn(p.shape, generator=g)  # step sizes up to e^18 apart
        for n in method.nfes:
            check_grid(method, n)


def optimise_ld3(method, teacher, shape=(1,)):
    method.teacher = teacher
    opt = method.make_optimizer(GaussNet(), lr=None, weight_decay=None)  # its own rates
    trace = []
    for step in range(method.default_steps()):
        method.on_step(step, None, None)
        loss = method.loss(None, torch.zeros(2, *shape))
        opt.zero_grad()
        loss.backward()
        opt.step()
        trace.append(loss.item())
    return trace


def test_ld3_learns_the_best_two_step_grid_on_gaussian_data():
    """Without decoupling and slack, LD3's t_1 for NFE 2 is the brute-force minimiser (hand-written two-step Euler
    of the exact velocity against a hand-written 200-step Euler, over t_1 in [0.01, 0.99]); with the decoupled
    input the loss falls further, and the grid stays ordered."""
    method = LD3(nfes=(2,), num_pairs=256, batch_size=256, epochs=150, phase1_epochs=150, teacher_steps=200,
                 lr_time=0.05, win_rate=0.0, slack=0.0)
    trace = optimise_ld3(method, ExactVelocityNet())
    x0 = method.pairs["x0"]
    target = x0.clone()
    for k in range(200):
        target = target + exact_velocity(target, k / 200) / 200
    us = torch.linspace(0.01, 0.99, 981)
    brute = []
    for u in us:
        x_mid = x0 + u * exact_velocity(x0, 0.0)
        brute.append((x_mid + (1 - u) * exact_velocity(x_mid, u) - target).pow(2).mean().item())
    best = int(np.argmin(brute))
    t1 = method.times(2)[0][1].item()
    assert abs(t1 - us[best].item()) < 0.01, (t1, us[best].item())  # 0.667 both, measured
    assert trace[-1] < brute[490] - 0.02  # better than the uniform grid t_1 = 0.5 (0.054 vs 0.077)

    decoupled = LD3(nfes=(2,), num_pairs=256, batch_size=256, epochs=150, phase1_epochs=0, teacher_steps=200,
                    lr_time=0.05, lr_shift=0.5, win_rate=0.5, slack=0.0)
    trace = optimise_ld3(decoupled, ExactVelocityNet())
    assert trace[-1] < min(brute) / 2  # 0.008 measured: the decoupled input is worth more than the grid here
    check_grid(decoupled, 2)


def test_ld3_slack_moves_noises_inside_their_ball_and_only_where_that_helps():
    method = LD3(nfes=(1, 4), num_pairs=32, batch_size=8, epochs=4, teacher_steps=20, slack=0.05)
    optimise_ld3(method, HandTeacher(), shape=(1, 4, 4))  # D = 16 numbers per noise
    x0 = method.pairs["x0"]
    for n in method.nfes:
        moved = (method.latents[str(n)] - x0).flatten(1).norm(dim=1)
        assert moved.max() <= 0.05 * 16 / n ** 2 + 1e-6  # r = slack * D / n^2
        assert (moved > 0).any()
        with torch.no_grad():  # every moved noise is closer to its target than its original noise
            d_new = method.per_sample_distance(method.solve(HandTeacher(), method.latents[str(n)], n),
                                               method.pairs["x1"])
            d_old = method.per_sample_distance(method.solve(HandTeacher(), x0, n), method.pairs["x1"])
        # (the grid moved since each acceptance, so compare only a clear majority)
        assert (d_new[moved > 0] < d_old[moved > 0]).float().mean() > 0.5


# ---------------------------------------------------------------------------------------------------------------
# Training loop on mnist5k (tiny preset)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("rf")
    fewstep.main(["--method", "rf", *TINY, "--lr", "2e-3", "--steps", "40", "--out", str(out), "--nfe", "1"])
    return out


PD_ARGS = ["--method", "pd", "--pd-start-steps", "4", "--pd-round-steps", "10"]  # rounds N = 2, 1
LD3_ARGS = ["--method", "ld3", "--num-pairs", "4", "--ld3-batch", "4", "--teacher-steps", "8"]


def test_pd_trains_each_round_with_falling_loss_and_samples_with_its_students(tmp_path, teacher):
    result = fewstep.main([*PD_ARGS, *TINY, "--teacher", str(teacher), "--out", str(tmp_path), "--nfe", "1", "2"])
    loss = losses(tmp_path)
    assert len(loss) == 20
    for r in (loss[:10], loss[10:]):  # each round starts from its teacher and falls
        assert np.mean(r[:3]) > np.mean(r[-3:]), loss
    assert result["nfe_checked"] == {"1": 1, "2": 2}
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["step"] == 20 and list(state["method_state"]["students"]) == ["2"]
    for n in (1, 2):
        assert len(list((tmp_path / "samples" / f"nfe={n}").glob("*.png"))) == 8
    again = fewstep.main([*PD_ARGS, "--out", str(tmp_path), "--eval-only", "--nfe", "2", *TINY[-3:]])
    assert again["nfe_checked"] == {"2": 2}  # the saved round-1 student, from the checkpoint


def test_ld3_optimises_with_falling_loss_keeps_the_teacher_and_samples_at_nfe_1_2_4(tmp_path, teacher):
    result = fewstep.main([*LD3_ARGS, "--ld3-epochs", "12", *TINY, "--teacher", str(teacher),
                           "--out", str(tmp_path)])
    loss = losses(tmp_path)
    assert len(loss) == 12 and np.mean(loss[:3]) > np.mean(loss[-3:]), loss
    assert result["nfe_checked"] == {"1": 1, "2": 2, "4": 4}
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    teacher_ema = torch.load(teacher / "ckpt.pt", weights_only=True)["ema"]
    assert all(torch.equal(state["model"][k], teacher_ema[k]) for k in teacher_ema)  # no network was trained
    for k in teacher_ema:  # (the loop's EMA of an unchanged network moves by rounding only)
        torch.testing.assert_close(state["ema"][k], teacher_ema[k], rtol=0, atol=1e-6)
    method = LD3(**state["config"]["method_args"])
    method.load_state_dict(state["method_state"])
    for n in (2, 4):
        check_grid(method, n)
        assert not torch.allclose(method.times(n)[0], torch.linspace(0, 1, n + 1))  # it learned something


@pytest.mark.parametrize("args, stop", [(PD_ARGS + ["--pd-round-steps", "4"], 4),
                                        (LD3_ARGS + ["--ld3-epochs", "4", "--ld3-nfe", "1", "2"], 2)],
                         ids=["pd-at-round-boundary", "ld3"])
def test_resume_continues_pd_and_ld3_bit_for_bit(tmp_path, teacher, args, stop):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--nfe", "1", *args, *TINY, "--teacher", str(teacher)]  # ld3: --ld3-nfe 1 2 (--nfe's old name) wins
    total = "6" if "pd" in args else "4"  # pd: over the boundary at step 4; ld3: into phase 2 (step 2)
    fewstep.main([*common, "--steps", total, "--out", str(a)])
    fewstep.main([*common, "--steps", str(stop), "--out", str(b)])
    fewstep.main([*common, "--steps", total, "--out", str(b)])
    assert losses(a) == losses(b)
    sa, sb = (torch.load(p / "ckpt.pt", weights_only=True) for p in (a, b))
    for key in ("model", "ema"):
        assert all(torch.equal(sa[key][k], sb[key][k]) for k in sa[key])
    ma, mb = sa["method_state"], sb["method_state"]
    if "students" in ma:
        assert ma["students"].keys() == mb["students"].keys() == {"2"}
        assert all(torch.equal(ma["students"]["2"][k], mb["students"]["2"][k]) for k in ma["students"]["2"])
    else:
        assert all(torch.equal(ma["grid"][k], mb["grid"][k]) for k in ma["grid"])
        assert all(torch.equal(ma["latents"][k], mb["latents"][k]) for k in ma["latents"])


def test_bad_input_for_pd_and_ld3_is_one_line_and_writes_nothing(tmp_path, teacher, capsys):
    other = tmp_path / "shortcut"
    fewstep.main(["--method", "shortcut", *TINY, "--steps", "1", "--out", str(other), "--nfe", "1"])
    capsys.readouterr()
    x = tmp_path / "x"
    cases = [
        (["--method", "pd", "--teacher", str(teacher), "--nfe", "3"], "pd trains one student per round, N = 512"),
        (["--method", "pd", "--teacher", str(teacher), "--pd-start-steps", "4", "--nfe", "4"], "N = 2, 1"),
        (["--method", "pd", "--teacher", str(teacher), "--pd-start-steps", "12"],
         "--pd-start-steps 12: --pd-start-steps / --pd-end-steps must be a power of two"),
        (["--method", "pd", "--teacher", str(other)], "is a shortcut run; pd learns from a flow teacher"),
        (["--method", "pd"], "pd needs --teacher RUN_DIR"),
        (["--method", "ld3", "--teacher", str(teacher), "--nfe", "0"], "--nfe 0: NFEs must be integers >= 1"),
        (["--method", "ld3", "--teacher", str(other)], "is a shortcut run; ld3 learns from a flow teacher"),
    ]
    for args, message in cases:
        assert_refused([*args, *TINY, "--out", str(x)], message, capsys)
        assert not x.exists()
