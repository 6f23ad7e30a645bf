"""The StreamLIC file format and the codec that writes and reads it (docs/bitstream-format.md).

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
after decoding; image files are read with :func:`streamlic.images.load_image` (its rule
covers greyscale, alpha, palette and 16-bit images) and decoded images are written as
8-bit RGB PNG with ``round(255 x)``.
"""

from __future__ import annotations

import logging
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from compressai.ans import RansDecoder
from torch import Tensor

from ..integer_model import IntegerModel
from ..topology import LATENT_STRIDE, PAD_MULTIPLE, pad_to_multiple, padded_size
from .tables import RansTables, channel_tables, rows_first, single_thread

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


class CodecError(ValueError):
    """A codec input cannot be used: a damaged file, a wrong model."""


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
        with single_thread():
            rows = self.engine.encode_rows(y_q, params_q)
        return LatentCode(z_hat, rows["symbols"], rows["pdf_index"], rows["y_hat_q"])

    def streams(self, code: LatentCode, item: int) -> tuple[bytes, bytes]:
        """(z stream, y stream) of one image of a batch."""
        z_hat = code.z_hat[item]
        z_stream = self.z_tables.encode(z_hat, channel_tables(z_hat))
        y_stream = self.y_tables.encode(rows_first(code.symbols[item]), rows_first(code.pdf_index[item]))
        return z_stream, y_stream

    def estimated_bits(self, code: LatentCode, item: int) -> float:
        z_hat = code.z_hat[item]
        return (self.z_tables.estimated_bits(z_hat, channel_tables(z_hat))
                + self.y_tables.estimated_bits(code.symbols[item], code.pdf_index[item]))

    @torch.no_grad()
    def decode_latents(self, z_streams: Sequence[bytes], y_streams: Sequence[bytes],
                       z_shape: tuple[int, int]) -> LatentCode:
        """Decode a batch of streams: z first, then the y rows one step per latent row."""
        tables = channel_tables(torch.empty(self.engine.N, *z_shape))
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
        with single_thread():
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
    padded_height, padded_width = padded_size(height, width)
    return padded_height // LATENT_STRIDE, padded_width // LATENT_STRIDE


def _check_image(image: Tensor) -> Tensor:
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3:
        raise CodecError(f"expected an RGB image [3, H, W], got shape {tuple(image.shape)}")
    if not image.is_floating_point() or float(image.min()) < 0.0 or float(image.max()) > 1.0:
        raise CodecError("expected float pixel values in [0, 1] (as streamlic.images.load_image returns)")
    height, width = image.shape[-2:]
    rows, cols = _latent_shape(height, width)
    if max(rows, cols) > 0xFFFF:
        raise CodecError(f"image {height}x{width} is too large for the file format")
    return image.detach().cpu().float()
