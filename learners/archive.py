"""ExampleArchive: the labeled examples of each day in Parquet, the daily retrain's input.

Layout under ``root``, by the event date (UTC) of the impression's ``ts``::

    date=2023-11-14/part-<time_ns>-<rand>.parquet         examples, one file per append
    date=2023-11-14/corrections-<time_ns>-<rand>.parquet  late click corrections

Guarantees, and how:

* Crash safety: every file is written under a ``.tmp-`` name, fsynced, then renamed into
  place (atomic on one filesystem). Readers list ``part-*``/``corrections-*`` only, so a file
  torn by a crash is never read; a leftover temp file is only ignored (another writer may still
  be writing it).
* Each impression_id once: the writer keeps the ids of the days it appends to (rebuilt from
  that day's files when first touched; the ``max_open_days`` most recently used days stay in
  memory) and writes only unseen ids, so a replay after a crash writes nothing twice. ``read_day``
  also keeps only the first stored row of an id, which covers what the writer cannot see: a
  second writer process on the same root, or a crash in the middle of ``compact``.
* Corrections: a ``late_click`` record goes to the day of its impression (its ``ts`` as the
  joiner writes it; else the day the archive holds the id in; else the day of the click).
  ``read_day`` applies those of that day and the next, so a late click filed by its click
  time is found as long as it came within a day of the impression (the late-click horizon
  is an hour by default). A corrected negative becomes label 1 with the click's time, and
  ``late_click`` true; an example that was already positive keeps its in-window click.

Columns: impression_id, ts, user_id, item_id, features and counts (JSON text), label,
click_ts, window_ms, sample_rate, quarantined, ``extra``: every other field of the example as
JSON text (null if none), so nothing the joiner adds is lost, and ``p_ftrl``, ``p_bopr``,
``p_emb``: the online models' progressive predictions (the example's ``online_p``, made
before the online models learned it; null when absent), which the daily retrain compares
itself with. Files written before those three columns existed read the same: the columns
come from the ``online_p`` in their ``extra`` (where the first files with predictions kept
it), else null.

>>> import tempfile
>>> a = ExampleArchive(tempfile.mkdtemp())
>>> ex = {"impression_id": "a1", "ts": 1_700_000_000_000, "user_id": "u1", "item_id": "i1",
...       "features": {"position": 2}, "kind": "example", "label": 0}
>>> a.append([ex, ex])["written"], a.append([ex])["duplicates"]
(1, 1)
>>> a.append_corrections([{"kind": "late_click", "impression_id": "a1",
...                        "click_ts": 1_700_000_999_000}])["written"]
1
>>> a.days(), a.read_day("2023-11-14")["label"].to_pylist()
(['2023-11-14'], [1])
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
_EPOCH = dt.date(1970, 1, 1)
PART, CORRECTIONS, TMP = "part-", "corrections-", ".tmp-"

SCHEMA = pa.schema([
    ("impression_id", pa.string()), ("ts", pa.int64()), ("user_id", pa.string()),
    ("item_id", pa.string()), ("features", pa.string()), ("counts", pa.string()),
    ("label", pa.int8()), ("click_ts", pa.int64()), ("window_ms", pa.int64()),
    ("sample_rate", pa.float64()), ("quarantined", pa.bool_()), ("extra", pa.string()),
    ("p_ftrl", pa.float64()), ("p_bopr", pa.float64()), ("p_emb", pa.float64()),
])
# The online models' predictions: column -> key of an example's ``online_p``.
ONLINE_P = {"p_ftrl": "ftrl", "p_bopr": "bopr", "p_emb": "emb"}
CORRECTION_SCHEMA = pa.schema([("impression_id", pa.string()), ("click_ts", pa.int64()),
                               ("ts", pa.int64())])
_KNOWN = {"impression_id", "ts", "user_id", "item_id", "features", "counts", "label",
          "click_ts", "window_ms", "sample_rate", "quarantined", "kind", "online_p"}


def day_of(ts_ms: int) -> str:
    """UTC date of an event time in ms, 'YYYY-MM-DD' (floor division: exact, no float)."""
    return (_EPOCH + dt.timedelta(days=ts_ms // DAY_MS)).isoformat()


def _day_str(day: str | dt.date) -> str:
    return day.isoformat() if isinstance(day, dt.date) else dt.date.fromisoformat(day).isoformat()


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _json(v: Any) -> str | None:
    return None if v is None else orjson.dumps(v).decode()


def _float(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _conform(t: pa.Table) -> pa.Table:
    """A part file as of ``SCHEMA``: columns a file written by an older version lacks are
    added as nulls (so that old and new files concatenate), except the online predictions,
    which the first files that had them kept in ``extra`` as ``online_p``."""
    if t.schema.names == SCHEMA.names:
        return t
    cols = {f.name: t[f.name] for f in SCHEMA if f.name in t.schema.names}
    if not set(ONLINE_P) & set(cols) and "extra" in cols:
        online = [p if isinstance(p := orjson.loads(x).get("online_p") if x else None, dict)
                  else {} for x in cols["extra"].to_pylist()]
        for col, key in ONLINE_P.items():
            cols[col] = pa.array([_float(p.get(key)) for p in online], pa.float64())
    return pa.table([cols[f.name] if f.name in cols else pa.nulls(t.num_rows, f.type)
                     for f in SCHEMA], schema=SCHEMA)


class ExampleArchive:
    """Daily Parquet partitions of examples, each impression_id once; see the module doc."""

    def __init__(self, root: str | os.PathLike, fsync: bool = True,
                 max_open_days: int = 3) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.max_open_days = max(1, max_open_days)
        self._ids: OrderedDict[str, set[str]] = OrderedDict()  # LRU of days' written ids
        self.skipped_files: list[str] = []  # unreadable files met by a read (logged too)

    # -- writing ----------------------------------------------------------------------------

    def append(self, examples: Iterable[Mapping]) -> dict[str, int]:
        """Archive examples not archived yet; ``late_click`` records go to
        ``append_corrections``. Returns counts: written, duplicates, invalid (no string
        impression_id or integer ts), corrections."""
        by_day: dict[str, dict[str, Mapping]] = {}
        corrections, invalid, valid = [], 0, 0
        for e in examples:
            if e.get("kind") == "late_click":
                corrections.append(e)
                continue
            iid, ts = e.get("impression_id"), _int(e.get("ts"))
            if not isinstance(iid, str) or ts is None:
                invalid += 1
                continue
            valid += 1
            by_day.setdefault(day_of(ts), {}).setdefault(iid, e)  # first of a batch wins
        written = 0
        for day, batch in sorted(by_day.items()):
            seen = self._day_ids(day)
            rows = [e for iid, e in batch.items() if iid not in seen]
            if rows:
                self._write(day, PART, self._table(rows))
                # Only after the rename: a failed write leaves the ids free to be retried.
                seen.update(e["impression_id"] for e in rows)
                written += len(rows)
        out = {"written": written, "duplicates": valid - written, "invalid": invalid,
               "corrections": 0}
        if corrections:
            c = self.append_corrections(corrections)
            out["corrections"], out["invalid"] = c["written"], invalid + c["invalid"]
        return out

    def append_corrections(self, records: Iterable[Mapping]) -> dict[str, int]:
        """Store late click corrections (``impression_id``, ``click_ts``, optional ``ts``), by
        the impression's day when known. Appending one twice is harmless: the earliest click
        of an id is applied. Returns counts: written, invalid."""
        by_day: dict[str, list[tuple[str, int, int | None]]] = {}
        invalid = 0
        for r in records:
            iid, click_ts, ts = r.get("impression_id"), _int(r.get("click_ts")), _int(r.get("ts"))
            if not isinstance(iid, str) or click_ts is None:
                invalid += 1
                continue
            day = day_of(ts) if ts is not None else self._open_day_of(iid) or day_of(click_ts)
            by_day.setdefault(day, []).append((iid, click_ts, ts))
        for day, rows in sorted(by_day.items()):
            ids, clicks, tss = zip(*rows, strict=True)
            self._write(day, CORRECTIONS, pa.table(
                [pa.array(ids, pa.string()), pa.array(clicks, pa.int64()),
                 pa.array(tss, pa.int64())], schema=CORRECTION_SCHEMA))
        return {"written": sum(len(r) for r in by_day.values()), "invalid": invalid}

    def _open_day_of(self, iid: str) -> str | None:
        return next((day for day, ids in self._ids.items() if iid in ids), None)

    @staticmethod
    def _table(rows: list[Mapping]) -> pa.Table:
        def col(name: str) -> list:
            return [e.get(name) for e in rows]

        def extra(e: Mapping) -> str | None:
            rest = {k: v for k, v in e.items() if k not in _KNOWN}
            return _json(rest) if rest else None

        def online(key: str) -> list[float | None]:
            return [_float(p.get(key)) if isinstance(p := e.get("online_p"), Mapping) else None
                    for e in rows]

        return pa.table([
            col("impression_id"), col("ts"),
            [None if (v := e.get("user_id")) is None else str(v) for e in rows],
            [None if (v := e.get("item_id")) is None else str(v) for e in rows],
            [_json(e.get("features")) for e in rows], [_json(e.get("counts")) for e in rows],
            [None if (v := e.get("label")) is None else int(bool(v)) for e in rows],
            [_int(e.get("click_ts")) for e in rows], [_int(e.get("window_ms")) for e in rows],
            [float(v) if isinstance(v, int | float) else None for v in col("sample_rate")],
            [bool(e.get("quarantined")) for e in rows], [extra(e) for e in rows],
            *(online(key) for key in ONLINE_P.values()),
        ], schema=SCHEMA)

    def _write(self, day: str, prefix: str, table: pa.Table) -> Path:
        d = self.root / f"date={day}"
        d.mkdir(exist_ok=True)
        # time_ns first: names sort in write order, which read_day's keep-first relies on.
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp, final = d / f"{TMP}{prefix}{name}", d / f"{prefix}{name}"
        pq.write_table(table, tmp)
        if self.fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, final)
        if self.fsync:
            fd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return final

    def _day_ids(self, day: str) -> set[str]:
        ids = self._ids.get(day)
        if ids is None:
            ids = set()
            for t in self._read_files(day, PART, ["impression_id"]):
                ids.update(t.column(0).to_pylist())
            self._ids[day] = ids
            while len(self._ids) > self.max_open_days:
                self._ids.popitem(last=False)
        self._ids.move_to_end(day)
        return ids

    # -- reading ----------------------------------------------------------------------------

    def days(self) -> list[str]:
        """Dates holding examples, sorted."""
        return sorted(p.name.removeprefix("date=") for p in self.root.glob("date=*")
                      if any(p.glob(f"{PART}*.parquet")))

    def _files(self, day: str, prefix: str) -> list[Path]:
        return sorted((self.root / f"date={day}").glob(f"{prefix}*.parquet"))

    def _read_files(self, day: str, prefix: str, columns: list[str] | None = None
                    ) -> list[pa.Table]:
        out = []
        for p in self._files(day, prefix):
            try:
                out.append(pq.read_table(p, columns=columns))
            except (OSError, pa.ArrowInvalid) as exc:  # not ours to fix, never silent
                log.warning("archive: skipping unreadable %s: %s", p, exc)
                self.skipped_files.append(str(p))
        return out

    def read_day(self, day: str | dt.date, corrected: bool = True) -> pa.Table:
        """The day's examples in write order, each impression_id once (its first stored
        row); with ``corrected``, late clicks applied and a ``late_click`` column added."""
        day = _day_str(day)
        parts = [_conform(p) for p in self._read_files(day, PART)]
        t = pa.concat_tables(parts) if parts else SCHEMA.empty_table()
        if t.num_rows and pc.count_distinct(t["impression_id"]).as_py() < t.num_rows:
            keyed = pa.table({"id": t["impression_id"], "i": np.arange(t.num_rows)})
            first = keyed.group_by("id", use_threads=False).aggregate([("i", "min")])
            t = t.take(np.sort(first["i_min"].to_numpy()))
        return self._apply_corrections(day, t) if corrected else t

    def _apply_corrections(self, day: str, t: pa.Table) -> pa.Table:
        nxt = (dt.date.fromisoformat(day) + dt.timedelta(days=1)).isoformat()
        corr = self._read_files(day, CORRECTIONS) + self._read_files(nxt, CORRECTIONS)
        late = pa.array([False] * t.num_rows, pa.bool_())
        if corr and t.num_rows:
            c = pa.concat_tables(corr)
            c = c.filter(pc.is_in(c["impression_id"], value_set=t["impression_id"]))
            if c.num_rows:
                first = c.group_by("impression_id", use_threads=False).aggregate(
                    [("click_ts", "min")])
                pos = pc.index_in(t["impression_id"], value_set=first["impression_id"])
                late = pc.and_(pc.is_valid(pos), pc.equal(t["label"], 0)).combine_chunks()
                clicks = pc.take(first["click_ts_min"], pos)
                t = t.set_column(t.schema.get_field_index("label"), "label",
                                 pc.if_else(late, pa.scalar(1, pa.int8()), t["label"]))
                t = t.set_column(t.schema.get_field_index("click_ts"), "click_ts",
                                 pc.if_else(late, clicks, t["click_ts"]))
        return t.append_column("late_click", late)

    def read_since(self, ts_ms: int) -> pa.Table:
        """The examples with ``ts >= ts_ms`` (every day from ``day_of(ts_ms)`` on), as stored:
        labels as learned online, no corrections, in event-time order (ties in write
        order). What an online trainer learned after a day boundary, for it to replay."""
        first = day_of(ts_ms)
        parts = [self.read_day(d, corrected=False) for d in self.days() if d >= first]
        t = pa.concat_tables(parts) if parts else SCHEMA.empty_table()
        t = t.filter(pc.greater_equal(t["ts"], ts_ms))
        return t.take(np.argsort(t["ts"].to_numpy(zero_copy_only=False), kind="stable"))

    def read_examples(self, day: str | dt.date) -> list[dict]:
        """``read_day`` as example dicts (see `to_examples`), ready for
        ``EmbeddingLearner.train_epoch``."""
        return to_examples(self.read_day(day))

    # -- maintenance --------------------------------------------------------------------------

    def compact(self, day: str | dt.date) -> dict[str, int]:
        """Rewrite a day's parts (deduplicated) as one part and its corrections as one file.
        The new files are in place before the old ones go, so a crash in between leaves
        duplicates that ``read_day`` drops, never a gap."""
        day = _day_str(day)
        old_parts, old_corr = self._files(day, PART), self._files(day, CORRECTIONS)
        skipped = len(self.skipped_files)
        t = self.read_day(day, corrected=False)
        corr = self._read_files(day, CORRECTIONS)
        keep = set(self.skipped_files[skipped:])  # unreadable: left for a person to look at
        if len(old_parts) > 1:
            self._write(day, PART, t)
            for p in old_parts:
                if str(p) not in keep:
                    p.unlink()
        if len(old_corr) > 1:
            self._write(day, CORRECTIONS, pa.concat_tables(corr))
            for p in old_corr:
                if str(p) not in keep:
                    p.unlink()
        return {"rows": t.num_rows, "parts_before": len(old_parts),
                "corrections_before": len(old_corr)}


def to_examples(table: pa.Table) -> list[dict]:
    """Rows of an archive table (``read_day``, or rows taken from it) as example dicts:
    features and counts decoded (no key when null: the example had none, and the learnable
    rule takes a null for a malformed value), extra fields back at the top level, the online
    predictions as ``online_p`` (only the models that have one; no key when none has)."""
    out = []
    for r in table.to_pylist():
        extra = r.pop("extra", None)
        for k in ("features", "counts"):
            if r[k] is None:
                del r[k]
            else:
                r[k] = orjson.loads(r[k])
        if r["sample_rate"] is None:
            del r["sample_rate"]
        online = {key: v for col, key in ONLINE_P.items()
                  if (v := r.pop(col, None)) is not None}
        if online:
            r["online_p"] = online
        r["kind"] = "example"
        if extra:
            for k, v in orjson.loads(extra).items():
                r.setdefault(k, v)
        out.append(r)
    return out
