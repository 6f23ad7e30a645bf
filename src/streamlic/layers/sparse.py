"""The block-sparse ("fine-grained pruning") convolution of the context model and its masks."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import fixedpoint as fxp
from .. import topology
from ..config import HardwareConfig
from .conv import QConv2d
from .quant import MOMENTUM_END, STATS_MOMENTUM_GROWTH, STATS_MOMENTUM_START, per_channel, reduce_over_ranks


class FGPConv2d(QConv2d):
    """Block-sparse ("fine-grained pruning") convolution of docs/architecture.md.

    Channels are tiled into ``PI x PO`` blocks at every kernel tap; each group of ``PO``
    output channels keeps its ``taps * group_num`` strongest (input group, tap) blocks. With
    ``pdf_index=True`` the odd output channels produce the entropy model's scale index in
    quantized mode (the fold of docs/fixed-point.md).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, padding=0, *, hw: HardwareConfig,
                 group_num: int, fixed_scale: float | None = None, pdf_index: bool = False,
                 float_range: tuple[float, float] | None = None):
        super().__init__(in_channels, out_channels, kernel_size, 1, padding, hw=hw, fixed_scale=fixed_scale,
                         float_range=float_range)
        self.block_in, self.block_out = hw.block_in, hw.block_out
        self.in_groups = in_channels // self.block_in
        self.out_groups = out_channels // self.block_out
        self.group_num = group_num
        self.pdf_index = pdf_index
        self.masked = False
        self.mask_set = False
        # (input group, tap) blocks each output group could use, and those it keeps
        self.blocks_total = self.kernel_size[0] * self.kernel_size[1] * self.in_groups
        self.blocks_per_group = min(self.kernel_size[0] * self.kernel_size[1] * group_num, self.blocks_total)
        self.register_buffer("mask", torch.ones(out_channels, in_channels, *self.kernel_size))
        self.register_buffer("in_mean", torch.zeros(in_channels))
        self.register_buffer("in_sqmean", torch.ones(in_channels))
        self.register_buffer("stats_momentum", torch.tensor(STATS_MOMENTUM_START))
        # in pdf-index mode the odd output channels carry the scale index
        self.register_buffer("odd_channels", topology.odd_channels(out_channels), persistent=False)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_num={self.group_num}, pdf_index={self.pdf_index}"

    def effective_weight(self) -> Tensor:
        return self.weight * self.mask if self.masked else self.weight

    def _weight_mask(self) -> Tensor | None:
        return self.mask if self.masked else None

    def _weight_sources(self) -> tuple:
        return super()._weight_sources() + (self.mask, self.masked)

    @property
    def _plain_bias(self) -> bool:
        return not self.pdf_index  # the scale-index fold changes the odd channels' bias rule

    # -- statistics and masks ---------------------------------------------------------------
    @torch.no_grad()
    def record_stats(self, x: Tensor) -> None:
        momentum = self.stats_momentum.mul_(STATS_MOMENTUM_GROWTH).clamp_(0.0, MOMENTUM_END)
        x = x.detach()
        # the global batch's moments on every rank (reduce_over_ranks says why)
        moments = reduce_over_ranks(torch.stack([x.mean(dim=(0, 2, 3)), x.square().mean(dim=(0, 2, 3))]), "mean")
        # both EMAs in the same elementwise steps, each step on the pair at once
        stats = torch._foreach_mul(list(moments.unbind()), 1 - momentum)
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
        odd = per_channel(self.odd_channels)
        lo = torch.where(odd, 0.0, -float(self.out_bound))
        hi = torch.where(odd, float(fxp.SCALE_INDEX_MAX), float(self.out_bound))
        return lo, hi

    def output_scale_map(self) -> Tensor:
        if not self.pdf_index:
            return self.out_scale
        # odd channels carry the scale index itself (one step = 1)
        return per_channel(torch.where(self.odd_channels, torch.ones_like(self.bias), self.out_scale))

    def integer_params(self) -> dict[str, Tensor]:
        params = super().integer_params()
        params["mask"] = self.mask.clone()
        return params

    def forward(self, x: Tensor) -> Tensor:
        if self.training and not self.quantized and not self.masked:
            self.record_stats(x)
        return super().forward(x)
