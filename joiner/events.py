"""Event schemas: parse and validate the raw bytes of `impressions` and `clicks` messages.

A message that fails raises ``BadEvent`` with a reason meant for the dead-letter record.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import orjson

from joiner.errors import CtrstreamError

MAX_MESSAGE_BYTES = 64 * 1024
MAX_ID_CHARS = 128
# 9999-12-31T23:59:59.999Z. Beyond it a ts does not fit the queue's int64 columns (2**63) or
# sits above the end-of-input watermark (2**62): the message would crash or never be emitted.
MAX_TS_MS = 253_402_300_799_999


class BadEvent(CtrstreamError, ValueError):
    """The message cannot be processed; ``str(e)`` is the dead-letter reason."""

    exit_code = 2


class Impression(NamedTuple):
    impression_id: str
    ts: int
    user_id: str
    item_id: str
    features: dict

    def to_json(self) -> bytes:
        """Compact canonical form: only the contract's fields, so a label can be spliced in.
        Copied to its exact size: orjson's result keeps a ~4 KB allocation, which would be
        most of a buffered impression's memory."""
        return bytes(memoryview(orjson.dumps(self._asdict())))


class Click(NamedTuple):
    impression_id: str
    ts: int


def _load(raw: bytes | None) -> dict:
    if raw is None:  # a Kafka message with a null value (a tombstone)
        raise BadEvent("message has no value (null)")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise BadEvent(f"message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise BadEvent(f"invalid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise BadEvent(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _id(obj: dict, name: str) -> str:
    v = obj.get(name)
    if type(v) is str and 0 < len(v) <= MAX_ID_CHARS:  # the common case, checked first
        return v
    if v is None:
        raise BadEvent(f"missing field {name!r}")
    if type(v) is int:
        v = str(v)
    elif type(v) is not str:
        raise BadEvent(f"field {name!r} must be a string, got {type(v).__name__}")
    if not v or len(v) > MAX_ID_CHARS:
        raise BadEvent(f"field {name!r} must have 1..{MAX_ID_CHARS} characters, got {len(v)}")
    return v


def _ts(obj: dict) -> int:
    v = obj.get("ts")
    if type(v) is int and 0 < v <= MAX_TS_MS:
        return v
    if v is None:
        raise BadEvent("missing field 'ts'")
    if type(v) is not int:  # bool is a subclass of int, type() keeps it out
        raise BadEvent(f"field 'ts' must be integer milliseconds, got {type(v).__name__}")
    if v > MAX_TS_MS:
        raise BadEvent(f"field 'ts' must be at most {MAX_TS_MS} (year 9999), got {v}")
    raise BadEvent(f"field 'ts' must be positive, got {v}")


_SCALARS = frozenset((str, int))


def _features(obj: dict) -> dict:
    feats = obj.get("features", {})
    if type(feats) is not dict:
        raise BadEvent(f"field 'features' must be an object, got {type(feats).__name__}")
    for k, v in feats.items():
        t = type(v)
        if t in _SCALARS:
            continue
        if t is not float:
            raise BadEvent(f"feature {k!r} must be a string or number, got {t.__name__}")
        if not math.isfinite(v):
            raise BadEvent(f"feature {k!r} is not finite")
    return feats


def parse_impression(raw: bytes) -> Impression:
    return parse_impression_payload(raw)[0]


_IMPRESSION_FIELDS = frozenset(Impression._fields)


def parse_impression_payload(raw: bytes) -> tuple[Impression, bytes]:
    """The impression and its JSON to buffer: the raw bytes themselves when they hold exactly
    the contract's fields (ids as strings) and end in '}', else the canonical form."""
    obj = _load(raw)
    imp = Impression(_id(obj, "impression_id"), _ts(obj), _id(obj, "user_id"),
                     _id(obj, "item_id"), _features(obj))
    if (obj.keys() == _IMPRESSION_FIELDS and raw.endswith(b"}")
            and type(obj["user_id"]) is str and type(obj["item_id"]) is str
            and type(obj["impression_id"]) is str):
        return imp, raw
    return imp, imp.to_json()


def parse_click(raw: bytes) -> Click:
    obj = _load(raw)
    return Click(_id(obj, "impression_id"), _ts(obj))


# -- the labeled examples on `examples` (the join's output) --------------------------------------

CORRECTION = "a late-click correction, not an example"
QUARANTINED = "quarantined: the join's health monitor suspects its label"
# Reasons that mark a well-formed record that is kept (archived) but not learned from.
NOT_LEARNED = frozenset((CORRECTION, QUARANTINED))


def why_not_learnable(record) -> str | None:
    """Why a record from `examples` cannot be learned from, or None when it can: the one rule
    the learn flow, the models, the embedding learner and the retrain apply. A reason in
    ``NOT_LEARNED`` marks a well-formed record (archived, not learned); any other marks a
    malformed one (a dead letter).

    >>> ok = {"impression_id": "i1", "ts": 1, "user_id": "u", "item_id": "v", "label": 0}
    >>> why_not_learnable(ok) is None
    True
    >>> why_not_learnable({**ok, "label": None})
    'label missing or not 0/1'
    >>> why_not_learnable({**ok, "counts": {"user": {"imp_5m": "x"}}})
    'count user.imp_5m must be a finite number >= 0'
    >>> why_not_learnable({"kind": "late_click", "impression_id": "i1", "ts": 1}) == CORRECTION
    True
    """
    if not isinstance(record, dict):
        return "not a JSON object"
    if type(record.get("impression_id")) is not str or not record["impression_id"]:
        return "impression_id missing or not a string"
    if type(record.get("ts")) is not int:  # bool is an int subclass: type() keeps it out
        return "ts missing or not an integer"
    if record.get("kind", "example") != "example":
        return CORRECTION
    if type(record.get("label")) is not int or record["label"] not in (0, 1):
        return "label missing or not 0/1"
    for name in ("user_id", "item_id"):
        if type(record.get(name)) not in _SCALARS:
            return f"{name} missing or not a string"
    try:  # what the learners hash must be well-typed: a bad value would stop the flow
        _features(record)
    except BadEvent as e:
        return str(e)
    if (why := _counts_problem(record.get("counts", {}))) is not None:
        return why
    if record.get("quarantined"):
        return QUARANTINED
    return None


def _counts_problem(counts) -> str | None:
    """Why the attached counts ({entity: {feature: number}}) are malformed, or None."""
    if type(counts) is not dict:
        return "counts must be an object"
    for entity, values in counts.items():
        if type(values) is not dict:
            return f"counts of {entity!r} must be an object"
        for name, v in values.items():
            if type(v) not in (int, float) or not math.isfinite(v) or v < 0:
                return f"count {entity}.{name} must be a finite number >= 0"
    return None
