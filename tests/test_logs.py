"""What a user reads: train.py's output in a log file, the TensorBoard logger, the CLI's version, the thread policy."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from _training import TINY, run_script, schedule, script_env
from streamlic import __version__
from streamlic.config import ConfigError
from streamlic.stage import STAGES
from streamlic.threads import DEFAULT_THREADS, apply_thread_policy


@pytest.mark.slow
def test_train_log_redirected_to_a_file_is_plain_lines_with_one_report_row_per_stage(tmp_path):
    overrides = [*(o for o in TINY if not o.startswith("logger=")), "logger=tensorboard", *schedule(),
                 "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false",
                 "callbacks.progress_bar.text_every_n_steps=1", f"hydra.run.dir={tmp_path / 'run'}"]
    done = run_script(overrides, timeout=300)  # stdout and stderr are pipes, as when redirected to a file
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "\r" not in output and "\x1b" not in output  # no redrawn progress bars, no terminal escape codes
    assert "Tip:" not in output and "Total Flops" not in output
    # the text progress: a line per training step (text_every_n_steps=1) and one per epoch end, naming the stage
    assert output.count("epoch 0 step 1/2: stage=aun") == 1 and output.count("epoch 4 end: stage=pdf") == 1
    # each stage's report row is logged when the stage ends, and once more in the whole table at the end
    for number, stage in enumerate(STAGES, 1):
        rows = [line for line in output.splitlines() if line.startswith(f"{number} {stage} ")]
        assert len(rows) == 2, (stage, rows)
    assert output.count("stage report (validation set)") == len(STAGES) + 1
    # logger=tensorboard writes event files that hold the logged scalars
    events = list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and all(path.stat().st_size > 0 for path in events)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert "train/loss" in {tag.rsplit("_", 1)[0] if tag.endswith(("_step", "_epoch")) else tag for tag in scalars}


def test_cli_version_answers_without_loading_torch():
    code = ("import sys; from streamlic.cli import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=script_env(), timeout=60)
    assert done.stdout.splitlines() == [f"streamlic {__version__}", "False"], done.stderr


@pytest.fixture
def threads_restored():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("threads_restored")
def test_thread_policy_one_per_process_unless_asked_and_omp_num_threads_wins(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert apply_thread_policy() == DEFAULT_THREADS == 1
    assert apply_thread_policy(2) == torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(2)
    assert apply_thread_policy(3) == 2  # the user's OMP_NUM_THREADS: the policy changes nothing
    with pytest.raises(ConfigError, match="^threads=-1: expected 0"):
        apply_thread_policy(-1)
