"""Golden vectors for a hardware testbench: one image's integer tensors and a corner-case set.

Tensors are written as (H, W, C) row-major integer text, one pixel per line. The corner-case
set (``golden/corner/``) feeds the autoregressive engine inputs that drive every clamp it
has, with the number of elements beyond each clamp in the manifest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import fixedpoint as fxp
from .. import topology
from ..integer_model import IntegerModel, SaturationCounts
from ..topology import pad_to_multiple

log = logging.getLogger(__name__)


def write_rows(path: Path, rows: Tensor) -> None:
    """One line per row of a 2-D integer tensor."""
    path.write_text("".join(" ".join(map(str, row)) + "\n" for row in rows.tolist()))


def _hwc_rows(t: Tensor) -> Tensor:
    """[1, C, H, W] -> [H * W, C]: (H, W, C) row-major, one pixel per row."""
    return t[0].permute(1, 2, 0).reshape(-1, t.shape[1])


# golden file -> the integer model's tensor (a layer role of the network table, or a coded quantity)
GOLDEN_TENSORS = {"x.txt": "x", "y.txt": "latent", "z_hat.txt": "z_hat", "hyper.txt": "hyper_output",
                  "symbols.txt": "symbols", "pdf_index.txt": "pdf_index", "y_hat.txt": "y_hat"}

CORNER_DIR = "corner"
CORNER_SEEDS = 16
# Both sides of each of these clamps must be reached by the corner-case set.
CORNER_CLAMPS = ("symbols", "pdf_index", topology.CTX1, topology.CTX2, "channel_addition", "ep_mean")


def _write_tensors(directory: Path, tensors: dict[str, Tensor]) -> dict[str, Any]:
    """Each [1, C, H, W] integer tensor as (H, W, C) text; returns the manifest entry of the files."""
    directory.mkdir(parents=True, exist_ok=True)
    shapes = {}
    for file_name, (key, tensor) in tensors.items():
        write_rows(directory / file_name, _hwc_rows(tensor))
        shapes[file_name] = {"tensor": key, "shape_hwc": [tensor.shape[2], tensor.shape[3], tensor.shape[1]]}
    return shapes


def golden_vectors(integer_model: IntegerModel, image: Tensor, directory: Path) -> dict[str, Any]:
    """Integer tensors of one image as (H, W, C) text, the corner-case set, and their manifest entry."""
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"golden vectors need one image [3, H, W], got shape {tuple(image.shape)}")
    record = integer_model.forward(pad_to_multiple(image))
    roles = {role: topology.layer_with(integer_model.model_cfg, role=role).path for role in ("latent", "hyper_output")}
    tensors = {name: (roles.get(key, key), record[roles.get(key, key)]) for name, key in GOLDEN_TENSORS.items()}
    shapes = _write_tensors(directory, tensors)
    latent_h, latent_w = tensors["y.txt"][1].shape[-2:]
    corner = _corner_case_vectors(integer_model, latent_h, latent_w, directory / CORNER_DIR)
    return {"image_size": list(image.shape[-2:]), "padded_size": list(record["x"].shape[-2:]), "files": shapes,
            "corner": corner}


def worst_case_outputs(integer_model: IntegerModel) -> dict[str, tuple[Tensor, Tensor]]:
    """Per output channel, the lowest and highest value before the clamp of each row-engine layer.

    Over every input in range: ctx1 reads latents in the activation range, ctx2 and ep read
    a LeakyReLU output in ``[leaky(-act), act]``. Keys: ``ctx1``, ``ctx2``, ``ep_mean`` (ep's
    even channels) and ``pdf_index`` (its odd channels).
    """
    act = integer_model.hw.latent_hw.act_max
    after_leaky = int(fxp.leaky_relu(torch.tensor(-act)))
    input_ranges = {topology.CTX1: (-act, act), topology.CTX2: (after_leaky, act), topology.EP: (after_leaky, act)}
    outputs = {}
    for short, (in_lo, in_hi) in input_ranges.items():
        layer = integer_model.context[short]
        positive, negative = layer.weight.clamp(min=0), layer.weight.clamp(max=0)
        acc_hi = (positive * in_hi + negative * in_lo).sum(dim=(1, 2, 3))
        acc_lo = (positive * in_lo + negative * in_hi).sum(dim=(1, 2, 3))
        lo, hi = (layer.requantize(acc.to(torch.int64).view(1, -1, 1, 1), clamped=False).view(-1)
                  for acc in (acc_lo, acc_hi))
        if short == topology.EP:
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
    w1, w2 = integer_model.context[topology.CTX1].weight, integer_model.context[topology.CTX2].weight
    wanted = sign * w2[channel].sum(dim=(1, 2))  # [2M]: how much each ctx1 channel should rise
    drive = torch.einsum("j,jihw->ih", wanted, w1)  # [M, 3]: rise of that wish per latent (channel, row)
    return torch.where(drive >= 0, 1, -1) * fxp.latent_bound(integer_model.hw.latent_hw)


def _aimed_hyper_row(integer_model: IntegerModel, channel: int, sign: int) -> Tensor:
    """A full-scale hyper output row [2M] that pushes ep's output ``channel`` towards ``sign``.

    The hyper output enters the channel addition directly, so each of ep's input channels
    can be set to the sign of its total weight in ``channel``.
    """
    wanted = sign * integer_model.context[topology.EP].weight[channel].sum(dim=(1, 2))
    return torch.where(wanted >= 0, 1, -1) * integer_model.hw.latent_hw.act_max


# One corner-case cycle: (pattern, rows). Full-scale inputs are far outside what a trained
# model sees, so ctx1 and the channel addition saturate both ways, and latents far from their
# means give symbols at +-127. ctx2 (which reads ctx1 after the LeakyReLU) and ep (which reads
# the channel addition after it) need inputs aimed at one output channel: "<clamp>:<side>"
# aims at a channel whose worst case lies furthest beyond that side of the clamp.
CORNER_CYCLE = (("signs", 1), ("high", 1), ("low", 1), ("uniform", 1), ("alternating", 1),
                ("ctx2:above", 3), ("ctx2:below", 3), ("ep_mean:above", 1), ("ep_mean:below", 1),
                ("pdf_index:above", 1), ("zeros", 1))
AIM_CANDIDATES = 8  # the seed picks the aimed channel among this many most promising ones


def corner_case_inputs(integer_model: IntegerModel, height: int, width: int, seed: int,
                       worst: dict[str, tuple[Tensor, Tensor]] | None = None) -> tuple[Tensor, Tensor]:
    """A latent ``y`` and hyper output [1, C, height, width] that drive the row engine into its clamps.

    The rows follow :data:`CORNER_CYCLE`; ``seed`` draws the random values and aimed channels;
    ``worst`` is :func:`worst_case_outputs` of the model if the caller already has it.
    """
    hw, m = integer_model.hw.latent_hw, integer_model.M  # the row engine's datapath
    y_max, act = fxp.latent_bound(hw), hw.act_max
    worst = worst_case_outputs(integer_model) if worst is None else worst
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
    act = integer_model.hw.latent_hw.act_max
    bounds = {"pdf_index": (0, fxp.SCALE_INDEX_MAX)}
    unreachable = []
    worst = worst_case_outputs(integer_model)
    for name, (lowest, highest) in worst.items():
        lo, hi = bounds.get(name, (-act, act))
        unreachable += [f"{name}.below"] * (int(lowest.min()) >= lo) + [f"{name}.above"] * (int(highest.max()) <= hi)
    wanted = [f"{name}.{side}" for name in CORNER_CLAMPS for side in ("below", "above")
              if f"{name}.{side}" not in unreachable]
    best = None
    for seed in range(CORNER_SEEDS):
        y, hyper = corner_case_inputs(integer_model, height, width, seed, worst)
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
