"""Quantization-aware layers of StreamLIC, one module per layer family.

Each layer has two numerics, chosen by its ``quantized`` flag (set by the model's stage API):

* float: ordinary float arithmetic; learned activation ranges are tracked while training.
* quantized: the exact integer datapath of docs/fixed-point.md, built from :mod:`streamlic.fixedpoint`
  on integer-valued tensors, with straight-through gradients taken from a real-valued
  surrogate of the same computation. In float64 this path is bit-exact with the integer
  reference model; in float32 it is the training approximation.

The quantized forward takes its integer weights, biases and LAGC gains from :mod:`.batch`
(in a QAT step formed for all trainable layers together, otherwise per layer, a batch of
one). ``integer_params()``, which the integer reference model and the exporter read, forms
the same integers (the checked gain multiplier and the plain bias rule through the
export's own functions, which the bit-exactness tests compare with the forward).
"""

from .batch import IntegerParameters
from .conv import ChannelAddition, QConv2d, QLeakyReLU, QUpsampleConv2d
from .lagc import LAGC
from .quant import (QuantLayer, RangeTracker, requantize_ste, round_ste, running_max_update, straight_through,
                    weight_scale_of)
from .sparse import FGPConv2d

__all__ = ["ChannelAddition", "FGPConv2d", "IntegerParameters", "LAGC", "QConv2d", "QLeakyReLU", "QUpsampleConv2d", "QuantLayer",
           "RangeTracker", "requantize_ste", "round_ste", "running_max_update", "straight_through",
           "weight_scale_of"]
