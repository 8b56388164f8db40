"""`ctrstream` maps every project error to its documented exit code in one place (cli.main);
and the small text helpers the commands share."""

from __future__ import annotations

import os

import pytest
import redis

import ctrstream.score
from ctrstream.cli import main
from ctrstream.stack import StackError
from ctrstream.text import age
from features.spec import NotCounted, split_names
from features.store import LayoutMismatch, MetaMissing, SchemaMismatch, StoreUnavailable
from flows.config import ConfigError
from flows.kafka import DeliveryError
from joiner.errors import CtrstreamError
from joiner.events import BadEvent
from learners.publish import ModelStoreError, PublishConflict
from learners.retrain import NoArchive, RetrainConflict

# The table in joiner/errors.py and in README.md, "CLI".
EXIT_CODES = [
    (StoreUnavailable("Redis failed for 30 s"), 1),
    (MetaMissing("no feature store meta key f:meta"), 1),
    (SchemaMismatch("schema version 2, this reader expects 1"), 1),
    (LayoutMismatch("written in the hash per entity: run `ctrstream features migrate`"), 1),
    (ModelStoreError("no model published"), 1),
    (DeliveryError("3 messages failed"), 1),
    (StackError("port 6379 is taken"), 1),
    (ConfigError("join.wait_window_ms: must be > 0, got -1"), 2),
    (BadEvent("missing field 'ts'"), 2),
    (NoArchive("2024-01-02", "/data/archive", ["2024-01-01"]), 2),
    (NotCounted("model version 7 was trained on count features that are not counted now: "
                "imp_1m, clk_1m"), 2),
    (PublishConflict("the pointer moved", "v2", "v1"), 4),
    (RetrainConflict("version v3 was made current", "v4", "v3"), 4),
]


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


@pytest.fixture
def config(tmp_path, monkeypatch):
    for name in [n for n in os.environ if n.startswith("CTRSTREAM_")]:
        monkeypatch.delenv(name)
    path = tmp_path / "ctrstream.toml"
    path.write_text('[redis]\nurl = "redis://:pw123@127.0.0.1:1/0"\n')
    return path


def _score_raising(monkeypatch, config, error: BaseException) -> int:
    def fail(args, cfg):
        raise error

    monkeypatch.setattr(ctrstream.score, "run", fail)
    return main(["--config", str(config), "score", "--user", "u1", "--items", "i1"])


@pytest.mark.parametrize(("error", "code"), EXIT_CODES,
                         ids=[type(e).__name__ for e, _ in EXIT_CODES])
def test_each_error_exits_with_its_code(error, code, monkeypatch, config, capsys):
    assert _score_raising(monkeypatch, config, error) == code
    assert capsys.readouterr().err == f"ctrstream: {error}\n"


def test_every_project_error_is_in_the_table():
    assert {type(e) for e, _ in EXIT_CODES} == set(_subclasses(CtrstreamError))


def test_a_bad_config_value_exits_2(config, capsys):
    config.write_text("[join]\nwait_window_ms = -1\n")
    assert main(["--config", str(config), "doctor"]) == 2
    assert "join.wait_window_ms: must be > 0" in capsys.readouterr().err


def test_unreachable_redis_exits_1_with_the_password_hidden(monkeypatch, config, capsys):
    error = redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
    assert _score_raising(monkeypatch, config, error) == 1
    err = capsys.readouterr().err
    assert err.startswith("ctrstream: cannot reach Redis at redis://:***@127.0.0.1:1/0: Error")
    assert "pw123" not in err


def test_other_redis_errors_exit_1(monkeypatch, config, capsys):
    assert _score_raising(monkeypatch, config, redis.ResponseError("WRONGTYPE")) == 1
    assert capsys.readouterr().err == ("ctrstream: Redis at redis://:***@127.0.0.1:1/0: "
                                       "ResponseError: WRONGTYPE\n")


def test_interrupted_exits_130(monkeypatch, config):
    assert _score_raising(monkeypatch, config, KeyboardInterrupt()) == 130


def test_errors_keep_their_builtin_base():
    assert isinstance(ConfigError("x"), ValueError) and isinstance(BadEvent("x"), ValueError)
    assert isinstance(MetaMissing("x"), LookupError) and isinstance(StackError("x"), RuntimeError)


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0.0 s ago"),
    (12.34, "12.3 s ago"),
    (125, "2 min 5 s ago"),
    (3 * 3600 + 7 * 60 + 9, "3 h 7 min ago"),
    (2 * 86_400 + 5 * 3600, "2 d 5 h ago"),
    (-90, "1 min 30 s in the future"),
])
def test_age(seconds, text):
    assert age(seconds) == text


@pytest.mark.parametrize(("text", "names"), [
    ("user_id,category", ["user_id", "category"]),
    (" user_id , category ", ["user_id", "category"]),
    ("i1,,i2,", ["i1", "i2"]),
    ("", []),
    (" , ", []),
    ("item_id", ["item_id"]),
])
def test_split_names(text, names):
    assert split_names(text) == names
