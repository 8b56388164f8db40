"""The one Redis retry loop (features.store.until_done), with a fake clock and no Redis."""

from __future__ import annotations

import pytest
import redis

from features.store import StoreUnavailable, until_done


class Flaky:
    """Fails ``n`` times with ``error``, then returns "ok"."""

    def __init__(self, n: int, error: Exception) -> None:
        self.n, self.error, self.calls = n, error, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.n:
            raise self.error
        return "ok"


def clocked():
    now, slept = [0.0], []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    return {"clock": lambda: now[0], "sleep": sleep}, slept


def test_retries_with_exponential_backoff_until_it_works():
    kw, slept = clocked()
    errors = []
    fn = Flaky(6, redis.ConnectionError("refused"))
    assert until_done("t", fn, on_error=lambda: errors.append(1), max_s=1.0, **kw) == "ok"
    assert slept == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0] and len(errors) == 6


def test_a_value_redis_cannot_take_is_not_retried():
    kw, slept = clocked()
    with pytest.raises(redis.DataError):
        until_done("t", Flaky(1, redis.DataError("bad")), **kw)
    with pytest.raises(ValueError):  # not a Redis error at all
        until_done("t", Flaky(1, ValueError("bug")), **kw)
    assert slept == []


def test_gives_up_after_give_up_s_without_the_password(caplog):
    kw, slept = clocked()

    class Client:  # what a RedisCluster looks like to the scrubber
        _ctrstream_password = "s3cret"

    fn = Flaky(100, redis.TimeoutError("auth s3cret timed out"))
    with pytest.raises(StoreUnavailable, match=r"^w: Redis failed for 1.0 s") as e:
        until_done("w", fn, client=Client(), give_up_s=1.0, **kw)
    assert sum(slept) == pytest.approx(1.0)  # the last wait is cut to the give-up time
    assert "s3cret" not in str(e.value) and "s3cret" not in caplog.text
