"""The AIC313 FastGen challenge (KAIST Visual AI Group, 2026): the course's submission of two class-conditional
models, exported from fewstep.py runs.

The course scores `model_one_nfe` (exactly one network evaluation) and `model_few_nfe` (at most four) of its
model.py, each loaded by `Model.load_checkpoint(checkpoints/{one,few}_nfe.ckpt, evaluate_mode=...)`, sampled with
20 images of each of the 151 Pokemon classes and scored by clean-fid against the 3,020 validation images; each
model may register at most 100,000,000 parameters (frozen ones included). `fewstep.py --export-fastgen DIR
--fastgen-course PATH` writes, from a trained run for each (--one-nfe-run, --few-nfe-run; default --out for both):
    model.py                    the course's file (PATH/model.py) with its Model class unchanged, its two student
                                classes replaced by two lines that take them from aic313_model.py
    aic313_model.py fewstep.py unet.py   this project's modules, verbatim (torch only)
    src/*.py                    the course's, copied
    checkpoints/one_nfe.ckpt, few_nfe.ckpt   {"state_dict": the EMA network} (pd: the student of that NFE)
    checkpoints/fewstep_models.json          each model's network arguments, method, options and NFE
Before anything is written, the folder is loaded and sampled in a fresh process the way evaluate.py does: the
parameter count as the course counts it, network rows per image (1, and the few-NFE model's NFE <= 4), the output
shape and range, and that the shipped files import nothing outside the standard library, the course's
requirements and what `import torch` alone loads in the same environment (a CUDA wheel loads more than a CPU one).
Bad input (no checkout, a run without labels, a model over the cap, an NFE the method cannot do) is one line and
status 2, nothing written. This module does not import trainer.py.
"""
import json
import pathlib
import subprocess
import sys
import tempfile

import torch

import cs492c
import rundir
import unet
from rundir import UsageError

MAX_PARAMETERS, SHAPE = 100_000_000, (3, 64, 64)
SHIPPED = ("aic313_model.py", "fewstep.py", "unet.py")
# what a submission may import besides the standard library and itself: torch and the course's requirements
ALLOWED = {"torch", "torchvision", "numpy", "PIL", "scipy", "tqdm", "cleanfid", "kagglehub", "requests",
           "model", "src", "aic313_model", "fewstep", "unet", "typing_extensions", "torchgen", "sympy", "mpmath",
           "networkx", "jinja2", "markupsafe", "filelock", "fsspec", "packaging", "functorch", "triton"}
HOOK = ("\n\nfrom aic313_model import make_nfe_models  # fewstep.py --export-fastgen: the models around fewstep.py\n"
        "model_one_nfe, model_few_nfe = make_nfe_models(Model)\n")


def course_model_text(root):
    """The course's model.py up to its student classes (Model unchanged), with the two lines appended."""
    path = pathlib.Path(root).expanduser() / "model.py"
    text = path.read_text() if path.is_file() else ""
    cut = text.find("\nclass model_one_nfe(")
    if "class Model(" not in text or cut < 0 or not (path.parent / "src" / "utils.py").is_file():
        raise UsageError(f"--fastgen-course {root}: not a checkout of the course's code (model.py with class Model "
                        f"and class model_one_nfe, src/utils.py); clone "
                        f"https://github.com/KAIST-Visual-AI-Group/AIC313-Project-FastGen and pass its folder")
    return text[:cut].rstrip() + "\n" + HOOK


def model_entry(mode, out, state, method, nfe):
    """(fewstep_models.json entry, the network's weights) of one model: checks shape, labels, NFE and size."""
    cfg = state["config"]
    flag = f"--{mode.replace('_', '-')}-run {out}"
    if cfg.get("net"):
        raise UsageError(f"{flag}: a --net course:PATH run (the 2025 course's U-Net); the 2026 models are unet.py's")
    if not cfg.get("classes"):
        raise UsageError(f"{flag}: trained without class labels; the challenge samples by category: train with "
                        f"--data pokemon (class-conditional by default)")
    if (cfg["unet"]["in_channels"], cfg["unet"]["image_size"], cfg["unet"]["image_size"]) != SHAPE:
        raise UsageError(f"{flag}: trained on other than 3x64x64 images; the course samples 3x64x64")
    try:
        method.check_nfe(nfe)
    except ValueError as e:
        raise UsageError(f"{flag}: {cfg['method']} cannot sample at NFE {nfe} ({e})") from None
    if cfg["method"] == "ld3":
        raise UsageError(f"{flag}: ld3 samples with learned time grids that the submission's config cannot carry yet")
    method.load_state_dict(state.get("method_state") or method.state_dict())
    ema = cs492c.ema_net(state)
    net = method.sampling_net(nfe, ema)  # pd: the student of that NFE; the others: the EMA network
    count = unet.count_parameters(net)
    if count > MAX_PARAMETERS:
        raise UsageError(f"{flag}: the network has {count:,} parameters, over the course's cap of "
                         f"{MAX_PARAMETERS:,}; train a smaller --arch")
    entry = {"unet": cfg["unet"], "method": cfg["method"], "method_args": cfg["method_args"], "nfe": nfe,
             "num_classes": len(cfg["classes"]), "classes": cfg["classes"], "run": str(pathlib.Path(out).resolve()),
             "step": state["step"]}
    weights = {f"backbone.{k}": v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()}
    return entry, weights


def export_fastgen(runs, course, dest, force=False, log=print):
    """runs: {"one_nfe": (out, state, method, nfe), "few_nfe": (...)}; writes the submission into dest."""
    model_text = course_model_text(course)
    entries, weights = {}, {}
    for mode, (out, state, method, nfe) in runs.items():
        if mode == "few_nfe" and not 1 <= nfe <= 4:
            raise UsageError(f"--few-nfe {nfe}: the few-NFE model may use at most four evaluations")
        entries[mode], weights[mode] = model_entry(mode, out, state, method, 1 if mode == "one_nfe" else nfe)
    dest = pathlib.Path(dest)
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"--export-fastgen {dest}: that is a file; give a folder")
    marker = dest / "checkpoints" / "fewstep_models.json"
    held = [p for p in (dest / "checkpoints" / "one_nfe.ckpt", dest / "checkpoints" / "few_nfe.ckpt") if p.exists()]
    if held and not marker.exists() and not force:
        raise UsageError(f"--export-fastgen {dest}: it already holds checkpoints that fewstep.py did not write; "
                        f"choose another folder or pass --force (nothing was written)")
    here = pathlib.Path(__file__).resolve().parent
    files = {"model.py": model_text.encode(), "checkpoints/fewstep_models.json":
             (json.dumps(entries, indent=2) + "\n").encode()}
    files.update({name: (here / name).read_bytes() for name in SHIPPED})
    files.update({f"src/{f.name}": f.read_bytes() for f in sorted((pathlib.Path(course).expanduser() / "src")
                                                                   .glob("*.py"))})
    with tempfile.TemporaryDirectory(prefix="fewstep-fastgen-") as tmp:
        tmp = pathlib.Path(tmp)
        for name, blob in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(blob)
        for mode in entries:
            torch.save({"state_dict": weights[mode]}, tmp / "checkpoints" / f"{mode}.ckpt")
        check(tmp, entries)
        for mode in entries:
            files[f"checkpoints/{mode}.ckpt"] = (tmp / "checkpoints" / f"{mode}.ckpt").read_bytes()
    for name, blob in files.items():
        rundir.write_atomic(dest / name, lambda fh, blob=blob: fh.write(blob))
    log(f"submission: {dest} (one_nfe: {entries['one_nfe']['method']}, few_nfe: {entries['few_nfe']['method']} at "
        f"NFE {entries['few_nfe']['nfe']}); checked in a fresh process as evaluate.py loads it. Score it: cd {dest} && "
        f"python evaluate.py --model_checkpoint ./checkpoints/one_nfe.ckpt --evaluate_mode one_nfe")
    return dest


def torch_imports(folder):
    """The top-level modules that `import torch` alone brings into a fresh process of this interpreter: what torch
    pulls in where it is installed (a CUDA wheel's `cuda` bindings, Cython's `cython_runtime`, `opt_einsum` beside
    jax), which the course's environment has as soon as it has torch, whatever the submission imports."""
    r = subprocess.run([sys.executable, "-E", "-c", "import sys, torch; print(*sorted(sys.modules))"], cwd=folder,
                       capture_output=True, text=True, check=True)
    return {m.split(".")[0] for m in r.stdout.split()}


def stray_imports(modules, baseline):
    """The top-level modules of `modules` (those loaded while the submission was loaded and sampled) that neither
    the standard library, nor `import torch` itself (baseline), nor the course's requirements (ALLOWED) account for:
    what the shipped files import that the course's environment may not have."""
    return sorted(m for m in set(modules) - set(baseline) - ALLOWED
                  if m not in sys.stdlib_module_names and not m.startswith("_"))


def check(folder, entries):
    """Load and sample the folder in a fresh process (aic313_model.py's check); a UsageError if anything is off."""
    result = pathlib.Path(folder) / "check.pt"
    r = subprocess.run([sys.executable, "-E", "aic313_model.py", str(result)], cwd=folder, capture_output=True,
                       text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise UsageError(f"--export-fastgen: the submission fails when loaded as evaluate.py loads it ({last[:200]})")
    got = torch.load(result, weights_only=False)
    for mode, entry in entries.items():
        params, per_image, x = got[mode]
        if params > MAX_PARAMETERS or per_image != entry["nfe"] or tuple(x.shape[1:]) != SHAPE \
                or not torch.isfinite(x).all() or x.abs().max() > 1:
            raise UsageError(f"--export-fastgen: {mode} fails the course's rules in a fresh process: {params:,} "
                            f"parameters, {per_image:g} network evaluations per image (want {entry['nfe']}), "
                            f"samples of shape {tuple(x.shape)} in [{x.min():.3g}, {x.max():.3g}]")
    stray = stray_imports(got["modules"], torch_imports(folder))
    if stray:
        raise UsageError(f"--export-fastgen: the submission imports {', '.join(stray)}, which the course's "
                        f"environment does not have")
