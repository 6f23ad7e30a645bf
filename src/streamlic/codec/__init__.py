"""The StreamLIC image codec (docs/bitstream-format.md), one job per module.

- :mod:`.bitstream`: the file format and :class:`StreamCodec`, which encodes an image to bytes
  and decodes them with row-parallel exact integer decoding;
- :mod:`.tables`: the rANS coding tables from the model's 16-bit CDFs;
- :mod:`.io`: loading a codec from a checkpoint or an export, the Python API, image and file I/O;
- :mod:`.evaluate`: rate-distortion of checkpoints on a folder (CompressAI results files, BD-rate, RD plots).
"""

from typing import Any

from .bitstream import HEADER_SIZE, CodecError, EncodedImage, StreamCodec, model_id
from .io import (compress_batch, compress_image, decode_file, decompress_batch, decompress_bytes, encode_file,
                 load_codec, to_uint8)

__all__ = ["CodecError", "EncodedImage", "HEADER_SIZE", "StreamCodec", "compress_batch", "compress_image",
           "decode_file", "decompress_batch", "decompress_bytes", "encode_file", "evaluate_folder", "load_codec",
           "model_id", "to_uint8"]


def __getattr__(name: str) -> Any:
    # loaded on first use: evaluation needs torchmetrics (seconds to import), compress and decompress do not
    if name == "evaluate_folder":
        from .evaluate import evaluate_folder

        return evaluate_folder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
