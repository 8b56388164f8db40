"""`ctrstream retrain`: the daily full retrain of one day of archived examples
(learners/retrain.py), published as a new model version unless it is worse than the online
models on the day's last hours.

    ctrstream retrain [--date YYYY-MM-DD] [--force] [--dry-run] [--json] [--seed N]
                      [--eval progressive|frozen] [--min-gain-se Z] [--threads N]
                      [--no-progress]

Model by model: a retrained model goes into the version only when it beats its online state
on the holdout by more than --min-gain-se paired standard errors; else the version holds
that model's online state, and the summary says why ("keeps online"). Refused when no model
does.

Exit codes: 0 published (or, with --dry-run, it would be); 1 Redis or the model store
failed; 2 bad arguments, or no archived examples for the date; 3 refused (no model passes
the rule, or nothing to compare with; with --dry-run: it would be); 4 another retrain
published while this one ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import logging
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import orjson
import torch
from tqdm import tqdm

from flows.build import model_store, retrain_settings
from flows.config import Config
from learners.archive import ExampleArchive
from learners.model import MODELS
from learners.retrain import (
    EVALUATIONS,
    NoArchive,
    RetrainResult,
    parse_min_gain_se,
    retrain,
)

log = logging.getLogger(__name__)

EXIT = {"published": 0, "dry_run": 0, "refused": 3, "conflict": 4}


def _date(text: str) -> str:
    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None


def _positive(text: str) -> int:
    if not text.isdecimal() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def yesterday_utc(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.UTC)
    return (now.date() - dt.timedelta(days=1)).isoformat()


def corrections_pending(cfg: Config, date: str, now_ms: int | None = None) -> str | None:
    """A warning when late-click corrections for the day's last impressions can still come:
    the joiner reports a late click up to max(late_click_horizon, wait_window) after its
    impression."""
    end = int(dt.datetime.combine(dt.date.fromisoformat(date) + dt.timedelta(days=1),
                                  dt.time(), dt.UTC).timestamp() * 1000)
    settled = end + max(cfg.join.late_click_horizon_ms, cfg.join.wait_window_ms)
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    if now_ms >= settled:
        return None
    at = dt.datetime.fromtimestamp(settled / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M")
    return (f"late clicks on {date}'s last impressions can be reported until {at} UTC "
            "(join.late_click_horizon_ms after them): their corrections may be missing; "
            "retrain after that time for complete labels")


def _ne(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def summary(res: RetrainResult, cfg: Config,
            min_gain_se: Mapping[str, float] | None = None) -> str:
    if min_gain_se is None:
        min_gain_se = retrain_settings(cfg).min_gain_se
    head = {"published": f"published version {res.version}"
                         + (f" (was {res.previous})" if res.previous else ""),
            "refused": "REFUSED: not published"
                       + (f" (written as version {res.version}, the next day's warm start)"
                          if res.version else ""),
            "conflict": f"NOT PUBLISHED: version {res.version} left unpublished",
            "dry_run": "dry run: not published"
                       + (" (would be refused)" if res.reason else " (would be published)")}
    lines = [f"retrain {res.date}: {head[res.status]}"
             + (" despite the rule (--force)" if res.forced else "")]
    late = f", {res.late_positives:,} of them by late clicks" if res.positives else ""
    lines.append(f"  examples      {res.examples:,} usable of {res.rows:,} archived; "
                 f"{res.positives:,} positive{late}")
    cover = ("" if math.isnan(res.online_coverage)
             else f"; online predictions for {res.online_coverage:.1%}")
    lines.append(f"  train/holdout {res.train_examples:,} / {res.holdout_examples:,} "
                 f"(holdout: the last {cfg.learn.holdout_fraction:.0%} of the day, "
                 f"{res.holdout_positives:,} positive{cover})")
    lines.append("  warm start    " + (f"version {res.base} (retrain of {res.base_date})"
                                       if res.base else "none: fresh models"))
    if res.ne_online:
        lines.append(f"  holdout NE    {'online':>8} {'retrained':>10} {'diff':>8} "
                     f"{'± 2 se':>7}   (frozen: before learning any of the holdout)")
        for m in MODELS:
            on, new = res.ne_online[m], res.ne_retrained[m]
            se = res.ne_difference_se.get(m, float("nan"))
            lines.append(f"    {m:<11} {_ne(on):>8} {_ne(new):>10} {new - on:>+8.4f} "
                         f"{2 * se:>7.4f}   (frozen {_ne(res.ne_retrained_frozen.get(m))})")
        gain = "".join(f", {m} NE < online NE - {z:g} paired se"
                       for m, z in min_gain_se.items())
        lines.append(f"  rule          per model: retrained NE <= online NE + "
                     f"{cfg.learn.max_ne_regression:g}{gain} ({res.evaluation}); else the "
                     "model keeps its online state")
        for m in MODELS:
            if m in res.kept_online and not res.forced:
                lines.append(f"  keeps online  {res.kept_online[m]}"
                             + (f" (replayed online NE "
                                f"{_ne(res.ne_online_replayed.get(m))})"
                                if res.ne_online_replayed else ""))
    if res.reason:
        lines.append(f"  {'overridden' if res.forced else 'reason':<13} {res.reason}")
    if res.published_over:
        lines.append(f"  published over online version(s) {', '.join(res.published_over)}, "
                     "published by the learn flow meanwhile")
    for w in res.warnings:
        lines.append(f"  warning       {w}")
    t = res.timings_s
    parts = ", ".join(f"{k} {v:.1f}" for k, v in t.items())
    lines.append(f"  time          {res.elapsed_s:.1f} s ({parts}); training "
                 f"{res.train_examples_per_s:,.0f} examples/s")
    return "\n".join(lines)


def run(args: argparse.Namespace, cfg: Config) -> int:
    date = args.date or yesterday_utc()
    root = Path(cfg.data_dir) / "archive"
    if not root.is_dir():  # ExampleArchive would create it; a typo'd data_dir should not
        print(f"ctrstream retrain: {NoArchive(date, str(root), [])} (no archive directory)",
              file=sys.stderr)
        return 2
    archive = ExampleArchive(root)
    # Batches of a few hundred examples: more threads did not help, and on a busy 2-core
    # machine 2 threads trained the embedding model 5-8x slower than 1 (35-55k vs 6-7k
    # examples/s, EmbeddingLearner.train_epoch).
    torch.set_num_threads(args.threads)
    pending = corrections_pending(cfg, date)
    if pending:
        log.warning("retrain %s: %s", date, pending)
    progress = None if args.no_progress else functools.partial(
        tqdm, file=sys.stderr, unit="batch", dynamic_ncols=True, disable=None)
    settings = retrain_settings(cfg)
    if args.min_gain_se is not None:
        settings = dataclasses.replace(settings, min_gain_se=args.min_gain_se)
    res = retrain(settings, date, model_store(cfg), archive, seed=args.seed,
                  force=args.force, dry_run=args.dry_run, evaluation=args.eval,
                  progress=progress)
    if pending:
        res.warnings.append(pending)
    if args.json:
        sys.stdout.write(orjson.dumps(res.to_dict(), option=orjson.OPT_INDENT_2).decode()
                         + "\n")
    else:
        print(summary(res, cfg, settings.min_gain_se))
    code = EXIT[res.status]
    if res.status == "dry_run" and res.reason:
        code = 3
    if code:
        print(f"ctrstream retrain: {date} not published: {res.reason}", file=sys.stderr)
    return code


def _gains(text: str) -> dict[str, float]:
    try:
        return parse_min_gain_se(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "retrain", help="daily full retrain of one day of archived examples",
        description="Reads the day's examples from the archive (data_dir/archive, late clicks "
                    "applied), warm-starts from the previous retrain's version, trains on "
                    "all but the day's last learn.holdout_fraction (FTRL and BOPR two "
                    "shuffled passes, the embedding model one pass in time order), "
                    "compares it there with the online models model by model and publishes "
                    "a new version holding each retrained model that beats its online "
                    "state by --min-gain-se paired se (the others in their online state), "
                    "unless none does. "
                    "Exit 0 published, 1 Redis/store error, 2 no archive for the date, "
                    "3 refused, 4 another retrain published meanwhile.")
    p.add_argument("--date", type=_date, metavar="YYYY-MM-DD",
                   help="the day to retrain on (default: yesterday, UTC)")
    p.add_argument("--force", action="store_true",
                   help="publish even when the rule refuses (logged, and noted in the meta)")
    p.add_argument("--dry-run", action="store_true",
                   help="train and evaluate, do not publish (exit 3 if it would be refused)")
    p.add_argument("--json", action="store_true", help="the summary as JSON")
    p.add_argument("--seed", type=int, help="shuffle seed (default: learn.seed)")
    p.add_argument("--eval", choices=EVALUATIONS, default="progressive",
                   help="the retrained models' holdout NE the rule uses: predicted just "
                        "before learning each example, as the learn flow does (default), or "
                        "before learning any of the holdout")
    p.add_argument("--min-gain-se", type=_gains, metavar="Z|MODEL=Z,...",
                   help="paired standard errors of the holdout NE difference a model's "
                        "retrain must gain to replace its online state: Z for every model, "
                        "or by model (default learn.retrain_min_gain_se, emb=2; a model not "
                        "named only has to be within learn.max_ne_regression; a negative Z "
                        "lets a retrain up to Z se worse in)")
    p.add_argument("--threads", type=_positive, default=1, metavar="N",
                   help="torch threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)
