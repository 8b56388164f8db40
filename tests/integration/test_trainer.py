"""The online trainer against a real Redis: the versions it publishes, pushes into and follows.

Built as the learn flow builds it (flows.learn.trainer), driven by hand: intervals are long,
and a test calls ``on_time`` at the moment a push or version is due."""

from __future__ import annotations

import uuid

import numpy as np
import orjson
import pytest

from flows.build import feature_spec, model_settings, model_store, retrain_settings
from flows.learn import trainer
from learners.model import Models
from learners.retrain import retrain

pytestmark = pytest.mark.integration

DAY0 = 1_700_006_400_000
NEVER = 1e6  # s


@pytest.fixture
def cfg(stack_cfg, redis_client, tmp_path):
    return stack_cfg.replace(data_dir=str(tmp_path), learn={
        "store_name": f"t{uuid.uuid4().hex[:8]}", "hash_bits": 16,
        "push_interval_s": NEVER, "snapshot_interval_s": 10 * NEVER})


def batch(start: int, n: int = 200) -> list[tuple]:
    out = []
    for i in range(start, start + n):
        ex = {"kind": "example", "impression_id": f"i{i}", "ts": DAY0 + 1000 * i,
              "user_id": f"u{i % 17}", "item_id": f"v{i % 11}", "label": int(i % 7 == 0),
              "features": {"category": f"c{i % 3}", "position": i % 4, "device": "mobile",
                           "hour": 9}}
        out.append((0, i, orjson.dumps(ex)))
    return out


def push(t) -> None:
    t.on_time(t.next_push)


def test_first_start_publishes_and_a_second_start_continues_from_it(cfg):
    store = model_store(cfg, name=cfg.learn.store_name)
    assert store.current() is None
    t = trainer(cfg)
    assert t.version is not None and store.current() == t.version
    meta = store.get_meta(t.version)
    assert meta["source"] == "online" and meta["parent"] is None and meta["examples"] == 0

    t.on_batch(batch(0))
    t.end_of_input()  # a new version, with the counts and offsets it learned through
    again = trainer(cfg)
    assert again.version == t.version == store.current()
    assert again.counts == t.counts and again.counts["learned"] == 200
    assert again.offsets == {0: 200} and again.models.examples == 200


def test_a_push_writes_into_the_current_version_and_a_version_is_published_on_time(cfg):
    store = model_store(cfg, name=cfg.learn.store_name)
    t = trainer(cfg)
    first = t.version
    weights = store.key(first, "w:ftrl")
    assert store.client.hlen(weights) == 0  # fresh models: no weight off zero yet
    t.on_batch(batch(0))
    push(t)
    assert t.version == first == store.current()
    assert store.client.hlen(weights) > 0

    t.on_time(t.next_version)
    assert t.version != first and store.current() == t.version
    meta = store.get_meta(t.version)
    assert meta["parent"] == first and meta["examples"] == 200
    # Our own superseded version expires within online_keep_hours.
    assert 0 < store.client.pttl(store.key(first, "keys")) <= (
        cfg.learn.online_keep_hours * 3_600_000)


def test_a_version_the_retrain_made_current_is_followed(cfg):
    store = model_store(cfg, name=cfg.learn.store_name)
    t = trainer(cfg)
    t.on_batch(batch(0))
    retrain = trainer(cfg)  # stands in for the daily retrain: other models, its own version
    retrain.on_batch(batch(1000, 300))
    retrained = retrain.models.write_version(store, "retrain", store.current())
    store.publish(retrained)

    push(t)
    assert t.version == retrained and store.current() == retrained
    assert t.models.examples == 300  # what the retrain's version holds, not ours
    t.on_batch(batch(200))
    push(t)  # and pushes into it from now on
    assert t.version == retrained
    t.on_time(t.next_version)
    assert store.get_meta(t.version)["parent"] == retrained


def test_a_version_redis_lost_is_published_again(cfg, redis_client):
    store = model_store(cfg, name=cfg.learn.store_name)
    t = trainer(cfg)
    t.on_batch(batch(0))
    lost = t.version
    # The version's keys are gone (evicted, say), the pointer still names it: the push fails.
    store.client.delete(*store.client.smembers(store.key(lost, "keys")))
    push(t)
    assert t.version != lost and store.current() == t.version
    assert store.get_meta(t.version)["examples"] == 200

    # Redis came back empty: no pointer at all.
    redis_client.flushdb()
    t.on_batch(batch(200))
    push(t)
    assert store.current() == t.version and store.get_meta(t.version)["examples"] == 400


def test_our_version_newer_than_the_resumed_state_is_replaced_not_followed(cfg):
    store = model_store(cfg, name=cfg.learn.store_name)
    t = trainer(cfg)
    t.on_batch(batch(0))
    state = t.state()  # the last snapshot before a crash ...
    t.on_batch(batch(200))
    t.on_time(t.next_version)  # ... after which the crashed process published once more
    newer = t.version

    resumed = trainer(cfg, state)  # the examples since the snapshot are replayed into it
    resumed.on_batch(batch(200))
    push(resumed)
    assert resumed.version not in (newer, state["version"])
    assert store.current() == resumed.version
    assert store.get_meta(resumed.version)["examples"] == 400  # each example learned once


class Recording:
    """Models that record the ids of the examples each learn call is given."""

    def __init__(self, models) -> None:
        self.models, self.learned = models, []

    def learn(self, examples, **kw):
        self.learned += [e["impression_id"] for e in examples]
        return self.models.learn(examples, **kw)

    def __getattr__(self, name):
        return getattr(self.models, name)


def test_following_a_retrain_replays_the_archive_since_the_retrained_days_end(cfg):
    store = model_store(cfg, name=cfg.learn.store_name)
    t = trainer(cfg)
    load = t.load_models
    t.load_models = lambda version: Recording(load(version))
    day_end = DAY0 + 86_400_000  # the retrained day is DAY0's, 2023-11-15
    # The last 20 minutes of the day and the first 40 of the next, arriving slightly out of
    # event-time order; one quarantined (archived, not learned), one a duplicate, one bad.
    rng = np.random.default_rng(0)
    ts = day_end + np.arange(-1200, 2400, 10) * 1000 + rng.integers(-20_000, 20_000, 360)
    exs = [{**orjson.loads(r[2]), "ts": int(s)} for r, s in zip(batch(0, 360), ts, strict=True)]
    exs[300]["quarantined"] = True
    exs.append(dict(exs[250]))
    exs.append({**exs[251], "impression_id": "bad", "label": 7})
    t.on_batch([(0, k, orjson.dumps(e)) for k, e in enumerate(exs[:200])])
    t.end_of_input()  # a periodic version, the archive flushed: the replay must read both ...
    t.on_batch([(0, 200 + k, orjson.dumps(e)) for k, e in enumerate(exs[200:])])  # ... and not

    retrain = Models(model_settings(cfg), feature_spec(cfg))  # the retrain of 2023-11-15
    retrain.learn([orjson.loads(r[2]) for r in batch(1000, 300)])
    retrained = retrain.write_version(store, "retrain", store.current(),
                                      extra={"date": "2023-11-15"})
    store.publish(retrained)
    push(t)

    assert t.version == retrained
    since = sorted((e for e in exs[:360] if e["ts"] >= day_end and not e.get("quarantined")),
                   key=lambda e: e["ts"])
    assert len(since) > 200
    assert t.models.learned == [e["impression_id"] for e in since]
    assert t.models.examples == 300 + len(since)
    t.on_batch(batch(5000, 10))  # and learns on from there
    assert t.models.learned[len(since):] == [f"i{i}" for i in range(5000, 5010)]



def test_a_start_from_a_retrained_version_replays_since_its_day_and_reads_on_from_there(cfg):
    store = model_store(cfg, name=cfg.learn.store_name)
    t = trainer(cfg)
    day_end = DAY0 + 86_400_000
    recs = [(0, k, orjson.dumps({**orjson.loads(r[2]), "ts": day_end + (k - 100) * 10_000}))
            for k, r in enumerate(batch(0, 300))]  # 100 before the day's end, 200 after
    t.on_batch(recs)
    t.end_of_input()  # the learn flow's last version: read through offset 300
    res = retrain(retrain_settings(cfg), "2023-11-15", store, t.archive, force=True)
    assert res.status == "published" and store.current() == res.version
    assert store.get_meta(res.version)["offsets"] == {"0": 300}

    again = trainer(cfg)  # the learn flow started without its recovery state
    assert again.version == res.version and again.offsets == {0: 300}
    assert again.models.examples == res.models.examples + 200  # what came after the day
    assert again.counts["learned"] == 300
    again.on_batch(recs[150:])  # read again (offsets older than that): duplicates
    assert again.models.examples == res.models.examples + 200
    assert again.counts["duplicates"] == 150
