"""The rANS coding tables: the model's 16-bit CDFs as compressai's coder reads them."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from compressai.ans import RansDecoder, RansEncoder
from torch import Tensor

from .. import fixedpoint as fxp
from ..entropy import CDF_PRECISION, frequencies


class RansTables:
    """One set of 16-bit CDF tables in the form compressai's rANS coder reads.

    A row covers the symbols -127..128 (column = symbol + 127) plus an overflow slot that
    clamped symbols never reach. ``bits`` holds each symbol's ideal code length,
    ``-log2(frequency / 2**16)``, which is what the coder spends up to a few bytes per stream.
    """

    def __init__(self, cdfs: Tensor):
        cdfs = torch.as_tensor(cdfs).to(torch.int32).cpu()
        self.cdfs = cdfs.tolist()
        self.lengths = [cdfs.shape[1]] * cdfs.shape[0]
        self.offsets = [-fxp.SYMBOL_MAX] * cdfs.shape[0]
        self.bits = -torch.log2(frequencies(cdfs) / 2.0**CDF_PRECISION)

    def encode(self, symbols: Tensor, tables: Tensor) -> bytes:
        """One stream of ``symbols`` (flattened in their order), each with its table index."""
        return RansEncoder().encode_with_indexes(symbols.reshape(-1).tolist(), tables.reshape(-1).tolist(),
                                                 self.cdfs, self.lengths, self.offsets)

    def read(self, decoder: RansDecoder, tables: Tensor) -> Tensor:
        """The next ``tables.numel()`` symbols of an open stream, shaped like ``tables``."""
        values = decoder.decode_stream(tables.reshape(-1).tolist(), self.cdfs, self.lengths, self.offsets)
        return torch.tensor(values, dtype=torch.int64).reshape(tables.shape)

    def estimated_bits(self, symbols: Tensor, tables: Tensor) -> float:
        return float(self.bits[tables.reshape(-1).long(), symbols.reshape(-1).long() + fxp.SYMBOL_MAX].sum())


@contextmanager
def single_thread():
    """Run the row loop on one intra-op thread.

    A row step is a few small tensor ops; splitting each across threads costs more in
    fork/join than it saves, and on a busy CPU every op then waits for a descheduled worker
    (measured: a 768x512 row loop takes 0.1 s on one thread, up to 1.8 s on two under load).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def channel_tables(z_hat: Tensor) -> Tensor:
    """Table index of every hyper symbol: its channel."""
    channels = torch.arange(z_hat.shape[-3], dtype=torch.int64).view(-1, 1, 1)
    return channels.expand(z_hat.shape[-3:])


def rows_first(t: Tensor) -> Tensor:
    """[C, H, W] -> [H, C, W]: each latent row becomes a contiguous run of the y stream."""
    return t.permute(1, 0, 2).contiguous()
