"""The two models of an AIC313 FastGen (KAIST, 2026) submission, around fewstep.py: shipped next to the course's
model.py by `fewstep.py --export-fastgen`, which appends to that file (its Model class left as it is):

    from aic313_model import make_nfe_models  # fewstep.py --export-fastgen
    model_one_nfe, model_few_nfe = make_nfe_models(Model)

The course's evaluate.py then runs, unchanged:
    model = Model.load_checkpoint("checkpoints/one_nfe.ckpt", evaluate_mode="one_nfe", device=device)
    model.sample((B, 3, 64, 64), device=device, category=labels)      # [-1, 1]

Each class builds unet.py's network from checkpoints/fewstep_models.json (its constructor arguments, the method,
its options and the NFE), so that load_checkpoint can load {"state_dict": ...} strictly into it; the network is
the only registered module (the method is a plain object: no EMA copy, teacher or discriminator is counted).
`python aic313_model.py OUT.pt` loads both models the way evaluate.py does, samples 20 images of each of the
first classes with a forward hook counting network rows, and saves what it saw (used by the export's check).
Imports: torch, and fewstep.py and unet.py shipped beside it. Time convention: fewstep.py's.
"""
import json
import pathlib
import sys

import torch

import fewstep
import unet

HERE = pathlib.Path(__file__).resolve().parent
CONFIG = HERE / "checkpoints" / "fewstep_models.json"
MODES = ("one_nfe", "few_nfe")


def make_nfe_models(Model):
    """(model_one_nfe, model_few_nfe): subclasses of the course's Model, built from CONFIG."""

    class FewstepModel(Model):
        mode = None

        def __init__(self, device="cpu", **kwargs):
            cfg = json.loads(CONFIG.read_text())[self.mode]
            super().__init__(unet.UNetModel(**cfg["unet"]))
            self.method = fewstep.METHODS[cfg["method"]](**cfg["method_args"])
            self.method.num_classes = cfg["num_classes"]
            self.nfe = cfg["nfe"]
            self.to(device)

        def sample(self, shape, *, device="cuda", category=None, **kwargs):
            """`shape` images in [-1, 1] with exactly self.nfe network evaluations per image; category: (B,) class
            ids (None: the null label, unconditional)."""
            noise = torch.randn(shape, device=device)
            y = None if category is None or self.method.num_classes is None else category.to(device).long()
            with torch.no_grad():
                return self.method.sample(self.backbone, noise, self.nfe, y=y).clamp(-1, 1)

    class model_one_nfe(FewstepModel):  # noqa: N801 (the course's names)
        """fewstep.py's method at exactly one network evaluation."""
        mode = "one_nfe"

    class model_few_nfe(FewstepModel):  # noqa: N801
        """fewstep.py's method at the NFE of its config (at most four)."""
        mode = "few_nfe"

    return model_one_nfe, model_few_nfe


def check(result_path, per_class=2, classes=3):
    """Load both checkpoints as evaluate.py does and sample; save {mode: (params, rows per image, samples, the
    modules imported)}."""
    sys.path.insert(0, str(HERE))
    from model import Model  # the course's model.py with our two lines
    out = {}
    for mode in MODES:
        model = Model.load_checkpoint(str(HERE / "checkpoints" / f"{mode}.ckpt"), evaluate_mode=mode, device="cpu")
        rows = []
        model.backbone.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
        category = torch.arange(classes).repeat_interleave(per_class)
        torch.manual_seed(0)
        x = model.sample((len(category), 3, 64, 64), device="cpu", category=category)
        out[mode] = (model.count_parameters(), sum(rows) / len(category), x)
    out["modules"] = sorted({m.split(".")[0] for m in sys.modules})
    torch.save(out, result_path)


if __name__ == "__main__":
    check(sys.argv[1])
