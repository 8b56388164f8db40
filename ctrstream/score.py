"""`ctrstream score --user U --items I1,I2,...`: pCTR of candidate items for a user, ranked,
read from Redis exactly as a serving system would (learners/scorer.py)."""

from __future__ import annotations

import argparse
import sys
import time

import orjson

from features.spec import split_names
from flows.build import scorer as make_scorer
from flows.config import Config

MODELS = ("emb", "bopr", "ftrl")


def run(args: argparse.Namespace, cfg: Config) -> int:
    items = split_names(args.items)
    if not items:
        print("ctrstream score: --items needs at least one item id", file=sys.stderr)
        return 2
    context = {"device": args.device, "position": args.position,
               "hour": args.hour if args.hour is not None else time.gmtime().tm_hour}
    scorer = make_scorer(cfg)
    t0 = time.perf_counter()
    scores = scorer.score(args.user, items, context)
    ms = (time.perf_counter() - t0) * 1000
    scores.sort(key=lambda s: s[args.by], reverse=True)
    if args.json:
        out = {"user_id": args.user, "context": context, "version": scorer.version,
               "ranked_by": args.by, "scores": scores}
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    print(f"user {args.user}, {context}, model version {scorer.version}, ranked by "
          f"{args.by} ({ms:.1f} ms)")
    print(f"{'rank':>4}  {'item':<12} {'emb':>8} {'bopr':>8} {'± std':>7} {'ftrl':>8}")
    for rank, s in enumerate(scores, 1):
        print(f"{rank:>4}  {s['item_id']:<12} {s['emb']:>8.4f} {s['bopr']:>8.4f} "
              f"{s['bopr_std']:>7.3f} {s['ftrl']:>8.4f}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "score", help="pCTR of candidate items for a user, from the models in Redis",
        description="Reads the current model version, the user's and the items' count "
                    "features and the items' attributes from Redis, and prints each item's "
                    "pCTR by the embedding model, BOPR (with the spread of its score) and FTRL,"
                    " ranked. Exit 1 when Redis is unreachable or holds no model.")
    p.add_argument("--user", required=True, metavar="USER_ID")
    p.add_argument("--items", required=True, metavar="I1,I2,...")
    p.add_argument("--device", default="mobile")
    p.add_argument("--position", type=int, default=0)
    p.add_argument("--hour", type=int, help="hour of day, UTC (default: now)")
    p.add_argument("--by", choices=MODELS, default="emb", help="rank by (default emb)")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=run)
