"""The `ctrstream` command. Each noun lives in its own module of this package, which exposes
``register(subparsers)``; the parser it adds sets ``func(args, cfg) -> int``."""

from __future__ import annotations

import argparse
import logging
import sys

from ctrstream import (
    doctor,
    embeddings,
    features,
    produce,
    report,
    retrain,
    run,
    score,
    stack,
)
from flows.config import ConfigError, load_config

# The modules that add subcommands, in the order `--help` lists them.
COMMANDS = [stack, produce, run, features, score, doctor, embeddings, retrain, report]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctrstream",
        description="Streaming features and online learning for CTR prediction.",
    )
    parser.add_argument("--config", metavar="FILE",
                        help="TOML config file (default: $CTRSTREAM_CONFIG or ./ctrstream.toml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"ctrstream: config error: {e}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args, cfg) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
