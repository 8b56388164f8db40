"""Fixtures: a private broker and Redis for the test session, on free ports, stopped after."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import pytest

from ctrstream.stack import REDIS_SERVER, LocalStack, create_topics, free_port, terminate
from flows.config import Config


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory):
    """The session's LocalStack (Tansu + redis-server on free ports), running."""
    if not Path(REDIS_SERVER).exists():
        pytest.fail(f"{REDIS_SERVER} not found: apt-get install -y redis-server")
    stack = LocalStack(tmp_path_factory.mktemp("stack"), free_port(), free_port())
    try:  # down() also when up() fails halfway, so no server outlives the session
        stack.up()
        yield stack
    finally:
        stack.down()


@pytest.fixture(scope="session")
def stack_cfg(local_stack):
    """A Config pointing at the session's private broker and Redis, default topics created."""
    cfg = local_stack.config(Config())
    create_topics(cfg)
    return cfg


@pytest.fixture
def fresh_topics(stack_cfg):
    """stack_cfg with topic names unique to this test, already created."""
    s = uuid.uuid4().hex[:8]
    cfg = stack_cfg.replace(kafka={"impressions_topic": f"impressions-{s}",
                                   "clicks_topic": f"clicks-{s}",
                                   "examples_topic": f"examples-{s}",
                                   "dead_letters_topic": f"dead-letters-{s}"})
    create_topics(cfg)
    return cfg


@pytest.fixture
def redis_client(stack_cfg):
    """A redis.Redis on the session's server, its database emptied first."""
    import redis

    client = redis.Redis.from_url(stack_cfg.redis.url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def cluster_node(tmp_path):
    """A one-node Redis Cluster owning every slot, on a free port; stopped at the end."""
    port = free_port()
    log = tmp_path / "redis.log"
    # the bus port defaults to port + 10000, which may be taken or past 65535: pick one
    proc = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--cluster-enabled", "yes", "--cluster-port", str(free_port()),
         "--dir", str(tmp_path), "--cluster-config-file", str(tmp_path / "nodes.conf"),
         "--logfile", str(log)], stdin=subprocess.DEVNULL, cwd=tmp_path)
    import redis

    client = redis.Redis(port=port, socket_timeout=1)
    try:
        deadline = time.monotonic() + 10
        while True:  # poll: ready as soon as it answers
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"redis-server (cluster) on {port} did not start:\n"
                                f"{log.read_text() if log.exists() else ''}")
                time.sleep(0.02)
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "cluster state never became ok"
            time.sleep(0.02)
        yield port
    finally:
        client.close()
        terminate(proc)


def pytest_terminal_summary(terminalreporter):
    """The reliability table (tests/tally.py), when a test filled a row."""
    from tests import tally

    if tally.ROWS:
        terminalreporter.write_sep("=", "reliability: what the tests counted")
        terminalreporter.write_line(tally.table())
