"""Hardware exports of a QAT-or-later StreamLIC (docs/export-format.md), one job per module.

- :mod:`.package`: :func:`export_package` writes every file with its manifest; :func:`load_export` and
  :func:`load_integer_model` read it back;
- :mod:`.streams`: the autoregressive engine's parameter streams in the kernel's read order;
- :mod:`.golden`: golden vectors of one image and the corner-case set;
- :mod:`.report`: MACs, weight and accumulator bits per layer;
- :mod:`.header`: the C header and the storage widths.

The integers themselves come from :func:`streamlic.params.export_quantized_parameters`.
"""

from ..params import ExportError
from .package import export_package, load_export, load_integer_model

__all__ = ["ExportError", "export_package", "load_export", "load_integer_model"]
