"""`ctrstream serve`: features and scores over HTTP (Starlette on uvicorn).

    GET  /features/{entity}/{id}   one entity's count features
    POST /features                 {"entity": "user", "ids": ["u1", ...]}
    POST /score                    {"user": "u1", "items": ["i1", ...], "context": {...},
                                    "by": "emb"} -> pCTRs per model, ranked
    GET  /healthz                  200 when Redis answers and a model version is current
    GET  /metrics                  Prometheus

A bad request gets a 4xx and ``{"error": reason}``; Redis down (or no model yet) a 503. A
request's work (one Redis round trip, well under a millisecond, and ~2 ms of scoring in Python,
which holds the GIL) runs on the event loop: in a thread pool the thread hops cost ~0.6 ms more
CPU a /score (2.75-3.27 against 2.15-2.52 ms, 2 workers at 16 connections), and bought no
parallelism.
Loading a model version (about a second) runs in a thread, so /healthz and /metrics answer
meanwhile; only the first load makes /score wait. After it, a new version or a push is brought
in by a thread while /score answers from the copy held (the ``version`` of the answer), and
swapped in when ready. A Redis that does not answer at all holds a worker up to
``redis.connect_timeout_s`` or ``socket_timeout_s``. A Redis error drops the objects that made
the call (their clients and pools): the next request builds new ones, so the server recovers on
its own once Redis is back.

``--workers N`` runs N uvicorn worker processes on one socket (scoring is CPU-bound Python:
one process uses one core). They count into one set of Prometheus metrics through
prometheus_client's multiprocess mode, in a directory the server makes and removes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from operator import itemgetter
from pathlib import Path

import orjson
import redis
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from redis.exceptions import RedisClusterException
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from features.store import MetaMissing, redact_url
from flows.build import feature_spec, feature_store, model_store
from flows.build import scorer as make_scorer
from flows.config import Config, load_config
from joiner.errors import CtrstreamError
from learners.scorer import LoadedVersion, NotLoaded

log = logging.getLogger(__name__)

MODELS = ("emb", "bopr", "ftrl")
MAX_BATCH = 1000  # ids in one POST /features, items in one POST /score
# What a worker process of ``--workers`` N > 1 is started with: the config file the server
# wrote for them. Prometheus's own variable names the metrics directory.
WORKER_CONFIG = "CTRSTREAM_SERVE_CONFIG"
METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, RedisClusterException)

REQUESTS = Counter("ctrstream_serve_requests", "HTTP requests served",
                   ["endpoint", "status"])
LATENCY = Histogram("ctrstream_serve_request_seconds", "HTTP request latency", ["endpoint"],
                    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))


class BadRequest(Exception):
    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


class Pool:
    """Up to ``size`` objects made by ``make`` (a scorer is not shared between threads).
    An object whose call raised a Redis error is dropped (its connections close with it), so
    the next call makes a new one: that is how the server recovers once Redis is back."""

    def __init__(self, make: Callable[[], object], size: int) -> None:
        self._make, self._free, self._lock = make, [], threading.Lock()
        self._slots = threading.BoundedSemaphore(size)

    def call(self, fn: Callable):
        with self._slots:
            with self._lock:
                obj = self._free.pop() if self._free else None
            if obj is None:
                obj = self._make()
            try:
                return fn(obj)
            except REDIS_DOWN:
                obj = None
                raise
            finally:
                if obj is not None:
                    with self._lock:
                        self._free.append(obj)

    def clear(self) -> None:
        with self._lock:
            self._free = []


class JSON(Response):
    """A JSON response, encoded by orjson: a /score answer of 100 items in 23 us, against 417 us
    for Starlette's JSONResponse (the json module)."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content)


def _reason(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _row(row: dict) -> dict:
    ts, missing = row.pop("_ts"), row.pop("_missing")
    return {"missing": missing, "ts_ms": ts, "features": row}


def create_app(cfg: Config) -> Starlette:
    spec = feature_spec(cfg)
    where = redact_url(cfg.redis.url)
    entities = sorted(spec.entities)
    # one of each on the event loop (its calls never overlap), one to load models in a thread
    stores = Pool(lambda: feature_store(cfg), 1)
    loaded = LoadedVersion()  # the model, shared by the loop's scorer and the loading one
    scoring = Pool(lambda: make_scorer(cfg, loaded), 1)
    loading = Pool(lambda: make_scorer(cfg, loaded), 1)
    models = Pool(lambda: model_store(cfg), 1)

    def check_entity(entity: str) -> None:
        if entity not in spec.entities:
            raise BadRequest(f"unknown entity {entity!r}; the feature spec has: "
                             + ", ".join(entities), 404)

    async def body(request: Request) -> dict:
        try:
            data = orjson.loads(await request.body())
        except ValueError:
            raise BadRequest("the body is not JSON") from None
        if not isinstance(data, dict):
            raise BadRequest("the body must be a JSON object")
        return data

    def ids_field(data: dict, name: str) -> list[str]:
        ids = data.get(name)
        if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
            raise BadRequest(f"{name!r} must be a list of non-empty strings")
        if len(ids) > MAX_BATCH:
            raise BadRequest(f"{name!r} has {len(ids)} entries; at most {MAX_BATCH}", 413)
        return ids

    async def call(pool: Pool, fn: Callable, threaded: bool = False):
        """``fn`` of one of ``pool``'s objects, on the event loop or in a thread."""
        try:
            return await run_in_threadpool(pool.call, fn) if threaded else pool.call(fn)
        except MetaMissing:
            raise BadRequest(f"no feature store on {where} yet (nothing written)", 503) from None
        except REDIS_DOWN as e:
            raise BadRequest(f"cannot reach Redis at {where}: {_reason(e)}", 503) from None
        except redis.RedisError as e:
            raise BadRequest(f"Redis at {where}: {type(e).__name__}: {_reason(e)}",
                             503) from None

    async def get_features(request: Request) -> JSON:
        entity, id_ = request.path_params["entity"], request.path_params["id"]
        check_entity(entity)
        version, row = await call(stores, lambda s: (s.schema_version, s.get(entity, id_)))
        return JSON({"entity": entity, "id": id_, "schema_version": version,
                             **_row(row)})

    async def post_features(request: Request) -> JSON:
        data = await body(request)
        entity = data.get("entity")
        if not isinstance(entity, str):
            raise BadRequest("'entity' must be a string, e.g. \"user\"")
        check_entity(entity)
        ids = ids_field(data, "ids")
        version, rows = await call(stores, lambda s: (s.schema_version,
                                                          s.get_many(entity, ids)))
        return JSON({"entity": entity, "schema_version": version,
                             "rows": [{"id": i, **_row(r)}
                                      for i, r in zip(ids, rows, strict=True)]})

    async def score(request: Request) -> JSON:
        data = await body(request)
        user = data.get("user")
        if not isinstance(user, str) or not user:
            raise BadRequest("'user' must be a non-empty string")
        items = ids_field(data, "items")
        if not items:
            raise BadRequest("'items' needs at least one item id")
        context = data.get("context") or {}
        if not isinstance(context, dict) or not all(
                isinstance(v, str | int | float) and not isinstance(v, bool)
                for v in context.values()):
            raise BadRequest("'context' must be an object of strings and numbers")
        by = data.get("by", "emb")
        if by not in MODELS:
            raise BadRequest(f"'by' must be one of {', '.join(MODELS)}")

        def run(s):
            scores = s.score(user, items, context, load=False)
            return s.version, scores  # the version the scores came from

        try:
            try:
                version, scores = await call(scoring, run)
            except NotLoaded as missing:  # no version held yet: loaded in a thread
                want = (missing.version, missing.generation)
                await call(loading, lambda s: s.load(*want), threaded=True)
                version, scores = await call(scoring, run)  # from it (or a newer one)
        except CtrstreamError as e:  # no model published, or one this spec cannot score
            raise BadRequest(_reason(e), 503) from None
        scores.sort(key=itemgetter(by), reverse=True)
        ranked = {m: [s["item_id"] for s in sorted(scores, key=itemgetter(m), reverse=True)]
                  for m in MODELS}
        return JSON({"user": user, "context": context, "version": version,
                             "ranked_by": by, "scores": scores, "ranked": ranked})

    async def healthz(request: Request) -> JSON:
        try:
            version = await call(models, lambda m: (m.client.ping(), m.current())[1])
        except BadRequest as e:
            return JSON({"status": "unavailable", "error": str(e)}, 503)
        if version is None:
            return JSON({"status": "unavailable", "redis": "ok",
                                 "error": "no model version published yet"}, 503)
        return JSON({"status": "ok", "redis": "ok", "version": version})

    async def metrics(request: Request) -> Response:
        if METRICS_DIR in os.environ:  # one of several workers: every worker's counts
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = REGISTRY
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def timed(name: str, handler):
        async def endpoint(request: Request) -> Response:
            t0 = time.perf_counter()
            try:
                response = await handler(request)
            except BadRequest as e:
                response = JSON({"error": str(e)}, e.status)
            except ValueError as e:  # an id the store refuses (entity name rules)
                response = JSON({"error": _reason(e)}, 400)
            REQUESTS.labels(name, str(response.status_code)).inc()
            LATENCY.labels(name).observe(time.perf_counter() - t0)
            return response
        return endpoint

    routes = [
        Route("/features/{entity}/{id}", timed("features_get", get_features), methods=["GET"]),
        Route("/features", timed("features_post", post_features), methods=["POST"]),
        Route("/score", timed("score", score), methods=["POST"]),
        Route("/healthz", timed("healthz", healthz), methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        for pool in (stores, scoring, models):
            pool.clear()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.where = where
    return app


def worker_app() -> Starlette:
    """The app of one worker process of ``--workers`` N (uvicorn's factory), on the config
    its parent handed on."""
    return create_app(load_config(os.environ[WORKER_CONFIG], environ={}))


def run(args: argparse.Namespace, cfg: Config) -> int:
    import uvicorn

    opts = {"host": args.host, "port": args.port, "log_level": "warning", "access_log": False}
    where = redact_url(cfg.redis.url)
    log.info("serving on http://%s:%d with %d worker(s) (Redis %s)", args.host, args.port,
             args.workers, where)
    if args.workers == 1:
        uvicorn.run(create_app(cfg), **opts)
        return 0
    # The workers are new interpreters (spawned): they read the config from a file, private
    # to this user (it holds the Redis password), and count their metrics into files of one
    # directory that /metrics of any worker adds up; both go when the server stops.
    state = Path(tempfile.mkdtemp(prefix="ctrstream-serve-"))
    try:
        (state / "metrics").mkdir()
        (state / "ctrstream.toml").write_text(cfg.to_toml())
        os.environ.update({WORKER_CONFIG: str(state / "ctrstream.toml"),
                           METRICS_DIR: str(state / "metrics")})
        uvicorn.run("ctrstream.serve:worker_app", factory=True, workers=args.workers, **opts)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    return 0


def _at_least_1(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve features and scores over HTTP",
        description="An HTTP server on the feature store and the current model version: "
                    "GET /features/ENTITY/ID, POST /features, POST /score, GET /healthz, "
                    "GET /metrics (README.md, 'Serving over HTTP').")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--workers", type=_at_least_1, default=1,
                   help="worker processes on the one port (default 1): scoring is CPU-bound, "
                        "one process uses one core, so give it the CPUs it may use; each "
                        "holds its own copy of the model")
    p.set_defaults(func=run)
