"""Cost of one training step of each fewstep.py method, side by side on the same network and batch.

A step is what fewstep.py's training loop does: method.loss (with the EMA network passed as `ema`), backward,
gradient clipping, AdamW step. Methods are timed in turn, round after round (rf, meanflow, imf, ..., rf, meanflow,
...), so that a change in the machine's load hits all of them alike, and the median per method is reported with
its ratio to rf's. Methods that learn from a teacher get a frozen copy of the network as `method.teacher` and
random (noise, image) pairs where they want them, which costs what a real teacher costs. On CUDA the loop runs
under bf16 autocast with channels_last, as fewstep.py trains there.

Usage:
    python benchmarks/bench_fewstep_step.py                                   # mnist preset, 28x28, batch 32, CPU
    python benchmarks/bench_fewstep_step.py --arch tiny --batch-size 64 --methods rf imf imf-fd   # JVP or not
    python benchmarks/bench_fewstep_step.py --arch challenge --image-size 64 --channels 3 --batch-size 64 --device cuda
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fewstep  # noqa: E402
import unet  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="mnist", choices=sorted(unet.PRESETS))
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5, help="timed steps per method (after one warm-up step each)")
    p.add_argument("--methods", nargs="+", default=list(fewstep.METHODS),
                   help="methods of fewstep.METHODS; meanflow-fd and imf-fd: their du/dt by a finite difference "
                        "(--jvp-fd-step 3e-3) instead of the JVP")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    kw = unet.preset_kwargs(args.arch, image_size=args.image_size, in_channels=args.channels, extra_cond=True)
    base = unet.UNetModel(**kw).to(device)
    with torch.no_grad():  # non-zero outputs, so that every branch of every loss does real work
        for prm in base.parameters():
            prm.add_(0.02 * torch.randn_like(prm))
    if cuda:
        base = base.to(memory_format=torch.channels_last)
    x1 = torch.rand(args.batch_size, args.channels, args.image_size, args.image_size, device=device) * 2 - 1
    x0 = torch.randn_like(x1)
    if cuda:
        x1, x0 = (t.contiguous(memory_format=torch.channels_last) for t in (x1, x0))

    runs = {}
    for name in args.methods:
        base_name, fd = (name[:-3], True) if name in ("meanflow-fd", "imf-fd") else (name, False)
        if base_name not in fewstep.METHODS:
            p.error(f"unknown method {name!r}; choose from {', '.join(fewstep.METHODS)}, meanflow-fd, imf-fd")
        method = fewstep.METHODS[base_name](**({"fd_step": 3e-3} if fd else {}))
        net = copy.deepcopy(base).train()
        ema = copy.deepcopy(base).eval().requires_grad_(False)
        if getattr(method, "teacher_methods", ()):
            method.teacher = copy.deepcopy(base).eval().requires_grad_(False)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        runs[name] = (method, net, ema, opt, [])

    def step(name):
        method, net, ema, opt, _ = runs[name]
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = method.loss(net, x1, x0=x0, ema=ema)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    skipped = {}
    for name in list(runs):  # warm-up (and a check that the method can be timed this way at all)
        try:
            step(name)
        except Exception as e:  # a method whose loss needs more than (net, x1, x0, ema, teacher)
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
            del runs[name]
    for _ in range(args.rounds):
        for name in runs:
            runs[name][4].append(step(name))

    print(f"torch {torch.__version__}, device {device}" + (f" ({torch.cuda.get_device_name(0)}, bf16 autocast, "
          "channels_last)" if cuda else f", {torch.get_num_threads()} threads") +
          f"; preset {args.arch} {args.channels}x{args.image_size}x{args.image_size}, "
          f"{unet.count_parameters(base):,} parameters, batch {args.batch_size}, median of {args.rounds} steps")
    ref = statistics.median(runs["rf"][4]) if "rf" in runs else None
    print(f"{'method':11s} {'s/step':>8s} {'it/s':>7s} {'x rf':>6s}")
    for name, (*_, times) in runs.items():
        med = statistics.median(times)
        print(f"{name:11s} {med:8.3f} {1 / med:7.2f} " + (f"{med / ref:6.2f}" if ref else "     -"))
    for name, why in skipped.items():
        print(f"{name:11s} not timed: {why}")


if __name__ == "__main__":
    main()
