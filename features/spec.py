"""What is counted: the entities an impression belongs to and the windows they are counted over.

An entity is a name and the impression fields that make its id; a field is looked up at the
impression's top level (``user_id``, ``item_id``) first, then in its ``features``. Each entity
gets an impression and a click count per window, named ``imp_<window>``/``clk_<window>``.

>>> from joiner.events import Impression
>>> spec = FeatureSpec()
>>> imp = Impression("i1", 1_000, "u7", "i3", {"category": "c2", "position": 4})
>>> spec.entity_ids(imp)[-2:]
[('user_category', 'u7|c2'), ('item_position', 'i3|4')]
>>> spec.feature_names()
['imp_5m', 'clk_5m', 'imp_1h', 'clk_1h', 'imp_24h', 'clk_24h']
"""

from __future__ import annotations

from dataclasses import dataclass, field

from joiner.errors import CtrstreamError
from joiner.events import Impression

DEFAULT_ENTITIES = {
    "user": ("user_id",),
    "item": ("item_id",),
    "category": ("category",),
    "user_category": ("user_id", "category"),
    "item_position": ("item_id", "position"),
}
DEFAULT_WINDOWS_MS = (300_000, 3_600_000, 86_400_000)
ID_SEPARATOR = "|"
_TOP_LEVEL = {name: i for i, name in enumerate(Impression._fields) if name != "features"}
_FEATURES = Impression._fields.index("features")


class NotCounted(CtrstreamError, ValueError):
    """Learners were told to read count features that nobody counts: they would read 0 for
    ever, silently. The message names them."""

    exit_code = 2


def split_names(text: str) -> list[str]:
    """A comma-separated list of names, each stripped, empty ones dropped.

    >>> split_names(" user_id, category,")
    ['user_id', 'category']
    """
    return [name for name in (part.strip() for part in text.split(",")) if name]


def window_label(ms: int) -> str:
    """The shortest exact label: 300000 -> '5m', 86400000 -> '24h', 1500 -> '1500ms'."""
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


@dataclass(frozen=True)
class FeatureSpec:
    entities: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_ENTITIES))
    windows_ms: tuple[int, ...] = DEFAULT_WINDOWS_MS
    # Tiles per window in the counters' rings (features/counters.py): more tiles, less
    # interpolation error on the window's oldest tile, more bytes per busy entity.
    tiles_per_window: int = 12
    # Precompiled lookups, one (name, ((tuple index or None, field), ...)) per entity.
    _plan: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        entities = {str(k): tuple(v) for k, v in self.entities.items()}
        windows = tuple(int(w) for w in self.windows_ms)
        if not entities:
            raise ValueError("entities: at least one entity is needed")
        for name, fields in entities.items():
            if not name or not fields or not all(fields):
                raise ValueError(f"entities.{name}: needs a name and at least one field")
        if self.tiles_per_window < 1:
            raise ValueError(f"tiles_per_window: must be >= 1, got {self.tiles_per_window}")
        if not windows:
            raise ValueError("windows_ms: at least one window is needed")
        for w in windows:
            # A tile must be at least 1 ms, and rings are sized in tiles.
            if w < self.tiles_per_window:
                raise ValueError(f"windows_ms: {w} ms is shorter than tiles_per_window ms")
        labels = [window_label(w) for w in windows]
        if len(set(labels)) != len(labels):
            raise ValueError(f"windows_ms: repeated window in {list(windows)}")
        object.__setattr__(self, "entities", entities)
        object.__setattr__(self, "windows_ms", windows)
        plan = tuple((name, tuple((_TOP_LEVEL.get(f), f) for f in fields))
                     for name, fields in entities.items())
        object.__setattr__(self, "_plan", plan)

    def to_dict(self) -> dict:
        """What a reader of the counts needs (entities and windows), as JSON-able data: a
        model version records it (learners/model.py)."""
        return {"entities": {name: list(fields) for name, fields in self.entities.items()},
                "windows_ms": list(self.windows_ms)}

    @classmethod
    def from_dict(cls, data: dict) -> FeatureSpec:
        return cls(entities=data["entities"], windows_ms=data["windows_ms"])

    def missing_from(self, counted: FeatureSpec) -> list[str]:
        """The count features this spec reads that ``counted`` does not count: an entity it
        lacks (or counts from other fields), and the names of windows it lacks. A learner
        reading them would read 0 for ever.

        >>> FeatureSpec({"user": ("user_id",), "dh": ("device", "hour")}, (60_000,)).missing_from(
        ...     FeatureSpec())
        ['entity dh (device,hour)', 'imp_1m', 'clk_1m']
        """
        out = [f"entity {name} ({','.join(fields)})" for name, fields in self.entities.items()
               if counted.entities.get(name) != fields]
        have = set(counted.feature_names())
        return out + [n for n in self.feature_names() if n not in have]

    def entity_ids(self, imp: Impression) -> list[tuple[str, str]]:
        """(entity, id) for each entity whose fields the impression all has."""
        feats = imp[_FEATURES]
        out = []
        for name, fields in self._plan:
            if len(fields) == 1:  # most entities: no list, no join
                index, f = fields[0]
                v = imp[index] if index is not None else feats.get(f)
                if v is not None:
                    out.append((name, v if type(v) is str else str(v)))
                continue
            parts = []
            for index, f in fields:
                v = imp[index] if index is not None else feats.get(f)
                if v is None:
                    break
                parts.append(v if type(v) is str else str(v))
            else:
                out.append((name, ID_SEPARATOR.join(parts)))
        return out

    def feature_names(self) -> list[str]:
        names = []
        for w in self.windows_ms:
            label = window_label(w)
            names += [f"imp_{label}", f"clk_{label}"]
        return names
