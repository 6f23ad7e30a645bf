"""Helpers the benchmark scripts share: the photo batch, the benchmark loss, the research code's model and stages.

Each script imports them from here (``bench/`` is put on ``sys.path``), never from another script.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
import types
from pathlib import Path

import torch

from streamlic.metrics import rate_distortion

BENCH_LAMBDA = 0.01  # the rate-distortion trade-off of every benchmark step (MSE, CompressAI's convention)


def photo_batch(batch: int, size: int, device: str) -> torch.Tensor:
    from streamlic.images import demo_images

    crops = []
    images = [image for _, image in demo_images("train")]
    for i in range(batch):
        image = images[i % len(images)]
        _, h, w = image.shape
        top, left = (i * 37) % (h - size), (i * 53) % (w - size)
        crops.append(image[:, top:top + size, left:left + size])
    return torch.stack(crops).to(device)


def eager_loss(model, x: torch.Tensor) -> torch.Tensor:
    return rate_distortion(model(x), x, BENCH_LAMBDA)["loss"]


def compiled_loss(mode: str | None = None):
    """The loss of the training module's compiled path (``module.compile=true``)."""
    from streamlic.lightning_module import CompiledForward, forward_and_loss

    step = CompiledForward(forward_and_loss, mode)
    return lambda model, x: step(model, x, x, BENCH_LAMBDA, "mse")[1]["loss"]


def load_research(path: str | Path):
    """Import ``StreamLIC_Q.py`` + ``qat_utils.py`` from ``path`` as one package.

    Its relative imports are resolved in a synthetic package whose ``base`` module is
    compressai's (``CompressionModel``, ``get_scale_table``).
    """
    import compressai.models.base

    path = Path(path)
    package = types.ModuleType("research_streamlic")
    package.__path__ = [str(path)]
    sys.modules["research_streamlic"] = package
    sys.modules["research_streamlic.base"] = compressai.models.base
    for name in ("qat_utils", "StreamLIC_Q"):
        spec = importlib.util.spec_from_file_location(f"research_streamlic.{name}", path / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["research_streamlic.StreamLIC_Q"].ARLiteSparse_Q


def enter_research_stage(model, stage: str) -> None:
    """The research code's calls for each stage transition (its prints are silenced)."""
    with contextlib.redirect_stdout(io.StringIO()):
        if stage == "mask":
            model.set_all_mask()
            model.toggle_mask(True)
        elif stage == "qat":
            model.toggle_quantization(True)
        elif stage == "fix_encoder":
            model.fix_encoder_flag(True)
        elif stage == "pdf":
            model.init_pdf_table()
            model.toggle_pdf_training_flag(True)
