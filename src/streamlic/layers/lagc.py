"""LAGC, the locally adaptive gain control that replaces GDN, in float and in the integer datapath."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import fixedpoint as fxp
from ..config import HardwareConfig
from .batch import BiasRule, GainRule, Rules, WeightRule, form_integers, gain_multiplier, layer_integers
from .quant import QuantLayer, per_channel, requantize_ste, requantize_with_factor, round_ste, weight_scale_of


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
            "affine_factor": per_channel(torch.ldexp(self.affine_m, -self.affine_k)),
            "output_factor": per_channel(torch.ldexp(self.out_m, -self.out_k)),
            # (beta + 1) * 2**r / s_g and |gamma| * 2**r * s_t / s_g, each divided in one step (the same floats)
            "gain_bias_divisor64": gain_scale64 * 2.0**-hw.residual_bits,
            "gain_bias_gradient": 2.0**hw.residual_bits / self.gain_scale,
            "gain_factor_divisor64": gain_scale64 * 2.0 ** (hw.tanh_out_shift - hw.residual_bits),
            "gain_factor_scale": 2.0**hw.residual_bits * self.tanh_out_scale / self.gain_scale,
        }

    def integer_rules(self) -> Rules:
        """The affine weight, the gain bias and the gain of :mod:`.batch` (the batched formation)."""
        frozen = self._frozen()
        gamma, beta = self._gamma_beta()
        weight = WeightRule(self.affine.weight, frozen["affine_scale64"], frozen["affine_bound64_neg"],
                            frozen["affine_bound64"], frozen["affine_scale"], frozen["affine_absmax"], None)
        # b_g = round(2**r (beta + 1) / s_g): the quotient divided in one step
        gain_bias = BiasRule(beta, 1.0, frozen["gain_bias_divisor64"], frozen["gain_bias_gradient"], 0.0)
        gain = GainRule(gamma, self.affine.bias, frozen["gain_factor_scale"], frozen["gain_factor_divisor64"])
        return Rules([weight], [gain_bias], [gain])

    def assemble(self, weights: list[Tensor], biases: list[Tensor], gains: list) -> tuple:
        """Integer affine weights/bias (gamma's sign folded in), gain bias, the real gain factor (with
        gradients) and the gain multiplier ``m_g * 2**-k_g``."""
        sign, b_a, gain_factor, multiplier = gains[0]
        return weights[0] * sign.view(-1, 1, 1, 1), b_a, biases[0], gain_factor, multiplier

    def _weight_sources(self) -> tuple:
        return (self.affine.weight, self.affine.bias, self.gain.weight, self.gain.bias, self.affine_absmax,
                self.gain_scale)

    def _gain_multiplier(self) -> tuple[Tensor, Tensor]:
        """``(m_g, k_g)`` as the export checks it (:func:`.batch.gain_multiplier`)."""
        return gain_multiplier(self._gamma_beta()[0], self._frozen()["gain_factor_divisor64"], self.hw,
                               f"{self.layer_name}.gain", check=True)

    def integer_params(self) -> dict[str, Tensor]:
        """The hardware's integers; the gain path ("score" in the research code's names) is ``score_*``."""
        with torch.no_grad():
            q_wa, b_a, b_g, _, _ = form_integers(self)
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
        gain = torch.tanh(self.affine(x)) * per_channel(gamma) + per_channel(beta + 1.0)
        out = x * gain
        if self.training:
            self.track_range(out)
        return out

    def _forward_quantized(self, x: Tensor) -> Tensor:
        hw = self.hw
        half = 2.0 ** (hw.residual_bits - 1)
        frozen = self._frozen()
        q_in = round_ste(x / frozen["in_scale"])
        q_wa, b_a, b_g, gain_factor, gain_multiplier = layer_integers(self)
        acc = F.conv2d(q_in, q_wa)
        # affine conv to the tanh input scale
        a = requantize_ste(acc, per_channel(b_a + half), frozen["affine_factor"], -hw.act_max, hw.act_max, hw)
        gain_multiplier = per_channel(gain_multiplier)
        gain_bias = per_channel(b_g)
        if torch.is_grad_enabled() and (a.requires_grad or gain_factor.requires_grad or b_g.requires_grad):
            out = _LAGCTail.apply(a, q_in, per_channel(gain_factor), gain_bias, gain_multiplier,
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
