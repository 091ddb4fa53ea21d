"""`codefoundry serve` leaves a core to the HTTP side unless told otherwise (--threads, OMP_NUM_THREADS)."""

from __future__ import annotations

import os

from codefoundry.infer.server import serving_threads


def test_serving_threads_leave_a_core_to_the_http_side(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert serving_threads(None) == 7 and serving_threads(3) == 3 and serving_threads(0) == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert serving_threads(None) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert serving_threads(None) == 4 and serving_threads(2) == 2
