"""``streamlic`` command line: each subcommand lives in the module it drives."""

from __future__ import annotations

import argparse
import logging
import sys

from . import codec, export


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamlic", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    export.register_cli(sub)
    codec.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, RuntimeError, ArithmeticError) as err:
        logging.getLogger("streamlic").error("%s", err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
