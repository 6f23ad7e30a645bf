"""StreamLIC: train a learned image codec down to a sparse, fixed-point, hardware-exact model.

The names below are loaded on first use, so that ``streamlic.cli`` (the console script) does
not pay for torch and compressai before it needs them.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "ConfigError": "config", "HardwareConfig": "config", "ModelConfig": "config", "SparsityConfig": "config",
    "W8A8": "config", "W12A12": "config", "hardware_config": "config", "model_config": "config",
    "sparsity_config": "config", "RectifiedPDF": "entropy", "STAGES": "stage", "ARLiteSparse_Q": "model",
    "StreamLIC": "model",
}
# the model with compressai's compress/decompress, which streamlic.codec attaches when it loads
_WITH_CODEC = {"StreamLIC", "ARLiteSparse_Q"}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'streamlic' has no attribute {name!r}")
    if name in _WITH_CODEC:
        import_module(".codec", __name__)
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
