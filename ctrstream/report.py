"""`ctrstream report [--out FILE.html]`: one self-contained HTML page of plots from what the
flows left in ``data_dir`` and Redis; no broker needed.

- model quality over time: each log line of the learn flow (learn/history.jsonl);
- click coverage against the wait window: the click delays in the learn flow's example archive
  (joined clicks and late-click corrections);
- labeled CTR and join rate over time, quarantine marked: the join's log lines
  (join/history-p<i>.jsonl);
- feature freshness: the ``_ts`` of a sample of the feature store's rows in Redis.

A figure whose data is missing says so in place of its plot. The plots are inline SVG.
"""

from __future__ import annotations

import argparse
import html
import io
import logging
import math
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson

from flows.config import Config
from learners.metrics import slice_range

log = logging.getLogger(__name__)

MODEL_NAMES = {"ftrl": "FTRL-Proximal", "bopr": "BOPR", "emb": "ID embeddings"}
COLORS = {"ftrl": "#1f77b4", "bopr": "#d62728", "emb": "#2ca02c"}
FIGURES = ["learn-ne", "learn-calibration", "click-coverage", "join-ctr", "join-state",
           "feature-freshness"]


def read_jsonl(path: Path) -> list[dict]:
    """Lines of a history file, the rotated ``<path>.1`` first; a torn last line is skipped."""
    out = []
    for p in (path.with_name(path.name + ".1"), path):
        if not p.exists():
            continue
        for line in p.read_bytes().splitlines():
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue  # a line being written while we read
    return out


def _fmt(x: float, spec: str = ".4f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _num(x) -> float:
    return float("nan") if x is None else float(x)


# -- figures: each returns (matplotlib Figure, caption) -----------------------------------------


def _empty(title: str, why: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 2.2))
    ax = fig.subplots()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, f"no data: {why}", ha="center", va="center", fontsize=12, color="#666")
    return fig, f"No data: {why}."


def learn_figures(cfg: Config) -> list:
    from flows.learn import history_path

    path = history_path(cfg)
    rows = [r for r in read_jsonl(path) if r.get("metrics")]
    if not rows:
        why = f"no learn history in {path} (run the learn flow)"
        return [_empty("Normalized entropy over time", why),
                _empty("Calibration over time", why)]
    from matplotlib.figure import Figure

    x = np.array([r["counts"]["learned"] for r in rows])
    last = rows[-1]
    models = [m for m in MODEL_NAMES if m in last["metrics"]]
    span = (rows[-1]["ts"] - rows[0]["ts"]) / 1000
    out = []
    for what, title, ref in (("ne", "Normalized entropy (progressive) over time", None),
                             ("calibration", "Calibration (mean prediction / CTR) over time",
                              1.0)):
        fig = Figure(figsize=(9, 3.6), layout="constrained")
        ax = fig.subplots()
        for m in models:
            ys = [_num(r["metrics"][m].get(f"window_{what}")) for r in rows]
            ax.plot(x, ys, color=COLORS[m], label=f"{MODEL_NAMES[m]}, recent window")
            ys = [_num(r["metrics"][m].get(what)) for r in rows]
            ax.plot(x, ys, color=COLORS[m], linestyle="--", linewidth=0.9,
                    label=f"{MODEL_NAMES[m]}, since start")
        if ref is not None:
            ax.axhline(ref, color="#888", linewidth=0.8)
        ax.set_xlabel("examples learned")
        ax.set_ylabel(what)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=3, loc="upper right")
        finals = "; ".join(
            f"{MODEL_NAMES[m]} {_fmt(last['metrics'][m][what], '.4f' if what == 'ne' else '.3f')}"
            f" (recent window {_fmt(last['metrics'][m][f'window_{what}'], '.4f')})"
            for m in models)
        caption = (f"{'NE' if what == 'ne' else 'Calibration'} of each model's progressive "
                   f"predictions (each example predicted before it is learned), from "
                   f"{len(rows)} log lines over {span:.0f} s of the learn flow, "
                   f"{int(x[-1]):,} examples learned. Final, since the start: {finals}.")
        if what == "ne":
            aucs = ", ".join(f"{MODEL_NAMES[m]} {_fmt(last['metrics'][m]['auc'], '.3f')}"
                             for m in models)
            caption += f" AUC: {aucs}. Lower NE is better; 1.0 is the constant-CTR predictor."
        else:
            caption += " 1.0 is calibrated."
        out.append((fig, caption))
    return out


def read_archive(cfg: Config, days: int):
    """(table of ts, label, click_ts, late_click, quarantined over the latest ``days``
    archive days, the days) or (None, why)."""
    import pyarrow as pa

    from learners.archive import ExampleArchive

    archive = ExampleArchive(Path(cfg.data_dir) / "archive")
    use = archive.days()[-days:] if days else archive.days()
    if not use:
        return None, f"no example archive in {archive.root} (run the learn flow)"
    cols = ["ts", "label", "click_ts", "late_click", "quarantined"]
    t = pa.concat_tables([archive.read_day(d).select(cols) for d in use])
    return t, use


def _join_totals(cfg: Config) -> dict:
    """The join's counters summed over its partitions' stats files ({} if none)."""
    total: dict = {}
    for p in (Path(cfg.data_dir) / "join").glob("stats-p*.json"):
        for k, v in orjson.loads(p.read_bytes()).items():
            if isinstance(v, int) and not isinstance(v, bool):
                total[k] = total.get(k, 0) + v
    return total


def coverage_figure(cfg: Config, archived):
    title = "Click coverage against the wait window"
    t, use = archived
    if t is None:
        return _empty(title, use)
    clicked = t.filter(t["click_ts"].is_valid())
    # a click stamped before its impression (clock skew) has delay 0, as in the join
    d = np.sort(np.maximum(clicked["click_ts"].to_numpy() - clicked["ts"].to_numpy(), 0))
    d = d / 60_000
    if not len(d):
        return _empty(title, f"no clicks in archive days {use[0]}..{use[-1]}")
    from matplotlib.figure import Figure

    late = int(np.sum(clicked["late_click"].to_numpy(zero_copy_only=False)))
    window = cfg.join.wait_window_ms / 60_000
    grid = np.geomspace(1 / 60, max(d[-1], window * 2), 400)
    cov = np.searchsorted(d, grid, side="right") / len(d)
    at_window = np.searchsorted(d, window, side="right") / len(d)
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.plot(grid, cov, color="#1f77b4")
    ax.set_xscale("log")
    ax.axvline(window, color="#d62728", linestyle="--", linewidth=1)
    ax.annotate(f"wait window {window:g} min: {at_window:.1%}", (window, at_window),
                xytext=(8, -18), textcoords="offset points", color="#d62728")
    ax.set_xlabel("wait window w (minutes, log scale)")
    ax.set_ylabel("clicks with delay <= w")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    q50, q90, q99 = np.quantile(d, [0.5, 0.9, 0.99])
    orphans = _join_totals(cfg).get("clicks_orphan")
    caption = (
        f"Fraction of clicks whose delay after their impression is at most w, for "
        f"{len(d):,} clicks on {t.num_rows:,} impressions in the learn flow's archive (days "
        f"{use[0]}..{use[-1]}): {len(d) - late:,} joined within the window and {late:,} "
        f"late-click corrections. At the configured window of {window:g} min, "
        f"{at_window:.2%} of them were joined; half came within {q50:.2f} min, 90% within "
        f"{q90:.1f} min, 99% within {q99:.1f} min. Orphan clicks (their impression never "
        f"seen, or no longer remembered: "
        + (f"{orphans:,} in the join's counters" if orphans is not None else "count unknown")
        + ") are not in the archive, so the true coverage is at most this.")
    return fig, caption


def _shade(axes, x, flags) -> list[tuple]:
    """Shade the spans of ``x`` where ``flags`` is true; returns them as (start, end)."""
    periods, start = [], None
    for i, f in enumerate(flags):
        if f and start is None:
            start = x[i - 1] if i else x[0]
        if not f and start is not None:
            periods.append((start, x[i]))
            start = None
    if start is not None:
        periods.append((start, x[-1]))
    for ax in axes:
        for lo, hi in periods:
            ax.axvspan(lo, hi, color="#ff7f0e", alpha=0.25, linewidth=0)
    if periods:
        axes[0].plot([], [], color="#ff7f0e", alpha=0.4, linewidth=8, label="quarantined")
        axes[0].legend(fontsize=8, loc="upper right")
    return periods


def join_ctr_figure(cfg: Config, archived, bins: int = 60):
    """By event time, from the archive: a replay emits its examples in a few bursts, so
    the join's cumulative counters, sampled every log interval, would give a handful of
    points; the archive has every example's label and its impression's time."""
    title = "Labeled CTR and join rate by event time"
    t, use = archived
    if t is None:
        return _empty(title, use)
    if not t.num_rows:
        return _empty(title, f"no examples in archive days {use[0]}..{use[-1]}")
    from matplotlib.figure import Figure

    ts = t["ts"].to_numpy()
    late = t["late_click"].to_numpy(zero_copy_only=False)
    joined = (t["label"].to_numpy() == 1) & ~late  # as emitted: corrections came later
    quarantined = t["quarantined"].fill_null(False).to_numpy(zero_copy_only=False)
    edges = np.linspace(ts.min(), ts.max() + 1, bins + 1)
    b = np.searchsorted(edges, ts, side="right") - 1
    n = np.bincount(b, minlength=bins)
    pos = np.bincount(b, weights=joined, minlength=bins)
    lat = np.bincount(b, weights=late, minlength=bins)
    quar = np.bincount(b, weights=quarantined, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        ctr = np.where(n > 0, pos / n, np.nan)
        rate = np.where(pos + lat > 0, pos / (pos + lat), np.nan)
    x = [datetime.fromtimestamp(e / 1000, UTC) for e in edges]
    mid = [a + (c - a) / 2 for a, c in zip(x[:-1], x[1:], strict=True)]
    fig = Figure(figsize=(9, 4.6), layout="constrained")
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    ax1.plot(mid, ctr, marker=".", color="#1f77b4", label="labeled CTR")
    ax1.set_ylabel("labeled CTR")
    ax1.set_title(title)
    ax2.plot(mid, rate, marker=".", color="#2ca02c")
    ax2.set_ylabel("joined / (joined + late)")
    ax2.set_ylim(0, 1.02)
    ax2.set_xlabel(f"impression time (UTC), {bins} bins of "
                   f"{(edges[1] - edges[0]) / 60_000:.1f} min")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    # flag i covers (x[i-1], x[i]]: bin k ends at edge k + 1
    periods = _shade([ax1, ax2], x, [False, *(quar > 0).tolist()])
    total_q = int(quarantined.sum())
    caption = (
        f"{t.num_rows:,} examples of the learn flow's archive (days {use[0]}..{use[-1]}) by "
        f"their impression's time. Top: share labeled positive by the join (a click within "
        f"the wait window), overall {joined.mean():.2%}. Bottom: of those clicks plus the "
        f"late-click corrections, the share joined in time, overall "
        f"{joined.sum() / max(joined.sum() + late.sum(), 1):.2%}. "
        + (f"Shaded: {len(periods)} span(s) holding {total_q:,} quarantined examples (not "
           "learned)." if total_q else "No example was quarantined."))
    return fig, caption


def join_state_figure(cfg: Config):
    """The join's own log lines over wall-clock time: queue, consumer lag, quarantine."""
    paths = sorted((Path(cfg.data_dir) / "join").glob("history-p*.jsonl"))
    rows = sorted((r for p in paths for r in read_jsonl(p)), key=lambda r: r["ts"])
    title = "Join state over time (its log lines)"
    if not rows:
        return _empty(title, f"no join history in {Path(cfg.data_dir) / 'join'} "
                      "(run the join flow)")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.6), layout="constrained")
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    parts = sorted({r["partition"] for r in rows})
    for p in parts:
        mine = [r for r in rows if r["partition"] == p]
        x = [datetime.fromtimestamp(r["ts"] / 1000, UTC) for r in mine]
        ax1.plot(x, [r["pending"] for r in mine], marker=".", label=f"p{p}")
        ax2.plot(x, [sum((r.get("consumer_lag") or {}).values()) for r in mine], marker=".")
    ax1.set_ylabel("impressions pending\n(HashQueue)")
    ax1.set_title(title)
    ax2.set_ylabel("consumer lag\n(messages)")
    ax2.set_xlabel("wall-clock time (UTC)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    # quarantined at a line's time if any partition's latest line says so
    latest, flags = {}, []
    for r in rows:
        latest[r["partition"]] = r["quarantined"]
        flags.append(any(latest.values()))
    x = [datetime.fromtimestamp(r["ts"] / 1000, UTC) for r in rows]
    periods = _shade([ax1, ax2], x, flags)
    ax1.legend(fontsize=8, loc="upper right", ncol=min(len(parts), 8) + bool(periods))
    last = {r["partition"]: r for r in rows}
    bad = sum(1 for r in rows if r.get("reconcile_errors"))
    q_s = sum((hi - lo).total_seconds() for lo, hi in periods)
    caption = (
        f"{len(rows):,} log lines of {len(parts)} join partition(s) over "
        f"{(rows[-1]['ts'] - rows[0]['ts']) / 1000:.0f} s. Top: impressions waiting for their "
        f"wait window to close, peak {max(r['pending'] for r in rows):,}, at the end "
        f"{sum(r['pending'] for r in last.values()):,}. Bottom: messages not read yet in the "
        f"partition's input topics (from the high watermark the consumer last fetched), peak "
        f"{max(sum((r.get('consumer_lag') or {}).values()) for r in rows):,}. "
        f"Conservation equations broken in {bad} line(s). "
        + (f"Shaded: {len(periods)} period(s), {q_s:.0f} s in all, while a partition "
           "quarantined its examples." if periods else "No partition was quarantined."))
    return fig, caption


def _scan_keys(client, prefix: str, n: int, max_calls: int = 200) -> list[bytes]:
    """Up to ``n`` row keys of the feature store, by SCAN (bounded: a huge shared keyspace
    is sampled, not walked)."""
    pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + ":{*"
    keys, cursor = [], 0
    for _ in range(max_calls):
        cursor, batch = client.scan(cursor, match=pattern, count=1000)
        keys += batch
        if cursor == 0 or len(keys) >= n:
            break
    return keys[:n]


def freshness_figure(cfg: Config, sample: int):
    import redis

    from features.store import redact_url, row_ts
    from flows.build import redis_client

    title = "Feature freshness: event time since each row was last written"
    try:
        client = redis_client(cfg.replace(redis={"socket_timeout_s": 5.0,
                                                 "connect_timeout_s": 2.0}))
        keys = _scan_keys(client, cfg.features.store_prefix, sample)
        mget = client.mget_nonatomic if cfg.redis.cluster else client.mget
        raw = mget(keys) if keys else []
    except redis.RedisError as e:
        return _empty(title, f"Redis {redact_url(cfg.redis.url)} not readable "
                      f"({type(e).__name__})")
    rows = [(k.decode(errors="replace"), t) for k, t in
            zip(keys, map(row_ts, raw), strict=True) if t is not None]
    if not rows:
        return _empty(title, f"no rows under {cfg.features.store_prefix}:{{...}} in "
                      f"{redact_url(cfg.redis.url)} (run the join flow with features on)")
    from matplotlib.figure import Figure

    newest = max(t for _, t in rows)
    by_entity: dict[str, list[float]] = {}
    for key, t in rows:
        entity = key.split("{", 1)[1].split(":", 1)[0]
        by_entity.setdefault(entity, []).append((newest - t) / 60_000)
    ages = np.array([a for v in by_entity.values() for a in v])
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax = fig.subplots()
    top = max(float(ages.max()), 1e-3)
    edges = np.linspace(0, top, 41)
    for entity, v in sorted(by_entity.items()):
        ax.hist(v, bins=edges, histtype="step", linewidth=1.4, label=f"{entity} ({len(v):,})")
    ax.set_xlabel("minutes of event time behind the freshest sampled row")
    ax.set_ylabel("rows")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    q50, q90 = np.quantile(ages, [0.5, 0.9])
    wall = time.time() - newest / 1000
    caption = (
        f"{len(rows):,} rows sampled by SCAN from {redact_url(cfg.redis.url)} (prefix "
        f"{cfg.features.store_prefix!r}). Each row holds its counts as of the newest event the "
        f"counters had seen when it was written (_ts); a row is written again when its entity "
        f"gets an event or one of its windows slides past its last one. Behind the freshest "
        f"row: median {q50:.1f} min, 90% {q90:.1f} min, max {ages.max():.1f} min. The freshest "
        f"row is {wall / 60:,.1f} min of wall-clock time old: near zero for a live stream, "
        f"the age of the data for a replay or a simulated stream.")
    return fig, caption


# -- the page ------------------------------------------------------------------------------------


def _svg(fig, salt: str) -> str:
    import matplotlib

    # Unique ids per figure: several SVGs inline in one page share one id namespace.
    with matplotlib.rc_context({"svg.hashsalt": salt, "svg.fonttype": "none"}):
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]


CSS = """body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222}
figure{margin:2em 0;border-top:1px solid #ddd;padding-top:1em}
figcaption{font-size:0.92em;line-height:1.4;color:#333}
svg{max-width:100%;height:auto}
table{border-collapse:collapse;font-size:0.92em}td,th{padding:2px 10px;text-align:right}"""


def _ne_order(summary: dict) -> tuple[bool, float]:
    ne = _num(summary.get("ne"))
    return math.isnan(ne), ne


def _summary_table(cfg: Config) -> str:
    from flows.learn import stats_path

    cells = []
    p = stats_path(cfg)
    if p.exists():
        s = orjson.loads(p.read_bytes())
        c = s["counts"]
        cells.append(f"<p>Learn flow: {c.get('in', 0):,} records in, {c.get('learned', 0):,} "
                     f"learned, {c.get('duplicates', 0):,} duplicates, "
                     f"{c.get('corrections', 0):,} late-click corrections, model version "
                     f"{html.escape(str(s.get('version')))}.</p>")
        rows = "".join(
            f"<tr><td style='text-align:left'>{MODEL_NAMES.get(m, m)}</td>"
            f"<td>{_fmt(v['ne'])}</td><td>{_fmt(v['calibration'], '.3f')}</td>"
            + "".join(f"<td>{_fmt(lo, '.2f')}-{_fmt(hi, '.2f')}</td>"
                      for lo, hi in (slice_range(v, "position"), slice_range(v, "hour")))
            + f"<td>{_fmt(v['auc'], '.3f')}</td></tr>"
            for m, v in sorted(s["metrics"].items(), key=lambda mv: _ne_order(mv[1])))
        cells.append("<table><tr><th style='text-align:left'>model (best NE first)</th>"
                     "<th>NE</th><th>calibration</th><th>by position (min-max)</th>"
                     f"<th>by hour (min-max)</th><th>AUC</th></tr>{rows}</table>")
    return "\n".join(cells)


def write_report(cfg: Config, out: str | Path | None = None, *, days: int = 2,
                 sample: int = 5000) -> Path:
    """Writes the HTML report (default ``data_dir/report.html``) and returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # no display; Figure objects need no pyplot state either
    out = Path(out) if out else Path(cfg.data_dir) / "report.html"
    archived = read_archive(cfg, days)
    made = [*learn_figures(cfg), coverage_figure(cfg, archived), join_ctr_figure(cfg, archived),
            join_state_figure(cfg), freshness_figure(cfg, sample)]
    parts = []
    for fid, (fig, caption) in zip(FIGURES, made, strict=True):
        parts.append(f'<figure id="{fid}">\n{_svg(fig, fid)}\n'
                     f"<figcaption>{html.escape(caption)}</figcaption>\n</figure>")
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    page = (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>ctrstream report</title><style>{CSS}</style></head><body>\n"
            f"<h1>ctrstream report</h1>\n<p>{when}, data from "
            f"<code>{html.escape(str(Path(cfg.data_dir).resolve()))}</code>; made by "
            f"<code>ctrstream report</code>.</p>\n{_summary_table(cfg)}\n"
            + "\n".join(parts) + "\n</body></html>\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page)
    tmp.replace(out)
    return out


def _cmd(args: argparse.Namespace, cfg: Config) -> int:
    print(write_report(cfg, args.out, days=args.days, sample=args.sample))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="an HTML report of model quality, join and features",
                       description="Write a self-contained HTML page of plots from data_dir "
                       "(learn and join history, the example archive) and the feature store.")
    p.add_argument("--out", metavar="FILE.html", help="where (default: data_dir/report.html)")
    p.add_argument("--days", type=int, default=2,
                   help="archive days for the click coverage, the latest (0: all; default 2)")
    p.add_argument("--sample", type=int, default=5000,
                   help="feature store rows to sample for freshness (default 5000)")
    p.set_defaults(func=_cmd)
