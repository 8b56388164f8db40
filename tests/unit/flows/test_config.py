"""Config: defaults < TOML < environment, and errors that name the key."""

import dataclasses

import pytest

from flows.build import feature_spec
from flows.config import Config, ConfigError, load_config
from joiner.events import Impression


@pytest.fixture(autouse=True)
def no_local_toml(tmp_path, monkeypatch):
    """load_config falls back to ./ctrstream.toml: run where there is none."""
    monkeypatch.chdir(tmp_path)


def test_precedence_defaults_then_file_then_env(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("data_dir = 'from-file'\n[join]\nwait_window_ms = 60000\ncapacity = 10\n")
    cfg = load_config(f, environ={"CTRSTREAM_JOIN__CAPACITY": "20",
                                  "CTRSTREAM_RECOVERY_DIR": "from-env"})
    assert (cfg.data_dir, cfg.recovery_dir) == ("from-file", "from-env")
    assert (cfg.join.wait_window_ms, cfg.join.capacity) == (60000, 20)
    assert cfg.kafka.partitions == Config().kafka.partitions
    assert load_config(environ={}) == Config()


def test_file_from_env_var_and_working_directory(tmp_path):
    f = tmp_path / "elsewhere.toml"
    f.write_text("[kafka]\npartitions = 7\n")
    assert load_config(environ={"CTRSTREAM_CONFIG": str(f)}).kafka.partitions == 7
    (tmp_path / "ctrstream.toml").write_text("[kafka]\npartitions = 5\n")
    assert load_config(environ={}).kafka.partitions == 5


def test_lists_and_tables():
    assert load_config(environ={"CTRSTREAM_FEATURES__WINDOWS_MS": "1000,2000"}
                       ).features.windows_ms == [1000, 2000]
    assert load_config(environ={"CTRSTREAM_FEATURES__WINDOWS_MS": "[5, 6.0]"}
                       ).features.windows_ms == [5, 6]
    cfg = load_config(environ={"CTRSTREAM_KAFKA__CLIENT": '{"security.protocol": "SSL"}'})
    assert cfg.kafka_client(**{"group.id": "g"}) == {
        "bootstrap.servers": cfg.kafka.bootstrap_servers, "security.protocol": "SSL",
        "group.id": "g"}


def test_file_lists(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[features]\nwindows_ms = [1000, 60000]\n")
    assert load_config(f, environ={}).features.windows_ms == [1000, 60000]
    f.write_text("[features]\nwindows_ms = 1000\n")
    with pytest.raises(ConfigError, match="features.windows_ms: expected a list"):
        load_config(f, environ={})


@pytest.mark.parametrize("env, message", [
    ({"CTRSTREAM_JOIN__WAIT_WINDOW_MS": "-5"}, "join.wait_window_ms: must be > 0"),
    ({"CTRSTREAM_JOIN__MAX_PAST_MS": "-1"}, "join.max_past_ms: must be >= 0"),
    ({"CTRSTREAM_JOIN__NOPE": "1"}, "unknown config key join.nope"),
    ({"CTRSTREAM_NOSECTION__X": "1"}, "unknown config key nosection.x"),
    ({"CTRSTREAM_NOPE": "1"}, "unknown config key nope"),
    ({"CTRSTREAM_KAFKA__PARTITIONS": "four"}, "kafka.partitions: expected int"),
    ({"CTRSTREAM_KAFKA__PARTITIONS": "2.5"}, "kafka.partitions: expected int"),
    ({"CTRSTREAM_FEATURES__WINDOWS_MS": "300000,-1"}, "features.windows_ms[1]: must be >= 0"),
    ({"CTRSTREAM_GENERATOR__BASE_CTR": "1.5"}, "generator.base_ctr: must be between 0 and 1"),
    ({"CTRSTREAM_METRICS__LAG_WINDOW_S": "0"}, "metrics.lag_window_s: must be > 0"),
])
def test_env_errors_name_the_key(env, message):
    with pytest.raises(ConfigError) as e:
        load_config(environ=env)
    assert message in str(e.value)


@pytest.mark.parametrize("toml, message", [
    ("[join]\nwait_window_ms = -1\n", "join.wait_window_ms: must be > 0"),
    ("[join]\nwait_window = 5\n", "unknown config key join.wait_window"),
    ("[nosection]\nx = 1\n", "unknown config key nosection"),
    ("[join]\nwait_window_ms = 'soon'\n", "join.wait_window_ms: expected int"),
    ("[join]\nwait_window_ms = true\n", "join.wait_window_ms: expected a number"),
    ("[kafka]\nbootstrap_servers = 9092\n", "kafka.bootstrap_servers: expected a string"),
    ("join = 3\n", "join: expected a table"),
    ("[join\n", "c.toml"),
])
def test_file_errors_name_the_key(tmp_path, toml, message):
    f = tmp_path / "c.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(f, environ={})
    assert message in str(e.value)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml", environ={})


def test_replace_copies_and_validates():
    base = Config()
    cfg = base.replace(join={"capacity": 5}, data_dir="d")
    assert (cfg.join.capacity, cfg.data_dir) == (5, "d")
    assert cfg.join.wait_window_ms == base.join.wait_window_ms  # rest of the section kept
    assert base.join.capacity == Config().join.capacity  # original untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data_dir = "x"
    with pytest.raises(ConfigError, match="join.capacity: must be > 0"):
        base.replace(join={"capacity": 0})
    with pytest.raises(ConfigError, match="unknown config key join.capacty"):
        base.replace(join={"capacty": 5})


def test_to_toml_reads_back_to_the_same_config(tmp_path):
    cfg = Config().replace(
        data_dir='a "quoted" dir', join={"capacity": 7, "idle_timeout_s": 2.5},
        kafka={"client": {"security.protocol": "SSL"}},
        features={"windows_ms": [1000, 2000], "entities": {"user": "user_id", "u_c": "a,b"}})
    for c in (Config(), cfg):
        f = tmp_path / "c.toml"
        f.write_text(c.to_toml())
        assert load_config(f, environ={}) == c


def test_spec_from_config_adds_and_removes_entities(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[features]\nwindows_ms = [30000, 3600000]\n'
                 '[features.entities]\nuser_device = "user_id, device"\ncategory = ""\n')
    spec = feature_spec(load_config(f, environ={}))
    assert spec.entities["user_device"] == ("user_id", "device")
    assert "category" not in spec.entities and "user" in spec.entities
    assert spec.feature_names()[:2] == ["imp_30s", "clk_30s"]
    im = Impression("x", 5, "u", "i", {"device": "mobile"})
    assert ("user_device", "u|mobile") in spec.entity_ids(im)
    bad = load_config(environ={"CTRSTREAM_FEATURES__TILES_PER_WINDOW": "0"})
    with pytest.raises(ConfigError, match="features.tiles_per_window"):
        feature_spec(bad)


def test_pit_delay_longer_than_the_lateness_names_both_keys():
    env = {"CTRSTREAM_FEATURES__PIT_DELAY_MS": "200000"}
    with pytest.raises(ConfigError, match="features.pit_delay_ms.*allowed_lateness_ms"):
        load_config(environ=env)
