"""The hardware report: per layer MACs dense and sparse, weight bits, worst-case accumulator bits."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .. import fixedpoint as fxp
from .. import topology
from ..config import HardwareConfig, ModelConfig
from ..integer_layers import block_mask
from ..kinds import kind_of

REPORT_SIZE = (512, 768)  # (H, W) of the hardware report when no image is given



def _layer_table(model_cfg: ModelConfig, hw: HardwareConfig, height: int, width: int) -> list[dict[str, Any]]:
    """Every weighted layer at a ``height x width`` image: kind, channels, kernel, input bound, positions."""
    specs = {spec.path: spec for spec in topology.layers(model_cfg)}
    rows = []
    for path, (rows_out, columns_out) in topology.layer_geometry(model_cfg, height, width).items():
        spec = specs[path]
        kind = kind_of(spec)
        out_channels, kernel = kind.convolved(spec)
        row = {"layer": path, "kind": kind.report_kind, "in_channels": spec.in_channels,
               "out_channels": out_channels, "kernel": list(kernel), "positions": rows_out * columns_out,
               "input_bound": topology.input_bound(spec, hw), "weight_field": kind.weight_field}
        if spec.sparse:
            row["short_name"] = spec.sparse
        rows.append(row)
    return rows


def hardware_report(params: dict[str, dict[str, Tensor]], hw: HardwareConfig, model_cfg: ModelConfig,
                    blocks_per_group: dict[str, int], height: int = REPORT_SIZE[0],
                    width: int = REPORT_SIZE[1], input_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Per layer MACs (dense and block-sparse), weight bits, worst-case accumulator bits, blocks per group.

    MACs count the multiply-accumulates of one ``height x width`` image (``input_size``: the size of
    the image before padding to that size, recorded and named in the text): a convolution
    ``C_out C_in kh kw`` per output position (the upsampling 2x2 conv at its ``(h+1)(w+1)``
    positions before the pixel shuffle), an LAGC ``C^2`` for its affine conv plus ``2C``
    for the gain and output products, a block-sparse layer only its active weights.
    Raises :class:`~streamlic.fixedpoint.FixedPointError` naming the layer when a worst-case
    accumulator does not fit ``hw.accumulator_bits``.
    """
    layers = []
    specs = {spec.path: spec for spec in topology.layers(model_cfg)}
    for row in _layer_table(model_cfg, hw, height, width):
        p = params[row["layer"]]
        weight = p[row.pop("weight_field")]
        dense = topology.macs_per_position(specs[row["layer"]])
        active = topology.macs_per_position(specs[row["layer"]], int(p["mask"].sum())) if "mask" in p else dense
        worst = float(weight.abs().sum(dim=(1, 2, 3)).max()) * row["input_bound"]
        acc_bits = fxp.accumulator_bits(worst)
        layer_hw = hw.for_layer(row["layer"])
        input_bits = fxp.accumulator_bits(row["input_bound"])  # the multiplier's activation operand
        if acc_bits > hw.accumulator_bits:
            raise fxp.FixedPointError(
                f"{row['layer']}: worst-case accumulator |acc| <= {worst:.4g} needs {acc_bits} bits, more than "
                f"hardware.accumulator_bits={hw.accumulator_bits}")
        entry = {**row, "macs_per_position_dense": dense, "macs_per_position_sparse": active,
                 "macs_dense": dense * row["positions"], "macs_sparse": active * row["positions"],
                 "activation_bits": layer_hw.activation_bits, "weight_bits": layer_hw.weight_bits,
                 "precision_bits": layer_hw.precision_bits, "input_bits": input_bits,
                 "weight_bits_used": fxp.accumulator_bits(float(weight.abs().max())),
                 # the multiplier-area proxy: each MAC weighs its operands' widths
                 "bit_macs_sparse": active * row["positions"] * layer_hw.weight_bits * input_bits,
                 "accumulator_bits": acc_bits, "accumulator_bits_limit": hw.accumulator_bits}
        if "mask" in p:
            blocks = block_mask(p["mask"], hw.block_in, hw.block_out)
            entry.update(blocks_per_group=blocks_per_group[row["short_name"]],
                         block_count_per_group=[int(n) for n in blocks.flatten(1).sum(dim=1)],
                         blocks_total_per_group=int(blocks[0].numel()),
                         density=topology.density(active, dense))
        layers.append(entry)
    totals = _totals(layers, height * width)
    return {"image_size": [height, width], "input_size": None if input_size is None else list(input_size),
            "hardware": hw.to_dict(), "model": model_cfg.to_dict(),
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
            "bit_macs_per_pixel_sparse": sum(entry["bit_macs_sparse"] for entry in layers) / pixels,
            "max_accumulator_bits": max(entry["accumulator_bits"] for entry in layers)}


def format_hardware_report(report: dict[str, Any]) -> str:
    height, width = report["image_size"]
    if report.get("input_size"):
        source = "the {}x{} input image padded to multiples of {}".format(*report["input_size"], topology.PAD_MULTIPLE)
    else:
        source = "no image given: the default report size"
    hw = report["hardware"]
    lines = [f"StreamLIC hardware report: {height}x{width} image (height x width; {source}), {hw['name']} "
             f"(A={hw['activation_bits']}, W={hw['weight_bits']}, P={hw['precision_bits']}, "
             f"accumulator {hw['accumulator_bits']} bits, blocks {hw['block_in']}x{hw['block_out']})", "",
             f"{'layer':<22}{'kind':<18}{'in':>5}{'out':>6}{'k':>6}{'MACs dense':>15}{'MACs sparse':>15}"
             f"{'A':>4}{'in b':>5}{'w bits':>8}{'acc bits':>9}{'blocks/group':>14}"]
    for e in report["layers"]:
        blocks = f"{e['blocks_per_group']}/{e['blocks_total_per_group']}" if "blocks_per_group" in e else "-"
        lines.append(f"{e['layer']:<22}{e['kind']:<18}{e['in_channels']:>5}{e['out_channels']:>6}"
                     f"{'x'.join(map(str, e['kernel'])):>6}{e['macs_dense']:>15,}{e['macs_sparse']:>15,}"
                     f"{e['activation_bits']:>4}{e['input_bits']:>5}"
                     f"{e['weight_bits_used']:>4}/{e['weight_bits']:<3}{e['accumulator_bits']:>5}/"
                     f"{e['accumulator_bits_limit']:<3}{blocks:>14}")
    t = report["totals"]
    lines += ["", f"total MACs: dense {t['macs_dense']:,}, sparse {t['macs_sparse']:,}",
              f"MACs per pixel: dense {t['macs_per_pixel_dense']:.1f}, sparse {t['macs_per_pixel_sparse']:.1f}",
              f"context engine MACs: dense {t['context_macs_dense']:,}, sparse {t['context_macs_sparse']:,} "
              f"({100 * t['context_sparse_ratio']:.2f} %)",
              f"widest worst-case accumulator: {t['max_accumulator_bits']} bits",
              f"MACs x weight bits x input bits per pixel (multiplier-area proxy): "
              f"{t['bit_macs_per_pixel_sparse']:,.0f}"]
    return "\n".join(lines) + "\n"
