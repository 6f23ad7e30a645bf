"""The quantization machinery every layer shares: straight-through rounding, requantization, ranges, QuantLayer."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import fixedpoint as fxp
from ..config import HardwareConfig

log = logging.getLogger(__name__)

# Running-max tracking of activation ranges (docs/fixed-point.md): the EMA momentum grows 1 % per step
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


class QuantizeWeight(torch.autograd.Function):
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


class QuantizeBias(torch.autograd.Function):
    """``clamp(round(quotient(b)), +-bias_max) + offset`` with ``quotient`` evaluated in float64
    (``offset``: a number or one per element).

    An integer of the datapath must not depend on the training precision (float32 and float64
    round a quotient near .5 differently). ``gradient`` is the derivative of the (linear)
    quotient; no gradient flows where the bias integer is clamped.
    """

    @staticmethod
    def forward(ctx, bias, quotient, gradient, bound, offset):
        v = quotient(bias.detach().double())
        q = fxp.quantize_bias(v, bound)
        if isinstance(offset, Tensor) or offset:
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


def activation_scale_of(act_absmax: Tensor, hw: HardwareConfig) -> Tensor:
    """Output scale of a tracked range ``act_absmax`` at ``hw``'s width (a range never measured gets a tiny one)."""
    return fxp.activation_scale(torch.clamp(act_absmax, min=SCALE_FLOOR * hw.act_max), hw)


def per_channel(t: Tensor) -> Tensor:
    return t.reshape(1, -1, 1, 1)


def running_max_update(absmax: Tensor, momentum: Tensor, batch_max: Tensor) -> tuple[Tensor, Tensor]:
    """New running max and momentum of activation ranges (elementwise: one layer or many stacked)."""
    momentum = torch.clamp(momentum * MOMENTUM_GROWTH, MOMENTUM_START, MOMENTUM_END)
    ema = absmax * momentum + batch_max * (1 - momentum)
    pulled = absmax * (1 - PULL_UP) + batch_max * PULL_UP
    first = absmax == 0
    return torch.where(first, batch_max, torch.where(batch_max < absmax, ema, pulled)), momentum


@torch.no_grad()
def reduce_over_ranks(batch_statistic: Tensor, op: str) -> Tensor:
    """``batch_statistic`` (this rank's share of the global batch) reduced in place over all ranks
    of a running process group: ``"max"`` or ``"mean"`` (ranks hold equal batch sizes).

    Running statistics (activation ranges, sparse-layer input moments) are updated with these same
    numbers on every rank, so they stay identical there: those of the global batch, and the masks
    and frozen scales computed from them are well defined for any number of ranks. Why: each rank
    used to update them from its own crops (DDP broadcasts buffers before the first step only:
    under Lightning's manual optimization its forward-time sync is off from the second step), and
    the checkpoint, written by rank 0, holds rank 0's, so a run resumed in stage 1 or 2 gave every
    rank rank 0's statistics and cut other masks and froze other scales than the uninterrupted run.
    Training-mode forwards only: every rank runs the same number of those.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return batch_statistic
    if op == "max":
        dist.all_reduce(batch_statistic, op=dist.ReduceOp.MAX)
    elif op == "mean":
        dist.all_reduce(batch_statistic, op=dist.ReduceOp.SUM)
        batch_statistic.div_(dist.get_world_size())
    else:
        raise ValueError(f"reduce_over_ranks: op={op!r}, expected 'max' or 'mean'")
    return batch_statistic


class RangeTracker:
    """Collects the outputs of many layers during a forward and updates their running maxima in
    one vectorised step at its end: one ``max |out|`` reduction for all of them and a dozen ops
    for the update, instead of a reduction and a dozen ops per layer.

    The running maxima are only read once QAT freezes them, so deferring the update to the end
    of the forward changes nothing; the numbers are those of the per-layer update.
    """

    def __init__(self):
        self.pending: list[tuple[QuantLayer, Tensor]] = []  # an output, or its max |out| (the same reduction)

    @torch.no_grad()
    def flush(self) -> None:
        if not self.pending:
            return
        layers = [layer for layer, _ in self.pending]
        batch_max = torch.stack(torch._foreach_norm([out for _, out in self.pending], float("inf")))
        reduce_over_ranks(batch_max, "max")  # one collective for every layer's range
        self.pending.clear()
        absmax, momentum = running_max_update(torch.stack([layer.act_absmax for layer in layers]),
                                              torch.stack([layer.act_momentum for layer in layers]),
                                              batch_max.to(layers[0].act_absmax.dtype))
        torch._foreach_copy_([layer.act_absmax for layer in layers], list(absmax.unbind()))
        torch._foreach_copy_([layer.act_momentum for layer in layers], list(momentum.unbind()))


class QuantLayer(nn.Module):
    """Base of layers with a quantized output: activation range, frozen scales, stage flags."""

    def __init__(self, hw: HardwareConfig, fixed_scale: float | None = None, out_bound: int | None = None,
                 float_range: tuple[float, float] | None = None):
        super().__init__()
        self.hw = hw
        self.fixed_scale = fixed_scale
        self.out_bound = hw.act_max if out_bound is None else out_bound
        # a fixed-scale output before QAT: (grid step, real bound), the same for every bit width
        self.float_range = float_range or (None if fixed_scale is None else (fixed_scale, self.out_bound * fixed_scale))
        self.quantized = False
        self.scales_frozen = False
        self.layer_name = self.__class__.__name__
        # a fixed-scale layer never reads its range: it stays 0, the same for every bit width
        self.register_buffer("act_absmax", torch.tensor(0.0))
        self.register_buffer("act_momentum", torch.tensor(MOMENTUM_START / MOMENTUM_GROWTH))
        self.register_buffer("in_scale", torch.tensor(1.0))
        self.raised_range: tuple[float, float] | None = None
        self.range_tracker: RangeTracker | None = None
        self.integer_parameters = None  # the model's batch.IntegerParameters, when it forms them together
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
        return activation_scale_of(act_absmax, self.hw)

    @torch.no_grad()
    def track_range(self, out: Tensor) -> None:
        """Update the running max of ``|out|`` without a host sync.

        With a ``range_tracker`` (the model sets one) the update is deferred to the tracker's
        :meth:`RangeTracker.flush`, which updates every layer at once.
        """
        if self.fixed_scale is not None or self.scales_frozen:
            return
        if self.range_tracker is not None and out.requires_grad:
            # kept for one reduction over all layers at the forward's end (autograd keeps most of them anyway)
            self.range_tracker.pending.append((self, out.detach()))
            return
        batch_max = torch.linalg.vector_norm(out.detach(), float("inf")).to(self.act_absmax.dtype)  # max |out|
        if self.range_tracker is not None:  # without autograd, only the maximum is kept (calibration)
            self.range_tracker.pending.append((self, batch_max))
            return
        absmax, momentum = running_max_update(self.act_absmax, self.act_momentum, reduce_over_ranks(batch_max, "max"))
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
        """Float-mode output of a fixed-scale layer: clamped to its float range and on its float grid."""
        scale, bound = self.float_range
        return round_ste(torch.clamp(out, -bound, bound) / scale) * scale
