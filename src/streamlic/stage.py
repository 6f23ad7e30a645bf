"""A model's training stage, the research code's stage API on top of it, and its saved form (docs/stages.md).

The state is three things: the stage (:class:`Stage`, which sets the numerics and what
trains), whether the block masks are applied, and the one-time preparations done (masks
cut, scales frozen, tables initialised), which are never recomputed. Every call of the
research API moves that state; the state travels in the model's state dict and a loaded
state is checked against the rules below before it is applied.

Rules: a stage from QAT on needs frozen scales; the PDF stage needs initialised tables;
fixing the encoder and training the tables come after QAT; the mask stage is the float
model with its masks applied.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

STATE_VERSION = 2
PREPARATIONS = ("masks", "scales", "tables")  # masks cut, scales frozen, probability tables initialised


class Stage(enum.IntEnum):
    AUN = 1
    MASK = 2
    QAT = 3
    FIX_ENCODER = 4
    PDF = 5

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def of(cls, label: str) -> "Stage":
        try:
            return cls[label.upper()]
        except KeyError:
            raise ValueError(f"unknown stage {label!r}; expected one of {STAGES}") from None


STAGES = tuple(stage.label for stage in Stage)


class StageState:
    """Mixin of :class:`streamlic.model.StreamLIC`: the stage state and the research code's stage API.

    The model supplies what each preparation computes (``_cut_masks``, ``_freeze_scales``,
    ``_init_tables``) and how a state is applied to its layers (``_apply_stage``).
    """

    def _init_stage_state(self) -> None:
        self._stage = Stage.AUN
        self._masked = False
        self._prepared: set[str] = set()

    # ------------------------------------------------------------------ reading the state
    @property
    def stage(self) -> str:
        return self._stage.label

    @property
    def quantized(self) -> bool:
        return self._stage >= Stage.QAT

    @property
    def masked(self) -> bool:
        return self._masked

    @property
    def encoder_fixed(self) -> bool:
        return self._stage >= Stage.FIX_ENCODER

    @property
    def pdf_training(self) -> bool:
        return self._stage == Stage.PDF

    @property
    def masks_set(self) -> bool:
        return "masks" in self._prepared

    @property
    def scales_frozen(self) -> bool:
        return "scales" in self._prepared

    @property
    def pdf_initialized(self) -> bool:
        return "tables" in self._prepared

    # ------------------------------------------------------------------ the research code's API
    def enter_stage(self, stage: str) -> None:
        """Apply the transition into ``stage`` (the calls of the stage table); re-entering changes nothing."""
        target = Stage.of(stage)
        if target == Stage.MASK:
            self.set_all_mask()
            self.toggle_mask(True)
        elif target == Stage.QAT:
            self.toggle_quantization(True)
        elif target == Stage.FIX_ENCODER:
            self.fix_encoder_flag(True)
        elif target == Stage.PDF:
            self.init_pdf_table()
            self.toggle_pdf_training_flag(True)

    def set_all_mask(self, force: bool = False) -> None:
        """Cut the block masks from the gathered statistics (once; ``force`` cuts them again)."""
        if self.masks_set and not force:
            return
        if self.scales_frozen:
            raise RuntimeError("set_all_mask: masks must be set before quantization scales are frozen")
        self._cut_masks()
        self._prepared.add("masks")

    def toggle_mask(self, flag: bool = True) -> None:
        """Apply the block masks (or not); before QAT this is the difference between stages 1 and 2."""
        self._masked = bool(flag)
        if self._stage < Stage.QAT:
            self._stage = Stage.MASK if self._masked else Stage.AUN
        self._apply_stage()

    def toggle_quantization(self, flag: bool = True) -> None:
        """Switch to the integer datapath (freezing weight/activation scales the first time) or back."""
        if flag:
            if not self.scales_frozen:
                self._freeze_scales()
                self._prepared.add("scales")
            self._stage = max(self._stage, Stage.QAT)
        else:
            self._stage = Stage.MASK if self._masked else Stage.AUN
        self._apply_stage()

    def fix_encoder_flag(self, flag: bool = True) -> None:
        """Freeze g_a and h_a; y is quantized row by row as the decoder does (after QAT)."""
        if flag:
            self._require(Stage.QAT, "fix_encoder_flag(True)")
            self._stage = max(self._stage, Stage.FIX_ENCODER)
        elif self._stage >= Stage.FIX_ENCODER:
            self._stage = Stage.QAT
        self._apply_stage()

    def init_pdf_table(self, force: bool = False) -> None:
        """Initialise the probability tables from the current Gaussian and factorized models (once)."""
        if self.pdf_initialized and not force:
            return
        self._init_tables()
        self._prepared.add("tables")

    def toggle_pdf_training_flag(self, flag: bool = True) -> None:
        """Train only the probability tables (after QAT, once they are initialised)."""
        if flag:
            if not self.pdf_initialized:
                raise RuntimeError("toggle_pdf_training_flag(True): call init_pdf_table() first")
            self._require(Stage.QAT, "toggle_pdf_training_flag(True)")
            self._stage = Stage.PDF
        elif self._stage == Stage.PDF:
            self._stage = Stage.FIX_ENCODER
        self._apply_stage()

    def _require(self, stage: Stage, what: str) -> None:
        if self._stage < stage:
            raise RuntimeError(f"{what}: the model is at stage '{self.stage}'; enter stage {stage.value} "
                               f"({stage.label}) first")

    # ------------------------------------------------------------------ saved form
    def stage_state(self) -> dict[str, Any]:
        return {"stage": self.stage, "masked": self._masked,
                "prepared": [name for name in PREPARATIONS if name in self._prepared]}

    def load_stage_state(self, state: dict[str, Any]) -> None:
        """Restore a saved stage without recomputing anything (masks and scales come from the buffers)."""
        stage, masked, prepared = Stage.of(state["stage"]), bool(state["masked"]), set(state["prepared"])
        problems = [rule for rule, broken in (
            ("a stage from QAT on needs frozen scales", stage >= Stage.QAT and "scales" not in prepared),
            ("the PDF stage needs initialised tables", stage == Stage.PDF and "tables" not in prepared),
            ("the mask stage applies the masks", stage == Stage.MASK and not masked),
            ("stage 1 does not apply masks", stage == Stage.AUN and masked),
            ("unknown preparations", bool(prepared - set(PREPARATIONS))),
        ) if broken]
        if problems:
            raise ValueError(f"model state {state}: impossible ({'; '.join(problems)})")
        self._stage, self._masked, self._prepared = stage, masked, prepared
        self._apply_stage()


def stage_state_of_version_1(flags: dict[str, bool]) -> dict[str, Any]:
    """The stage state of a version-1 model state (seven flags)."""
    stage = (Stage.PDF if flags["pdf_training"] else Stage.FIX_ENCODER if flags["encoder_fixed"]
             else Stage.QAT if flags["quantized"] else Stage.MASK if flags["masked"] else Stage.AUN)
    prepared = [name for name, flag in zip(PREPARATIONS, ("masks_set", "scales_frozen", "pdf_initialized"))
                if flags[flag]]
    return {"stage": stage.label, "masked": bool(flags["masked"]), "prepared": prepared}


@dataclass
class SchedulePosition:
    """Where a training run stands in the stage schedule, published on the LightningModule.

    The stage schedule callback writes it at every epoch start; the other callbacks (weight
    average, progress bar, interruption) read it and never look for that callback. Without
    a schedule the run is one stage from schedule epoch 0 to its last epoch.
    """

    epoch_offset: int = 0  # schedule epoch of the run's first epoch (a later stage's start after init_from)
    stage_last_epoch: int | None = None  # schedule epoch at whose end the current stage ends (None: the run's last)

    def schedule_epoch(self, trainer: Any) -> int:
        return trainer.current_epoch + self.epoch_offset

    def stage_ends_this_epoch(self, trainer: Any) -> bool:
        last = self.stage_last_epoch
        if last is None:
            if trainer.max_epochs is None or trainer.max_epochs < 0:
                return False
            last = trainer.max_epochs - 1 + self.epoch_offset
        return self.schedule_epoch(trainer) == last
