"""Train StreamLIC through its five stages (Hydra entry point; configs in ``conf/``).

    python train.py                                   # all five stages on the demo photos
    python train.py ckpt_path=<run>/checkpoints/last.ckpt   # resume a run exactly
    python train.py -m init_from=<run>/checkpoints/stage1-aun.ckpt sparsity.density=0.1,0.2,0.3

A run writes into its Hydra output directory: ``checkpoints/`` (stage checkpoints and
``last.ckpt``), ``stage_report.json``, ``results.json``, the logger's files and ``export/``.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any


def quiet_dependencies() -> None:
    """Filter warnings of dependencies that say nothing a StreamLIC user can act on."""
    # the step checkpoints hold the state after the optimizer step, which is what a resume needs
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"The '\w+_dataloader' does not have many workers")
    warnings.filterwarnings("ignore", message=r".*does not have many workers which may be a bottleneck")
    # Lightning's own use of a torch API that torch has deprecated
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # a mid-epoch checkpoint resumes exactly: the seeded training loader skips the batches already trained
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    os.environ.setdefault("WANDB_SILENT", "true")
    # Lightning's advertisement of its cloud logger on every run
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not str(record.msg).startswith("💡 Tip"))


if __name__ == "__main__":
    quiet_dependencies()  # before the imports below load compressai and Lightning

import hydra  # noqa: E402
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from callbacks import (STAGE_CHECKPOINT_KEY, STAGE_CHECKPOINT_NAMES, NonFiniteLossError, RunRecord, StageSchedule,
                       invocation, parse_schedule, read_finished_stages, read_run_record)
from streamlic.config import ConfigError
from streamlic.images import DataError
from streamlic.export import export_package
from streamlic.model import StreamLIC
from streamlic.stage import STAGES
from streamlic.sweep import context_macs_per_pixel, write_results
from streamlic.threads import apply_thread_policy

log = logging.getLogger("streamlic.train")

# Keys a resumed run (ckpt_path=) may change: where and how it runs and what it writes, never
# what it trains. Anything else on a resume's command line that differs from the run's stored
# config is refused (README, "Resume").
RESUMABLE_KEYS = ("ckpt_path", "paths", "logger", "hydra", "test", "export", "checkpoint", "trainer.max_epochs",
                  "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
                  "trainer.enable_progress_bar", "callbacks.progress_bar", "data.num_workers", "data.pin_memory",
                  "module.compile", "module.compile_mode", "threads")
RESUME_RECORD_DIR = ".hydra"  # a resume's Hydra record goes to .hydra/resume-<n>, next to the original


class CheckpointError(ValueError):
    """A checkpoint given on the command line cannot be used (the message names it)."""


# A user's mistake ends the run with one line; anything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, DataError, CheckpointError)


def _instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """Hydra's instantiate, re-raising a ConfigError from the target itself (it names the key)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise


def build_model(cfg: DictConfig) -> StreamLIC:
    """The network of ``cfg.net``; every hardware/model/sparsity constraint is checked here."""
    return _instantiate(cfg.net, _convert_="all")


def load_init_checkpoint(model: StreamLIC, path: str | Path) -> str:
    """Load weights and stage from a stage checkpoint; returns the stage the new run starts in.

    Nothing is recomputed: masks, frozen scales and tables come from the checkpoint. Its
    masks were cut for its own sparsity config, so a different one is an error here.
    """
    path = Path(path)
    state = StreamLIC.checkpoint_state_dict(path)
    saved_sparsity = state["_extra_state"]["config"]["sparsity"]
    model.load_state_dict(state)
    if model.masks_set and saved_sparsity != model.sparsity_cfg.to_dict():
        raise ConfigError(
            f"sparsity={model.sparsity_cfg.to_dict()}: init_from={path} already has masks cut for "
            f"sparsity={saved_sparsity}; start from a stage-1 checkpoint "
            f"({STAGE_CHECKPOINT_NAMES['aun']}) to train other densities"
        )
    finished = read_finished_stages(torch.load(path, map_location="cpu", weights_only=False))
    if finished is not None and model.stage not in finished:
        log.warning("init_from=%s: stage %s had not finished in that run; continuing with the next stage anyway",
                    path, model.stage)
    index = STAGES.index(model.stage)
    if index + 1 == len(STAGES):
        raise ConfigError(f"init_from={path}: the checkpoint is in the last stage ({model.stage}); nothing is left "
                          "to train")
    log.info("init_from %s: model in stage %s; this run starts at stage %s", path, model.stage, STAGES[index + 1])
    return STAGES[index + 1]


def check_launcher(cfg: DictConfig) -> None:
    """Refuse DDP with Lightning's popen launcher inside a local multirun.

    That launcher starts each extra rank by re-running the command line, which inside a
    multirun would start the whole sweep again in every rank.
    """
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    if not HydraConfig.get().launcher._target_.endswith("BasicLauncher") or cfg.trainer.get("devices") == 1:
        return
    strategy = cfg.trainer.get("strategy")
    start_method = strategy.get("start_method", "popen") if isinstance(strategy, DictConfig) else str(strategy)
    if start_method in ("popen", "ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false"):
        raise ConfigError(
            "trainer.strategy: DDP with start_method=popen cannot run inside a local multirun (every rank would "
            "restart the sweep); sweep with the SLURM launcher (hydra/launcher=slurm) or run the DDP jobs one by one"
        )


def build_callbacks(cfg: DictConfig, start_stage: str) -> list[L.Callback]:
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        extra = {"start_stage": start_stage} if OmegaConf.select(node, "_target_").endswith("StageSchedule") else {}
        callbacks.append(_instantiate(node, **extra))
        log.debug("callback %s: %s", name, type(callbacks[-1]).__name__)
    return callbacks


def build_loggers(cfg: DictConfig) -> list:
    return [_instantiate(node) for node in (cfg.get("logger") or {}).values() if node is not None]


def job_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _split_metrics(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {key[len(prefix):]: float(value) for key, value in metrics.items() if key.startswith(prefix)}


def export_model(model: StreamLIC, out_dir: Path, datamodule) -> dict[str, Any]:
    """The hardware package of a QAT-or-later model (docs/export-format.md), golden vectors on the first test image.

    A model before QAT has nothing to export (reported, not an error). An export that fails is
    returned as an error: the run then ends as failed, with its checkpoints kept.
    """
    if not model.scales_frozen:
        log.warning("export skipped: the model is in stage %s; exports need stage 3 (qat) or later", model.stage)
        return {"dir": None, "error": None, "skipped": f"model in stage {model.stage}"}
    test_set = datamodule.test_dataset
    image, name = (test_set[0], test_set.names[0]) if test_set is not None else (None, None)
    try:
        export_package(model.cpu(), out_dir, image=image, image_name=name, force=True)
    except (ValueError, ArithmeticError) as err:
        return {"dir": None, "error": str(err)}
    log.info("hardware package written to %s", out_dir)
    return {"dir": str(out_dir), "error": None}


def _override_keys(overrides: list[str]) -> list[str]:
    """The config keys (or groups, as dotted paths) a list of command-line overrides sets."""
    return [override.key_or_group.replace("/", ".") for override in OverridesParser.create().parse_overrides(overrides)]


def _is_resumable(key: str) -> bool:
    return any(key == allowed or key.startswith(allowed + ".") for allowed in RESUMABLE_KEYS)


_ABSENT = object()


def _plain(cfg: DictConfig) -> DictConfig:
    """``cfg`` resolved, without Hydra's own node: the config a run is made of."""
    run_keys = [key for key in cfg if key != "hydra"]
    return OmegaConf.create(OmegaConf.to_container(OmegaConf.masked_copy(cfg, run_keys), resolve=True))


def _select(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=_ABSENT)
    return OmegaConf.to_container(value) if isinstance(value, DictConfig) else value


def load_resume_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise CheckpointError(f"ckpt_path={path}: not a readable checkpoint ({err})") from err


def resume_config(cfg: DictConfig, record: dict[str, Any], overrides: list[str]) -> DictConfig:
    """The stored config of the run being resumed, with this command line's resumable overrides.

    An override of any other key whose value differs from the stored one is a
    :class:`ConfigError` naming every such key: a resumed run trains what it was started with.
    """
    stored = OmegaConf.create(record["config"])
    current = _plain(cfg)
    keys = _override_keys(overrides)
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


def train(cfg: DictConfig) -> dict[str, Any]:
    """One training run; returns (and writes to ``results.json``) its results.

    With ``ckpt_path`` the run continues from its own checkpoint with the config stored in
    it (:func:`resume_config`); the new invocation is appended to the run's record.
    """
    overrides = job_overrides()
    invocations = [invocation(overrides, cfg.ckpt_path)]
    if cfg.ckpt_path:
        checkpoint = load_resume_checkpoint(cfg.ckpt_path)
        if checkpoint.get(STAGE_CHECKPOINT_KEY):
            raise CheckpointError(f"ckpt_path={cfg.ckpt_path}: a stage checkpoint holds no optimizer state and "
                                  "cannot resume a run; resume from the run's checkpoints/last.ckpt, or start a new "
                                  "run from this stage with init_from=")
        record = read_run_record(checkpoint)
        if record is None:
            log.warning("ckpt_path=%s holds no stored config (a checkpoint of an older release): the run resumes "
                        "with the config of this command line", cfg.ckpt_path)
            cfg = _plain(cfg)
        else:
            cfg = resume_config(cfg, record, overrides)
            invocations = [*record["invocations"], *invocations]
            log.info("resuming with the run's stored config (invocation %d of this run)", len(invocations))
    else:
        cfg = _plain(cfg)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{', '.join(missing)}: no value given; set {'it' if len(missing) == 1 else 'them'} on "
                          f"the command line ({missing[0]}=...)")
    parse_schedule(cfg.schedule.stages)  # schedule and launcher errors before anything is built
    check_launcher(cfg)
    apply_thread_policy(cfg.get("threads"))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build_model(cfg)
    start_stage = load_init_checkpoint(model, cfg.init_from) if cfg.init_from else STAGES[0]
    datamodule = _instantiate(cfg.data)
    # data errors before a logger or an output file exists
    datamodule.setup("fit")
    if cfg.test:
        datamodule.setup("test")
    # partial, then call: objects passed to instantiate() itself would be copied into the config
    module = _instantiate(cfg.module, _partial_=True)(model=model)
    callbacks = [*build_callbacks(cfg, start_stage), RunRecord(OmegaConf.to_container(cfg), invocations)]
    loggers = build_loggers(cfg)
    trainer: L.Trainer = _instantiate(cfg.trainer, _partial_=True)(callbacks=callbacks, logger=loggers or False)
    output_dir = Path(cfg.paths.output_dir)
    results: dict[str, Any] = {"overrides": overrides, "output_dir": str(output_dir), "init_from": cfg.init_from,
                               "status": "finished", "invocations": invocations}
    try:
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        except NonFiniteLossError as err:
            log.error("%s", err)
            results.update(status="stopped: non-finite loss", message=str(err))
        if results["status"] == "finished" and cfg.test:
            tested = trainer.test(module, datamodule=datamodule, verbose=trainer.is_global_zero)
            results["test"] = _split_metrics(tested[0], "test/") if tested else None
        if trainer.is_global_zero:
            stages = next((cb for cb in callbacks if isinstance(cb, StageSchedule)), None)
            rows = stages.rows() if stages else []
            finished_rows = [row for row in rows if row.get("end")]
            results.update(
                stage=model.stage,
                stage_report=rows,
                val=finished_rows[-1]["end"] if finished_rows else None,
                checkpoints={row["stage"]: row["checkpoint"] for row in finished_rows},
                context_macs_per_pixel=context_macs_per_pixel(model),
                sparsity=model.sparsity_cfg.to_dict(),
                hardware=model.hw.name,
            )
            if results["status"] == "finished" and cfg.export:
                results["export"] = export_model(model, Path(cfg.paths.export_dir), datamodule)
                if results["export"]["error"]:
                    results.update(status="failed: export", message=results["export"]["error"])
                    log.error("export failed (the checkpoints are kept): %s", results["export"]["error"])
            write_results(output_dir, results)
    finally:
        if trainer.is_global_zero and any(isinstance(logger, WandbLogger) for logger in loggers):
            import wandb

            wandb.finish()  # one wandb run per (multirun) job
    return results


def _discard_unstarted_run(output_dir: Path, resumed: bool) -> None:
    """Remove what Hydra wrote for an invocation that failed before training: its record and log.

    Only the files Hydra creates for the invocation are removed, and then the folders that are
    left empty; a resumed run keeps everything of its earlier invocations.
    """
    hydra_cfg = HydraConfig.get()
    job_log = output_dir / f"{hydra_cfg.job.name}.log"
    if not resumed and {path.name for path in output_dir.iterdir()} - {hydra_cfg.output_subdir, job_log.name}:
        return  # a directory that held a run before this invocation: nothing here is ours alone
    shutil.rmtree(output_dir / hydra_cfg.output_subdir, ignore_errors=True)
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


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        results = train(cfg)
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            _discard_unstarted_run(Path(HydraConfig.get().runtime.output_dir), bool(cfg.ckpt_path))
        print(f"ERROR {err}", file=sys.stderr)
        sys.exit(1)
    if results["status"] != "finished" and HydraConfig.get().mode != RunMode.MULTIRUN:
        print(f"ERROR run {results['status']}: {results.get('message', '')}", file=sys.stderr)
        sys.exit(1)  # in a sweep the other jobs go on; the summary shows the status and fails the sweep


def resume_arguments(argv: list[str]) -> list[str]:
    """Command-line arguments of a resume completed so that ``ckpt_path=…`` alone is enough.

    The run goes on in its own directory (``hydra.run.dir``), and Hydra's record of this
    invocation goes to ``.hydra/resume-<n>`` instead of overwriting the run's original one.
    """
    ckpt = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("ckpt_path=")), None)
    if not ckpt or any(arg in ("-m", "--multirun") for arg in argv):
        return argv
    record = read_run_record(load_resume_checkpoint(ckpt))
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


if __name__ == "__main__":
    try:
        sys.argv[1:] = resume_arguments(sys.argv[1:])
    except CheckpointError as error:
        print(f"ERROR {error}", file=sys.stderr)
        sys.exit(1)
    main()
