"""The ``sprout-edge`` command: the device side. Model sync and classification arrive with the distribution work."""

from __future__ import annotations

import argparse
import sys

from edge import __version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sprout-edge", description="Sprout on a phone or edge device (no torch needed).")
    p.add_argument("--version", action="version", version=f"sprout-edge {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    build_parser().print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
