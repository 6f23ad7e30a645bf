"""Lightning callbacks of the StreamLIC training run (a top-level package, next to ``train.py``).

- :class:`StageSchedule` fires the five stage transitions at the configured epochs, sets each
  stage's learning rate (and moves it within the stage, :class:`LRSchedule`), writes the stage
  checkpoints and the stage report.
- :class:`StageProgressBar` shows the current stage in the progress bar.
- :class:`NonFiniteGuard` stops the run before a NaN/Inf gradient reaches the weights.
"""

from .guard import NonFiniteGuard, NonFiniteLossError
from .progress import StageProgressBar
from .stages import (STAGE_CHECKPOINT_NAMES, LRSchedule, StageSchedule, StageSpec, parse_schedule,
                     read_finished_stages)

__all__ = [
    "LRSchedule", "NonFiniteGuard", "NonFiniteLossError", "STAGE_CHECKPOINT_NAMES", "StageProgressBar",
    "StageSchedule", "StageSpec", "parse_schedule", "read_finished_stages",
]
