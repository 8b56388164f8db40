"""`ctrstream report`: a synthetic data dir (history files, archive, feature rows in Redis)
made into the HTML report, which headless Chromium then loads: every figure there, with its
plot, and a screenshot taken."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import uuid
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import orjson
import pytest

from ctrstream.report import FIGURES, write_report
from ctrstream.stack import free_port
from features.store import FeatureStore
from flows.build import redis_client
from flows.config import Config
from learners.archive import ExampleArchive

T0 = 1_700_000_000_000  # event time of the first impression
WALL0 = 1_700_100_000_000  # wall-clock time of the first log line
WINDOW_MS = 600_000
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _metrics(ne: float, cal: float, auc: float) -> dict:
    return {"n": 1, "ne": ne, "calibration": cal, "auc": auc, "window_ne": ne - 0.01,
            "window_calibration": cal, "window_auc": auc}


def make_data_dir(cfg: Config) -> dict:
    """Learn and join history, join stats, an archive and feature rows; returns what the
    captions should say."""
    data = Path(cfg.data_dir)
    (data / "learn").mkdir(parents=True)
    with open(data / "learn" / "history.jsonl", "wb") as f:
        for i in range(1, 21):
            f.write(orjson.dumps({
                "ts": WALL0 + i * 10_000, "version": "3",
                "counts": {"in": i * 1000, "learned": i * 1000},
                "metrics": {"ftrl": _metrics(1.2 - i * 0.01, 1.1, 0.6),
                            "bopr": _metrics(1.1 - i * 0.01, 1.0, 0.62),
                            "emb": _metrics(1.0 - i * 0.005, 0.9, 0.61)}}) + b"\n")
    (data / "join").mkdir()
    for p in (0, 1):
        with open(data / "join" / f"history-p{p}.jsonl", "wb") as f:
            for i in range(1, 31):
                f.write(orjson.dumps({
                    "ts": WALL0 + i * 5_000 + p, "partition": p, "impressions_in": i * 500,
                    "impressions_emitted": i * 400, "clicks_joined": i * 12, "clicks_late": i,
                    "clicks_orphan": 0, "pending": 100 + i, "held": 0, "watermark": T0 + i,
                    "quarantined": p == 1 and 10 <= i < 15, "reconcile_errors": [],
                    "consumer_lag": {"impressions": 30 - i, "clicks": 0}}) + b"\n")
        (data / "join" / f"stats-p{p}.json").write_bytes(orjson.dumps({"clicks_orphan": 7}))

    rng = np.random.default_rng(1)
    n = 3000
    delays = rng.lognormal(np.log(60_000), 1.5, n).astype(np.int64)
    clicked = rng.random(n) < 0.1
    examples, corrections = [], []
    for i in range(n):
        ts = T0 + i * 1200  # an hour of impressions
        in_window = bool(clicked[i] and delays[i] <= WINDOW_MS)
        examples.append({"impression_id": f"i{i}", "ts": ts, "user_id": "u", "item_id": "x",
                         "kind": "example", "label": int(in_window),
                         "click_ts": ts + int(delays[i]) if in_window else None,
                         "quarantined": 1500 <= i < 1600})
        if clicked[i] and not in_window:
            corrections.append({"kind": "late_click", "impression_id": f"i{i}", "ts": ts,
                                "click_ts": ts + int(delays[i])})
    archive = ExampleArchive(data / "archive")
    archive.append(examples)
    archive.append_corrections(corrections)
    d = np.sort(delays[clicked]) / 60_000

    store = FeatureStore(redis_client(cfg), prefix=cfg.features.store_prefix,
                         feature_names=["imp_5m", "clk_5m"])
    newest = T0 + 3_600_000
    store.write_many({("user", f"u{i}"): {"imp_5m": i, "clk_5m": 0} for i in range(40)}, newest)
    store.write_many({("item", f"x{i}"): {"imp_5m": i, "clk_5m": 0} for i in range(10)},
                     newest - 30 * 60_000)
    return {"coverage": np.searchsorted(d, WINDOW_MS / 60_000, side="right") / len(d),
            "clicks": int(clicked.sum()), "late": len(corrections)}


class _Figures(HTMLParser):
    """figure id -> its caption text and whether an <svg> sits inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: dict[str, dict] = {}
        self.current: str | None = None
        self.in_caption = False

    def handle_starttag(self, tag, attrs):
        if tag == "figure":
            self.current = dict(attrs).get("id")
            self.figures[self.current] = {"svg": False, "caption": ""}
        elif tag == "svg" and self.current:
            self.figures[self.current]["svg"] = True
        elif tag == "figcaption":
            self.in_caption = True

    def handle_endtag(self, tag):
        if tag == "figure":
            self.current = None
        elif tag == "figcaption":
            self.in_caption = False

    def handle_data(self, data):
        if self.in_caption and self.current:
            self.figures[self.current]["caption"] += data


def figures_of(page: str) -> dict[str, dict]:
    p = _Figures()
    p.feed(page)
    return p.figures


@pytest.fixture
def report_cfg(stack_cfg, tmp_path):
    return stack_cfg.replace(data_dir=str(tmp_path / "data"),
                             join={"wait_window_ms": WINDOW_MS},
                             features={"store_prefix": f"r{uuid.uuid4().hex[:8]}"})


@pytest.mark.integration
def test_report_of_a_data_dir_shows_every_figure_in_chromium(report_cfg, tmp_path):
    cfg = report_cfg
    want = make_data_dir(cfg)
    cfg_path = tmp_path / "ctrstream.toml"
    cfg_path.write_text(cfg.to_toml())
    out = tmp_path / "out" / "report.html"
    done = subprocess.run([sys.executable, "-m", "ctrstream.cli", "--config", str(cfg_path),
                           "report", "--out", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(out)

    figs = figures_of(out.read_text())
    assert list(figs) == FIGURES
    caps = {k: " ".join(v["caption"].split()) for k, v in figs.items()}
    for fid, cap in caps.items():
        assert "No data" not in cap, (fid, cap)
    assert "FTRL-Proximal 1.0000 (recent window 0.9900)" in caps["learn-ne"]
    assert "BOPR 1.000 (recent window 1.0000)" in caps["learn-calibration"]
    assert f"for {want['clicks']:,} clicks on 3,000 impressions" in caps["click-coverage"]
    assert f"{want['late']:,} late-click corrections" in caps["click-coverage"]
    assert f"{want['coverage']:.2%} of them were joined" in caps["click-coverage"]
    assert "14 in the join's counters" in caps["click-coverage"]  # 7 in each partition
    assert "100 quarantined examples" in caps["join-ctr"]
    assert re.search(r"Shaded: 1 period\(s\), 2\d s in all", caps["join-state"]), \
        caps["join-state"]
    assert "50 rows sampled" in caps["feature-freshness"]
    assert "max 30.0 min" in caps["feature-freshness"]

    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install -y chromium; `make test` does)")
    # What a browser builds from the page: each figure holds a rendered <svg>.
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                          "--dump-dom", out.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    shown = figures_of(dom.stdout)
    assert [f for f in FIGURES if not shown.get(f, {}).get("svg")] == []
    png = tmp_path / "report.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={png}", "--window-size=1280,2400", out.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 50_000


def test_report_of_an_empty_data_dir_says_what_is_missing(tmp_path):
    port = free_port()  # nothing listens there: Redis is unreachable
    cfg = Config().replace(data_dir=str(tmp_path / "none"),
                           redis={"url": f"redis://127.0.0.1:{port}/0", "retries": 0})
    figs = figures_of(write_report(cfg, tmp_path / "r.html").read_text())
    assert list(figs) == FIGURES
    for fid, f in figs.items():
        assert f["svg"] and f["caption"].startswith("No data:"), (fid, f)
    assert "not readable" in figs["feature-freshness"]["caption"]
