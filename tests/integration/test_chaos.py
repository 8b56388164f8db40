"""Outages while the flows run, on a private broker and Redis: Redis paused, Redis stopped and
back empty, the broker paused or cut off the network, a producer cut off. The flows hold back
and go on; in the end nothing is lost and Redis holds the right values. And flows killed
(SIGKILL) again and again at random points, also one of two processes of a join.
Outages last CHAOS_OUTAGE_S seconds and flows are killed CHAOS_KILLS times
(3 s and 2 in `make test`, 30 s and 10 in `make chaos`). Each test fills a row of the table
printed at the end (tests/tally.py): what it survived and how every event was accounted for."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest
import redis
from confluent_kafka import Consumer, TopicPartition

from ctrstream.produce import produce
from ctrstream.simulator import MANIFEST_FILE, Faults, StreamSpec, read_truth
from ctrstream.stack import LocalStack, create_topics, free_port
from flows.build import model_store
from flows.config import Config
from flows.kafka import DeliveryError, read_topics
from learners.archive import ExampleArchive
from tests import tally
from tests.integration.test_join_flow import (
    check_against_truth,
    check_counts_against_recount,
    flow_log,
    flow_process,
    join_config,
    join_stats,
    run_to_end,
)
from tests.integration.test_learn_flow import (
    check_learned_once,
    join_examples,
    learn_config,
    learned,
)
from tests.netproxy import Forwarder

pytestmark = pytest.mark.integration

OUTAGE_S = float(os.environ.get("CHAOS_OUTAGE_S", "3"))
KILLS = int(os.environ.get("CHAOS_KILLS", "2"))


def kill_flows(tmp_path: Path) -> None:
    """SIGKILL what is left of the flows a test started (their command lines name its config
    under tmp_path), so a failed test does not leave a flow running into the next ones."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(tmp_path).encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:  # gone meanwhile
            pass


@pytest.fixture
def stack(tmp_path):
    s = LocalStack(tmp_path / "stack", free_port(), free_port())
    try:
        s.up()
        yield s
    finally:
        kill_flows(tmp_path)
        s.down()


@pytest.fixture
def forwarded_stack(tmp_path):
    """A stack whose broker clients reach only through a Forwarder: (stack, forwarder)."""
    fwd = Forwarder(free_port(), free_port())
    s = LocalStack(tmp_path / "stack", fwd.target_port, free_port(),
                   kafka_advertised_port=fwd.port)
    fwd.start()
    try:
        s.up()
        yield s, fwd
    finally:
        kill_flows(tmp_path)
        fwd.stop()
        s.down()


def pause(pid: int, seconds: float) -> None:
    """An outage that keeps the data: the process is frozen, connections hang."""
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)  # the outage itself, not a wait for a condition
    finally:
        os.kill(pid, signal.SIGCONT)


def redis_down(stack: LocalStack) -> None:
    """Redis stopped for OUTAGE_S (connections refused), then started again empty."""
    stack.redis.stop()
    time.sleep(OUTAGE_S)  # the outage itself, not a wait for a condition
    stack.redis.start(20)  # no persistence: it comes back empty


def wait_for(what: str, condition, proc: subprocess.Popen, timeout_s: float = 90,
             detail=lambda: "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"flow exited while waiting for {what}: "
                        f"{flow_log(proc)[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what} {detail()}; the flow's log ends:\n"
                        f"{flow_log(proc)[-3000:]}")
        time.sleep(0.05)


def finish(cfg_path: Path, flow: str, proc: subprocess.Popen, *extra: str) -> None:
    """Stop a flow that follows its input and resume it to the end of the input."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run_to_end(flow_process(cfg_path, flow, "--until-eof", *extra), 180)


JOIN_OUTCOMES = ("impressions_emitted", "impressions_duplicate", "impressions_dead",
                 "clicks_joined", "clicks_duplicate", "clicks_late", "clicks_orphan",
                 "clicks_dead", "pending", "held")


def account_join(row: tally.Row, cfg, truth_dir: Path, examples: list, truth) -> None:
    """Fill ``row`` from the producer's manifest, the join's counters and its output, then
    check them: every acknowledged message read once and given exactly one outcome, and no
    impression id with two different example records (replays after a kill must repeat the
    same record, so downstream dedup by id is safe)."""
    manifest = orjson.loads((truth_dir / MANIFEST_FILE).read_bytes())
    sent = manifest["delivery"]["sent"]
    s = join_stats(cfg)
    read = s["impressions_in"] + s["clicks_in"]
    bodies: dict[str, set] = {}
    for m in examples:
        ex = orjson.loads(m.value())
        if ex["kind"] == "example":
            bodies.setdefault(ex["impression_id"], set()).add(m.value())
    assert manifest["complete"] and manifest["delivery"]["failed"] == 0, manifest["delivery"]
    row.events_in += sent
    row.malformed += manifest["counts"]["malformed_impressions"] + manifest["counts"][
        "malformed_clicks"]
    row.accounted += sum(s[k] for k in JOIN_OUTCOMES)
    row.lost += len(set(truth.column("impression_id").to_pylist()) - bodies.keys())
    row.duplicates += sum(len(b) - 1 for b in bodies.values())
    assert read == sent, f"the flow read {read:,} messages of {sent:,} sent"
    assert row.accounted == row.events_in and row.lost == row.duplicates == 0, row


def account_learn(row: tally.Row, cfg, records: list[dict], stats: dict) -> None:
    """Fill ``row`` from the learn flow's counters and its archive (each id archived once)."""
    c = stats["counts"]
    archived = [r["impression_id"] for a in [ExampleArchive(Path(cfg.data_dir) / "archive")]
                for d in a.days() for r in a.read_examples(d)]
    row.events_in += len(records)
    row.accounted += sum(c[k] for k in ("learned", "skipped", "duplicates", "corrections",
                                        "dead_letters"))
    row.lost += len({r["impression_id"] for r in records if r["kind"] == "example"}
                    - set(archived))
    row.duplicates += len(archived) - len(set(archived))
    assert row.accounted == row.events_in and row.lost == row.duplicates == 0, row


def write_config(cfg, tmp_path: Path) -> Path:
    """Create cfg's topics and write it where the flow processes read it."""
    create_topics(cfg)
    path = tmp_path / "ctrstream.toml"
    path.write_text(cfg.to_toml())
    return path


def start_producer(cfg, tmp_path: Path, seed: int, n: int) -> threading.Thread:
    """The generator sending n impressions (faults on) at 3,000 messages/s, in a thread."""
    spec = StreamSpec(seed=seed, impressions=n, faults=Faults.preset(n, 0.03))
    producer = threading.Thread(target=produce, args=(cfg, spec),
                                kwargs={"truth_dir": tmp_path / "truth", "rate": 3000})
    producer.start()
    return producer


def check_join(row: tally.Row, cfg, tmp_path: Path) -> tuple[int, list]:
    """Account the join's run into ``row`` and check labels and counts against the truth;
    returns the number of impressions and the records in `examples`."""
    examples = read_topics(cfg, [cfg.kafka.examples_topic])
    truth = read_truth(tmp_path / "truth")
    account_join(row, cfg, tmp_path / "truth", examples, truth)
    check_against_truth(cfg, examples, truth)
    check_counts_against_recount(cfg, examples, truth)
    return len(truth), [orjson.loads(m.value()) for m in examples]


def emitted(cfg) -> int:
    return sum(orjson.loads(f.read_bytes()).get("impressions_emitted", 0)
               for f in (Path(cfg.data_dir) / "join").glob("stats-p*.json"))


def test_join_flow_rides_out_redis_and_broker_outages(stack, tmp_path):
    row = tally.row("join: Redis and broker paused, Redis stopped, back empty")
    cfg = join_config(stack.config(Config()), tmp_path)
    cfg_path = write_config(cfg, tmp_path)
    producer = start_producer(cfg, tmp_path, 21, 30_000)
    with tally.PeakRss(str(cfg_path)) as mem:
        proc = flow_process(cfg_path, "join")
        client = redis.Redis.from_url(cfg.redis.url)
        wait_for("progress", lambda: emitted(cfg) > 1000, proc)

        pause(stack.redis.pid(), OUTAGE_S)
        before = emitted(cfg)
        wait_for("progress after the Redis pause", lambda: emitted(cfg) > before, proc)

        pause(stack.kafka.pid(), OUTAGE_S)
        before = emitted(cfg)
        wait_for("progress after the broker pause", lambda: emitted(cfg) > before, proc)

        keys = client.dbsize()
        redis_down(stack)
        client = redis.Redis.from_url(cfg.redis.url)
        wait_for("the features written again", lambda: client.dbsize() >= keys, proc)
        row.outages = 3

        producer.join()
        finish(cfg_path, "join", proc)
    row.peak_rss_mb = mem.mb
    impressions, _ = check_join(row, cfg, tmp_path)
    print(f"chaos: join flow survived a {OUTAGE_S:.0f} s Redis pause, a {OUTAGE_S:.0f} s broker "
          f"pause and Redis stopped for {OUTAGE_S:.0f} s, back empty; {impressions:,} "
          "impressions, labels and Redis counts as in the ground truth")


def test_learn_flow_rides_out_redis_outage_and_empty_restart(stack, tmp_path):
    row = tally.row("learn: Redis paused, Redis stopped, back empty")
    cfg = learn_config(stack.config(Config()), tmp_path)
    cfg_path = write_config(cfg, tmp_path)
    records = join_examples(cfg, tmp_path, seed=22)

    with tally.PeakRss(str(cfg_path)) as mem:
        proc = flow_process(cfg_path, "learn")
        store = model_store(cfg, name=cfg.learn.store_name)
        wait_for("a published version", lambda: store.current() is not None, proc)
        pause(stack.redis.pid(), OUTAGE_S)
        redis_down(stack)
        store = model_store(cfg, name=cfg.learn.store_name)
        wait_for("a version published again", lambda: store.current() is not None, proc)
        row.outages = 2
        finish(cfg_path, "learn", proc)
    row.peak_rss_mb = mem.mb

    stats = check_learned_once(cfg, records)
    account_learn(row, cfg, records, stats)
    meta = store.get_meta(store.current())
    assert meta["examples"] == stats["counts"]["learned"]
    print(f"chaos: learn flow survived a {OUTAGE_S:.0f} s Redis pause and Redis stopped for "
          f"{OUTAGE_S:.0f} s, back empty;"
          f" {stats['counts']['learned']:,} examples learned once, a complete version in Redis")


def test_join_flow_killed_again_and_again_loses_nothing(stack, tmp_path):
    row = tally.row("join: SIGKILL at random points")
    cfg = join_config(stack.config(Config()), tmp_path)
    cfg_path = write_config(cfg, tmp_path)
    n = 8000 * (KILLS + 1)
    producer = start_producer(cfg, tmp_path, 23, n)
    rng = random.Random(KILLS)
    with tally.PeakRss(str(cfg_path)) as mem:
        for _ in range(KILLS):
            proc = flow_process(cfg_path, "join")
            # Once the input is all sent, the rest waits for its window: kill at once then.
            target = emitted(cfg) + rng.randint(500, 4000)
            wait_for("progress before a kill", lambda t=target: emitted(cfg) >= t
                     or not producer.is_alive(), proc)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            row.kills += 1
        producer.join()
        finish(cfg_path, "join", flow_process(cfg_path, "join"))
        row.kills += 1
    row.peak_rss_mb = mem.mb
    impressions, _ = check_join(row, cfg, tmp_path)
    print(f"chaos: join flow killed {KILLS + 1} times at random points; {impressions:,} "
          "impressions, every label and count as in the ground truth")


def test_learn_flow_killed_again_and_again_learns_each_example_once(stack, tmp_path):
    row = tally.row("learn: SIGKILL at random points")
    cfg = learn_config(stack.config(Config()), tmp_path)
    cfg_path = write_config(cfg, tmp_path)
    records = join_examples(cfg, tmp_path, seed=24)

    rng = random.Random(KILLS)
    step = 30_000 // (KILLS + 1)
    with tally.PeakRss(str(cfg_path)) as mem:
        for i in range(KILLS):
            proc = flow_process(cfg_path, "learn")
            target = (i + 1) * step + rng.randint(0, step // 2)
            wait_for("progress before a kill", lambda t=target: learned(cfg) >= t, proc)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            row.kills += 1
        finish(cfg_path, "learn", flow_process(cfg_path, "learn"))
        row.kills += 1
    row.peak_rss_mb = mem.mb
    stats = check_learned_once(cfg, records)
    account_learn(row, cfg, records, stats)
    store = model_store(cfg, name=cfg.learn.store_name)
    assert store.get_meta(store.current())["examples"] == stats["counts"]["learned"]
    print(f"chaos: learn flow killed {KILLS + 1} times at random points; "
          f"{stats['counts']['learned']:,} examples learned once each")


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_one_of_two_join_processes_killed_again_and_again_loses_nothing(stack, tmp_path):
    """`run join -p 2 --restart`: SIGKILL one of the two processes at random points; the
    supervisor stops the other and restarts the set from recovery state each time."""
    row = tally.row("join on 2 processes: one SIGKILLed at random points")
    cfg = join_config(stack.config(Config()), tmp_path)
    cfg_path = write_config(cfg, tmp_path)
    n = 8000 * (KILLS + 1)
    producer = start_producer(cfg, tmp_path, 25, n)
    rng = random.Random(KILLS)
    with tally.PeakRss(str(cfg_path)) as mem:
        sup = flow_process(cfg_path, "join", "-p", "2", "--restart")
        for _ in range(KILLS):
            wait_for("both processes", lambda: len(children(sup.pid)) == 2, sup)
            pids = children(sup.pid)
            target = emitted(cfg) + rng.randint(500, 4000)
            wait_for("progress before a kill", lambda t=target: emitted(cfg) >= t
                     or not producer.is_alive(), sup)
            os.kill(rng.choice(pids), signal.SIGKILL)
            row.kills += 1
            wait_for("the set restarted",
                     lambda p=set(pids): len(set(children(sup.pid)) - p) == 2, sup)
        producer.join()
        finish(cfg_path, "join", sup, "-p", "2")
    row.peak_rss_mb = mem.mb
    impressions, _ = check_join(row, cfg, tmp_path)
    print(f"chaos: one of 2 join processes killed {KILLS} times, the set restarted each time; "
          f"{impressions:,} impressions, every label and count as in the ground truth")


def broker_gone(fwd: Forwarder) -> None:
    """The broker off the network for OUTAGE_S: connections reset, new ones refused."""
    fwd.stop()
    try:
        time.sleep(OUTAGE_S)  # the outage itself, not a wait for a condition
    finally:
        fwd.start()


def test_producer_reports_what_the_gone_broker_did_not_take(forwarded_stack, tmp_path):
    """Messages that cannot be delivered before their timeout raise DeliveryError with the
    count; those the broker took are in the topic: sent = delivered + failed + undelivered."""
    stack, fwd = forwarded_stack
    cfg = stack.config(Config())
    create_topics(cfg)
    row = tally.row("produce: broker gone, failures reported")
    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(produce, cfg, StreamSpec(seed=2, impressions=4000),
                           truth_dir=tmp_path, rate=500, **{"message.timeout.ms": 2000})
        consumer = Consumer(cfg.kafka_client(**{"group.id": "chaos-probe"}))
        tp = TopicPartition(cfg.kafka.impressions_topic, 0)
        deadline = time.monotonic() + 30
        while consumer.get_watermark_offsets(tp, timeout=5)[1] < 100:
            assert time.monotonic() < deadline and not done.done(), "nothing delivered"
            time.sleep(0.05)
        consumer.close()
        fwd.stop()
        row.outages = 1
        with pytest.raises(DeliveryError, match="failed"):
            done.result(timeout=180)
    fwd.start()
    delivery = orjson.loads((tmp_path / MANIFEST_FILE).read_bytes())["delivery"]
    in_topics = len(read_topics(cfg, [cfg.kafka.impressions_topic, cfg.kafka.clicks_topic]))
    # A message reported failed may still have been stored (its ack lost with the connection):
    # "failed" means "not known to be delivered", so the topics hold at least the rest.
    acked = delivery["sent"] - delivery["failed"] - delivery["undelivered"]
    row.events_in = delivery["sent"]
    row.lost = max(acked - in_topics, 0)
    row.accounted = row.events_in - row.lost
    assert delivery["failed"] > 0 and acked <= in_topics <= delivery["sent"], delivery
    print(f"chaos: a producer cut off from the broker reported {delivery['failed']:,} failed "
          f"deliveries of {delivery['sent']:,}; the other {in_topics:,} are in the topics")


def test_flows_reconnect_after_the_broker_goes_away(forwarded_stack, tmp_path):
    """Join, then learn, each cut off from the broker mid-stream; both resume on their own."""
    stack, fwd = forwarded_stack
    cfg = learn_config(join_config(stack.config(Config()), tmp_path), tmp_path)
    cfg_path = write_config(cfg, tmp_path)
    producer = start_producer(cfg, tmp_path, 26, 30_000)

    row = tally.row("join: broker unreachable (reset, refused)")
    with tally.PeakRss(str(cfg_path)) as mem:
        proc = flow_process(cfg_path, "join")
        wait_for("progress", lambda: emitted(cfg) > 1000, proc)
        broker_gone(fwd)
        before = emitted(cfg)
        wait_for("progress after the outage", lambda: emitted(cfg) > before, proc)
        row.outages = 1
        producer.join()
        finish(cfg_path, "join", proc)
    row.peak_rss_mb = mem.mb
    impressions, records = check_join(row, cfg, tmp_path)

    row = tally.row("learn: broker unreachable (reset, refused)")

    with tally.PeakRss(str(cfg_path)) as mem:
        proc = flow_process(cfg_path, "learn")
        wait_for("progress", lambda: learned(cfg) > 2000, proc)
        broker_gone(fwd)
        before = learned(cfg)
        wait_for("progress after the outage", lambda: learned(cfg) > before, proc)
        row.outages = 1
        finish(cfg_path, "learn", proc)
    row.peak_rss_mb = mem.mb
    stats = check_learned_once(cfg, records)
    account_learn(row, cfg, records, stats)
    print(f"chaos: join and learn flows each lost the broker for {OUTAGE_S:.0f} s mid-stream "
          f"and resumed on their own; {impressions:,} impressions, labels, counts and "
          f"{stats['counts']['learned']:,} examples learned once")
