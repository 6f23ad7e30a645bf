"""Lightning's wandb logger without the deprecated ``anonymous`` setting (conf/logger/wandb.yaml)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger


class WandbLogger(LightningWandbLogger):
    """Lightning's :class:`~lightning.pytorch.loggers.WandbLogger`, minus ``anonymous``.

    Lightning always passes ``anonymous`` to ``wandb.init``, and current wandb warns on every
    run that the setting has no effect; leaving it out changes nothing else.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wandb_init.pop("anonymous", None)
