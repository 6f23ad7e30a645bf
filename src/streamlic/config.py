"""Configuration objects for the network sizes, the hardware number formats and the sparsity.

Every check here runs before a tensor is built, and every error names the config key that
breaks the constraint, so a bad sweep value fails in milliseconds instead of mid-training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Collection, Mapping

from . import topology
from .topology import CTX1, CTX2, EP, SPARSE_LAYERS, SUBNETWORKS


class ConfigError(ValueError):
    """A configuration value breaks a model or hardware constraint."""


WIDTH_KEYS = ("activation_bits", "weight_bits", "precision_bits")  # what hardware.layers.<key> may set
# the per-layer keys of HardwareConfig and their defaults: a config that leaves them so is a uniform one,
# whose dict (and so the model hash, the manifest and a checkpoint's config) is that of before they existed
PER_LAYER_DEFAULTS: dict[str, Any] = {"layers": {}, "latent_bits": None}


def canonical_layers(layers: Any) -> dict[str, dict[str, int]]:
    """``hardware.layers`` as flat path keys, sorted: ``{"g_a": {...}, "g_a.0": {"weight_bits": 8}}``.

    Accepts the nested form Hydra makes of ``+hardware.layers.g_a.0.weight_bits=8``
    (``{"g_a": {"0": {"weight_bits": 8}}}``), flat path keys, and mixtures of both.
    """
    flat: dict[str, dict[str, int]] = {}

    def walk(prefix: str, node: Any) -> None:
        for key, value in dict(node).items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, Mapping):
                walk(name, value)
            elif str(key) in WIDTH_KEYS and prefix:
                if flat.get(prefix, {}).get(str(key), value) != value:
                    raise ConfigError(f"hardware.layers.{name}: given twice, as {flat[prefix][str(key)]} and {value}")
                flat.setdefault(prefix, {})[str(key)] = value
            else:
                raise ConfigError(f"hardware.layers.{name}={value!r}: not a width key of a layer or sub-network "
                                  f"(hardware.layers.<sub-network or layer path>.<{' | '.join(WIDTH_KEYS)}>)")

    walk("", layers or {})
    return {path: dict(sorted(flat[path].items())) for path in sorted(flat)}


def _layer_paths() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The weighted layers' paths (the same for every size) and those of them that write the latent grid."""
    return tuple(spec.path for spec in topology.layers(ModelConfig()) if spec.weighted), topology.LATENT_GRID_WRITERS


@dataclass(frozen=True)
class HardwareConfig:
    """Number formats of the fixed-point datapath (docs/fixed-point.md).

    ``activation_bits`` (A) and ``weight_bits`` (W) are signed widths; ``precision_bits`` (P)
    is the width at which biases are added before the final rounding shift, so the
    residual ``P - A`` bits carry the fraction.
    """

    activation_bits: int = 12
    weight_bits: int = 12
    precision_bits: int = 16
    block_in: int = 12  # PI
    block_out: int = 12  # PO
    accumulator_bits: int = 40
    multiplier_bits: int = 16
    shift_bits: int = 6
    name: str = "w12a12"
    layers: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    latent_bits: int | None = None

    def __post_init__(self) -> None:
        a, w, p = self.activation_bits, self.weight_bits, self.precision_bits
        _check_widths(a, w, p, {key: f"hardware.{key}" for key in WIDTH_KEYS})
        if not 2 <= self.multiplier_bits <= 24:
            raise ConfigError(f"hardware.multiplier_bits={self.multiplier_bits}: must lie in [2, 24]")
        if not 1 <= self.shift_bits <= 6:
            raise ConfigError(f"hardware.shift_bits={self.shift_bits}: must lie in [1, 6] (shifts up to 63)")
        if self.block_in < 1 or self.block_out < 1:
            raise ConfigError("hardware.block_in and hardware.block_out must be positive")
        if not a + w <= self.accumulator_bits <= 62:
            raise ConfigError(
                f"hardware.accumulator_bits={self.accumulator_bits}: must lie in [A + W, 62] = [{a + w}, 62]"
            )
        object.__setattr__(self, "layers", canonical_layers(self.layers))
        object.__setattr__(self, "_sources", {})  # the config key each layer's width comes from
        object.__setattr__(self, "_widths", self._resolve_widths())
        object.__setattr__(self, "_layer_configs", {})  # for_layer's configs, by (A, W, P)
        # what the hash is computed from (in the hashing process: a pickled str hash would be another process's)
        object.__setattr__(self, "_hash_key", repr(self.to_dict()))

    def __hash__(self) -> int:  # the dataclass's own hash fails on the ``layers`` mapping
        return hash(self._hash_key)

    # ------------------------------------------------------------------ per-layer widths
    def _resolve_widths(self) -> dict[str, tuple[int, int, int]]:
        """(A, W, P) of every weighted layer and sub-network (empty for a config without per-layer keys), each
        width checked under the key it came from (kept in ``_sources``)."""
        if self.latent_bits is None and not self.layers:
            return {}
        paths, writers = _layer_paths()
        for key in self.layers:
            if key not in SUBNETWORKS and key not in paths:
                raise ConfigError(f"hardware.layers.{key}: no such sub-network or weighted layer (sub-networks "
                                  f"{', '.join(SUBNETWORKS)}; layers such as g_a.0, h_s.2, context_prediction.1)")
        if self.latent_bits is not None:
            _check_widths(self.latent_bits, None, None, {"activation_bits": "hardware.latent_bits"})
        latent, latent_key = ((self.latent_bits, "hardware.latent_bits") if self.latent_bits is not None
                              else self._picked(topology.PDF_INDEX_LAYER, "activation_bits"))
        widths = {}
        for path in (*SUBNETWORKS, *paths):
            (a, a_key), (w, w_key) = self._picked(path, "activation_bits"), self._picked(path, "weight_bits")
            p, p_key = self._picked(path, "precision_bits", default=a + self.residual_bits)
            derived_p = p_key is None  # A + a residual, not a value some key gives
            if path in writers:
                own = self.layers.get(path, {})
                if own.get("activation_bits", latent) != latent:
                    raise ConfigError(f"hardware.layers.{path}.activation_bits={own['activation_bits']}: {path} "
                                      f"writes the latent grid, whose width is {latent} (hardware.latent_bits, else "
                                      f"the width of {topology.PDF_INDEX_LAYER}); set hardware.latent_bits instead")
                if "precision_bits" not in own:
                    p, derived_p = latent + p - a, True
                a, a_key = latent, a_key if "activation_bits" in own else latent_key
            keys = {"activation_bits": a_key, "weight_bits": w_key, "precision_bits": p_key or a_key}
            # a derived P out of range is named by the key that would set it (not by one that holds another value)
            _check_widths(a, w, p, {**keys, "precision_bits": f"hardware.layers.{path}.precision_bits"}
                          if derived_p else keys)
            widths[path] = (a, w, p)
            self._sources[path] = keys
        return widths

    def _picked(self, path: str, key: str, default: int | None = None) -> tuple[int, str | None]:
        """The value of ``key`` for ``path`` (layer path > sub-network > global) and the full key it came from."""
        for where in (path, path.split(".")[0]):
            if key in self.layers.get(where, {}):
                return self.layers[where][key], f"hardware.layers.{where}.{key}"
        if default is not None:
            return default, None
        return getattr(self, key), f"hardware.{key}"

    @property
    def uniform(self) -> bool:
        """One width for every layer (and a latent grid at the activation width): the datapath of one config."""
        return not self.layers and self.latent_width == self.activation_bits

    @property
    def latent_width(self) -> int:
        """L: the width of the latent grid (y, mu, y_hat, the hyper-latent, the hyper and context outputs)."""
        if self.latent_bits is not None:
            return self.latent_bits
        return self._widths[topology.PDF_INDEX_LAYER][0] if self._widths else self.activation_bits

    def for_layer(self, path: str) -> HardwareConfig:
        """The datapath of one layer (or sub-network): its own A, W, P and the network's latent width, no ``layers``.

        A path outside the weighted layers (a LeakyReLU, the channel addition) takes its sub-network's widths.
        """
        if not self._widths:
            return self
        a, w, p = self._widths.get(path) or self._widths[path.split(".")[0]]
        key = (a, w, p)
        if key not in self._layer_configs:
            self._layer_configs[key] = HardwareConfig(**{
                **self.to_dict(), "activation_bits": a, "weight_bits": w, "precision_bits": p, "layers": {},
                "latent_bits": None if self.latent_width == a else self.latent_width})
        return self._layer_configs[key]

    def width_keys(self, path: str) -> dict[str, str]:
        """The config key each of a layer's widths comes from (``hardware.layers.g_a.weight_bits`` ...)."""
        return self._sources.get(path) or self._sources.get(path.split(".")[0]) or {
            key: f"hardware.{key}" for key in WIDTH_KEYS}

    @property
    def latent_hw(self) -> HardwareConfig:
        """The datapath of the latent grid: the symbols, mu and y_hat are formed and clamped at its width."""
        return self.for_layer(topology.PDF_INDEX_LAYER)

    @property
    def residual_bits(self) -> int:
        return self.precision_bits - self.activation_bits

    @property
    def act_max(self) -> int:
        return 2 ** (self.activation_bits - 1) - 1

    @property
    def weight_max(self) -> int:
        return 2 ** (self.weight_bits - 1) - 1

    @property
    def bias_max(self) -> int:
        """Biases are added at the P-bit intermediate precision."""
        return 2 ** (self.precision_bits - 1) - 1

    @property
    def multiplier_max(self) -> int:
        return 2**self.multiplier_bits - 1

    @property
    def shift_max(self) -> int:
        return 2**self.shift_bits - 1

    @property
    def latent_shift(self) -> int:
        """log2 of the latent/hyper/context fixed scale's inverse: L - 8 (4 at L = 12)."""
        return self.latent_width - 8

    @property
    def latent_scale(self) -> float:
        return 2.0 ** -self.latent_shift

    @property
    def tanh_in_shift(self) -> int:
        return self.activation_bits - 4

    @property
    def tanh_out_shift(self) -> int:
        return self.activation_bits - 2

    @property
    def image_max(self) -> int:
        """Integer range of the network input x - 0.5 (255 at A = 12)."""
        return 2 ** (min(self.activation_bits, 9) - 1) - 1

    def to_dict(self) -> dict[str, Any]:
        """The config's values; the per-layer keys only where set (a uniform config's dict is as it always was)."""
        values = asdict(self)
        return {key: value for key, value in values.items() if PER_LAYER_DEFAULTS.get(key, ...) != value}


def _check_widths(a: int, w: int | None, p: int | None, keys: Mapping[str, str]) -> None:
    """A, W and P of one datapath (a layer's or the global one), each error naming the key it came from."""
    for key, value in zip(WIDTH_KEYS, (a, w, p)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{keys[key]}={value!r}: must be an integer")
    if not 8 <= a <= 15:
        raise ConfigError(f"{keys['activation_bits']}={a}: must lie in [8, 15] (8-bit symbols need A >= 8)")
    if w is not None and not 2 <= w <= 16:
        raise ConfigError(f"{keys['weight_bits']}={w}: must lie in [2, 16]")
    if p is not None and p < a + 2:
        raise ConfigError(f"{keys['precision_bits']}={p}: must be at least activation_bits + 2 = {a + 2}")
    if p is not None and p > 31:
        raise ConfigError(f"{keys['precision_bits']}={p}: must be at most 31")


@dataclass(frozen=True)
class ModelConfig:
    """Channel widths of the network (docs/architecture.md)."""

    c1: int = 48
    c2: int = 96
    c3: int = 192
    M: int = 192
    N: int = 96

    def __post_init__(self) -> None:
        for key in ("c1", "c2", "c3", "M", "N"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.{key}={value!r}: must be a positive integer")

    def validate_against(self, hw: HardwareConfig) -> None:
        """The block-sparse context layers tile M and 2M into PI x PO blocks, and no sum can overflow.

        Weights are clamped to +-(2**(W-1) - 1) and inputs to the activation range, so the
        widest layer's worst-case accumulator is known before training: a config whose
        accumulator cannot hold it is refused here rather than at export.
        """
        for key, channels in (("M", self.M), ("2*M", 2 * self.M)):
            if channels % hw.block_in or channels % hw.block_out:
                raise ConfigError(
                    f"model.M={self.M}: {key}={channels} must be a multiple of "
                    f"hardware.block_in={hw.block_in} and hardware.block_out={hw.block_out}"
                )
        if hw.uniform:
            # 4x4 analysis convolutions read c3 (g_a) and M (h_a) channels: the widest fan-in of the network
            fan_in = 16 * max(self.c3, self.M)
            worst = fan_in * hw.weight_max * hw.act_max
            if worst.bit_length() + 1 > hw.accumulator_bits:
                raise ConfigError(
                    f"hardware.accumulator_bits={hw.accumulator_bits}: a 4x4 convolution over "
                    f"{max(self.c3, self.M)} channels can sum to {worst} (needs {worst.bit_length() + 1} bits)")
            return
        for spec in topology.layers(self):  # per layer: its fan-in, its weights and the width its producer writes
            if spec.weighted:
                kh, kw = spec.kernel
                worst = spec.in_channels * kh * kw * hw.for_layer(spec.path).weight_max * topology.input_bound(spec, hw)
                if worst.bit_length() + 1 > hw.accumulator_bits:
                    raise ConfigError(
                        f"hardware.accumulator_bits={hw.accumulator_bits}: {spec.path} ({spec.in_channels} channels, "
                        f"{kh}x{kw} taps, at its widths) can sum to {worst} (needs {worst.bit_length() + 1} bits)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_GROUP_NUM = {CTX1: 3, CTX2: 3, EP: 4}


@dataclass(frozen=True)
class SparsityConfig:
    """Block density of the three sparse context layers (docs/architecture.md).

    ``density`` applies to every layer; ``layers`` overrides it per layer (keys ctx1, ctx2,
    ep). With neither, the paper's group numbers (3, 3, 4) are used.
    ``group_lasso`` weighs the regularization term that pushes weight into kept blocks.
    """

    density: float | None = None
    layers: Mapping[str, float] = field(default_factory=dict)
    group_lasso: float = 0.0

    def __post_init__(self) -> None:
        if self.density is not None:
            _check_density("sparsity.density", self.density)
        for name, value in dict(self.layers).items():
            if name not in SPARSE_LAYERS:
                raise ConfigError(f"sparsity.layers.{name}: unknown layer (expected one of {SPARSE_LAYERS})")
            _check_density(f"sparsity.layers.{name}", value)
        if self.group_lasso < 0:
            raise ConfigError(f"sparsity.group_lasso={self.group_lasso}: must be >= 0")

    def requested_density(self, layer: str) -> float | None:
        """The density asked for ``layer`` (per layer, else global; ``None``: the paper's group numbers)."""
        return dict(self.layers).get(layer, self.density)

    def group_num(self, layer: str, in_channels: int, block_in: int) -> int:
        """Kept blocks per tap and output group: max(1, round(density * C_in / PI))."""
        density = self.requested_density(layer)
        if density is None:
            return DEFAULT_GROUP_NUM[layer]
        return max(1, round(density * in_channels / block_in))

    def to_dict(self) -> dict[str, Any]:
        return {"density": self.density, "layers": dict(self.layers), "group_lasso": self.group_lasso}


def _check_density(key: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ConfigError(f"{key}={value!r}: density must lie in (0, 1]")


def _build(cls, cfg: Any, section: str):
    if cfg is None:
        return cls()
    if isinstance(cfg, cls):
        return cfg
    data = dict(cfg)
    data.pop("_target_", None)
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{section}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    return cls(**data)


def hardware_config(cfg: Any = None) -> HardwareConfig:
    return _build(HardwareConfig, cfg, "hardware")


def model_config(cfg: Any = None) -> ModelConfig:
    return _build(ModelConfig, cfg, "model")


def sparsity_config(cfg: Any = None) -> SparsityConfig:
    return _build(SparsityConfig, cfg, "sparsity")


W12A12 = HardwareConfig()
W8A8 = HardwareConfig(activation_bits=8, weight_bits=8, precision_bits=12, name="w8a8")


# the row engine's layers that share its one datapath: ctx1, ctx2, the channel addition and ep
CONTEXT_ENGINE = (CTX1, CTX2, "summed", EP)


def context_engine_widths(hw: HardwareConfig, model_cfg: ModelConfig) -> tuple[dict[str, str], dict[str, int]]:
    """The context engine's layers (by short name) and the one set of widths the FPGA engine is built for.

    The engine runs ctx1, ctx2, the channel addition and ep on one datapath: a config that gives
    them different widths is a ConfigError naming each layer's widths and the keys they come from.
    """
    from .formats import layer_bit_widths

    paths = {name: path for name, path in topology.row_engine_paths(model_cfg).items() if name in CONTEXT_ENGINE}
    widths = layer_bit_widths(hw, paths.values())
    if len({tuple(w.values()) for w in widths.values()}) > 1:
        shown = "; ".join(f"{path} A={widths[path]['activation']} W={widths[path]['weight']} "
                          f"P={widths[path]['precision']} ({', '.join(dict.fromkeys(hw.width_keys(path).values()))})"
                          for path in paths.values())
        raise ConfigError(f"the context engine runs on one width, but its layers differ: {shown}; give them the "
                          "same hardware.layers widths (ctx2 and ep write the latent grid: hardware.latent_bits)")
    return paths, {**widths[paths[EP]], "latent": hw.latent_width}


# Before QAT no integer exists: a float checkpoint fits every datapath of its block size (the
# statistics and masks are PI x PO blocks); from QAT on its scales were captured for its own bit widths.
FLOAT_CHECKPOINT_HARDWARE_KEYS = ("block_in", "block_out")


def checkpoint_fixed(saved: Mapping[str, Any], prepared: Collection[str]) -> dict[str, Any]:
    """What a checkpoint fixes for a model or run built from it, as ``{"group.key": value}``.

    ``saved`` is the ``{"model", "hardware", "sparsity"}`` config its model state stores and
    ``prepared`` its preparations: the sizes always; the block size always and every hardware
    value once the scales are frozen; the sparsity once the masks are cut.
    """
    fixed = {f"model.{key}": value for key, value in (saved.get("model") or {}).items()}
    hardware = saved.get("hardware") or {}
    if "scales" in prepared:  # a uniform checkpoint fixes its per-layer keys too: none
        hardware = {**hardware, **{key: value for key, value in PER_LAYER_DEFAULTS.items() if key not in hardware}}
    keys = list(hardware) if "scales" in prepared else FLOAT_CHECKPOINT_HARDWARE_KEYS
    fixed.update({f"hardware.{key}": hardware[key] for key in keys if key in hardware})
    if "masks" in prepared:
        fixed.update({f"sparsity.{key}": value for key, value in (saved.get("sparsity") or {}).items()})
    return fixed
