"""Run directories: user errors, device, atomic checkpoints, RNG state, config, metrics and plots.

Every script imports this module for what a command and its run directory need, so that each convention is defined
once: the errors a user can fix (UsageError and its kinds, printed by run_cli as one line with exit status 2; a full
disk or an I/O error is one of them, disk_error), a training loss that turned NaN or inf (NonFiniteLoss,
check_finite), the argparse validators of numeric options (positive_int, ...), --device, --out (check_out_dir, one
check for every script), --seed, and the files of a run, with the lock that keeps a second process out (RunLock).

Time convention: no time variable lives in this file.

Run directory (every training script: --device auto|cpu|cuda, --seed, --out RUN_DIR):
    config.json, ckpt.pt {"model", "ema", "optimizer", "step", "rng", "config"}, metrics.jsonl, loss.png, grids.
    Checkpoints are written atomically (save_checkpoint) and read with torch.load(weights_only=True)
    (load_checkpoint); rng_state() stores only tensors and numbers so that it loads under weights_only.

Imports only the standard library, numpy and torch (matplotlib inside plot_metrics): it never imports a script or
data.py, so any of them can import it.
"""

import argparse
import errno
import json
import math
import os
import random
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch


# ----------------------------------------------------------------------------------------------------------------
# Errors a user can fix, and how a command ends on them
# ----------------------------------------------------------------------------------------------------------------

class UsageError(ValueError):
    """A mistake in a command or its inputs that the user can fix: an unknown dataset or preset, a missing or foreign
    file, a folder that cannot be written. The message names the problem and the fix; run_cli prints it as one line
    and exits with status 2, without a traceback. Every other exception is a bug and keeps its traceback."""


class MissingFileError(UsageError, FileNotFoundError):
    """A file the user named (checkpoint, weights, statistics) does not exist."""


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint cannot be used: truncated, corrupt, not a checkpoint, holds objects weights_only refuses, or was
    written by another script (a flow-matching run given to a diffusion sampler)."""


class DeviceUnavailable(UsageError, RuntimeError):
    """--device names a device this machine or this torch build does not have."""


class RunDirError(UsageError, RuntimeError):
    """A file of a run cannot be written (a full disk, an I/O error) or read back (damaged), or another process is
    using the run directory. The message names the file and what to do; the last checkpoint is intact, so
    rerunning the command resumes from it."""


# errnos of a write that failed because of the disk, not of the program: said in one line (disk_error)
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS)


def disk_error(e, path=None):
    """A RunDirError for an OSError `e` of the disk (DISK_ERRNOS) while `path` was written, else None."""
    if not isinstance(e, OSError) or e.errno not in DISK_ERRNOS:
        return None
    path = path or e.filename
    fix = ("free space on that disk" if e.errno in (errno.ENOSPC, errno.EDQUOT) else
           "check the disk (dmesg)" if e.errno == errno.EIO else "make the file system writable")
    return RunDirError(f"cannot write {path or 'a file'} ({e.strerror}); the files written before it are intact: "
                       f"{fix} and rerun the command (a training run resumes from its last checkpoint)")


def remove_empty_made():
    """Remove the folders make_out_dir created that are still empty, innermost first (a refused command leaves
    nothing behind); a folder that holds anything stays."""
    while _MADE:
        try:
            _MADE.pop().rmdir()
        except OSError:  # not empty, or gone
            pass


class NonFiniteLoss(RuntimeError):
    """The training loss (or the weights) became NaN or inf. Training stops before the bad step reaches the
    optimiser, so the last checkpoint stays good; the message names it and what to change before resuming. run_cli
    prints it like a UsageError: the user can act on it, and its traceback would only point at the loss line."""


def check_finite(loss, step, ckpt_path, lr):
    """Raise NonFiniteLoss unless the scalar `loss` is finite; call it before loss.backward().

    :param loss: scalar tensor (or number) of one training step.
    :param step: the number of the step that computed `loss` (1-based: steps done before it + 1).
    :param ckpt_path: the run's checkpoint; the message names the step it holds ("none yet" if there is none).
    :param lr: the learning rate now, which the message suggests lowering.
    """
    loss = torch.as_tensor(loss).detach()
    if bool(torch.isfinite(loss).all()):
        return
    value = loss.item()
    path = Path(ckpt_path)
    saved = load_checkpoint(path)["step"] if path.exists() else "none yet"
    raise NonFiniteLoss(f"loss is {value} at step {step}: training stopped; the last good checkpoint {path} (step "
                        f"{saved}) is untouched. Lower --lr (now {lr}) or --grad-clip and rerun the command to resume "
                        f"from it.")


def run_cli(main, prog=None):
    """Call a script's main(); a UsageError (bad input the user can fix) or a NonFiniteLoss is printed as one line,
    "prog: error: ...", and exits with status 2 as argparse does for a bad option. Any other exception is a bug: it
    propagates with its traceback. Folders that make_out_dir made for this command and that stay empty are removed
    on a refusal."""
    _MADE.clear()  # only this command's folders
    try:
        return main()
    except USER_ERRORS as e:
        line = user_error_line(e)
        if line is None:
            raise
        print(f"{prog or Path(sys.argv[0]).name}: error: {line}", file=sys.stderr)
        remove_empty_made()
        raise SystemExit(2) from None


USER_ERRORS = (UsageError, NonFiniteLoss, OSError)  # what a command catches to print it in one line (user_error_line)


def user_error_line(e):
    """The one line a caught USER_ERRORS prints (its message, however it wraps), or None for an OSError that is not
    the disk's (disk_error): that one is a bug and is re-raised with its traceback."""
    if isinstance(e, OSError) and not isinstance(e, UsageError):
        e = disk_error(e)  # a full disk or an I/O error: the user's to fix
        if e is None:
            return None
    return " ".join(str(e).split())


# ----------------------------------------------------------------------------------------------------------------
# argparse validators (type=...): a bad value ends the command at parse time, before anything is written
# ----------------------------------------------------------------------------------------------------------------

def _number(cast, ok, expected, must):
    """An argparse type: cast(s) (int or float) that must satisfy ok and be finite; its errors name what was
    expected."""
    def check(s):
        try:
            x = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}") from None
        if not ok(x):  # NaN fails every comparison, so it is refused too
            raise argparse.ArgumentTypeError(f"must be {must}, got {x if cast is int else s}")
        if cast is float and math.isinf(x):  # no flag means anything by it (--lr inf: NaN weights after a step)
            raise argparse.ArgumentTypeError(f"must be a finite number, got {s}")
        return x
    return check


positive_int = _number(int, lambda n: n >= 1, "an integer >= 1", ">= 1")  # counts, sizes, step budgets
non_negative_int = _number(int, lambda n: n >= 0, "an integer >= 0", ">= 0")  # 0 = none or off (--num-samples 0)
positive_float = _number(float, lambda x: x > 0, "a number > 0", "> 0")  # learning rates, tolerances, minutes
non_negative_float = _number(float, lambda x: x >= 0, "a number >= 0", ">= 0")  # 0 = off (--grad-clip, eta)
share_arg = _number(float, lambda x: 0.0 <= x <= 1.0, "a share in [0, 1]", "a share in [0, 1]")  # both ends in
# [0, 1), 1 excluded: an EMA decay (1 would never move the average), sigma_min of a flow path
below_one_arg = _number(float, lambda x: 0.0 <= x < 1.0, "a number in [0, 1)", "in [0, 1)")
# --seed: numpy's range (np.random.seed refuses the rest), which torch's generators take too, times the scripts' offsets
seed_arg = _number(int, lambda n: 0 <= n < 2**32, "an integer in [0, 2**32)", "in [0, 2**32)")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with its errors in one line, like every other bad input ("prog: error: ...", status 2):
    argparse's own error() prints the whole usage first, a dozen lines for some scripts. Subcommands inherit it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (python {self.prog} --help lists the "
                     f"options)\n")


def check_image_size(size, halvings, net, typed=True):
    """Refuse an image size that a U-Net halving the image `halvings` times cannot take (the size must divide by
    2^halvings); the message names the sizes that work. typed: the size came from --image-size, not the data."""
    factor = 2 ** halvings
    if size % factor:
        lo = size - size % factor
        what = f"--image-size {size}" if typed else f"the data's {size}x{size} images"
        raise UsageError(f"{what}: {net} halves the image {halvings} times, so the size must be a multiple of "
                         f"{factor}: pass --image-size " + (f"{lo} or {lo + factor}" if lo else f"{factor}"))


# ----------------------------------------------------------------------------------------------------------------
# Device, output folder, seeds
# ----------------------------------------------------------------------------------------------------------------

def get_device(name="auto"):
    """torch.device for --device: auto picks cuda when available, else cpu. An explicit cuda without a GPU is an
    error rather than a silent fallback to the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists dozens of backends; ours names the three that make sense here
        raise DeviceUnavailable(f"unknown --device {name!r}; use auto, cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):  # mps, meta, xpu, ...: torch parses them; these scripts run on neither
        raise DeviceUnavailable(f"--device {name}: these scripts run on auto, cpu or cuda; use one of those")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(f"--device {name} was asked for, but torch.cuda.is_available() is False (no GPU or a "
                                f"CPU-only torch build); use --device cpu or --device auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DeviceUnavailable(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), numbered from "
                                f"0; use --device cuda or cuda:N with a smaller N")
    return device


def check_out_dir(path, option="--out"):
    """Refuse a `path` that cannot become a folder this process writes to, before anything runs; creates nothing.

    Caught: a regular file at the path or on its way (afile, afile/sub, /dev/null/x); a place where the file system
    makes no folder (/proc/x: permissions do not stop root, the file system does); a read-only file system; a full
    disk (a probe of a few KiB is written and fsynced in the nearest existing folder, then vanishes). Every refusal
    is one UsageError naming the path, the cause and the fix.
    :return: the path (expanduser).
    """
    path = Path(path).expanduser()
    there = path
    while not os.path.lexists(there) and there != there.parent:  # the nearest part of the path that exists
        there = there.parent
    if not there.is_dir():
        why = "it is a file" if there == path else f"{there} is a file, not a folder"
        raise UsageError(f"cannot write to {option} {path} ({why}); pass a folder you can write to")
    try:
        with tempfile.TemporaryFile(dir=there) as f:  # O_TMPFILE where supported: no name ever appears
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())  # a full disk may only say so here
    except OSError as e:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        where = f"{os.path.abspath(there)} takes no new files: " if there != path else ""
        raise UsageError(f"cannot write to {option} {path} ({where}{e.strerror or type(e).__name__}); "
                         + ("free space on that disk or pass a folder on another" if full
                            else "pass a folder you can write to")) from None
    return path


_MADE = []  # folders make_out_dir created in this process: run_cli removes those a refusal left empty


def make_out_dir(path, option="--out"):
    """check_out_dir, then create the folder `path` (and its parents): a typo, a read-only place or a full disk fails
    at once with a UsageError instead of after minutes of training or sampling. A refusal later in the same command
    (a missing dataset, a bad --device) then removes the folders made here if they are still empty (run_cli)."""
    path = check_out_dir(path, option)
    try:
        _MADE.extend(reversed([p for p in (path, *path.parents) if not p.exists()]))  # outermost first
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # what the probe cannot foresee: a name too long, a race with another process
        raise UsageError(f"cannot write to {option} {path} ({e.strerror or type(e).__name__}); "
                         f"pass a folder you can write to") from None
    return path


class RunLock:
    """An exclusive lock on the run directory `path` (which must exist), held until release() or the end of the
    process: a second process started on the same --out is refused in one line (RunDirError) instead of both
    writing one ckpt.pt. It is flock(2) on the folder itself, so no file is written, and the OS releases it
    however the process ends (an exception, a crash, SIGKILL). Where flock is missing (Windows) or the file system
    refuses it on a folder (some network file systems), there is no lock."""

    def __init__(self, path, option="--out"):
        self.fd = None
        try:
            import fcntl
            fd = os.open(path, os.O_RDONLY)
        except (ImportError, OSError):
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirError(f"{option} {path} is in use by another process (training or evaluating there); two "
                              f"processes writing one run would mix their checkpoints: wait for it to end, or pass "
                              f"another {option}") from None
        except OSError:
            os.close(fd)
            return
        self.fd = fd

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor of the open file releases the flock
            self.fd = None


def seed_everything(seed):
    """Seed python's random, numpy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds all CUDA devices


# ----------------------------------------------------------------------------------------------------------------
# Files of a run: atomic writes, checkpoints, RNG state
# ----------------------------------------------------------------------------------------------------------------

def write_atomic(path, write, mode="wb"):
    """Call write(f) on a temp file in path's directory, flush and fsync it, then os.replace it onto `path`.
    A crash at any moment leaves either the old complete file or the new complete file, never half of one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    except OSError as e:
        raise disk_error(e, path) or e
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        # torch.save reports a failed write of its zip writer as a RuntimeError; the OSError is its cause
        cause = e if isinstance(e, OSError) else e.__cause__ or e.__context__
        error = disk_error(cause, path) if not isinstance(e, UsageError) else None
        if error is not None:
            raise error from e
        raise
    try:  # make the rename itself durable (POSIX); not possible on every platform, and harmless to skip
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def save_checkpoint(path, state):
    """Write `state` with torch.save atomically (write_atomic)."""
    return write_atomic(path, lambda f: torch.save(state, f))


def load_checkpoint(path, map_location="cpu"):
    """torch.load(path, weights_only=True) with errors that name the file and say what to do."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} does not exist; check the path, or train a run first")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
            raise CheckpointError(f"{path} is not a torch checkpoint (torch.load: {type(e).__name__}); pass the "
                                  f"ckpt.pt of a run or a state dict saved with torch.save") from e
        if "weights_only" in str(e) or "Weights only" in str(e):
            raise CheckpointError(f"checkpoint {path} holds objects that torch.load(weights_only=True) refuses; "
                                  f"save only tensors, dicts, lists, numbers and strings ({e})") from e
        raise CheckpointError(f"{path} is not a torch checkpoint, or it is truncated or corrupt ({type(e).__name__}: "
                              f"{e}); pass the ckpt.pt of a run, or delete it to start over") from e
    if not isinstance(ckpt, dict):  # every checkpoint we read is a dict (a run's state or a raw state dict)
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict; pass the ckpt.pt of a run "
                              f"or a state dict")
    return ckpt


def check_run_method(ckpt, method, path, allow_raw=True):
    """Refuse the checkpoint of a run that another script trained (config["method"]), e.g. a flow-matching velocity
    net given to a diffusion sampler, which would sample noise without any error. Raw state dicts (no config) pass
    if allow_raw. Runs from before the scripts recorded their method are told apart by a key only one writes."""
    config = ckpt.get("config")
    if not isinstance(config, dict):
        if allow_raw:
            return
        raise CheckpointError(f"{path} is not the checkpoint of a run (it has no config); pass the ckpt.pt that "
                              f"a {method} training run wrote")
    found = config.get("method") or ("cfm" if "sigma_min" in config else "ddpm" if "diffusion" in config else None)
    if found != method:
        raise CheckpointError(f"{path} is the checkpoint of a {found or 'unknown'} run, not of a {method} run; "
                              f"use it with the script that trained it")


def rng_state():
    """RNG states of torch (CPU, CUDA), numpy and python as tensors/ints/floats, loadable with weights_only=True."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        # python's Mersenne Twister state: 624 words + position, all < 2**32, so int64 holds them exactly
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss_next},
    }


def set_rng_state(state):
    """Restore what rng_state() returned (tensors may come back on any device; they are moved to the CPU)."""
    torch.set_rng_state(state["torch"].cpu())
    if torch.cuda.is_available():
        for i, s in enumerate(state.get("cuda", [])[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].cpu().numpy().astype(np.uint32), int(npst["pos"]),
                         int(npst["has_gauss"]), float(npst["cached_gaussian"])))
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))


# ----------------------------------------------------------------------------------------------------------------
# config.json, metrics.jsonl and the loss plot
# ----------------------------------------------------------------------------------------------------------------

def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, (np.generic, np.ndarray)):
        return o.tolist()
    if isinstance(o, (Path, torch.device, torch.dtype)):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def write_config(out_dir, config):
    """Write out_dir/config.json (indented, atomically)."""
    text = json.dumps(config, indent=2, default=_json_default) + "\n"
    write_atomic(Path(out_dir) / "config.json", lambda f: f.write(text), mode="w")


def log_metrics(out_dir, record):
    """Append `record` (e.g. {"step": 100, "loss": 0.031}) as one JSON line to out_dir/metrics.jsonl."""
    out = Path(out_dir)
    line = json.dumps(record, default=_json_default) + "\n"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(line)
    except OSError as e:
        raise disk_error(e, out / "metrics.jsonl") or e


def read_metrics(out_dir):
    """Records of out_dir/metrics.jsonl; after a resume, a repeated step keeps its last record.

    A last line cut short (a process killed in the middle of appending it) is dropped: its step comes after the
    checkpoint, and a resume does it again. Any other line that is not a JSON record is a RunDirError naming it.
    """
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; log_metrics writes it during training")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path} cannot be read ({e}); delete it (only the loss curve is lost) and rerun") from None
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()
    records = []
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError as e:
            raise RunDirError(f"{path}, line {i}, is not a JSON record ({e.msg}): the file is damaged; delete that "
                              f"line, or the file (only the loss curve is lost), and rerun") from None
        if record is not None and not isinstance(record, dict):
            raise RunDirError(f"{path}, line {i}, is not a JSON record (a {type(record).__name__}): the file is "
                              f"damaged; delete that line, or the file (only the loss curve is lost), and rerun")
        if record is not None:
            records.append(record)
    if records and all("step" in r for r in records):
        # a run resumed from an older ckpt.pt logs its steps again; the newer record is the one that counts
        records = sorted({r["step"]: r for r in records}.values(), key=lambda r: r["step"])
    return records


def _smooth(y):
    """Trailing moving average over max(1, len/25) points: shows the trend through minibatch noise."""
    w = max(1, len(y) // 25)
    c = np.concatenate([[0.0], np.cumsum(y)])
    lo = np.maximum(np.arange(1, len(y) + 1) - w, 0)
    return (c[1:] - c[lo]) / (np.arange(1, len(y) + 1) - lo)


def log_scale_suits(y):
    """A log y-axis for a positive series that spans at least a factor of 10 (e.g. a loss falling from 1.9 to 0.1).

    A near-constant series (imf's adaptively weighted loss sits at 1 - 1e-5 by construction) stays linear: on a log
    axis inside one decade matplotlib labels every minor tick with the same rounded number.
    """
    y = np.asarray(y, dtype=float)
    return bool(len(y)) and bool((y > 0).all()) and y.max() >= 10 * y.min()


def plot_metrics(out_dir, keys=("loss",), path=None, labels=None):
    """Plot each key of metrics.jsonl against step (raw and smoothed; log y-scale where log_scale_suits), one panel
    per key present, titled labels[key] where given (what the number is).

    :return: path of the PNG (default out_dir/loss.png).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg, no display and no global pyplot state
    from matplotlib.figure import Figure

    records = read_metrics(out_dir)
    keys = [k for k in ([keys] if isinstance(keys, str) else keys) if any(k in r for r in records)]
    if not keys:
        raise ValueError(f"none of the asked keys appear in {Path(out_dir) / 'metrics.jsonl'}")
    fig = Figure(figsize=(6.4, 3.2 * len(keys)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(keys), 1, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys):
        pts = [(r.get("step", i), r[key]) for i, r in enumerate(records)
               if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        step = np.array([p[0] for p in pts], dtype=float)
        y = np.array([p[1] for p in pts], dtype=float)
        ax.plot(step, y, lw=0.8, alpha=0.35, label=key)
        ax.plot(step, _smooth(y), lw=1.6, label=f"{key} (smoothed)")
        if log_scale_suits(y):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        if key in (labels or {}):
            ax.set_title(labels[key], fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    path = Path(path) if path is not None else Path(out_dir) / "loss.png"
    fig.savefig(path, dpi=100)
    return path
