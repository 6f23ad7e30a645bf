"""Discrete probability tables: the entropy models the hardware rANS coder reads.

A table row covers the 8-bit symbols -127..128 (column = symbol + 127). For coding, each row
becomes a 16-bit quantized CDF through compressai's ``pmf_to_quantized_cdf`` (every symbol
keeps a frequency >= 1) with one extra overflow slot, the layout compressai's rANS coder
expects. The likelihood used for training is the coded frequency itself, so the trained
rate is the length of the bitstream.
"""

from __future__ import annotations

import torch
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai._CXX import pmf_to_quantized_cdf
from torch import Tensor, nn

from . import fixedpoint as fxp
from .formats import CDF_PRECISION

PMF_FLOOR = 1e-9


@torch.library.custom_op("streamlic::quantized_cdfs", mutates_args=())
def quantized_cdfs(pmfs: Tensor, precision: int = CDF_PRECISION) -> Tensor:
    """16-bit CDFs [tables, columns + 2] (int32, on the CPU) of probability rows [tables, columns].

    The rows are read to the host once (one sync, not one per row) and handed to compressai's
    C++ quantizer: stage 5 rebuilds both tables every step. An operator of its own, so that a
    compiled training step calls it without a graph break.
    """
    rows = torch.nn.functional.pad(pmfs.detach().double(), (0, 1)).tolist()  # the overflow slot
    return torch.tensor([pmf_to_quantized_cdf(row, precision) for row in rows], dtype=torch.int32)


@quantized_cdfs.register_fake
def _quantized_cdfs_shape(pmfs: Tensor, precision: int = CDF_PRECISION) -> Tensor:
    return torch.empty(pmfs.shape[0], pmfs.shape[1] + 2, dtype=torch.int32, device="cpu")


def frequencies(cdfs: Tensor) -> Tensor:
    """Per-symbol frequencies of quantized CDFs, without the overflow slot."""
    return (cdfs[:, 1:-1] - cdfs[:, :-2]).to(torch.float64)


def symbol_columns() -> Tensor:
    return torch.arange(-fxp.SYMBOL_MAX, fxp.SYMBOL_COLUMNS - fxp.SYMBOL_MAX, dtype=torch.float32)


class RectifiedPDF(nn.Module):
    """Trainable probability tables: ``softmax(logits)`` of shape [tables, 256].

    ``likelihood`` returns the quantized-CDF probability of each symbol (what the coder
    spends) with the gradient of the softmax probability.
    """

    def __init__(self, num_tables: int, columns: int = fxp.SYMBOL_COLUMNS):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_tables, columns))

    @property
    def num_tables(self) -> int:
        return self.logits.shape[0]

    def probabilities(self) -> Tensor:
        return torch.softmax(self.logits, dim=1)

    def cdfs(self) -> Tensor:
        return quantized_cdfs(self.probabilities())

    @torch.no_grad()
    def init_from_pmf(self, pmf: Tensor) -> None:
        pmf = torch.clamp(pmf.to(self.logits), min=PMF_FLOOR)
        self.logits.copy_(torch.log(pmf / pmf.sum(dim=1, keepdim=True)))

    def likelihood(self, symbols: Tensor, table_index: Tensor) -> Tensor:
        """Probability of integer ``symbols`` (in [-127, 127]) under table ``table_index`` (same shape)."""
        probs = self.probabilities()
        coded = (frequencies(self.cdfs()) / 2.0**CDF_PRECISION).to(probs)
        flat = table_index.detach().long() * probs.shape[1] + (symbols.detach().long() + fxp.SYMBOL_MAX)
        soft = probs.reshape(-1)[flat]
        return soft + (coded.reshape(-1)[flat] - soft).detach()


def gaussian_pmf_table(gaussian: GaussianConditional, sigmas: Tensor) -> Tensor:
    """Discretized zero-mean Gaussian at each scale level over the table's symbol columns."""
    values = symbol_columns().to(sigmas).view(1, -1).expand(len(sigmas), -1)
    scales = sigmas.view(-1, 1).expand_as(values)
    with torch.no_grad():
        return gaussian._likelihood(values, scales)


def bottleneck_pmf_table(bottleneck: EntropyBottleneck) -> Tensor:
    """Per-channel pmf of the factorized model over the integer hyper symbols (no median offset)."""
    channels = bottleneck.channels
    values = symbol_columns().to(bottleneck.quantiles.device).view(1, 1, -1).expand(channels, 1, -1)
    with torch.no_grad():
        lower = bottleneck._logits_cumulative(values - 0.5, stop_gradient=True)
        upper = bottleneck._logits_cumulative(values + 0.5, stop_gradient=True)
    return (torch.sigmoid(upper) - torch.sigmoid(lower)).reshape(channels, -1)


def coding_tables(model) -> tuple[Tensor, Tensor]:
    """16-bit CDFs the coder uses for a model: (y tables [128, 258], z tables [N, 258]).

    After stage 5 they are the trained ``RectifiedPDF`` tables; before it, the same layout is
    built from the Gaussian model at the 128 scale levels and the factorized model.
    """
    if model.pdf_initialized:
        return model.rectified_cdf_y.cdfs(), model.rectified_cdf_z.cdfs()
    sigmas = fxp.sigma_levels(torch.float32).to(model.rectified_cdf_y.logits.device)
    return (quantized_cdfs(gaussian_pmf_table(model.gaussian_conditional, sigmas)),
            quantized_cdfs(bottleneck_pmf_table(model.entropy_bottleneck)))
