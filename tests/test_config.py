"""Config: defaults < TOML < environment, and errors that name the key."""

import pytest

from flows.config import Config, ConfigError, load_config


def test_precedence_defaults_then_file_then_env(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("data_dir = 'from-file'\n[join]\nwait_window_ms = 60000\ncapacity = 10\n")
    cfg = load_config(f, environ={"CTRSTREAM_JOIN__CAPACITY": "20"})
    assert (cfg.data_dir, cfg.join.wait_window_ms, cfg.join.capacity) == ("from-file", 60000, 20)
    assert cfg.kafka.partitions == Config().kafka.partitions


def test_env_lists_and_tables():
    cfg = load_config(environ={"CTRSTREAM_FEATURES__WINDOWS_MS": "1000,2000",
                               "CTRSTREAM_KAFKA__CLIENT": '{"security.protocol": "SSL"}'})
    assert cfg.features.windows_ms == [1000, 2000]
    assert cfg.kafka_client()["security.protocol"] == "SSL"


@pytest.mark.parametrize("env, message", [
    ({"CTRSTREAM_JOIN__WAIT_WINDOW_MS": "-5"}, "join.wait_window_ms: must be > 0"),
    ({"CTRSTREAM_JOIN__NOPE": "1"}, "unknown config key join.nope"),
    ({"CTRSTREAM_NOSECTION__X": "1"}, "unknown config key nosection.x"),
    ({"CTRSTREAM_KAFKA__PARTITIONS": "four"}, "kafka.partitions: expected int"),
    ({"CTRSTREAM_FEATURES__WINDOWS_MS": "300000,-1"}, "features.windows_ms[1]: must be >= 0"),
    ({"CTRSTREAM_GENERATOR__BASE_CTR": "1.5"}, "generator.base_ctr: must be between 0 and 1"),
])
def test_env_errors_name_the_key(env, message):
    with pytest.raises(ConfigError) as e:
        load_config(environ=env)
    assert message in str(e.value)


def test_file_errors_name_the_key(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[join]\nwait_window = 5\n")
    with pytest.raises(ConfigError, match="unknown config key join.wait_window"):
        load_config(f, environ={})
    f.write_text("[join]\nwait_window_ms = 'soon'\n")
    with pytest.raises(ConfigError, match="join.wait_window_ms: expected int"):
        load_config(f, environ={})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml", environ={})


def test_replace_validates():
    assert Config().replace(join={"capacity": 5}).join.capacity == 5
    with pytest.raises(ConfigError, match="join.capacity"):
        Config().replace(join={"capacity": 0})
