"""The autoregressive engine's parameter streams, in the order its loader reads them (docs/export-format.md).

``weights.txt``: for ctx1, then ctx2, then ep, each output group's active PI x PO blocks in
(kh, kw, input group) order, each block row-major (output channel rows, input channel
columns). ``scale_params.txt`` / ``scale_shifts.txt``: each layer's multipliers / shifts in
channel order. ``biases.txt``, three sections one after the other: (1) the biases of ctx1,
ctx2 and ep; (2) one ``channel_pointer horizontal_offset`` pair per active block, ctx1's
blocks, then ctx2's, then ep's, in the weights' order; (3) 128 pairs ``127 -127`` of symbol
bounds. The channel pointer is ``kh * (M / PI) + input group`` for ctx1 (its three input
rows are stacked in the engine's buffer) and the input group otherwise; the offset is ``kw``.
A layer's pointers right after its own biases would be read as biases by the kernel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import fixedpoint as fxp
from .. import topology
from ..config import ConfigError, HardwareConfig, ModelConfig, context_engine_widths
from ..integer_layers import block_mask
from ..params import ExportError

STREAM_FILES = ("weights.txt", "biases.txt", "scale_params.txt", "scale_shifts.txt")


def sparse_layer_info(params: dict[str, dict[str, Tensor]], hw: HardwareConfig, model_cfg: ModelConfig,
                      blocks_per_group: dict[str, int]) -> dict[str, dict[str, Any]]:
    """The manifest's description of each block-sparse layer (what a stream reader needs)."""
    info = {}
    for short, name in topology.sparse_paths(model_cfg).items():
        out_c, in_c, kh, kw = params[name]["weight"].shape
        info[short] = {"name": name, "in_channels": in_c, "out_channels": out_c, "kernel": [kh, kw],
                       "in_groups": in_c // hw.block_in, "out_groups": out_c // hw.block_out,
                       "blocks_per_group": blocks_per_group[short]}
    return info


def context_engine(hw: HardwareConfig, model_cfg: ModelConfig) -> dict[str, Any]:
    """The manifest's ``context_engine``: its layers and the one set of widths the FPGA engine is built for
    (:func:`streamlic.config.context_engine_widths`; a config whose engine layers differ is refused)."""
    try:
        paths, widths = context_engine_widths(hw, model_cfg)
    except ConfigError as err:
        raise ExportError(str(err)) from None
    return {"layers": paths, "bit_widths": widths}


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
    for short, name in topology.sparse_paths(model_cfg).items():
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
    return kh * (latent_channels // block_in) + in_group if short == topology.CTX1 else in_group


def block_of_pointer(short: str, pointer: int, latent_channels: int, block_in: int) -> tuple[int, int]:
    """``(kh, input group)`` of a channel pointer: the inverse of :func:`block_channel_pointer`."""
    return divmod(pointer, latent_channels // block_in) if short == topology.CTX1 else (0, pointer)


def read_ints(path: Path) -> list[int]:
    try:
        return [int(token) for token in path.read_text().split()]
    except ValueError as err:
        raise ValueError(f"{path}: not a stream of integers ({err})") from err


def parse_hls_streams(directory: Path, manifest: dict[str, Any], hw: HardwareConfig,
                      model_cfg: ModelConfig) -> dict[str, dict[str, Tensor]]:
    """Rebuild ctx1, ctx2 and ep (weight, mask, bias, scale_param, scale_shift) from the four streams."""
    pi, po = hw.block_in, hw.block_out
    streams = {name: read_ints(directory / name) for name in STREAM_FILES}
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
                i, ig = block_of_pointer(short, pointer, model_cfg.M, pi)
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
