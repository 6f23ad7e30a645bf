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
- ``biases.txt``, three sections one after the other: (1) the biases of ctx1, ctx2 and ep
  (C_out each, channel order); (2) one line ``channel_pointer horizontal_offset`` per active
  block, ctx1's blocks, then ctx2's, then ep's, in the weights' order, where the channel
  pointer is ``kh * (M / PI) + input group`` for ctx1 and the input group for ctx2 and ep, and
  the horizontal offset is ``kw`` (the block reads input column ``x + kw`` of the padded
  row); (3) 128 lines ``127 -127`` of symbol bounds. This is the order of the kernel's
  loader: a layer's pointers right after its own biases would be read as biases.
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
                            IntegerModel, SaturationCounts, block_mask, pad_to_multiple, require_integer_stage)
from .layers import LAGC, FGPConv2d, QConv2d

log = logging.getLogger(__name__)

EXPORT_FORMAT = "streamlic-export"
EXPORT_VERSION = 1
STREAM_FILES = ("weights.txt", "biases.txt", "scale_params.txt", "scale_shifts.txt")
BIAS_KEYS = ("bias", "affine_bias", "score_bias")
MULTIPLIER_KEYS = (("scale_param", "scale_shift"), ("affine_scale_param", "affine_scale_shift"),
                   ("score_scale_param", "score_scale_shift"), ("output_scale_param", "output_scale_shift"))
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
    exact = copy.deepcopy(model).cpu().double()  # the float64 integers are the ones the harness checks
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
    bias_max = hw.bias_max
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

    pointers: dict[str, list[str]] = {}
    for short, name in CONTEXT_LAYERS.items():
        p = params[name]
        weight, mask = p["weight"], p["mask"]
        groups = active_blocks(mask, hw)
        for g, blocks in enumerate(groups):
            if len(blocks) != blocks_per_group[short]:
                raise ExportError(f"{short} ({name}): output group {g} has {len(blocks)} active blocks, the "
                                  f"hardware expects {blocks_per_group[short]} (taps x group_num)")
        emit("scale_params.txt", short, "scale_param", [str(v) for v in p["scale_param"].tolist()])
        emit("scale_shifts.txt", short, "scale_shift", [str(v) for v in p["scale_shift"].tolist()])
        block_rows = []
        pointers[short] = []
        for g, blocks in enumerate(groups):
            for i, j, ig in blocks:
                block = weight[g * po:(g + 1) * po, ig * pi:(ig + 1) * pi, i, j]
                block_rows.extend(" ".join(map(str, row)) for row in block.tolist())
                pointers[short].append(f"{block_channel_pointer(short, i, ig, model_cfg.M, pi)} {j}")
        emit("weights.txt", short, "blocks", block_rows)
        emit("biases.txt", short, "bias", [str(v) for v in p["bias"].tolist()])
    # the kernel's loader reads every layer's biases first, then every layer's block pointers
    for short, layer_pointers in pointers.items():
        emit("biases.txt", short, "block_pointers", layer_pointers)
    emit("biases.txt", "all", "symbol_bounds", [f"{fxp.SYMBOL_MAX} {-fxp.SYMBOL_MAX}"] * fxp.SCALE_LEVELS)
    return lines, sections


def block_channel_pointer(short: str, kh: int, in_group: int, latent_channels: int, block_in: int) -> int:
    """The engine's channel pointer of a block: ``kh * (M / PI) + input group`` for ctx1, the input group otherwise.

    ctx1 reads three latent rows, stacked in the engine's buffer one above the other.
    """
    return kh * (latent_channels // block_in) + in_group if short == "ctx1" else in_group


def _read_ints(path: Path) -> list[int]:
    try:
        return [int(token) for token in path.read_text().split()]
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
    context = manifest["context_layers"]
    # biases.txt: every layer's biases, then every layer's block pointers, then the symbol bounds
    biases = {short: take("biases.txt", info["out_channels"], f"{short} biases") for short, info in context.items()}
    for short, info in context.items():
        out_c, in_c = info["out_channels"], info["in_channels"]
        kh, kw = info["kernel"]
        per_group = info["blocks_per_group"]
        out_groups = out_c // po
        m = take("scale_params.txt", out_c, f"{short} scale params")
        k = take("scale_shifts.txt", out_c, f"{short} shifts")
        bias = biases[short]
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


# ---------------------------------------------------------------------- hardware report

def _layer_table(params: dict[str, dict[str, Tensor]], hw: HardwareConfig, height: int,
                 width: int) -> list[dict[str, Any]]:
    """Geometry of every layer at an input of ``height x width``: kind, channels, kernel, input bound, positions."""
    rows = []

    def conv_out(size: int, k: int, stride: int, padding: int) -> int:
        return (size + 2 * padding - k) // stride + 1

    def add(name: str, kind: str, positions: int, in_bound: int) -> None:
        p = params[name]
        weight = p["affine_weight"] if kind == "lagc" else p["weight"]
        out_c, in_c, kh, kw = weight.shape
        rows.append({"layer": name, "kind": kind, "in_channels": in_c, "out_channels": out_c, "kernel": [kh, kw],
                     "positions": positions, "input_bound": in_bound})

    def downsampling(spec, h: int, w: int, first_bound: int) -> tuple[int, int]:
        for name, kind, stride, padding in spec:
            if kind == "lagc":
                add(name, "lagc", h * w, hw.act_max)
            else:
                k = params[name]["weight"].shape[-1]
                h, w = conv_out(h, k, stride, padding), conv_out(w, k, stride, padding)
                add(name, "conv", h * w, first_bound if name == spec[0][0] else hw.act_max)
        return h, w

    latent_h, latent_w = downsampling(ANALYSIS, height, width, hw.image_max)
    # h_a reads the latent with its causal padding (1, 1, 2, 0)
    h, w = downsampling(HYPER_ANALYSIS, latent_h + 2, latent_w + 2, hw.act_max)
    for spec, (h, w) in ((HYPER_SYNTHESIS, (h, w)), (SYNTHESIS, (latent_h, latent_w))):
        for name, kind, _, _ in spec:
            if kind == "upsample":  # the 2x2 conv runs on the input padded by 1: (h + 1) x (w + 1) positions
                add(name, "upsample_conv", (h + 1) * (w + 1),
                    fxp.SYMBOL_MAX if name == HYPER_SYNTHESIS[0][0] else hw.act_max)
                h, w = 2 * h, 2 * w
            elif kind == "lagc":
                add(name, "lagc", h * w, hw.act_max)
    for short, name in CONTEXT_LAYERS.items():
        add(name, "block_sparse_conv", latent_h * latent_w, hw.act_max)
        rows[-1]["short_name"] = short
    return rows


def hardware_report(params: dict[str, dict[str, Tensor]], hw: HardwareConfig, model_cfg: ModelConfig,
                    blocks_per_group: dict[str, int], height: int = REPORT_SIZE[0],
                    width: int = REPORT_SIZE[1]) -> dict[str, Any]:
    """Per layer MACs (dense and block-sparse), weight bits, worst-case accumulator bits, blocks per group.

    MACs count the multiply-accumulates of one ``height x width`` image: a convolution
    ``C_out C_in kh kw`` per output position (the upsampling 2x2 conv at its ``(h+1)(w+1)``
    positions before the pixel shuffle), an LAGC ``C^2`` for its affine conv plus ``2C``
    for the gain and output products, a block-sparse layer only its active weights.
    Raises :class:`~streamlic.fixedpoint.FixedPointError` naming the layer when a worst-case
    accumulator does not fit ``hw.accumulator_bits``.
    """
    layers = []
    for row in _layer_table(params, hw, height, width):
        p = params[row["layer"]]
        weight = p["affine_weight"] if row["kind"] == "lagc" else p["weight"]
        out_c, in_c, kh, kw = weight.shape
        dense = out_c * in_c * kh * kw
        if row["kind"] == "lagc":
            dense += 2 * out_c
        active = int(p["mask"].sum()) if "mask" in p else dense
        worst = float(weight.abs().sum(dim=(1, 2, 3)).max()) * row["input_bound"]
        acc_bits = fxp.accumulator_bits(worst)
        if acc_bits > hw.accumulator_bits:
            raise fxp.FixedPointError(
                f"{row['layer']}: worst-case accumulator |acc| <= {worst:.4g} needs {acc_bits} bits, more than "
                f"hardware.accumulator_bits={hw.accumulator_bits}")
        entry = {**row, "macs_per_position_dense": dense, "macs_per_position_sparse": active,
                 "macs_dense": dense * row["positions"], "macs_sparse": active * row["positions"],
                 "weight_bits": hw.weight_bits, "weight_bits_used": fxp.accumulator_bits(float(weight.abs().max())),
                 "accumulator_bits": acc_bits, "accumulator_bits_limit": hw.accumulator_bits}
        if "mask" in p:
            blocks = block_mask(p["mask"], hw.block_in, hw.block_out)
            entry.update(blocks_per_group=blocks_per_group[row["short_name"]],
                         block_count_per_group=[int(n) for n in blocks.flatten(1).sum(dim=1)],
                         blocks_total_per_group=int(blocks[0].numel()),
                         density=active / dense)
        layers.append(entry)
    totals = _totals(layers, height * width)
    return {"image_size": [height, width], "hardware": hw.to_dict(), "model": model_cfg.to_dict(),
            "layers": layers, "totals": totals}


def _totals(layers: list[dict[str, Any]], pixels: int) -> dict[str, Any]:
    context = [entry for entry in layers if entry["kind"] == "block_sparse_conv"]
    dense = sum(entry["macs_dense"] for entry in layers)
    sparse = sum(entry["macs_sparse"] for entry in layers)
    context_dense = sum(entry["macs_dense"] for entry in context)
    context_sparse = sum(entry["macs_sparse"] for entry in context)
    return {"macs_dense": dense, "macs_sparse": sparse,
            "macs_per_pixel_dense": dense / pixels, "macs_per_pixel_sparse": sparse / pixels,
            "context_macs_dense": context_dense, "context_macs_sparse": context_sparse,
            "context_sparse_ratio": context_sparse / context_dense if context_dense else 1.0,
            "max_accumulator_bits": max(entry["accumulator_bits"] for entry in layers)}


def format_hardware_report(report: dict[str, Any]) -> str:
    height, width = report["image_size"]
    hw = report["hardware"]
    lines = [f"StreamLIC hardware report: {height}x{width} image, {hw['name']} "
             f"(A={hw['activation_bits']}, W={hw['weight_bits']}, P={hw['precision_bits']}, "
             f"accumulator {hw['accumulator_bits']} bits, blocks {hw['block_in']}x{hw['block_out']})", "",
             f"{'layer':<22}{'kind':<18}{'in':>5}{'out':>6}{'k':>6}{'MACs dense':>15}{'MACs sparse':>15}"
             f"{'w bits':>8}{'acc bits':>9}{'blocks/group':>14}"]
    for e in report["layers"]:
        blocks = f"{e['blocks_per_group']}/{e['blocks_total_per_group']}" if "blocks_per_group" in e else "-"
        lines.append(f"{e['layer']:<22}{e['kind']:<18}{e['in_channels']:>5}{e['out_channels']:>6}"
                     f"{'x'.join(map(str, e['kernel'])):>6}{e['macs_dense']:>15,}{e['macs_sparse']:>15,}"
                     f"{e['weight_bits_used']:>4}/{e['weight_bits']:<3}{e['accumulator_bits']:>5}/"
                     f"{e['accumulator_bits_limit']:<3}{blocks:>14}")
    t = report["totals"]
    lines += ["", f"total MACs: dense {t['macs_dense']:,}, sparse {t['macs_sparse']:,}",
              f"MACs per pixel: dense {t['macs_per_pixel_dense']:.1f}, sparse {t['macs_per_pixel_sparse']:.1f}",
              f"context engine MACs: dense {t['context_macs_dense']:,}, sparse {t['context_macs_sparse']:,} "
              f"({100 * t['context_sparse_ratio']:.2f} %)",
              f"widest worst-case accumulator: {t['max_accumulator_bits']} bits"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- C header

def _c_int_type(bits: int, signed: bool) -> str:
    width = next(w for w in (8, 16, 32, 64) if bits <= w)
    return f"{'' if signed else 'u'}int{width}_t"


def _c_type_for(key: str, hw: HardwareConfig) -> str:
    if key.endswith("weight"):
        return _c_int_type(hw.weight_bits, True)
    if key.endswith("bias"):
        return _c_int_type(hw.precision_bits, True)
    if key.endswith("scale_param"):
        return _c_int_type(hw.multiplier_bits, False)
    if key.endswith("scale_shift"):
        return _c_int_type(hw.shift_bits, False)
    if key == "mask":
        return _c_int_type(1, False)
    raise KeyError(f"no C type for parameter {key}")


# numpy and torch handle unsigned types wider than 8 bits poorly: those go one signed size up
_STORAGE_DTYPES = {"int8_t": torch.int8, "int16_t": torch.int16, "int32_t": torch.int32, "int64_t": torch.int64,
                   "uint8_t": torch.uint8, "uint16_t": torch.int32, "uint32_t": torch.int64}


def _compact(key: str, value: Tensor, hw: HardwareConfig) -> Tensor:
    """An integer parameter in the narrowest dtype its hardware width fits (as in the C header)."""
    if value.is_floating_point():
        return value
    return value.to(_STORAGE_DTYPES[_c_type_for(key, hw)])


def _c_name(*parts: str) -> str:
    return "_".join([HEADER_PREFIX, *parts]).replace(".", "_").upper()


def _c_array(name: str, ctype: str, values: Tensor) -> list[str]:
    flat = [str(v) for v in values.reshape(-1).tolist()]
    shape = list(values.shape)
    lines = [f"#define {name}_LEN {len(flat)}"]
    lines += [f"#define {name}_D{axis} {size}" for axis, size in enumerate(shape)]
    lines.append(f"static const {ctype} {name}[{len(flat)}] = {{  /* shape {shape} */")
    lines += ["    " + ", ".join(flat[i:i + 16]) + "," for i in range(0, len(flat), 16)]
    lines.append("};")
    return lines


def c_header(params: dict[str, dict[str, Tensor]], tables: dict[str, Tensor], hw: HardwareConfig,
             model_cfg: ModelConfig, model_hash: str) -> str:
    """``streamlic_params.h``: fixed-width ``static const`` arrays and ``#define`` s of shapes and widths."""
    guard = _c_name("PARAMS_H")
    lines = ["/* StreamLIC integer parameters, written by `streamlic export`. Do not edit. */",
             f"#ifndef {guard}", f"#define {guard}", "", "#include <stdint.h>", "",
             f'#define {_c_name("MODEL_HASH")} "{model_hash}"']
    widths = {"ACT_BITS": hw.activation_bits, "WEIGHT_BITS": hw.weight_bits, "PRECISION_BITS": hw.precision_bits,
              "RESIDUAL_BITS": hw.residual_bits, "ACCUMULATOR_BITS": hw.accumulator_bits,
              "MULTIPLIER_BITS": hw.multiplier_bits, "SHIFT_BITS": hw.shift_bits, "BLOCK_IN": hw.block_in,
              "BLOCK_OUT": hw.block_out, "LATENT_SHIFT": hw.latent_shift, "SYMBOL_MAX": fxp.SYMBOL_MAX,
              "SCALE_LEVELS": fxp.SCALE_LEVELS, **{key.upper(): value for key, value in model_cfg.to_dict().items()}}
    lines += [f"#define {_c_name(key)} {value}" for key, value in widths.items()]
    for layer, layer_params in params.items():
        lines += ["", f"/* ---- {layer} ---- */"]
        for key, value in layer_params.items():
            if value.is_floating_point():
                lines.append(f"static const double {_c_name(layer, key)} = {float(value):.17g};")
            else:
                lines += _c_array(_c_name(layer, key), _c_type_for(key, hw), value)
    table_types = {"cdf_y": "uint32_t", "cdf_z": "uint32_t", "tanh_lut": _c_int_type(hw.activation_bits, True)}
    for name, table in tables.items():
        lines += ["", *_c_array(_c_name(name), table_types[name], table)]
    lines += ["", f"#endif /* {guard} */", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------- files

def _write_rows(path: Path, rows: Tensor) -> None:
    """One line per row of a 2-D integer tensor."""
    path.write_text("".join(" ".join(map(str, row)) + "\n" for row in rows.tolist()))


def _hwc_rows(t: Tensor) -> Tensor:
    """[1, C, H, W] -> [H * W, C]: (H, W, C) row-major, one pixel per row."""
    return t[0].permute(1, 2, 0).reshape(-1, t.shape[1])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


GOLDEN_TENSORS = {"x.txt": "x", "y.txt": "g_a.6", "z_hat.txt": "z_hat", "hyper.txt": "h_s.2",
                  "symbols.txt": "symbols", "pdf_index.txt": "pdf_index", "y_hat.txt": "y_hat"}


CORNER_DIR = "corner"
CORNER_SEEDS = 16
# Both sides of each of these clamps must be reached by the corner-case set.
CORNER_CLAMPS = ("symbols", "pdf_index", "ctx1", "ctx2", "channel_addition", "ep_mean")


def _write_tensors(directory: Path, tensors: dict[str, Tensor]) -> dict[str, Any]:
    """Each [1, C, H, W] integer tensor as (H, W, C) text; returns the manifest entry of the files."""
    directory.mkdir(parents=True, exist_ok=True)
    shapes = {}
    for file_name, (key, tensor) in tensors.items():
        _write_rows(directory / file_name, _hwc_rows(tensor))
        shapes[file_name] = {"tensor": key, "shape_hwc": [tensor.shape[2], tensor.shape[3], tensor.shape[1]]}
    return shapes


def _golden_vectors(integer_model: IntegerModel, image: Tensor, directory: Path) -> dict[str, Any]:
    """Integer tensors of one image as (H, W, C) text, the corner-case set, and their manifest entry."""
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"golden vectors need one image [3, H, W], got shape {tuple(image.shape)}")
    record = integer_model.forward(pad_to_multiple(image))
    shapes = _write_tensors(directory, {name: (key, record[key]) for name, key in GOLDEN_TENSORS.items()})
    latent_h, latent_w = record["g_a.6"].shape[-2:]
    corner = _corner_case_vectors(integer_model, latent_h, latent_w, directory / CORNER_DIR)
    return {"image_size": list(image.shape[-2:]), "padded_size": list(record["x"].shape[-2:]), "files": shapes,
            "corner": corner}


def worst_case_outputs(integer_model: IntegerModel) -> dict[str, tuple[Tensor, Tensor]]:
    """Per output channel, the lowest and highest value before the clamp of each row-engine layer.

    Over every input in range: ctx1 reads latents in the activation range, ctx2 and ep read
    a LeakyReLU output in ``[leaky(-act), act]``. Keys: ``ctx1``, ``ctx2``, ``ep_mean`` (ep's
    even channels) and ``pdf_index`` (its odd channels).
    """
    act = integer_model.hw.act_max
    after_leaky = int(fxp.leaky_relu(torch.tensor(-act)))
    input_ranges = {"ctx1": (-act, act), "ctx2": (after_leaky, act), "ep": (after_leaky, act)}
    outputs = {}
    for short, (in_lo, in_hi) in input_ranges.items():
        layer = integer_model.context[short]
        positive, negative = layer.weight.clamp(min=0), layer.weight.clamp(max=0)
        acc_hi = (positive * in_hi + negative * in_lo).sum(dim=(1, 2, 3))
        acc_lo = (positive * in_lo + negative * in_hi).sum(dim=(1, 2, 3))
        lo, hi = (layer.requantize(acc.to(torch.int64).view(1, -1, 1, 1), clamped=False).view(-1)
                  for acc in (acc_lo, acc_hi))
        if short == "ep":
            outputs["ep_mean"], outputs["pdf_index"] = (lo[0::2], hi[0::2]), (lo[1::2], hi[1::2])
        else:
            outputs[short] = (lo, hi)
    return outputs


def _aimed_latent_rows(integer_model: IntegerModel, channel: int, sign: int) -> Tensor:
    """Three latent rows [M, 3] that push ctx2's output ``channel`` towards ``sign`` (+1 or -1).

    Linear ascent through ctx1: each ctx1 channel is wanted with the sign of its total weight
    in ``channel`` of ctx2, and each latent (channel, row) takes the full-scale sign that
    raises that wish most.
    """
    w1, w2 = integer_model.context["ctx1"].weight, integer_model.context["ctx2"].weight
    wanted = sign * w2[channel].sum(dim=(1, 2))  # [2M]: how much each ctx1 channel should rise
    drive = torch.einsum("j,jihw->ih", wanted, w1)  # [M, 3]: rise of that wish per latent (channel, row)
    return torch.where(drive >= 0, 1, -1) * fxp.latent_bound(integer_model.hw)


def _aimed_hyper_row(integer_model: IntegerModel, channel: int, sign: int) -> Tensor:
    """A full-scale hyper output row [2M] that pushes ep's output ``channel`` towards ``sign``.

    The hyper output enters the channel addition directly, so each of ep's input channels
    can be set to the sign of its total weight in ``channel``.
    """
    wanted = sign * integer_model.context["ep"].weight[channel].sum(dim=(1, 2))
    return torch.where(wanted >= 0, 1, -1) * integer_model.hw.act_max


# One corner-case cycle: (pattern, rows). Full-scale inputs are far outside what a trained
# model sees, so ctx1 and the channel addition saturate both ways, and latents far from their
# means give symbols at +-127. ctx2 (which reads ctx1 after the LeakyReLU) and ep (which reads
# the channel addition after it) need inputs aimed at one output channel: "<clamp>:<side>"
# aims at a channel whose worst case lies furthest beyond that side of the clamp.
CORNER_CYCLE = (("signs", 1), ("high", 1), ("low", 1), ("uniform", 1), ("alternating", 1),
                ("ctx2:above", 3), ("ctx2:below", 3), ("ep_mean:above", 1), ("ep_mean:below", 1),
                ("pdf_index:above", 1), ("zeros", 1))
AIM_CANDIDATES = 8  # the seed picks the aimed channel among this many most promising ones


def corner_case_inputs(integer_model: IntegerModel, height: int, width: int,
                       seed: int) -> tuple[Tensor, Tensor]:
    """A latent ``y`` and hyper output [1, C, height, width] that drive the row engine into its clamps.

    The rows follow :data:`CORNER_CYCLE`; ``seed`` draws the random values and aimed channels.
    """
    hw, m = integer_model.hw, integer_model.M
    y_max, act = fxp.latent_bound(hw), hw.act_max
    worst = worst_case_outputs(integer_model)
    generator = torch.Generator().manual_seed(seed)
    y = torch.zeros(1, m, height, width, dtype=torch.int64)
    hyper = torch.zeros(1, 2 * m, height, width, dtype=torch.int64)

    def random_signs(channels: int) -> Tensor:
        return torch.randint(0, 2, (channels, 1, width), generator=generator) * 2 - 1

    def uniform(channels: int, bound: int) -> Tensor:
        return torch.randint(-bound, bound + 1, (channels, 1, width), generator=generator)

    def aimed_channel(clamp: str, side: str) -> tuple[int, int]:
        """(output channel of the layer, sign) among the channels most likely to pass ``side``."""
        lo, hi = worst[clamp]
        order = torch.argsort(hi if side == "above" else lo, descending=side == "above")
        pick = order[int(torch.randint(0, min(AIM_CANDIDATES, len(order)), (1,), generator=generator))]
        if clamp in ("ep_mean", "pdf_index"):  # ep's even / odd channels
            pick = 2 * pick + (clamp == "pdf_index")
        return int(pick), 1 if side == "above" else -1

    alternating = (torch.arange(2 * m).remainder(2) * 2 - 1).view(-1, 1, 1)
    schedule = [name for name, rows in CORNER_CYCLE for _ in range(rows)]
    h = 0
    while h < height:
        pattern = schedule[h % len(schedule)]
        rows = slice(h, h + 1)
        if pattern == "signs":
            y[0, :, rows], hyper[0, :, rows] = random_signs(m) * y_max, random_signs(2 * m) * act
        elif pattern in ("high", "low"):
            sign = 1 if pattern == "high" else -1
            y[0, :, rows], hyper[0, :, rows] = sign * y_max, -sign * act
        elif pattern == "uniform":
            y[0, :, rows], hyper[0, :, rows] = uniform(m, y_max), uniform(2 * m, act)
        elif pattern == "alternating":
            y[0, :, rows], hyper[0, :, rows] = alternating[:m] * y_max, -alternating * act
        elif pattern.startswith("ctx2:"):
            # three rows of aimed latents; the row after them reads them as its context
            block = _aimed_latent_rows(integer_model, *aimed_channel(*pattern.split(":")))
            rows = slice(h, min(h + 3, height))
            y[0, :, rows] = block[:, :rows.stop - h, None]
            hyper[0, :, rows] = uniform(2 * m, act)
            h = rows.stop
            continue
        elif pattern != "zeros":  # ep_mean / pdf_index, aimed through this row's hyper output
            row = _aimed_hyper_row(integer_model, *aimed_channel(*pattern.split(":")))
            y[0, :, rows], hyper[0, :, rows] = uniform(m, y_max), row[:, None, None]
        h += 1
    return y, hyper


def _corner_case_vectors(integer_model: IntegerModel, height: int, width: int, directory: Path) -> dict[str, Any]:
    """Golden vectors of the row engine for :func:`corner_case_inputs`, with the elements beyond each clamp.

    Tries up to ``CORNER_SEEDS`` seeds until both sides of every reachable clamp in
    ``CORNER_CLAMPS`` are reached. Clamps that no input can reach for this model are listed
    under ``unreachable``; reachable ones that no seed reached under ``unreached``, with a warning.
    """
    act = integer_model.hw.act_max
    bounds = {"pdf_index": (0, fxp.SCALE_LEVELS - 1)}
    unreachable = []
    for name, (lowest, highest) in worst_case_outputs(integer_model).items():
        lo, hi = bounds.get(name, (-act, act))
        unreachable += [f"{name}.below"] * (int(lowest.min()) >= lo) + [f"{name}.above"] * (int(highest.max()) <= hi)
    wanted = [f"{name}.{side}" for name in CORNER_CLAMPS for side in ("below", "above")
              if f"{name}.{side}" not in unreachable]
    best = None
    for seed in range(CORNER_SEEDS):
        y, hyper = corner_case_inputs(integer_model, height, width, seed)
        saturation = SaturationCounts()
        coded = integer_model.encode_rows(y, hyper, saturation=saturation)
        counts = saturation.as_dict()
        unreached = [key for key in wanted if counts[key.split(".")[0]][key.split(".")[1]] == 0]
        if best is None or len(unreached) < len(best[-1]):
            best = (seed, y, hyper, coded, counts, unreached)
        if not unreached:
            break
    seed, y, hyper, coded, counts, unreached = best
    if unreachable:
        log.info("corner-case vectors: %s cannot be reached by any input of this model", ", ".join(unreachable))
    if unreached:
        log.warning("corner-case vectors: no input found that drives %s beyond its clamp; the hardware's "
                    "saturation there stays untested", ", ".join(unreached))
    files = _write_tensors(directory, {"y.txt": ("y", y), "hyper.txt": ("hyper", hyper),
                                       "symbols.txt": ("symbols", coded["symbols"]),
                                       "pdf_index.txt": ("pdf_index", coded["pdf_index"])})
    return {"directory": f"golden/{CORNER_DIR}", "seed": seed, "files": files, "saturation": counts,
            "unreachable": unreachable, "unreached": unreached}


def _prepare_output_dir(directory: Path, force: bool) -> None:
    """Refuse a non-empty directory unless ``force``; then remove the files a previous export listed.

    Only what an export owns (the files its manifest lists) is removed, so nothing of an
    earlier model survives next to the new one, and nothing else in the directory is touched.
    """
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"{directory}: exists and is not a directory")
    if not directory.exists() or not any(directory.iterdir()):
        return
    if not force:
        raise ExportError(f"{directory}: not empty; choose a new directory or pass --force to replace the "
                          "export in it")
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        return
    try:
        owned = json.loads(manifest_path.read_text()).get("files", {})
    except json.JSONDecodeError as err:
        raise ExportError(f"{manifest_path}: not valid JSON ({err}); remove the directory by hand") from err
    for name in owned:
        path = (directory / name).resolve()
        if directory.resolve() in path.parents:  # a manifest cannot make us delete outside the export
            path.unlink(missing_ok=True)
    manifest_path.unlink()
    for folder in sorted({(directory / name).parent for name in owned}, key=lambda p: len(p.parts), reverse=True):
        while folder != directory and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent


def export_package(model, out_dir: str | Path, image: Tensor | None = None,
                   image_name: str | None = None, force: bool = False) -> dict[str, Path]:
    """Write the hardware package of a QAT-or-later model into ``out_dir``; returns the written paths.

    ``image`` [3, H, W] in [0, 1] (any size; padded to a multiple of 64) adds golden vectors.
    Every check (stage, number ranges, block counts, accumulator widths) runs before the
    first file is written. A non-empty ``out_dir`` is refused unless ``force``, which first
    removes the files of the export already there.
    """
    require_integer_stage(model, "export")
    hw, model_cfg = model.hw, model.model_cfg
    params = export_quantized_parameters(model)
    integer_model = IntegerModel.from_model(model, params=params)
    blocks_per_group = {short: layer.blocks_per_group for short, layer in model.sparse_layers().items()}
    streams, sections = hls_streams(params, hw, model_cfg, blocks_per_group)
    if image is not None:
        height, width = (math.ceil(size / PAD_MULTIPLE) * PAD_MULTIPLE for size in image.shape[-2:])
    else:
        height, width = REPORT_SIZE
    report = hardware_report(params, hw, model_cfg, blocks_per_group, height, width)

    directory = Path(out_dir)
    _prepare_output_dir(directory, force)
    directory.mkdir(parents=True, exist_ok=True)
    tables = {"cdf_y": integer_model.cdf_y, "cdf_z": integer_model.cdf_z, "tanh_lut": integer_model.tanh_lut}
    written: dict[str, Path] = {}

    def path_of(name: str) -> Path:
        written[name] = directory / name
        return written[name]

    torch.save(research_parameter_dict(params), path_of("params.pt"))
    stored = {layer: {key: _compact(key, value, hw) for key, value in layer_params.items()}
              for layer, layer_params in params.items()}
    arrays = {f"{layer}/{key}": value.numpy() for layer, layer_params in stored.items()
              for key, value in layer_params.items()}
    arrays.update({f"tables/{name}": table.numpy() for name, table in tables.items()})
    with open(path_of("params.npz"), "wb") as handle:
        np.savez(handle, **arrays)
    path_of("streamlic_params.h").write_text(c_header(params, tables, hw, model_cfg, integer_model.model_hash))
    for name, stream_lines in streams.items():
        path_of(name).write_text("".join(line + "\n" for line in stream_lines))
    _write_rows(path_of("cdf_y.txt"), integer_model.cdf_y)
    _write_rows(path_of("cdf_z.txt"), integer_model.cdf_z)
    golden = None
    if image is not None:
        golden = _golden_vectors(integer_model, image, directory / "golden")
        golden["image"] = image_name
        for file_name in GOLDEN_TENSORS:
            written[f"golden/{file_name}"] = directory / "golden" / file_name
        for file_name in golden["corner"]["files"]:
            written[f"golden/{CORNER_DIR}/{file_name}"] = directory / "golden" / CORNER_DIR / file_name
    path_of("hardware_report.json").write_text(json.dumps(report, indent=2) + "\n")
    path_of("hardware_report.txt").write_text(format_hardware_report(report))

    manifest = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "model_hash": integer_model.model_hash,
        "stage": model.stage,
        "config": {"model": model_cfg.to_dict(), "hardware": hw.to_dict(), "sparsity": model.sparsity_cfg.to_dict()},
        "bit_widths": {"activation": hw.activation_bits, "weight": hw.weight_bits, "precision": hw.precision_bits,
                       "residual": hw.residual_bits, "accumulator": hw.accumulator_bits,
                       "multiplier": hw.multiplier_bits, "shift": hw.shift_bits, "symbol": 8,
                       "cdf_precision": 16},
        "layers": {layer: {key: ({"shape": list(value.shape),
                                  "dtype": str(stored[layer][key].dtype).removeprefix("torch.")}
                                 if not value.is_floating_point()
                                 else float(value))
                           for key, value in layer_params.items()}
                   for layer, layer_params in params.items()},
        "context_layers": _sparse_layer_info(params, hw, blocks_per_group),
        "hls_streams": sections,
        "cdf": {"tables": {"cdf_y": list(integer_model.cdf_y.shape), "cdf_z": list(integer_model.cdf_z.shape)},
                "symbol_offset": -fxp.SYMBOL_MAX, "precision": 16,
                "note": "column j of a row is the cumulative frequency below symbol j - 127; the last column "
                        "closes the overflow slot"},
        "golden": golden,
        "files": {name: {"sha256": _sha256(path), "bytes": path.stat().st_size} for name, path in written.items()},
    }
    path_of("manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("exported %s (model %s…) to %s", model.stage, integer_model.model_hash[:12], directory)
    return written


def load_export(directory: str | Path) -> dict[str, Any]:
    """Read an export back: params (npz, with ctx1/ctx2/ep from the HLS streams), tables, configs, hash."""
    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"{directory}: no manifest.json; not a StreamLIC export directory")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{manifest_path}: not valid JSON ({err})") from err
    if manifest.get("format") != EXPORT_FORMAT or manifest.get("version") != EXPORT_VERSION:
        raise ValueError(f"{manifest_path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                         f"expected {EXPORT_FORMAT!r} version {EXPORT_VERSION}")
    for name in ("params.npz", "cdf_y.txt", "cdf_z.txt", *STREAM_FILES):
        if not (directory / name).is_file():
            raise ValueError(f"{directory}: {name} is missing; the export is incomplete")
    hw = hardware_config(manifest["config"]["hardware"])
    model_cfg = model_config(manifest["config"]["model"])
    params: dict[str, dict[str, Tensor]] = {}
    tables: dict[str, Tensor] = {}
    with np.load(directory / "params.npz") as arrays:
        for key in arrays.files:
            group, name = key.split("/", 1)
            tensor = torch.from_numpy(arrays[key].copy())
            if not tensor.is_floating_point():
                tensor = tensor.to(torch.int64)
            if group == "tables":
                tables[name] = tensor
            else:
                params.setdefault(group, {})[name] = tensor
    for layer, stream_params in parse_hls_streams(directory, manifest, hw, model_cfg).items():
        params[layer].update(stream_params)
    cdf_y = torch.tensor(_read_ints(directory / "cdf_y.txt"), dtype=torch.int32)
    cdf_z = torch.tensor(_read_ints(directory / "cdf_z.txt"), dtype=torch.int32)
    shapes = manifest["cdf"]["tables"]
    if "tanh_lut" not in tables:
        raise ValueError(f"{directory / 'params.npz'}: tables/tanh_lut is missing")
    return {"params": params, "hw": hw, "model_cfg": model_cfg, "tanh_lut": tables["tanh_lut"],
            "cdf_y": _reshape_table(cdf_y, shapes["cdf_y"], directory / "cdf_y.txt"),
            "cdf_z": _reshape_table(cdf_z, shapes["cdf_z"], directory / "cdf_z.txt"),
            "model_hash": manifest["model_hash"], "manifest": manifest}


def _reshape_table(values: Tensor, shape: list[int], path: Path) -> Tensor:
    if values.numel() != math.prod(shape):
        raise ValueError(f"{path}: {values.numel()} integers, expected a {shape[0]} x {shape[1]} table")
    return values.reshape(shape)


# ---------------------------------------------------------------------- command line

def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="write the integer parameters, HLS streams, C header, tables and hardware report",
        description="Export a QAT-or-later StreamLIC checkpoint (Lightning or plain state dict) for hardware.")
    parser.add_argument("checkpoint", help="stage checkpoint (.ckpt) or state dict file")
    parser.add_argument("-o", "--output", required=True, help="output directory")
    parser.add_argument("--image", help="image file whose integer tensors become golden test vectors")
    parser.add_argument("--force", action="store_true",
                        help="replace the export in a non-empty output directory (files it lists are removed)")
    parser.set_defaults(func=run_export)


def run_export(args) -> int:
    from .data import load_image
    from .model import StreamLIC

    model = StreamLIC.from_checkpoint(args.checkpoint)
    image = load_image(args.image) if args.image else None
    written = export_package(model, args.output, image=image, image_name=Path(args.image).name if args.image else None,
                             force=args.force)
    log.info("wrote %d files to %s", len(written), args.output)
    return 0
