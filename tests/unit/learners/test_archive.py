"""ExampleArchive: each impression_id once under replay and crashes, corrections, torn files,
UTC day partitions."""

from __future__ import annotations

import datetime as dt
import tempfile

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from learners.archive import SCHEMA, ExampleArchive, day_of

DAY = 86_400_000
MIDNIGHT = 1_700_006_400_000  # 2023-11-15T00:00:00Z


def ex(k: int, ts: int = MIDNIGHT + 3_600_000, label: int = 0, **extra) -> dict:
    return {"impression_id": f"imp{k}", "ts": ts, "user_id": f"u{k % 7}", "item_id": f"i{k % 5}",
            "features": {"category": "c3", "device": "mobile", "position": k % 4, "hour": 1},
            "kind": "example", "label": label, "click_ts": ts + 5_000 if label else None,
            "delay_ms": 5_000 if label else None, "window_ms": 900_000,
            "counts": {"user": {"imp_5m": k, "clk_5m": 0}}, **extra}


def ids(table: pa.Table) -> list[str]:
    return table["impression_id"].to_pylist()


def test_appending_the_same_batch_twice_keeps_each_id_once(tmp_path):
    a = ExampleArchive(tmp_path, fsync=False)
    batch = [ex(k) for k in range(50)]
    assert a.append(batch) == {"written": 50, "duplicates": 0, "invalid": 0, "corrections": 0}
    assert a.append(batch)["duplicates"] == 50
    assert a.append(batch + batch[:3])["written"] == 0  # in-batch repeats too
    t = a.read_day("2023-11-15")
    assert ids(t) == [f"imp{k}" for k in range(50)] and t.schema.names[:-1] == SCHEMA.names
    assert len(list((tmp_path / "date=2023-11-15").glob("part-*.parquet"))) == 1


def test_overlapping_replay_after_a_crash_keeps_each_id_once(tmp_path):
    a = ExampleArchive(tmp_path, fsync=False)
    a.append([ex(k) for k in range(0, 60)])
    # Crash: the process dies with its in-memory id sets; a new one replays from an older
    # offset, overlapping what was written, with re-emitted values that differ.
    b = ExampleArchive(tmp_path, fsync=False)
    out = b.append([ex(k, label=1) for k in range(40, 100)])
    assert (out["written"], out["duplicates"]) == (40, 20)
    t = b.read_day(dt.date(2023, 11, 15))
    assert sorted(ids(t)) == sorted(f"imp{k}" for k in range(100)) and t.num_rows == 100
    assert t.filter(pc.equal(t["impression_id"], "imp45"))["label"].to_pylist() == [0]


def test_read_day_keeps_the_first_row_of_ids_the_writer_could_not_see(tmp_path):
    # Two writers on one root (or a crash inside compact): duplicates on disk, none read.
    a, b = ExampleArchive(tmp_path, fsync=False), ExampleArchive(tmp_path, fsync=False)
    a._day_ids("2023-11-15"), b._day_ids("2023-11-15")  # both loaded before either wrote
    a.append([ex(k) for k in range(10)])
    b.append([ex(k, label=1) for k in range(5, 15)])
    t = ExampleArchive(tmp_path).read_day("2023-11-15")
    assert ids(t) == [f"imp{k}" for k in range(15)]
    assert t["label"].to_pylist() == [0] * 10 + [1] * 5  # first stored row wins
    c = ExampleArchive(tmp_path, fsync=False)
    assert c.compact("2023-11-15")["parts_before"] == 2
    assert ids(c.read_day("2023-11-15")) == ids(t)
    assert len(list((tmp_path / "date=2023-11-15").glob("part-*.parquet"))) == 1


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(0, 30), max_size=12), max_size=6),
       st.integers(0, 5))
def test_any_replay_pattern_reads_each_id_once(batches, crash_after):
    with tempfile.TemporaryDirectory() as root:
        a = ExampleArchive(root, fsync=False)
        for i, batch in enumerate(batches):
            if i == crash_after:
                a = ExampleArchive(root, fsync=False)  # restart: sets rebuilt from files
            a.append([ex(k, ts=MIDNIGHT + k * 10_000_000) for k in batch])
        want = {f"imp{k}" for b in batches for k in b}
        got = [i for d in a.days() for i in ids(a.read_day(d))]
        assert sorted(got) == sorted(want)


def test_late_click_corrections_turn_negatives_positive(tmp_path):
    a = ExampleArchive(tmp_path, fsync=False)
    a.append([ex(0), ex(1), ex(2, label=1), ex(3)])
    ts0 = MIDNIGHT + 3_600_000
    out = a.append_corrections([
        {"kind": "late_click", "impression_id": "imp0", "ts": ts0, "click_ts": ts0 + 2_000_000},
        {"kind": "late_click", "impression_id": "imp0", "ts": ts0, "click_ts": ts0 + 1_000_000},
        {"kind": "late_click", "impression_id": "imp2", "ts": ts0, "click_ts": ts0 + 3_000_000},
        {"kind": "late_click", "impression_id": "nobody", "click_ts": ts0},
        {"kind": "late_click", "impression_id": "imp1"},  # no click_ts: invalid
    ])
    assert out == {"written": 4, "invalid": 1}
    # Filed by the click's day (no ts, id not in a day this process holds): the next day.
    fresh = ExampleArchive(tmp_path, fsync=False)
    fresh.append([{"kind": "late_click", "impression_id": "imp3", "click_ts": MIDNIGHT + DAY}])
    assert (tmp_path / "date=2023-11-16").is_dir() and fresh.days() == ["2023-11-15"]
    t = fresh.read_day("2023-11-15")
    rows = {r["impression_id"]: r for r in t.to_pylist()}
    assert rows["imp0"]["label"] == 1 and rows["imp0"]["click_ts"] == ts0 + 1_000_000
    assert rows["imp0"]["late_click"] and rows["imp3"]["late_click"]
    assert rows["imp3"]["label"] == 1 and rows["imp3"]["click_ts"] == MIDNIGHT + DAY
    assert rows["imp1"]["label"] == 0 and not rows["imp1"]["late_click"]
    # Already positive: keeps its in-window click.
    assert rows["imp2"]["label"] == 1 and rows["imp2"]["click_ts"] == ts0 + 5_000
    assert not rows["imp2"]["late_click"]
    assert fresh.read_day("2023-11-15", corrected=False)["label"].to_pylist() == [0, 0, 1, 0]


def test_torn_and_temporary_files_are_not_read(tmp_path):
    a = ExampleArchive(tmp_path, fsync=False)
    a.append([ex(k) for k in range(5)])
    day_dir = tmp_path / "date=2023-11-15"
    good = next(day_dir.glob("part-*.parquet")).read_bytes()
    # A crash mid-write leaves a temp file, torn; a disk that lost a renamed file's tail
    # leaves a torn part.
    (day_dir / ".tmp-part-00000000000000000001-deadbeef.parquet").write_bytes(good[:50])
    (day_dir / "part-99999999999999999999-torn0000.parquet").write_bytes(good[:-30])
    b = ExampleArchive(tmp_path, fsync=False)
    assert ids(b.read_day("2023-11-15")) == [f"imp{k}" for k in range(5)]
    assert b.skipped_files == [str(day_dir / "part-99999999999999999999-torn0000.parquet")]
    assert b.append([ex(k) for k in range(7)])["written"] == 2
    assert b.read_day("2023-11-15").num_rows == 7
    # No temp file is left behind by normal writes.
    assert [p.name for p in day_dir.glob(".tmp-*")] == [
        ".tmp-part-00000000000000000001-deadbeef.parquet"]


def test_days_split_by_utc_date(tmp_path):
    a = ExampleArchive(tmp_path, fsync=False)
    a.append([ex(1, ts=MIDNIGHT - 1), ex(2, ts=MIDNIGHT), ex(3, ts=MIDNIGHT + DAY - 1),
              ex(4, ts=MIDNIGHT + DAY), {"impression_id": "bad", "ts": "soon"},
              {"ts": MIDNIGHT}])
    assert day_of(MIDNIGHT - 1) == "2023-11-14" and day_of(MIDNIGHT) == "2023-11-15"
    assert a.days() == ["2023-11-14", "2023-11-15", "2023-11-16"]
    assert ids(a.read_day("2023-11-14")) == ["imp1"]
    assert ids(a.read_day("2023-11-15")) == ["imp2", "imp3"]
    assert ids(a.read_day("2023-11-16")) == ["imp4"]
    assert a.read_day("2023-11-17").num_rows == 0


def test_read_examples_round_trips_the_fields_retraining_needs(tmp_path):
    a = ExampleArchive(tmp_path)  # with fsync, the default
    e = ex(1, sample_rate=0.25, closed_early=True, quarantined=True)
    a.append([e, ex(2)])
    got = a.read_examples("2023-11-15")
    for k in ("impression_id", "ts", "user_id", "item_id", "features", "counts", "label",
              "click_ts", "window_ms", "sample_rate", "closed_early", "delay_ms",
              "quarantined", "kind"):
        assert got[0][k] == e[k], k
    assert "sample_rate" not in got[1] and got[1]["quarantined"] is False
    t = pq.read_table(next((tmp_path / "date=2023-11-15").glob("part-*.parquet")))
    assert t.schema == SCHEMA


def test_online_predictions_are_columns_and_come_back_as_online_p(tmp_path):
    a = ExampleArchive(tmp_path, fsync=False)
    a.append([ex(1, online_p={"ftrl": 0.1, "bopr": 0.2, "emb": 0.3}), ex(2),
              ex(3, online_p={"ftrl": 0.5, "emb": "not a number"})])
    t = a.read_day("2023-11-15")
    assert t["p_ftrl"].to_pylist() == [0.1, None, 0.5]
    assert t["p_bopr"].to_pylist() == [0.2, None, None]
    assert t["p_emb"].to_pylist() == [0.3, None, None]
    assert t["extra"].to_pylist() == ['{"delay_ms":null}'] * 3  # not in extra any more
    got = a.read_examples("2023-11-15")
    assert got[0]["online_p"] == {"ftrl": 0.1, "bopr": 0.2, "emb": 0.3}
    assert "online_p" not in got[1] and got[2]["online_p"] == {"ftrl": 0.5}
    assert not {"p_ftrl", "p_bopr", "p_emb", "extra"} & set(got[0])


def test_files_without_the_prediction_columns_still_read(tmp_path):
    # A part written before the p_* columns existed (online_p then went to `extra`), beside
    # a part written now: the day reads as one table, old rows' predictions from `extra`.
    old_schema = pa.schema([f for f in SCHEMA if not f.name.startswith("p_")])
    rows = [ex(1, online_p={"ftrl": 0.1, "bopr": 0.2, "emb": 0.3}), ex(2)]
    old = ExampleArchive._table(rows).select(old_schema.names)
    old = old.set_column(old_schema.get_field_index("extra"), "extra", pa.array(
        ['{"delay_ms":null,"online_p":{"ftrl":0.1,"bopr":0.2,"emb":0.3}}', None]))
    day_dir = tmp_path / "date=2023-11-15"
    day_dir.mkdir()
    pq.write_table(old, day_dir / "part-00000000000000000001-0ld0ld00.parquet")
    a = ExampleArchive(tmp_path, fsync=False)
    assert a.append([ex(2), ex(3, online_p={"ftrl": 0.4, "bopr": 0.5, "emb": 0.6})]) == {
        "written": 1, "duplicates": 1, "invalid": 0, "corrections": 0}
    t = a.read_day("2023-11-15")
    assert ids(t) == ["imp1", "imp2", "imp3"] and t.schema.names[:-1] == SCHEMA.names
    assert t["p_ftrl"].to_pylist() == [0.1, None, 0.4]
    assert t["p_emb"].to_pylist() == [0.3, None, 0.6]
    got = a.read_examples("2023-11-15")
    assert [e.get("online_p") for e in got] == [
        {"ftrl": 0.1, "bopr": 0.2, "emb": 0.3}, None, {"ftrl": 0.4, "bopr": 0.5, "emb": 0.6}]
    assert a.compact("2023-11-15")["parts_before"] == 2
    (part,) = day_dir.glob("part-*.parquet")
    assert pq.read_table(part).schema == SCHEMA
    assert ExampleArchive(tmp_path).read_examples("2023-11-15") == got
