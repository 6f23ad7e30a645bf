"""The hardware export package: round trip, HLS stream layout, hardware report, errors, CLI."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from _models import rd_loss, sample_photos, saturating_tiny_model, tiny_model, training_batches
from streamlic import fixedpoint as fxp
from streamlic.export import ExportError, export_package, load_integer_model
from streamlic.export.report import hardware_report
from streamlic.export.streams import STREAM_FILES
from streamlic.formats import bit_widths
from streamlic.params import export_quantized_parameters
from streamlic.topology import pad_to_multiple
from streamlic.bitexact import compare_with_qat
from streamlic.integer_model import IntegerModel
from streamlic.params import StageError
from streamlic.layers import FGPConv2d

PI = PO = 12
# Hand-chosen active blocks of the tiny model (M = 24): ctx1 has 2 input groups and 4 output
# groups at 3x3 taps and keeps 9 of 18 blocks per group; ctx2 and ep have 4 input groups and
# 4 output groups at 1x3 taps and keep 6 of 12.


def ctx1_keeps(g, i, j, ig):
    return ig == (i + j + g) % 2


def ctx2_keeps(g, i, j, ig):
    return ig in (g % 4, (g + 1) % 4)


def ep_keeps(g, i, j, ig):
    return ig in (0, 3)


HAND_PATTERN = {"ctx1": ctx1_keeps, "ctx2": ctx2_keeps, "ep": ep_keeps}
# (channel pointer, horizontal offset) of output group 0, in (kh, kw, input group) order, worked out by hand:
# ctx1 pointer = kh * (M / PI) + input group = 2 kh + input group
HAND_POINTERS_GROUP0 = {
    "ctx1": [(0, 0), (1, 1), (0, 2), (3, 0), (2, 1), (3, 2), (4, 0), (5, 1), (4, 2)],
    "ctx2": [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)],
    "ep": [(0, 0), (3, 0), (0, 1), (3, 1), (0, 2), (3, 2)],
}


def set_hand_masks(model) -> None:
    for short, layer in model.sparse_layers().items():
        keeps = HAND_PATTERN[short]
        kh, kw = layer.kernel_size
        mask = torch.zeros_like(layer.mask)
        for g in range(layer.out_groups):
            for i in range(kh):
                for j in range(kw):
                    for ig in range(layer.in_groups):
                        if keeps(g, i, j, ig):
                            mask[g * PO:(g + 1) * PO, ig * PI:(ig + 1) * PI, i, j] = 1
        layer.mask.copy_(mask)


@pytest.fixture(scope="module")
def qat_model():
    return tiny_model("w12a12", "qat")


@pytest.fixture(scope="module")
def hand_model():
    """The tiny model with hand-set block masks, quantized after they were set."""
    model = tiny_model("w12a12", "mask")
    set_hand_masks(model)
    model.toggle_quantization(True)
    return model


@pytest.fixture(scope="module")
def package(qat_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("export") / "package"
    image = sample_photos()[1][1][0]  # 150 x 200: golden vectors of a padded photo
    written = export_package(qat_model, directory, image=image, image_name="rocket")
    return directory, written, image


def read_ints(path):
    return [int(v) for v in path.read_text().split()]


# ---------------------------------------------------------------------------- round trip

def test_integer_model_from_files_reproduces_symbols_and_indices(qat_model, package):
    directory, _, _ = package
    in_memory = IntegerModel.from_model(qat_model)
    from_files = load_integer_model(directory)
    assert from_files.model_hash == in_memory.model_hash
    assert torch.equal(from_files.cdf_y, in_memory.cdf_y) and torch.equal(from_files.cdf_z, in_memory.cdf_z)
    for _, x in sample_photos():
        a, b = in_memory.forward(pad_to_multiple(x)), from_files.forward(pad_to_multiple(x))
        for key in ("z_hat", "symbols", "pdf_index", "y_hat", "x_hat"):
            assert torch.equal(a[key], b[key]), key


def test_package_lists_every_file_with_its_hash(qat_model, package):
    directory, written, _ = package
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["model_hash"] == IntegerModel.from_model(qat_model).model_hash
    assert manifest["stage"] == "qat"
    assert manifest["config"]["hardware"]["activation_bits"] == 12
    assert manifest["bit_widths"]["accumulator"] == 40
    # one home for the widths: the manifest, the C header and the report state the same numbers
    widths = bit_widths(qat_model.hw)
    assert manifest["bit_widths"] == widths and manifest["cdf"]["precision"] == widths["cdf_precision"] == 16
    assert widths["symbol"] == 8
    header = (directory / "streamlic_params.h").read_text()
    for name, value in (("ACT", widths["activation"]), ("WEIGHT", widths["weight"]),
                        ("ACCUMULATOR", widths["accumulator"]), ("SHIFT", widths["shift"])):
        assert f"#define STREAMLIC_{name}_BITS {value}\n" in header, name
    report = json.loads((directory / "hardware_report.json").read_text())
    assert {entry["weight_bits"] for entry in report["layers"]} == {widths["weight"]}
    assert {entry["accumulator_bits_limit"] for entry in report["layers"]} == {widths["accumulator"]}
    assert set(manifest["files"]) == set(written) - {"manifest.json"}
    for name, entry in manifest["files"].items():
        assert (directory / name).stat().st_size == entry["bytes"], name
    for name in ("params.pt", "params.npz", "streamlic_params.h", *STREAM_FILES, "cdf_y.txt", "cdf_z.txt",
                 "hardware_report.json", "hardware_report.txt", "golden/symbols.txt"):
        assert name in written, name
    assert manifest["layers"]["g_a.0"]["weight"]["shape"] == [12, 3, 4, 4]


def test_pt_and_npz_hold_the_exported_integers(qat_model, package):
    directory, _, _ = package
    params = qat_model.export_quantized_parameters()
    saved = torch.load(directory / "params.pt")
    with np.load(directory / "params.npz") as arrays:
        for layer, layer_params in params.items():
            for key, value in layer_params.items():
                assert torch.equal(saved[layer][key], value), (layer, key)
                assert np.array_equal(arrays[f"{layer}/{key}"], value.numpy()), (layer, key)
        assert np.array_equal(arrays["tables/cdf_y"], IntegerModel.from_model(qat_model).cdf_y.numpy())
    assert set(params["entropy_parameters.2"]) == {"weight", "bias", "scale_param", "scale_shift", "mask",
                                                  "float_input_scale", "float_output_scale"}
    assert {"affine_weight", "score_bias", "output_scale_shift"} <= set(params["g_a.1"])


# The research code's parameter dict, as docs/export-format.md lists it (written out here, not taken from the exporter).
RESEARCH_CONV_FIELDS = {"weight", "bias", "scale_param", "scale_shift", "float_output_scale"}
RESEARCH_LAGC_FIELDS = {"affine_weight", "affine_bias", "affine_scale_param", "affine_scale_shift",
                        "score_scale_param", "score_scale_shift", "score_bias", "output_scale_param",
                        "output_scale_shift"}
RESEARCH_LAYERS = {
    **{f"g_a.{i}": RESEARCH_LAGC_FIELDS if i % 2 else RESEARCH_CONV_FIELDS for i in range(7)},
    "h_a.1": RESEARCH_CONV_FIELDS, "h_a.2": RESEARCH_LAGC_FIELDS, "h_a.3": RESEARCH_CONV_FIELDS,
    "h_s.0": RESEARCH_CONV_FIELDS, "h_s.2": RESEARCH_CONV_FIELDS,
    **{f"g_s.{i}": RESEARCH_LAGC_FIELDS if i % 2 else RESEARCH_CONV_FIELDS for i in range(7)},
    "context_prediction.1": RESEARCH_CONV_FIELDS | {"mask"}, "context_prediction.3": RESEARCH_CONV_FIELDS | {"mask"},
    "entropy_parameters.2": RESEARCH_CONV_FIELDS | {"mask"},
}


def test_params_pt_is_the_research_codes_parameter_dict(package):
    directory, _, _ = package
    saved = torch.load(directory / "params.pt")
    assert set(saved) == set(RESEARCH_LAYERS)
    for layer, fields in RESEARCH_LAYERS.items():
        assert fields <= set(saved[layer]), (layer, fields - set(saved[layer]))
        for key, value in saved[layer].items():
            if key.startswith("float_"):
                assert value.is_floating_point() and value.numel() == 1, (layer, key)
            else:
                # the authors' scripts compute in int64 from int32 tensors, as the research code writes them
                assert value.dtype == torch.int32, (layer, key, value.dtype)
    # the upsample convolutions keep their 2x2 kernels at 4 * C_out channels; LAGC has one gain per channel
    assert tuple(saved["h_s.0"]["weight"].shape) == (4 * 24, 12, 2, 2)
    assert saved["g_s.1"]["score_bias"].shape == saved["g_s.1"]["output_scale_param"].shape == (24,)


def test_golden_vectors_are_the_integer_models_tensors_in_hwc_order(qat_model, package):
    directory, _, image = package
    record = IntegerModel.from_model(qat_model).forward(pad_to_multiple(image[None]))
    manifest = json.loads((directory / "manifest.json").read_text())["golden"]
    assert manifest["image_size"] == [150, 200] and manifest["padded_size"] == [192, 256]
    for name, key in (("y.txt", "g_a.6"), ("z_hat.txt", "z_hat"), ("hyper.txt", "h_s.2"),
                      ("symbols.txt", "symbols"), ("pdf_index.txt", "pdf_index")):
        lines = (directory / "golden" / name).read_text().splitlines()
        tensor = record[key][0]
        channels, height, width = tensor.shape
        assert len(lines) == height * width and manifest["files"][name]["shape_hwc"] == [height, width, channels]
        h, w = height - 1, 2  # one pixel: line h * W + w holds its C channel values
        assert [int(v) for v in lines[h * width + w].split()] == tensor[:, h, w].tolist()
        assert torch.equal(torch.tensor(read_ints(directory / "golden" / name)).reshape(height, width, channels),
                           tensor.permute(1, 2, 0))


def read_hwc(path, channels):
    """An (H, W, C) golden text file as a [1, C, H, W] tensor (one pixel per line)."""
    lines = path.read_text().splitlines()
    return torch.tensor([[int(v) for v in line.split()] for line in lines]), len(lines)


def corner_set(directory, manifest):
    entry = manifest["golden"]["corner"]
    tensors = {}
    for name, info in entry["files"].items():
        height, width, channels = info["shape_hwc"]
        rows, count = read_hwc(directory / entry["directory"] / name, channels)
        assert count == height * width and rows.shape[1] == channels, name
        tensors[name] = rows.T.reshape(1, channels, height, width)
    return entry, tensors


@pytest.fixture(scope="module")
def saturating_model():
    return saturating_tiny_model("w12a12")


def test_corner_case_vectors_drive_every_clamp_of_the_row_engine(saturating_model, tmp_path):
    export_package(saturating_model, tmp_path, image=sample_photos()[1][1][0], image_name="rocket")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entry, tensors = corner_set(tmp_path, manifest)
    # same shapes as the photo's set; latents inside +-127 * 16
    photo_files = manifest["golden"]["files"]
    for name in ("y.txt", "hyper.txt", "symbols.txt", "pdf_index.txt"):
        assert entry["files"][name]["shape_hwc"] == photo_files[name]["shape_hwc"], name
    assert int(tensors["y.txt"].abs().max()) <= 127 * 16
    assert int(tensors["hyper.txt"].abs().max()) == 2047
    # both sides of every clamp are hit, and the symbols/indices show it
    for clamp in ("symbols", "pdf_index", "ctx1", "ctx2", "channel_addition", "ep_mean"):
        assert entry["saturation"][clamp]["below"] > 0 and entry["saturation"][clamp]["above"] > 0, clamp
    assert entry["unreachable"] == [] and entry["unreached"] == []
    assert int(tensors["symbols.txt"].max()) == 127 and int(tensors["symbols.txt"].min()) == -127
    assert int(tensors["pdf_index.txt"].max()) == 127 and int(tensors["pdf_index.txt"].min()) == 0
    # the goldens are the integer model's, recomputed here from the files alone
    coded = load_integer_model(tmp_path).encode_rows(tensors["y.txt"], tensors["hyper.txt"])
    assert torch.equal(coded["symbols"], tensors["symbols.txt"])
    assert torch.equal(coded["pdf_index"], tensors["pdf_index.txt"])


def test_corner_case_set_names_clamps_no_input_can_reach(package):
    """The briefly trained tiny model's ctx2 cannot exceed +-127 of its 2047 range, whatever its input."""
    directory, _, _ = package
    entry = json.loads((directory / "manifest.json").read_text())["golden"]["corner"]
    assert entry["unreachable"] == ["ctx2.below", "ctx2.above"]
    assert entry["saturation"]["ctx2"] == {"below": 0, "above": 0}
    assert entry["unreached"] == []
    for clamp in ("symbols", "pdf_index", "ctx1", "channel_addition", "ep_mean"):
        assert min(entry["saturation"][clamp].values()) > 0, clamp


def test_cdf_tables_are_16_bit_with_every_symbol_possible(package):
    directory, _, _ = package
    for name in ("cdf_y.txt", "cdf_z.txt"):
        rows = [[int(v) for v in line.split()] for line in (directory / name).read_text().splitlines()]
        assert len(rows) == (fxp.SCALE_LEVELS if name == "cdf_y.txt" else 12)
        for row in rows:
            assert len(row) == fxp.SYMBOL_COLUMNS + 2 and row[0] == 0 and row[-1] == 2**16
            assert all(b > a for a, b in zip(row[:-1], row[1:]))


def test_tampered_stream_is_detected(package, tmp_path):
    directory, _, _ = package
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    lines = (copy / "weights.txt").read_text().splitlines()
    values = lines[5].split()
    values[3] = str(int(values[3]) + 1)
    lines[5] = " ".join(values)
    (copy / "weights.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="model hash"):
        load_integer_model(copy)
    (copy / "biases.txt").write_text("1 2 3\n")
    with pytest.raises(ValueError, match="biases.txt: ends inside"):
        load_integer_model(copy)
    with pytest.raises(ValueError, match="no manifest.json"):
        load_integer_model(tmp_path)


def test_c_header_compiles_and_holds_the_integers(qat_model, package, tmp_path):
    directory, _, _ = package
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    params = qat_model.export_quantized_parameters()
    source = tmp_path / "check.c"
    source.write_text(
        f'#include <stdio.h>\n#include "{directory / "streamlic_params.h"}"\n'
        "int main(void) {\n"
        '  printf("%d %d %d %u %u %d %d\\n", STREAMLIC_ACT_BITS, STREAMLIC_M, STREAMLIC_G_A_0_WEIGHT[5],\n'
        "         STREAMLIC_ENTROPY_PARAMETERS_2_SCALE_PARAM[1], STREAMLIC_CDF_Y[3 * 258 + 129],\n"
        "         STREAMLIC_G_S_3_SCORE_BIAS[2], STREAMLIC_CONTEXT_PREDICTION_1_WEIGHT_LEN);\n"
        "  return 0;\n}\n")
    binary = tmp_path / "check"
    subprocess.run([compiler, "-std=c99", "-Wall", "-Werror", "-Wno-unused-const-variable", "-o", str(binary),
                    str(source)], check=True, capture_output=True)
    printed = [int(v) for v in subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout.split()]
    cdf_y = IntegerModel.from_model(qat_model).cdf_y
    assert printed == [12, 24, int(params["g_a.0"]["weight"].reshape(-1)[5]),
                       int(params["entropy_parameters.2"]["scale_param"][1]), int(cdf_y[3, 129]),
                       int(params["g_s.3"]["score_bias"][2]), params["context_prediction.1"]["weight"].numel()]


# ---------------------------------------------------------------------------- HLS streams

def test_hls_streams_follow_the_documented_layout(hand_model, tmp_path):
    export_package(hand_model, tmp_path)
    params = hand_model.export_quantized_parameters()
    layers = {"ctx1": "context_prediction.1", "ctx2": "context_prediction.3", "ep": "entropy_parameters.2"}
    blocks_per_group = {"ctx1": 9, "ctx2": 6, "ep": 6}
    out_groups = 4
    # sizes: 48 output channels per layer; 12 x 12 weights per block; one pair per block; 128 bound pairs
    scale_params, shifts = read_ints(tmp_path / "scale_params.txt"), read_ints(tmp_path / "scale_shifts.txt")
    weights, biases = read_ints(tmp_path / "weights.txt"), read_ints(tmp_path / "biases.txt")
    assert len(scale_params) == len(shifts) == 3 * 48
    assert len(weights) == sum(out_groups * n * PO * PI for n in blocks_per_group.values())
    assert len(biases) == 3 * 48 + sum(2 * out_groups * n for n in blocks_per_group.values()) + 2 * 128
    # biases.txt, docs/export-format.md: (1) all biases: ctx1's, ctx2's, ep's; (2) all block pointers in the
    # same layer order; (3) the 128 symbol bound pairs. The kernel's loader reads exactly this.
    all_biases = [v for name in layers.values() for v in params[name]["bias"].tolist()]
    assert biases[:3 * 48] == all_biases
    w_at, b_at = 0, 3 * 48
    for index, (short, name) in enumerate(layers.items()):
        p = params[name]
        assert scale_params[48 * index:48 * (index + 1)] == p["scale_param"].tolist()
        assert shifts[48 * index:48 * (index + 1)] == p["scale_shift"].tolist()
        expected_pairs, expected_weights = [], []
        kh, kw = p["weight"].shape[2:]
        for g in range(out_groups):
            for i in range(kh):
                for j in range(kw):
                    for ig in range(4 if short != "ctx1" else 2):
                        if HAND_PATTERN[short](g, i, j, ig):
                            expected_pairs += [i * 2 + ig if short == "ctx1" else ig, j]
                            expected_weights += p["weight"][g * PO:(g + 1) * PO, ig * PI:(ig + 1) * PI, i, j].reshape(
                                -1).tolist()
        pairs = biases[b_at:b_at + len(expected_pairs)]
        assert pairs == expected_pairs, short
        assert list(zip(pairs[0::2], pairs[1::2]))[:blocks_per_group[short]] == HAND_POINTERS_GROUP0[short]
        b_at += len(expected_pairs)
        assert weights[w_at:w_at + len(expected_weights)] == expected_weights, short
        w_at += len(expected_weights)
    assert biases[b_at:] == [127, -127] * 128
    # the old, wrong layout put ctx1's pointers right after ctx1's biases: the kernel would read
    # them as ctx2's biases
    assert biases[48:96] == params[layers["ctx2"]]["bias"].tolist()
    # a whole block is one line per output channel: row-major [PO][PI]
    first_block = (tmp_path / "weights.txt").read_text().splitlines()[:PO]
    assert [int(v) for v in first_block[1].split()] == params["context_prediction.1"]["weight"][1, 0:PI, 0, 0].tolist()


def test_wrong_block_count_names_the_layer(tmp_path):
    broken = tiny_model("w12a12", "mask")
    set_hand_masks(broken)
    broken.toggle_quantization(True)
    layer: FGPConv2d = broken.sparse_layers()["ctx2"]
    with torch.no_grad():
        layer.mask[0:PO, 3 * PI:4 * PI, 0, 0] = 1  # a 7th block in output group 0
    with pytest.raises(ExportError, match=r"ctx2 \(context_prediction.3\): output group 0 has 7 active blocks.*6"):
        export_package(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- hardware report

def test_hardware_report_counts_macs_independently_of_the_exporter(qat_model, package):
    directory, _, _ = package
    report = json.loads((directory / "hardware_report.json").read_text())
    assert report["image_size"] == [192, 256] and report["input_size"] == [150, 200]
    first_line = (directory / "hardware_report.txt").read_text().splitlines()[0]
    assert "192x256 image (height x width; the 150x200 input image padded to multiples of 64)" in first_line
    # count the multiply-accumulates the QAT model performs on a 192 x 256 image, from the shapes
    # its layers really produce: conv C_in kh kw per output, LAGC C + 2 per output, sparse layers
    # only their nonzero mask entries
    counts: dict[str, int] = {}
    hooks = []
    for name, module in qat_model.named_modules():
        if isinstance(module, FGPConv2d):
            def hook(mod, inputs, out, name=name):
                nonzero_per_channel = mod.mask.flatten(1).sum(dim=1)
                counts[name] = counts.get(name, 0) + int(nonzero_per_channel.sum()) * out.shape[2] * out.shape[3]
        elif type(module).__name__ == "QUpsampleConv2d":
            def hook(mod, inputs, out, name=name):  # the 2x2 conv runs on the input padded by 1
                positions = (inputs[0].shape[2] + 1) * (inputs[0].shape[3] + 1)
                counts[name] = positions * mod.out_channels * mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
        elif type(module).__name__ == "QConv2d":
            def hook(mod, inputs, out, name=name):
                counts[name] = out.numel() * mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
        elif type(module).__name__ == "LAGC":
            def hook(mod, inputs, out, name=name):
                counts[name] = out.numel() * (mod.channels + 2)
        else:
            continue
        hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        qat_model(torch.rand(1, 3, 192, 256))
    for handle in hooks:
        handle.remove()
    by_layer = {entry["layer"]: entry for entry in report["layers"]}
    assert set(by_layer) == set(counts)
    for name, count in counts.items():
        assert by_layer[name]["macs_sparse"] == count, name
    assert report["totals"]["macs_sparse"] == sum(counts.values())
    assert report["totals"]["macs_per_pixel_sparse"] == pytest.approx(sum(counts.values()) / (192 * 256))
    context = ("context_prediction.1", "context_prediction.3", "entropy_parameters.2")
    assert report["totals"]["context_macs_sparse"] == sum(counts[name] for name in context)
    # half of the blocks are active in the tiny model's context layers
    assert report["totals"]["context_sparse_ratio"] == pytest.approx(0.5)
    ctx1 = by_layer["context_prediction.1"]
    assert ctx1["blocks_per_group"] == 9 and ctx1["block_count_per_group"] == [9, 9, 9, 9]
    assert ctx1["macs_dense"] == 48 * 24 * 9 * 12 * 16
    text = (directory / "hardware_report.txt").read_text()
    assert "context_prediction.1" in text and "9/18" in text and "MACs per pixel" in text


def test_accumulator_wider_than_the_hardware_names_the_layer(qat_model):
    params = export_quantized_parameters(qat_model)
    narrow = dataclasses.replace(qat_model.hw, accumulator_bits=26)
    blocks = {short: layer.blocks_per_group for short, layer in qat_model.sparse_layers().items()}
    report = hardware_report(params, qat_model.hw, qat_model.model_cfg, blocks, 64, 64)
    first_too_wide = next(e["layer"] for e in report["layers"] if e["accumulator_bits"] > 26)
    with pytest.raises(fxp.FixedPointError, match=f"{first_too_wide}: worst-case accumulator .* needs \\d+ bits, "
                                                  "more than hardware.accumulator_bits=26"):
        hardware_report(params, narrow, qat_model.model_cfg, blocks, 64, 64)


# ---------------------------------------------------------------------------- range errors

def test_bias_pushed_beyond_16_bits_is_held_in_range_by_the_qat_forward():
    model = tiny_model("w12a12", "qat")
    with torch.no_grad():
        model.g_a[2].bias[3] = 1e3  # 2**4 * 1000 / s_out is far beyond 16 bits
        model.g_s[3].gain.bias[2] = 1e3  # the LAGC gain bias (beta) too
    params = export_quantized_parameters(model)
    assert int(params["g_a.2"]["bias"][3]) == 2**15 - 1
    assert int(params["g_s.3"]["score_bias"][2]) == 2**15 - 1
    # the QAT forward computes with the same clamped integers
    assert compare_with_qat(model, sample_photos()[0][1]).exact


@pytest.mark.parametrize("hardware", ["w12a12", "w8a8"])
def test_every_qat_state_exports_even_under_a_high_learning_rate(hardware, tmp_path):
    """Property: from QAT on, whatever a few wild optimizer steps do, the model stays exportable."""
    for seed in range(3):
        model = copy.deepcopy(tiny_model(hardware, "mask"))
        torch.manual_seed(seed)
        with torch.no_grad():  # a random model: every weight and bias perturbed
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * parameter.abs().mean().clamp(min=1e-3))
        model.toggle_quantization(True)
        model.train()
        params = [p for name, p in model.named_parameters() if p.requires_grad and not name.endswith("quantiles")]
        optimizer = torch.optim.Adam(params, lr=0.5)
        for step, x in enumerate(training_batches(3, batch=2, seed=seed)):
            optimizer.zero_grad()
            rd_loss(model, x).backward()
            optimizer.step()
            export_package(model.eval(), tmp_path / f"{hardware}-{seed}-{step}")
            model.train()


def test_multiplier_out_of_range_names_the_layer(tmp_path):
    model = tiny_model("w12a12", "qat")
    with torch.no_grad():
        model.g_s[4].req_m[1] = 70000
    with pytest.raises(fxp.FixedPointError, match=r"g_s\.4: scale_param 70000 \(channel 1\)"):
        export_package(model, tmp_path / "out")
    model = tiny_model("w12a12", "qat")
    with torch.no_grad():
        model.h_a[2].out_k[0] = 64
    with pytest.raises(fxp.FixedPointError, match=r"h_a\.2: output_scale_shift 64 \(channel 0\) is outside \[0, 63\]"):
        export_quantized_parameters(model)


# ---------------------------------------------------------------------------- checkpoints and CLI

def save_checkpoint(model, path):
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


def test_pre_qat_checkpoint_is_refused(tmp_path, caplog):
    cli = pytest.importorskip("streamlic.cli")
    checkpoint = save_checkpoint(tiny_model("w12a12", "mask"), tmp_path / "stage2-mask.ckpt")
    assert cli.main(["export", str(checkpoint), "-o", str(tmp_path / "out")]) == 1
    assert "stage 'mask'" in caplog.text and "QAT" in caplog.text
    assert not (tmp_path / "out").exists()
    with pytest.raises(StageError, match="stage 'aun'"):
        export_quantized_parameters(tiny_model("w12a12", "aun"))


def test_export_command_writes_the_package(tmp_path, caplog):
    cli = pytest.importorskip("streamlic.cli")  # the CLI also needs the codec module
    model = tiny_model("w8a8", "pdf")
    checkpoint = save_checkpoint(model, tmp_path / "stage5-pdf.ckpt")
    image = tmp_path / "photo.png"
    from PIL import Image
    Image.fromarray((sample_photos()[2][1][0].permute(1, 2, 0) * 255).round().byte().numpy()).save(image)
    assert cli.main(["export", str(checkpoint), "-o", str(tmp_path / "pkg"), "--image", str(image)]) == 0
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    assert manifest["stage"] == "pdf" and manifest["config"]["hardware"]["name"] == "w8a8"
    assert manifest["golden"]["image"] == "photo.png" and manifest["golden"]["padded_size"] == [128, 192]
    assert load_integer_model(tmp_path / "pkg").model_hash == IntegerModel.from_model(model).model_hash
    header = (tmp_path / "pkg" / "streamlic_params.h").read_text()
    assert "static const int8_t STREAMLIC_G_A_0_WEIGHT[" in header  # 8-bit weights at w8a8
    # a pre-QAT checkpoint: exit status 1 and the reason in the log
    early = save_checkpoint(tiny_model("w8a8", "aun"), tmp_path / "stage1-aun.ckpt")
    assert cli.main(["export", str(early), "-o", str(tmp_path / "early")]) == 1
    assert "stage 'aun'" in caplog.text


def test_export_refuses_a_used_directory_and_force_replaces_only_its_own_files(tmp_path, caplog):
    cli = pytest.importorskip("streamlic.cli")
    first = save_checkpoint(tiny_model("w12a12", "qat"), tmp_path / "first.ckpt")
    second = save_checkpoint(tiny_model("w12a12", "pdf"), tmp_path / "second.ckpt")
    image = tmp_path / "photo.png"
    from PIL import Image
    Image.fromarray((sample_photos()[2][1][0].permute(1, 2, 0) * 255).round().byte().numpy()).save(image)
    out = tmp_path / "pkg"
    assert cli.main(["export", str(first), "-o", str(out), "--image", str(image)]) == 0
    (out / "notes.txt").write_text("mine")
    before = (out / "manifest.json").read_text()
    # without --force nothing is touched
    assert cli.main(["export", str(second), "-o", str(out)]) == 1
    assert "not empty" in caplog.text and "--force" in caplog.text
    assert (out / "manifest.json").read_text() == before
    # with --force the first export's files go (no stale golden vectors of the other model), the user's stay
    assert cli.main(["export", str(second), "-o", str(out), "--force"]) == 0
    assert not (out / "golden").exists()
    assert (out / "notes.txt").read_text() == "mine"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "pdf" and manifest["golden"] is None
