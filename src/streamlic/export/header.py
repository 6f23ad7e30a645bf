"""``streamlic_params.h``: the integers as fixed-width C arrays, and the storage widths of the ``.npz``."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import fixedpoint as fxp
from ..config import HardwareConfig, ModelConfig
from ..formats import bit_widths, layer_bit_widths
from ..kinds import field_bits

HEADER_PREFIX = "STREAMLIC"
# the datapath widths the header defines after ACT_BITS, each as <NAME>_BITS
DATAPATH_WIDTHS = ("weight", "precision", "residual", "accumulator", "multiplier", "shift")
# each layer's own widths, as <LAYER>_<NAME>
LAYER_WIDTH_NAMES = {"activation": "ACT_BITS", "weight": "WEIGHT_BITS", "precision": "PRECISION_BITS",
                     "residual": "RESIDUAL_BITS"}


def _c_int_type(bits: int, signed: bool) -> str:
    width = next(w for w in (8, 16, 32, 64) if bits <= w)
    return f"{'' if signed else 'u'}int{width}_t"


def _c_type_for(key: str, hw: HardwareConfig) -> str:
    """The C type of an exported field: the narrowest that holds its width (streamlic.kinds' formats)."""
    return _c_int_type(*field_bits(key, hw))


# numpy and torch handle unsigned types wider than 8 bits poorly: those go one signed size up
_STORAGE_DTYPES = {"int8_t": torch.int8, "int16_t": torch.int16, "int32_t": torch.int32, "int64_t": torch.int64,
                   "uint8_t": torch.uint8, "uint16_t": torch.int32, "uint32_t": torch.int64}


def compact(key: str, value: Tensor, hw: HardwareConfig) -> Tensor:
    """An integer parameter in the narrowest dtype its hardware width fits (as in the C header)."""
    if value.is_floating_point():
        return value
    return value.to(_STORAGE_DTYPES[_c_type_for(key, hw)])


def _c_name(*parts: str) -> str:
    return "_".join([HEADER_PREFIX, *parts]).replace(".", "_").upper()


def _c_array(name: str, ctype: str, values: Tensor) -> list[str]:
    flat = [str(v) for v in values.reshape(-1).tolist()]
    shape = list(values.shape)
    lines = [f"#define {name}_LEN {len(flat)}"]
    lines += [f"#define {name}_D{axis} {size}" for axis, size in enumerate(shape)]
    lines.append(f"static const {ctype} {name}[{len(flat)}] = {{  /* shape {shape} */")
    lines += ["    " + ", ".join(flat[i:i + 16]) + "," for i in range(0, len(flat), 16)]
    lines.append("};")
    return lines


def c_header(params: dict[str, dict[str, Tensor]], tables: dict[str, Tensor], hw: HardwareConfig,
             model_cfg: ModelConfig, model_hash: str) -> str:
    """``streamlic_params.h``: fixed-width ``static const`` arrays and ``#define`` s of shapes and widths."""
    guard = _c_name("PARAMS_H")
    lines = ["/* StreamLIC integer parameters, written by `streamlic export`. Do not edit. */",
             f"#ifndef {guard}", f"#define {guard}", "", "#include <stdint.h>", "",
             f'#define {_c_name("MODEL_HASH")} "{model_hash}"']
    bits = bit_widths(hw)
    widths = {"ACT_BITS": bits["activation"], **{f"{name.upper()}_BITS": bits[name] for name in DATAPATH_WIDTHS},
              "BLOCK_IN": hw.block_in,
              "BLOCK_OUT": hw.block_out, "LATENT_SHIFT": hw.latent_shift, "SYMBOL_MAX": fxp.SYMBOL_MAX,
              "SCALE_LEVELS": fxp.SCALE_LEVELS, **{key.upper(): value for key, value in model_cfg.to_dict().items()}}
    lines += [f"#define {_c_name(key)} {value}" for key, value in widths.items()]
    lines.append(f"#define {_c_name('LATENT_BITS')} {hw.latent_width}")
    layer_widths = layer_bit_widths(hw, params)
    for layer, layer_params in params.items():
        lines += ["", f"/* ---- {layer} ---- */"]
        lines += [f"#define {_c_name(layer, LAYER_WIDTH_NAMES[name])} {value}"
                  for name, value in layer_widths[layer].items()]
        for key, value in layer_params.items():
            if value.is_floating_point():
                lines.append(f"static const double {_c_name(layer, key)} = {float(value):.17g};")
            else:
                lines += _c_array(_c_name(layer, key), _c_type_for(key, hw.for_layer(layer)), value)
    table_types = {"cdf_y": "uint32_t", "cdf_z": "uint32_t", "tanh_lut": _c_int_type(hw.activation_bits, True)}
    for name, table in tables.items():
        lines += ["", *_c_array(_c_name(name), table_types[name], table)]
    # an LAGC at another width than the global one reads its own table: TANH_LUT_A<bits>
    lagc_widths = {hw.for_layer(layer).activation_bits: hw.for_layer(layer)
                   for layer in params if "affine_weight" in params[layer]}
    for bits, layer_hw in sorted(lagc_widths.items()):
        if bits != hw.activation_bits:
            table = fxp.tanh_table(layer_hw).to(torch.int64)
            lines += ["", *_c_array(_c_name(f"tanh_lut_a{bits}"), _c_int_type(bits, True), table)]
    lines += ["", f"#endif /* {guard} */", ""]
    return "\n".join(lines)
