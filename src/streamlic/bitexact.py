"""The bit-exactness harness: the QAT model in float64 against the integer model, layer by layer."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import topology
from .integer_model import IntegerModel
from .kinds import kind_of
from .params import require_integer_stage

if TYPE_CHECKING:
    from .model import StreamLIC

log = logging.getLogger(__name__)

# StreamLIC outputs compared with the integer model's coded quantities
_CODED = {"z_hat": "z_symbols", "symbols": "y_symbols", "pdf_index": "pdf_index"}


@dataclass
class LayerDiff:
    """Comparison of one layer's integers: QAT (float64) against the integer model."""

    name: str
    shape: tuple[int, ...]
    mismatches: int
    max_abs_diff: int
    max_off_grid: float = 0.0  # largest distance of a QAT value from the integer grid (should be ~0)


@dataclass
class BitExactReport:
    """Per-layer mismatch counts, in network order."""

    layers: list[LayerDiff] = field(default_factory=list)

    @property
    def first_mismatch(self) -> LayerDiff | None:
        return next((layer for layer in self.layers if layer.mismatches), None)

    @property
    def exact(self) -> bool:
        return self.first_mismatch is None

    @property
    def total_mismatches(self) -> int:
        return sum(layer.mismatches for layer in self.layers)

    def __getitem__(self, name: str) -> LayerDiff:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def format(self) -> str:
        lines = [f"{'layer':<24}{'shape':<22}{'mismatches':>11}{'max |diff|':>11}{'off grid':>10}"]
        for layer in self.layers:
            lines.append(f"{layer.name:<24}{str(list(layer.shape)):<22}{layer.mismatches:>11}"
                         f"{layer.max_abs_diff:>11}{layer.max_off_grid:>10.2g}")
        first = self.first_mismatch
        lines.append("bit-exact" if first is None else f"first differing layer: {first.name} "
                     f"({first.mismatches} integers, max |diff| {first.max_abs_diff})")
        return "\n".join(lines)

    __str__ = format


def _diff(name: str, qat: Tensor, ref: Tensor, off_grid: float = 0.0) -> LayerDiff:
    if qat.shape != ref.shape:
        raise ValueError(f"{name}: QAT shape {tuple(qat.shape)} differs from the integer model's {tuple(ref.shape)}")
    diff = (qat.to(torch.int64) - ref).abs()
    return LayerDiff(name, tuple(ref.shape), int((diff > 0).sum()), int(diff.max()) if diff.numel() else 0, off_grid)


def qat_integers(model: "StreamLIC", x: Tensor, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """Every layer's integers as the QAT model computes them (eval, in ``dtype``), by module name.

    Forward hooks read each layer's real output and divide it by its integer step; the
    row engine's layers, called once per latent row, are assembled over all rows. The coded
    quantities (``z_hat``, ``symbols``, ``pdf_index``) come from the model's outputs.
    Each value of the returned dict is ``(integers, max distance from the integer grid)``.
    """
    require_integer_stage(model, "qat_integers")
    qat = copy.deepcopy(model).cpu().to(dtype).eval()
    captured: dict[str, list[Tensor]] = {}
    hooks = []
    for spec in topology.layers(qat.model_cfg):
        integer_step = kind_of(spec).integer_step
        if integer_step is None:  # the layer only moves data
            continue

        def hook(mod, inputs, output, name=spec.path, integer_step=integer_step):
            captured.setdefault(name, []).append(output.detach() / integer_step(mod))

        hooks.append(qat.get_submodule(spec.path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = qat(x.cpu().to(dtype))
    finally:
        for handle in hooks:
            handle.remove()
    result = {}
    for name, chunks in captured.items():
        real = torch.cat(chunks, dim=2)
        rounded = torch.round(real)
        result[name] = (rounded, float((real - rounded).abs().max()))
    for ours, theirs in _CODED.items():
        result[ours] = (out[theirs].detach(), 0.0)
    return result


def compare_with_qat(model: "StreamLIC", x: Tensor, integer_model: IntegerModel | None = None,
                     dtype: torch.dtype = torch.float64) -> BitExactReport:
    """Run the QAT model (float64, eval) and the integer model on ``x`` and compare every layer.

    ``x`` [B, 3, H, W] in [0, 1] of any size is padded to a multiple of 64 first. The
    integer model defaults to ``IntegerModel.from_model(model)``. ``dtype=torch.float32``
    measures the training-precision forward instead.
    """
    x = topology.pad_to_multiple(x)
    integer_model = integer_model or IntegerModel.from_model(model)
    reference = integer_model.forward(x)
    qat = qat_integers(model, x, dtype)
    report = BitExactReport()
    for name, ref in reference.items():
        if name in qat:
            integers, off_grid = qat[name]
            report.layers.append(_diff(name, integers, ref, off_grid))
    first = report.first_mismatch
    if first is not None:
        log.info("QAT and integer model differ first at %s (%d integers)", first.name, first.mismatches)
    return report
