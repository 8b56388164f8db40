"""`ctrstream serve` in a subprocess against the session's Redis and a published model: features
and scores over HTTP equal the Python API's; a malformed request, an unknown entity and a
Redis outage (the server reaches Redis through a forwarder that the test takes away) each get
the answer README.md documents, and the server recovers on its own."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from ctrstream.stack import free_port, terminate
from flows.build import feature_spec, feature_store, model_store, scorer
from tests.integration.test_embeddings_cli import CONTEXT, published_synthetic, synthetic
from tests.netproxy import Forwarder

pytestmark = pytest.mark.integration

ITEMS = ["i1", "i7", "i12", "i30", "nope"]


def wait_until(what: str, condition, proc: subprocess.Popen, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited ({proc.returncode}) waiting for {what}: "
                        f"{proc.stderr.read().decode()[-2000:]}")
        try:
            if condition():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def served(stack_cfg, tmp_path_factory):
    """(HTTP client, the config the test reads with, the forwarder between server and Redis)."""
    tag = uuid.uuid4().hex[:8]
    cfg = stack_cfg.replace(learn={"store_name": f"srv{tag}", "emb_dim": 8,
                                   "emb_fallback_rows": 64},
                            features={"store_prefix": f"fs{tag}"})
    published_synthetic(cfg, synthetic(600))
    writer = feature_store(cfg, feature_spec(cfg).feature_names())
    now = int(time.time() * 1000)
    writer.write_many({("user", f"u{k}"): {n: k + j for j, n in enumerate(writer.feature_names)}
                       for k in range(10)}, now)
    writer.write_many({("item", f"i{k}"): {writer.feature_names[0]: 3 * k} for k in range(40)},
                      now)

    redis_port = urlsplit(cfg.redis.url).port
    fwd = Forwarder(free_port(), redis_port)
    fwd.start()
    served_cfg = cfg.replace(redis={"url": cfg.redis.url.replace(f":{redis_port}",
                                                                 f":{fwd.port}")})
    path = tmp_path_factory.mktemp("serve") / "ctrstream.toml"
    path.write_text(served_cfg.to_toml())
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ctrstream.cli", "--config", str(path),
                             "serve", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        wait_until("/healthz 200", lambda: http.get("/healthz").status_code == 200, proc)
        yield http, cfg, fwd, proc
    finally:
        http.close()
        terminate(proc)
        fwd.stop()


def test_features_equal_the_python_api(served):
    http, cfg, _, _ = served
    store = feature_store(cfg)
    r = http.get("/features/user/u3")
    assert r.status_code == 200, r.text
    got = r.json()
    want = store.get("user", "u3")
    assert got["missing"] is False and got["ts_ms"] == want.pop("_ts")
    want.pop("_missing")
    assert got["features"] == want and any(want.values())

    ids = ["u1", "u9", "u404"]
    r = http.post("/features", json={"entity": "user", "ids": ids})
    assert r.status_code == 200, r.text
    rows = r.json()["rows"]
    assert [row["id"] for row in rows] == ids
    for row, want in zip(rows, store.get_many("user", ids), strict=True):
        assert (row["missing"], row["ts_ms"]) == (want.pop("_missing"), want.pop("_ts"))
        assert row["features"] == want


def test_unknown_entity_and_unknown_id(served):
    http, cfg, _, _ = served
    r = http.get("/features/planet/p1")
    assert r.status_code == 404
    assert "unknown entity 'planet'" in r.json()["error"] and "user" in r.json()["error"]
    r = http.get("/features/user/never-seen")  # a known kind, an id never written: defaults
    assert r.status_code == 200
    got = r.json()
    assert got["missing"] is True and got["ts_ms"] is None
    assert set(got["features"].values()) == {0}


def test_scores_equal_the_python_api(served):
    http, cfg, _, _ = served
    r = http.post("/score", json={"user": "u3", "items": ITEMS, "context": CONTEXT,
                                  "by": "bopr"})
    assert r.status_code == 200, r.text
    got = r.json()
    s = scorer(cfg)
    want = {w["item_id"]: w for w in s.score("u3", ITEMS, CONTEXT)}
    assert got["version"] == s.version and got["ranked_by"] == "bopr"
    assert sorted(x["item_id"] for x in got["scores"]) == sorted(ITEMS)
    for x in got["scores"]:
        for m in ("emb", "bopr", "bopr_std", "ftrl"):
            assert x[m] == pytest.approx(want[x["item_id"]][m], rel=0, abs=1e-9), m
    assert [x["bopr"] for x in got["scores"]] == sorted((x["bopr"] for x in got["scores"]),
                                                        reverse=True)
    for m in ("emb", "bopr", "ftrl"):
        assert got["ranked"][m] == sorted(want, key=lambda i: want[i][m], reverse=True)


@pytest.mark.parametrize("path,body,status,reason", [
    ("/score", b"{not json", 400, "not JSON"),
    ("/score", b"[1, 2]", 400, "JSON object"),
    ("/score", b'{"user": 3, "items": ["i1"]}', 400, "'user'"),
    ("/score", b'{"user": "u1", "items": "i1"}', 400, "'items'"),
    ("/score", b'{"user": "u1", "items": []}', 400, "at least one"),
    ("/score", b'{"user": "u1", "items": ["i1"], "context": {"a": [1]}}', 400, "'context'"),
    ("/score", b'{"user": "u1", "items": ["i1"], "by": "gbdt"}', 400, "'by'"),
    ("/features", b'{"entity": "user", "ids": "u1"}', 400, "'ids'"),
    ("/features", b'{"ids": ["u1"]}', 400, "'entity'"),
    ("/features", b'{"entity": "user", "ids": ["u"]}'.replace(b'["u"]',
                                                              b'[' + b'"u",' * 1000 + b'"u"]'),
     413, "at most"),
])
def test_bad_requests_get_a_4xx_with_a_reason(served, path, body, status, reason):
    http = served[0]
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert reason in r.json()["error"]


def test_redis_outage_gets_503_then_recovers(served):
    http, _, fwd, proc = served
    body = {"user": "u3", "items": ITEMS, "context": CONTEXT}
    before = http.post("/score", json=body).json()
    fwd.stop()
    try:
        for method, path, kw in (("GET", "/healthz", {}), ("POST", "/score", {"json": body}),
                                 ("GET", "/features/user/u3", {}),
                                 ("POST", "/features", {"json": {"entity": "user",
                                                                 "ids": ["u3"]}})):
            r = http.request(method, path, **kw)
            assert r.status_code == 503, (path, r.text)
            assert "Redis" in r.json()["error"], path
    finally:
        fwd.start()
    wait_until("/healthz 200 after the outage",
               lambda: http.get("/healthz").status_code == 200, proc, timeout_s=15)
    after = http.post("/score", json=body)
    assert after.status_code == 200 and after.json()["scores"] == before["scores"]
    assert http.get("/features/user/u3").status_code == 200


def test_metrics_count_requests(served):
    http = served[0]
    http.get("/healthz")
    text = http.get("/metrics").text
    assert 'ctrstream_serve_requests_total{endpoint="healthz",status="200"}' in text
    assert "ctrstream_serve_request_seconds_bucket" in text


def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) \
                    == pid:
                out.append(int(p.name))
        except (OSError, ValueError):
            pass  # gone meanwhile
    return out


def _metrics_dir(pid: int) -> Path | None:
    """PROMETHEUS_MULTIPROC_DIR as a worker of the server ``pid`` was started with."""
    for child in _children(pid):
        with contextlib.suppress(OSError):
            for var in (Path(f"/proc/{child}/environ").read_bytes().split(b"\0")):
                if var.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
                    return Path(var.split(b"=", 1)[1].decode())
    return None


def test_two_workers_answer_as_one_server(served, tmp_path):
    """--workers 2: two processes on one port, each answering as the Python API does, and
    /metrics of either counting the requests of both; the metrics directory goes with them."""
    _, cfg, _, _ = served
    path = tmp_path / "ctrstream.toml"
    path.write_text(cfg.to_toml())
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ctrstream.cli", "--config", str(path),
                             "serve", "--port", str(port), "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    body = {"user": "u3", "items": ITEMS, "context": CONTEXT}
    want = scorer(cfg).score("u3", ITEMS, CONTEXT)
    sent = 0

    def score_on_new_connections(n: int = 8) -> list[dict]:
        # concurrent, a connection each: while one worker scores, the other accepts
        nonlocal sent
        with ThreadPoolExecutor(n) as pool:
            answers = list(pool.map(lambda _: httpx.post(base + "/score", json=body,
                                                         timeout=30), range(n)))
        sent += n
        assert {r.status_code for r in answers} == {200}
        return [r.json() for r in answers]

    try:
        wait_until("/healthz 200", lambda: httpx.get(base + "/healthz").status_code == 200,
                   proc)
        metrics = _metrics_dir(proc.pid)
        assert metrics is not None and metrics.is_dir()
        wait_until("both workers to have counted requests",
                   lambda: score_on_new_connections() and len(list(
                       metrics.glob("counter_*.db"))) == 2, proc)
        for answer in score_on_new_connections():
            got = {x["item_id"]: x for x in answer["scores"]}
            for w in want:
                for m in ("emb", "bopr", "bopr_std", "ftrl"):
                    assert got[w["item_id"]][m] == pytest.approx(w[m], rel=0, abs=1e-9)
        features = feature_store(cfg).get_many("user", ["u1", "u404"])
        r = httpx.post(base + "/features", json={"entity": "user", "ids": ["u1", "u404"]})
        assert [row["features"] for row in r.json()["rows"]] == [
            {k: v for k, v in f.items() if not k.startswith("_")} for f in features]
        counted = re.compile(r'^ctrstream_serve_requests_total\{endpoint="score",'
                             r'status="200"\} (\S+)$', re.M)
        for _ in range(6):  # either worker answers /metrics: each counts both
            text = httpx.get(base + "/metrics", headers={"connection": "close"}).text
            assert float(counted.search(text).group(1)) == sent
    finally:
        terminate(proc)
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    assert not metrics.parent.exists()  # the server's directory, removed on the way out


def test_a_push_is_answered_from_the_copy_held_then_served(served):
    """A push into the served version (here: every FTRL weight moved): /score keeps answering
    200 from the version it names while the worker's thread brings the push in, then answers
    with the pushed weights, as the Python API reads them. Last: it changes the model."""
    http, cfg, _, proc = served
    body = {"user": "u3", "items": ITEMS, "context": CONTEXT}
    before = http.post("/score", json=body).json()
    store = model_store(cfg)
    version = store.current()
    coords, values = store.load(version).vectors["ftrl"]
    store.put_vectors(version, "ftrl", coords, values + 0.5)
    want = {w["item_id"]: w["ftrl"] for w in scorer(cfg).score("u3", ITEMS, CONTEXT)}
    assert {x["item_id"]: x["ftrl"] for x in before["scores"]} != pytest.approx(want)

    def pushed_served() -> bool:
        r = http.post("/score", json=body)
        assert r.status_code == 200 and r.json()["version"] == version, r.text
        return all(x["ftrl"] == pytest.approx(want[x["item_id"]], rel=0, abs=1e-9)
                   for x in r.json()["scores"])

    wait_until("the push served", pushed_served, proc)
