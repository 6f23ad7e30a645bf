"""The integer layers of the reference model: exact sums, requantization, LAGC, block-sparse rows.

Every tensor is int64 and every fixed-point rule comes from :mod:`streamlic.fixedpoint`.
Convolution sums are formed in float64, which is exact because each layer checks that its
worst-case sum stays below 2**53.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import fixedpoint as fxp
from .config import HardwareConfig

FLOAT64_EXACT = 2**53
NO_CLAMP = 2**62  # an output "bound" no int64 value of the datapath reaches: the value before a clamp


def as_int64(t: Tensor) -> Tensor:
    return t.detach().cpu().to(torch.int64)


def per_channel(t: Tensor) -> Tensor:
    """Per-output-channel vector shaped to broadcast against [B, C, H, W]."""
    return t.reshape(-1, 1, 1)


def _accumulate(q: Tensor, weight: Tensor, stride: int = 1, padding=0) -> Tensor:
    """Exact ``sum(q_in * q_w)`` of a convolution (float64 sums of integers below 2**53).

    Every partial sum is an integer below 2**53, so any summation order gives the same
    exact result; the layout is chosen for speed only. A stride-2 convolution with an even
    kernel becomes a stride-1 one on the space-to-depth input (``pixel_unshuffle``), and
    stride-1 convolutions run as one matrix product per kernel tap (below), which is
    several times faster on a CPU than float64 ``conv2d`` for thin layers.
    """
    x = q.to(torch.float64)
    if padding:
        pad_h, pad_w = (padding, padding) if isinstance(padding, int) else padding
        x = F.pad(x, (pad_w, pad_w, pad_h, pad_h))
    out_c, in_c, kh, kw = weight.shape
    if stride == 2 and kh % 2 == kw % 2 == x.shape[2] % 2 == x.shape[3] % 2 == 0:
        # x_pad[2r + a, 2c + b] with a = 2a' + i, b = 2b' + j is channel (i, j) of the
        # unshuffled input at (r + a', c + b')
        x = F.pixel_unshuffle(x, 2)
        weight = (weight.reshape(out_c, in_c, kh // 2, 2, kw // 2, 2).permute(0, 1, 3, 5, 2, 4)
                  .reshape(out_c, 4 * in_c, kh // 2, kw // 2))
    elif stride != 1:
        return F.conv2d(x, weight, None, stride).to(torch.int64)
    return _accumulate_by_taps(x, weight)


def _accumulate_by_taps(x: Tensor, weight: Tensor) -> Tensor:
    """Stride-1, unpadded convolution as ``sum over taps of W[:, :, i, j] @ x shifted by (i, j)``.

    The image is flattened row-major, so the input of tap (i, j) for every output pixel is
    one contiguous slice starting at ``i * width + j``; the last ``kw - 1`` columns of each
    output row wrap around the image edge and are cropped.
    """
    batch, in_c, height, width = x.shape
    out_c, _, kh, kw = weight.shape
    out_h, out_w = height - kh + 1, width - kw + 1
    span = (out_h - 1) * width + out_w
    flat = x.reshape(batch, in_c, height * width)
    taps = weight.permute(2, 3, 0, 1).contiguous()
    acc = x.new_empty(batch, out_c, out_h * width)
    for b in range(batch):
        out = acc[b, :, :span]
        for i in range(kh):
            for j in range(kw):
                shifted = flat[b, :, i * width + j:i * width + j + span]
                if i == 0 and j == 0:
                    torch.mm(taps[i, j], shifted, out=out)
                else:
                    out.addmm_(taps[i, j], shifted)
    return acc.view(batch, out_c, out_h, width)[..., :out_w].to(torch.int64)


class IntegerConv:
    """One requantized convolution: float64 integer weights, int64 multipliers, shifts and biases."""

    def __init__(self, name: str, p: dict[str, Tensor], hw: HardwareConfig, in_bound: int,
                 stride: int = 1, padding=0, lo: Tensor | int | None = None, hi: Tensor | int | None = None):
        self.name, self.hw, self.stride, self.padding = name, hw, stride, padding
        self.weight = p["weight"].to(torch.float64)
        self.m, self.k = per_channel(as_int64(p["scale_param"])), per_channel(as_int64(p["scale_shift"]))
        self.bias = per_channel(as_int64(p["bias"]))
        self.lo, self.hi = lo, hi
        _check_float64_exact(name, self.weight, in_bound)

    def requantize(self, acc: Tensor, clamped: bool = True) -> Tensor:
        """The output integers of an accumulator; ``clamped=False`` gives them before the output clamp."""
        lo, hi = (self.lo, self.hi) if clamped else (-NO_CLAMP, NO_CLAMP)
        return fxp.requantize(acc, self.m, self.k, self.bias, self.hw, lo, hi)

    def accumulate(self, q: Tensor) -> Tensor:
        return _accumulate(q, self.weight, self.stride, self.padding)

    def __call__(self, q: Tensor) -> Tensor:
        return self.requantize(self.accumulate(q))


class IntegerUpsampleConv(IntegerConv):
    """Pad 1, 2x2 conv to 4*C channels, pixel-shuffle x2, crop 1 pixel on every side."""

    def __call__(self, q: Tensor) -> Tensor:
        out = super().__call__(F.pad(q, (1, 1, 1, 1)))
        return F.pixel_shuffle(out, 2)[:, :, 1:-1, 1:-1]


class IntegerLAGC:
    """Integer LAGC: affine conv to the tanh input scale, tanh table, per-channel gain, floor-shift product."""

    def __init__(self, name: str, p: dict[str, Tensor], hw: HardwareConfig, tanh_lut: Tensor, in_bound: int):
        self.name, self.hw, self.tanh_lut = name, hw, tanh_lut
        self.affine = IntegerConv(name + ".affine", {"weight": p["affine_weight"], "bias": p["affine_bias"],
                                               "scale_param": p["affine_scale_param"],
                                               "scale_shift": p["affine_scale_shift"]}, hw, in_bound)
        self.m_g = per_channel(as_int64(p["score_scale_param"]))
        self.k_g = per_channel(as_int64(p["score_scale_shift"]))
        self.b_g = per_channel(as_int64(p["score_bias"]))
        self.m_o = per_channel(as_int64(p["output_scale_param"]))
        self.k_o = per_channel(as_int64(p["output_scale_shift"]))

    def __call__(self, q: Tensor) -> Tensor:
        t = fxp.tanh_lookup(self.affine(q), self.tanh_lut)
        gain = fxp.lagc_gain(t, self.m_g, self.k_g, self.b_g, self.hw)
        return fxp.lagc_output(q, gain, self.m_o, self.k_o, self.hw)


class BlockSparseRowConv(IntegerConv):
    """A block-sparse conv over one latent row, computing only the active blocks.

    The input row set ``[B, C_in, kh, w + 2*pad]`` is cut into one ``[PI, w]`` slab per
    (tap, input group); each output group gathers the slabs of its active blocks and
    multiplies them with its blocks' weights, concatenated: ``[PO, blocks*PI] @ [blocks*PI, w]``.
    Groups with fewer active blocks than the largest group are filled with zero blocks.
    """

    def __init__(self, name: str, p: dict[str, Tensor], hw: HardwareConfig, in_bound: int, width_padding: int,
                 engine: str, lo=None, hi=None):
        super().__init__(name, p, hw, in_bound, 1, (0, width_padding), lo, hi)
        self.engine = engine
        self.width_padding = width_padding
        weight = self.weight
        out_c, in_c, kh, kw = weight.shape
        pi, po = hw.block_in, hw.block_out
        self.taps = [(i, j) for i in range(kh) for j in range(kw)]
        self.in_groups, self.out_groups = in_c // pi, out_c // po
        blocks = block_mask(p["mask"], pi, po)  # [out_groups, in_groups, kh, kw]
        per_group = [[(tap, ig) for tap, (i, j) in enumerate(self.taps) for ig in range(self.in_groups)
                      if blocks[g, ig, i, j]] for g in range(self.out_groups)]
        width = max(1, max(len(active) for active in per_group))
        index = torch.zeros(self.out_groups, width, dtype=torch.int64)
        packed = torch.zeros(self.out_groups, po, width, pi, dtype=torch.float64)
        for g, active in enumerate(per_group):
            for slot, (tap, ig) in enumerate(active):
                i, j = self.taps[tap]
                index[g, slot] = tap * self.in_groups + ig
                packed[g, :, slot] = weight[g * po:(g + 1) * po, ig * pi:(ig + 1) * pi, i, j]
        self.slab_index = index
        self.packed_weight = packed.reshape(self.out_groups, po, width * pi)
        self.active_blocks = sum(len(active) for active in per_group)

    def accumulate(self, rows: Tensor) -> Tensor:
        if self.engine == "dense":
            return super().accumulate(rows)
        batch, _, _, width = rows.shape
        padded = F.pad(rows.to(torch.float64), (self.width_padding, self.width_padding))
        out_width = width + 2 * self.width_padding - self.weight.shape[3] + 1
        pi = self.hw.block_in
        # [B, C, kh, kw, w] windows -> one [PI, w] slab per (tap, input group), tap-major
        slabs = padded.unfold(3, out_width, 1).permute(0, 2, 3, 1, 4)
        slabs = slabs.reshape(batch, len(self.taps) * self.in_groups, pi, out_width)
        gathered = slabs.index_select(1, self.slab_index.reshape(-1))  # [B, out_groups * blocks, PI, w]
        gathered = gathered.reshape(batch, self.out_groups, -1, out_width)
        acc = torch.matmul(self.packed_weight, gathered)  # [B, out_groups, PO, w]
        return acc.reshape(batch, -1, 1, out_width).to(torch.int64)


def block_mask(mask: Tensor, block_in: int, block_out: int) -> Tensor:
    """Element mask [C_out, C_in, kh, kw] -> active blocks, bool [out_groups, in_groups, kh, kw]."""
    return mask[::block_out, ::block_in].to(torch.bool)


def _check_float64_exact(name: str, weight: Tensor, in_bound: int) -> None:
    worst = float(weight.abs().sum(dim=tuple(range(1, weight.dim()))).max()) * in_bound
    if worst >= FLOAT64_EXACT:
        raise fxp.FixedPointError(
            f"{name}: worst-case accumulator {worst:.3g} reaches 2**53; the integer model's float64 sums "
            "would not be exact")
