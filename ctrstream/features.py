"""`ctrstream features get | top`: look at the real-time features in Redis. Feature names and
the schema version come from the store's meta key, so this works without the feature spec."""

from __future__ import annotations

import argparse
import sys
import time

import orjson

from ctrstream.text import age, iso
from features.store import FeatureStore, MetaMissing, redact_url
from flows.build import feature_store
from flows.config import Config


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _table(header: tuple[str, str], rows: list[tuple[str, str]]) -> str:
    w0 = max(len(header[0]), *(len(a) for a, _ in rows))
    w1 = max(len(header[1]), *(len(b) for _, b in rows))
    lines = [f"{header[0]:<{w0}}  {header[1]:>{w1}}"]
    lines += [f"{a:<{w0}}  {b:>{w1}}" for a, b in rows]
    return "\n".join(lines)


def _get(args: argparse.Namespace, store: FeatureStore) -> int:
    row = store.get(args.entity, args.id)
    ts, missing = row.pop("_ts"), row.pop("_missing")
    if args.json:
        out = {"entity": args.entity, "id": args.id, "key": store.key(args.entity, args.id),
               "missing": missing, "ts_ms": ts, "ts": iso(ts) if ts is not None else None,
               "schema_version": store.schema_version, "features": row}
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    print(f"{args.entity} {args.id}  (key {store.key(args.entity, args.id)}, "
          f"schema version {store.schema_version})")
    if missing:
        print("missing: not in Redis (never written, or expired); showing the defaults")
    else:
        print(f"as of {iso(ts)}  ({age(time.time() - ts / 1000)})")
    print(_table(("feature", "value"), [(k, _fmt(v)) for k, v in row.items()]))
    return 0


def _top(args: argparse.Namespace, store: FeatureStore) -> int:
    if args.by not in store.feature_names:
        print(f"ctrstream features top: unknown feature {args.by!r}; the store has: "
              + ", ".join(store.feature_names), file=sys.stderr)
        return 2
    best = store.top(args.entity, args.by, args.n)
    if args.json:
        out = [{"id": id_, args.by: v} for id_, v in best]
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    if not best:
        print(f"no {args.entity} entities in the store")
        return 0
    print(f"top {len(best)} {args.entity} by {args.by}")
    print(_table((args.entity, args.by), [(id_, _fmt(v)) for id_, v in best]))
    return 0


def _migrate(cfg: Config) -> int:
    from flows.build import redis_client

    prefix = cfg.features.store_prefix
    started = time.monotonic()

    def progress(seen: int, rewritten: int) -> None:
        print(f"  {seen:,} keys scanned, {rewritten:,} rows rewritten "
              f"({time.monotonic() - started:.0f} s)", file=sys.stderr)

    n = FeatureStore.migrate(redis_client(cfg), prefix=prefix, progress=progress)
    where = f"feature store {prefix} on {redact_url(cfg.redis.url)}"
    if n is None:
        print(f"{where}: already packed rows, nothing to do")
    else:
        print(f"{where}: {n:,} rows rewritten as packed rows in "
              f"{time.monotonic() - started:.1f} s")
    return 0


def run(args: argparse.Namespace, cfg: Config) -> int:
    if args.action == "migrate":
        return _migrate(cfg)
    try:
        store = feature_store(cfg)  # names and version from the meta key
    except MetaMissing:
        raise MetaMissing(f"no feature store on {redact_url(cfg.redis.url)} (no "
                          f"{cfg.features.store_prefix}:meta key): nothing written yet, or "
                          "another Redis, db or features.store_prefix") from None
    try:
        return (_get if args.action == "get" else _top)(args, store)
    except ValueError as e:  # a bad entity name
        print(f"ctrstream features: {e}", file=sys.stderr)
        return 2


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "features", help="show real-time features from the Redis feature store",
        description="Read the feature store on redis.url (names and schema version from its "
                    "meta key). `get` prints one entity (a missing one reads as defaults, "
                    "exit 0); `top` scans every entity of a kind (a debugging tool, not for "
                    "serving); `migrate` rewrites a store written in the hash layout of "
                    "earlier versions as packed rows. Exit 1 when Redis is unreachable, holds "
                    "no feature store or one in the hash layout.")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    g = sub.add_parser("get", help="the features of one entity")
    g.add_argument("entity", metavar="ENTITY", help="entity kind, e.g. user or item")
    g.add_argument("id", metavar="ID")
    g.add_argument("--json", action="store_true", help="JSON instead of a table")
    t = sub.add_parser("top", help="the entities with the largest value of one feature")
    t.add_argument("entity", metavar="ENTITY")
    t.add_argument("--by", required=True, metavar="FEATURE")
    t.add_argument("-n", type=int, default=10, help="how many (default 10)")
    t.add_argument("--json", action="store_true", help="JSON instead of a table")
    sub.add_parser("migrate", help="rewrite a store of the hash layout as packed rows",
                   description="Rewrite every entity of a feature store written by ctrstream "
                               "before packed rows (one hash per entity) as one packed string, "
                               "keeping its TTL; the readers and writers refuse such a store "
                               "until then. Stop the join flow first. Safe to run again.")
    p.set_defaults(func=run)
