"""Start-up time of the command-line entry points, next to the imports they could pay for.

    python bench/cli_startup.py [--repeats 5] [--checkpoint STAGE3_OR_LATER.ckpt]

Each command runs in a fresh interpreter ``repeats`` times; the table gives the median wall
time. ``import torch`` and ``import compressai`` are the floor a command that loads the model
cannot go below; ``streamlic --help``, ``--version`` and a missing input must not pay for them.
With ``--checkpoint``, ``streamlic compress`` of a 300x451 demo photo is timed too, as its
start-up: the wall time minus the coding seconds the command prints.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "python -c 'import compressai'": [sys.executable, "-c", "import compressai"],
    "streamlic --help": [sys.executable, "-m", "streamlic.cli", "--help"],
    "streamlic export --help": [sys.executable, "-m", "streamlic.cli", "export", "--help"],
    "streamlic --version": [sys.executable, "-m", "streamlic.cli", "--version"],
    "streamlic compress missing.png -c missing.ckpt (error)": [sys.executable, "-m", "streamlic.cli", "compress",
                                                              "missing.png", "-c", "missing.ckpt"],
    "python train.py --help": [sys.executable, str(ROOT / "train.py"), "--help"],
}


def median_seconds(command: list[str], repeats: int, coding_time: bool = False) -> float:
    """Median wall seconds; with ``coding_time``, minus the seconds the command reports at the end of its output."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - start
        if coding_time:
            seconds -= float(re.search(r"([\d.]+) s$", done.stdout.strip()).group(1))
        times.append(seconds)
    return statistics.median(times)


def compress_command(checkpoint: Path, folder: Path) -> list[str]:
    photo = folder / "photo.png"
    subprocess.run([sys.executable, "-c", "from skimage import data; from PIL import Image; "
                    f"Image.fromarray(data.astronaut()[:300, :451]).save({str(photo)!r})"], check=True)
    return [sys.executable, "-m", "streamlic.cli", "compress", str(photo), "-c", str(checkpoint), "-o",
            str(folder / "photo.slic"), "--force"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkpoint", type=Path, help="a stage-3-or-later checkpoint: time compress's start-up")
    args = parser.parse_args()
    print(f"| command | median wall time ({args.repeats} runs) |\n|---|---|")
    for name, command in COMMANDS.items():
        print(f"| `{name}` | {median_seconds(command, args.repeats):.2f} s |", flush=True)
    if args.checkpoint is not None:
        with tempfile.TemporaryDirectory() as folder:
            command = compress_command(args.checkpoint.resolve(), Path(folder))
            seconds = median_seconds(command, args.repeats, coding_time=True)
        print(f"| `streamlic compress` of a 300x451 photo, start-up (wall minus coding) | {seconds:.2f} s |")


if __name__ == "__main__":
    main()
