"""The CS492(C) submission's model: a fewstep.py method and the course's U-Net behind the course's interface.

`python fewstep.py --out RUN --export-submission DIR` copies this file into DIR as custom_model.py, next to
fewstep.py (verbatim: it needs only torch and numpy), the course's src/*.py and checkpoints/. The course's official
sampling.py then loads the submission as
    model = create_custom_model(device=device, **json.load(open("checkpoints/model_config.json")))
    model.load_state_dict(torch.load("checkpoints/best_model.pt")["state_dict"])
    model.sample((B, 3, 64, 64), num_inference_timesteps=nfe, verbose=False)   # [-1, 1], exactly nfe U-Net calls
Time convention (fewstep.py's): t in [0, 1], t = 0 noise, t = 1 data, x_t = (1 - t) x0 + t x1, sampling runs from
0 to 1. The U-Net of src/network.py (unmodified) is fed timestep = time_scale t and, where the method has a second
scalar, condition = time_scale times that scalar (the method's time_scale: 1000, or 1 for meanflow / imf).

Run as a script in a submission folder (`python custom_model.py OUT.pt 1 2 4`), it samples one image per NFE from
torch.manual_seed(0) and saves (image, network calls) per NFE: the export's fresh-process check.
"""
import json
import sys

import torch

try:  # the course's base classes, in a submission folder (src/ of the course's code)
    from src.base_model import BaseGenerativeModel, BaseScheduler
except ImportError:  # a checkout without them: the same interface, written here
    class BaseScheduler(torch.nn.Module):
        """Stand-in for the course's src/base_model.py BaseScheduler."""

        def __init__(self, num_train_timesteps=1000, **kwargs):
            super().__init__()
            self.num_train_timesteps = num_train_timesteps

    class BaseGenerativeModel(torch.nn.Module):
        """Stand-in for the course's src/base_model.py BaseGenerativeModel."""

        def __init__(self, network, scheduler, **kwargs):
            super().__init__()
            self.network, self.scheduler = network, scheduler

        @property
        def device(self):
            return next(self.network.parameters()).device


class CourseNet(torch.nn.Module):
    """The methods' call net(x, t, cond=None) on the course U-Net's forward(x, timestep, condition=None).

    The course network refuses a missing condition when built with use_additional_condition=True; cond None means
    0 here, as in unet.py. Its parameters are network.*, the keys of the course's BaseGenerativeModel.network."""

    def __init__(self, network, use_additional_condition=False):
        super().__init__()
        self.network, self.use_additional_condition = network, use_additional_condition

    def forward(self, x, t, cond=None):
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])  # (B,); a number means the same for every image
        if cond is None and self.use_additional_condition:
            cond = torch.zeros_like(t)
        elif cond is not None and not self.use_additional_condition:
            raise ValueError("cond was given but the course network was built with use_additional_condition=False")
        elif cond is not None:
            cond = torch.as_tensor(cond, device=x.device).expand(x.shape[0])
        return self.network(x, t, cond)


class FewstepScheduler(BaseScheduler):
    """fewstep.py's one path in the course's scheduler interface: x_t = (1 - t) x0 + t x1, velocity x1 - x0. The
    method's own loss and sample draw their times themselves."""

    def sample_timesteps(self, batch_size, device):
        return torch.rand(batch_size, device=device)

    def forward_process(self, data, noise, t):
        t = t.reshape(-1, *([1] * (data.dim() - 1)))
        return (1 - t) * noise + t * data

    def reverse_process_step(self, xt, pred, t, t_next):
        """One Euler step from t to t_next along pred (a velocity, or a shortcut step of size t_next - t)."""
        return xt + (t_next - t).reshape(-1, *([1] * (xt.dim() - 1))) * pred

    def get_target(self, data, noise, t):
        return data - noise


class FewstepModel(BaseGenerativeModel):
    """network: the course's U-Net, unmodified; method: the fewstep.py method object that samples with it."""

    def __init__(self, network, scheduler, method, use_additional_condition=False, image_shape=(3, 64, 64)):
        super().__init__(network, scheduler)
        self.method, self.use_additional_condition = method, use_additional_condition
        self.image_shape = tuple(image_shape)

    def net(self):
        """The network as the method calls it: net(x, time_scale t, cond=time_scale * second scalar)."""
        return CourseNet(self.network, self.use_additional_condition)

    def compute_loss(self, data, noise, **kwargs):
        """The method's training loss on data in [-1, 1] with noise as its partner."""
        return self.method.loss(self.net(), data, noise)

    def predict(self, xt, t, condition=None, **kwargs):
        """The network's output at t in [0, 1] (and second scalar `condition`, in the same units)."""
        scale = self.method.time_scale
        return self.net()(xt, scale * t, None if condition is None else scale * condition)

    @torch.no_grad()
    def sample(self, shape, num_inference_timesteps=4, return_traj=False, verbose=False, **kwargs):
        """shape (B, C, H, W) -> images in [-1, 1] from exactly num_inference_timesteps network evaluations."""
        if tuple(shape[1:]) != self.image_shape:
            raise ValueError(f"this model was trained on images of shape {self.image_shape}, not {tuple(shape[1:])}")
        self.method.check_nfe(num_inference_timesteps)
        noise = torch.randn(tuple(shape), device=self.device)  # x0 ~ N(0, I) at t = 0
        x = self.method.sample(self.net(), noise, num_inference_timesteps).clamp(-1, 1)
        return [noise, x] if return_traj else x


def create_custom_model(device="cpu", network=None, method=None, method_args=None, num_train_timesteps=1000,
                        image_shape=(3, 64, 64)):
    """What sampling.py calls, with checkpoints/model_config.json as keyword arguments."""
    import fewstep  # the copy shipped beside this file
    from src.network import UNet  # the course's U-Net, unmodified
    if method not in fewstep.METHODS:
        raise ValueError(f"model_config.json asks for method {method!r}; fewstep.py has {', '.join(fewstep.METHODS)}")
    if num_train_timesteps != fewstep.TIME_SCALE:
        raise ValueError(f"fewstep.py feeds the network {fewstep.TIME_SCALE:g} t, not {num_train_timesteps} t")
    model = FewstepModel(UNet(**network), FewstepScheduler(num_train_timesteps),
                         fewstep.METHODS[method](**(method_args or {})), network.get("use_additional_condition", False),
                         image_shape)
    return model.to(device)


def sample_once(result_path, nfes):
    """Load this folder as sampling.py does and save {nfe: (one image from torch.manual_seed(0), U-Net calls)}."""
    with open("checkpoints/model_config.json") as f:
        cfg = json.load(f)
    model = create_custom_model(device="cpu", **cfg)
    model.load_state_dict(torch.load("checkpoints/best_model.pt", map_location="cpu")["state_dict"])
    model.eval()
    calls = []
    model.network.register_forward_hook(lambda *a: calls.append(1))
    out = {}
    for nfe in nfes:
        calls.clear()
        torch.manual_seed(0)
        out[nfe] = (model.sample((1, *cfg["image_shape"]), num_inference_timesteps=nfe, verbose=False), len(calls))
    torch.save(out, result_path)


if __name__ == "__main__":
    sample_once(sys.argv[1], [int(n) for n in sys.argv[2:]])
