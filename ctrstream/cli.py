"""The `ctrstream` command. Each noun lives in its own module of this package, which exposes
``register(subparsers)``; the parser it adds sets ``func(args, cfg) -> int``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

import redis
from redis.exceptions import RedisClusterException

from features.store import redact_url
from flows.config import Config, load_config
from joiner.errors import CtrstreamError

# The modules that add subcommands (ctrstream.NAME, the command's name), in the order
# `--help` lists them.
COMMANDS = ["stack", "produce", "run", "features", "score", "serve", "doctor", "embeddings",
            "retrain", "report"]


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command; given ``argv`` naming one, of that one only: some
    modules import torch (~3 s of CPU), which most commands, the join flow's processes
    among them, never use."""
    named = [a for a in (argv or ()) if a in COMMANDS]
    modules = [importlib.import_module(f"ctrstream.{name}")
               for name in (named[:1] or COMMANDS)]
    parser = argparse.ArgumentParser(
        prog="ctrstream",
        description="Streaming features and online learning for CTR prediction.",
    )
    parser.add_argument("--config", metavar="FILE",
                        help="TOML config file (default: $CTRSTREAM_CONFIG or ./ctrstream.toml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in modules:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    cfg = None
    try:
        cfg = load_config(args.config)
        return int(args.func(args, cfg) or 0)
    except CtrstreamError as e:  # exit codes: joiner/errors.py
        print(f"ctrstream: {e}", file=sys.stderr)
        return e.exit_code
    except (redis.RedisError, RedisClusterException) as e:
        print(f"ctrstream: {redis_problem(cfg, e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def redis_problem(cfg: Config, e: Exception) -> str:
    """One line on a Redis error, with the URL's password hidden."""
    where = redact_url(cfg.redis.url)
    if isinstance(e, redis.ConnectionError | redis.TimeoutError | RedisClusterException):
        return f"cannot reach Redis at {where}: {e}"
    return f"Redis at {where}: {type(e).__name__}: {e}"


if __name__ == "__main__":
    sys.exit(main())
