"""Lightning callbacks of the StreamLIC training run (a top-level package, next to ``train.py``).

- :class:`StageSchedule` fires the five stage transitions at the configured epochs, sets each
  stage's learning rate (and moves it within the stage, :class:`LRSchedule`), writes the stage
  checkpoints and the stage report.
- :class:`StageProgressBar` shows the current stage in the progress bar.
- :class:`NonFiniteGuard` stops the run before a NaN/Inf gradient reaches the weights.
- :class:`Interruption` stops a run on SIGINT/SIGTERM after the current step, with ``last.ckpt`` there.
- :class:`RunRecord` carries the run's config and invocations in every checkpoint.
- :class:`WeightAverage` keeps an average of the weights, committed at every stage's end.
"""

from .guard import NonFiniteGuard, NonFiniteLossError
from .interrupt import Interruption, RunInterrupted
from .progress import StageProgressBar
from .run_record import RunRecord, invocation, read_run_record
from .stages import (STAGE_CHECKPOINT_KEY, STAGE_CHECKPOINT_NAMES, LRSchedule, StageSchedule, StageSpec,
                     parse_schedule, read_finished_stages, schedule_epochs_done)
from .weight_average import WeightAverage

__all__ = [
    "Interruption", "LRSchedule", "NonFiniteGuard", "NonFiniteLossError", "RunInterrupted", "RunRecord",
    "STAGE_CHECKPOINT_KEY", "STAGE_CHECKPOINT_NAMES", "StageProgressBar", "StageSchedule", "StageSpec", "invocation",
    "parse_schedule", "WeightAverage", "read_finished_stages", "read_run_record", "schedule_epochs_done",
]
