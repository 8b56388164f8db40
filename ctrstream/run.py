"""`ctrstream run FLOW`: run a dataflow with bytewax recovery, on one or several processes.

Several processes (``-p N``) are started and supervised together. bytewax cannot carry on
without one of its processes, so when a child fails the others are stopped too; with
``--restart`` the whole set is then started again from recovery state (backing off from 1 s to
30 s while it keeps failing), otherwise the failure's exit code is passed on.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import time

from flows.config import Config
from flows.run import FLOWS, recovery_config, run_flow

log = logging.getLogger(__name__)


def _run_set(args: argparse.Namespace) -> int:
    """Start ``args.processes`` processes of the flow and wait: 0 when all end well, else the
    first failure's exit code, once the others are stopped."""
    from ctrstream.stack import free_port

    addresses = [f"127.0.0.1:{free_port()}" for _ in range(args.processes)]
    base = [sys.executable, "-m", "ctrstream.cli"]
    base += ["--config", args.config] if args.config else []
    base += ["run", args.flow, "--snapshot-interval", str(args.snapshot_interval),
             "--addresses", ";".join(addresses)]
    base += ["--until-eof"] * args.until_eof + ["--no-recovery"] * (not args.recovery)
    children = [subprocess.Popen(base + ["--process-id", str(i)]) for i in range(args.processes)]
    log.info("started %d processes of %s: pids %s", len(children), args.flow,
             [c.pid for c in children])
    failed = 0
    try:
        while not failed:
            codes = [c.poll() for c in children]
            if all(c == 0 for c in codes):
                return 0
            failed = next((c for c in codes if c not in (None, 0)), 0)
            time.sleep(0.2)
        log.error("a %s process exited with %s: stopping the others", args.flow, failed)
    finally:
        for c in children:
            if c.poll() is None:
                c.send_signal(signal.SIGINT)
        for c in children:
            try:
                c.wait(10)
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait()
    return failed


def _supervise(args: argparse.Namespace, cfg: Config) -> int:
    if args.recovery:  # once, here: the children would race to create it
        recovery_config(cfg, args.flow, args.processes)
    # SIGTERM (docker stop, kubectl delete) stops the children like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    backoff = 1.0
    while True:
        started = time.monotonic()
        code = _run_set(args)
        if code == 0 or not args.restart:
            return code
        if time.monotonic() - started > 60:  # it ran a while: a new failure, not a crash loop
            backoff = 1.0
        log.warning("restarting all %d processes of %s from recovery state in %.0f s",
                    args.processes, args.flow, backoff)
        time.sleep(backoff)
        backoff = min(backoff * 2, 30.0)


def _cmd(args: argparse.Namespace, cfg: Config) -> int:
    if args.processes > 1:
        return _supervise(args, cfg)
    addresses = args.addresses.split(";") if args.addresses else None
    run_flow(cfg, args.flow, until_eof=args.until_eof,
             recovery=args.recovery, snapshot_interval_s=args.snapshot_interval,
             process_id=args.process_id, addresses=addresses)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a dataflow (join or learn)",
                       description="Run a dataflow with bytewax recovery in cfg.recovery_dir.")
    p.add_argument("flow", choices=sorted(FLOWS))
    p.add_argument("--until-eof", action="store_true",
                   help="stop at the end of the input topics (closing every open window)")
    p.add_argument("-p", "--processes", type=int, default=1,
                   help="start and supervise this many local processes")
    p.add_argument("--restart", action="store_true",
                   help="with -p: when a process fails, restart the whole set from recovery "
                        "state (backing off from 1 s to 30 s) instead of exiting")
    p.add_argument("--process-id", type=int, help="this process's index (multi-machine runs)")
    p.add_argument("--addresses", help="';'-separated host:port of every process")
    p.add_argument("--snapshot-interval", type=float, default=5.0, metavar="SECONDS",
                   help="epoch length: how often state is snapshotted (default 5)")
    p.add_argument("--no-recovery", dest="recovery", action="store_false",
                   help="run without recovery state")
    p.set_defaults(func=_cmd)
