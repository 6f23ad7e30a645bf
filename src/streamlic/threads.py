"""The CPU thread policy of ``train.py`` and the ``streamlic`` command: one intra-op thread per process by default.

Why one: StreamLIC's CPU work is many small operations (the row engine decodes one latent row at
a time; the demo and tiny models train on small crops), which gain little from more threads.
OpenMP's worker threads spin while they wait, so a process using every core beside another busy
process slows both down several times (BENCHMARKS.md, "Threads"). One thread also makes results
independent of the machine's core count (float sums are split differently per thread count).

The order of precedence: ``OMP_NUM_THREADS`` set by the user wins (nothing is changed); then an
explicit request (``threads=`` in the training config, ``--threads`` of the command line; 0 means
torch's own default, all cores); then :data:`DEFAULT_THREADS`.
"""

from __future__ import annotations

import logging
import os

from .config import ConfigError

DEFAULT_THREADS = 1

log = logging.getLogger("streamlic")


def apply_thread_policy(requested: int | None = None, log_level: int = logging.INFO) -> int:
    """Set torch's intra-op thread count by the policy above; logs the choice at ``log_level`` and returns the
    count in use (the training log records it; a command's own output stays its result or its one error line)."""
    import torch

    if requested is not None and not (type(requested) is int and requested >= 0):
        raise ConfigError(f"threads={requested}: expected 0 (torch's default) or a positive count")
    if "OMP_NUM_THREADS" in os.environ:
        reason = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    elif requested == 0:
        reason = "threads=0: torch's default"
    else:
        torch.set_num_threads(DEFAULT_THREADS if requested is None else requested)
        reason = "the default policy (one per process)" if requested is None else f"threads={requested}"
    log.log(log_level, "CPU threads: %d (%s)", torch.get_num_threads(), reason)
    return torch.get_num_threads()
