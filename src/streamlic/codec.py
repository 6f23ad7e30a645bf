"""The StreamLIC image codec (DESIGN §7): bitstream files, row-parallel decoding, evaluation.

Every number the decoder derives from the bitstream (hyper synthesis, context prediction,
entropy parameters, synthesis) comes from the exact integer reference model
(:class:`~streamlic.integer_model.IntegerModel`), so a file decodes to the same image on any
machine. Symbols are entropy coded with compressai's rANS coder and the model's 16-bit CDF
tables: the trained ``RectifiedPDF`` tables from stage 5 on, the Gaussian and factorized
models before it (:func:`streamlic.entropy.coding_tables`).

File layout (integers little-endian)::

    offset  size  field
    0       4     magic b"SLIC"
    4       1     format version (1)
    5       4     image height, before padding
    9       4     image width, before padding
    13      2     latent rows    (padded height / 16)
    15      2     latent columns (padded width / 16)
    17      16    model id: the first 16 bytes of the model's SHA-256 (see :func:`model_id`)
    33      4     length of the z stream in bytes
    37      4     length of the y stream in bytes
    41      4     CRC32 of bytes 0-40 and of both streams
    45      ...   z stream, then y stream

Streams:

- z: one rANS stream of the hyper-latent symbols in (channel, row, column) order; the table
  of a symbol is its channel.
- y: one rANS stream of the latent symbols in (row, channel, column) order, so each latent
  row is one contiguous run. The decoder takes H/16 sequential steps: the integer engine
  predicts a whole row's means and pdf indices from the rows above it, then that row's
  symbols are read from the stream with those indices.

A file is checked (length, magic, version, CRC, model id, shape) before any symbol is
decoded: compressai's rANS decoder does not detect damaged input and would read past the
end of a truncated stream, so damaged bytes must never reach it.

Images of any size are padded to a multiple of 64 by edge replication and cropped back
after decoding; image files are read with :func:`streamlic.data.load_image` (its rule
covers greyscale, alpha, palette and 16-bit images) and decoded images are written as
8-bit RGB PNG with ``round(255 x)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import struct
import tempfile
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence, Union

import torch
from compressai.ans import RansDecoder, RansEncoder
from PIL import Image
from torch import Tensor

from . import fixedpoint as fxp
from .data import ImageReadError, load_image, scan_folder
from .entropy import CDF_PRECISION, frequencies
from .integer_model import IntegerModel
from .params import StageError
from .cli import DECODED_SUFFIX, FILE_SUFFIX
from .topology import LATENT_STRIDE, PAD_MULTIPLE, pad_to_multiple
from .model import StreamLIC
from .rd import bd_deltas

log = logging.getLogger(__name__)

MAGIC = b"SLIC"
FORMAT_VERSION = 1
# magic, version, height, width, latent rows, latent columns, model id, z length, y length
_HEADER_FIELDS = struct.Struct("<4sBIIHH16sII")
_CRC = struct.Struct("<I")
HEADER_SIZE = _HEADER_FIELDS.size + _CRC.size  # 45 bytes
MODEL_ID_BYTES = 16
SYNTHESIS_STRIP_ROWS = 8  # latent rows per synthesis strip (128 pixel rows)
SYNTHESIS_HALO_ROWS = 1  # see StreamCodec.reconstruct
MSSSIM_MIN_SIDE = 161  # 5 scales of an 11-pixel window need more than 160 pixels per side

CodecSource = Union["StreamCodec", IntegerModel, StreamLIC, str, os.PathLike]


class CodecError(ValueError):
    """A codec input cannot be used: a damaged file, a wrong model, an existing output."""


# ---------------------------------------------------------------------------- rANS tables

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
def _single_thread():
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


def _channel_tables(z_hat: Tensor) -> Tensor:
    """Table index of every hyper symbol: its channel."""
    channels = torch.arange(z_hat.shape[-3], dtype=torch.int64).view(-1, 1, 1)
    return channels.expand(z_hat.shape[-3:])


def _rows_first(t: Tensor) -> Tensor:
    """[C, H, W] -> [H, C, W]: each latent row becomes a contiguous run of the y stream."""
    return t.permute(1, 0, 2).contiguous()


# ---------------------------------------------------------------------------- codec

@dataclass
class LatentCode:
    """Everything the encoder derives from one padded batch; the decoder derives the same."""

    z_hat: Tensor  # [B, N, h, w] hyper symbols
    symbols: Tensor  # [B, M, H/16, W/16] latent symbols
    pdf_index: Tensor  # [B, M, H/16, W/16] scale index of each latent symbol
    y_hat_q: Tensor  # [B, M, H/16, W/16] dequantized latents that g_s reads


@dataclass
class EncodedImage:
    """A compressed image file and what its rate and reconstruction are made of."""

    data: bytes
    height: int
    width: int
    code: LatentCode
    estimated_bits: float  # ideal code length of both streams under the coding tables

    @property
    def bpp(self) -> float:
        return 8.0 * len(self.data) / (self.height * self.width)

    @property
    def estimated_bpp(self) -> float:
        return self.estimated_bits / (self.height * self.width)


@dataclass(frozen=True)
class FileHeader:
    height: int
    width: int
    latent_rows: int
    latent_cols: int
    model_id: bytes
    z_length: int
    y_length: int


def model_id(engine: IntegerModel) -> bytes:
    """First 16 bytes of the model's SHA-256 (``engine.model_hash``, also in the export manifest).

    The hash covers every integer, both coding tables and the configs, so a file only decodes
    with the exact model and tables that wrote it.
    """
    return bytes.fromhex(engine.model_hash)[:MODEL_ID_BYTES]


class StreamCodec:
    """The entropy coder bound to one integer model and its coding tables.

    Building one from a checkpoint takes a moment; reuse it for many images.
    """

    def __init__(self, engine: IntegerModel):
        self.engine = engine
        self.model_id = model_id(engine)
        self.y_tables = RansTables(engine.cdf_y)
        self.z_tables = RansTables(engine.cdf_z)

    # -- latents <-> streams ----------------------------------------------------------
    @torch.no_grad()
    def encode_latents(self, x: Tensor) -> LatentCode:
        """Symbols of a batch ``[B, 3, H, W]`` in [0, 1] with H, W multiples of 64."""
        y_q, z_hat = self.engine.analysis(x)
        params_q = self.engine.hyper_synthesis(z_hat)
        with _single_thread():
            rows = self.engine.encode_rows(y_q, params_q)
        return LatentCode(z_hat, rows["symbols"], rows["pdf_index"], rows["y_hat_q"])

    def streams(self, code: LatentCode, item: int) -> tuple[bytes, bytes]:
        """(z stream, y stream) of one image of a batch."""
        z_hat = code.z_hat[item]
        z_stream = self.z_tables.encode(z_hat, _channel_tables(z_hat))
        y_stream = self.y_tables.encode(_rows_first(code.symbols[item]), _rows_first(code.pdf_index[item]))
        return z_stream, y_stream

    def estimated_bits(self, code: LatentCode, item: int) -> float:
        z_hat = code.z_hat[item]
        return (self.z_tables.estimated_bits(z_hat, _channel_tables(z_hat))
                + self.y_tables.estimated_bits(code.symbols[item], code.pdf_index[item]))

    @torch.no_grad()
    def decode_latents(self, z_streams: Sequence[bytes], y_streams: Sequence[bytes],
                       z_shape: tuple[int, int]) -> LatentCode:
        """Decode a batch of streams: z first, then the y rows one step per latent row."""
        tables = _channel_tables(torch.empty(self.engine.N, *z_shape))
        z_hat = torch.stack([self._read_all(stream, tables) for stream in z_streams])
        decoders = []
        for stream in y_streams:
            decoder = RansDecoder()
            decoder.set_stream(stream)
            decoders.append(decoder)

        def read_row(row: int, pdf_index_row: Tensor) -> Tensor:
            # every image of the batch has its own stream, positioned at this row
            return torch.stack([self.y_tables.read(decoder, index[:, 0]) for decoder, index
                                in zip(decoders, pdf_index_row)]).unsqueeze(2)

        params_q = self.engine.hyper_synthesis(z_hat)
        with _single_thread():
            rows = self.engine.decode_rows(params_q, read_row)
        return LatentCode(z_hat, rows["symbols"], rows["pdf_index"], rows["y_hat_q"])

    def _read_all(self, stream: bytes, tables: Tensor) -> Tensor:
        decoder = RansDecoder()
        decoder.set_stream(stream)
        return self.z_tables.read(decoder, tables)

    @torch.no_grad()
    def reconstruct(self, code: LatentCode) -> Tensor:
        """The image [B, 3, H, W] in [0, 1] that the exact integer synthesis makes of the latents.

        g_s runs on horizontal strips of ``SYNTHESIS_STRIP_ROWS`` latent rows, each with one
        extra latent row above and below. Every upsample-conv output row reads two input rows,
        so a strip's zero-padded edge reaches 0, 2, 6 and then 15 pixel rows into its output
        after g_s's four upsamplings: less than the 16 pixels of the halo row that is cropped
        away. The strips therefore give exactly the whole-image result, with tensors a few
        megabytes large instead of hundreds, which is faster on a CPU and bounds memory.
        """
        latents = code.y_hat_q
        height = latents.shape[2]
        strips = []
        for top in range(0, height, SYNTHESIS_STRIP_ROWS):
            bottom = min(height, top + SYNTHESIS_STRIP_ROWS)
            first, last = max(0, top - SYNTHESIS_HALO_ROWS), min(height, bottom + SYNTHESIS_HALO_ROWS)
            strip = self.engine.synthesis(latents[:, :, first:last])
            strips.append(strip[:, :, (top - first) * LATENT_STRIDE:(bottom - first) * LATENT_STRIDE])
        return torch.cat(strips, dim=2)

    # -- compressai's CompressionModel API ------------------------------------------------
    def compress(self, x: Tensor) -> dict[str, Any]:
        """``{"strings": [y_strings, z_strings], "shape": z_shape}`` of a batch [B, 3, H, W].

        The batch is padded to a multiple of 64 first (edge replication).
        """
        code = self.encode_latents(pad_to_multiple(x, PAD_MULTIPLE))
        z_streams, y_streams = zip(*(self.streams(code, item) for item in range(x.shape[0])))
        return {"strings": [list(y_streams), list(z_streams)], "shape": tuple(code.z_hat.shape[-2:])}

    def decompress(self, strings: Sequence[Sequence[bytes]], shape: Sequence[int]) -> dict[str, Tensor]:
        """``{"x_hat": [B, 3, 64 h, 64 w]}`` from :meth:`compress`'s strings and shape (still padded)."""
        y_streams, z_streams = strings
        code = self.decode_latents(z_streams, y_streams, (int(shape[0]), int(shape[1])))
        return {"x_hat": self.reconstruct(code)}

    # -- files -------------------------------------------------------------------------
    def encode(self, image: Tensor) -> EncodedImage:
        """Compress one image [3, H, W] (values in [0, 1]) into the bytes of a file."""
        image = _check_image(image)
        height, width = image.shape[-2:]
        code = self.encode_latents(pad_to_multiple(image[None], PAD_MULTIPLE))
        z_stream, y_stream = self.streams(code, 0)
        rows, cols = code.symbols.shape[-2:]
        fields = _HEADER_FIELDS.pack(MAGIC, FORMAT_VERSION, height, width, rows, cols, self.model_id,
                                     len(z_stream), len(y_stream))
        crc = zlib.crc32(y_stream, zlib.crc32(z_stream, zlib.crc32(fields)))
        data = b"".join((fields, _CRC.pack(crc), z_stream, y_stream))
        log.debug("encoded %dx%d: %d bytes (header %d, z %d, y %d)", width, height, len(data), HEADER_SIZE,
                  len(z_stream), len(y_stream))
        return EncodedImage(data, height, width, code, self.estimated_bits(code, 0))

    def decode(self, data: bytes, source: str = "<bytes>") -> Tensor:
        """The image [3, H, W] in [0, 1] stored in a file's bytes; ``source`` names it in errors."""
        header, code = self.read_latents(data, source)
        log.debug("%s: %dx%d image, %d latent row steps", source, header.width, header.height, header.latent_rows)
        return self.reconstruct(code)[0, :, :header.height, :header.width]

    def read_latents(self, data: bytes, source: str = "<bytes>") -> tuple[FileHeader, LatentCode]:
        """The checked header and the decoded latents of a file's bytes."""
        header = self.read_header(data, source)
        z_end = HEADER_SIZE + header.z_length
        scale = PAD_MULTIPLE // LATENT_STRIDE
        z_shape = (header.latent_rows // scale, header.latent_cols // scale)
        return header, self.decode_latents([data[HEADER_SIZE:z_end]], [data[z_end:]], z_shape)

    def read_header(self, data: bytes, source: str = "<bytes>") -> FileHeader:
        """Parse and check a file's header against its length, its CRC and this codec's model."""
        if not data:
            raise CodecError(f"{source}: empty file, not a StreamLIC bitstream")
        if len(data) < HEADER_SIZE:
            if not MAGIC.startswith(data[:len(MAGIC)]):
                raise CodecError(f"{source}: not a StreamLIC file (no {MAGIC!r} magic)")
            raise CodecError(f"{source}: truncated file ({len(data)} bytes, the header alone has {HEADER_SIZE})")
        magic, version, height, width, rows, cols, file_model, z_length, y_length = _HEADER_FIELDS.unpack_from(data)
        if magic != MAGIC:
            raise CodecError(f"{source}: not a StreamLIC file (no {MAGIC!r} magic)")
        if version != FORMAT_VERSION:
            raise CodecError(f"{source}: format version {version}; this codec reads version {FORMAT_VERSION}")
        expected = HEADER_SIZE + z_length + y_length
        if len(data) < expected:
            raise CodecError(f"{source}: truncated file ({len(data)} bytes, its header announces {expected})")
        if len(data) > expected:
            raise CodecError(f"{source}: corrupted file ({len(data)} bytes, its header announces {expected})")
        (stored_crc,) = _CRC.unpack_from(data, _HEADER_FIELDS.size)
        if zlib.crc32(data[HEADER_SIZE:], zlib.crc32(data[:_HEADER_FIELDS.size])) != stored_crc:
            raise CodecError(f"{source}: corrupted file (CRC32 mismatch: bytes were changed)")
        if file_model != self.model_id:
            raise CodecError(f"{source}: made by another model (model id {file_model.hex()}; this checkpoint's "
                             f"is {self.model_id.hex()})")
        if height < 1 or width < 1 or (rows, cols) != _latent_shape(height, width):
            raise CodecError(f"{source}: inconsistent header (image {height}x{width}, latent {rows}x{cols})")
        return FileHeader(height, width, rows, cols, file_model, z_length, y_length)


def _latent_shape(height: int, width: int) -> tuple[int, int]:
    return (math.ceil(height / PAD_MULTIPLE) * (PAD_MULTIPLE // LATENT_STRIDE),
            math.ceil(width / PAD_MULTIPLE) * (PAD_MULTIPLE // LATENT_STRIDE))


def _check_image(image: Tensor) -> Tensor:
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3:
        raise CodecError(f"expected an RGB image [3, H, W], got shape {tuple(image.shape)}")
    if not image.is_floating_point() or float(image.min()) < 0.0 or float(image.max()) > 1.0:
        raise CodecError("expected float pixel values in [0, 1] (as streamlic.data.load_image returns)")
    height, width = image.shape[-2:]
    rows, cols = _latent_shape(height, width)
    if max(rows, cols) > 0xFFFF:
        raise CodecError(f"image {height}x{width} is too large for the file format")
    return image.detach().cpu().float()


# ---------------------------------------------------------------------------- loading

def load_codec(source: CodecSource) -> StreamCodec:
    """A codec from a :class:`StreamCodec`, an :class:`IntegerModel`, a :class:`StreamLIC` at
    stage 3 (QAT) or later, a checkpoint file, or an export directory."""
    if isinstance(source, StreamCodec):
        return source
    if isinstance(source, IntegerModel):
        return StreamCodec(source)
    if isinstance(source, StreamLIC):
        return StreamCodec(_integer_model(source, "model"))
    path = Path(source)
    if path.is_dir():
        from .export import load_integer_model

        return StreamCodec(load_integer_model(path))
    if not path.is_file():
        raise CodecError(f"{path}: no such checkpoint")
    return StreamCodec(_integer_model(StreamLIC.from_checkpoint(path), str(path)))


def _integer_model(model: StreamLIC, name: str) -> IntegerModel:
    try:
        return IntegerModel.from_model(model)
    except StageError as err:
        raise CodecError(f"{name}: the codec needs a checkpoint at stage 3 (qat) or later; {err}") from err


def _load_image_file(path: Path) -> Tensor:
    try:
        return load_image(path)
    except ImageReadError as err:
        raise CodecError(str(err)) from err


# ---------------------------------------------------------------------------- Python API

def compress_batch(model: CodecSource, x: Tensor) -> dict[str, Any]:
    """compressai's ``compress`` for a model (see :meth:`StreamCodec.compress`)."""
    return load_codec(model).compress(x)


def decompress_batch(model: CodecSource, strings: Sequence[Sequence[bytes]], shape: Sequence[int]) -> dict[str, Tensor]:
    """compressai's ``decompress`` for a model (see :meth:`StreamCodec.decompress`)."""
    return load_codec(model).decompress(strings, shape)


def compress_image(model_or_ckpt: CodecSource, image: Tensor | str | os.PathLike) -> bytes:
    """The file bytes of an image (a tensor [3, H, W] in [0, 1] or an image file)."""
    if not isinstance(image, Tensor):
        image = _load_image_file(Path(image))
    return load_codec(model_or_ckpt).encode(image).data


def decompress_bytes(model_or_ckpt: CodecSource, data: bytes, source: str = "<bytes>") -> Tensor:
    """The decoded image [3, H, W] in [0, 1] of a file's bytes."""
    return load_codec(model_or_ckpt).decode(data, source)


def encode_file(model_or_ckpt: CodecSource, image_path: str | os.PathLike, output_path: str | os.PathLike,
                force: bool = False) -> EncodedImage:
    """Compress an image file into a StreamLIC file; an existing output is kept unless ``force``."""
    output = Path(output_path)
    _check_output(output, force)
    image = _load_image_file(Path(image_path))
    encoded = load_codec(model_or_ckpt).encode(image)
    _write_atomically(output, lambda f: f.write(encoded.data), force)
    return encoded


def decode_file(model_or_ckpt: CodecSource, input_path: str | os.PathLike, output_path: str | os.PathLike,
                force: bool = False) -> Tensor:
    """Decode a StreamLIC file into an 8-bit RGB PNG; returns the decoded image [3, H, W]."""
    output = Path(output_path)
    if output.suffix.lower() != ".png":
        raise CodecError(f"{output}: decoded images are written as PNG; give the output a .png name")
    _check_output(output, force)
    source = Path(input_path)
    data = source.read_bytes()
    image = load_codec(model_or_ckpt).decode(data, str(source))
    _write_atomically(output, lambda f: save_png(image, f), force)
    return image


def save_png(image: Tensor, file: BinaryIO | str | os.PathLike) -> None:
    """Write [3, H, W] in [0, 1] as an 8-bit RGB PNG: ``round(255 x)``."""
    Image.fromarray(to_uint8(image).permute(1, 2, 0).numpy(), "RGB").save(file, format="PNG")


def to_uint8(image: Tensor) -> Tensor:
    return torch.round(image.detach().clamp(0.0, 1.0) * 255.0).to(torch.uint8)


def _check_output(path: Path, force: bool) -> None:
    if path.is_dir():
        raise CodecError(f"{path}: is a directory")
    if path.exists() and not force:
        raise CodecError(f"{path}: already exists (use --force to overwrite it)")
    if not path.parent.is_dir():
        raise CodecError(f"{path}: directory {path.parent} does not exist")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_atomically(path: Path, write: Callable[[BinaryIO], Any], force: bool) -> None:
    """Write through a temporary file in the same directory, then rename it over ``path``.

    A failure leaves no partial output, and an existing file is replaced only with ``force``.
    """
    _check_output(path, force)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
        # mkstemp makes the file private (0600); an output gets the permissions of a plain open()
        os.chmod(temporary, 0o666 & ~_current_umask())
        _check_output(path, force)  # the output may have appeared while we were coding
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


# ---------------------------------------------------------------------------- evaluation

def psnr_8bit(reference: Tensor, decoded: Tensor) -> float:
    """PSNR in dB of two images [3, H, W] after rounding both to 8 bits (as written to disk)."""
    mse = torch.mean((to_uint8(reference).double() - to_uint8(decoded).double()) ** 2)
    return float(10.0 * torch.log10(255.0**2 / mse)) if mse > 0 else math.inf


def ms_ssim_8bit(reference: Tensor, decoded: Tensor) -> float | None:
    """MS-SSIM (torchmetrics, 5 scales) of the 8-bit images; None below 161 pixels a side."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    if min(reference.shape[-2:]) < MSSSIM_MIN_SIDE:
        return None
    a = to_uint8(reference).float()[None] / 255.0
    b = to_uint8(decoded).float()[None] / 255.0
    return float(multiscale_structural_similarity_index_measure(b, a, data_range=1.0))


def _finite_mean(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _json_number(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def evaluate_images(codec: StreamCodec, images: Sequence[tuple[str, Tensor | Path]], progress: bool = True,
                    description: str = "eval") -> list[dict[str, Any]]:
    """Encode and decode each (name, image [3, H, W] or image file) through real bytes; one record each."""
    from tqdm import tqdm

    records = []
    for name, image in tqdm(images, desc=description, unit="image", disable=not progress):
        if not isinstance(image, Tensor):
            image = _load_image_file(image)
        start = time.perf_counter()
        encoded = codec.encode(image)
        encode_seconds = time.perf_counter() - start
        start = time.perf_counter()
        decoded = codec.decode(encoded.data, name)
        decode_seconds = time.perf_counter() - start
        records.append({
            "name": name, "height": encoded.height, "width": encoded.width, "bytes": len(encoded.data),
            "bpp": encoded.bpp, "bpp-estimated": encoded.estimated_bpp,
            "psnr-rgb": _json_number(psnr_8bit(image, decoded)), "ms-ssim-rgb": ms_ssim_8bit(image, decoded),
            "encoding_time": encode_seconds, "decoding_time": decode_seconds,
        })
    return records


RESULT_METRICS = ("bpp", "bpp-estimated", "psnr-rgb", "ms-ssim-rgb", "encoding_time", "decoding_time")


def _warm_up(codec: StreamCodec, image: Tensor | Path) -> None:
    """One untimed round trip: the first call pays one-time setup (allocator, kernels, tables)."""
    if not isinstance(image, Tensor):
        image = _load_image_file(image)
    codec.decode(codec.encode(image).data, "warm-up")


def evaluate_folder(checkpoints: Sequence[CodecSource], folder: str | os.PathLike, name: str = "StreamLIC",
                    progress: bool = True) -> dict[str, Any]:
    """Rate-distortion results of one or more checkpoints on every image under ``folder``.

    Returns CompressAI's results format: ``results`` holds one value per checkpoint (the mean
    over the images) for each metric, so several checkpoints make an RD curve; ``per_image``
    holds the records behind each point. Unreadable images are reported and skipped.

    Metrics: ``bpp`` counts every byte of the file (header included) per original pixel;
    ``bpp-estimated`` is the ideal code length of the coded symbols under the 16-bit coding
    tables (``-log2(frequency / 2**16)``, the likelihoods stage 5 trains on); ``psnr-rgb`` and
    ``ms-ssim-rgb`` compare the 8-bit input with the 8-bit decoded image (MS-SSIM is null
    for images under 161 pixels a side); times are seconds of :meth:`StreamCodec.encode`
    and :meth:`StreamCodec.decode`, without reading or writing files, measured after one
    untimed round trip (as CompressAI's timings are); loading the checkpoint and that first
    round trip are ``setup_time`` of each ``per_image`` entry.
    """
    paths = scan_folder(folder)
    if not paths:
        raise CodecError(f"{folder}: no readable images")
    root = Path(folder)
    images = [(str(path.relative_to(root)), path) for path in paths]
    results: dict[str, list] = {metric: [] for metric in RESULT_METRICS}
    per_image = []
    for source in checkpoints:
        label = source if isinstance(source, (str, os.PathLike)) else type(source).__name__
        start = time.perf_counter()
        codec = load_codec(source)
        _warm_up(codec, images[0][1])
        setup_seconds = time.perf_counter() - start
        records = evaluate_images(codec, images, progress, description=f"eval {Path(str(label)).name}")
        for metric in RESULT_METRICS:
            results[metric].append(_finite_mean([record[metric] for record in records]))
        per_image.append({"checkpoint": str(label), "setup_time": setup_seconds, "images": records})
    return {
        "name": name,
        "description": f"StreamLIC, exact integer decoder, rANS with 16-bit tables; {len(images)} images in {root}",
        "results": results,
        "per_image": per_image,
    }


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """A CompressAI-format results file (``name``, ``results.bpp``, ``results.psnr-rgb`` ...)."""
    path = Path(path)
    try:
        results = json.loads(path.read_text())
        bpp = results["results"]["bpp"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CodecError(f"{path}: not a CompressAI results file ({err})") from err
    if not isinstance(bpp, list):
        raise CodecError(f"{path}: results.bpp must be a list")
    results.setdefault("name", path.stem)
    return results


def curve_points(results: dict[str, Any], metric: str = "psnr") -> list[tuple[float, float]]:
    """``(bpp, metric)`` points of a CompressAI-format results dict, by rate, skipping missing values.

    Older CompressAI results files name the metrics without the ``-rgb`` suffix.
    """
    values = results.get(f"{metric}-rgb", results.get(metric, []))
    return sorted((float(bpp), float(value)) for bpp, value in zip(results["bpp"], values)
                  if bpp is not None and value is not None)


def bd_rate_against(results: dict[str, Any], anchor: dict[str, Any]) -> dict[str, Any]:
    """BD-rate (percent) and BD-PSNR (dB) of ``results``' PSNR curve against ``anchor``'s.

    Returns ``{"anchor", "bd_rate", "bd_psnr"}`` (see :func:`streamlic.rd.bd_deltas`: a delta the
    curves do not have is ``None`` with its reason).
    """
    return {"anchor": anchor["name"], **bd_deltas(curve_points(anchor["results"]), curve_points(results["results"]))}


def plot_rd(curves: Sequence[dict[str, Any]], path: str | os.PathLike, force: bool = False) -> None:
    """PSNR and MS-SSIM (dB) against bpp for CompressAI-format results, one line each.

    MS-SSIM is drawn as ``-10 log10(1 - MS-SSIM)``, as in CompressAI's plots.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (psnr_axis, msssim_axis) = plt.subplots(1, 2, figsize=(11, 4.5))
    for curve in curves:
        results = curve["results"]
        for axis, metric, transform in ((psnr_axis, "psnr", float),
                                        (msssim_axis, "ms-ssim", lambda v: -10.0 * math.log10(1.0 - v))):
            points = [(bpp, transform(value)) for bpp, value in curve_points(results, metric)
                      if metric != "ms-ssim" or value < 1]
            if points:
                axis.plot(*zip(*points), marker="o", label=curve["name"])
    for axis, label in ((psnr_axis, "PSNR RGB [dB]"), (msssim_axis, "MS-SSIM RGB [dB]")):
        axis.set_xlabel("bits per pixel")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.4)
        if axis.lines:
            axis.legend()
    figure.tight_layout()
    output = Path(path)
    _write_atomically(output, lambda f: figure.savefig(f, format="png", dpi=120), force)
    plt.close(figure)


# ---------------------------------------------------------------------------- CLI

def run_compress(args: argparse.Namespace) -> int:
    output = args.output or args.image.with_suffix(FILE_SUFFIX)
    _check_output(output, args.force)
    codec = load_codec(args.checkpoint)
    start = time.perf_counter()
    encoded = encode_file(codec, args.image, output, args.force)
    seconds = time.perf_counter() - start
    print(f"{output}: {len(encoded.data)} bytes, {encoded.bpp:.4f} bpp "
          f"({encoded.width}x{encoded.height}, estimated {encoded.estimated_bpp:.4f} bpp), {seconds:.2f} s")
    return 0


def run_decompress(args: argparse.Namespace) -> int:
    output = args.output or args.file.with_suffix(DECODED_SUFFIX)
    _check_output(output, args.force)
    codec = load_codec(args.checkpoint)
    start = time.perf_counter()
    image = decode_file(codec, args.file, output, args.force)
    seconds = time.perf_counter() - start
    print(f"{output}: {image.shape[2]}x{image.shape[1]} RGB PNG, {seconds:.2f} s")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    for path in (args.output, args.plot):
        if path is not None:
            _check_output(path, args.force)
    compared = [load_results(path) for path in args.compare]  # fail on a bad file before the long run
    results = evaluate_folder(args.checkpoint, args.folder, name=args.name)
    for point in results["per_image"]:
        print(f"\n{point['checkpoint']} (setup {point['setup_time']:.2f} s, not in the timings)")
        print(f"{'image':32s} {'size':>11s} {'bpp':>8s} {'est.bpp':>8s} {'PSNR':>7s} {'MS-SSIM':>8s} "
              f"{'enc s':>7s} {'dec s':>7s}")
        for record in point["images"] + [_mean_record(point["images"])]:
            size = f"{record['width']}x{record['height']}" if "width" in record else ""
            print(f"{record['name'][:32]:32s} {size:>11s} {record['bpp']:8.4f} "
                  f"{record['bpp-estimated']:8.4f} {_format(record['psnr-rgb'], 7, 2)} "
                  f"{_format(record['ms-ssim-rgb'], 8, 4)} {record['encoding_time']:7.2f} "
                  f"{record['decoding_time']:7.2f}")
    if compared:
        # the BD-rates travel in the results JSON; CompressAI's readers ignore the extra key
        results["bd_rate"] = [bd_rate_against(results, anchor) for anchor in compared]
        print()
        for entry in results["bd_rate"]:
            rate, psnr = (f"not available ({entry[f'{key}_error']})" if entry[key] is None else
                          format(entry[key], fmt) + unit
                          for key, fmt, unit in (("bd_rate", "+.2f", " %"), ("bd_psnr", "+.3f", " dB")))
            print(f"BD-rate of {results['name']} against {entry['anchor']}: {rate}; BD-PSNR: {psnr}")
    if args.output is not None:
        text = json.dumps(results, indent=2)
        _write_atomically(args.output, lambda f: f.write(text.encode()), args.force)
        print(f"wrote {args.output}")
    if args.plot is not None:
        plot_rd([results, *compared], args.plot, args.force)
        print(f"wrote {args.plot}")
    return 0


def _mean_record(records: list[dict[str, Any]]) -> dict[str, Any]:
    mean = {metric: _finite_mean([record[metric] for record in records]) for metric in RESULT_METRICS}
    return {**mean, "name": "mean"}


def _format(value: float | None, width: int, decimals: int) -> str:
    return f"{'-':>{width}s}" if value is None else f"{value:{width}.{decimals}f}"
