"""`ctrstream run FLOW`: run a dataflow with bytewax recovery, on one or several processes.

Several processes (``-p N``) are started and supervised together. bytewax cannot carry on
without one of its processes, so when a child fails the others are stopped too; with
``--restart`` the whole set is then started again from recovery state (backing off from 1 s to
30 s while it keeps failing), otherwise the failure's exit code is passed on.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

from bytewax._bytewax import cli_main, init_db_dir
from bytewax.recovery import RecoveryConfig

from flows import metrics
from flows.config import Config

log = logging.getLogger(__name__)

FLOWS = {"join": "flows.join", "learn": "flows.learn"}
COMPACT_EVERY_EPOCHS = 6  # the recovery store is compacted this often (flows.compact)
# Python's default (700, 10, 10) promotes anything that outlives a few thousand allocations;
# a flow's items live a little longer than that (waiting in a batch, a heap, the Redis
# writer), so they piled into the old generation and set off full collections of the whole
# heap (a million objects here): 15 % of the join flow's samples under steady load (py-spy).
GC_THRESHOLDS = (100_000, 50, 100)


def _compact_forever(path: Path, every_s: float) -> None:
    """Runs flows.compact on ``path`` every ``every_s``. In a child process: this process's
    bytewax has its own copy of SQLite, and two copies in one process break each other's
    file locks (a test run here corrupted the store that way)."""
    while True:
        time.sleep(every_s)
        try:
            subprocess.run([sys.executable, "-m", "flows.compact", str(path)],
                           capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError) as e:  # the rows wait for next time
            log.warning("could not compact the recovery store %s: %s", path,
                        (getattr(e, "stderr", None) or str(e)).strip().splitlines()[-1])


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
    gc.set_threshold(*GC_THRESHOLDS)
    if recovery:
        threading.Thread(target=_compact_forever, name="compact-recovery", daemon=True,
                         args=(Path(cfg.recovery_dir) / name,
                               COMPACT_EVERY_EPOCHS * snapshot_interval_s)).start()
    cli_main(flow, workers_per_process=1, process_id=process_id, addresses=addresses,
             epoch_interval=timedelta(seconds=snapshot_interval_s),
             recovery_config=recovery_config(cfg, name, n_proc) if recovery else None)


def _run_set(args: argparse.Namespace) -> int:
    """Start ``args.processes`` processes of the flow and wait: 0 when all end well, else the
    first failure's exit code, once the others are stopped."""
    from flows.stack import free_port

    addresses = [f"127.0.0.1:{free_port()}" for _ in range(args.processes)]
    base = [sys.executable, "-m", "flows.cli"] + (["--config", args.config] if args.config else [])
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
