"""Throughput of FID feature extraction (fid.py) in images per second, for later comparison across changes.

Measures fid.extract_features on N generated uint8 images of SIZE x SIZE (default 1,000 of 64x64, the CS492(C)
challenge setting): in memory, and from a folder of PNGs (decoding included). If clean-fid is importable and the
weights are TorchScript, its folder feature extraction (get_folder_features, mode "clean", its defaults
batch_size=32, num_workers=12) is timed on the same folder. One warm-up batch runs before each timing, so one-time
setup (weight loading, oneDNN kernel selection, TorchScript profiling runs) is excluded. Uses all CPU threads.

Usage:
    python benchmarks/bench_fid.py                         # 1,000 images of 64x64, clean mode
    python benchmarks/bench_fid.py --n 200 --mode legacy --device cuda
    FID_WEIGHTS=/path/inception-2015-12-05.pt python benchmarks/bench_fid.py
"""

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fid  # noqa: E402


def make_images(n, size, seed=0):
    """uint8 (n, 3, size, size): smooth random colour fields (bicubic-upsampled 8x8 noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g) * 255
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).round().clamp(0, 255).byte()


def timed(fn, n):
    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    return n / dt, dt


def cleanfid_extractor(weights, workdir):
    """clean-fid's InceptionV3W on our weights file, or None if clean-fid / a TorchScript file is not available."""
    if importlib.util.find_spec("cleanfid") is None:
        return None, "clean-fid not installed"
    if fid._read_weights(weights)[2] != "torchscript":
        return None, "clean-fid needs the TorchScript weights"
    from cleanfid.inception_torchscript import InceptionV3W
    script = torch.jit.load(str(weights))
    layers = script.layers if hasattr(script, "layers") else script.net.layers  # default_1.pt nests it in .net

    class Wrap(torch.nn.Module):  # clean-fid expects a file in a folder whose module has .layers
        def __init__(self):
            super().__init__()
            self.layers = layers

        def forward(self, x):
            return self.layers(x)

    torch.jit.save(torch.jit.script(Wrap()), str(Path(workdir) / "inception-2015-12-05.pt"))
    return InceptionV3W(str(workdir), download=False).eval(), "clean-fid 'clean' (get_folder_features)"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--mode", choices=fid.MODES, default="clean")
    p.add_argument("--batch-size", type=int, default=fid.DEFAULT_BATCH_SIZE)
    p.add_argument("--device", default="cpu")
    p.add_argument("--weights", default=None)
    p.add_argument("--no-cleanfid", action="store_true", help="skip the clean-fid comparison")
    args = p.parse_args()
    weights = fid.resolve_weights(args.weights)
    images = make_images(args.n, args.size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, device "
          f"{args.device}, {args.n} images {args.size}x{args.size}, mode {args.mode}, weights {weights.name}")
    extract = lambda items: fid.extract_features(items, args.mode, args.batch_size, args.device, weights)  # noqa
    extract(images[: args.batch_size])  # warm-up
    rate, dt = timed(lambda: extract(images), args.n)
    print(f"fid.py in memory      : {rate:7.2f} images/s ({dt:.1f} s)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i, im in enumerate(images.numpy()):
            Image.fromarray(im.transpose(1, 2, 0)).save(folder / f"{i:05d}.png")
        files = fid.list_images(folder)
        rate, dt = timed(lambda: extract(files), args.n)
        print(f"fid.py from PNG folder: {rate:7.2f} images/s ({dt:.1f} s)")
        if args.no_cleanfid or args.mode != "clean":
            return
        model, what = cleanfid_extractor(weights, tmp)
        if model is None:
            print(f"clean-fid: skipped ({what})")
            return
        from cleanfid.fid import get_folder_features
        run = lambda path: get_folder_features(str(path), model, num_workers=12, batch_size=32,  # noqa: E731
                                               device=torch.device(args.device), mode="clean", verbose=False)
        warm = Path(tmp) / "warm"
        warm.mkdir()
        for f in files[:32]:
            (warm / f.name).write_bytes(f.read_bytes())
        run(warm)
        rate_c, dt = timed(lambda: run(folder), args.n)
        print(f"{what}: {rate_c:7.2f} images/s ({dt:.1f} s); fid.py folder / clean-fid = {rate / rate_c:.2f}x")


if __name__ == "__main__":
    main()
