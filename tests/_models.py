"""Tiny StreamLIC models trained briefly through the stages, and real photo crops, for tests.

Building a model takes a few seconds, so every (hardware, stage) model is built once per
test process and handed out as a deep copy. Other test modules (the codec's) may import
these helpers.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from omegaconf import OmegaConf

from streamlic import W8A8, W12A12, StreamLIC
from streamlic.config import HardwareConfig
from streamlic.images import demo_images
from streamlic.metrics import rate_distortion
from streamlic.stage import STAGES

# the tiny network of conf/model/tiny.yaml, the one definition the training tests compose too
TINY_MODEL = dict(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / "tiny.yaml"))
# half of the blocks: ctx1 keeps 9 of 18 per output group, ctx2 and ep 6 of 12
TINY_SPARSITY = {"density": 0.5}
LATENT_GAIN = 100.0
HYPER_GAIN = 8.0
# per-layer widths (docs/fixed-point.md, "Per-layer widths"): the transforms at 8 bits beside a 12-bit entropy
# path and latent grid; and the entropy path (so the latent grid) at 8 bits beside 12-bit transforms
MIXED = HardwareConfig(layers={"g_a": {"activation_bits": 8, "weight_bits": 8},
                               "g_s": {"activation_bits": 8, "weight_bits": 8}})
ENTROPY_AT_8 = HardwareConfig(layers={"entropy_parameters": {"activation_bits": 8, "weight_bits": 8}})
# the row engine (and so the latent grid) at 10 bits, the transforms at the global 12
ENGINE_AT_10 = HardwareConfig(layers={"context_prediction": {"activation_bits": 10},
                                      "entropy_parameters": {"activation_bits": 10}})
HARDWARE = {"w12a12": W12A12, "w8a8": W8A8, "mixed": MIXED, "entropy8": ENTROPY_AT_8, "engine10": ENGINE_AT_10}
STAGE_ORDER = STAGES
LAMBDA = 0.01  # rate-distortion trade-off of the test training loss (MSE on [0, 255] pixels)
CROP = 64


@functools.lru_cache(maxsize=None)
def _train_photos() -> tuple[torch.Tensor, ...]:
    return tuple(image for _, image in demo_images("train"))


def training_batches(steps: int, batch: int = 4, crop: int = CROP, seed: int = 0) -> list[torch.Tensor]:
    """Random ``crop x crop`` patches of the demo training photos."""
    photos = _train_photos()
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        patches = []
        for _ in range(batch):
            photo = photos[int(torch.randint(len(photos), (1,), generator=generator))]
            top = int(torch.randint(photo.shape[1] - crop + 1, (1,), generator=generator))
            left = int(torch.randint(photo.shape[2] - crop + 1, (1,), generator=generator))
            patches.append(photo[:, top:top + crop, left:left + crop])
        batches.append(torch.stack(patches))
    return batches


def rd_loss(model: StreamLIC, x: torch.Tensor) -> torch.Tensor:
    return rate_distortion(model(x), x, LAMBDA)["loss"]


def train_steps(model: StreamLIC, steps: int, lr: float = 1e-3, seed: int = 0) -> None:
    """A few Adam steps on the trainable parameters (enough to track activation ranges)."""
    model.train()
    params = [p for name, p in model.named_parameters() if p.requires_grad and not name.endswith("quantiles")]
    optimizer = torch.optim.Adam(params, lr=lr)
    for x in training_batches(steps, seed=seed):
        optimizer.zero_grad()
        loss = rd_loss(model, x) + model.aux_loss() + model.regularization_loss()
        loss.backward()
        optimizer.step()
    model.eval()


# optimizer steps and learning rate in each stage
STAGE_TRAINING = {"aun": (12, 1e-3), "mask": (3, 1e-3), "qat": (3, 1e-4), "fix_encoder": (2, 1e-4), "pdf": (2, 1e-2)}


def _advance(model: StreamLIC, stage: str, seed: int) -> None:
    """Enter ``stage`` from the stage before it and train a few steps there (the training noise seeded
    too, so the model does not depend on what the process ran before)."""
    torch.manual_seed(seed)
    model.enter_stage(stage)
    steps, lr = STAGE_TRAINING[stage]
    train_steps(model, steps, lr=lr, seed=seed)


@functools.lru_cache(maxsize=None)
def _cached_model(hardware: str, stage: str, model_cfg: tuple, sparsity_cfg: tuple) -> StreamLIC:
    index = STAGE_ORDER.index(stage)
    if index == 0:
        torch.manual_seed(0)
        model = StreamLIC(model=dict(model_cfg), hardware=HARDWARE[hardware], sparsity=dict(sparsity_cfg))
        with torch.no_grad():
            # a dozen steps cannot grow the latents, so start them wide: y spans several symbols,
            # z a few dozen, and the scale index many levels
            model.g_a[-1].weight.mul_(LATENT_GAIN)
            model.h_a[-1].weight.mul_(HYPER_GAIN)
    else:
        model = copy.deepcopy(_cached_model(hardware, STAGE_ORDER[index - 1], model_cfg, sparsity_cfg))
    _advance(model, stage, seed=index)
    return model


def tiny_model(hardware: str = "w12a12", stage: str = "qat", model: dict | None = None,
               sparsity: dict | None = None) -> StreamLIC:
    """A tiny model briefly trained through every stage up to and including ``stage`` (eval mode)."""
    model_cfg = tuple(sorted((model or TINY_MODEL).items()))
    sparsity_cfg = tuple(sorted((TINY_SPARSITY if sparsity is None else sparsity).items()))
    return copy.deepcopy(_cached_model(hardware, stage, model_cfg, sparsity_cfg)).eval()


def saturating_tiny_model(hardware: str = "w12a12") -> StreamLIC:
    """The tiny model with ctx2's weights made large before QAT, so that every row-engine clamp can act.

    A briefly trained ctx2 cannot leave +-127 of its +-2047 range whatever its input; the
    corner-case golden vectors need a model whose ctx2 can saturate.
    """
    model = tiny_model(hardware, "mask")
    with torch.no_grad():
        model.sparse_layers()["ctx2"].weight.mul_(40)
    model.toggle_quantization(True)
    return model


def photo(name: str, height: int, width: int) -> torch.Tensor:
    """A centre crop ``[1, 3, height, width]`` of a demo photo (test split first)."""
    images = dict(demo_images())
    image = images[name]
    top = (image.shape[1] - height) // 2
    left = (image.shape[2] - width) // 2
    if top < 0 or left < 0:
        raise ValueError(f"demo photo {name} ({tuple(image.shape[1:])}) is smaller than {height}x{width}")
    return image[None, :, top:top + height, left:left + width].contiguous()


# Three real photos of different sizes: one a multiple of 64, two that need padding.
TEST_PHOTOS = (("chelsea", 192, 256), ("rocket", 150, 200), ("coffee", 100, 130))


def sample_photos() -> list[tuple[str, torch.Tensor]]:
    return [(f"{name}-{h}x{w}", photo(name, h, w)) for name, h, w in TEST_PHOTOS]
