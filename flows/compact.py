"""Compaction of bytewax's recovery store, run by `ctrstream run` in a child process every 6
epochs, 30 s by default (`python -m flows.compact DIR`).

bytewax 0.21's garbage collection keeps every state key's newest snapshot, also when that is
the key's deletion: a step keyed by impression id (the join's attach_counts) leaves one row per
impression for ever, and the GC query, which scans them all at every epoch, slows the flow down
without bound (measured: 408,527 such rows after about 400k impressions, and SQLite up to 45 %
of the join flow's samples). A deletion older than its partition's committed epoch, with no
older row of its key, is safe to drop: every resume loads at or after the committed epoch,
and loads the key as absent either way.

Only stdlib here: it must not run inside a bytewax process (see flows.run._compact_forever).
"""

from __future__ import annotations

import sqlite3
import sys
from contextlib import closing
from pathlib import Path

_COMPACT = """DELETE FROM snaps WHERE ser_change IS NULL
    AND snap_epoch < (SELECT MIN(commit_epoch) FROM commits)
    AND NOT EXISTS (SELECT 1 FROM snaps AS o WHERE o.step_id = snaps.step_id
                    AND o.state_key = snaps.state_key AND o.snap_epoch < snaps.snap_epoch)"""


def compact_recovery(path: str | Path) -> int:
    """Drop the deletion rows bytewax's GC keeps from every store in ``path``; how many."""
    n = 0
    for db in sorted(Path(path).glob("*.sqlite3")):
        with closing(sqlite3.connect(db, timeout=30)) as conn, conn:
            n += conn.execute(_COMPACT).rowcount
    return n


if __name__ == "__main__":
    print(compact_recovery(sys.argv[1]))
