"""Start-up time of the command-line entry points, next to the imports they could pay for.

    python bench/cli_startup.py [--repeats 5]

Each command runs in a fresh interpreter ``repeats`` times; the table gives the median wall
time. ``import torch`` and ``import compressai`` are the floor a command that loads the model
cannot go below; ``streamlic --help`` must not pay for them.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "python -c 'import compressai'": [sys.executable, "-c", "import compressai"],
    "streamlic --help": [sys.executable, "-m", "streamlic.cli", "--help"],
    "streamlic export --help": [sys.executable, "-m", "streamlic.cli", "export", "--help"],
    "python train.py --help": [sys.executable, str(ROOT / "train.py"), "--help"],
}


def median_seconds(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"| command | median wall time ({args.repeats} runs) |\n|---|---|")
    for name, command in COMMANDS.items():
        print(f"| `{name}` | {median_seconds(command, args.repeats):.2f} s |")


if __name__ == "__main__":
    main()
