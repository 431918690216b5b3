"""How close few-step samplers come to their teacher's many-step ODE solution, on noises none of them trained on.

For a trained rf run (the teacher) and runs distilled from it (pd, ld3, reflow), draw --n fresh noises (a seed that
no run uses), integrate the teacher's ODE with --teacher-steps Euler steps, and print for each NFE the per-pixel
root-mean-square distance (images in [-1, 1]) to it of: the teacher's own uniform n-step Euler sampler, and each
distilled run's n-step sampler (pd: the student of that round; ld3: its learned grid). Printed, never asserted.

Usage:
    python benchmarks/distill_match.py --teacher runs/rf --runs runs/pd runs/ld3 --nfe 1 2 4 --n 500
"""
import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import fewstep  # noqa: E402
import trainer  # noqa: E402
import unet  # noqa: E402


def load(run):
    state, cfg = trainer.load_run(run)
    method = trainer.make_method(fewstep.METHODS, cfg["method"], cfg["method_args"])
    if "method_state" in state:
        method.load_state_dict(state["method_state"])
    net, _ = unet.from_checkpoint(state, weights="ema")
    return method, net.eval().requires_grad_(False), cfg


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--runs", nargs="+", required=True)
    p.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--teacher-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=987654)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    _, teacher, tcfg = load(args.teacher)
    u = tcfg["unet"]
    noise = torch.randn((args.n, u["in_channels"], u["image_size"], u["image_size"]),
                        generator=torch.Generator().manual_seed(args.seed))
    rf = fewstep.RectifiedFlow()

    def solve(method, net, n):
        return torch.cat([method.sample(net, c, n) for c in noise.split(250)])

    ref = solve(rf, teacher, args.teacher_steps)
    rms = lambda x: (x - ref).pow(2).mean().sqrt().item()  # noqa: E731
    runs = [(r, *load(r)[:2]) for r in args.runs]
    print(f"RMS distance to the teacher's {args.teacher_steps}-step Euler solution, {args.n} fresh noises")
    print(f"{'NFE':>4}  {'teacher, uniform Euler':>22}  " + "  ".join(f"{r:>22}" for r, _, _ in runs))
    for n in args.nfe:
        cells = []
        for _, method, net in runs:
            ok = trainer.supports(method, n)
            cells.append(f"{rms(solve(method, method.sampling_net(n, net), n)):22.4f}" if ok
                         else f"{'-':>22}")
        print(f"{n:>4}  {rms(solve(rf, teacher, n)):22.4f}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
