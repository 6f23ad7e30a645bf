"""Exports of a QAT-or-later StreamLIC for hardware (DESIGN §6), and ``streamlic export``.

:func:`export_quantized_parameters` is the single definition of a model's integers: every
quantized layer's ``integer_params()`` evaluated on a float64 copy of the model (so rounding
never depends on the training precision), checked against the hardware's number formats.

:func:`export_package` writes, into one directory:

- ``params.pt`` (``{layer: {key: tensor}}``) and ``params.npz`` (keys ``layer/key``, plus the
  tables ``tables/cdf_y``, ``tables/cdf_z``, ``tables/tanh_lut``);
- ``streamlic_params.h``: ``static const`` fixed-width arrays and ``#define`` s of shapes and
  bit widths;
- the autoregressive engine's streams ``weights.txt``, ``biases.txt``, ``scale_params.txt``,
  ``scale_shifts.txt`` (layout below);
- ``cdf_y.txt`` and ``cdf_z.txt``: one 16-bit quantized CDF per line;
- ``golden/*.txt`` for one image, if given: integer tensors in (H, W, C) row-major order,
  one line per pixel with its C channel values;
- ``hardware_report.json`` / ``.txt`` and ``manifest.json`` (shapes, scales, bit widths,
  configs, model hash, stream sections, files with their SHA-256).

HLS stream layout, for ctx1, ctx2 and ep in turn, one integer (or one pair) per line:

- ``scale_params.txt`` / ``scale_shifts.txt``: the C_out multipliers / shifts, output group by
  output group of PO channels (that is, in channel order);
- ``weights.txt``: for each output group, its active blocks in (kh, kw, input group) order;
  each block is PO rows (output channels of the group) of PI weights (input channels), so a
  block is row-major [PO][PI];
- ``biases.txt``: the layer's C_out biases in channel order, then one line
  ``channel_pointer horizontal_offset`` per active block in the weights' order, where the
  channel pointer is ``kh * (M / PI) + input group`` for ctx1 and the input group for ctx2 and
  ep, and the horizontal offset is ``kw`` (the block reads input column ``x + kw`` of the
  padded row); after the three layers, 128 lines ``127 -127`` of symbol bounds.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import fixedpoint as fxp
from .config import HardwareConfig, ModelConfig, hardware_config, model_config
from .integer_model import (ANALYSIS, CONTEXT_LAYERS, HYPER_ANALYSIS, HYPER_SYNTHESIS, PAD_MULTIPLE, SYNTHESIS,
                            IntegerModel, block_mask, pad_to_multiple, require_integer_stage)
from .layers import LAGC, FGPConv2d, QConv2d

log = logging.getLogger(__name__)

EXPORT_FORMAT = "streamlic-export"
EXPORT_VERSION = 1
STREAM_FILES = ("weights.txt", "biases.txt", "scale_params.txt", "scale_shifts.txt")
BIAS_KEYS = ("bias", "affine_bias", "gain_bias")
MULTIPLIER_KEYS = (("scale_param", "scale_shift"), ("affine_scale_param", "affine_scale_shift"),
                   ("gain_scale_param", "gain_scale_shift"), ("output_scale_param", "output_scale_shift"))
HEADER_PREFIX = "STREAMLIC"
REPORT_SIZE = (512, 768)  # (H, W) of the hardware report when no image is given


class ExportError(ValueError):
    """The model cannot be exported as the hardware needs it (the message names the layer)."""


# ---------------------------------------------------------------------- integer parameters

def export_quantized_parameters(model) -> dict[str, dict[str, Tensor]]:
    """Every quantized layer's integers by module name, as the hardware holds them.

    Per convolution: ``weight``, ``bias``, ``scale_param``, ``scale_shift`` (int64), and for the
    block-sparse layers ``mask`` (1 where a weight belongs to an active block); per LAGC the
    keys of :meth:`streamlic.layers.LAGC.integer_params`; every layer also carries
    ``float_input_scale`` and ``float_output_scale`` (float64 scalars, the real value of one
    integer step). Raises :class:`~streamlic.fixedpoint.FixedPointError` naming the layer when
    a bias, multiplier or shift does not fit the hardware, and
    :class:`~streamlic.integer_model.StageError` for a model before QAT.
    """
    require_integer_stage(model, "export_quantized_parameters")
    exact = copy.deepcopy(model).double()  # the float64 integers are the ones the harness checks
    params: dict[str, dict[str, Tensor]] = {}
    for name, module in exact.named_modules():
        if not isinstance(module, (QConv2d, LAGC)):
            continue
        layer = {key: _integers(name, key, value) for key, value in module.integer_params().items()}
        if isinstance(module, FGPConv2d):
            # an unmasked layer uses every block
            layer["mask"] = layer["mask"] if module.masked else torch.ones_like(layer["mask"])
            _check_masked_weights(name, layer["weight"], layer["mask"])
        layer["float_input_scale"] = module.in_scale.detach().to(torch.float64).clone()
        layer["float_output_scale"] = module.out_scale.detach().to(torch.float64).clone()
        _check_ranges(name, layer, model.hw)
        params[name] = layer
    return params


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
    bias_max = 2 ** (hw.precision_bits - 1) - 1
    for key in BIAS_KEYS:
        if key in params and bool((params[key].abs() > bias_max).any()):
            channel = int((params[key].abs() > bias_max).nonzero()[0, 0])
            raise fxp.FixedPointError(
                f"{layer}: {key} {int(params[key][channel])} (channel {channel}) exceeds the "
                f"{hw.precision_bits}-bit range ±{bias_max}")
    for m_key, k_key in MULTIPLIER_KEYS:
        if m_key not in params:
            continue
        m, k = params[m_key], params[k_key]
        bad_m = (m < 1) | (m > hw.multiplier_max)
        if bool(bad_m.any()):
            channel = int(bad_m.nonzero()[0, 0])
            raise fxp.FixedPointError(f"{layer}: {m_key} {int(m[channel])} (channel {channel}) is outside "
                                      f"[1, {hw.multiplier_max}] ({hw.multiplier_bits}-bit multiplier)")
        bad_k = (k < 0) | (k > hw.shift_max)
        if bool(bad_k.any()):
            channel = int(bad_k.nonzero()[0, 0])
            raise fxp.FixedPointError(f"{layer}: {k_key} {int(k[channel])} (channel {channel}) is outside "
                                      f"[0, {hw.shift_max}] ({hw.shift_bits}-bit shift)")


# ---------------------------------------------------------------------- HLS streams

def _sparse_layer_info(params: dict[str, dict[str, Tensor]], hw: HardwareConfig,
                       blocks_per_group: dict[str, int]) -> dict[str, dict[str, Any]]:
    info = {}
    for short, name in CONTEXT_LAYERS.items():
        out_c, in_c, kh, kw = params[name]["weight"].shape
        info[short] = {"name": name, "in_channels": in_c, "out_channels": out_c, "kernel": [kh, kw],
                       "in_groups": in_c // hw.block_in, "out_groups": out_c // hw.block_out,
                       "blocks_per_group": blocks_per_group[short]}
    return info


def active_blocks(mask: Tensor, hw: HardwareConfig) -> list[list[tuple[int, int, int]]]:
    """Per output group, its active blocks as (kh, kw, input group), in stream order."""
    blocks = block_mask(mask, hw.block_in, hw.block_out)
    out_groups, in_groups, kh, kw = blocks.shape
    return [[(i, j, ig) for i in range(kh) for j in range(kw) for ig in range(in_groups) if blocks[g, ig, i, j]]
            for g in range(out_groups)]


def hls_streams(params: dict[str, dict[str, Tensor]], hw: HardwareConfig, model_cfg: ModelConfig,
                blocks_per_group: dict[str, int]) -> tuple[dict[str, list[str]], dict[str, list[dict]]]:
    """Lines of the four stream files and their sections (layer, part, lines) for the manifest.

    Raises :class:`ExportError` naming the layer when an output group does not hold exactly
    ``blocks_per_group`` active blocks.
    """
    pi, po = hw.block_in, hw.block_out
    lines: dict[str, list[str]] = {name: [] for name in STREAM_FILES}
    sections: dict[str, list[dict]] = {name: [] for name in STREAM_FILES}

    def emit(stream: str, layer: str, part: str, new: list[str]) -> None:
        lines[stream].extend(new)
        sections[stream].append({"layer": layer, "part": part, "lines": len(new)})

    for short, name in CONTEXT_LAYERS.items():
        p = params[name]
        weight, mask = p["weight"], p["mask"]
        groups = active_blocks(mask, hw)
        for g, blocks in enumerate(groups):
            if len(blocks) != blocks_per_group[short]:
                raise ExportError(f"{short} ({name}): output group {g} has {len(blocks)} active blocks, the "
                                  f"hardware expects {blocks_per_group[short]} (taps x group_num)")
        emit("scale_params.txt", short, "scale_param", [str(int(v)) for v in p["scale_param"]])
        emit("scale_shifts.txt", short, "scale_shift", [str(int(v)) for v in p["scale_shift"]])
        block_rows, pointers = [], []
        for g, blocks in enumerate(groups):
            for i, j, ig in blocks:
                block = weight[g * po:(g + 1) * po, ig * pi:(ig + 1) * pi, i, j]
                block_rows.extend(" ".join(str(int(v)) for v in row) for row in block)
                pointer = i * (model_cfg.M // pi) + ig if short == "ctx1" else ig
                pointers.append(f"{pointer} {j}")
        emit("weights.txt", short, "blocks", block_rows)
        emit("biases.txt", short, "bias", [str(int(v)) for v in p["bias"]])
        emit("biases.txt", short, "block_pointers", pointers)
    emit("biases.txt", "all", "symbol_bounds", [f"{fxp.SYMBOL_MAX} {-fxp.SYMBOL_MAX}"] * fxp.SCALE_LEVELS)
    return lines, sections


def _read_ints(path: Path) -> list[int]:
    try:
        return [int(token) for token in path.read_text().split()]
    except FileNotFoundError:
        raise
    except ValueError as err:
        raise ValueError(f"{path}: not a stream of integers ({err})") from err


def parse_hls_streams(directory: Path, manifest: dict[str, Any], hw: HardwareConfig,
                      model_cfg: ModelConfig) -> dict[str, dict[str, Tensor]]:
    """Rebuild ctx1, ctx2 and ep (weight, mask, bias, scale_param, scale_shift) from the four streams."""
    pi, po = hw.block_in, hw.block_out
    streams = {name: _read_ints(directory / name) for name in STREAM_FILES}
    cursor = {name: 0 for name in STREAM_FILES}

    def take(stream: str, count: int, what: str) -> list[int]:
        start = cursor[stream]
        values = streams[stream][start:start + count]
        if len(values) != count:
            raise ValueError(f"{directory / stream}: ends inside {what} ({len(values)} of {count} integers)")
        cursor[stream] = start + count
        return values

    layers = {}
    for short, info in manifest["context_layers"].items():
        out_c, in_c = info["out_channels"], info["in_channels"]
        kh, kw = info["kernel"]
        per_group = info["blocks_per_group"]
        out_groups = out_c // po
        m = take("scale_params.txt", out_c, f"{short} scale params")
        k = take("scale_shifts.txt", out_c, f"{short} shifts")
        bias = take("biases.txt", out_c, f"{short} biases")
        flat_weights = take("weights.txt", out_groups * per_group * po * pi, f"{short} weights")
        pointers = take("biases.txt", 2 * out_groups * per_group, f"{short} block pointers")
        weight = torch.zeros(out_c, in_c, kh, kw, dtype=torch.int64)
        mask = torch.zeros_like(weight)
        blocks = torch.tensor(flat_weights, dtype=torch.int64).reshape(out_groups, per_group, po, pi)
        for g in range(out_groups):
            for slot in range(per_group):
                pointer, j = pointers[2 * (g * per_group + slot): 2 * (g * per_group + slot) + 2]
                i, ig = divmod(pointer, model_cfg.M // pi) if short == "ctx1" else (0, pointer)
                if not (0 <= i < kh and 0 <= j < kw and 0 <= ig < in_c // pi):
                    raise ValueError(f"{directory / 'biases.txt'}: {short} group {g} block {slot} points at "
                                     f"({pointer}, {j}), outside the layer")
                rows, cols = slice(g * po, (g + 1) * po), slice(ig * pi, (ig + 1) * pi)
                weight[rows, cols, i, j] = blocks[g, slot]
                mask[rows, cols, i, j] = 1
        layers[info["name"]] = {"weight": weight, "mask": mask, "bias": torch.tensor(bias, dtype=torch.int64),
                                "scale_param": torch.tensor(m, dtype=torch.int64),
                                "scale_shift": torch.tensor(k, dtype=torch.int64)}
    bounds = take("biases.txt", 2 * fxp.SCALE_LEVELS, "symbol bounds")
    if bounds != [fxp.SYMBOL_MAX, -fxp.SYMBOL_MAX] * fxp.SCALE_LEVELS:
        raise ValueError(f"{directory / 'biases.txt'}: symbol bounds are not {fxp.SCALE_LEVELS} pairs "
                         f"({fxp.SYMBOL_MAX}, {-fxp.SYMBOL_MAX})")
    for stream, values in streams.items():
        if cursor[stream] != len(values):
            raise ValueError(f"{directory / stream}: {len(values) - cursor[stream]} integers after the last section")
    return layers
