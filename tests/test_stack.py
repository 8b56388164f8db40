"""The embedded stack: up/down/status, idempotence, topic layout."""

import pytest

from flows.cli import main
from flows.config import Config
from flows.stack import LocalStack, StackError, create_topics, free_port

pytestmark = pytest.mark.integration


def test_up_is_idempotent_status_and_down(tmp_path, capsys):
    stack = LocalStack(tmp_path / "state", free_port(), free_port())
    try:
        pids = stack.up()
        assert all(pids.values()) and stack.up() == pids  # second up leaves them alone
        f = tmp_path / "c.toml"
        f.write_text(f"[stack]\nstate_dir = '{tmp_path / 'state'}'\n"
                     f"kafka_port = {stack.components[0].port}\n"
                     f"redis_port = {stack.components[1].port}\n")
        assert main(["--config", str(f), "stack", "status"]) == 0
        assert f"pid {pids['kafka']}" in capsys.readouterr().out
        cfg = stack.config(Config())
        assert create_topics(cfg) == create_topics(cfg)  # idempotent
        with pytest.raises(StackError, match="partitions"):
            create_topics(cfg.replace(kafka={"partitions": 2}))
    finally:
        stack.down()
    stack.down()
    assert stack.status() == {"kafka": None, "redis": None}
    assert main(["--config", str(f), "stack", "status"]) == 3


def test_stale_pid_file_is_replaced_and_taken_port_is_an_error(tmp_path, local_stack):
    stack = LocalStack(tmp_path, free_port(), local_stack.components[1].port)
    (tmp_path / "redis.pid").write_text("999999")
    assert stack.status()["redis"] is None and not (tmp_path / "redis.pid").exists()
    with pytest.raises(StackError, match="taken"):
        stack.components[1].start(5)
