"""`ctrstream run FLOW`: run a dataflow with bytewax recovery, on one or several processes.

Several processes (``-p N``) are started and supervised together: bytewax brings a cluster
down when one process dies, so if any child exits the others are stopped and the exit code is
passed on (restart the set from recovery state).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from bytewax._bytewax import cli_main, init_db_dir
from bytewax.recovery import RecoveryConfig

from flows import metrics
from flows.config import Config

log = logging.getLogger(__name__)

FLOWS = {"join": "flows.join", "learn": "flows.learn"}


def recovery_config(cfg: Config, flow: str, partitions: int) -> RecoveryConfig:
    path = Path(cfg.recovery_dir) / flow
    if not path.exists():
        path.mkdir(parents=True)
        init_db_dir(path, partitions)
    return RecoveryConfig(str(path), backup_interval=timedelta(0))


def run_flow(cfg: Config, name: str, *, until_eof: bool = False,
             recovery: bool = True, snapshot_interval_s: float = 5.0, process_id: int | None = None,
             addresses: list[str] | None = None) -> None:
    """Run one process of flow ``name`` in this process (blocks until the flow ends)."""
    flow = importlib.import_module(FLOWS[name]).build(cfg, until_eof=until_eof)
    metrics.serve(cfg, name, process_id or 0)  # here: the only place that knows process_id
    n_proc = len(addresses) if addresses else 1
    cli_main(flow, workers_per_process=1, process_id=process_id, addresses=addresses,
             epoch_interval=timedelta(seconds=snapshot_interval_s),
             recovery_config=recovery_config(cfg, name, n_proc) if recovery else None)


def _supervise(args: argparse.Namespace, cfg: Config) -> int:
    from flows.stack import free_port

    addresses = [f"127.0.0.1:{free_port()}" for _ in range(args.processes)]
    base = [sys.executable, "-m", "flows.cli"] + (["--config", args.config] if args.config else [])
    base += ["run", args.flow, "--snapshot-interval", str(args.snapshot_interval),
             "--addresses", ";".join(addresses)]
    base += ["--until-eof"] * args.until_eof + ["--no-recovery"] * (not args.recovery)
    children = [subprocess.Popen(base + ["--process-id", str(i)]) for i in range(args.processes)]
    log.info("started %d processes of %s: pids %s", len(children), args.flow,
             [c.pid for c in children])
    try:
        while True:
            codes = [c.poll() for c in children]
            if all(c is not None for c in codes):
                return max(codes)
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                log.error("a %s process exited with %s: stopping the others", args.flow, failed[0])
                break
            time.sleep(0.2)
    finally:
        for c in children:
            if c.poll() is None:
                c.send_signal(signal.SIGINT)
        for c in children:
            try:
                c.wait(10)
            except subprocess.TimeoutExpired:
                c.kill()
    return failed[0]


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
    p.add_argument("--process-id", type=int, help="this process's index (multi-machine runs)")
    p.add_argument("--addresses", help="';'-separated host:port of every process")
    p.add_argument("--snapshot-interval", type=float, default=5.0, metavar="SECONDS",
                   help="epoch length: how often state is snapshotted (default 5)")
    p.add_argument("--no-recovery", dest="recovery", action="store_false",
                   help="run without recovery state")
    p.set_defaults(func=_cmd)
