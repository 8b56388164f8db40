"""`ctrstream embeddings get user|item ID` and `ctrstream recommend --user U -k 10`: look at the
embedding rows of the current model version in Redis, and retrieve items with them.

`embeddings get` reads the ID's own row, or, when it has none (seen fewer than
``learn.emb_min_count`` times, or evicted), the shared fallback row a scorer would use in its
place, marked as such. A row is ``dim`` floats and the ID's bias (``dim + 1`` floats in Redis,
the bias last); its time is the event time of the last example that touched it.

`recommend` is retrieval then ranking. Retrieval scores every item row of the version by
``<u, v> + b_v`` (the part of the embedding model's logit that depends on the user and the item
only: the user's bias is the same for every item, and the dense part needs each item's
features), keeping the best ``--candidates``. Ranking scores those with `Scorer.score` (the
models' pCTRs with the items' real-time counts and the request's context) and prints the top
``k``. Retrieval reads the whole ``emb:item`` hash with HSCAN: O(items) per request, fine for a
command line on a laptop-sized catalog, not how a serving system would retrieve (that needs an
ANN index built from the same rows). HSCAN may return a row twice (counted once) and, while a
full push swaps the hash, may miss rows; an incremental push only changes values.

    ctrstream embeddings get user u17 [--json]
    ctrstream recommend --user u17 -k 10 [--candidates 100] [--by emb|bopr|ftrl] [--json]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import numpy as np
import orjson

from ctrstream.text import age, iso
from flows.build import model_store
from flows.build import scorer as make_scorer
from flows.config import Config
from learners.embeddings import FALLBACK_PREFIX, serving_keys
from learners.publish import ModelStore, ModelStoreError, Rows, _decode_rows, _Layout

TABLES = ("user", "item")
RANK_BY = ("emb", "bopr", "ftrl")
_FALLBACK = FALLBACK_PREFIX.encode()


class ServedRow:
    """The row a scorer uses for one ID: its own, else its fallback row (``own`` False)."""

    def __init__(self, table: str, id_: str, fallback_rows: int, rows: Rows) -> None:
        self.table, self.id = table, id_
        self.own_key, self.fallback_key = serving_keys(id_, fallback_rows)
        self.fallback_row = int(self.fallback_key[len(FALLBACK_PREFIX):])
        self.own = bool(rows.found[0])
        self.found = self.own or bool(rows.found[1])
        i = 0 if self.own else 1
        self.row = rows.vectors[i].astype(np.float64)
        self.updated_ms = int(rows.updated_ms[i])

    @property
    def vector(self) -> np.ndarray:
        return self.row[:-1]

    @property
    def bias(self) -> float:
        return float(self.row[-1])


def served_rows(store: ModelStore, table: str, ids: Sequence[str],
                attempts: int = 3) -> tuple[str, dict, list[ServedRow]]:
    """(version, its meta, the served row of each ID), all from the current version."""
    version = store.current()
    for _ in range(attempts):
        if version is None:
            raise ModelStoreError(f"no model published in {store.prefix} yet (run the learn "
                                  "flow, or the daily retrain)")
        meta = store.get_meta(version)
        if meta is None:
            raise ModelStoreError(f"model version {version} of {store.prefix} has no meta")
        n = meta["fallback_rows"]
        keys = [k for i in ids for k in serving_keys(i, n)]
        snap = store.read_consistent(rows={table: keys})
        if snap.version == version:
            r = snap.rows[table]
            return version, meta, [
                ServedRow(table, i, n, Rows(r.vectors[2 * j:2 * j + 2],
                                            r.updated_ms[2 * j:2 * j + 2],
                                            r.found[2 * j:2 * j + 2]))
                for j, i in enumerate(ids)]
        version = snap.version  # published between the reads
    raise ModelStoreError(f"{store.pointer_key} moved during each of {attempts} reads")


def scan_rows(store: ModelStore, version: str, table: str, batch: int = 2000):
    """Every own row of ``table`` in ``version`` (fallback rows skipped), as (ids, Rows)
    batches of about ``batch``, decoded as `ModelStore` decodes its rows. HSCAN: a row may
    come twice."""
    key = store.key(version, f"emb:{table}")
    spec = store.client.hget(store.key(version, "layout"), f"emb:{table}")
    if spec is None:
        raise ModelStoreError(f"version {version!r} has no emb:{table} (version expired?)")
    layout = _Layout.parse(spec)
    cursor = 0
    while True:
        cursor, found = store.client.hscan(key, cursor, count=batch)
        fields = [f for f in found if not f.startswith(_FALLBACK)]
        if fields:
            raw = [found[f] for f in fields]
            yield [f.decode() for f in fields], _decode_rows(key, fields, raw, layout)
        if cursor == 0:
            return


def retrieve(store: ModelStore, version: str, user_row: np.ndarray, n: int,
             batch: int = 2000) -> tuple[list[tuple[str, float]], int]:
    """The ``n`` items of ``version`` with the highest ``<u, v> + b_v`` (float64; ties by id),
    best first, and the number of item rows scanned."""
    u = np.asarray(user_row, np.float64)
    best_ids, best = np.array([], dtype=str), np.array([], dtype=np.float64)
    scanned = 0
    for ids, rows in scan_rows(store, version, "item", batch):
        v = rows.vectors.astype(np.float64)
        scanned += len(ids)
        ids_all = np.concatenate([best_ids, np.array(ids, dtype=str)])
        s_all = np.concatenate([best, v[:, :-1] @ u[:-1] + v[:, -1]])
        _, first = np.unique(ids_all, return_index=True)  # HSCAN may repeat a row
        ids_all, s_all = ids_all[first], s_all[first]
        top = np.lexsort((ids_all, -s_all))[:n]
        best_ids, best = ids_all[top], s_all[top]
    return [(str(i), float(s)) for i, s in zip(best_ids, best, strict=True)], scanned


def _context(args: argparse.Namespace) -> dict:
    return {"device": args.device, "position": args.position,
            "hour": args.hour if args.hour is not None else time.gmtime().tm_hour}


def _row_json(r: ServedRow, version: str, meta: dict, decimals: int | None = None) -> dict:
    def num(x):
        return float(x) if decimals is None else round(float(x), decimals)

    return {"table": r.table, "id": r.id, "version": version, "own_row": r.own,
            "fallback_row": None if r.own else r.fallback_row,
            "key": r.own_key if r.own else r.fallback_key,
            "updated_ms": r.updated_ms or None,
            "updated": iso(r.updated_ms) if r.updated_ms > 0 else None,
            "age_s": time.time() - r.updated_ms / 1000 if r.updated_ms > 0 else None,
            "dim": len(r.vector), "bias": num(r.bias), "vector": [num(x) for x in r.vector],
            "model_source": meta.get("source"), "model_created_ms": meta.get("created_ms")}


def _get(args: argparse.Namespace, store: ModelStore) -> int:
    version, meta, (r,) = served_rows(store, args.table, [args.id])
    if not r.found:
        print(f"ctrstream embeddings: version {version} has neither a row for {args.table} "
              f"{args.id!r} nor its fallback row {r.fallback_row} (a broken version?)",
              file=sys.stderr)
        return 1
    if args.json:
        out = _row_json(r, version, meta)
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    created = meta.get("created_ms")
    print(f"{args.table} {args.id}  (model version {version}, {meta.get('source', '?')}"
          + (f", written {iso(created)}" if created else "") + f"; {store.prefix})")
    if r.own:
        print("row       own row")
    else:
        print(f"row       FALLBACK: {args.table} {args.id!r} has no row of its own (seen fewer "
              f"than emb_min_count times, or evicted); it is scored with the shared fallback "
              f"row {r.fallback_row}, shown here")
    if r.updated_ms > 0:
        print(f"updated   {iso(r.updated_ms)}  ({age(time.time() - r.updated_ms / 1000)}; "
              "event time of the last example that touched the row)")
    else:
        print("updated   never (no example has touched this row)")
    print(f"dim       {len(r.vector)}")
    print(f"bias      {r.bias:+.4f}")
    print("vector    [" + ", ".join(f"{x:+.4f}" for x in r.vector) + "]")
    return 0


def _recommend(args: argparse.Namespace, cfg: Config) -> int:
    scorer = make_scorer(cfg)
    store = scorer.models
    context = _context(args)
    t0 = time.perf_counter()
    version, meta, (user,) = served_rows(store, "user", [args.user])
    if not user.found:
        print(f"ctrstream recommend: version {version} has neither a row for user "
              f"{args.user!r} nor its fallback row {user.fallback_row}", file=sys.stderr)
        return 1
    n = max(args.candidates, args.k)
    candidates, scanned = retrieve(store, version, user.row, n)
    t1 = time.perf_counter()
    retrieval = {i: (rank, s) for rank, (i, s) in enumerate(candidates, 1)}
    scores = scorer.score(args.user, [i for i, _ in candidates], context)
    t2 = time.perf_counter()
    for s in scores:
        s["retrieval_rank"], s["retrieval"] = retrieval[s["item_id"]]
    scores.sort(key=lambda s: s[args.by], reverse=True)  # stable: ties keep retrieval order
    top = scores[:args.k]
    ms = {"retrieve": (t1 - t0) * 1000, "rerank": (t2 - t1) * 1000}
    if args.json:
        out = {"user_id": args.user, "version": version, "scorer_version": scorer.version,
               "context": context, "user_row": {"own": user.own, "fallback_row":
                                                None if user.own else user.fallback_row},
               "items_scanned": scanned, "ranked_by": args.by,
               "candidates": [{"item_id": i, "retrieval": s} for i, s in candidates],
               "results": top, "ms": ms}
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    who = "own row" if user.own else f"no own row: FALLBACK row {user.fallback_row}"
    print(f"user {args.user} ({who}), model version {version}, {context}")
    print(f"retrieval: {scanned:,} item rows scanned by <u, v> + b_v in {ms['retrieve']:.0f} ms"
          f" (a full scan per request), best {len(candidates)} kept; ranking by {args.by} in "
          f"{ms['rerank']:.0f} ms")
    if scorer.version != version:
        print(f"note: version {scorer.version} was published between retrieval and ranking; "
              "the pCTRs are from it")
    if not top:
        print("no items in this version")
        return 0
    print(f"{'rank':>4}  {'item':<12} {'retrieval':>9} {'(rank)':>6} {'emb':>8} {'bopr':>8} "
          f"{'± std':>7} {'ftrl':>8}")
    for rank, s in enumerate(top, 1):
        print(f"{rank:>4}  {s['item_id']:<12} {s['retrieval']:>+9.4f} {s['retrieval_rank']:>6} "
              f"{s['emb']:>8.4f} {s['bopr']:>8.4f} {s['bopr_std']:>7.3f} {s['ftrl']:>8.4f}")
    return 0


def run_embeddings(args: argparse.Namespace, cfg: Config) -> int:
    return _get(args, model_store(cfg))


def run_recommend(args: argparse.Namespace, cfg: Config) -> int:
    if args.k < 1 or args.candidates < 1:
        print("ctrstream recommend: -k and --candidates must be >= 1", file=sys.stderr)
        return 2
    return _recommend(args, cfg)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "embeddings", help="show an ID's embedding row from the current model version",
        description="Read a user's or an item's embedding row (vector and bias) from the "
                    "current model version in Redis; an ID without a row of its own shows the "
                    "shared fallback row it is scored with, marked FALLBACK. Exit 1 when "
                    "Redis is unreachable or holds no model.")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    g = sub.add_parser("get", help="the row of one ID, its version and age")
    g.add_argument("table", choices=TABLES)
    g.add_argument("id", metavar="ID")
    g.add_argument("--json", action="store_true", help="JSON (full precision) instead of text")
    p.set_defaults(func=run_embeddings)

    r = subparsers.add_parser(
        "recommend", help="top items for a user: embedding retrieval, then the scorer",
        description="Score every item row of the current model version by <u, v> + item bias "
                    "(a full scan of the item table: O(items) per request), keep the best "
                    "--candidates, score those with the models (as `ctrstream score`) and "
                    "print the top k. Exit 1 when Redis is unreachable or holds no model.")
    r.add_argument("--user", required=True, metavar="USER_ID")
    r.add_argument("-k", type=int, default=10, help="items to print (default 10)")
    r.add_argument("--candidates", type=int, default=100,
                   help="items kept by retrieval and re-ranked (default 100; at least k)")
    r.add_argument("--device", default="mobile")
    r.add_argument("--position", type=int, default=0)
    r.add_argument("--hour", type=int, help="hour of day, UTC (default: now)")
    r.add_argument("--by", choices=RANK_BY, default="emb", help="re-rank by (default emb)")
    r.add_argument("--json", action="store_true", help="JSON instead of a table")
    r.set_defaults(func=run_recommend)
