"""Where the time of `python fid.py A B` goes, stage by stage, on folders of MNIST PNGs (28x28 gray).

Each stage is timed on its own, one after the other, so that no two overlap (in fid.py decoding and resizing run in
a thread pool while the network runs):
    start-up     `python -c "import fid"` in a fresh process (the interpreter, torch, numpy, PIL)
    weights      finding the Inception weights, reading the TorchScript file and folding batch norm
    decode       PNG -> uint8 RGB (PIL), per image
    resize       clean-fid's per-channel float32 bicubic resize to 299x299, per image, for all three channels of
                 the RGB decode and for the one channel that fid.py resizes when they are equal
    network      Inception forward per image at --batch-size, with torch's default threads and with one thread
    statistics   mean and covariance of the features
    Frechet      Tr((S1 S2)^{1/2}) of two 2048-d covariances: scipy.linalg.sqrtm of the product, and the two
                 symmetric eigendecompositions of fid.trace_sqrt_product on one thread and on torch's default
                 threads (numpy's multithreaded eigh too)
Then `python fid.py A B --no-cache` end to end, under cProfile, to check that the stages add up.

Usage:
    python benchmarks/profile_fid.py                 # 200 vs 200 digits of mnist5k (even / odd halves)
    python benchmarks/profile_fid.py --n 500 --batch-size 50
"""

import argparse
import cProfile
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import fid  # noqa: E402


def write_digits(folder, split, n):
    """The first n digits of mnist5k's `split` half as 28x28 gray PNGs."""
    folder.mkdir(parents=True)
    for i, im in enumerate(data.load("mnist5k", split=split)[:n].numpy()):
        Image.fromarray(im[0]).save(folder / f"{i:05d}.png")
    return folder


def per_item(fn, items):
    t = time.perf_counter()
    out = [fn(x) for x in items]
    return (time.perf_counter() - t) / len(items), out


def seconds(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="images per folder")
    p.add_argument("--batch-size", type=int, default=fid.default_batch_size("cpu"))
    p.add_argument("--net-images", type=int, default=50, help="images timed through the network per setting")
    args = p.parse_args()
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs; load average "
          f"{os.getloadavg()[0]:.1f} (other processes busy on the machine raise it)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    dt, _ = seconds(lambda: subprocess.run([sys.executable, "-c", "import fid"], env=env, check=True))
    print(f"start-up   : {dt:6.2f} s  (python -c 'import fid')")
    dt, net = seconds(lambda: fid.load_inception(None, "cpu"))
    print(f"weights    : {dt:6.2f} s  ({fid.resolve_weights().name}: read, map names, fold batch norm)")

    with tempfile.TemporaryDirectory() as tmp:
        a, b = write_digits(Path(tmp) / "a", "even", args.n), write_digits(Path(tmp) / "b", "odd", args.n)
        files = fid.list_images(a)
        dt, rgb = per_item(fid._read_image, files)
        print(f"decode     : {dt * 1e3:6.2f} ms per image (PNG -> RGB)")
        full = lambda im: np.stack([fid._resize_clean(c[None])[0] for c in im])  # noqa: E731  every channel
        dt3, _ = per_item(full, rgb)
        dt1, resized = per_item(fid._resize_clean, rgb)
        print(f"resize     : {dt3 * 1e3:6.2f} ms per image resizing all 3 channels, {dt1 * 1e3:.2f} ms resizing one "
              f"(fid.py, gray images)")
        x = fid._to_network_input(resized[:args.net_images], "clean", "cpu")
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            net(x[:2])  # oneDNN picks its kernels on the first call
            for t in sorted({threads, 1}, reverse=True):
                torch.set_num_threads(t)
                dt = 0.0
                for s in range(0, len(x), args.batch_size):
                    dt += seconds(lambda: net(x[s:s + args.batch_size]))[0]
                print(f"network    : {dt / len(x) * 1e3:6.1f} ms per image, batch {args.batch_size}, {t} thread(s)")
            torch.set_num_threads(threads)
        feats = np.random.default_rng(0).normal(size=(2 * args.n, fid.DIMS)).astype(np.float32)
        dt, (mu, s1) = seconds(lambda: fid.statistics_from_features(feats[:args.n]))
        _, (_, s2) = seconds(lambda: fid.statistics_from_features(feats[args.n:] * 1.1))
        print(f"statistics : {dt:6.2f} s  (mean, covariance of {args.n} x {fid.DIMS} features)")

        def eigen_route(eigh, eigvalsh):
            w, u = eigh(s1)
            r = (u * np.sqrt(np.clip(w, 0, None))) @ u.T
            return np.sqrt(np.clip(eigvalsh(r @ s2 @ r), 0, None)).sum()

        torch_eigh = lambda m: tuple(v.numpy() for v in torch.linalg.eigh(torch.from_numpy(m)))  # noqa: E731
        torch_eigvalsh = lambda m: torch.linalg.eigvalsh(torch.from_numpy(m)).numpy()  # noqa: E731
        runs = [("fid.trace_sqrt_product (torch, 1 thread)", lambda: fid.trace_sqrt_product(s1, s2)),
                (f"same route, torch, {threads} threads", lambda: eigen_route(torch_eigh, torch_eigvalsh)),
                ("same route, numpy (OpenBLAS threads)", lambda: eigen_route(np.linalg.eigh, np.linalg.eigvalsh)),
                ("scipy.linalg.sqrtm(S1 S2)", lambda: np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)]
        for name, fn in runs:
            dt, tr = seconds(fn)
            print(f"Frechet    : {dt:6.2f} s  {name}: trace {tr:.10g}")

        profile = cProfile.Profile()
        dt, _ = seconds(lambda: profile.runcall(fid.main, [str(a), str(b), "--no-cache"]))
        print(f"end to end : {dt:6.2f} s  fid.main([A, B, '--no-cache']) in this process (start-up excluded); "
              f"main thread's cumulative time by function:")
        stats = pstats.Stats(profile)
        wanted = {"load_inception": "weights", "_wrapped_call_impl": "network (all batches)",
                  "result": "waiting for decode + resize workers", "statistics_from_features": "statistics",
                  "trace_sqrt_product": "Frechet trace"}
        for (file, _, func), (_, _, _, cum, _) in stats.stats.items():
            if func in wanted and (func != "result" or "concurrent" in file) and (
                    func != "_wrapped_call_impl" or "module.py" in file):
                print(f"    {wanted[func]:38s} {cum:7.2f} s")


if __name__ == "__main__":
    main()
