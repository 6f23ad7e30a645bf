"""Quantization-aware layers of StreamLIC.

Each layer has two numerics, chosen by its ``quantized`` flag (set by the model's stage API):

* float: ordinary float arithmetic; learned activation ranges are tracked while training.
* quantized: the exact integer datapath of DESIGN §3, built from :mod:`streamlic.fixedpoint`
  on integer-valued tensors, with straight-through gradients taken from a real-valued
  surrogate of the same computation. In float64 this path is bit-exact with the integer
  reference model; in float32 it is the training approximation.

``integer_params()`` is the single source of every exported integer (weights, biases,
multipliers, shifts): the quantized forward, the integer reference model and the exporter
all read it.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fixedpoint as fxp
from .config import HardwareConfig

log = logging.getLogger(__name__)

# Running-max tracking of activation ranges (DESIGN §3): the EMA momentum grows 1 % per step
# from 0.5 to 0.999; a batch maximum above the running max pulls it up by 1 %.
MOMENTUM_START = 0.5
MOMENTUM_END = 0.999
MOMENTUM_GROWTH = 1.01
PULL_UP = 0.01
# Input statistics of the block-sparse layers use a slower-starting EMA.
STATS_MOMENTUM_START = 0.1
STATS_MOMENTUM_GROWTH = 1.001
SCALE_FLOOR = 2.0**-31


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_ste(x: Tensor) -> Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return _RoundSTE.apply(x)


def requantize_with_factor(acc: Tensor, factor: Tensor, bias_half: Tensor, lo, hi, residual_bits: int) -> Tensor:
    """:func:`fixedpoint.requantize` with ``factor = m * 2**-k`` and ``bias_half = b + 2**(r-1)`` precomputed.

    ``acc * factor`` rounds exactly like ``(acc * m) * 2**-k`` (a power of two only moves the exponent),
    and the floor division of an integer by ``2**r`` is the rounding shift's ``>> r``.
    """
    v = torch.floor(acc * factor)
    v += bias_half
    return torch.div(v, 2**residual_bits, rounding_mode="floor").clamp_(lo, hi)


class _RequantizeSTE(torch.autograd.Function):
    """The exact requantization in the accumulator's dtype, with the gradient of its real-valued
    surrogate ``(acc * m / 2**k + b) / 2**r`` inside the clamp. One fused step: the QAT hot path.
    """

    @staticmethod
    def forward(ctx, acc, bias_half, factor, lo, hi, residual_bits):
        q = requantize_with_factor(acc, factor, bias_half, lo, hi, residual_bits)
        if isinstance(lo, Tensor) or lo != -hi:
            inside = (q > lo) & (q < hi)
        else:
            inside = q.abs() < hi
        ctx.save_for_backward(inside, factor)
        ctx.residual_bits = residual_bits
        return q

    @staticmethod
    def backward(ctx, grad):
        inside, factor = ctx.saved_tensors
        grad = grad * inside
        grad_acc = grad * factor * 2.0**-ctx.residual_bits if ctx.needs_input_grad[0] else None
        grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_bias = grad.sum(dim=(0, 2, 3), keepdim=True) * 2.0**-ctx.residual_bits
        return grad_acc, grad_bias, None, None, None, None


def requantize_ste(acc: Tensor, bias_half: Tensor, factor: Tensor, lo, hi, hw: HardwareConfig) -> Tensor:
    """Integer output of a convolution (``bias_half = b + 2**(r-1)``, ``factor = m * 2**-k``, shaped
    [1, C, 1, 1]), straight-through."""
    if torch.is_grad_enabled() and (acc.requires_grad or bias_half.requires_grad):
        return _RequantizeSTE.apply(acc, bias_half, factor, lo, hi, hw.residual_bits)
    return requantize_with_factor(acc, factor, bias_half, lo, hi, hw.residual_bits)


class _QuantizeWeight(torch.autograd.Function):
    """``q_w = round(clamp(w, +-max|w_c|) / s_w)`` formed in float64, straight-through gradient.

    Computed as ``clamp(round(w / s_w), +-round(max|w_c| / s_w))``: rounding is monotone and the
    bound is an integer, so the integers are the same, with fewer ops. The gradient is that of
    ``clamp(w, +-max|w_c|) / s_w`` at the training precision (times the block mask, if any), whole
    at ``|w| = max|w_c|`` too (autograd's clamp with tensor bounds gave half there).
    """

    @staticmethod
    def forward(ctx, weight, scale64, lower64, upper64, scale, absmax, mask):
        q = torch.round(weight.detach().double() / scale64)
        q = torch.clamp(q, lower64, upper64).to(weight.dtype)
        if mask is not None:
            q = q.mul_(mask)
        ctx.save_for_backward(weight, scale, absmax, mask)
        return q

    @staticmethod
    def backward(ctx, grad):
        weight, scale, absmax, mask = ctx.saved_tensors
        grad = grad * (weight.abs() <= absmax) / scale
        return (grad if mask is None else grad * mask), None, None, None, None, None, None


class _QuantizeBias(torch.autograd.Function):
    """``clamp(round(quotient(b)), +-bias_max) + offset`` with ``quotient`` evaluated in float64.

    An integer of the datapath must not depend on the training precision (float32 and float64
    round a quotient near .5 differently). ``gradient`` is the derivative of the (linear)
    quotient; no gradient flows where the bias integer is clamped.
    """

    @staticmethod
    def forward(ctx, bias, quotient, gradient, bound, offset):
        v = quotient(bias.detach().double())
        q = torch.round(v).clamp_(-bound, bound)
        if offset:
            q += offset
        ctx.save_for_backward(gradient * (v.abs() <= bound))
        return q.to(bias.dtype)

    @staticmethod
    def backward(ctx, grad):
        (gradient,) = ctx.saved_tensors
        return grad.reshape(gradient.shape) * gradient, None, None, None, None


def straight_through(surrogate: Tensor, exact: Tensor) -> Tensor:
    """Value of ``exact`` with the gradient of ``surrogate``."""
    return surrogate + (exact - surrogate).detach()


def weight_scale_of(absmax: Tensor, hw: HardwareConfig) -> Tensor:
    """Per-channel weight scale of a captured ``max|w_c|`` (an all-zero channel gets a tiny scale)."""
    return fxp.weight_scale(torch.clamp(absmax, min=SCALE_FLOOR), hw)


def _per_channel(t: Tensor) -> Tensor:
    return t.reshape(1, -1, 1, 1)


def running_max_update(absmax: Tensor, momentum: Tensor, batch_max: Tensor) -> tuple[Tensor, Tensor]:
    """New running max and momentum of activation ranges (elementwise: one layer or many stacked)."""
    momentum = torch.clamp(momentum * MOMENTUM_GROWTH, MOMENTUM_START, MOMENTUM_END)
    ema = absmax * momentum + batch_max * (1 - momentum)
    pulled = absmax * (1 - PULL_UP) + batch_max * PULL_UP
    first = absmax == 0
    return torch.where(first, batch_max, torch.where(batch_max < absmax, ema, pulled)), momentum


class RangeTracker:
    """Collects the batch maxima of many layers during a forward and updates their running maxima
    in one vectorised step (a dozen ops for the whole network instead of a dozen per layer).

    The running maxima are only read once QAT freezes them, so deferring the update to the end
    of the forward changes nothing; the numbers are those of the per-layer update.
    """

    def __init__(self):
        self.pending: list[tuple[QuantLayer, Tensor]] = []

    @torch.no_grad()
    def flush(self) -> None:
        if not self.pending:
            return
        layers = [layer for layer, _ in self.pending]
        batch_max = torch.stack([value for _, value in self.pending])
        self.pending.clear()
        absmax, momentum = running_max_update(torch.stack([layer.act_absmax for layer in layers]),
                                              torch.stack([layer.act_momentum for layer in layers]), batch_max)
        torch._foreach_copy_([layer.act_absmax for layer in layers], list(absmax.unbind()))
        torch._foreach_copy_([layer.act_momentum for layer in layers], list(momentum.unbind()))


class QuantLayer(nn.Module):
    """Base of layers with a quantized output: activation range, frozen scales, stage flags."""

    def __init__(self, hw: HardwareConfig, fixed_scale: float | None = None, out_bound: int | None = None):
        super().__init__()
        self.hw = hw
        self.fixed_scale = fixed_scale
        self.out_bound = hw.act_max if out_bound is None else out_bound
        self.quantized = False
        self.scales_frozen = False
        self.layer_name = self.__class__.__name__
        initial = 0.0 if fixed_scale is None else fixed_scale * hw.act_max
        self.register_buffer("act_absmax", torch.tensor(initial))
        self.register_buffer("act_momentum", torch.tensor(MOMENTUM_START / MOMENTUM_GROWTH))
        self.register_buffer("in_scale", torch.tensor(1.0))
        self.raised_range: tuple[float, float] | None = None
        self.range_tracker: RangeTracker | None = None
        self._integer_cache: dict[str, tuple] = {}

    def _reuse(self, name: str, compute, *sources):
        """``compute()``, reused while its ``sources`` are unchanged and no gradient is needed.

        Stage 4 freezes the encoder and stage 5 everything but the tables, and the row loop
        calls the context layers once per latent row: their integer weights need not be
        formed again each time. A source changed in place (an optimizer step, a loaded state)
        bumps its version counter; a moved or converted one has new storage; flags among the
        sources are compared by value.
        """
        tensors = [t for t in sources if isinstance(t, Tensor)]
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            return compute()  # a compiled graph computes (and fuses) it in place of the cache
        key = tuple((t._version, t.data_ptr(), t.dtype) if isinstance(t, Tensor) else t for t in sources)
        cached = self._integer_cache.get(name)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, compute())
            self._integer_cache[name] = cached
        return cached[1]

    @property
    def out_scale(self) -> Tensor:
        return self._scale_of(self.act_absmax)

    def _scale_of(self, act_absmax: Tensor) -> Tensor:
        """Output scale for the running max ``act_absmax`` (in its dtype)."""
        if self.fixed_scale is not None:
            return act_absmax.new_tensor(self.fixed_scale)
        return fxp.activation_scale(torch.clamp(act_absmax, min=SCALE_FLOOR * self.hw.act_max), self.hw)

    @torch.no_grad()
    def track_range(self, out: Tensor) -> None:
        """Update the running max of ``|out|`` without a host sync.

        With a ``range_tracker`` (the model sets one) the update is deferred to the tracker's
        :meth:`RangeTracker.flush`, which updates every layer at once.
        """
        if self.fixed_scale is not None or self.scales_frozen:
            return
        batch_max = torch.linalg.vector_norm(out.detach(), float("inf")).to(self.act_absmax.dtype)  # max |out|
        if self.range_tracker is not None:
            self.range_tracker.pending.append((self, batch_max))
            return
        absmax, momentum = running_max_update(self.act_absmax, self.act_momentum, batch_max)
        self.act_absmax.copy_(absmax)
        self.act_momentum.copy_(momentum)

    def _raise_range_to(self, floor: Tensor) -> None:
        """Widen a learned activation range that is too narrow for a 16-bit multiplier.

        Records ``(old, new)`` in ``raised_range`` for the model's one summary line.
        """
        if self.fixed_scale is None and bool(self.act_absmax < floor):
            self.raised_range = (float(self.act_absmax), float(floor))
            self.act_absmax.copy_(floor)

    def freeze(self, in_scale: Tensor | float) -> Tensor:
        """Capture weight scales and multipliers for the given input scale; returns the output scale.

        A layer whose scales are already frozen keeps them: re-entering QAT never recaptures.
        """
        if not self.scales_frozen:
            with torch.no_grad():
                self.in_scale.copy_(torch.as_tensor(in_scale, dtype=self.in_scale.dtype))
                self._capture()
            self.scales_frozen = True
        return self.out_scale

    def _capture(self) -> None:
        raise NotImplementedError

    def _fake_quant_fixed(self, out: Tensor) -> Tensor:
        """Float-mode output of a fixed-scale layer: clamped to its range and on its grid."""
        scale = self.fixed_scale
        bound = self.out_bound * scale
        return round_ste(torch.clamp(out, -bound, bound) / scale) * scale


class QConv2d(QuantLayer):
    """Convolution with per-channel symmetric weights and a requantized output.

    Integer datapath: ``acc = sum(q_in * q_w)``, ``q_out = clamp(rshift_round(((acc * m) >> k) + b_q, r))``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 hw: HardwareConfig | None = None, fixed_scale: float | None = None, out_bound: int | None = None):
        super().__init__(hw, fixed_scale, out_bound)
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = (kh, kw)
        self.stride = stride
        self.padding = padding
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kh, kw))
        self.bias = nn.Parameter(torch.empty(out_channels))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(in_channels * kh * kw)
        nn.init.uniform_(self.bias, -bound, bound)
        self.register_buffer("weight_absmax", torch.ones(out_channels))
        self.register_buffer("req_m", torch.ones(out_channels))
        self.register_buffer("req_k", torch.zeros(out_channels))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, fixed_scale={self.fixed_scale}")

    # -- weights ------------------------------------------------------------------------
    def effective_weight(self) -> Tensor:
        """Float weight as the layer uses it (sparse layers apply their mask here)."""
        return self.weight

    def weight_scale(self) -> Tensor:
        return weight_scale_of(self.weight_absmax, self.hw)

    def _integer_weight_surrogate(self) -> Tensor:
        """``q_w = round(clamp(w, +-max|w_c|) / s_w)`` (formed in float64) with a straight-through gradient."""
        frozen = self._frozen()
        return _QuantizeWeight.apply(self.weight, frozen["weight_scale64"], frozen["weight_bound64_neg"],
                                     frozen["weight_bound64"], frozen["weight_scale"], frozen["weight_absmax"],
                                     self._weight_mask())

    def _weight_mask(self) -> Tensor | None:
        """The block mask applied to the weights (sparse layers), or None."""
        return None

    def _frozen(self) -> dict[str, Tensor]:
        """Everything derived from the scales and multipliers frozen when QAT starts, computed once.

        Recomputed when one of them changes (a loaded state, a conversion: ``_reuse``'s version
        and storage keys).
        """
        return self._reuse("frozen", self._compute_frozen, self.in_scale, self.act_absmax, self.weight_absmax,
                           self.req_m, self.req_k)

    def _compute_frozen(self) -> dict[str, Tensor]:
        absmax = self.weight_absmax.view(-1, 1, 1, 1)
        scale64 = weight_scale_of(absmax.double(), self.hw)
        lo, hi = self._output_bounds()
        return {
            "in_scale": self.in_scale.clone(),
            "weight_absmax": absmax.clone(),
            "weight_scale": weight_scale_of(absmax, self.hw),
            "weight_scale64": scale64,
            "weight_bound64": torch.round(absmax.double() / scale64),
            "weight_bound64_neg": -torch.round(absmax.double() / scale64),
            # the bias quotient b * 2**r / s_out, divided by s_out / 2**r in one step (the same float)
            "bias_divisor64": self._scale_of(self.act_absmax.double()) * 2.0**-self.hw.residual_bits,
            "bias_gradient": self._bias_gradient(),
            "factor": _per_channel(torch.ldexp(self.req_m, -self.req_k)),
            "lo": lo, "hi": hi,
            "scale_map": self.output_scale_map(),
        }

    def _bias_quotient(self, bias64: Tensor) -> Tensor:
        """The real bias integer before rounding, ``2**r * b / s_out``, in float64."""
        return bias64 / self._frozen()["bias_divisor64"]

    def _bias_gradient(self) -> Tensor:
        """Derivative of :meth:`_bias_quotient` (at the training precision)."""
        return (2.0**self.hw.residual_bits / self.out_scale).expand(self.out_channels)

    def _bias_integers(self, offset: float = 0.0) -> Tensor:
        """``clamp(round(2**r b / s_out), +-bias_max) + offset``, straight-through gradient."""
        return _QuantizeBias.apply(self.bias, self._bias_quotient, self._frozen()["bias_gradient"],
                                   float(self.hw.bias_max), offset)

    def _requant_factor(self) -> Tensor:
        """Real factor ``m / 2**k ~= 2**r s_in s_w / s_out`` per output channel."""
        return (2.0**self.hw.residual_bits) * self.in_scale * self.weight_scale() / self.out_scale

    def _capture(self) -> None:
        self.weight_absmax.copy_(self.effective_weight().detach().abs().amax(dim=(1, 2, 3)))
        self._raise_range_to(fxp.min_output_range(self._requant_factor() * self.out_scale, self.hw))
        m, k = fxp.to_multiplier(self._requant_factor().double(), self.hw, self.layer_name)
        self.req_m.copy_(m)
        self.req_k.copy_(k)

    def _output_bounds(self) -> tuple[Tensor | float, Tensor | float]:
        return -self.out_bound, self.out_bound

    def integer_params(self) -> dict[str, Tensor]:
        """The integers the hardware holds for this layer (float tensors with integer values)."""
        with torch.no_grad():
            return {
                "weight": self._integer_weight_surrogate().detach(),
                "bias": self._bias_integers().detach(),
                "scale_param": self.req_m.clone(),
                "scale_shift": self.req_k.clone(),
            }

    # -- forward ------------------------------------------------------------------------
    def _conv(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight, None, self.stride, self.padding)

    def output_scale_map(self) -> Tensor:
        """Real value of one integer step of each output channel."""
        return self.out_scale

    def forward(self, x: Tensor) -> Tensor:
        if self.quantized:
            return self._forward_quantized(x) * self._frozen()["scale_map"]
        out = self._conv(x, self.effective_weight()) + _per_channel(self.bias)
        if self.fixed_scale is not None:
            return self._fake_quant_fixed(out)
        if self.training:
            self.track_range(out)
        return out

    def _forward_quantized(self, x: Tensor) -> Tensor:
        """Integer-valued output (straight-through gradients) of the exact datapath.

        float32 sums past 2**24 may round (DESIGN §3 accepts that for training); in float64
        every step is exact.
        """
        frozen = self._frozen()
        q_in = round_ste(x / frozen["in_scale"])
        weight = self._reuse("weight", self._integer_weight_surrogate, *self._weight_sources())
        bias_half = self._reuse("bias_half", lambda: self._bias_integers(2.0 ** (self.hw.residual_bits - 1)),
                                self.bias, self.act_absmax)
        acc = self._conv(q_in, weight)
        return requantize_ste(acc, _per_channel(bias_half), frozen["factor"], frozen["lo"], frozen["hi"], self.hw)

    def _weight_sources(self) -> tuple:
        """What the integer weights are computed from."""
        return self.weight, self.weight_absmax


class QUpsampleConv2d(QConv2d):
    """Pad 1, 2x2 conv to 4*C_out channels, pixel-shuffle x2, crop 1 pixel: exactly 2H x 2W.

    The module is the convolution itself (not a wrapper), so its parameters sit directly at
    its path (``g_s.0.weight``), the path the research code's parameter dict uses.
    """

    def __init__(self, in_channels: int, out_channels: int, hw: HardwareConfig, fixed_scale: float | None = None):
        super().__init__(in_channels, 4 * out_channels, 2, 1, 0, hw=hw, fixed_scale=fixed_scale)

    def forward(self, x: Tensor) -> Tensor:
        return F.pixel_shuffle(super().forward(F.pad(x, (1, 1, 1, 1))), 2)[:, :, 1:-1, 1:-1]


class QLeakyReLU(nn.Module):
    """LeakyReLU with slope 1/64; on integers a negative ``v`` becomes ``(v + 32) >> 6``."""

    def __init__(self):
        super().__init__()
        self.quantized = False
        self.register_buffer("in_scale", torch.tensor(1.0))

    def freeze(self, in_scale):
        self.in_scale.copy_(torch.as_tensor(in_scale, dtype=self.in_scale.dtype))
        return self.in_scale

    def forward(self, x: Tensor) -> Tensor:
        if not self.quantized:
            return F.leaky_relu(x, 2.0**-fxp.LEAKY_SHIFT)
        if torch.is_grad_enabled() and x.requires_grad:
            return _QuantizedLeakyReLU.apply(x, self.in_scale)
        return fxp.leaky_relu(torch.round(x / self.in_scale)) * self.in_scale


class _QuantizedLeakyReLU(torch.autograd.Function):
    """Integer LeakyReLU of ``round(x / s)`` (times ``s``) with the float LeakyReLU's gradient."""

    @staticmethod
    def forward(ctx, x, in_scale):
        ctx.save_for_backward(x)
        return fxp.leaky_relu(torch.round(x / in_scale)) * in_scale

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.leaky_relu_backward(grad, x, 2.0**-fxp.LEAKY_SHIFT, False), None


class ChannelAddition(nn.Module):
    """Split the channels into halves and add them, clamped to the activation range.

    Both halves are at the same fixed scale, so the sum is exact on integers.
    """

    def __init__(self, hw: HardwareConfig, scale: float):
        super().__init__()
        self.hw = hw
        self.scale = scale

    def freeze(self, in_scale):
        return in_scale

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        # the scale is a power of two: the sum and the clamp are exact on the real values
        return fxp.clamp_symmetric(a + b, self.hw.act_max * self.scale)


class LAGC(QuantLayer):
    """Locally adaptive gain control: ``out = x * (gamma * tanh(affine(x)) + beta + 1)``.

    The integer version folds the sign of gamma into the affine conv (tanh is odd), reads
    tanh from a table, requantizes the gain per channel and multiplies with a floor shift.
    """

    def __init__(self, channels: int, hw: HardwareConfig):
        super().__init__(hw)
        self.channels = channels
        self.affine = nn.Conv2d(channels, channels, 1, bias=True)
        self.gain = nn.Conv2d(channels, channels, 1, groups=channels, bias=True)  # gamma, beta
        nn.init.zeros_(self.affine.bias)
        self.register_buffer("affine_absmax", torch.ones(channels))
        self.register_buffer("gain_scale", torch.ones(channels))
        self.register_buffer("affine_m", torch.ones(channels))
        self.register_buffer("affine_k", torch.zeros(channels))
        self.register_buffer("out_m", torch.ones(channels))
        self.register_buffer("out_k", torch.zeros(channels))
        self.register_buffer("tanh_lut", fxp.tanh_table(hw).float(), persistent=False)

    @property
    def tanh_in_scale(self) -> float:
        return 2.0**-self.hw.tanh_in_shift

    @property
    def tanh_out_scale(self) -> float:
        return 2.0**-self.hw.tanh_out_shift

    def _gamma_beta(self) -> tuple[Tensor, Tensor]:
        return self.gain.weight.view(-1), self.gain.bias

    def _capture(self) -> None:
        hw = self.hw
        gamma, beta = self._gamma_beta()
        self.affine_absmax.copy_(self.affine.weight.detach().abs().amax(dim=(1, 2, 3)))
        self.gain_scale.copy_(fxp.lagc_gain_scale(gamma.detach(), beta.detach(), hw))
        s_wa = weight_scale_of(self.affine_absmax, hw)
        affine_factor = (2.0**hw.residual_bits) * self.in_scale * s_wa / self.tanh_in_scale
        m, k = fxp.to_multiplier(affine_factor.double(), hw, f"{self.layer_name}.affine")
        self.affine_m.copy_(m)
        self.affine_k.copy_(k)
        self._raise_range_to(fxp.min_output_range(self.in_scale * self.gain_scale, hw))
        m, k = fxp.to_multiplier((self.in_scale * self.gain_scale / self.out_scale).double(), hw,
                                 f"{self.layer_name}.output")
        self.out_m.copy_(m)
        self.out_k.copy_(k)

    def _frozen(self) -> dict[str, Tensor]:
        """What the frozen scales and multipliers determine, computed once (see :meth:`QConv2d._frozen`)."""
        return self._reuse("frozen", self._compute_frozen, self.in_scale, self.act_absmax, self.affine_absmax,
                           self.gain_scale, self.affine_m, self.affine_k, self.out_m, self.out_k)

    def _compute_frozen(self) -> dict[str, Tensor]:
        hw = self.hw
        absmax = self.affine_absmax.view(-1, 1, 1, 1)
        scale64 = weight_scale_of(absmax.double(), hw)
        gain_scale64 = self.gain_scale.double()
        return {
            "in_scale": self.in_scale.clone(),
            "out_scale": self.out_scale.clone(),
            "affine_absmax": absmax.clone(),
            "affine_scale": weight_scale_of(absmax, hw),
            "affine_scale64": scale64,
            "affine_bound64": torch.round(absmax.double() / scale64),
            "affine_bound64_neg": -torch.round(absmax.double() / scale64),
            "affine_factor": _per_channel(torch.ldexp(self.affine_m, -self.affine_k)),
            "output_factor": _per_channel(torch.ldexp(self.out_m, -self.out_k)),
            # (beta + 1) * 2**r / s_g and |gamma| * 2**r * s_t / s_g, each divided in one step (the same floats)
            "gain_bias_divisor64": gain_scale64 * 2.0**-hw.residual_bits,
            "gain_bias_gradient": 2.0**hw.residual_bits / self.gain_scale,
            "gain_factor_divisor64": gain_scale64 * 2.0 ** (hw.tanh_out_shift - hw.residual_bits),
            "gain_factor_scale": 2.0**hw.residual_bits * self.tanh_out_scale / self.gain_scale,
        }

    def _integer_pieces(self):
        """Integer affine weights/bias (gamma's sign folded in), gain bias, the real gain factor (with
        gradients) and the gain multiplier ``(m_g, k_g)`` formed in float64."""
        hw = self.hw
        frozen = self._frozen()
        gamma, beta = self._gamma_beta()
        sign = 1.0 - 2.0 * (gamma.detach() < 0)  # tanh is odd: gamma's sign goes into the affine conv
        q_wa = _QuantizeWeight.apply(self.affine.weight, frozen["affine_scale64"], frozen["affine_bound64_neg"],
                                     frozen["affine_bound64"], frozen["affine_scale"], frozen["affine_absmax"],
                                     None) * sign.view(-1, 1, 1, 1)
        # tanh's input scale is a power of two, so 2**r b / s_t is exact at the training precision
        b_a = round_ste(fxp.clamp_bias(self.affine.bias * (sign * 2.0 ** (hw.residual_bits + hw.tanh_in_shift)),
                                       hw))
        b_g = _QuantizeBias.apply(beta, lambda b: (b + 1.0) / frozen["gain_bias_divisor64"],
                                  frozen["gain_bias_gradient"], float(hw.bias_max), 0.0)
        gain_factor = gamma.abs() * frozen["gain_factor_scale"]
        multiplier = self._gain_multiplier(check=False)
        return q_wa, b_a, b_g, gain_factor, multiplier

    @torch.compiler.disable  # inductor's CPU code cannot vectorise to_multiplier's int32 exponent
    def _gain_multiplier(self, check: bool = True) -> tuple[Tensor, Tensor]:
        """``(m_g, k_g)`` of the gain factor ``2**r |gamma| s_t / s_g`` formed in float64, whatever the
        training precision.

        gamma trains during QAT, so its factor is held representable (the same clamp in the
        forward and the export); ``check`` only catches a non-finite gamma.
        """
        gamma, _ = self._gamma_beta()
        factor = gamma.detach().double().abs() / self._frozen()["gain_factor_divisor64"]
        if not check:  # the hot path: no host sync; to_multiplier clamps the same way
            return fxp.to_multiplier(factor, self.hw, f"{self.layer_name}.gain", check=False)
        factor = torch.where(torch.isfinite(factor), fxp.representable_factor(factor, self.hw), factor)
        return fxp.to_multiplier(factor, self.hw, f"{self.layer_name}.gain", check=True)

    def integer_params(self) -> dict[str, Tensor]:
        """The hardware's integers; the gain path ("score" in the research code's names) is ``score_*``."""
        with torch.no_grad():
            q_wa, b_a, b_g, _, _ = self._integer_pieces()
            m_g, k_g = self._gain_multiplier()
            return {
                "affine_weight": q_wa,
                "affine_bias": b_a,
                "affine_scale_param": self.affine_m.clone(),
                "affine_scale_shift": self.affine_k.clone(),
                "score_scale_param": m_g.to(q_wa.dtype),
                "score_scale_shift": k_g.to(q_wa.dtype),
                "score_bias": b_g,
                "output_scale_param": self.out_m.clone(),
                "output_scale_shift": self.out_k.clone(),
            }

    def forward(self, x: Tensor) -> Tensor:
        if self.quantized:
            return self._forward_quantized(x)
        gamma, beta = self._gamma_beta()
        # the depthwise 1x1 "gain" conv is a per-channel affine map; computed elementwise because
        # CPU backends run a depthwise conv as one small convolution per channel
        gain = torch.tanh(self.affine(x)) * _per_channel(gamma) + _per_channel(beta + 1.0)
        out = x * gain
        if self.training:
            self.track_range(out)
        return out

    def _forward_quantized(self, x: Tensor) -> Tensor:
        hw = self.hw
        half = 2.0 ** (hw.residual_bits - 1)
        frozen = self._frozen()
        q_in = round_ste(x / frozen["in_scale"])
        sources = (self.affine.weight, self.affine.bias, self.gain.weight, self.gain.bias, self.affine_absmax)
        q_wa, b_a, b_g, gain_factor, (m_g, k_g) = self._reuse("pieces", self._integer_pieces, *sources)
        acc = F.conv2d(q_in, q_wa)
        # affine conv to the tanh input scale
        a = requantize_ste(acc, _per_channel(b_a + half), frozen["affine_factor"], -hw.act_max, hw.act_max, hw)
        gain_multiplier = _per_channel(torch.ldexp(m_g, -k_g).to(acc.dtype))
        gain_bias = _per_channel(b_g)
        if torch.is_grad_enabled() and (a.requires_grad or gain_factor.requires_grad or b_g.requires_grad):
            out = _LAGCTail.apply(a, q_in, _per_channel(gain_factor), gain_bias, gain_multiplier,
                                  frozen["output_factor"], self.tanh_lut, self)
        else:  # frozen or evaluated: the exact integers alone
            out = _lagc_tail(a, q_in, gain_multiplier, gain_bias, frozen["output_factor"], self.tanh_lut, hw)[0]
        return out * frozen["out_scale"]


def _lagc_tail(a: Tensor, q_in: Tensor, gain_multiplier: Tensor, gain_bias: Tensor, output_factor: Tensor,
               table: Tensor, hw: HardwareConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """LAGC's integers after the affine conv: tanh look-up ``t``, gain ``g``, output; and ``q_in * g * f_o``.

    The steps of :func:`fixedpoint.lagc_gain` and :func:`fixedpoint.lagc_output` with the
    multipliers as factors ``m * 2**-k`` (the same floats, see :func:`requantize_with_factor`).
    """
    t = fxp.tanh_lookup(a, table)
    g = requantize_with_factor(t, gain_multiplier, gain_bias + 2.0 ** (hw.residual_bits - 1), -hw.act_max,
                               hw.act_max, hw.residual_bits)
    product = q_in * g * output_factor
    return torch.floor(product).clamp_(-hw.act_max, hw.act_max), t, g, product


class _LAGCTail(torch.autograd.Function):
    """The exact tail of LAGC (:func:`_lagc_tail`) with the gradients of its real surrogate:
    ``t = tanh(a s_in_t) / s_out_t``, ``g = clamp((t * gain_factor + b_g) / 2**r)``,
    ``out = clamp(q_in * g * f_o)``, each evaluated at the exact integers of the step before.
    """

    @staticmethod
    def forward(ctx, a, q_in, gain_factor, gain_bias, gain_multiplier, output_factor, table, layer):
        hw = layer.hw
        out, t, g, product = _lagc_tail(a, q_in, gain_multiplier, gain_bias, output_factor, table, hw)
        gain_inside = (t * gain_factor + gain_bias).abs() <= hw.act_max * 2.0**hw.residual_bits
        ctx.save_for_backward(a, q_in, t, g, gain_factor, output_factor, gain_inside, product.abs() <= hw.act_max)
        ctx.scales = (layer.tanh_in_scale, layer.tanh_out_scale, 2.0**-hw.residual_bits)
        return out

    @staticmethod
    def backward(ctx, grad):
        a, q_in, t, g, gain_factor, output_factor, gain_inside, out_inside = ctx.saved_tensors
        tanh_in_scale, tanh_out_scale, r_scale = ctx.scales
        grad_product = grad * out_inside * output_factor
        grad_q_in = grad_product * g
        grad_gain = grad_product * q_in * gain_inside  # d/d(t * gain_factor + b_g), times 2**r
        grad_t = grad_gain * (gain_factor * r_scale)
        grad_factor = (grad_gain * t).sum(dim=(0, 2, 3), keepdim=True) * r_scale
        grad_bias = grad_gain.sum(dim=(0, 2, 3), keepdim=True) * r_scale
        grad_a = torch.ops.aten.tanh_backward(grad_t * (tanh_in_scale / tanh_out_scale), torch.tanh(a * tanh_in_scale))
        return grad_a, grad_q_in, grad_factor, grad_bias, None, None, None, None


class FGPConv2d(QConv2d):
    """Block-sparse ("fine-grained pruning") convolution of DESIGN §4.

    Channels are tiled into ``PI x PO`` blocks at every kernel tap; each group of ``PO``
    output channels keeps its ``taps * group_num`` strongest (input group, tap) blocks. With
    ``pdf_index=True`` the odd output channels produce the entropy model's scale index in
    quantized mode (the fold of DESIGN §3).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, padding=0, *, hw: HardwareConfig,
                 group_num: int, fixed_scale: float | None = None, pdf_index: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, 1, padding, hw=hw, fixed_scale=fixed_scale)
        self.block_in, self.block_out = hw.block_in, hw.block_out
        self.in_groups = in_channels // self.block_in
        self.out_groups = out_channels // self.block_out
        self.group_num = group_num
        self.pdf_index = pdf_index
        self.masked = False
        self.mask_set = False
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.blocks_per_group = min(taps * group_num, taps * self.in_groups)
        self.register_buffer("mask", torch.ones(out_channels, in_channels, *self.kernel_size))
        self.register_buffer("in_mean", torch.zeros(in_channels))
        self.register_buffer("in_sqmean", torch.ones(in_channels))
        self.register_buffer("stats_momentum", torch.tensor(STATS_MOMENTUM_START))
        # in pdf-index mode the odd output channels carry the scale index
        self.register_buffer("odd_channels", torch.arange(out_channels) % 2 == 1, persistent=False)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_num={self.group_num}, pdf_index={self.pdf_index}"

    def effective_weight(self) -> Tensor:
        return self.weight * self.mask if self.masked else self.weight

    def _weight_mask(self) -> Tensor | None:
        return self.mask if self.masked else None

    def _weight_sources(self) -> tuple:
        return self.weight, self.weight_absmax, self.mask, self.masked

    # -- statistics and masks ---------------------------------------------------------------
    @torch.no_grad()
    def record_stats(self, x: Tensor) -> None:
        momentum = self.stats_momentum.mul_(STATS_MOMENTUM_GROWTH).clamp_(0.0, MOMENTUM_END)
        x = x.detach()
        # both EMAs in the same elementwise steps, each step on the pair at once
        stats = torch._foreach_mul([x.mean(dim=(0, 2, 3)), x.square().mean(dim=(0, 2, 3))], 1 - momentum)
        torch._foreach_mul_([self.in_mean, self.in_sqmean], momentum)
        torch._foreach_add_([self.in_mean, self.in_sqmean], stats)

    def input_std(self) -> Tensor:
        return torch.sqrt(torch.clamp(self.in_sqmean - self.in_mean.square(), min=0.0))

    def block_norms(self, normalize: bool = False) -> Tensor:
        """L2 norm of every ``PO x PI`` block of ``w * std(x_in)``: shape [out_groups, in_groups * kh * kw].

        Columns are ordered (input group, kh, kw), the order in which ties are broken.
        """
        std = self.input_std()
        if normalize:
            std = std / (std.max() + torch.finfo(std.dtype).eps)
        kh, kw = self.kernel_size
        # sum w^2 over each block's output channels first (a contiguous reduction), then weigh by
        # the input variance and sum over the block's input channels
        energy = self.weight.square().view(self.out_groups, self.block_out, self.in_channels, kh * kw).sum(dim=1)
        energy = (energy * std.square().view(1, -1, 1)).view(self.out_groups, self.in_groups, self.block_in, -1)
        return torch.sqrt(energy.sum(dim=2) + torch.finfo(energy.dtype).tiny).reshape(self.out_groups, -1)

    @torch.no_grad()
    def block_mask(self) -> Tensor:
        """Kept blocks as a bool tensor [out_groups, in_groups, kh, kw]."""
        kh, kw = self.kernel_size
        return self.mask[:: self.block_out, :: self.block_in].bool().view(self.out_groups, self.in_groups, kh, kw)

    @torch.no_grad()
    def set_mask(self) -> None:
        """Keep the ``taps * group_num`` strongest blocks of every output group (vectorised)."""
        norms = self.block_norms()
        keep = torch.zeros_like(norms, dtype=torch.bool)
        keep.scatter_(1, torch.topk(norms, self.blocks_per_group, dim=1, sorted=False).indices, True)
        kh, kw = self.kernel_size
        block = keep.view(self.out_groups, 1, self.in_groups, 1, kh, kw).to(self.mask.dtype)
        tiled = self.mask.view(self.out_groups, self.block_out, self.in_groups, self.block_in, kh, kw)
        tiled.copy_(block.expand_as(tiled))
        self.mask_set = True

    def group_lasso(self) -> Tensor:
        """Sum of the (input-std normalised) norms of blocks outside each group's kept set."""
        norms = self.block_norms(normalize=True)
        threshold = torch.topk(norms.detach(), self.blocks_per_group, dim=1).values[:, -1:]
        return torch.where(norms < threshold, norms, torch.zeros_like(norms)).sum()

    # -- quantization -------------------------------------------------------------------------
    def _requant_factor(self) -> Tensor:
        factor = super()._requant_factor()
        if not self.pdf_index:
            return factor
        return torch.where(self.odd_channels, fxp.scale_index_factor(factor, self.out_scale), factor)

    def _bias_quotient(self, bias64: Tensor) -> Tensor:
        b_q = super()._bias_quotient(bias64)
        if not self.pdf_index:
            return b_q
        return torch.where(self.odd_channels, fxp.scale_index_bias_quotient(bias64, self.hw), b_q)

    def _bias_gradient(self) -> Tensor:
        gradient = super()._bias_gradient()
        if not self.pdf_index:
            return gradient
        return torch.where(self.odd_channels, fxp.INDEX_PER_V * 2.0**self.hw.residual_bits, gradient)

    def _output_bounds(self):
        if not self.pdf_index:
            return super()._output_bounds()
        odd = _per_channel(self.odd_channels)
        lo = torch.where(odd, 0.0, -float(self.out_bound))
        hi = torch.where(odd, float(fxp.SCALE_LEVELS - 1), float(self.out_bound))
        return lo, hi

    def output_scale_map(self) -> Tensor:
        if not self.pdf_index:
            return self.out_scale
        # odd channels carry the scale index itself (one step = 1)
        return _per_channel(torch.where(self.odd_channels, torch.ones_like(self.bias), self.out_scale))

    def integer_params(self) -> dict[str, Tensor]:
        params = super().integer_params()
        params["mask"] = self.mask.clone()
        return params

    def forward(self, x: Tensor) -> Tensor:
        if self.training and not self.quantized and not self.masked:
            self.record_stats(x)
        return super().forward(x)
