"""The trainer's batch prefetcher: order, errors where they belong, and a clean stop."""
import threading
import time

import pytest

from autoregembed.run.prefetch import Prefetcher


def test_yields_every_key_in_order_built_ahead_on_another_thread():
    threads = set()

    def build(key):
        threads.add(threading.current_thread().name)
        return key * 10

    with Prefetcher(build, range(7), depth=3) as p:
        assert list(p) == [(k, k * 10) for k in range(7)]
    assert threads == {"prefetch"}


def test_a_build_error_is_raised_at_its_key_after_the_good_ones():
    def build(key):
        if key == 3:
            raise KeyError("row 3")
        return key

    got = []
    with pytest.raises(KeyError, match="row 3"), Prefetcher(build, range(6)) as p:
        for key, value in p:
            got.append(value)
    assert got == [0, 1, 2]


def test_close_stops_building_the_rest():
    built = []

    def build(key):
        built.append(key)
        return key

    p = Prefetcher(build, range(10_000), depth=2)
    first = next(iter(p))
    p.close()
    assert first == (0, 0) and not p._thread.is_alive()
    time.sleep(0.2)
    assert len(built) <= 5  # what was queued or in flight, not the whole schedule
