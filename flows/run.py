"""Run one process of a dataflow with bytewax recovery (`ctrstream run`, in ctrstream/run.py,
starts and supervises the processes)."""

from __future__ import annotations

import gc
import importlib
import logging
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

# Imported when run: the learn flow imports torch (~3 s of CPU), which the join never needs.
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
