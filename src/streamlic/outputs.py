"""Checks of an output path before anything is computed (torch-free: the command line runs them first)."""

from __future__ import annotations

from pathlib import Path


def check_output(path: Path, force: bool) -> None:
    """Refuse a directory, an existing file (unless ``force``) and a path whose folder does not exist."""
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory")
    if path.exists() and not force:
        raise FileExistsError(f"{path}: already exists (use --force to overwrite it)")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: directory {path.parent} does not exist")
