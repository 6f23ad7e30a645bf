"""Where a training run starts from: its checked command line, a resumed run's stored config, a stage checkpoint.

``train.py`` calls :func:`check_config` before it imports torch, Lightning or compressai, so a
mistyped value ends in one ``ERROR`` line within a second or two; the checkpoint readers import
torch only when a checkpoint is given.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from .config import (PER_LAYER_DEFAULTS, ConfigError, canonical_layers, checkpoint_fixed, context_engine_widths,
                     hardware_config, model_config)
from .stage import STAGES

# Keys a resumed run (ckpt_path=) may change: where and how it runs and what it writes, never
# what it trains. Anything else on a resume's command line that differs from the run's stored
# config is refused (docs/stages.md, "Resuming a run").
RESUMABLE_KEYS = ("ckpt_path", "paths", "logger", "hydra", "test", "export", "checkpoint", "trainer.max_epochs",
                  "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
                  "trainer.enable_progress_bar", "callbacks.progress_bar", "data.num_workers", "data.pin_memory",
                  "module.compile", "module.compile_mode", "threads")
RESUME_RECORD_DIR = ".hydra"  # a resume's Hydra record goes to .hydra/resume-<n>, next to the original

# Numbers the command line sets most often, checked before anything is imported: (key, may be null)
POSITIVE_NUMBERS = (("module.lmbda", False), ("module.learning_rate", False), ("module.aux_learning_rate", False),
                    ("module.clip_grad_norm", True))

class CheckpointError(ValueError):
    """A checkpoint given on the command line cannot be used (the message names it)."""


def is_user_error(err: BaseException) -> bool:
    """A user's mistake ends the run with one line; anything else is a bug and keeps its traceback."""
    if isinstance(err, (ConfigError, CheckpointError)):
        return True
    images = sys.modules.get("streamlic.images")  # a DataError exists only once the data code is loaded
    return images is not None and isinstance(err, images.DataError)


def check_config(cfg: DictConfig) -> None:
    """What needs no model: every value given, the common numbers, the checkpoint files exist."""
    missing = sorted(OmegaConf.missing_keys(OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])))
    if missing:
        raise ConfigError(f"{', '.join(missing)}: no value given; set {'it' if len(missing) == 1 else 'them'} on "
                          f"the command line ({missing[0]}=...)")
    for key, nullable in POSITIVE_NUMBERS:
        value = OmegaConf.select(cfg, key)
        if key == "module.lmbda" and OmegaConf.select(cfg, "module.quality") is not None:
            continue  # the quality level sets lambda
        if value is None and nullable:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{key}={value!r}: must be a positive number")
    for key in ("init_from", "ckpt_path"):
        if cfg.get(key):
            checkpoint_file(cfg[key], key)
    if cfg.get("ckpt_path") or not isinstance(cfg.get("hardware"), DictConfig):
        return  # a resumed run's config is its stored one: train.py checks it once read (check_hardware)
    if cfg.get("init_from"):  # the widths given; the checkpoint's model sizes (and widths) are not merged yet
        hardware_config(OmegaConf.to_container(cfg.hardware, resolve=True))
    else:
        check_hardware(cfg)


def check_hardware(cfg: DictConfig) -> None:
    """The run's widths (global and per layer) against its model's blocks and accumulators, and, when it
    exports, its context engine's one width: refused before training, not after it (checked again when
    the network is built). ``cfg`` is the run's whole config: an ``init_from`` checkpoint's values merged."""
    model = model_config(OmegaConf.to_container(cfg.model, resolve=True)
                         if isinstance(cfg.get("model"), DictConfig) else None)
    hardware = hardware_config(OmegaConf.to_container(cfg.hardware, resolve=True))
    model.validate_against(hardware)
    if cfg.get("export"):  # the package is what the run exists for
        try:
            context_engine_widths(hardware, model)
        except ConfigError as err:
            raise ConfigError(f"{err}; or export=false to train it without a hardware package") from None


def checkpoint_file(path: str | Path, key: str) -> Path:
    """``path`` if it is a file torch could have written (a zip archive or a pickle), else a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{key}={path}: no such checkpoint file")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save's zip format, or a legacy pickle
        raise CheckpointError(f"{key}={path}: not a checkpoint (neither a torch zip archive nor a pickle)")
    return path


def load_checkpoint(path: str | Path, key: str) -> dict[str, Any]:
    """The checkpoint at ``path`` as a dict; any unreadable file is one CheckpointError naming ``key``."""
    import torch  # only when a checkpoint is given

    path = checkpoint_file(path, key)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise CheckpointError(f"{key}={path}: not a readable checkpoint ({err})") from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{key}={path}: not a checkpoint (a {type(checkpoint).__name__}, not a dict)")
    return checkpoint


def override_keys(overrides: list[str]) -> list[str]:
    """The config keys (or groups, as dotted paths) a list of command-line overrides sets."""
    return [override.key_or_group.replace("/", ".") for override in OverridesParser.create().parse_overrides(overrides)]


def _sets(keys: list[str], key: str) -> bool:
    """Whether the command line's ``keys`` set ``key`` (itself, a parent group, or a sub-key)."""
    return any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in keys)


def _is_resumable(key: str) -> bool:
    return any(key == allowed or key.startswith(allowed + ".") for allowed in RESUMABLE_KEYS)


_ABSENT = object()


def plain(cfg: DictConfig) -> DictConfig:
    """``cfg`` resolved, without Hydra's own node: the config a run is made of."""
    run_keys = [key for key in cfg if key != "hydra"]
    return OmegaConf.create(OmegaConf.to_container(OmegaConf.masked_copy(cfg, run_keys), resolve=True))


def _select(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=_ABSENT)
    return OmegaConf.to_container(value) if isinstance(value, DictConfig) else value


def resume_config(cfg: DictConfig, record: dict[str, Any], overrides: list[str]) -> DictConfig:
    """The stored config of the run being resumed, with this command line's resumable overrides.

    An override of any other key whose value differs from the stored one is a
    :class:`ConfigError` naming every such key: a resumed run trains what it was started with.
    """
    stored = OmegaConf.create(record["config"])
    current = plain(cfg)
    keys = override_keys(overrides)
    conflicts = [key for key in keys if not _is_resumable(key) and _select(current, key) != _select(stored, key)]
    if conflicts:
        shown = ", ".join(f"{key} (run: {_select(stored, key)!r}, now: {_select(current, key)!r})"
                          for key in dict.fromkeys(conflicts))
        raise ConfigError(f"ckpt_path={cfg.ckpt_path}: a resumed run keeps its config, but this command line "
                          f"changes {shown}; drop the override(s), or start a new run with init_from=")
    merged = stored.copy()
    for key in keys:
        if not _is_resumable(key) or key.split(".")[0] == "hydra":
            continue
        value = OmegaConf.select(current, key, default=_ABSENT)
        if value is _ABSENT:
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(merged, parent) if parent else merged
            if isinstance(node, DictConfig) and leaf in node:
                del node[leaf]
        else:
            OmegaConf.update(merged, key, value, force_add=True)
    merged.ckpt_path = cfg.ckpt_path
    return merged


def model_state(checkpoint: dict[str, Any], path: str | Path, key: str = "init_from") -> dict[str, Any]:
    """The StreamLIC state dict inside a Lightning checkpoint (``model.`` prefix) or a plain state-dict file
    (``key``: the option that named it, for the error)."""
    state = checkpoint.get("state_dict", checkpoint)
    if any(isinstance(k, str) and k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    if not isinstance(state.get("_extra_state"), dict) or "config" not in state["_extra_state"]:
        raise CheckpointError(f"{key}={path}: not a StreamLIC checkpoint (no model stage state in it)")
    return state


def init_from_config(cfg: DictConfig, checkpoint: dict[str, Any], overrides: list[str]) -> DictConfig:
    """``cfg`` (unresolved) with what the ``init_from`` checkpoint fixes taken from it where the command line
    does not set it; a command-line value that contradicts the checkpoint is one ConfigError naming both."""
    path = cfg.init_from
    extra = model_state(checkpoint, path)["_extra_state"]
    prepared, stage = set(extra.get("prepared", ())), extra.get("stage")
    if stage == STAGES[-1]:
        raise ConfigError(f"init_from={path}: the checkpoint is in the last stage ({stage}); nothing is left to train")
    next_stage = STAGES[STAGES.index(stage) + 1]
    start, max_epochs = OmegaConf.select(cfg, f"schedule.stages.{next_stage}.start_epoch"), cfg.trainer.get("max_epochs")
    if isinstance(start, int) and isinstance(max_epochs, int) and 0 <= max_epochs <= start:
        raise ConfigError(f"trainer.max_epochs={max_epochs}: init_from={path} starts the run at stage {next_stage}, "
                          f"schedule epoch {start}, so it would train no epoch")
    fixed = checkpoint_fixed(extra["config"], prepared)
    why = {"model": "its model sizes", "hardware": f"its stage ({stage})", "sparsity": "its masks, already cut"}
    hint = {"hardware": "; a different bit width starts from a checkpoint before QAT (stage1-aun.ckpt or "
                        "stage2-mask.ckpt)" if "scales" in prepared else "",
            "sparsity": "; other densities start from a stage-1 checkpoint (stage1-aun.ckpt)", "model": ""}
    keys = override_keys(overrides)
    for key, value in fixed.items():
        group = key.split(".")[0]
        if not _sets(keys, key):
            OmegaConf.update(cfg, key, value, force_add=True)
        elif key != "hardware.name" and not _same(key, _command_line_value(cfg, key), value):
            raise ConfigError(f"{key}={_command_line_value(cfg, key)!r}: init_from={path} has {key}={value!r}, fixed "
                              f"by {why[group]}{hint[group]}")
    return cfg


def _command_line_value(cfg: DictConfig, key: str) -> Any:
    """``key``'s value in ``cfg``; a per-layer hardware key that a hardware group leaves out has its default."""
    value = _select(cfg, key)
    group, _, name = key.partition(".")
    if value is _ABSENT and group == "hardware" and name in PER_LAYER_DEFAULTS:
        return PER_LAYER_DEFAULTS[name]
    return value


def _same(key: str, value: Any, fixed: Any) -> bool:
    """A command-line value equals a checkpoint's (``hardware.layers`` compared in its canonical form)."""
    if key == "hardware.layers":
        return canonical_layers(value) == canonical_layers(fixed)
    return value == fixed


def discard_unstarted_run(output_dir: Path, resumed: bool, subdir: str, job_log_name: str) -> None:
    """Remove what Hydra wrote for an invocation that failed before training: its record and log.

    Only the files Hydra creates for the invocation are removed (``subdir``, the job log), and then
    the folders that are left empty; a resumed run keeps everything of its earlier invocations.
    """
    job_log = output_dir / job_log_name
    if not resumed and {path.name for path in output_dir.iterdir()} - {subdir, job_log.name}:
        return  # a directory that held a run before this invocation: nothing here is ours alone
    shutil.rmtree(output_dir / subdir, ignore_errors=True)
    if not resumed:
        job_log.unlink(missing_ok=True)
    cwd = Path.cwd().resolve()
    folder = output_dir.resolve()
    while folder == output_dir.resolve() or cwd in folder.parents:  # Hydra's outputs/<date>/<time> below the cwd
        try:
            folder.rmdir()  # only when empty
        except OSError:
            break
        folder = folder.parent


def resume_arguments(argv: list[str], read_record) -> list[str]:
    """Command-line arguments of a resume completed so that ``ckpt_path=…`` alone is enough.

    The run goes on in its own directory (``hydra.run.dir``), and Hydra's record of this
    invocation goes to ``.hydra/resume-<n>`` instead of overwriting the run's original one.
    ``read_record``: the run record of a loaded checkpoint (``None`` without one).
    """
    ckpt = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("ckpt_path=")), None)
    if not ckpt or any(arg in ("-m", "--multirun") for arg in argv):
        return argv
    record = read_record(load_checkpoint(ckpt, "ckpt_path"))
    if record is None:
        return argv
    run_dir = Path(record["config"]["paths"]["output_dir"])
    added = []
    if not any(arg.startswith("hydra.run.dir=") for arg in argv):
        added.append(f"hydra.run.dir={run_dir}")
    else:
        run_dir = Path(next(arg.split("=", 1)[1] for arg in argv if arg.startswith("hydra.run.dir=")))
    if not any(arg.startswith("hydra.output_subdir=") for arg in argv):
        number = 1 + len(list((run_dir / RESUME_RECORD_DIR).glob("resume-*")))
        added.append(f"hydra.output_subdir={RESUME_RECORD_DIR}/resume-{number}")
    return [*argv, *added]
