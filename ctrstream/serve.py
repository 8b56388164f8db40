"""`ctrstream serve`: features and scores over HTTP (Starlette on uvicorn).

    GET  /features/{entity}/{id}   one entity's count features
    POST /features                 {"entity": "user", "ids": ["u1", ...]}
    POST /score                    {"user": "u1", "items": ["i1", ...], "context": {...},
                                    "by": "emb"} -> pCTRs per model, ranked
    GET  /healthz                  200 when Redis answers and a model version is current
    GET  /metrics                  Prometheus

A bad request gets a 4xx and ``{"error": reason}``; Redis down (or no model yet) a 503. The
redis calls are blocking (redis-py), so they run in threads, never on the event loop. A Redis
error drops the objects that made the call (their clients and pools): the next request builds
new ones, so the server recovers on its own once Redis is back.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import threading
import time
from collections.abc import Callable

import redis
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest
from redis.exceptions import RedisClusterException
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from features.store import MetaMissing, redact_url
from flows.build import feature_spec, feature_store, model_store
from flows.build import scorer as make_scorer
from flows.config import Config
from joiner.errors import CtrstreamError
from learners.scorer import LoadedVersion

log = logging.getLogger(__name__)

MODELS = ("emb", "bopr", "ftrl")
MAX_BATCH = 1000  # ids in one POST /features, items in one POST /score
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
    """Up to ``size`` objects made by ``make`` (scorers are not shared between threads).
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


def _reason(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _row(row: dict) -> dict:
    ts, missing = row.pop("_ts"), row.pop("_missing")
    return {"missing": missing, "ts_ms": ts, "features": row}


def create_app(cfg: Config, scorers: int = 4) -> Starlette:
    spec = feature_spec(cfg)
    where = redact_url(cfg.redis.url)
    entities = sorted(spec.entities)
    stores = Pool(lambda: feature_store(cfg), scorers)
    loaded = LoadedVersion()  # the model, loaded once for every scorer of the pool
    scoring = Pool(lambda: make_scorer(cfg, loaded), scorers)
    models = Pool(lambda: model_store(cfg), 2)

    def check_entity(entity: str) -> None:
        if entity not in spec.entities:
            raise BadRequest(f"unknown entity {entity!r}; the feature spec has: "
                             + ", ".join(entities), 404)

    async def body(request: Request) -> dict:
        try:
            data = await request.json()
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

    async def blocking(pool: Pool, fn: Callable):
        try:
            return await run_in_threadpool(pool.call, fn)
        except MetaMissing:
            raise BadRequest(f"no feature store on {where} yet (nothing written)", 503) from None
        except REDIS_DOWN as e:
            raise BadRequest(f"cannot reach Redis at {where}: {_reason(e)}", 503) from None
        except redis.RedisError as e:
            raise BadRequest(f"Redis at {where}: {type(e).__name__}: {_reason(e)}",
                             503) from None

    async def get_features(request: Request) -> JSONResponse:
        entity, id_ = request.path_params["entity"], request.path_params["id"]
        check_entity(entity)
        version, row = await blocking(stores, lambda s: (s.schema_version, s.get(entity, id_)))
        return JSONResponse({"entity": entity, "id": id_, "schema_version": version,
                             **_row(row)})

    async def post_features(request: Request) -> JSONResponse:
        data = await body(request)
        entity = data.get("entity")
        if not isinstance(entity, str):
            raise BadRequest("'entity' must be a string, e.g. \"user\"")
        check_entity(entity)
        ids = ids_field(data, "ids")
        version, rows = await blocking(stores, lambda s: (s.schema_version,
                                                          s.get_many(entity, ids)))
        return JSONResponse({"entity": entity, "schema_version": version,
                             "rows": [{"id": i, **_row(r)}
                                      for i, r in zip(ids, rows, strict=True)]})

    async def score(request: Request) -> JSONResponse:
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
            scores = s.score(user, items, context)
            return s.version, scores  # the version the scores came from

        try:
            version, scores = await blocking(scoring, run)
        except CtrstreamError as e:  # no model published, or one this spec cannot score
            raise BadRequest(_reason(e), 503) from None
        scores.sort(key=lambda s: s[by], reverse=True)
        ranked = {m: [s["item_id"] for s in sorted(scores, key=lambda s: s[m], reverse=True)]
                  for m in MODELS}
        return JSONResponse({"user": user, "context": context, "version": version,
                             "ranked_by": by, "scores": scores, "ranked": ranked})

    async def healthz(request: Request) -> JSONResponse:
        try:
            version = await blocking(models, lambda m: (m.client.ping(), m.current())[1])
        except BadRequest as e:
            return JSONResponse({"status": "unavailable", "error": str(e)}, 503)
        if version is None:
            return JSONResponse({"status": "unavailable", "redis": "ok",
                                 "error": "no model version published yet"}, 503)
        return JSONResponse({"status": "ok", "redis": "ok", "version": version})

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    def timed(name: str, handler):
        async def endpoint(request: Request) -> Response:
            t0 = time.perf_counter()
            try:
                response = await handler(request)
            except BadRequest as e:
                response = JSONResponse({"error": str(e)}, e.status)
            except ValueError as e:  # an id the store refuses (entity name rules)
                response = JSONResponse({"error": _reason(e)}, 400)
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


def run(args: argparse.Namespace, cfg: Config) -> int:
    import uvicorn

    app = create_app(cfg, scorers=args.scorers)
    log.info("serving on http://%s:%d (Redis %s)", args.host, args.port, app.state.where)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve features and scores over HTTP",
        description="An HTTP server on the feature store and the current model version: "
                    "GET /features/ENTITY/ID, POST /features, POST /score, GET /healthz, "
                    "GET /metrics (README.md, 'Serving over HTTP').")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--scorers", type=int, default=4,
                   help="scorers (and feature-store readers) used at once (default 4)")
    p.set_defaults(func=run)
