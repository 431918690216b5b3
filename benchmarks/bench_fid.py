"""FID of two image folders end to end, as a user runs it: `python fid.py A B` against clean-fid's
`compute_fid(A, B, mode="clean")`, each a fresh process timed by the wall clock (start-up, weights, decoding,
resizing, network, statistics and the Frechet distance), on the same folders and the same weights file.

A and B are the first --n digits of mnist5k's even and odd halves, written as 28x28 gray PNGs. The two tools run
in turn, A B A B ..., so that a change in the machine's load (a shared machine) hits both alike; the medians are
compared. fid.py runs with --no-cache (its folder-statistics cache would otherwise make a second run instant).
Each run reports its wall-clock time and its CPU time (user + system of the process and its threads): on a machine
that other jobs share, the wall clock measures the load as much as the tool, the CPU time mostly the tool.

clean-fid is not a dependency of this project and is timed only where it can be imported (add its location with
--cleanfid-path, e.g. after `pip install --no-deps --target /tmp/cleanfid clean-fid==0.1.35`). It imports
torchvision, for the ToTensor of its data loader and for the base classes of its (here unused) PyTorch Inception;
where no torchvision runs beside this torch (a CPU-only torch with PyPI's CUDA torchvision), the benchmark gives it
a stand-in package with exactly those names (STUB below), used for clean-fid's process only. clean-fid gets the
network of the same weights file through its own InceptionV3W class (the one its mode "clean" builds), from a
TorchScript copy that has the `layers` attribute InceptionV3W expects.

Usage:
    python benchmarks/bench_fid.py --cleanfid-path /tmp/cleanfid                 # 1,000 vs 1,000, 2 runs each
    python benchmarks/bench_fid.py --n 500 --repeats 3 --weights /path/inception-2015-12-05.pt
"""

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import fid  # noqa: E402

# A stand-in for the two torchvision names clean-fid touches in mode "clean": transforms.ToTensor (numpy HWC ->
# torch CHW, uint8 divided by 255, as torchvision's) and the Inception blocks its pytorch-fid port subclasses at
# import time (never instantiated here).
STUB = {
    "torchvision/__init__.py": "__version__ = '0.0+stub'\nfrom . import models, transforms\n",
    "torchvision/models/__init__.py": "from . import inception\n",
    "torchvision/models/inception.py": "import torch.nn as nn\n"
                                       "InceptionA = InceptionC = InceptionE = nn.Module\n",
    "torchvision/transforms.py": (
        "import torch\n\n\n"
        "class ToTensor:\n"
        "    def __call__(self, pic):\n"
        "        pic = pic[:, :, None] if pic.ndim == 2 else pic\n"
        "        img = torch.from_numpy(pic.transpose((2, 0, 1))).contiguous()\n"
        "        return img.float().div(255) if img.dtype == torch.uint8 else img\n"),
}

CLEANFID_RUN = """
import sys, torch
from cleanfid import fid
from cleanfid.inception_torchscript import InceptionV3W
model = InceptionV3W(sys.argv[3], download=False, resize_inside=False).eval()
score = fid.compute_fid(sys.argv[1], sys.argv[2], mode="clean", device=torch.device("cpu"),
                        custom_feat_extractor=model)
print(f"FID: {score:.6f}")
"""


def write_digits(folder, split, n):
    """The first n digits of mnist5k's `split` half as 28x28 gray PNGs."""
    folder.mkdir(parents=True)
    for i, im in enumerate(data.load("mnist5k", split=split)[:n].numpy()):
        Image.fromarray(im[0]).save(folder / f"{i:05d}.png")
    return folder


def cleanfid_env(cleanfid_path, workdir, weights):
    """Environment in which `import cleanfid` works, and the weights folder for InceptionV3W; None if it cannot."""
    paths = [p for p in (cleanfid_path, os.environ.get("PYTHONPATH")) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    probe = lambda: subprocess.run([sys.executable, "-c", "import cleanfid.fid"], env=env,  # noqa: E731
                                   capture_output=True, text=True)
    r = probe()
    if r.returncode != 0 and "torchvision" in r.stderr:
        stub = Path(workdir) / "torchvision-stub"
        for name, text in STUB.items():
            (stub / name).parent.mkdir(parents=True, exist_ok=True)
            (stub / name).write_text(text)
        env["PYTHONPATH"] = os.pathsep.join([str(stub)] + paths)
        r = probe()
        if r.returncode == 0:
            print("clean-fid: no usable torchvision here; clean-fid runs with the stand-in package STUB")
    if r.returncode != 0:
        return None, None, r.stderr.strip().splitlines()[-1]
    if fid._read_weights(weights)[2] != "torchscript":
        return None, None, "clean-fid needs the TorchScript weights (inception-2015-12-05.pt or default_1.pt)"
    script = torch.jit.load(str(weights))
    layers = script.layers if hasattr(script, "layers") else script.net.layers  # default_1.pt nests it in .net

    class Layers(torch.nn.Module):  # InceptionV3W reads <folder>/inception-2015-12-05.pt and uses its .layers
        def __init__(self):
            super().__init__()
            self.layers = layers

        def forward(self, x):
            return self.layers(x)

    folder = Path(workdir) / "cleanfid-weights"
    folder.mkdir()
    torch.jit.save(torch.jit.script(Layers()), str(folder / "inception-2015-12-05.pt"))
    return env, folder, None


def children_cpu_seconds():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed_run(cmd, env):
    """(wall-clock seconds, CPU seconds of the process and its threads, FID). CPU time is the work done, which a
    busy machine inflates far less than the wall clock, so both are reported."""
    t, c = time.perf_counter(), children_cpu_seconds()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt, cpu = time.perf_counter() - t, children_cpu_seconds() - c
    found = re.findall(r"FID: ([0-9.eE+-]+)", r.stdout)
    if r.returncode != 0 or not found:
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} ... failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return dt, cpu, float(found[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="images per folder")
    p.add_argument("--repeats", type=int, default=2, help="runs of each tool, interleaved")
    p.add_argument("--weights", default=None, help="TorchScript Inception weights (default: fid.resolve_weights)")
    p.add_argument("--cleanfid-path", default=None, help="folder to add to PYTHONPATH for clean-fid")
    args = p.parse_args()
    weights = fid.resolve_weights(args.weights)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start; "
          f"{args.n} vs {args.n} MNIST PNGs (28x28 gray), weights {weights}")
    with tempfile.TemporaryDirectory() as tmp:
        a = write_digits(Path(tmp) / "a", "even", args.n)
        b = write_digits(Path(tmp) / "b", "odd", args.n)
        env_c, wdir, why = cleanfid_env(args.cleanfid_path, tmp, weights)
        if env_c is None:
            print(f"clean-fid: skipped ({why})")
        tools = {"fid.py": ([sys.executable, str(ROOT / "fid.py"), str(a), str(b), "--no-cache", "--weights",
                             str(weights)], dict(os.environ))}
        if env_c is not None:
            tools["clean-fid"] = ([sys.executable, "-c", CLEANFID_RUN, str(a), str(b), str(wdir)], env_c)
        times, cpus, fids = ({t: [] for t in tools} for _ in range(3))
        for r in range(args.repeats):
            for name, (cmd, env) in tools.items():
                dt, cpu, value = timed_run(cmd, env)
                times[name].append(dt)
                cpus[name].append(cpu)
                fids[name].append(value)
                print(f"run {r + 1} {name:9s}: {dt:7.1f} s wall, {cpu:7.1f} s CPU  FID {value:.6f}  (load average "
                      f"{os.getloadavg()[0]:.1f})", flush=True)
    med = {t: statistics.median(v) for t, v in times.items()}
    med_cpu = {t: statistics.median(v) for t, v in cpus.items()}
    for t in tools:
        print(f"{t:9s}: median {med[t]:7.1f} s wall, {med_cpu[t]:7.1f} s CPU of {len(times[t])} runs, "
              f"FID {fids[t][-1]:.6f}")
    if "clean-fid" in tools:
        rel = abs(fids["fid.py"][-1] - fids["clean-fid"][-1]) / fids["clean-fid"][-1]
        print(f"clean-fid / fid.py = {med['clean-fid'] / med['fid.py']:.2f}x wall clock, "
              f"{med_cpu['clean-fid'] / med_cpu['fid.py']:.2f}x CPU time; FIDs differ by {rel:.1e} (relative)")


if __name__ == "__main__":
    main()
