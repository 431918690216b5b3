"""Time the unet.py presets on this machine (not a test): forward ms/image, and forward+backward per batch.

Usage:
    python benchmarks/bench_unet.py                        # tiny and mnist, all CPU threads torch uses
    python benchmarks/bench_unet.py --presets mnist --batch 250 --threads 2
    python benchmarks/bench_unet.py --presets challenge --device cuda --batch 64
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import unet  # noqa: E402


def best_time(fn, repeats):
    """Best wall time and best process CPU time of `repeats` calls after one warm-up call (minimum: least noisy).

    On a shared machine the CPU time of a 1-thread run estimates the wall time on an idle core.
    """
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "mnist"], choices=list(unet.PRESETS))
    parser.add_argument("--batch", type=int, default=250, help="batch for the forward (sampling) timing")
    parser.add_argument("--train-batch", type=int, default=32, help="batch for the forward+backward timing")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, load average {load:.1f}")
    for name in args.presets:
        net = unet.create(name).to(device)
        cfg = unet.PRESETS[name]
        shape = (cfg["in_channels"], cfg["image_size"], cfg["image_size"])

        net.eval()
        x = torch.randn(args.batch, *shape, device=device)
        t = torch.randint(0, 1000, (args.batch,), device=device).float()
        with torch.no_grad():
            fwd = best_time(lambda: net(x, t), args.repeats)

        net.train()
        xb = torch.randn(args.train_batch, *shape, device=device)
        tb = torch.randint(0, 1000, (args.train_batch,), device=device).float()

        def step():
            net.zero_grad(set_to_none=True)
            net(xb, tb).square().mean().backward()

        train = best_time(step, args.repeats)
        print(f"{name:12s} {unet.count_parameters(net):>11,d} params | forward batch {args.batch}: "
              f"{1000 * fwd[0] / args.batch:.2f} ms/image (CPU time {1000 * fwd[1] / args.batch:.2f}) | "
              f"forward+backward batch {args.train_batch}: {1000 * train[0]:.0f} ms (CPU time {1000 * train[1]:.0f})",
              flush=True)


if __name__ == "__main__":
    main()
