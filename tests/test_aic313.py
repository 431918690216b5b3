"""The AIC313 FastGen (2026) export: a stand-in of the course's code (written here, with its constructor and call
signatures: Model(backbone), Model.load_checkpoint(path, evaluate_mode, device), sample(shape, *, device,
category), count_parameters over every registered parameter), a short class-conditional run exported, and the
folder loaded and sampled in a fresh process the way the course's evaluate.py does."""
import subprocess
import sys

import pytest
import torch

import aic313
import fewstep
from test_fewstep import assert_refused
from test_fewstep import one_thread  # noqa: F401

STANDIN_MODEL = '''
import torch
from torch import nn

from src.utils import count_parameters


class Model(nn.Module):
    """DO NOT MODIFY (stand-in)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def count_parameters(self):
        return count_parameters(self, trainable_only=False)

    def forward(self, x, timestep, **kwargs):
        return self.backbone(x, timestep, **kwargs)

    def sample(self, shape, *, device="cuda", category=None, **kwargs):
        raise NotImplementedError

    @classmethod
    def load_checkpoint(cls, checkpoint_path, evaluate_mode, device="cpu", **kwargs):
        model_class = {"one_nfe": model_one_nfe, "few_nfe": model_few_nfe}[evaluate_mode]
        model = model_class(device=device, **kwargs)
        checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=False)
        model.load_state_dict(checkpoint["state_dict"] if "state_dict" in checkpoint else checkpoint)
        return model.to(device).eval()


class model_one_nfe(Model):
    def __init__(self, device="cpu", **kwargs):
        raise NotImplementedError


class model_few_nfe(Model):
    def __init__(self, device="cpu", **kwargs):
        raise NotImplementedError
'''

STANDIN_UTILS = '''
def count_parameters(module, trainable_only=True):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
'''

EVALUATE_LIKE = '''
import sys
import torch
from model import Model

for mode, most in (("one_nfe", 1), ("few_nfe", 4)):
    model = Model.load_checkpoint(f"checkpoints/{mode}.ckpt", evaluate_mode=mode, device="cpu")
    assert model.count_parameters() <= 100_000_000
    rows = []
    model.backbone.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    category = torch.arange(3).repeat_interleave(2)
    x = model.sample((6, 3, 64, 64), device="cpu", category=category)
    assert x.shape == (6, 3, 64, 64) and float(x.abs().max()) <= 1, x.shape
    per_image = sum(rows) / 6
    assert (per_image == 1) if mode == "one_nfe" else (1 <= per_image <= most), (mode, per_image)
    print(mode, per_image, model.count_parameters())
'''


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    root = tmp_path_factory.mktemp("course")
    (root / "src").mkdir()
    (root / "src" / "__init__.py").write_text("")
    (root / "src" / "utils.py").write_text(STANDIN_UTILS)
    (root / "model.py").write_text(STANDIN_MODEL)
    return root


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    fewstep.main(["--method", "rf", "--data", "mnist5k", "--class-cond", "--image-size", "64", "--channels", "3",
                  "--arch", "tiny", "--batch-size", "8", "--steps", "3", "--out", str(out), "--nfe", "1", "4",
                  "--no-fid", "--samples-per-class", "1"])
    return out


def test_export_writes_what_the_course_loads_and_checks_it_in_a_fresh_process(course, labelled_run, tmp_path):
    dest = tmp_path / "team_01"
    fewstep.main(["--export-fastgen", str(dest), "--fastgen-course", str(course), "--out", str(labelled_run)])
    text = (dest / "model.py").read_text()
    assert text.startswith(STANDIN_MODEL.split("class model_one_nfe")[0].rstrip())  # Model unchanged
    assert "make_nfe_models(Model)" in text
    for name in ("aic313_model.py", "fewstep.py", "unet.py", "src/utils.py", "checkpoints/one_nfe.ckpt",
                 "checkpoints/few_nfe.ckpt", "checkpoints/fewstep_models.json"):
        assert (dest / name).exists(), name
    assert set(torch.load(dest / "checkpoints" / "one_nfe.ckpt", weights_only=True)) == {"state_dict"}
    (dest / "evaluate_like.py").write_text(EVALUATE_LIKE)
    r = subprocess.run([sys.executable, "-E", "evaluate_like.py"], cwd=dest, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[0:2] == ["one_nfe", "1.0"] and "few_nfe 4.0" in r.stdout


def test_export_refuses_bad_input_in_one_line_and_writes_nothing(course, labelled_run, tmp_path, capsys,
                                                                monkeypatch):
    dest = tmp_path / "x"
    base = ["--export-fastgen", str(dest), "--out", str(labelled_run)]
    assert_refused(base, "--fastgen-course", capsys)
    assert_refused([*base, "--fastgen-course", str(tmp_path)], "not a checkout", capsys)
    assert_refused([*base, "--fastgen-course", str(course), "--few-nfe", "5"], "at most four", capsys)
    monkeypatch.setattr(aic313, "MAX_PARAMETERS", 1000)
    assert_refused([*base, "--fastgen-course", str(course)], "over the course's cap", capsys)
    assert not dest.exists()
    unlabelled = tmp_path / "plain"
    fewstep.main(["--method", "rf", "--data", "mnist5k", "--image-size", "64", "--channels", "3", "--arch", "tiny",
                  "--batch-size", "8", "--steps", "1", "--out", str(unlabelled), "--nfe", "1", "--no-fid",
                  "--num-samples", "2"])
    capsys.readouterr()  # that run's progress bars
    monkeypatch.setattr(aic313, "MAX_PARAMETERS", 100_000_000)
    assert_refused(["--export-fastgen", str(dest), "--fastgen-course", str(course), "--out", str(unlabelled)],
                   "without class labels", capsys)
    assert not dest.exists()


def test_import_check_judges_the_submission_not_what_torch_pulls_in(tmp_path):
    # A CUDA wheel of torch imports `cuda` and `cython_runtime`, beside jax it imports `opt_einsum`: simulated
    # here as a baseline that holds them. They are the environment's, not the submission's, and must pass; a
    # module that only the shipped files import must not.
    loaded = ["torch", "numpy", "json", "cuda", "cython_runtime", "opt_einsum", "fewstep", "_abc", "pandas"]
    assert aic313.stray_imports(loaded, {"torch", "numpy", "cuda", "cython_runtime", "opt_einsum"}) == ["pandas"]
    assert aic313.stray_imports(loaded, {"torch"}) == ["cuda", "cython_runtime", "opt_einsum", "pandas"]
    # the real baseline of this interpreter: what `import torch` loads, whatever the wheel
    here = aic313.torch_imports(tmp_path)
    assert {"torch"} <= here and not {"fewstep", "unet", "matplotlib"} & here
    assert aic313.stray_imports(here, here) == []


def test_export_refuses_a_submission_that_imports_what_the_course_lacks(course, labelled_run, tmp_path, capsys):
    # the same stand-in, but its src/utils.py imports matplotlib (installed here, not imported by torch and not
    # among the course's requirements): the fresh-process check must name it and write nothing
    other = tmp_path / "course"
    (other / "src").mkdir(parents=True)
    (other / "src" / "__init__.py").write_text("")
    (other / "src" / "utils.py").write_text("import matplotlib\n" + STANDIN_UTILS)
    (other / "model.py").write_text(STANDIN_MODEL)
    dest = tmp_path / "team"
    assert_refused(["--export-fastgen", str(dest), "--fastgen-course", str(other), "--out", str(labelled_run)],
                   "matplotlib", capsys)
    assert not dest.exists()
