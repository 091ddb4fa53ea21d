"""A small soak (the big one: bench/soak_serve.py): good requests, disconnects and malformed bodies
from concurrent clients; every good one answered, every bad one a 4xx, no row left running,
memory back near its baseline."""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

from helpers_post import tiny_server

from codefoundry.infer.server import ServerLimits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from soak_serve import health, rss_mb, soak


def test_soak_mixed_traffic_keeps_serving():
    with tiny_server(ServerLimits(max_tokens=64, read_timeout_s=5.0)) as (url, engine, _, _):
        soak(url, 40, 8, seed=1)  # warm-up
        gc.collect()
        base = rss_mb()
        counts = soak(url, 160, 16, seed=2)
        deadline = time.monotonic() + 10
        while health(url)["active_rows"] and time.monotonic() < deadline:
            time.sleep(0.05)
        gc.collect()
        grown = rss_mb() - base
        state = health(url)
    assert set(counts) <= {"good_ok", "bad_4xx", "gone"}, counts
    assert counts["good_ok"] > 60 and counts["bad_4xx"] > 5 and counts["gone"] > 5
    assert state == {"status": "ok", "active_rows": 0, "queue_depth": 0}
    assert grown < 40, f"RSS grew by {grown:.0f} MB"
