"""The run's composed config and its invocations, carried in every checkpoint.

A resumed run (``ckpt_path=``) must be the same run: ``train.py`` rebuilds it from the config
stored here, not from whatever the new command line composes, and appends the new
invocation to the record instead of overwriting it.
"""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from typing import Any, Mapping

from lightning.pytorch.callbacks import Callback


def invocation(overrides: list[str], ckpt_path: str | None = None) -> dict[str, Any]:
    """One entry of the record: when, with which command-line overrides, from which checkpoint."""
    return {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "overrides": list(overrides),
            "ckpt_path": ckpt_path}


class RunRecord(Callback):
    """Stores ``{"config": <composed config>, "invocations": [...]}`` in the checkpoint's callback state.

    Args:
        config: the run's composed, resolved config (a plain container).
        invocations: the invocations of this run so far, the current one last.
    """

    state_key = "RunRecord"  # its entry in a checkpoint's callback states (read_run_record)

    def __init__(self, config: Mapping[str, Any], invocations: list[dict[str, Any]]) -> None:
        self.config = copy.deepcopy(dict(config))
        self.invocations = copy.deepcopy(list(invocations))

    def state_dict(self) -> dict[str, Any]:
        return {"config": copy.deepcopy(self.config), "invocations": copy.deepcopy(self.invocations)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the record built for this invocation already starts with the checkpoint's invocations
        # (train.py read them before the run): nothing to restore over it
        return


def read_run_record(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The :class:`RunRecord` state of a Lightning checkpoint (``None``: a checkpoint without one)."""
    state = checkpoint.get("callbacks", {}).get(RunRecord.state_key)
    return state if isinstance(state, dict) and "config" in state else None
