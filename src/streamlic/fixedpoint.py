"""The fixed-point contract of docs/fixed-point.md, in one place.

Every rule that decides an integer the hardware computes lives here and nowhere else: the
QAT layers call these functions on integer-valued float tensors (float64 is exact, float32
is the training approximation), the integer reference model calls them on the exported
integers, and the exporter uses them to build multipliers, biases and tables.

Arithmetic shifts are written as ``floor(v * 2**-k)``: multiplying by a power of two is exact
in floating point, and ``floor`` is what an arithmetic right shift does to negative numbers.
All intermediate products stay below 2**53 for the configured widths, so float64 is exact.
On integer tensors (the integer reference model's int64) the same functions shift with ``>>``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import HardwareConfig
from .formats import SCALE_INDEX_MAX, SCALE_LEVELS, SYMBOL_COLUMNS, SYMBOL_MAX  # noqa: F401 - the contract names them

# sigma = 2**(log2 sigma_min + index * step) with log2 sigma_min = -111/32 and step 3/32, so a
# real entropy-parameter output v = 2 log2 sigma maps to index = (16 v + 111) / 3.
LOG2_SIGMA_MIN = -111.0 / 32.0
LOG2_SIGMA_STEP = 3.0 / 32.0
LOG2_SIGMA_MAX = LOG2_SIGMA_MIN + SCALE_INDEX_MAX * LOG2_SIGMA_STEP  # 270/32
INDEX_PER_V = 16.0 / 3.0
INDEX_OFFSET = 111.0 / 3.0  # = 37
LEAKY_SHIFT = 6  # LeakyReLU slope 1/64


class FixedPointError(ArithmeticError):
    """A value cannot be represented in the hardware's number formats."""


def shift_floor(v: Tensor, k: Tensor | int) -> Tensor:
    """Arithmetic right shift ``v >> k`` (floor division by 2**k); ``k`` may be per channel."""
    if not v.is_floating_point():
        return v >> (k.to(v.dtype) if isinstance(k, Tensor) else k)
    if isinstance(k, int):
        return torch.floor(v * (2.0**-k))
    return torch.floor(torch.ldexp(v, -k.to(v.dtype)))


def rshift_round(v: Tensor, r: int) -> Tensor:
    """``(v + 2**(r-1)) >> r``: rounding shift, ties go up (``r = 0`` leaves integers unchanged)."""
    if not v.is_floating_point():
        return v if r == 0 else (v + (1 << (r - 1))) >> r
    return torch.div(v + 2.0 ** (r - 1), 2**r, rounding_mode="floor")  # v / 2**r is exact: the floor is


def clamp_symmetric(q: Tensor, bound: int | float) -> Tensor:
    return torch.clamp(q, -bound, bound)


def to_multiplier(factor: Tensor, hw: HardwareConfig, layer: str, check: bool = True) -> tuple[Tensor, Tensor]:
    """Store a positive real factor ``f`` as ``(m, k)`` with ``m / 2**k ~= f``.

    ``k`` is the largest shift in ``[0, 2**shift_bits - 1]`` with ``f * 2**k < 2**multiplier_bits - 1``
    and ``m = round(f * 2**k)``. Returns float64 tensors holding integers. ``check=False``
    (the training hot path, which must not sync with the host) clamps instead of raising;
    the exporter always checks.
    """
    f = torch.as_tensor(factor, dtype=torch.float64)
    limit = float(hw.multiplier_max)
    if check:
        bad = ~torch.isfinite(f) | (f <= 0) | (f >= limit)
        if bool(bad.any()):
            index = int(bad.nonzero()[0, 0]) if f.dim() else 0
            value = float(f.reshape(-1)[index])
            raise FixedPointError(
                f"{layer}: requantization factor {value:.6g} (channel {index}) is outside (0, {limit:g}); "
                "a scale collapsed to zero or exploded during training"
            )
    else:
        f = representable_factor(torch.nan_to_num(f, nan=1.0), hw)
    # f = mantissa * 2**e with mantissa in [0.5, 1), exactly: f * 2**k < limit holds for k = B - e - 1
    # (at most 2**(B-1)) and fails for k = B - e + 1, so the largest k is B - e unless that reaches limit.
    # e is read from f's exponent bits (f is a normal positive float64 here): torch.frexp's int32
    # exponent does not compile with inductor on CPU.
    exponent = ((f.view(torch.int64) >> 52) - 1022).to(f.dtype)
    bits = hw.multiplier_bits
    k = (bits - exponent) - (torch.ldexp(f, bits - exponent) >= limit).to(f.dtype)  # exact in float64
    k = torch.clamp(k, 0, hw.shift_max)
    m = torch.round(torch.ldexp(f, k))
    return m, k


def representable_factor(factor: Tensor, hw: HardwareConfig) -> Tensor:
    """``factor`` clamped to what a multiplier and shift can hold: ``[2**-shift_max, 2**multiplier_bits - 2]``.

    For the one multiplier that follows a trained parameter during QAT (the LAGC gain, from
    gamma), in the forward and the export alike.
    """
    return torch.clamp(factor, 2.0**-hw.shift_max, float(hw.multiplier_max) - 1)


def min_output_range(factor_times_out_scale: Tensor, hw: HardwareConfig) -> Tensor:
    """Smallest activation range whose scale keeps ``factor = x / s_out`` below the multiplier limit.

    An output that barely varied during float training (a collapsed hyper-latent, say) would
    need a multiplier larger than 16 bits; its range is raised to this floor instead.
    """
    return factor_times_out_scale.max() * hw.act_max / (hw.multiplier_max - 1)


def requantize(acc: Tensor, m: Tensor, k: Tensor, bias: Tensor | None, hw: HardwareConfig,
               lo: float | None = None, hi: float | None = None) -> Tensor:
    """Convolution output stage: ``clamp(rshift_round(((acc * m) >> k) + b, r))``.

    ``m``, ``k`` and ``bias`` are per output channel, shaped to broadcast against ``acc``
    (``[C, 1, 1]`` for NCHW). The clamp defaults to the symmetric activation range.
    """
    lo = -hw.act_max if lo is None else lo
    hi = hw.act_max if hi is None else hi
    half = 1 << (hw.residual_bits - 1)
    # the same steps in place on one fresh tensor (a third faster on large maps)
    if not acc.is_floating_point():
        v = acc * m
        v >>= k
        v += half if bias is None else bias + half
        v >>= hw.residual_bits
        return v.clamp_(lo, hi)
    # m * 2**-k only moves m's exponent, so acc * (m * 2**-k) rounds exactly like (acc * m) * 2**-k
    v = acc * torch.ldexp(m, -k)
    v.floor_()
    v += half if bias is None else bias + half
    v *= 2.0**-hw.residual_bits
    v.floor_()
    return v.clamp_(lo, hi)


def clamp_bias(b_q: Tensor, hw: HardwareConfig) -> Tensor:
    """A bias integer held in the P-bit range the hardware stores it in.

    Applied in the QAT forward itself, so a bias that training pushes outward stops at the
    range (no gradient beyond it) and every QAT checkpoint exports what it computed.
    """
    return torch.clamp(b_q, -hw.bias_max, hw.bias_max)


def quantize_bias(quotient: Tensor, bias_max: float) -> Tensor:
    """``b_q = clamp(round(2**r * b / s_out), +-(2**(P-1) - 1))``: the bias added at the residual precision.

    ``quotient`` is the real bias integer ``2**r * b / s_out`` and ``bias_max`` the P-bit bound
    (``hw.bias_max``). The QAT layers call it through :class:`streamlic.layers.quant.QuantizeBias`
    on a float64 quotient, so the integer does not depend on the training precision.
    """
    return torch.round(quotient).clamp_(-bias_max, bias_max)


def weight_scale(weight_absmax: Tensor, hw: HardwareConfig) -> Tensor:
    """Symmetric per-channel weight scale ``max|w_c| / (2**(W-1) - 1)``."""
    return weight_absmax / hw.weight_max


def activation_scale(running_max: Tensor, hw: HardwareConfig) -> Tensor:
    """Learned activation scale: the running max of ``|out|`` over ``2**(A-1) - 1``."""
    return running_max / hw.act_max


def leaky_relu(q: Tensor) -> Tensor:
    """LeakyReLU(1/64) on integers: negative ``v`` becomes ``(v + 32) >> 6``.

    Written as ``max(v, (v + 32) >> 6)``: for ``v < 0`` the shifted value is the larger one, for
    ``v >= 0`` it is not larger than ``v`` (one op fewer than a select).
    """
    return torch.maximum(q, rshift_round(q, LEAKY_SHIFT))


def channel_add(a: Tensor, b: Tensor, hw: HardwareConfig, scale: float = 1.0) -> Tensor:
    """Sum of two tensors at the same scale, clamped to the activation range.

    ``scale``: the real value of one integer step, for tensors holding real values (a power of
    two at the fixed latent scale, so the sum and the clamp stay exact).
    """
    return clamp_symmetric(a + b, hw.act_max * scale)


# ---------------------------------------------------------------- LAGC

def tanh_table(hw: HardwareConfig) -> Tensor:
    """``t = round(tanh(i * s_in) / s_out)`` for ``i`` in ``[-A_max, A_max]`` (index ``i + A_max``).

    Input scale ``2**-(A-4)`` (range +-8), output scale ``2**-(A-2)`` (range +-1).
    """
    i = torch.arange(-hw.act_max, hw.act_max + 1, dtype=torch.float64)
    return torch.round(torch.tanh(i * 2.0**-hw.tanh_in_shift) * 2.0**hw.tanh_out_shift)


def tanh_lookup(a: Tensor, table: Tensor) -> Tensor:
    """Read the tanh table at the clamped integer ``a`` (any float dtype holding integers)."""
    act_max = (table.numel() - 1) // 2
    index = a + act_max
    if index.is_floating_point():
        # a NaN index would read out of bounds; the LAGC output stays NaN through its input, so the
        # non-finite guard still stops the run
        index = torch.nan_to_num(index, nan=float(act_max))
    return table.to(a.dtype)[index.long()]


def lagc_gain(t: Tensor, m_g: Tensor, k_g: Tensor, b_g: Tensor, hw: HardwareConfig) -> Tensor:
    """Per-channel gain ``g = clamp(rshift_round(((t * m_g) >> k_g) + b_g, r))``."""
    return requantize(t, m_g, k_g, b_g, hw)


def lagc_output(q_in: Tensor, gain: Tensor, m_o: Tensor, k_o: Tensor, hw: HardwareConfig) -> Tensor:
    """``clamp((((q_in << 16) * g) * m_o) >> (k_o + 16))``, a floor shift with no rounding term.

    The hardware's extra 16-bit left and right shifts cancel exactly, so the product is
    formed without them (which also keeps it below 2**53 in float64).
    """
    if not q_in.is_floating_point():
        # integer model: in place on one fresh tensor, as in requantize
        v = q_in * gain
        v *= m_o
        v >>= k_o
        return v.clamp_(-hw.act_max, hw.act_max)
    return clamp_symmetric(shift_floor(q_in * gain * m_o, k_o), hw.act_max)


def lagc_gain_scale(gamma: Tensor, beta: Tensor, hw: HardwareConfig) -> Tensor:
    """``s_g[c] = (|1 + beta_c| + |gamma_c|) / (2**(A-1) - 1)``."""
    return (torch.abs(1.0 + beta) + torch.abs(gamma)) / hw.act_max


# ---------------------------------------------------------------- network boundaries

def image_scale(hw: HardwareConfig) -> float:
    """Scale of the network input ``x - 0.5``: ``1 / (2 * image_max)`` (1/510 at A = 12)."""
    return 1.0 / (2 * hw.image_max)


def quantize_image(x: Tensor, hw: HardwareConfig) -> Tensor:
    """``q_x = round(2 * image_max * x) - image_max`` for ``x`` in [0, 1] (ties go up).

    For 8-bit pixels ``p`` this is exactly ``2p - 255`` at A = 12.
    """
    return torch.floor(x * (2 * hw.image_max) + 0.5) - hw.image_max


# The float stages (1 and 2) compute the fixed-scale outputs (latent, hyper, ctx2, ep and the
# channel addition) on the grid and in the range of the 12-bit datapath, whatever the hardware
# config: float training does not depend on the bit widths, and QAT entry moves every layer to
# the hardware's own grid 2**-(A-8) (docs/fixed-point.md, "Float stages").
FLOAT_STAGE_HARDWARE = HardwareConfig()


def fixed_scale_range(hw: HardwareConfig, latent: bool) -> tuple[float, float]:
    """Grid step and real bound of a fixed-scale output (``latent``: the latent ``y``) on datapath ``hw``."""
    bound = latent_bound(hw) if latent else hw.act_max
    return hw.latent_scale, bound * hw.latent_scale


def latent_bound(hw: HardwareConfig) -> int:
    """Latent ``y`` at scale ``2**-(A-8)`` keeps the 8-bit symbol range: +-127 * 2**(A-8)."""
    return SYMBOL_MAX * 2**hw.latent_shift


def clamp_latent(y_q: Tensor, hw: HardwareConfig) -> Tensor:
    return clamp_symmetric(y_q, latent_bound(hw))


def hyper_symbols(z_q: Tensor, hw: HardwareConfig) -> Tensor:
    """``z_hat = clamp(rshift_round(z_q, A-8), +-127)``: integer symbols at scale 1."""
    return clamp_symmetric(rshift_round(z_q, hw.latent_shift), SYMBOL_MAX)


def symbol_residual(y_q: Tensor, mu_q: Tensor, hw: HardwareConfig) -> Tensor:
    """``rshift_round(y_q - mu_q, A-8)``: a latent's symbol before the clamp to +-127."""
    return rshift_round(y_q - mu_q, hw.latent_shift)


def latent_symbols(y_q: Tensor, mu_q: Tensor, hw: HardwareConfig) -> Tensor:
    """``s = clamp(rshift_round(y_q - mu_q, A-8), +-127)``."""
    return clamp_symmetric(symbol_residual(y_q, mu_q, hw), SYMBOL_MAX)


def dequantized_latent_unclamped(symbols: Tensor, mu_q: Tensor, hw: HardwareConfig) -> Tensor:
    """``2**(A-8) * s + mu_q`` before the clamp of :func:`dequantize_latent`."""
    return symbols * 2**hw.latent_shift + mu_q


def dequantize_latent(symbols: Tensor, mu_q: Tensor, hw: HardwareConfig) -> Tensor:
    """``y_hat_q = 2**(A-8) * s + mu_q``, kept in the activation range the context layers read."""
    return clamp_symmetric(dequantized_latent_unclamped(symbols, mu_q, hw), hw.act_max)


# ---------------------------------------------------------------- scale index ("pdf index")

def scale_index_factor(factor: Tensor, out_scale: Tensor | float) -> Tensor:
    """Fold ``index = (16 v + 111) / 3`` into the requantization factor of a layer's odd channels.

    ``factor`` is ``2**r s_in s_w / s_out``; the folded one is ``2**r s_in s_w * 16 / 3``, so the
    integer layer outputs the scale index directly (then clamped to [0, SCALE_INDEX_MAX]).
    """
    return factor * (INDEX_PER_V * out_scale)


def scale_index_bias(bias: Tensor, hw: HardwareConfig) -> Tensor:
    """Folded integer bias of the odd channels: ``round(2**r * (16 b / 3 + 37))``, P-bit clamped."""
    return quantize_bias(scale_index_bias_quotient(bias, hw), hw.bias_max)


def scale_index_bias_quotient(bias: Tensor, hw: HardwareConfig) -> Tensor:
    """``2**r * (16 b / 3 + 37)``: the folded bias of :func:`scale_index_bias` before rounding and clamping."""
    return (bias * INDEX_PER_V + INDEX_OFFSET) * 2.0**hw.residual_bits


def scale_index_from_v(v: Tensor) -> Tensor:
    """Real-valued index of a float model's odd output ``v = 2 log2 sigma`` (unclamped, unrounded)."""
    return v * INDEX_PER_V + INDEX_OFFSET


def sigma_from_index(index: Tensor) -> Tensor:
    """The scale level of (a possibly fractional, for gradients) index."""
    return torch.exp2(LOG2_SIGMA_MIN + index * LOG2_SIGMA_STEP)


def sigma_levels(dtype: torch.dtype = torch.float64) -> Tensor:
    return sigma_from_index(torch.arange(SCALE_LEVELS, dtype=dtype))


def sigma_from_v(v: Tensor) -> Tensor:
    """Float-model scale: ``sigma = 2**(v / 2)`` clamped to ``[sigma_min, sigma_max]``."""
    return torch.exp2(torch.clamp(v * 0.5, LOG2_SIGMA_MIN, LOG2_SIGMA_MAX))


def accumulator_bits(max_abs: float) -> int:
    """Signed width that holds ``+-max_abs``."""
    return 1 + max(1, math.ceil(math.log2(max_abs + 1))) if max_abs > 0 else 1
