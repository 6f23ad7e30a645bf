"""Convolutions with a requantized output (plain and upsampling), the integer LeakyReLU, the channel addition."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import fixedpoint as fxp
from ..config import HardwareConfig
from .batch import BiasRule, Rules, WeightRule, form_integers, layer_integers
from .quant import QuantLayer, QuantizeBias, per_channel, requantize_ste, round_ste, weight_scale_of


class QConv2d(QuantLayer):
    """Convolution with per-channel symmetric weights and a requantized output.

    Integer datapath: ``acc = sum(q_in * q_w)``, ``q_out = clamp(rshift_round(((acc * m) >> k) + b_q, r))``.
    """

    # the bias integer is round(2**r b / s_out), batchable (layers.batch); a subclass that folds
    # another rule into some channels says False
    _plain_bias = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 hw: HardwareConfig | None = None, fixed_scale: float | None = None, out_bound: int | None = None,
                 float_range: tuple[float, float] | None = None):
        super().__init__(hw, fixed_scale, out_bound, float_range)
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

    def _weight_rule(self) -> WeightRule:
        frozen = self._frozen()
        return WeightRule(self.weight, frozen["weight_scale64"], frozen["weight_bound64_neg"], frozen["weight_bound64"],
                          frozen["weight_scale"], frozen["weight_absmax"], self._weight_mask())

    def integer_rules(self) -> Rules:
        """The weight and bias rules of :mod:`.batch` (the batched formation of integer parameters)."""
        frozen = self._frozen()
        bias = BiasRule(self.bias, 0.0, frozen["bias_divisor64"], frozen["bias_gradient"], 2.0 ** (self.hw.residual_bits - 1))
        return Rules([self._weight_rule()], [bias] if self._plain_bias else [], [])

    def assemble(self, weights: list[Tensor], biases: list[Tensor], gains: list) -> tuple[Tensor, Tensor]:
        """Integer weights and ``b_q + 2**(r-1)`` (per channel) from the batched results."""
        bias_half = biases[0] if biases else self._bias_integers(2.0 ** (self.hw.residual_bits - 1))
        return weights[0], per_channel(bias_half)

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
            "factor": per_channel(torch.ldexp(self.req_m, -self.req_k)),
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
        return QuantizeBias.apply(self.bias, self._bias_quotient, self._frozen()["bias_gradient"],
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
                "weight": form_integers(self)[0],  # q_w = round(clamp(w, +-max|w_c|) / s_w), formed in float64
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
        out = self._conv(x, self.effective_weight()) + per_channel(self.bias)
        if self.fixed_scale is not None:
            return self._fake_quant_fixed(out)
        if self.training:
            self.track_range(out)
        return out

    def _forward_quantized(self, x: Tensor) -> Tensor:
        """Integer-valued output (straight-through gradients) of the exact datapath.

        float32 sums past 2**24 may round (docs/fixed-point.md accepts that for training); in float64
        every step is exact.
        """
        frozen = self._frozen()
        q_in = round_ste(x / frozen["in_scale"])
        weight, bias_half = layer_integers(self)
        acc = self._conv(q_in, weight)
        return requantize_ste(acc, bias_half, frozen["factor"], frozen["lo"], frozen["hi"], self.hw)

    def _weight_sources(self) -> tuple:
        """What the integer weights and biases are computed from."""
        return self.weight, self.bias, self.weight_absmax, self.act_absmax


class QUpsampleConv2d(QConv2d):
    """Pad 1, 2x2 conv to 4*C_out channels, pixel-shuffle x2, crop 1 pixel: exactly 2H x 2W.

    The module is the convolution itself (not a wrapper), so its parameters sit directly at
    its path (``g_s.0.weight``), the path the research code's parameter dict uses.
    """

    def __init__(self, in_channels: int, out_channels: int, hw: HardwareConfig, fixed_scale: float | None = None,
                 float_range: tuple[float, float] | None = None):
        # the convolution's own zero padding: the sums of an explicitly padded input, with no pad op
        super().__init__(in_channels, 4 * out_channels, 2, 1, 1, hw=hw, fixed_scale=fixed_scale,
                         float_range=float_range)

    def forward(self, x: Tensor) -> Tensor:
        return F.pixel_shuffle(super().forward(x), 2)[:, :, 1:-1, 1:-1]


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

    Both halves are at the same fixed scale, so the sum is exact on integers. Before QAT the
    sum is clamped to the float range of :data:`fixedpoint.FLOAT_STAGE_HARDWARE`, whatever ``hw``.
    """

    def __init__(self, hw: HardwareConfig, scale: float):
        super().__init__()
        self.hw = hw
        self.scale = scale
        self.quantized = False

    def freeze(self, in_scale):
        return in_scale

    def forward(self, x: Tensor, second_half: Tensor | None = None) -> Tensor:
        """The halves of ``x`` added, or ``x`` and ``second_half`` (the halves never concatenated)."""
        a, b = x.chunk(2, dim=1) if second_half is None else (x, second_half)
        if self.quantized:
            return fxp.channel_add(a, b, self.hw, self.scale)
        return fxp.channel_add(a, b, fxp.FLOAT_STAGE_HARDWARE, fxp.FLOAT_STAGE_HARDWARE.latent_scale)
