"""Redis with an ACL user, a password and TLS only, the way a production Redis is set up: the
features store connects with the config's credentials and CA, and no secret reaches a log or
an error message. (Kafka's SASL/SSL options are passed through to confluent-kafka as they
are: tests/unit/flows/test_config.py checks the client settings.)"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

import pytest
import redis

from ctrstream.stack import REDIS_SERVER, free_port
from features.store import BufferedWriter, FeatureStore, StoreUnavailable, redact_url
from flows.build import feature_store, redis_client
from flows.config import Config, ConfigError

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-pw-9f2c"
NAMES = ["clicks_1h"]


def _certs(d: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
        "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"))
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.crt"),
        "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "1",
        "-extfile", str(d / "san.ext"), "-out", str(d / "server.crt"))
    return {"ca": d / "ca.crt", "cert": d / "server.crt", "key": d / "server.key"}


@pytest.fixture(scope="module")
def secure_redis(tmp_path_factory):
    """redis-server on TLS only, the default user off, user ``app`` with PASSWORD."""
    d = tmp_path_factory.mktemp("tls")
    certs = _certs(d)
    port = free_port()
    proc = subprocess.Popen(
        [REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(certs["cert"]), "--tls-key-file", str(certs["key"]),
         "--tls-ca-cert-file", str(certs["ca"]), "--tls-auth-clients", "no",
         "--user", "default", "off", "--user", "app", "on", f">{PASSWORD}", "~*", "&*",
         "+@all", "--save", "", "--appendonly", "no", "--dir", str(d)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port, username="app", password=PASSWORD, ssl=True,
                         ssl_ca_certs=str(certs["ca"]), socket_connect_timeout=1)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.RedisError:
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server on TLS"
            time.sleep(0.05)
    try:
        yield port, certs["ca"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_store_connects_with_acl_user_password_and_tls(secure_redis):
    port, ca = secure_redis
    cfg = Config().replace(redis={"url": f"rediss://127.0.0.1:{port}/0", "username": "app",
                                  "password": PASSWORD, "ssl_ca_certs": str(ca)},
                           features={"store_prefix": "sec"})
    store = feature_store(cfg, NAMES)
    store.write_many({("user", "u1"): {"clicks_1h": 3}}, 1000)
    assert store.get("user", "u1")["clicks_1h"] == 3
    assert PASSWORD not in repr(cfg) and PASSWORD not in store.where


@pytest.mark.parametrize("change", [
    {"password": "wrong-pw"},  # bad credentials
    {"ssl_ca_certs": ""},  # a server certificate nobody vouches for
    {"url": "redis://127.0.0.1:{port}/0", "ssl_ca_certs": ""},  # plain text to a TLS port
], ids=["password", "ca", "plaintext"])
def test_refused_connections_say_so_without_the_secret(secure_redis, change, caplog):
    port, ca = secure_redis
    settings = {"url": f"rediss://127.0.0.1:{port}/0", "username": "app",
                "password": PASSWORD, "ssl_ca_certs": str(ca), "connect_timeout_s": 1.0,
                "socket_timeout_s": 1.0, "retries": 0}
    settings |= {k: v.format(port=port) for k, v in change.items()}
    cfg = Config().replace(redis=settings)
    store = FeatureStore(redis_client(cfg), feature_names=NAMES, prefix="sec",
                         where=redact_url(cfg.redis.url))
    w = BufferedWriter(store, give_up_s=0.3, backoff_initial_s=0.05)
    w.put("user", "u1", {"clicks_1h": 1}, 1)
    with caplog.at_level(logging.DEBUG), pytest.raises(StoreUnavailable) as e:
        w.flush()
    for secret in (PASSWORD, change.get("password", PASSWORD)):
        assert secret not in str(e.value) and secret not in caplog.text
    assert f"127.0.0.1:{port}" in str(e.value) + caplog.text  # says where it failed


def test_a_ca_for_a_plain_text_connection_is_a_config_error():
    cfg = Config().replace(redis={"url": "redis://127.0.0.1:1/0", "ssl_ca_certs": "/ca.crt"})
    with pytest.raises(ConfigError, match="rediss://"):
        redis_client(cfg)
