"""StreamLIC: train a learned image codec down to a sparse, fixed-point, hardware-exact model."""

from .config import (ConfigError, HardwareConfig, ModelConfig, SparsityConfig, W8A8, W12A12, hardware_config,
                     model_config, sparsity_config)
from .entropy import RectifiedPDF
from .model import STAGES, ARLiteSparse_Q, StreamLIC

__all__ = [
    "ARLiteSparse_Q", "ConfigError", "HardwareConfig", "ModelConfig", "RectifiedPDF", "STAGES", "SparsityConfig",
    "StreamLIC", "W12A12", "W8A8", "hardware_config", "model_config", "sparsity_config",
]
__version__ = "0.1.0"
