"""HashQueue: the KDD 2014 joiner's buffer, a FIFO of impressions plus a hash map from
impression id to slot.

Entries get consecutive sequence numbers. Three cursors split the queue::

    head ........ pending ........ tail
    | closed (remembered) | pending |

*Pending* entries wait for their window to close and hold the impression's bytes. *Closed*
entries have been emitted; they keep only their timestamps and flags, for the late-click
horizon, so a late click can be told from an orphan. Columns live in fixed-size chunks of
``array('q')``/``array('B')`` (8 or 1 bytes a field, no Python object per number), so an entry
costs its id string, one dict slot and ~33 bytes, plus its payload while pending.
"""

from __future__ import annotations

from array import array
from collections import deque

CHUNK = 4096
NO_CLICK = -1

# flags
CLOSED_EARLY = 1  # closed before its window ended because the queue was full
LATE_SEEN = 2  # a click after the window has been counted for it
QUARANTINED = 4


class _Chunk:
    __slots__ = ("ts", "click_ts", "offset", "click_pos", "flags", "keys", "payloads")

    def __init__(self) -> None:
        zeros = bytes(8 * CHUNK)
        self.ts = array("q", zeros)
        self.click_ts = array("q", zeros)
        self.offset = array("q", zeros)
        self.click_pos = array("q", zeros)
        self.flags = array("B", bytes(CHUNK))
        self.keys: list = [None] * CHUNK
        self.payloads: list = [None] * CHUNK


class HashQueue:
    """FIFO + hash map with O(1) push, lookup/mark, pop of the oldest pending and forgetting of
    the oldest closed entry.

    >>> q = HashQueue()
    >>> s = q.push("a", ts=1000, payload=b"{}", offset=0, click_pos=0)
    >>> q.lookup("a") == s, q.is_pending(s)
    (True, True)
    >>> q.set_click(s, 1500); q.pop_pending()
    (0, b'{}')
    >>> q.click_ts(s), q.is_pending(s), len(q), q.pending_count
    (1500, False, 1, 0)
    >>> q.forget_oldest(); q.lookup("a") is None
    True
    """

    def __init__(self) -> None:
        self._index: dict[str, int] = {}
        self._chunks: deque[_Chunk] = deque()
        self._base = 0  # sequence number of the first slot of _chunks[0]
        self.head = 0
        self.pending = 0
        self.tail = 0

    def __len__(self) -> int:
        return self.tail - self.head

    @property
    def pending_count(self) -> int:
        return self.tail - self.pending

    def _slot(self, seq: int) -> tuple[_Chunk, int]:
        i = seq - self._base
        return self._chunks[i // CHUNK], i % CHUNK

    def lookup(self, key: str) -> int | None:
        return self._index.get(key)

    def push(self, key: str, ts: int, payload: bytes, offset: int, click_pos: int) -> int:
        """Append a pending entry; the caller has checked that ``key`` is not present."""
        seq = self.tail
        if seq - self._base == len(self._chunks) * CHUNK:
            self._chunks.append(_Chunk())
        c, j = self._slot(seq)
        c.ts[j] = ts
        c.click_ts[j] = NO_CLICK
        c.offset[j] = offset
        c.click_pos[j] = click_pos
        c.flags[j] = 0
        c.keys[j] = key
        c.payloads[j] = payload
        self._index[key] = seq
        self.tail = seq + 1
        return seq

    def is_pending(self, seq: int) -> bool:
        return seq >= self.pending

    def ts(self, seq: int) -> int:
        c, j = self._slot(seq)
        return c.ts[j]

    def click_ts(self, seq: int) -> int:
        c, j = self._slot(seq)
        return c.click_ts[j]

    def set_click(self, seq: int, click_ts: int) -> None:
        c, j = self._slot(seq)
        c.click_ts[j] = click_ts

    def offset(self, seq: int) -> int:
        c, j = self._slot(seq)
        return c.offset[j]

    def click_pos(self, seq: int) -> int:
        c, j = self._slot(seq)
        return c.click_pos[j]

    def flags(self, seq: int) -> int:
        c, j = self._slot(seq)
        return c.flags[j]

    def add_flags(self, seq: int, flags: int) -> None:
        c, j = self._slot(seq)
        c.flags[j] |= flags

    def key(self, seq: int) -> str:
        c, j = self._slot(seq)
        return c.keys[j]

    def payload(self, seq: int) -> bytes | None:
        c, j = self._slot(seq)
        return c.payloads[j]

    def oldest_pending(self) -> int | None:
        return self.pending if self.pending < self.tail else None

    def pop_pending(self) -> tuple[int, bytes]:
        """Close the oldest pending entry: it stays remembered, its payload is released."""
        seq, _, _, _, payload = self.pop_pending_entry()
        return seq, payload

    def pop_pending_entry(self) -> tuple[int, str, int, int, bytes]:
        """``pop_pending`` returning ``(seq, key, ts, click_ts, payload)`` in one lookup."""
        seq = self.pending
        c, j = self._slot(seq)
        payload = c.payloads[j]
        c.payloads[j] = None
        self.pending = seq + 1
        return seq, c.keys[j], c.ts[j], c.click_ts[j], payload

    def oldest_closed(self) -> int | None:
        return self.head if self.head < self.pending else None

    def forget_oldest(self) -> None:
        """Drop the oldest closed entry from memory (its id is no longer recognised)."""
        seq = self.head
        c, j = self._slot(seq)
        del self._index[c.keys[j]]
        c.keys[j] = None
        self.head = seq + 1
        if self.head - self._base == CHUNK:
            self._chunks.popleft()
            self._base += CHUNK
