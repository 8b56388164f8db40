"""The test-event simulator behind `ctrstream produce`: impressions and clicks with a known truth.

Every impression has a true click probability ``p`` from a latent-factor world (user/item
affinity vectors, Zipf-like item popularity and user activity, position bias, device and
hour-of-day effects, and user interests that turn once around a circle per day). Clicks are
Bernoulli(p) and arrive after a truncated log-normal delay. The stream is merged in arrival
order, which is event-time order except for the faults asked for. Pure numpy, deterministic
given the seed (and the fixed chunk size).

>>> from flows.config import GeneratorConfig
>>> s = EventStream(GeneratorConfig(), StreamSpec(seed=1, impressions=1000))
>>> n = sum(len(c) for c in s)
>>> s.counts["impressions"], n == s.counts["impression_messages"] + s.counts["click_messages"]
(1000, True)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from flows.config import GeneratorConfig
from flows.metrics import write_json

IMPRESSIONS, CLICKS = 0, 1
MS_PER_DAY = 86_400_000
DEVICES = ("mobile", "desktop", "tablet")
DEVICE_SHARE = (0.6, 0.3, 0.1)
DEVICE_EFFECT = (0.0, 0.15, -0.2)
POSITIONS = 10
DIM = 8
CHUNK = 50_000
# An early click is picked only among short delays: a joiner holds an early click briefly, and
# an impression hours late in event time would be a different fault (a lost impression).
EARLY_CLICK_MAX_DELAY_MS = 60_000
RESEND_MAX_MS = 2_000  # a duplicate arrives up to this long after the original
MALFORMED_KINDS = ("bad_json", "missing_field", "wrong_type")
FAULT_KINDS = ("duplicate_impressions", "duplicate_clicks", "early_clicks", "orphan_clicks",
               "malformed_impressions", "malformed_clicks")
TRUTH_FAULTS = pa.array(["", "duplicate_impression", "early_click", "duplicate_click"])
TRUTH_FILE, MANIFEST_FILE = "truth.parquet", "manifest.json"
TRUTH_SCHEMA = pa.schema([
    ("impression_id", pa.string()), ("ts", pa.int64()), ("user_id", pa.string()),
    ("item_id", pa.string()), ("p", pa.float64()), ("clicked", pa.bool_()),
    ("delay_ms", pa.int64()), ("fault", pa.string()),
])


def default_start_ms(now: dt.datetime | None = None) -> int:
    """Yesterday 00:00 UTC, so simulated time running faster than wall time stays in the past."""
    now = now or dt.datetime.now(dt.UTC)
    day = dt.datetime.combine(now.date() - dt.timedelta(days=1), dt.time(), dt.UTC)
    return int(day.timestamp() * 1000)


@dataclass(frozen=True)
class Faults:
    """Faults to inject. An int is an exact count (needs a bounded stream); a float in (0, 1) is
    a rate: per click for duplicate and early clicks, per impression for the rest. Malformed
    messages are bad JSON, a missing required field or a wrong type, in turn at random."""

    duplicate_impressions: int | float = 0
    duplicate_clicks: int | float = 0
    early_clicks: int | float = 0
    orphan_clicks: int | float = 0
    malformed_impressions: int | float = 0
    malformed_clicks: int | float = 0

    @classmethod
    def preset(cls, expected_impressions: float | None, ctr: float) -> Faults:
        """Every fault on: counts when the stream is bounded, the same rates when it is not."""
        rates = dict(duplicate_impressions=0.005, duplicate_clicks=0.02, early_clicks=0.02,
                     orphan_clicks=0.001, malformed_impressions=0.0005, malformed_clicks=0.0005)
        if expected_impressions is None or math.isinf(expected_impressions):
            return cls(**rates)
        per_click = {"duplicate_clicks", "early_clicks"}
        return cls(**{k: max(1, round(r * expected_impressions * (ctr if k in per_click else 1)))
                      for k, r in rates.items()})


@dataclass(frozen=True)
class StreamSpec:
    """What to generate: at most one of ``impressions`` (count) and ``duration_s`` (event time);
    with neither the stream is unbounded. ``start_ms`` None means yesterday 00:00 UTC."""

    seed: int = 0
    impressions: int | None = None
    duration_s: float | None = None
    start_ms: int | None = None
    faults: Faults = field(default_factory=Faults)

    @property
    def bounded(self) -> bool:
        return self.impressions is not None or (
            self.duration_s is not None and not math.isinf(self.duration_s))


@dataclass
class Chunk:
    """Messages in arrival order, and the truth of the impressions generated in this step."""

    topic: np.ndarray  # uint8: IMPRESSIONS or CLICKS
    at: np.ndarray  # int64 event-time ms at which the message arrives (pacing clock)
    keys: list[bytes]
    values: list[bytes]
    truth: pa.Table

    def __len__(self) -> int:
        return len(self.values)


def _zipf_cdf(rng: np.random.Generator, n: int, s: float) -> np.ndarray:
    w = rng.permutation(np.arange(1, n + 1, dtype=np.float64) ** -s)
    cdf = np.cumsum(w)
    return cdf / cdf[-1]


def _names(prefix: str, n: int) -> np.ndarray:
    return np.array([f"{prefix}{i}" for i in range(n)], dtype=object)


class World:
    """Users, items and the true click probability of a shown (user, item, context)."""

    def __init__(self, gen: GeneratorConfig, seed: int):
        rng = np.random.default_rng([seed, 1])
        self.gen = gen
        self.user_cdf = _zipf_cdf(rng, gen.users, gen.user_zipf)
        self.item_cdf = _zipf_cdf(rng, gen.items, gen.item_zipf)
        self.item_category = rng.integers(0, gen.categories, gen.items)
        scale = DIM ** -0.25  # so a user-item dot product has unit variance
        cat_vec = rng.normal(0, scale, (gen.categories, DIM))
        # Items of a category share most of their direction: category is a useful feature.
        self.item_vec = 0.8 * cat_vec[self.item_category] + 0.6 * rng.normal(0, scale,
                                                                             (gen.items, DIM))
        self.user_vec = rng.normal(0, scale, (gen.users, DIM))
        self.user_bias = rng.normal(0, 0.5, gen.users)
        self.item_bias = rng.normal(0, 0.5, gen.items)
        self.position_effect = -0.4 * np.log1p(np.arange(POSITIONS))
        self.device_effect = np.array(DEVICE_EFFECT)
        self.device_cdf = np.cumsum(DEVICE_SHARE)
        self.hour_effect = 0.25 * np.cos(2 * np.pi * (np.arange(24) - 20) / 24)  # evening peak
        self.user_names, self.item_names = _names("u", gen.users), _names("i", gen.items)
        self.category_names = _names("c", gen.categories)
        self.user_ids, self.item_ids = pa.array(self.user_names), pa.array(self.item_names)
        self.user_json = np.array([orjson.dumps(u) for u in self.user_names])
        self.item_json = np.array([orjson.dumps(i) for i in self.item_names])
        self.intercept = 0.0
        # Calibrate on a sample spread over a whole day, the period of every time effect.
        sample = self.sample(rng, rng.integers(0, MS_PER_DAY, 200_000))
        score = self.logit(**sample)
        a = math.log(gen.base_ctr / (1 - gen.base_ctr)) - float(score.mean())
        for _ in range(50):  # Newton on the mean probability; it is monotone in the intercept
            q = _sigmoid(score + a)
            step = (q.mean() - gen.base_ctr) / max((q * (1 - q)).mean(), 1e-12)
            a -= step
            if abs(step) < 1e-10:
                break
        self.intercept = float(a)

    def sample(self, rng: np.random.Generator, ts: np.ndarray) -> dict[str, np.ndarray]:
        n = len(ts)
        return dict(
            user=np.searchsorted(self.user_cdf, rng.random(n), side="right"),
            item=np.searchsorted(self.item_cdf, rng.random(n), side="right"),
            position=rng.integers(0, POSITIONS, n),
            device=np.searchsorted(self.device_cdf, rng.random(n), side="right"),
            ts=ts,
        )

    def logit(self, user, item, position, device, ts, affinity: bool = True) -> np.ndarray:
        """The true logit; ``affinity=False`` leaves out the user x item affinity term (the
        best a model that cannot learn the pairs could do: bench/learners.py)."""
        pair = 0.0
        if affinity:
            theta = 2 * np.pi * (ts % MS_PER_DAY) / MS_PER_DAY
            u = self.user_vec[user]
            half = DIM // 2
            # Interests drift: the first half of the user vector turns once around per day.
            c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
            x, y = u[:, 0:half:2], u[:, 1:half:2]
            v = self.item_vec[item]
            pair = (((c * x - s * y) * v[:, 0:half:2]).sum(1)
                    + ((s * x + c * y) * v[:, 1:half:2]).sum(1))
            pair += (u[:, half:] * v[:, half:]).sum(1)
        hour = (ts % MS_PER_DAY) // 3_600_000
        return (self.intercept + self.user_bias[user] + self.item_bias[item] + pair
                + self.position_effect[position] + self.device_effect[device]
                + self.hour_effect[hour])

    def delays_ms(self, rng: np.random.Generator, n: int) -> np.ndarray:
        g = self.gen
        d = rng.lognormal(math.log(g.click_delay_median_s), g.click_delay_sigma, n)
        while (over := d > g.max_click_delay_s).any():  # truncate by resampling
            d[over] = rng.lognormal(math.log(g.click_delay_median_s), g.click_delay_sigma,
                                    int(over.sum()))
        return np.rint(d * 1000).astype(np.int64)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection on uint64, so distinct counters give distinct ids."""
    x = x.copy()
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _hex_ids(counters: np.ndarray, key: int) -> np.ndarray:
    """Impression ids (also the message keys): 16 hex digits, unique per counter."""
    with np.errstate(over="ignore"):
        x = _mix64(counters.astype(np.uint64) + np.uint64(key))
    return np.frombuffer(x.astype(">u8").tobytes().hex().encode(), "S16")


def _join(*parts) -> np.ndarray:
    """Element-wise concatenation of byte strings, as an object array of ``bytes``."""
    out = parts[0]
    for part in parts[1:]:
        out = np.strings.add(out, part)
    return out.astype(object)


_POW10 = 10 ** np.arange(12, -1, -1, dtype=np.int64)


def _digits(x: np.ndarray) -> np.ndarray:
    """Integers as ASCII decimal; epoch ms of this era have 13 digits, done without
    ``astype("S")``, which formats one element at a time (a third of the hot loop)."""
    if len(x) and 10**12 <= x.min() and x.max() < 10**13:
        return ((x[:, None] // _POW10) % 10 + ord("0")).astype(np.uint8).view("S13").ravel()
    return x.astype("S20")


def _click_json(ids: np.ndarray, ts: np.ndarray) -> np.ndarray:
    return _join(b'{"impression_id":"', ids, b'","ts":', _digits(ts), b"}")


class EventStream:
    """Iterate to get ``Chunk``s; ``counts`` is exact for what has been yielded so far.

    With ``truth_dir`` the truth goes to ``truth.parquet`` as it is generated and
    ``manifest.json`` is written when the iteration ends; without it ``truth()`` returns it.
    """

    def __init__(self, gen: GeneratorConfig, spec: StreamSpec,
                 truth_dir: str | Path | None = None):
        if spec.impressions is not None and spec.duration_s is not None:
            raise ValueError("give impressions or duration_s, not both")
        for kind in FAULT_KINDS:
            v = getattr(spec.faults, kind)
            if isinstance(v, float) and not 0 <= v < 1 or v < 0:
                raise ValueError(f"{kind}: a count (int) or a rate in [0, 1), got {v!r}")
            if isinstance(v, int) and v and not spec.bounded:
                raise ValueError(f"{kind}: an exact count needs a bounded stream; give a rate")
        self.gen, self.spec = gen, spec
        start = spec.start_ms if spec.start_ms is not None else (
            gen.start_ms or default_start_ms())
        self.start_ms = int(start)
        self.world = World(gen, spec.seed)
        self.truth_dir = Path(truth_dir) if truth_dir is not None else None
        self.counts = dict.fromkeys(("impressions", "clicks", "impression_messages",
                                     "click_messages", *FAULT_KINDS), 0)
        self.malformed_kinds = {t: dict.fromkeys(MALFORMED_KINDS, 0)
                                for t in ("impressions", "clicks")}
        self.sum_p = 0.0
        self.end_ms = self.start_ms
        self.complete = False
        self._tables: list[pa.Table] = []
        self._feature_json: dict[int, bytes] = {}
        self._bogus = 2**63  # counters of ids that never belong to an impression
        self._id_key = 0
        self._started = False

    # -- public -----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Chunk]:
        if self._started:
            raise RuntimeError("an EventStream can be iterated once")
        self._started = True
        if self.truth_dir is None:
            for chunk in self._chunks():
                self._tables.append(chunk.truth)
                yield chunk
            self.complete = True
            return
        self.truth_dir.mkdir(parents=True, exist_ok=True)
        writer = pq.ParquetWriter(self.truth_dir / TRUTH_FILE, TRUTH_SCHEMA, compression="lz4",
                                  use_dictionary=["user_id", "item_id", "fault"])
        # Parquet encoding releases the GIL: one chunk is written while the next is generated.
        pool, writing = ThreadPoolExecutor(1, "truth-writer"), None
        try:
            for chunk in self._chunks():
                if writing is not None:
                    writing.result()
                writing = pool.submit(writer.write_table, chunk.truth)
                yield chunk
            self.complete = True
        finally:
            try:
                if writing is not None:
                    writing.result()
            finally:
                pool.shutdown()
                writer.close()
                write_manifest(self.truth_dir, self.manifest())

    def truth(self) -> pa.Table:
        if self.truth_dir is not None:
            return read_truth(self.truth_dir)
        return pa.concat_tables([TRUTH_SCHEMA.empty_table(), *self._tables])

    def manifest(self) -> dict[str, Any]:
        n = self.counts["impressions"]
        return {
            "seed": self.spec.seed,
            "complete": self.complete,
            "start_ms": self.start_ms,
            "end_ms": self.end_ms,
            "counts": dict(self.counts),
            "malformed_kinds": self.malformed_kinds,
            "mean_p": self.sum_p / n if n else None,
            "ctr": self.counts["clicks"] / n if n else None,
            "intercept": self.world.intercept,
            "early_click_max_delay_ms": EARLY_CLICK_MAX_DELAY_MS,
            "truth_file": TRUTH_FILE,
            "spec": dataclasses.asdict(self.spec),
            "config": dataclasses.asdict(self.gen),
        }

    # -- generation -------------------------------------------------------------------------

    def _chunks(self) -> Iterator[Chunk]:
        spec, gen = self.spec, self.gen
        rng = np.random.default_rng([spec.seed, 2])
        self._id_key = int(np.random.default_rng([spec.seed, 3]).integers(0, 2**63))
        horizon_ms = None if spec.duration_s is None else spec.duration_s * 1000
        t = 0.0  # ms since start, float so arrival gaps do not round away
        made = 0  # impressions generated
        seq = 0  # arrival tie-break, keeps the merge stable
        pending: list[tuple] = []  # (at, seq, topic, keys, values) arrays not yet emitted
        final = False
        while not final:
            n = CHUNK if spec.impressions is None else min(CHUNK, spec.impressions - made)
            times = t + np.cumsum(rng.exponential(1000 / gen.impressions_per_s, n))
            if horizon_ms is not None and n and times[-1] >= horizon_ms:
                times, final = times[times < horizon_ms], True
            made += len(times)
            final = final or (spec.impressions is not None and made >= spec.impressions)
            t = float(times[-1]) if len(times) else t
            if final:
                progress = 1.0
            elif spec.impressions is not None:
                progress = made / spec.impressions
            else:  # an unbounded stream only has rates, which ignore progress
                progress = t / horizon_ms if horizon_ms else 0.0
            low = self.end_ms
            ts = self.start_ms + np.floor(times).astype(np.int64)
            parts, truth = self._impressions(rng, ts, made - len(ts), progress)
            high = self.end_ms
            for kind, topic in (("orphan_clicks", CLICKS), ("malformed_impressions", IMPRESSIONS),
                                ("malformed_clicks", CLICKS)):
                k = len(self._pick(rng, kind, progress, None, len(ts)))
                if k:
                    at = np.sort(rng.integers(low, high, k, endpoint=True))
                    parts.append((at, topic, *self._inserted(rng, kind, at)))
            for at, topic, keys, values in parts:
                m = len(values)
                pending.append((np.asarray(at, np.int64), np.arange(seq, seq + m),
                                np.full(m, topic, np.uint8), keys, values))
                seq += m

            at, sq, topic, keys, values = (np.concatenate(x) for x in zip(*pending, strict=True))
            order = np.lexsort((sq, at))
            # Nothing generated later arrives before `high`: later impressions are not earlier.
            due = np.ones(len(at), bool) if final else at <= high
            ready, rest = order[due[order]], np.flatnonzero(~due)
            pending = [(at[rest], sq[rest], topic[rest], keys[rest], values[rest])]
            out_topic = topic[ready]
            n_imp = int((out_topic == IMPRESSIONS).sum())
            self.counts["impression_messages"] += n_imp
            self.counts["click_messages"] += len(ready) - n_imp
            yield Chunk(out_topic, at[ready], keys[ready].tolist(), values[ready].tolist(), truth)

        short = {k: int(getattr(spec.faults, k)) - self.counts[k] for k in FAULT_KINDS
                 if isinstance(getattr(spec.faults, k), int)
                 and self.counts[k] != getattr(spec.faults, k)}
        if short:
            raise ValueError(f"not enough candidates for the faults asked for, short by {short}")

    def _impressions(self, rng, ts: np.ndarray, first: int, progress: float):
        """Impressions at ``ts``, their clicks and the faults that hang on them, as
        ``(arrival ms, topic, keys, values)`` parts; and their truth."""
        w, n = self.world, len(ts)
        s = w.sample(rng, ts)
        p = _sigmoid(w.logit(**s))
        clicked = rng.random(n) < p
        n_clicks = int(clicked.sum())
        delay = np.full(n, -1, np.int64)
        delay[clicked] = w.delays_ms(rng, n_clicks)
        ids = _hex_ids(np.arange(first, first + n), self._id_key)

        fault = np.zeros(n, np.int8)  # index into TRUTH_FAULTS; the kinds are disjoint
        dup_imp = self._pick(rng, "duplicate_impressions", progress, np.arange(n), n)
        fault[dup_imp] = 1
        short = np.flatnonzero(clicked & (delay <= EARLY_CLICK_MAX_DELAY_MS) & (fault == 0))
        early = self._pick(rng, "early_clicks", progress, short, n_clicks)
        fault[early] = 2
        dup_click = self._pick(rng, "duplicate_clicks", progress,
                               np.flatnonzero(clicked & (fault == 0)), n_clicks)
        fault[dup_click] = 3

        user, item = s["user"], s["item"]
        code = ((w.item_category[item] * len(DEVICES) + s["device"]) * POSITIONS
                + s["position"]) * 24 + (ts % MS_PER_DAY) // 3_600_000
        uniq, inv = np.unique(code, return_inverse=True)
        feats = np.array([self._features(c) for c in uniq.tolist()], dtype="S")[inv]
        # The hot loop, vectorised: pieces orjson serialized, joined by numpy. Byte for byte
        # what orjson.dumps gives for the dict, several times faster.
        values = _join(b'{"impression_id":"', ids, b'","ts":', _digits(ts),
                       b',"user_id":', w.user_json[user], b',"item_id":', w.item_json[item],
                       b',"features":', feats, b"}")
        c_idx = np.flatnonzero(clicked)
        c_ts = ts[c_idx] + delay[c_idx]
        c_values = _click_json(ids[c_idx], c_ts)
        keys = ids.astype(object)
        imp_at = ts.copy()
        # Held back until just after its click, keeping its own ts.
        imp_at[early] = ts[early] + delay[early] + rng.integers(1, 1000, len(early),
                                                                endpoint=True)
        dc = np.searchsorted(c_idx, dup_click)
        parts = [
            (imp_at, IMPRESSIONS, keys, values),
            (ts[dup_imp] + rng.integers(1, RESEND_MAX_MS, len(dup_imp), endpoint=True),
             IMPRESSIONS, keys[dup_imp], values[dup_imp]),
            (c_ts, CLICKS, keys[c_idx], c_values),
            (c_ts[dc] + rng.integers(1, RESEND_MAX_MS, len(dc), endpoint=True),
             CLICKS, keys[dup_click], c_values[dc]),
        ]
        self.counts["impressions"] += n
        self.counts["clicks"] += n_clicks
        self.sum_p += float(p.sum())
        if n:
            self.end_ms = int(ts[-1])
        truth = pa.table({
            "impression_id": pa.array(ids).cast(pa.string()), "ts": ts,
            "user_id": w.user_ids.take(user), "item_id": w.item_ids.take(item), "p": p,
            "clicked": clicked, "delay_ms": delay, "fault": TRUTH_FAULTS.take(fault),
        }, schema=TRUTH_SCHEMA)
        return parts, truth

    def _inserted(self, rng, kind: str, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of orphan clicks or malformed messages arriving at ``at``: their ids
        come from a counter range no impression uses, so they never join anything."""
        ids = _hex_ids(np.arange(self._bogus, self._bogus + len(at), dtype=np.uint64),
                       self._id_key)
        self._bogus += len(at)
        if kind == "orphan_clicks":
            values = _click_json(ids, at)
        else:
            topic = "impressions" if kind == "malformed_impressions" else "clicks"
            values = self._malformed(rng, topic, [i.decode() for i in ids.tolist()], at.tolist())
        return ids.astype(object), np.array(values, dtype=object)

    def _features(self, code: int) -> bytes:
        """The features of one (category, device, position, hour), serialized once."""
        feats = self._feature_json.get(code)
        if feats is None:
            rest, hour = divmod(code, 24)
            rest, position = divmod(rest, POSITIONS)
            category, device = divmod(rest, len(DEVICES))
            feats = self._feature_json[code] = orjson.dumps({
                "category": self.world.category_names[category], "device": DEVICES[device],
                "position": position, "hour": hour})
        return feats

    def _pick(self, rng, kind: str, progress: float, candidates: np.ndarray | None,
              population: int) -> np.ndarray:
        """Which candidates (or how many insertions, if None) get this fault in this chunk.

        A count is spread evenly over the stream: each chunk tops the running total up to the
        share of the stream generated so far, so the last chunk lands on the exact count."""
        want = getattr(self.spec.faults, kind)
        if isinstance(want, float):
            k = int(rng.binomial(population, want)) if population else 0
        else:
            k = max(0, round(want * progress) - self.counts[kind])
        if candidates is None:
            self.counts[kind] += k
            return np.arange(k)
        k = min(k, len(candidates))
        self.counts[kind] += k
        return np.sort(rng.choice(candidates, k, replace=False)) if k else candidates[:0]

    def _malformed(self, rng, topic: str, ids: list[str], ats: list[int]) -> list[bytes]:
        tally = self.malformed_kinds[topic]
        out = []
        for i, at, kind in zip(ids, ats, rng.integers(0, 3, len(ids)).tolist(), strict=True):
            name = MALFORMED_KINDS[kind]
            tally[name] += 1
            good = {"impression_id": i, "ts": at}
            if topic == "impressions":
                good |= {"user_id": "u0", "item_id": "i0", "features": {"device": "mobile"}}
            if name == "bad_json":
                out.append(orjson.dumps(good)[:-7])  # cut off mid-message
            elif name == "missing_field":
                del good["ts" if at % 2 else "impression_id"]
                out.append(orjson.dumps(good))
            else:
                good["ts"] = str(at)
                out.append(orjson.dumps(good))
        return out


# -- ground truth --------------------------------------------------------------------------


def write_manifest(truth_dir: str | Path, manifest: dict) -> Path:
    path = Path(truth_dir) / MANIFEST_FILE
    write_json(path, manifest, indent=True)
    return path


def read_truth(truth_dir: str | Path) -> pa.Table:
    return pq.read_table(Path(truth_dir) / TRUTH_FILE)


def read_manifest(truth_dir: str | Path) -> dict:
    return orjson.loads((Path(truth_dir) / MANIFEST_FILE).read_bytes())


def _col(truth, name: str) -> np.ndarray:
    return np.asarray(truth[name])


def coverage(truth, window_ms: int) -> float:
    """Fraction of clicks whose delay is within the wait window (the recall a joiner can get)."""
    delay = _col(truth, "delay_ms")[_col(truth, "clicked")]
    return float((delay <= window_ms).mean()) if len(delay) else float("nan")


def expected_labels(truth, window_ms: int) -> np.ndarray:
    """The label a correct joiner gives each truth row: clicked within the window."""
    return _col(truth, "clicked") & (_col(truth, "delay_ms") <= window_ms)


def bayes_log_loss(truth, window_ms: int | None = None) -> float:
    """Expected log loss of predicting the true probability: the floor any model can reach.

    With ``window_ms`` the labels are the windowed ones; delay is independent of p here, so
    the true probability of a windowed positive is p times the coverage.
    """
    q = _col(truth, "p").astype(np.float64)
    if window_ms is not None:
        q = q * coverage(truth, window_ms)
    q = np.clip(q, 1e-15, 1 - 1e-15)
    return float(-(q * np.log(q) + (1 - q) * np.log1p(-q)).mean())
