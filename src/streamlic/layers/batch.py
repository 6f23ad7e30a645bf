"""Integer weights, biases and LAGC gains of many layers formed together, in a handful of ops.

Every QAT step forms the integer parameters of each trainable layer from its float ones. Per
layer that is a dozen small ops (float64 conversion, division, rounding, clamping, and their
gradients); the rules are elementwise, so the parameters of all layers are concatenated into
one flat tensor and go through the same autograd Functions once. Each element sees exactly
the arithmetic it sees alone, so the integers are those of the per-layer path, which is this
one with a batch of one layer. On a GPU this is what makes a QAT step cost a few kernel
launches per layer rather than a few dozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import fixedpoint as fxp
from ..config import HardwareConfig
from .quant import QuantizeBias, QuantizeWeight, round_ste


@dataclass(frozen=True)
class WeightRule:
    """Inputs of :class:`QuantizeWeight` for one weight: per-output-channel frozen tensors."""

    weight: Tensor
    scale64: Tensor
    lower64: Tensor
    upper64: Tensor
    scale: Tensor
    absmax: Tensor
    mask: Tensor | None


@dataclass(frozen=True)
class BiasRule:
    """``clamp(round((b + add) / divisor64), +-bias_max) + offset`` per channel (:class:`QuantizeBias`)."""

    bias: Tensor
    add: float
    divisor64: Tensor  # 0-dim or one per channel
    gradient: Tensor  # derivative of the quotient, one per channel
    offset: float


@dataclass(frozen=True)
class GainRule:
    """LAGC's trained gain: gamma, the affine conv's bias (which takes gamma's sign), frozen factors."""

    gamma: Tensor
    affine_bias: Tensor
    factor_scale: Tensor  # real gain factor per unit |gamma|, one per channel
    factor_divisor64: Tensor  # |gamma| / factor_divisor64 is the gain multiplier's real factor


@dataclass
class Rules:
    """What one layer forms: its weights, biases and gains, in the order its ``assemble`` takes them."""

    weights: list[WeightRule]
    biases: list[BiasRule]
    gains: list[GainRule]


def _flat(tensors: list[Tensor]) -> Tensor:
    """All elements in one flat tensor (no copy for a single tensor)."""
    return tensors[0].reshape(-1) if len(tensors) == 1 else torch.cat([t.reshape(-1) for t in tensors])


def _per_element(values: list[Tensor], counts: list[int]) -> Tensor:
    """Per-channel (or single) values repeated over each tensor's elements (channels outermost), flat."""
    return _flat([v.reshape(-1, 1).expand(-1, n // v.numel()) for v, n in zip(values, counts)])


def _split(flat: Tensor, shapes: list[torch.Size]) -> list[Tensor]:
    if len(shapes) == 1:
        return [flat.view(shapes[0])]
    return [part.view(shape) for part, shape in zip(flat.split([s.numel() for s in shapes]), shapes)]


class _Constants:
    """Per-element frozen tensors of a batch, kept while the rules' frozen tensors are the same objects
    (a layer's frozen tensors are new objects whenever its scales change)."""

    def __init__(self):
        self.key: tuple = ()
        self.values: dict[str, Tensor | None] = {}

    def get(self, key: tuple, compute) -> dict[str, Tensor | None]:
        if torch.compiler.is_compiling():
            return compute()  # a compiled graph computes (and fuses) them in place of the cache
        same = len(key) == len(self.key) and all(a is b if isinstance(a, Tensor) else a == b
                                                 for a, b in zip(key, self.key))
        if not same:
            with torch.no_grad():
                self.values = compute()
            self.key = key
        return self.values


def integer_weights(rules: list[WeightRule], cache: _Constants | None = None) -> list[Tensor]:
    """``q_w`` of each rule (:class:`QuantizeWeight`), straight-through gradients."""
    counts = [r.weight.numel() for r in rules]

    def constants():
        values = {name: _per_element([getattr(r, name) for r in rules], counts)
                  for name in ("scale64", "lower64", "upper64", "scale", "absmax")}
        masked = any(r.mask is not None for r in rules)
        values["mask"] = _flat([r.weight.new_ones(r.weight.shape) if r.mask is None else r.mask
                                for r in rules]) if masked else None
        return values

    key = tuple(t for r in rules for t in (r.scale64, r.absmax, r.mask) if t is not None)
    key += tuple(r.mask._version for r in rules if r.mask is not None)
    c = constants() if cache is None else cache.get(key, constants)
    q = QuantizeWeight.apply(_flat([r.weight for r in rules]), c["scale64"], c["lower64"], c["upper64"],
                             c["scale"], c["absmax"], c["mask"])
    return _split(q, [r.weight.shape for r in rules])


def integer_biases(rules: list[BiasRule], hw: HardwareConfig, cache: _Constants | None = None) -> list[Tensor]:
    """The bias integers of each rule (:class:`QuantizeBias`), straight-through gradients."""
    counts = [r.bias.numel() for r in rules]
    adds, offsets = {r.add for r in rules}, {r.offset for r in rules}

    def constants():
        def each(value_of) -> Tensor:  # one float64 value per rule, over its elements
            return torch.cat([r.bias.new_full((n,), value_of(r), dtype=torch.float64) for r, n in zip(rules, counts)])

        return {
            "add": None if adds == {0.0} else each(lambda r: r.add),  # + 0.0 where a rule adds nothing: exact
            "divisor64": _per_element([r.divisor64 for r in rules], counts),
            "gradient": _per_element([r.gradient for r in rules], counts),
            "offset": None if len(offsets) == 1 else each(lambda r: r.offset),
        }

    key = tuple(t for r in rules for t in (r.divisor64, r.gradient)) + tuple((r.add, r.offset) for r in rules)
    c = constants() if cache is None else cache.get(key, constants)

    def quotient(b64: Tensor) -> Tensor:
        return (b64 if c["add"] is None else b64 + c["add"]) / c["divisor64"]

    offset = next(iter(offsets)) if c["offset"] is None else c["offset"]
    q = QuantizeBias.apply(_flat([r.bias for r in rules]), quotient, c["gradient"], float(hw.bias_max), offset)
    return _split(q, [r.bias.shape for r in rules])


def gain_multiplier(gamma: Tensor, factor_divisor64: Tensor, hw: HardwareConfig, name: str,
                    check: bool = False) -> tuple[Tensor, Tensor]:
    """``(m_g, k_g)`` of LAGC's gain factor ``2**r |gamma| s_t / s_g = |gamma| / factor_divisor64``, formed in
    float64 whatever the training precision.

    gamma trains during QAT, so the factor is held representable, in the forward and the export
    alike; ``check`` (the export) raises only for a non-finite gamma, the forward never syncs.
    """
    factor = gamma.detach().double().abs() / factor_divisor64
    if not check:  # to_multiplier clamps the same way without a host sync
        return fxp.to_multiplier(factor, hw, name, check=False)
    factor = torch.where(torch.isfinite(factor), fxp.representable_factor(factor, hw), factor)
    return fxp.to_multiplier(factor, hw, name, check=True)


def lagc_gains(rules: list[GainRule], hw: HardwareConfig,
               cache: _Constants | None = None) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Per LAGC: gamma's sign, the affine bias integer ``b_a`` (sign folded in), the real gain factor
    (with gradients) and the gain multiplier ``m_g * 2**-k_g`` (formed in float64; in the training dtype).

    The multiplier follows gamma: :func:`gain_multiplier`, as in the export.
    """
    counts = [r.gamma.numel() for r in rules]

    def constants():
        return {"factor_scale": _per_element([r.factor_scale for r in rules], counts),
                "factor_divisor64": _per_element([r.factor_divisor64 for r in rules], counts)}

    key = tuple(t for r in rules for t in (r.factor_scale, r.factor_divisor64))
    c = constants() if cache is None else cache.get(key, constants)
    gamma = _flat([r.gamma for r in rules])
    sign = 1.0 - 2.0 * (gamma.detach() < 0)  # tanh is odd: gamma's sign goes into the affine conv
    # tanh's input scale is a power of two, so 2**r b / s_t is exact at the training precision
    shift = 2.0 ** (hw.residual_bits + hw.tanh_in_shift)
    b_a = round_ste(fxp.clamp_bias(_flat([r.affine_bias for r in rules]) * (sign * shift), hw))
    gain_factor = gamma.abs() * c["factor_scale"]
    m_g, k_g = gain_multiplier(gamma, c["factor_divisor64"], hw, "LAGC gain")
    multiplier = torch.ldexp(m_g, -k_g).to(gamma.dtype)
    shapes = [r.gamma.shape for r in rules]
    return list(zip(*(_split(t, shapes) for t in (sign, b_a, gain_factor, multiplier))))


def form_integers(layer) -> tuple:
    """One layer's integer parameters through the batched functions (a batch of one)."""
    return IntegerParameters.assemble_all([layer])[0]


def layer_integers(layer) -> tuple:
    """The integer parameters a layer's quantized forward uses (its ``assemble``): formed together
    with all trainable layers' by the model for this forward, else the layer's own (reused while
    its sources are unchanged)."""
    formed = None if layer.integer_parameters is None else layer.integer_parameters.formed(layer)
    if formed is not None:
        return formed
    return layer._reuse("integers", lambda: form_integers(layer), *layer._weight_sources())


class IntegerParameters:
    """The integer parameters of the trainable quantized layers of a model, formed once per training
    forward (:meth:`form`) and read by each layer's forward (:meth:`formed`).

    A layer takes part through ``integer_rules() -> Rules`` and
    ``assemble(weights, biases, gains)``, which turns its share of the results into what its
    forward uses.
    """

    def __init__(self):
        self.caches: dict[HardwareConfig, tuple[_Constants, _Constants, _Constants]] = {}  # one set per datapath
        self.current: dict[str, tuple] = {}

    def __deepcopy__(self, memo) -> IntegerParameters:
        # what it holds is derived (and, during a forward, part of an autograd graph): a copy starts empty
        return IntegerParameters()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    @staticmethod
    def assemble_all(layers: list, caches: dict | None = None) -> list[tuple]:
        """Each layer's ``assemble`` result, in order; layers of one datapath (per-layer widths) form together."""
        by_hw: dict[HardwareConfig, list[int]] = {}
        for index, layer in enumerate(layers):
            by_hw.setdefault(layer.hw, []).append(index)
        assembled: list[tuple] = [()] * len(layers)
        for hw, indices in by_hw.items():
            group = IntegerParameters._assemble_group(
                [layers[i] for i in indices], hw, None if caches is None else caches.setdefault(
                    hw, (_Constants(), _Constants(), _Constants())))
            for i, result in zip(indices, group):
                assembled[i] = result
        return assembled

    @staticmethod
    def _assemble_group(layers: list, hw: HardwareConfig, caches=None) -> list[tuple]:
        caches = caches or (None, None, None)
        rules = [layer.integer_rules() for layer in layers]
        weights = integer_weights([w for r in rules for w in r.weights], caches[0])
        bias_rules = [b for r in rules for b in r.biases]
        biases = integer_biases(bias_rules, hw, caches[1]) if bias_rules else []
        gain_rules = [g for r in rules for g in r.gains]
        gains = lagc_gains(gain_rules, hw, caches[2]) if gain_rules else []
        assembled = []
        for layer, r in zip(layers, rules):
            w, weights = weights[:len(r.weights)], weights[len(r.weights):]
            b, biases = biases[:len(r.biases)], biases[len(r.biases):]
            g, gains = gains[:len(r.gains)], gains[len(r.gains):]
            assembled.append(layer.assemble(w, b, g))
        return assembled

    def form(self, layers: list) -> None:
        """Form the integers of ``layers`` (quantized, trainable) for the forward that follows."""
        self.current = dict(zip((layer.layer_name for layer in layers), self.assemble_all(layers, self.caches)))

    def formed(self, layer) -> tuple | None:
        return self.current.get(layer.layer_name)
