"""Loading a codec from a checkpoint or an export, the Python API, and image and file I/O."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence, Union

import torch
from PIL import Image
from torch import Tensor

from ..images import ImageReadError, load_image
from ..export import load_integer_model
from ..integer_model import IntegerModel
from ..model import StreamLIC
from ..outputs import check_output
from ..params import StageError
from .bitstream import CodecError, EncodedImage, StreamCodec

CodecSource = Union[StreamCodec, IntegerModel, StreamLIC, str, os.PathLike]


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
        return StreamCodec(load_integer_model(path))
    if not path.is_file():
        raise CodecError(f"{path}: no such checkpoint")
    return StreamCodec(_integer_model(StreamLIC.from_checkpoint(path), str(path)))


def _integer_model(model: StreamLIC, name: str) -> IntegerModel:
    try:
        return IntegerModel.from_model(model)
    except StageError as err:
        raise CodecError(f"{name}: the codec needs a checkpoint at stage 3 (qat) or later; {err}") from err


def load_image_file(path: Path) -> Tensor:
    try:
        return load_image(path)
    except ImageReadError as err:
        raise CodecError(str(err)) from err


# ---------------------------------------------------------------------------- Python API


def compress_batch(model: CodecSource, x: Tensor) -> dict[str, Any]:
    """compressai's ``compress`` for a model (see :meth:`StreamCodec.compress`); also ``StreamLIC.compress``.

    ``{"strings": [y_strings, z_strings], "shape": z_shape}`` from the exact integer model (stage 3
    or later); ``x`` [B, 3, H, W] in [0, 1] is padded to a multiple of 64. For many calls build one
    :class:`StreamCodec`.
    """
    return load_codec(model).compress(x)


def decompress_batch(model: CodecSource, strings: Sequence[Sequence[bytes]], shape: Sequence[int]) -> dict[str, Tensor]:
    """compressai's ``decompress`` for a model (see :meth:`StreamCodec.decompress`); also
    ``StreamLIC.decompress``: ``{"x_hat": ...}`` at the padded size, from the exact integer decoder."""
    return load_codec(model).decompress(strings, shape)


# compressai's CompressionModel API on the model, living with the codec that runs it: the model
# module does not import the codec (docs/architecture.md, dependency direction)
StreamLIC.compress = compress_batch
StreamLIC.decompress = decompress_batch


def compress_image(model_or_ckpt: CodecSource, image: Tensor | str | os.PathLike) -> bytes:
    """The file bytes of an image (a tensor [3, H, W] in [0, 1] or an image file)."""
    if not isinstance(image, Tensor):
        image = load_image_file(Path(image))
    return load_codec(model_or_ckpt).encode(image).data


def decompress_bytes(model_or_ckpt: CodecSource, data: bytes, source: str = "<bytes>") -> Tensor:
    """The decoded image [3, H, W] in [0, 1] of a file's bytes."""
    return load_codec(model_or_ckpt).decode(data, source)


def encode_file(model_or_ckpt: CodecSource, image_path: str | os.PathLike, output_path: str | os.PathLike,
                force: bool = False) -> EncodedImage:
    """Compress an image file into a StreamLIC file; an existing output is kept unless ``force``."""
    output = Path(output_path)
    check_output(output, force)
    image = load_image_file(Path(image_path))
    encoded = load_codec(model_or_ckpt).encode(image)
    write_atomically(output, lambda f: f.write(encoded.data), force)
    return encoded


def decode_file(model_or_ckpt: CodecSource, input_path: str | os.PathLike, output_path: str | os.PathLike,
                force: bool = False) -> Tensor:
    """Decode a StreamLIC file into an 8-bit RGB PNG; returns the decoded image [3, H, W]."""
    output = Path(output_path)
    if output.suffix.lower() != ".png":
        raise CodecError(f"{output}: decoded images are written as PNG; give the output a .png name")
    check_output(output, force)
    source = Path(input_path)
    data = source.read_bytes()
    image = load_codec(model_or_ckpt).decode(data, str(source))
    write_atomically(output, lambda f: save_png(image, f), force)
    return image


def save_png(image: Tensor, file: BinaryIO | str | os.PathLike) -> None:
    """Write [3, H, W] in [0, 1] as an 8-bit RGB PNG: ``round(255 x)``."""
    Image.fromarray(to_uint8(image).permute(1, 2, 0).numpy(), "RGB").save(file, format="PNG")


def to_uint8(image: Tensor) -> Tensor:
    return torch.round(image.detach().clamp(0.0, 1.0) * 255.0).to(torch.uint8)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: Path, write: Callable[[BinaryIO], Any], force: bool) -> None:
    """Write through a temporary file in the same directory, then rename it over ``path``.

    A failure leaves no partial output, and an existing file is replaced only with ``force``.
    """
    check_output(path, force)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
        # mkstemp makes the file private (0600); an output gets the permissions of a plain open()
        os.chmod(temporary, 0o666 & ~_current_umask())
        check_output(path, force)  # the output may have appeared while we were coding
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
