"""Bit widths and format constants of the coded streams and the datapath, in one place (docs/fixed-point.md).

The export manifest, the C header and the hardware report read their widths from
:func:`bit_widths`; :mod:`streamlic.fixedpoint` and :mod:`streamlic.entropy` compute with
these constants. No torch here: the network table (:mod:`streamlic.topology`) reads it too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from .config import HardwareConfig

SYMBOL_BITS = 8  # latent and hyper-latent symbols
SYMBOL_MAX = 2 ** (SYMBOL_BITS - 1) - 1  # symbols lie in [-127, 127]
SYMBOL_COLUMNS = 2**SYMBOL_BITS  # a probability table row covers symbols -127..128 (column = symbol + 127)
SCALE_LEVELS = 128  # entropy-model scale levels ("pdf index")
SCALE_INDEX_MAX = SCALE_LEVELS - 1  # the scale index is clamped to [0, SCALE_INDEX_MAX]
CDF_PRECISION = 16  # bits of the quantized CDFs the rANS coder reads


def bit_widths(hw: HardwareConfig) -> dict[str, int]:
    """Every width of a datapath and its coded formats, by name (the export manifest's ``bit_widths``)."""
    return {"activation": hw.activation_bits, "weight": hw.weight_bits, "precision": hw.precision_bits,
            "residual": hw.residual_bits, "accumulator": hw.accumulator_bits, "multiplier": hw.multiplier_bits,
            "shift": hw.shift_bits, "symbol": SYMBOL_BITS, "cdf_precision": CDF_PRECISION}


def layer_bit_widths(hw: HardwareConfig, paths: Iterable[str]) -> dict[str, dict[str, int]]:
    """Each layer's own datapath widths (activation, weight, precision, residual), by path."""
    return {path: {"activation": layer.activation_bits, "weight": layer.weight_bits,
                   "precision": layer.precision_bits, "residual": layer.residual_bits}
            for path, layer in ((path, hw.for_layer(path)) for path in paths)}
