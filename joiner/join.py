"""WaitWindowJoiner: labels impressions with the clicks that follow them within a wait window,
in event time, for one partition of the impression and click topics.

Semantics (DESIGN.md):

* The watermark is the minimum over the two streams of (highest event time - 1), so a
  lagging click stream delays expiry instead of turning real clicks into negatives. A stream
  quiet for ``idle_timeout_s`` of wall-clock time stops holding it back (quiet: read to its
  end, when the reader reports ``caught_up``; otherwise no arrival); when both are quiet it
  advances with the wall clock, so a quiet night does not freeze the output.
* An impression is emitted exactly once, when ``ts + window <= watermark`` (or early, flagged,
  when the queue is full). ``label`` is 1 iff a click with ``0 <= click_ts - ts <= window``
  was joined; a click before its impression's ts (clock skew) counts as delay 0.
* A click whose impression has not arrived is held until the watermark passes
  ``click_ts + early_click_hold_ms``, then it is an orphan. A click after the window is late and
  becomes a ``late_click`` correction record. Further clicks for the same impression are
  duplicates, as are repeated impressions.
* Conservation: every input event lands in exactly one counter (see ``Counters.reconcile``).

Crash recovery without snapshotting the buffer: ``snapshot()`` is a few offsets and small sets.
On restore, the caller replays impressions from ``replay_from()[0]`` and clicks from
``replay_from()[1]`` up to the snapshot's positions through ``rebuild_*``, which reconstructs
the queue without counting or emitting anything, then feeds live events as usual.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import asdict, dataclass

import orjson

from joiner.events import (
    BadEvent,
    Click,
    Impression,
    parse_click,
    parse_impression_payload,
)
from joiner.hashqueue import CLOSED_EARLY, LATE_SEEN, NO_CLICK, QUARANTINED, HashQueue
from joiner.health import JoinHealthMonitor

log = logging.getLogger(__name__)

IMPRESSIONS = "impressions"
CLICKS = "clicks"

# Output records are (kind, key, value) tuples.
EXAMPLE = "example"  # value: JSON bytes of the labeled example; key (id, ts) with signals on
LATE_CLICK = "late_click"  # value: JSON bytes of the correction record
DEAD_LETTER = "dead_letter"  # value: dict(stream, offset, reason, raw[:MAX_DEAD_RAW_BYTES])
SEEN = "seen"  # value: (Impression, its offset) (signal for real-time count features)
CLICKED = "clicked"  # value: (Impression, click_ts)

NO_KEY = object()  # on_impression/on_click called without the message's key: not checked
# A dead letter keeps at most this much of the raw message, so that its record still fits a
# Kafka message (1 MB by default) after JSON escaping (<= 6x) or base64 (4/3x).
MAX_DEAD_RAW_BYTES = 128 * 1024


@dataclass
class Counters:
    impressions_in: int = 0
    impressions_emitted: int = 0
    impressions_duplicate: int = 0
    impressions_dead: int = 0
    impressions_closed_early: int = 0  # part of impressions_emitted
    impressions_quarantined: int = 0  # part of impressions_emitted
    impressions_forgotten_early: int = 0  # closed ones dropped from memory because of capacity
    clicks_in: int = 0
    clicks_joined: int = 0
    clicks_duplicate: int = 0
    clicks_late: int = 0
    clicks_orphan: int = 0
    clicks_dead: int = 0
    clicks_held_evicted: int = 0  # part of clicks_orphan

    def reconcile(self, pending: int, held: int) -> list[str]:
        """Conservation check; returns the violated equations (empty when all hold)."""
        bad = []
        imp = self.impressions_emitted + self.impressions_duplicate + self.impressions_dead
        if self.impressions_in != imp + pending:
            bad.append(f"impressions_in {self.impressions_in} != emitted+duplicate+dead+pending"
                       f" {imp + pending}")
        clk = (self.clicks_joined + self.clicks_duplicate + self.clicks_late
               + self.clicks_orphan + self.clicks_dead)
        if self.clicks_in != clk + held:
            bad.append(f"clicks_in {self.clicks_in} != joined+duplicate+late+orphan+dead+held"
                       f" {clk + held}")
        return bad


class WaitWindowJoiner:
    """The online joiner of one partition. Events go in as raw bytes with their offsets;
    records come out in the ``out`` list passed to each call.

    >>> j = WaitWindowJoiner(window_ms=1000, idle_timeout_s=60)
    >>> out = []
    >>> j.on_impression(b'{"impression_id":"a","ts":5000,"user_id":"u","item_id":"i"}', 0, 0.0, out)
    >>> j.on_click(b'{"impression_id":"a","ts":5400}', 0, 0.0, out)
    >>> j.on_impression(b'{"impression_id":"b","ts":7000,"user_id":"u","item_id":"i"}', 1, 0.0, out)
    >>> j.advance(0.0, out)  # watermark = min(7000, 5400) - 1: nothing has closed yet
    >>> j.on_click(b'{"impression_id":"zz","ts":6500}', 1, 0.0, out); j.advance(0.0, out)
    >>> [(k, orjson.loads(v)["label"]) for k, _, v in out if k == EXAMPLE]
    [('example', 1)]
    """

    def __init__(self, window_ms: int, early_click_hold_ms: int = 300_000,
                 late_click_horizon_ms: int = 3_600_000, idle_timeout_s: float = 30.0,
                 capacity: int = 5_000_000, held_clicks_capacity: int = 100_000,
                 max_future_ms: int | None = None, max_past_ms: int | None = None,
                 health: JoinHealthMonitor | None = None, signals: bool = False,
                 idle_needs_caught_up: bool = False) -> None:
        self.window = window_ms
        self.hold = early_click_hold_ms
        self.horizon = max(late_click_horizon_ms, window_ms)
        self.idle_timeout = idle_timeout_s
        self.capacity = capacity
        self.held_capacity = held_clicks_capacity
        self.max_future = max_future_ms
        self.max_past = max_past_ms
        self.health = health or JoinHealthMonitor()
        self.signals = signals
        # A reader catching up on a backlog may not fetch one topic for a while; that stream
        # is behind, not idle. With this set, only caught_up() starts a stream's quiet time.
        self.idle_needs_caught_up = idle_needs_caught_up
        self.q = HashQueue()
        self.counters = Counters()
        # impression_id -> [(click_ts, offset), ...] for clicks that came before their impression
        self._held: dict[str, list[tuple[int, int]]] = {}
        self._held_n = 0
        self._held_fifo: deque[tuple[int, str]] = deque()  # (expiry event time, id)
        # Replay bookkeeping (see snapshot()).
        self._lowered: dict[int, int] = {}  # seq -> offset of a held click it joined
        self._skip_imp: set[int] = set()  # offsets of duplicate impressions
        self._skip_clk: set[int] = set()  # offsets of clicks that changed nothing
        self.next_offset = {IMPRESSIONS: 0, CLICKS: 0}
        self.max_ts = {IMPRESSIONS: 0, CLICKS: 0}
        self._quiet_since: dict[str, float | None] = {IMPRESSIONS: None, CLICKS: None}
        self._seen: set[str] = set()
        self._start_wall: float | None = None
        self.watermark = 0
        self._negative_suffix = b"," + orjson.dumps({
            "kind": EXAMPLE, "label": 0, "click_ts": None, "delay_ms": None,
            "window_ms": window_ms})[1:]

    # -- input -------------------------------------------------------------------------

    def _check_time(self, ts: int, wall_ms: int | None) -> None:
        if wall_ms is None:
            return
        if self.max_future is not None and ts > wall_ms + self.max_future:
            raise BadEvent(f"ts {ts} is {(ts - wall_ms) / 1000:.0f} s in the future")
        if self.max_past is not None and ts < wall_ms - self.max_past:
            raise BadEvent(f"ts {ts} is {(wall_ms - ts) / 86_400_000:.1f} days in the past")

    @staticmethod
    def _check_key(key, impression_id: str) -> None:
        """Both topics are keyed by impression_id, which is what puts an impression and its
        clicks in one partition; a message keyed otherwise would be joined (or orphaned) in
        the wrong partition, a wrong label nobody sees."""
        if key is NO_KEY:
            return
        if key is None:
            raise BadEvent(f"message has no key (expected impression_id {impression_id!r})")
        if key != impression_id.encode():
            raise BadEvent(f"key {bytes(key)[:160]!r} does not match impression_id "
                           f"{impression_id!r}")

    def _dead(self, stream: str, raw: bytes, offset: int, reason: str, out: list) -> None:
        self.next_offset[stream] = offset + 1
        if raw is not None and len(raw) > MAX_DEAD_RAW_BYTES:
            raw = raw[:MAX_DEAD_RAW_BYTES]
            reason += f" (raw: its first {MAX_DEAD_RAW_BYTES} bytes)"
        # A replay must skip it too: a check against the wall clock may pass next time.
        if stream == IMPRESSIONS:
            self.counters.impressions_dead += 1
            self._skip_imp.add(offset)
        else:
            self.counters.clicks_dead += 1
            self._skip_clk.add(offset)
        out.append((DEAD_LETTER, None, {"stream": stream, "offset": offset, "reason": reason,
                                        "raw": raw}))

    def _arrived(self, stream: str, ts: int, offset: int, now: float) -> None:
        self.next_offset[stream] = offset + 1
        self._seen.add(stream)
        # Without end-of-stream signals, silence counts from the last arrival.
        self._quiet_since[stream] = None if self.idle_needs_caught_up else now
        if ts > self.max_ts[stream]:
            self.max_ts[stream] = ts

    def on_impression(self, raw: bytes, offset: int, now: float, out: list,
                      wall_ms: int | None = None, key=NO_KEY) -> None:
        """``key``: the message's Kafka key (bytes or None), checked against impression_id
        when given."""
        c = self.counters
        c.impressions_in += 1
        try:
            imp, payload = parse_impression_payload(raw)
            self._check_key(key, imp.impression_id)
            self._check_time(imp.ts, wall_ms)
        except BadEvent as e:
            self._dead(IMPRESSIONS, raw, offset, str(e), out)
            return
        self._arrived(IMPRESSIONS, imp.ts, offset, now)
        if self.q.lookup(imp.impression_id) is not None:
            c.impressions_duplicate += 1
            self._skip_imp.add(offset)
            return
        self._make_room(out)
        seq = self.q.push(imp.impression_id, imp.ts, payload, offset, self.next_offset[CLICKS])
        if self.signals:
            out.append((SEEN, imp.impression_id, (imp, offset)))
        held = self._held.pop(imp.impression_id, None)
        if held:
            self._held_n -= len(held)
            self._lowered[seq] = min(o for _, o in held)
            for click_ts, click_offset in held:
                self._apply_click(seq, click_ts, click_offset, out)

    def on_click(self, raw: bytes, offset: int, now: float, out: list,
                 wall_ms: int | None = None, key=NO_KEY) -> None:
        c = self.counters
        c.clicks_in += 1
        try:
            click = parse_click(raw)
            self._check_key(key, click.impression_id)
            self._check_time(click.ts, wall_ms)
        except BadEvent as e:
            self._dead(CLICKS, raw, offset, str(e), out)
            return
        self._arrived(CLICKS, click.ts, offset, now)
        seq = self.q.lookup(click.impression_id)
        if seq is not None:
            self._apply_click(seq, click.ts, offset, out)
            return
        self._hold(click, offset, out)

    def _apply_click(self, seq: int, click_ts: int, offset: int, out: list) -> None:
        q, c = self.q, self.counters
        if q.click_ts(seq) != NO_CLICK or q.flags(seq) & LATE_SEEN:
            c.clicks_duplicate += 1
            self._skip_clk.add(offset)
            return
        ts = q.ts(seq)
        delay = max(0, click_ts - ts)
        if q.is_pending(seq) and delay <= self.window:
            q.set_click(seq, click_ts)
            c.clicks_joined += 1
            if self.signals:
                imp = Impression(**orjson.loads(q.payload(seq)))
                out.append((CLICKED, imp.impression_id, (imp, click_ts)))
            return
        q.add_flags(seq, LATE_SEEN)
        c.clicks_late += 1
        key = q.key(seq)
        out.append((LATE_CLICK, key, orjson.dumps({
            "kind": LATE_CLICK, "impression_id": key, "ts": ts, "click_ts": click_ts,
            "delay_ms": delay, "window_ms": self.window})))

    def _hold(self, click: Click, offset: int, out: list) -> None:
        if self._held_n >= self.held_capacity:
            self._expire_held(None, out)
        self._held.setdefault(click.impression_id, []).append((click.ts, offset))
        self._held_n += 1
        self._held_fifo.append((click.ts + self.hold, click.impression_id))

    def _expire_held(self, watermark: int | None, out: list) -> None:
        """Turn held clicks whose hold ended into orphans; with no watermark, evict the oldest."""
        fifo = self._held_fifo
        while fifo and (watermark is None or fifo[0][0] <= watermark):
            _, key = fifo.popleft()
            held = self._held.pop(key, None)
            if held is None:
                continue  # joined meanwhile
            self._held_n -= len(held)
            self.counters.clicks_orphan += len(held)
            self._skip_clk.update(o for _, o in held)
            if watermark is None:
                self.counters.clicks_held_evicted += len(held)
                return

    # -- closing windows -------------------------------------------------------------------

    def _make_room(self, out: list) -> None:
        q = self.q
        while len(q) >= self.capacity:
            if q.oldest_closed() is not None:
                self._forget_oldest()
                self.counters.impressions_forgotten_early += 1
            else:
                self._emit_oldest(out, early=True)

    def _forget_oldest(self) -> None:
        self._lowered.pop(self.q.head, None)
        self.q.forget_oldest()

    def _emit_oldest(self, out: list, early: bool = False) -> None:
        q, c = self.q, self.counters
        seq, key, ts, click_ts, payload = q.pop_pending_entry()
        label = int(click_ts != NO_CLICK)
        quarantined = self.health.observe_label(label)
        c.impressions_emitted += 1
        if early:
            c.impressions_closed_early += 1
            q.add_flags(seq, CLOSED_EARLY)
        if quarantined:
            c.impressions_quarantined += 1
            q.add_flags(seq, QUARANTINED)
        if label or early or quarantined:
            extra = {"kind": EXAMPLE, "label": label,
                     "click_ts": click_ts if label else None,
                     "delay_ms": max(0, click_ts - ts) if label else None,
                     "window_ms": self.window}
            if early:
                extra["closed_early"] = True
            if quarantined:
                extra["quarantined"] = True
            suffix = b"," + orjson.dumps(extra)[1:]
        else:
            suffix = self._negative_suffix  # most examples: the same bytes every time
        # payload is a compact JSON object ending in '}': splice the label in without a re-parse
        # (with signals on, the key is (impression id, ts): the count features' attach step
        # places an example by its impression's ts)
        out.append((EXAMPLE, (key, ts) if self.signals else key, payload[:-1] + suffix))

    def caught_up(self, stream: str, now: float) -> None:
        """The reader reached the end of ``stream``: from now on its silence is real."""
        if self._quiet_since[stream] is None:
            self._quiet_since[stream] = now

    def held_back(self, align_ms: int, held: str | None = None) -> str | None:
        """The stream its reader should pause so the two are read in event-time step: the one
        whose newest event is more than ``align_ms`` past the other's while the other has
        more to read (not `caught_up`); one ``held`` now is let go once it is within
        ``align_ms / 2``, or the other caught up. None: read both (``align_ms`` 0: always).

        The watermark is the lower of the two, so on a backlog a reader that drains one
        stream first (Kafka clients fetch a partition's messages in bulk) would hold every
        impression of the backlog pending until the clicks come (or close them early, past
        ``capacity``), and hold clicks read ahead of their impressions up to
        ``held_clicks_capacity``; in step, pending stays about a wait window of impressions.

        >>> j = WaitWindowJoiner(window_ms=1000, idle_timeout_s=60, idle_needs_caught_up=True)
        >>> j.max_ts.update({IMPRESSIONS: 900_000, CLICKS: 100_000})
        >>> j.held_back(300_000), j.held_back(300_000, IMPRESSIONS)
        ('impressions', 'impressions')
        >>> j.max_ts[CLICKS] = 800_000  # within half of align_ms: let go
        >>> j.held_back(300_000, IMPRESSIONS), j.held_back(0)
        (None, None)
        >>> j.max_ts[CLICKS] = 100_000; j.caught_up(CLICKS, 0.0)  # nothing more to wait for
        >>> j.held_back(300_000, IMPRESSIONS) is None
        True
        """
        if align_ms <= 0:
            return None
        for stream, other in ((IMPRESSIONS, CLICKS), (CLICKS, IMPRESSIONS)):
            gap = self.max_ts[stream] - self.max_ts[other]
            if self._quiet_since[other] is None and gap > (
                    align_ms // 2 if held == stream else align_ms):
                return stream
        return None

    def current_watermark(self, now: float) -> int:
        if self._start_wall is None:
            self._start_wall = now
        active, quiet = [], []
        for stream in (IMPRESSIONS, CLICKS):
            since = self._quiet_since[stream]
            if since is None and not self.idle_needs_caught_up and stream not in self._seen:
                since = self._start_wall
            if since is not None and now - since > self.idle_timeout:
                quiet.append(since)
            else:
                # Streams are ordered by ts, so after ts T every event before T has arrived
                # (another event at T may still come).
                active.append(self.max_ts[stream] - 1)
        if active:
            wm = min(active)
        else:
            # Both quiet: let event time follow the wall clock from when the last went quiet.
            wm = max(self.max_ts.values()) + int((now - max(quiet)) * 1000)
        self.watermark = max(self.watermark, wm)
        return self.watermark

    def advance(self, now: float, out: list) -> None:
        """Close every window the watermark has passed, expire held clicks and old memory."""
        wm = self.current_watermark(now)
        seq = self.q.oldest_pending()
        if seq is not None and self.q.ts(seq) + self.window <= wm:
            # Judged only when windows close: that is when missing clicks become false labels.
            self.health.observe_lag(wm, self.max_ts[CLICKS])
        self._close_until(wm, out)

    def _close_until(self, wm: int, out: list) -> None:
        q = self.q
        while (seq := q.oldest_pending()) is not None and q.ts(seq) + self.window <= wm:
            self._emit_oldest(out)
        self._expire_held(wm, out)
        while (seq := q.oldest_closed()) is not None and q.ts(seq) + self.horizon <= wm:
            self._forget_oldest()

    def flush(self, out: list) -> None:
        """End of input: every remaining window closes and every held click is an orphan."""
        self._close_until(2**62, out)

    @property
    def held_count(self) -> int:
        return self._held_n

    def reconcile(self) -> list[str]:
        return self.counters.reconcile(self.q.pending_count, self._held_n)

    def stats(self) -> dict:
        return {**asdict(self.counters), "pending": self.q.pending_count,
                "remembered": len(self.q) - self.q.pending_count, "held": self._held_n,
                "watermark": self.watermark, "quarantined": self.health.quarantined}

    # -- recovery ----------------------------------------------------------------------------

    def replay_from(self) -> tuple[int, int]:
        """Offsets (impressions, clicks) from which a replay rebuilds the current queue."""
        q = self.q
        if len(q) == 0:
            return self.next_offset[IMPRESSIONS], self.next_offset[CLICKS]
        return self.impressions_replay_from(), min([q.click_pos(q.head),
                                                    *self._lowered.values()])

    def impressions_replay_from(self) -> int:
        """`replay_from`'s impression offset alone (cheap: sent with every batch's watermark)."""
        q = self.q
        return q.offset(q.head) if len(q) else self.next_offset[IMPRESSIONS]

    def snapshot(self) -> dict:
        imp_lo, clk_lo = self.replay_from()
        pending = self.q.oldest_pending()
        self._skip_imp = {o for o in self._skip_imp if o >= imp_lo}
        self._skip_clk = {o for o in self._skip_clk if o >= clk_lo}
        return {
            "version": 1,
            "replay_from": (imp_lo, clk_lo),
            "next_offset": dict(self.next_offset),
            "pending_from": self.next_offset[IMPRESSIONS] if pending is None
            else self.q.offset(pending),
            "skip_imp": sorted(self._skip_imp),
            "skip_clk": sorted(self._skip_clk),
            "held": {k: list(v) for k, v in self._held.items()},
            "held_fifo": list(self._held_fifo),
            "counters": asdict(self.counters),
            "max_ts": dict(self.max_ts),
            "watermark": self.watermark,
            "health": self.health.state(),
        }

    def start_rebuild(self, snap: dict) -> None:
        self._rebuild = snap
        self._rebuild_clk_pos = snap["replay_from"][1]
        self._skip_imp = set(snap["skip_imp"])
        self._skip_clk = set(snap["skip_clk"])

    def rebuild_impression(self, raw: bytes, offset: int) -> Impression | None:
        """Replay one impression below the snapshot's position: state only, nothing counted.
        Returns it when it is back in the queue: one the first pass sent a `SEEN` for."""
        snap = self._rebuild
        if offset in self._skip_imp or offset >= snap["next_offset"][IMPRESSIONS]:
            return None
        try:
            imp, payload = parse_impression_payload(raw)
        except BadEvent:
            return None  # dead-lettered the first time
        if self.q.lookup(imp.impression_id) is not None:
            return None
        self.q.push(imp.impression_id, imp.ts, payload, offset, self._rebuild_clk_pos)
        if offset < snap["pending_from"]:
            self.q.pop_pending()
        return imp

    def rebuild_click(self, raw: bytes, offset: int) -> None:
        if offset in self._skip_clk or offset >= self._rebuild["next_offset"][CLICKS]:
            return
        try:
            click = parse_click(raw)
        except BadEvent:
            return
        seq = self.q.lookup(click.impression_id)
        if seq is None or self.q.click_ts(seq) != NO_CLICK or self.q.flags(seq) & LATE_SEEN:
            return  # held at snapshot time (restored below) or it changed nothing
        if max(0, click.ts - self.q.ts(seq)) <= self.window:
            self.q.set_click(seq, click.ts)
        else:
            self.q.add_flags(seq, LATE_SEEN)

    def finish_rebuild(self) -> None:
        snap = self._rebuild
        del self._rebuild
        self.next_offset = dict(snap["next_offset"])
        self._held = {k: [tuple(x) for x in v] for k, v in snap["held"].items()}
        self._held_n = sum(len(v) for v in self._held.values())
        self._held_fifo = deque(tuple(x) for x in snap["held_fifo"])
        self.counters = Counters(**snap["counters"])
        self.max_ts = dict(snap["max_ts"])
        self.watermark = snap["watermark"]
        self.health.restore(snap["health"])
