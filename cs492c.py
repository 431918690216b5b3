"""The CS492(C) challenge (KAIST Visual AI Group, Fall 2025): the course's U-Net and the submission export.

The challenge fixes the network: class UNet of src/network.py in the student's checkout of the course's base code,
forward(x, timestep, condition=None). `--net course:PATH` imports it from that checkout at run time (nothing of
it lives in this project) and trains it through CourseNet (cs492c_model.py), fed what unet.py is fed: timestep =
time_scale t and condition = time_scale times the second scalar. The course embeds timestep with GLIDE's
sinusoidal embedding, made for DDPM's integer steps 0..999, so [0, 1000] is the range its frequencies suit.

`--export-submission DIR` writes what the official sampling.py loads: custom_model.py (cs492c_model.py, a real
module of this project), fewstep.py verbatim (the methods; torch and numpy only), the course's src/*.py,
checkpoints/best_model.pt ({"state_dict": the EMA network}), checkpoints/model_config.json (every constructor
argument) and checkpoints/fewstep_export.json (where it came from). Before anything is written, the folder is
loaded and sampled in a fresh Python process, as the official loader does; it must give what fewstep's sampler
gives, with exactly NFE network calls. This module does not import trainer.py: the run is handed to it.

Time convention: fewstep.py's (t in [0, 1], t = 0 noise, t = 1 data).
"""
import ast
import hashlib
import importlib
import inspect
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import types

import torch

import cs492c_model
import rundir
import unet
from cs492c_model import CourseNet
from rundir import UsageError

CHALLENGE_NFES, CHALLENGE_SHAPE = (1, 2, 4), (3, 64, 64)  # what the official sampling.py draws


def to_uint8_course(x):
    """Float [-1, 1] -> uint8 exactly as the course's tensor_to_pil_image: round(clamp(x * 0.5 + 0.5, 0, 1) * 255)."""
    return ((x.float() * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def course_root(spec):
    """--net value -> the resolved checkout path of "course:PATH", or None for this project's unet.py ("unet")."""
    if spec in (None, "unet"):
        return None
    if not spec.startswith("course:") or not spec[len("course:"):]:
        raise UsageError(f"--net {spec}: use --net unet (unet.py, the default) or --net course:PATH (PATH: your "
                        f"checkout of the course's base code, the folder with src/network.py)")
    return str(pathlib.Path(spec[len("course:"):]).expanduser().resolve())


def course_unet_class(root):
    """The UNet class of ROOT/src/network.py, imported as a package of its own (its `from .module import ...`
    works, and no module called `src` of anything else is shadowed)."""
    src = pathlib.Path(root) / "src"
    if not (src / "network.py").is_file():
        raise UsageError(f"--net course:{root}: there is no src/network.py there; point it at your checkout of the "
                        f"course's base code (the folder that holds src/network.py and sampling.py)")
    package = "fewstep_course_" + hashlib.sha1(str(src).encode()).hexdigest()[:12]
    if package not in sys.modules:
        mod = types.ModuleType(package)
        mod.__path__ = [str(src)]  # a package without running src/__init__.py (empty in the course's code)
        sys.modules[package] = mod
    try:
        network = importlib.import_module(package + ".network")
    except Exception as e:  # the student's own file: say what broke in one line
        raise UsageError(f"--net course:{root}: importing src/network.py failed ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})")
    if not isinstance(getattr(network, "UNet", None), type):
        raise UsageError(f"--net course:{root}: src/network.py defines no class UNet")
    return network.UNet


def course_net_config(root, uses_cond):
    """{"course": root, "kwargs": every constructor argument}: the class's own defaults (the challenge's fixed
    hyperparameters), with use_additional_condition set where the method feeds a second scalar."""
    params = inspect.signature(course_unet_class(root)).parameters
    kwargs = {k: v.default for k, v in params.items() if v.default is not inspect.Parameter.empty}
    if "use_additional_condition" not in params or len(kwargs) != len(params):
        raise UsageError(f"--net course:{root}: src/network.py's UNet does not have the course's constructor "
                        f"(every argument with a default, use_additional_condition among them): {list(params)}")
    kwargs["use_additional_condition"] = bool(uses_cond)
    return {"course": str(root), "kwargs": json.loads(json.dumps(kwargs))}  # JSON values, as config.json keeps them


def course_net(spec):
    """The network of a --net course:PATH run from its config["net"]."""
    kwargs = spec["kwargs"]
    return CourseNet(course_unet_class(spec["course"])(**kwargs), kwargs["use_additional_condition"])


def ema_net(state):
    """The EMA network of a loaded run checkpoint, on the CPU: unet.py's, or the course's (--net course:PATH)."""
    cfg = state["config"]
    if not cfg.get("net"):
        return unet.from_checkpoint(state, weights="ema")[0]
    net = course_net(cfg["net"])
    unet.load_state_dict_checked(net, state["ema"])
    return net


def export_submission(out, state, method, dest, force, log=print):
    """Write the EMA weights of run `out` (its loaded ckpt.pt `state`, its `method` object) as a challenge
    submission into `dest` (see the module docstring). One-line UsageErrors, nothing written, for a run that is not
    the course's U-Net, an image shape or NFE the official sampling.py does not draw, a method whose sampling needs
    more than the network, a folder holding someone else's submission, or an export that fails its own check."""
    cfg, run = state["config"], str(pathlib.Path(out).resolve())
    if not cfg.get("net"):
        raise UsageError(f"--export-submission: {out} was trained on unet.py's preset {cfg['arch']}; the challenge "
                        f"requires the course's U-Net: train with --net course:PATH (PATH: your checkout)")
    root = pathlib.Path(cfg["net"]["course"])
    course_unet_class(root)  # the checkout is still where the run was trained from
    shape = (cfg["unet"]["in_channels"], cfg["unet"]["image_size"], cfg["unet"]["image_size"])
    if shape != CHALLENGE_SHAPE:
        raise UsageError(f"--export-submission: {out} was trained on {shape[0]}x{shape[1]}x{shape[2]} images; the "
                        f"official sampling.py draws 3x64x64: train with --image-size 64 --channels 3")
    bad = []
    for n in CHALLENGE_NFES:
        try:
            method.check_nfe(n)
        except ValueError as e:
            bad.append((n, e))
    if bad:  # the method's own reason names the option to change (not the run's whole option dict)
        raise UsageError(f"--export-submission: the {cfg['method']} run cannot sample at NFE "
                         f"{', '.join(str(n) for n, _ in bad)}, which the official sampling.py asks for (NFE 1, 2, 4): "
                         f"{bad[0][1]}")
    if method.state_for_sampling:  # pd's per-round students, ld3's grids (ctm's state is for training only)
        raise UsageError(f"--export-submission: {cfg['method']} samples with state of its own (a network per NFE or "
                        f"learned time grids, ckpt.pt's method_state), which a submission of one network and its "
                        f"config cannot carry yet; export a method whose sampling needs only the network")
    methods_file = pathlib.Path(inspect.getsourcefile(type(method)))
    if methods_file.name != "fewstep.py" or getattr(sys.modules[type(method).__module__], "METHODS", {}).get(
            cfg["method"]) is not type(method):
        raise UsageError(f"--export-submission: {cfg['method']} is {type(method).__qualname__} of "
                        f"{methods_file.name}, not fewstep.py's registered class; a submission ships fewstep.py "
                        f"verbatim and can only sample its methods")
    sources = {"fewstep.py": methods_file.read_bytes(), "custom_model.py": pathlib.Path(cs492c_model.__file__)
               .read_bytes()}
    for name, blob in sources.items():
        try:
            ast.parse(blob, feature_version=(3, 10))  # the TAs' environment: Python 3.10, torch 2.6
        except SyntaxError as e:
            raise UsageError(f"--export-submission: {name} needs Python newer than 3.10 (the TAs' environment): {e}")

    dest = pathlib.Path(dest)
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"--export-submission {dest}: that is a file; give a folder")
    marker = dest / "checkpoints" / "fewstep_export.json"
    try:
        ours = json.loads(marker.read_text()).get("run") if marker.is_file() else None
    except (ValueError, OSError):
        ours = None
    held = [p for p in (dest / "custom_model.py", dest / "checkpoints" / "best_model.pt",
                        dest / "checkpoints" / "model_config.json") if p.exists()]
    if held and ours != run and not force:
        raise UsageError(f"--export-submission {dest}: it already holds a different submission "
                        f"({held[0].relative_to(dest)}" + (f", exported from {ours}" if ours else "") +
                        "); choose another folder, or pass --force to replace it (nothing was written)")
    course_src = sorted((root / "src").glob("*.py"))
    for f in course_src:
        mine = dest / "src" / f.name
        if mine.exists() and mine.read_bytes() != f.read_bytes() and not force:
            raise UsageError(f"--export-submission {dest}: its src/{f.name} differs from {f}, the course code this run "
                            f"was trained with; choose another folder, or pass --force to replace it")

    files = dict(sources)
    files["checkpoints/model_config.json"] = (json.dumps(
        {"network": cfg["net"]["kwargs"], "method": cfg["method"], "method_args": cfg["method_args"],
         "num_train_timesteps": int(sys.modules[type(method).__module__].TIME_SCALE), "image_shape": list(shape)},
        indent=2) + "\n").encode()
    files["checkpoints/fewstep_export.json"] = (json.dumps(
        {"run": run, "step": state["step"], "method": cfg["method"], "course": str(root),
         "exported": time.strftime("%Y-%m-%d %H:%M:%S %Z")}, indent=2) + "\n").encode()
    weights = {k: v.detach().float().cpu().contiguous() for k, v in state["ema"].items()}
    with tempfile.TemporaryDirectory(prefix="fewstep-export-") as tmp:
        tmp = pathlib.Path(tmp)
        for name, blob in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(blob)
        torch.save({"state_dict": weights}, tmp / "checkpoints" / "best_model.pt")
        (tmp / "src").mkdir()
        for f in course_src:
            shutil.copyfile(f, tmp / "src" / f.name)
        check_export(tmp, method, state, CHALLENGE_NFES)
        files["checkpoints/best_model.pt"] = (tmp / "checkpoints" / "best_model.pt").read_bytes()
    for f in course_src:
        if not (dest / "src" / f.name).exists() or force:
            files[f"src/{f.name}"] = f.read_bytes()
    for name, blob in files.items():
        rundir.write_atomic(dest / name, lambda fh, blob=blob: fh.write(blob))
    log(f"submission: {dest} ({cfg['method']}, EMA weights of {out}/ckpt.pt at step {state['step']}); checked in a "
        f"fresh process: NFE {', '.join(map(str, CHALLENGE_NFES))} match fewstep's sampler, exact network calls. "
        + ("Sample it as the TAs do: " if (dest / "sampling.py").exists() else
           "Put the official sampling.py into it and sample it as the TAs do: ")
        + f"cd {dest} && python sampling.py --save_dir samples")
    return dest


def check_export(folder, method, state, nfes):
    """Sample the exported folder in a fresh process (custom_model.py run as a script, with only the folder on its
    path) and compare with method.sample on the run's EMA net from the same noise; a UsageError if it fails, differs
    or makes another number of network calls."""
    result = pathlib.Path(folder) / "check.pt"
    r = subprocess.run([sys.executable, "-E", "custom_model.py", str(result), *map(str, nfes)], cwd=folder,
                       capture_output=True, text=True)
    name = state["config"]["method"]
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise UsageError(f"--export-submission: {name} cannot be exported: the submission fails on its own "
                        f"({last[:200]}); its sample() may use only the network and the method's config()")
    got = torch.load(result, weights_only=True)
    net = ema_net(state).eval()
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    shape = (state["config"]["unet"]["in_channels"],) + (state["config"]["unet"]["image_size"],) * 2
    for nfe in nfes:
        calls.clear()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            want = method.sample(net, torch.randn((1, *shape)), nfe).clamp(-1, 1)
        x, n_calls = got[nfe]
        if n_calls != nfe or len(calls) != nfe or not torch.allclose(x, want, atol=1e-4, rtol=0):
            raise UsageError(f"--export-submission: {name} cannot be exported: at NFE {nfe} the submission made "
                            f"{n_calls} network calls and differs from fewstep's sampler by "
                            f"{(x - want).abs().max().item():.3g}; its sample() may use only the network and the "
                            f"method's config()")
