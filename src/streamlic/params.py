"""A model's integers, the single definition of what the hardware holds (docs/export-format.md).

:func:`export_quantized_parameters` evaluates every quantized layer's ``integer_params()`` on a
float64 copy of the model (so rounding never depends on the training precision) and checks
each number against the hardware's formats. The integer model, the exporter and the codec all
start from this dict.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import fixedpoint as fxp
from . import topology
from .config import HardwareConfig
from .kinds import BIAS, FIELD_FORMATS, MULTIPLIER, SHIFT, kind_of

if TYPE_CHECKING:
    from .model import StreamLIC


class ExportError(ValueError):
    """The model cannot be exported as the hardware needs it (the message names the layer)."""


class StageError(ValueError):
    """A model is not at a stage where its integers are defined (QAT or later)."""


def require_integer_stage(model: StreamLIC, what: str) -> None:
    """Refuse a model whose scales were never frozen or whose quantization is off."""
    if not (model.scales_frozen and model.quantized):
        raise StageError(
            f"{what}: the model is at stage '{model.stage}' (quantization {'on' if model.quantized else 'off'}, "
            f"scales {'frozen' if model.scales_frozen else 'not frozen'}); integer parameters exist from stage 3 "
            "(QAT, toggle_quantization(True)) on — export a QAT-or-later checkpoint")


def export_quantized_parameters(model: StreamLIC) -> dict[str, dict[str, Tensor]]:
    """Every quantized layer's integers by module name, as the hardware holds them.

    Per convolution: ``weight``, ``bias``, ``scale_param``, ``scale_shift`` (int64), and for the
    block-sparse layers ``mask`` (1 where a weight belongs to an active block); per LAGC the
    keys of :meth:`streamlic.layers.LAGC.integer_params`; every layer also carries
    ``float_input_scale`` and ``float_output_scale`` (float64 scalars, the real value of one
    integer step). Raises :class:`~streamlic.fixedpoint.FixedPointError` naming the layer when
    a bias, multiplier or shift does not fit the hardware, and
    :class:`StageError` for a model before QAT.
    """
    require_integer_stage(model, "export_quantized_parameters")
    exact = copy.deepcopy(model).cpu().double()  # the float64 integers are the ones the harness checks
    params: dict[str, dict[str, Tensor]] = {}
    for spec in topology.layers(model.model_cfg):
        fields = kind_of(spec).fields
        if not fields:
            continue
        name, module = spec.path, exact.get_submodule(spec.path)
        layer = {key: _integers(name, key, value) for key, value in module.integer_params().items()}
        if set(layer) != set(fields):
            raise ExportError(f"{name}: integer_params() gives {sorted(layer)}, its kind {spec.kind} exports "
                              f"{sorted(fields)} (streamlic.kinds)")
        if "mask" in fields:
            # an unmasked layer uses every block
            layer["mask"] = layer["mask"] if module.masked else torch.ones_like(layer["mask"])
            _check_masked_weights(name, layer["weight"], layer["mask"])
        layer["float_input_scale"] = module.in_scale.detach().to(torch.float64).clone()
        layer["float_output_scale"] = module.out_scale.detach().to(torch.float64).clone()
        _check_ranges(name, layer, model.hw.for_layer(name))
        params[name] = layer
    return params


def research_parameter_dict(params: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, Tensor]]:
    """``params`` as the research code's ``export_quantized_parameters()`` returns them: int32 integers.

    The authors' hardware scripts (integer golden model, stream writer) load this dict as it
    is and compute in int64 from it; scales stay float64.
    """
    return {layer: {key: value.clone() if value.is_floating_point() else value.to(torch.int32)
                    for key, value in layer_params.items()}
            for layer, layer_params in params.items()}


def _integers(layer: str, key: str, value: Tensor) -> Tensor:
    value = value.detach().to(torch.float64)
    if not bool(torch.isfinite(value).all()) or not torch.equal(value, torch.round(value)):
        raise fxp.FixedPointError(f"{layer}: {key} holds values that are not integers")
    return value.to(torch.int64)


def _check_masked_weights(layer: str, weight: Tensor, mask: Tensor) -> None:
    outside = (weight != 0) & (mask == 0)
    if bool(outside.any()):
        raise ExportError(f"{layer}: {int(outside.sum())} nonzero weights lie outside the block mask")


def _check_ranges(layer: str, params: dict[str, Tensor], hw: HardwareConfig) -> None:
    """Every bias, multiplier and shift in its hardware range (which fields are which: streamlic.kinds)."""
    limits = {BIAS: (-hw.bias_max, hw.bias_max, f"the {hw.precision_bits}-bit range ±{hw.bias_max}"),
              MULTIPLIER: (1, hw.multiplier_max, f"[1, {hw.multiplier_max}] ({hw.multiplier_bits}-bit multiplier)"),
              SHIFT: (0, hw.shift_max, f"[0, {hw.shift_max}] ({hw.shift_bits}-bit shift)")}
    for key, value in params.items():
        if FIELD_FORMATS.get(key) not in limits:
            continue
        lo, hi, allowed = limits[FIELD_FORMATS[key]]
        bad = (value < lo) | (value > hi)
        if bool(bad.any()):
            channel = int(bad.nonzero()[0, 0])
            verb = "exceeds" if FIELD_FORMATS[key] == BIAS else "is outside"
            raise fxp.FixedPointError(f"{layer}: {key} {int(value[channel])} (channel {channel}) {verb} {allowed}")
