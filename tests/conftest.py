"""Fixtures: a private broker and Redis for the test session, on free ports, stopped after."""

from __future__ import annotations

import shutil
import uuid

import pytest

from flows.config import Config
from flows.stack import LocalStack, create_topics, free_port


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server not found: apt-get install -y redis-server (make test does)")
    stack = LocalStack(tmp_path_factory.mktemp("stack"), free_port(), free_port())
    stack.up()
    yield stack
    stack.down()


@pytest.fixture(scope="session")
def stack_cfg(local_stack):
    """A Config pointing at the session's private broker and Redis, with default topics."""
    cfg = local_stack.config(Config())
    create_topics(cfg)
    return cfg


@pytest.fixture
def fresh_topics(stack_cfg):
    """A Config with topic names unique to this test, already created."""
    s = uuid.uuid4().hex[:8]
    cfg = stack_cfg.replace(kafka={"impressions_topic": f"impressions-{s}",
                                   "clicks_topic": f"clicks-{s}",
                                   "examples_topic": f"examples-{s}",
                                   "dead_letters_topic": f"dead-letters-{s}"})
    create_topics(cfg)
    return cfg


@pytest.fixture
def redis_client(stack_cfg):
    import redis

    client = redis.Redis.from_url(stack_cfg.redis.url)
    client.flushdb()
    yield client
    client.close()
