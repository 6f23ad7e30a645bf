"""The codec on real photos: exact round trips, file size against the model's rate, bad input, CLI."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from _models import sample_photos, tiny_model
from streamlic import cli, codec
from streamlic.codec import HEADER_SIZE, CodecError, StreamCodec
from streamlic.codec.bitstream import SYNTHESIS_STRIP_ROWS
from streamlic.images import demo_images, load_image
from streamlic.integer_model import IntegerModel
from streamlic.metrics import ms_ssim_scales
from streamlic.topology import PAD_MULTIPLE, pad_to_multiple


@pytest.fixture(scope="module")
def models():
    return {stage: tiny_model(stage=stage) for stage in ("qat", "pdf")}


@pytest.fixture(scope="module")
def codecs(models):
    return {stage: StreamCodec(IntegerModel.from_model(model)) for stage, model in models.items()}


@pytest.fixture(scope="module")
def checkpoints(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for stage, model in models.items():
        paths[stage] = folder / f"{stage}.ckpt"
        torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, paths[stage])
    return paths


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory):
    """A real photo crop whose sides are not multiples of 64."""
    path = tmp_path_factory.mktemp("images") / "rocket.png"
    image = sample_photos()[1][1][0]
    Image.fromarray(codec.to_uint8(image).permute(1, 2, 0).numpy()).save(path)
    return path


def bytes_from(codec_for_stage: StreamCodec, path) -> bytes:
    return codec_for_stage.encode(load_image(path)).data


# ---------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("stage", ["pdf", "qat"])
def test_round_trip_equals_the_integer_models_reconstruction(stage, models, codecs):
    encoder = codecs[stage]
    decoder = StreamCodec(IntegerModel.from_model(models[stage]))  # nothing shared with the encoder
    for name, x in sample_photos():
        image = x[0]
        encoded = encoder.encode(image)
        decoded = decoder.decode(encoded.data, name)
        expected = decoder.engine.synthesis(encoded.code.y_hat_q)[0, :, :image.shape[1], :image.shape[2]]
        assert decoded.shape == image.shape, name
        assert torch.equal(decoded, expected), name
        # the decoder predicted every row's pdf indices exactly as the encoder did
        _, latents = decoder.read_latents(encoded.data, name)
        assert torch.equal(latents.symbols, encoded.code.symbols), name
        assert torch.equal(latents.pdf_index, encoded.code.pdf_index), name
        assert torch.equal(latents.z_hat, encoded.code.z_hat), name


def test_strip_synthesis_equals_whole_image_synthesis(codecs):
    encoder = codecs["pdf"]
    image = dict(demo_images("test"))["rocket"]  # 427 x 640: 28 latent rows, four strips, the last one short
    code = encoder.encode(image).code
    assert code.y_hat_q.shape[2] > 3 * SYNTHESIS_STRIP_ROWS
    assert torch.equal(encoder.reconstruct(code), encoder.engine.synthesis(code.y_hat_q))


def test_compressai_api_round_trip_matches_the_file_codec(models, codecs):
    model = models["pdf"]
    x = torch.cat([sample_photos()[0][1], sample_photos()[0][1].flip(-1)])  # a batch of two 192x256 photos
    out = model.compress(x)
    assert len(out["strings"][0]) == len(out["strings"][1]) == 2
    x_hat = model.decompress(out["strings"], out["shape"])["x_hat"]
    for item in range(2):
        decoded = codecs["pdf"].decode(codecs["pdf"].encode(x[item]).data)
        assert torch.equal(x_hat[item], decoded)


def test_file_size_matches_the_rate_the_stage5_model_trains_on(models, codecs):
    model, encoder = models["pdf"], codecs["pdf"]
    for name, image in demo_images("test"):
        encoded = encoder.encode(image)
        with torch.no_grad():
            out = model(pad_to_multiple(image[None], PAD_MULTIPLE))
        model_bytes = float(sum(-torch.log2(lk).sum() for lk in out["likelihoods"].values())) / 8
        assert abs(len(encoded.data) - model_bytes) <= 0.01 * model_bytes + HEADER_SIZE, name
        # the rANS streams cost their ideal length under the 16-bit tables plus a few flush bytes
        overhead = len(encoded.data) - HEADER_SIZE - encoded.estimated_bits / 8
        assert -4 <= overhead <= 24, (name, overhead)


def test_an_export_directory_codes_like_its_checkpoint(models, codecs, photo_file, tmp_path):
    from streamlic.export import export_package

    export_package(models["pdf"], tmp_path / "export")
    data = bytes_from(codecs["pdf"], photo_file)
    assert codec.compress_image(tmp_path / "export", photo_file) == data
    assert torch.equal(codec.decompress_bytes(tmp_path / "export", data), codecs["pdf"].decode(data))


# ---------------------------------------------------------------------------- damaged input

def test_damaged_files_give_clear_errors_before_decoding(codecs, photo_file):
    encoder = codecs["pdf"]
    data = bytes_from(encoder, photo_file)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    header_flip = bytearray(data)
    header_flip[6] ^= 0x01  # image height
    cases = [
        ("empty file", b""),
        ("truncated file", data[:-7]),
        (r"truncated file \(20 bytes", data[:20]),
        (r"corrupted file \(CRC32 mismatch", bytes(flipped)),
        (r"corrupted file \(CRC32 mismatch", bytes(header_flip)),
        ("not a StreamLIC file", b"\x89PNG\r\n\x1a\n" + bytes(64)),
        (r"corrupted file \(\d+ bytes, its header announces", data + b"\0"),
    ]
    for expected, damaged in cases:
        with pytest.raises(CodecError, match="^photo.slic: " + expected):
            encoder.decode(damaged, "photo.slic")


def test_a_file_from_another_model_is_refused(codecs, photo_file):
    data = bytes_from(codecs["qat"], photo_file)
    with pytest.raises(CodecError, match="photo.slic: made by another model"):
        codecs["pdf"].decode(data, "photo.slic")


def test_pre_qat_checkpoints_are_refused(tmp_path):
    model = tiny_model(stage="mask")
    with pytest.raises(CodecError, match="stage 3"):
        codec.load_codec(model)


def run_cli(*args: str, caplog) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        rc = cli.main([str(a) for a in args])
    return rc, caplog.text


def test_cli_errors_name_the_file_exit_1_and_overwrite_nothing(checkpoints, codecs, photo_file, tmp_path, caplog):
    ckpt = checkpoints["pdf"]
    good = tmp_path / "good.slic"
    good.write_bytes(bytes_from(codecs["pdf"], photo_file))
    other_model = tmp_path / "other.slic"
    other_model.write_bytes(bytes_from(codecs["qat"], photo_file))
    truncated = tmp_path / "truncated.slic"
    truncated.write_bytes(good.read_bytes()[:-10])
    flipped = tmp_path / "flipped.slic"
    damaged = bytearray(good.read_bytes())
    damaged[-20] ^= 0xFF
    flipped.write_bytes(bytes(damaged))
    empty = tmp_path / "empty.slic"
    empty.write_bytes(b"")
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    existing = tmp_path / "existing.png"
    existing.write_bytes(b"keep me")

    cases = [
        (("decompress", other_model, "-o", tmp_path / "a.png"), "another model"),
        (("decompress", truncated, "-o", tmp_path / "b.png"), "truncated"),
        (("decompress", flipped, "-o", tmp_path / "c.png"), "CRC32"),
        (("decompress", empty, "-o", tmp_path / "d.png"), "empty file"),
        (("compress", not_image, "-o", tmp_path / "e.slic"), "cannot read image"),
        (("decompress", good, "-o", existing), "already exists"),
        (("compress", photo_file, "-o", good), "already exists"),
    ]
    for args, message in cases:
        named = args[1] if message not in ("already exists",) else args[3]
        rc, log_text = run_cli(*args, "-c", ckpt, caplog=caplog)
        assert rc == 1, args
        assert message in log_text and str(named) in log_text, (args, log_text)
    assert existing.read_bytes() == b"keep me"
    assert good.read_bytes() == bytes_from(codecs["pdf"], photo_file)
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == sorted(["good.slic", "other.slic", "truncated.slic", "flipped.slic", "empty.slic",
                                "notes.png", "existing.png"])
    rc, _ = run_cli("decompress", good, "-c", ckpt, "-o", existing, "--force", caplog=caplog)
    assert rc == 0 and existing.read_bytes() != b"keep me"


@pytest.mark.parametrize("mode", ["RGBA", "L", "I;16"])
def test_cli_round_trip_of_any_mode_writes_the_decoded_8bit_png(mode, checkpoints, codecs, tmp_path, caplog):
    rgb = codec.to_uint8(sample_photos()[2][1][0]).permute(1, 2, 0).numpy()  # 100 x 130
    if mode == "RGBA":
        alpha = np.linspace(0, 255, rgb.shape[1], dtype=np.uint8)[None, :, None].repeat(rgb.shape[0], 0)
        source = Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA")
    elif mode == "L":
        source = Image.fromarray(rgb).convert("L")
    else:
        source = Image.fromarray(rgb[..., 1].astype(np.uint16) * 257 + 3)  # 16-bit grey
        assert source.mode.startswith("I;16")
    image_path = tmp_path / f"input-{mode.replace(';', '')}.png"
    source.save(image_path)
    bitstream, output = tmp_path / "photo.slic", tmp_path / "photo.png"
    assert run_cli("compress", image_path, "-c", checkpoints["qat"], "-o", bitstream, caplog=caplog)[0] == 0
    assert run_cli("decompress", bitstream, "-c", checkpoints["qat"], "-o", output, caplog=caplog)[0] == 0
    expected = codecs["qat"].decode(codecs["qat"].encode(load_image(image_path)).data)
    with Image.open(output) as written:
        assert written.mode == "RGB" and written.size == (130, 100)
        assert np.array_equal(np.asarray(written), codec.to_uint8(expected).permute(1, 2, 0).numpy())


def test_cli_defaults_leave_the_source_image_alone_and_outputs_readable(checkpoints, tmp_path, caplog):
    image_path = tmp_path / "photo.png"
    Image.fromarray(codec.to_uint8(sample_photos()[2][1][0]).permute(1, 2, 0).numpy()).save(image_path)
    old_mask = os.umask(0o022)
    try:
        assert run_cli("compress", image_path, "-c", checkpoints["qat"], caplog=caplog)[0] == 0
        # photo.slic decodes to photo.decoded.png, next to the untouched photo.png
        assert run_cli("decompress", tmp_path / "photo.slic", "-c", checkpoints["qat"], caplog=caplog)[0] == 0
    finally:
        os.umask(old_mask)
    for name in ("photo.slic", "photo.decoded.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name  # what open() gives under umask 022


# ---------------------------------------------------------------------------- evaluation

def test_eval_writes_compressai_json_and_rd_plot(checkpoints, tmp_path, caplog, capsys):
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    for index, (name, x) in enumerate(sample_photos()[:2]):
        target = folder / ("nested" if index else "") / f"{name}.png"
        Image.fromarray(codec.to_uint8(x[0]).permute(1, 2, 0).numpy()).save(target)
    (folder / "broken.png").write_bytes(b"\x89PNG broken")  # reported and skipped
    published = tmp_path / "bmshj2018.json"
    published.write_text(json.dumps({"name": "bmshj2018-hyperprior", "description": "reference",
                                     "results": {"bpp": [0.2, 0.4, 0.8], "psnr-rgb": [27.0, 29.5, 32.5],
                                                 "ms-ssim-rgb": [0.91, 0.95, 0.975]}}))
    results_path, plot_path = tmp_path / "results.json", tmp_path / "rd.png"
    rc, _ = run_cli("eval", folder, "-c", checkpoints["qat"], checkpoints["pdf"], "-o", results_path,
                    "--plot", plot_path, "--compare", published, caplog=caplog)
    assert rc == 0
    results = json.loads(results_path.read_text())
    assert results["name"] == "StreamLIC"
    for metric in ("bpp", "psnr-rgb", "ms-ssim-rgb", "encoding_time", "decoding_time", "bpp-estimated"):
        assert len(results["results"][metric]) == 2 and all(v is not None for v in results["results"][metric])
    for point in results["per_image"]:
        assert point["setup_time"] > 0  # loading and the untimed warm-up round trip, apart from the timings
        names = [record["name"] for record in point["images"]]
        assert names == ["chelsea-192x256.png", os.path.join("nested", "rocket-150x200.png")]
        assert all(record["bytes"] > HEADER_SIZE for record in point["images"])
        # one MS-SSIM definition with training: a 150-pixel-high image is measured on 4 scales
        assert 0 < point["images"][1]["ms-ssim-rgb"] <= 1 and ms_ssim_scales(150, 200) == 4
        for record in point["images"]:
            assert record["bpp"] == pytest.approx(8 * record["bytes"] / (record["height"] * record["width"]))
    assert "mean" in capsys.readouterr().out
    with Image.open(plot_path) as plot:
        assert plot.format == "PNG" and plot.size[0] > 300
    rc, log_text = run_cli("eval", folder, "-c", checkpoints["pdf"], "-o", results_path, caplog=caplog)
    assert rc == 1 and "already exists" in log_text
