"""Per-layer bit widths: the config's forms, precedence and checks, the latent grid, and the modules built from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from _models import ENTROPY_AT_8, MIXED, TINY_MODEL, TINY_SPARSITY, sample_photos, tiny_model
from streamlic import StreamLIC, topology
from streamlic.bitexact import compare_with_qat
from streamlic.config import ConfigError, HardwareConfig, ModelConfig, checkpoint_fixed, hardware_config
from streamlic.export import ExportError, export_package, load_integer_model
from streamlic.integer_model import IntegerModel
from streamlic.layers import ChannelAddition, QuantLayer

LATENT_WRITERS = ("g_a.6", "h_a.3", "h_s.2", "context_prediction.3", "entropy_parameters.2")


def _widths(hw: HardwareConfig, path: str) -> tuple[int, int, int]:
    layer = hw.for_layer(path)
    return layer.activation_bits, layer.weight_bits, layer.precision_bits


def test_nested_and_flat_forms_are_one_config_that_round_trips():
    nested = hardware_config({"layers": {"g_a": {"0": {"weight_bits": 8}, "activation_bits": 10}}})  # Hydra's form
    flat = hardware_config({"layers": {"g_a.0": {"weight_bits": 8}, "g_a": {"activation_bits": 10}}})
    assert nested == flat
    assert nested.layers == {"g_a": {"activation_bits": 10}, "g_a.0": {"weight_bits": 8}}
    assert hardware_config(nested.to_dict()) == nested
    assert hash(nested) == hash(flat)
    # a uniform config's dict (the model hash, the manifest, a checkpoint's config) is as before per-layer widths
    assert "layers" not in HardwareConfig().to_dict() and "latent_bits" not in HardwareConfig().to_dict()
    assert HardwareConfig().uniform and not nested.uniform


def test_a_layer_path_wins_over_its_sub_network_and_precision_follows_the_global_residual():
    hw = hardware_config({"layers": {"g_a": {"activation_bits": 8, "weight_bits": 8}, "g_a.2": {"weight_bits": 10}}})
    assert _widths(hw, "g_a.0") == (8, 8, 12)  # P = A + (16 - 12)
    assert _widths(hw, "g_a.2") == (8, 10, 12)
    assert _widths(hw, "h_a.1") == (12, 12, 16)
    # the latent grid's writer keeps the latent width; its weights follow the sub-network
    assert _widths(hw, "g_a.6") == (12, 8, 16)
    assert hw.latent_width == 12 and hw.latent_scale == 1 / 16
    assert hw.for_layer("g_a.0").latent_scale == 1 / 16  # every layer's view of the grid is the network's


def test_the_latent_grid_follows_the_entropy_path_or_its_own_key():
    assert ENTROPY_AT_8.latent_width == 8 and ENTROPY_AT_8.latent_scale == 1.0
    assert [_widths(ENTROPY_AT_8, path)[0] for path in LATENT_WRITERS] == [8] * 5
    own = hardware_config({"latent_bits": 10})
    assert own.latent_width == 10 and not own.uniform
    assert [_widths(own, path)[0] for path in LATENT_WRITERS] == [10] * 5
    assert _widths(own, "g_a.4") == (12, 12, 16)


@pytest.mark.parametrize("layers, latent_bits, error", [
    ({"g_x": {"weight_bits": 8}}, None, "hardware.layers.g_x: no such sub-network or weighted layer"),
    ({"g_a": {"0": {"activation_bits": 7}}}, None, "hardware.layers.g_a.0.activation_bits=7: must lie in [8, 15]"),
    ({"g_s": {"precision_bits": 13}}, None, "hardware.layers.g_s.precision_bits=13: must be at least"),
    ({"g_s.2": {"weight_bits": 17}}, None, "hardware.layers.g_s.2.weight_bits=17: must lie in [2, 16]"),
    ({"h_s.2": {"activation_bits": 8}}, None, "hardware.layers.h_s.2.activation_bits=8: h_s.2 writes the latent grid"),
    ({"g_a.6": {"activation_bits": 12}}, 10, "hardware.layers.g_a.6.activation_bits=12: g_a.6 writes the latent"),
    ({"g_a": {"bits": 8}}, None, "hardware.layers.g_a.bits=8: not a width key"),
    ({}, 16, "hardware.latent_bits=16: must lie in [8, 15]"),
])
def test_a_bad_per_layer_value_names_its_key(layers, latent_bits, error):
    with pytest.raises(ConfigError) as caught:
        hardware_config({"layers": layers, "latent_bits": latent_bits})
    assert str(caught.value).startswith(error), caught.value


@pytest.mark.parametrize("config, error", [
    ({"layers": {"g_a": {"activation_bits": 15}}}, "hardware.layers.g_a.precision_bits=38: must be at most 31"),
    ({"latent_bits": 15}, "hardware.layers.g_a.6.precision_bits=38: must be at most 31"),
    ({"latent_bits": 12, "layers": {"g_a": {"precision_bits": 31}}},
     "hardware.layers.g_a.6.precision_bits=35: must be at most 31"),
])
def test_a_precision_that_no_key_gives_is_named_by_the_key_that_sets_it(config, error):
    # P = A + the residual (23 here): the error shows that P under its own key, not under the A key or a
    # sub-network's P, whose values differ
    with pytest.raises(ConfigError) as caught:
        hardware_config({"activation_bits": 8, "weight_bits": 8, "precision_bits": 31, **config})
    assert str(caught.value) == error


def test_the_accumulator_is_checked_per_layer_at_its_widths():
    wide = hardware_config({"accumulator_bits": 36, "layers": {"g_a.4": {"weight_bits": 16}}})
    with pytest.raises(ConfigError, match=r"hardware.accumulator_bits=36: g_a.4 \(96 channels, 4x4 taps"):
        ModelConfig().validate_against(wide)
    # 8-bit inputs and weights elsewhere need fewer bits than the 12-bit datapath's widest layer
    ModelConfig().validate_against(hardware_config({"accumulator_bits": 36, "layers": {
        name: {"activation_bits": 8, "weight_bits": 8} for name in topology.SUBNETWORKS}, "latent_bits": 8}))


def test_input_bounds_are_the_producers_output_range():
    hw, specs = MIXED, {spec.path: spec for spec in topology.layers(ModelConfig())}
    assert topology.input_bound(specs["g_a.0"], hw) == 127  # the image at g_a.0's 8 bits
    assert topology.input_bound(specs["g_a.2"], hw) == 127
    assert topology.input_bound(specs["h_a.1"], hw) == 2047  # the latent grid
    assert topology.input_bound(specs["g_s.0"], hw) == 2047
    assert topology.input_bound(specs["g_s.2"], hw) == 127
    assert topology.input_bound(specs["h_s.0"], hw) == 127  # the hyper symbols


def test_modules_are_built_at_their_layers_widths_and_the_checkpoint_keeps_them():
    model = StreamLIC(model=TINY_MODEL, hardware={"layers": {"g_s": {"0": {"weight_bits": 8}}}},
                      sparsity=TINY_SPARSITY)
    assert model.g_s[0].hw.weight_bits == 8 and model.g_s[2].hw.weight_bits == 12
    model.calibrate(sample_photos()[0][1])
    model.toggle_quantization(True)
    state = model.state_dict()
    assert state["_extra_state"]["config"]["hardware"]["layers"] == {"g_s.0": {"weight_bits": 8}}
    fixed = checkpoint_fixed(state["_extra_state"]["config"], ("scales",))
    assert fixed["hardware.layers"] == {"g_s.0": {"weight_bits": 8}} and fixed["hardware.latent_bits"] is None
    # the flat form of the same widths loads it; other widths are refused once the scales are frozen
    StreamLIC(model=TINY_MODEL, hardware={"layers": {"g_s.0": {"weight_bits": 8}}},
              sparsity=TINY_SPARSITY).load_state_dict(state)
    with pytest.raises(ValueError, match="hardware.layers"):
        StreamLIC(model=TINY_MODEL, sparsity=TINY_SPARSITY).load_state_dict(state)


def test_an_entropy_path_at_8_bits_keeps_one_latent_grid_and_is_bit_exact():
    model = tiny_model("entropy8", "qat")
    assert model.hw.latent_scale == 1.0
    fixed = {name: module.fixed_scale for name, module in model.named_modules()
             if isinstance(module, QuantLayer) and module.fixed_scale is not None}
    assert fixed == {path: 1.0 for path in LATENT_WRITERS}
    assert model.g_a[0].hw.activation_bits == 12 and model.entropy_parameters[2].hw.activation_bits == 8
    addition = model.entropy_parameters[0]
    assert isinstance(addition, ChannelAddition) and addition.scale == 1.0 and addition.hw.act_max == 127
    assert model.input_scales()["g_s"] == model.input_scales()["context_prediction"] == 1.0
    name, x = sample_photos()[0]
    report = compare_with_qat(model, x)
    assert report.exact, f"{name}\n{report}"


# ---------------------------------------------------------------------------- export

def test_a_mixed_export_lists_each_layers_widths_and_reads_back(tmp_path):
    model = tiny_model("mixed", "qat")
    export_package(model, tmp_path / "pkg")
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    assert manifest["bit_widths"]["activation"] == manifest["bit_widths"]["weight"] == 12  # the global widths
    layers = manifest["layer_bit_widths"]
    assert layers["g_a.0"] == {"activation": 8, "weight": 8, "precision": 12, "residual": 4}
    assert layers["g_a.6"] == {"activation": 12, "weight": 8, "precision": 16, "residual": 4}
    assert layers["h_a.1"]["activation"] == 12 and layers["g_s.5"]["activation"] == 8
    assert manifest["context_engine"] == {
        "layers": {"ctx1": "context_prediction.1", "ctx2": "context_prediction.3",
                   "summed": "entropy_parameters.0", "ep": "entropy_parameters.2"},
        "bit_widths": {"activation": 12, "weight": 12, "precision": 16, "residual": 4, "latent": 12}}
    header = (tmp_path / "pkg" / "streamlic_params.h").read_text()
    assert "#define STREAMLIC_G_A_0_ACT_BITS 8\n" in header and "#define STREAMLIC_H_A_1_ACT_BITS 12\n" in header
    assert "#define STREAMLIC_LATENT_BITS 12\n" in header
    assert "static const int8_t STREAMLIC_G_S_2_WEIGHT[" in header  # C types follow each layer's widths
    assert "static const int16_t STREAMLIC_H_S_0_WEIGHT[" in header
    assert "static const int8_t STREAMLIC_TANH_LUT_A8[255]" in header  # the 8-bit LAGCs' table
    report = json.loads((tmp_path / "pkg" / "hardware_report.json").read_text())
    rows = {row["layer"]: row for row in report["layers"]}
    assert (rows["g_a.2"]["activation_bits"], rows["g_a.2"]["weight_bits"], rows["g_a.2"]["input_bits"]) == (8, 8, 8)
    assert rows["g_a.2"]["bit_macs_sparse"] == rows["g_a.2"]["macs_sparse"] * 8 * 8
    assert rows["h_a.1"]["input_bits"] == 12
    assert load_integer_model(tmp_path / "pkg").model_hash == IntegerModel.from_model(model).model_hash


def test_an_export_refuses_a_context_engine_of_mixed_widths_in_one_line(tmp_path):
    model = tiny_model("entropy8", "qat")  # ctx1 at 12 bits, ctx2, the addition and ep at 8
    with pytest.raises(ExportError) as caught:
        export_package(model, tmp_path / "pkg")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("the context engine runs on one width, but its layers differ")
    assert "context_prediction.1 A=12 W=12 P=16 (hardware.activation_bits, hardware.weight_bits)" in message
    assert ("entropy_parameters.2 A=8 W=8 P=12 (hardware.layers.entropy_parameters.activation_bits, "
            "hardware.layers.entropy_parameters.weight_bits)") in message
    assert not (tmp_path / "pkg").exists()
    # the command: one ERROR line, exit 1, nothing written
    checkpoint = tmp_path / "stage3-qat.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, checkpoint)
    done = subprocess.run([sys.executable, "-m", "streamlic.cli", "export", str(checkpoint), "-o",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"ERROR {message}"], done.stderr
    assert not (tmp_path / "out").exists()


def test_the_codec_codes_a_mixed_model_exactly():
    from streamlic.codec import StreamCodec

    model = tiny_model("mixed", "pdf")
    encoder, decoder = StreamCodec(IntegerModel.from_model(model)), StreamCodec(IntegerModel.from_model(model))
    name, x = sample_photos()[1]
    encoded = encoder.encode(x[0])
    decoded = decoder.decode(encoded.data, name)
    expected = decoder.engine.synthesis(encoded.code.y_hat_q)[0, :, :x.shape[2], :x.shape[3]]
    assert torch.equal(decoded, expected)
    assert torch.equal(decoder.read_latents(encoded.data, name)[1].symbols, encoded.code.symbols)
