"""Compaction of bytewax's recovery store (flows.compact): bytewax keeps every
discarded key's deletion row for ever; dropping them must not change what a resume loads."""

from __future__ import annotations

import sqlite3
from datetime import timedelta

import bytewax.operators as op
from bytewax._bytewax import init_db_dir
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig
from bytewax.testing import TestingSink, TestingSource, run_main

from flows.compact import compact_recovery

KEYS = 300


def _items(abort: bool) -> list:
    """Count each key, delete two thirds of them, (crash,) then read every key's count."""
    items = [(f"k{i}", "add") for i in range(KEYS)] * 2
    items += [(f"k{i}", "del") for i in range(0, KEYS, 3)] + [(f"k{i}", "del")
                                                              for i in range(1, KEYS, 3)]
    return items + [TestingSource.ABORT()] * abort + [(f"k{i}", "read") for i in range(KEYS)]


def _step(count: int | None, action: str) -> tuple:
    if action == "del":
        return None, None  # discard the key's state
    count = (count or 0) + (action == "add")
    return count, (count if action == "read" else None)


def _run(path, items: list, out: list) -> None:
    flow = Dataflow("t")
    counted = op.stateful_map("count", op.input("in", flow, TestingSource(items, 10)), _step)
    op.output("out", op.filter_map("reads", counted, lambda kv: kv if kv[1] else None),
              TestingSink(out))
    run_main(flow, epoch_interval=timedelta(0), recovery_config=RecoveryConfig(str(path)))


def _loaded(db) -> list:
    """What a resume loads (bytewax's own query): each key's newest row, if not a deletion."""
    return db.execute("""SELECT step_id, state_key, ser_change FROM snaps AS s
        WHERE snap_epoch = (SELECT MAX(snap_epoch) FROM snaps AS o WHERE o.step_id = s.step_id
                            AND o.state_key = s.state_key) AND ser_change IS NOT NULL
        ORDER BY step_id, state_key""").fetchall()


def test_compaction_drops_deletion_rows_and_a_resume_loads_the_same_state(tmp_path):
    want: list = []
    (tmp_path / "plain").mkdir()
    init_db_dir(tmp_path / "plain", 1)
    _run(tmp_path / "plain", _items(abort=False), want)

    path, out, items = tmp_path / "crashed", [], _items(abort=True)
    path.mkdir()
    init_db_dir(path, 1)
    _run(path, items, out)  # stops at the ABORT as if killed, after some epochs
    assert out == []
    db = sqlite3.connect(path / "part-0.sqlite3")
    deletions = "SELECT COUNT(*) FROM snaps WHERE step_id LIKE 't.count%' AND ser_change IS NULL"
    before = _loaded(db)
    assert db.execute(deletions).fetchone()[0] == 2 * KEYS // 3

    assert compact_recovery(path) == 2 * KEYS // 3
    assert db.execute(deletions).fetchone()[0] == 0
    assert _loaded(db) == before
    db.close()

    _run(path, items, out)  # resumed past the abort: the live keys' counts came back
    assert sorted(out) == sorted(want) and len(want) == KEYS // 3
    assert all(n == 2 for _, n in want)
