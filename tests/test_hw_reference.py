"""The C reference of the autoregressive engine (hw/ape_reference.c) against exported packages.

The program reads the HLS streams as the kernel's loader does (docs/export-format.md) and recomputes the
golden symbols and pdf indices from y and the hyper output; it must agree exactly, and it
must fail on a stream in the wrong layout.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from _models import sample_photos, saturating_tiny_model, tiny_model
from streamlic.export import export_package

SOURCE = Path(__file__).resolve().parents[1] / "hw" / "ape_reference.c"
# (hardware, stage); "saturating": the tiny model whose ctx2 can saturate (corner-case set hits every clamp);
# per-layer widths: "mixed", g_a and g_s at 8 bits beside the 12-bit row engine; "engine10", the row engine
# and the latent grid at 10 bits beside 12-bit transforms (the program reads the engine's widths from the manifest)
CASES = (("w12a12", "pdf"), ("w8a8", "qat"), ("w8a8", "saturating"), ("mixed", "qat"), ("mixed", "saturating"),
         ("engine10", "qat"))


@pytest.fixture(scope="module")
def binary(tmp_path_factory) -> Path:
    compiler = shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler (cc) on PATH")
    out = tmp_path_factory.mktemp("cref") / "ape_reference"
    build = subprocess.run([compiler, "-std=c99", "-Wall", "-Werror", "-O2", "-o", str(out), str(SOURCE)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    return out


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict[str, Path]:
    """One export with golden vectors of a padded photo (150 x 200) per (hardware, stage)."""
    name, image = sample_photos()[1]
    exported = {}
    for hardware, stage in CASES:
        directory = tmp_path_factory.mktemp("export") / f"{hardware}-{stage}"
        model = saturating_tiny_model(hardware) if stage == "saturating" else tiny_model(hardware, stage)
        export_package(model, directory, image=image[0], image_name=name)
        exported[f"{hardware}-{stage}"] = directory
    return exported


def run_reference(binary: Path, package: Path, out: Path, golden: str = "golden") -> subprocess.CompletedProcess:
    out.mkdir(exist_ok=True)
    return subprocess.run([str(binary), str(package), str(package / golden), str(out)],
                          capture_output=True, text=True, timeout=60)


def broken_copy(package: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "package"
    shutil.copytree(package, copy)
    return copy


@pytest.mark.parametrize("golden", ["golden", "golden/corner"])
@pytest.mark.parametrize("case", [f"{hardware}-{stage}" for hardware, stage in CASES])
def test_c_reference_reproduces_the_golden_symbols_and_pdf_indices(binary, packages, case, golden, tmp_path):
    """The photo's set and the corner-case set, whose inputs drive the engine's clamps."""
    package = packages[case]
    result = run_reference(binary, package, tmp_path / "out", golden)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "symbols        0 of" in result.stdout and "pdf_index      0 of" in result.stdout
    # the same text format as the golden files
    for name in ("symbols.txt", "pdf_index.txt"):
        assert (tmp_path / "out" / name).read_text() == (package / golden / name).read_text()
    if case.endswith("saturating") and golden.endswith("corner"):
        saturation = json.loads((package / "manifest.json").read_text())["golden"]["corner"]["saturation"]
        for clamp in ("symbols", "pdf_index", "ctx1", "ctx2", "channel_addition", "ep_mean"):
            assert min(saturation[clamp].values()) > 0, clamp


def test_old_bias_layout_fails(binary, packages, tmp_path):
    """Each layer's pointers right after its own biases (the wrong, old layout) must not pass."""
    package = broken_copy(packages["w12a12-pdf"], tmp_path)
    layers = json.loads((package / "manifest.json").read_text())["context_layers"]
    lines = (package / "biases.txt").read_text().splitlines()  # one bias, pointer pair or bound pair per line
    biases, pointers, at = [], [], 0
    for info in layers.values():
        biases.append(lines[at:at + info["out_channels"]])
        at += info["out_channels"]
    for info in layers.values():
        count = info["out_groups"] * info["blocks_per_group"]
        pointers.append(lines[at:at + count])
        at += count
    wrong = [line for layer_biases, layer_pointers in zip(biases, pointers) for line in layer_biases + layer_pointers]
    (package / "biases.txt").write_text("\n".join(wrong + lines[at:]) + "\n")
    result = run_reference(binary, package, tmp_path / "out")
    assert result.returncode != 0
    assert "biases.txt" in result.stderr or "FAIL:" in result.stdout


def test_swapped_weight_blocks_give_mismatches(binary, packages, tmp_path):
    """Two blocks of one output group exchanged: the streams load, the numbers differ."""
    package = broken_copy(packages["w12a12-pdf"], tmp_path)
    manifest = json.loads((package / "manifest.json").read_text())
    layers = manifest["context_layers"]
    block_rows = manifest["config"]["hardware"]["block_out"]  # PO rows per block, one line each
    lines = (package / "weights.txt").read_text().splitlines()
    first = layers["ctx1"]["out_groups"] * layers["ctx1"]["blocks_per_group"] * block_rows  # ctx2's first block
    second = first + block_rows
    lines[first:second], lines[second:second + block_rows] = lines[second:second + block_rows], lines[first:second]
    (package / "weights.txt").write_text("\n".join(lines) + "\n")
    result = run_reference(binary, package, tmp_path / "out")
    assert result.returncode == 1
    assert "FAIL:" in result.stdout and "symbols        0 of" not in result.stdout


@pytest.mark.parametrize("change, message", [(lambda values: values[:-1], "ends early"),
                                             (lambda values: values + ["0"], "extra integers")])
def test_stream_of_the_wrong_length_is_an_error_naming_the_file(binary, packages, tmp_path, change, message):
    package = broken_copy(packages["w8a8-qat"], tmp_path)
    values = (package / "scale_shifts.txt").read_text().split()
    (package / "scale_shifts.txt").write_text("\n".join(change(values)) + "\n")
    result = run_reference(binary, package, tmp_path / "out")
    assert result.returncode == 2
    assert "scale_shifts.txt" in result.stderr and message in result.stderr
    assert len(result.stderr.splitlines()) == 1
