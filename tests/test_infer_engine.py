"""The batching engine: concurrent requests batched, same text as one-at-a-time decoding."""

from __future__ import annotations

import threading

import pytest
from helpers_post import tiny_checkpoint

from codefoundry.checkpoint import load_model
from codefoundry.infer.engine import (
    Decoder,
    Engine,
    Request,
    RequestRejected,
    SamplingParams,
    run_batch,
)
from codefoundry.infer.generate import stream

PROMPTS = ["def add(a, b):\n", "import os\n", "class Point:\n    def __init__(self", "x"]


@pytest.fixture(scope="module")
def model_tok():
    return load_model(tiny_checkpoint())


def test_batched_equals_single(model_tok):
    model, tok = model_tok
    lengths = [12, 5, 20, 9]
    reqs = [Request(tok.encode(p), SamplingParams(max_tokens=n)) for p, n in zip(PROMPTS, lengths)]
    run_batch(model, tok, reqs)
    for p, n, req in zip(PROMPTS, lengths, reqs):
        single = "".join(stream(model, tok, p, max_new_tokens=n, stop_at_eot=False))
        assert req.text == single
        assert req.finish_reason == "length" and len(req.completion_ids) == n


def test_stop_string_and_stop_token(model_tok):
    model, tok = model_tok
    free = Request(tok.encode(PROMPTS[0]), SamplingParams(max_tokens=30))
    run_batch(model, tok, [free])
    ids = free.completion_ids
    stop_tok = Request(tok.encode(PROMPTS[0]), SamplingParams(max_tokens=30, stop_ids={ids[5]}))
    stop_str = tok.decode(ids[3:5])
    by_text = Request(tok.encode(PROMPTS[0]), SamplingParams(max_tokens=30, stop=[stop_str]))
    run_batch(model, tok, [stop_tok, by_text])
    first = ids.index(ids[5])
    assert stop_tok.finish_reason == "stop" and stop_tok.finish_token == ids[5]
    assert stop_tok.completion_ids == ids[:first]
    assert by_text.finish_reason == "stop" and stop_str not in by_text.text
    assert free.text.startswith(by_text.text)


def test_seeded_sampling_is_reproducible(model_tok):
    model, tok = model_tok
    params = dict(max_tokens=15, temperature=1.0, top_p=0.9, seed=7)
    a = Request(tok.encode("def f("), SamplingParams(**params))
    b = Request(tok.encode("def f("), SamplingParams(**params))
    other = Request(tok.encode("import sys\n"), SamplingParams(max_tokens=3))
    run_batch(model, tok, [a])
    run_batch(model, tok, [other, b])  # batch company must not change a seeded row
    assert a.completion_ids == b.completion_ids


def test_engine_rejects_oversized_and_decodes_concurrent_requests_together(model_tok):
    model, tok = model_tok
    with Engine(model, tok, max_batch=4) as engine:
        with pytest.raises(RequestRejected):
            engine.submit(Request(tok.encode("x"), SamplingParams(max_tokens=model.cfg.max_seq_len)))
        got: dict[int, list[str]] = {i: [] for i in range(4)}
        reqs = [Request(tok.encode(p), SamplingParams(max_tokens=8), on_text=got[i].append)
                for i, p in enumerate(PROMPTS)]
        threads = [threading.Thread(target=engine.submit, args=(r,)) for r in reqs]
        for t in threads:
            t.start()
        for r in reqs:
            assert r.done.wait(30)
        assert engine.peak_rows > 1
        for i, r in enumerate(reqs):
            assert "".join(got[i]) == r.text and r.finish_reason == "length"


def test_request_joins_mid_generation_and_leaves_at_once(model_tok):
    """Continuous batching: a short request submitted while a long one runs finishes first, and
    both give the text they give alone (per-row cache positions)."""
    model, tok = model_tok
    long_alone = "".join(stream(model, tok, PROMPTS[2], max_new_tokens=200, stop_at_eot=False))
    short_alone = "".join(stream(model, tok, PROMPTS[0], max_new_tokens=5, stop_at_eot=False))
    with Engine(model, tok, max_batch=4) as engine:
        started = threading.Event()
        long = Request(tok.encode(PROMPTS[2]), SamplingParams(max_tokens=200), on_text=lambda d: started.set())
        engine.submit(long)
        assert started.wait(30)
        short = engine.submit(Request(tok.encode(PROMPTS[0]), SamplingParams(max_tokens=5)))
        assert short.done.wait(30)
        assert not long.done.is_set()  # the short one joined the running batch and left before it
        assert long.done.wait(60)
    assert engine.peak_rows == 2
    assert (long.text, short.text) == (long_alone, short_alone)


def test_cancelled_row_frees_its_slot(model_tok):
    model, tok = model_tok
    with Engine(model, tok, max_batch=1) as engine:
        first = engine.submit(Request(tok.encode("x"), SamplingParams(max_tokens=200)))
        second = engine.submit(Request(tok.encode("y"), SamplingParams(max_tokens=3)))
        first.cancel()
        assert second.done.wait(30) and first.done.wait(30)
    assert first.finish_reason == "cancelled" and len(first.completion_ids) < 200
    assert second.finish_reason == "length"


def test_a_failing_row_fails_alone(model_tok):
    """Issue 18 item 4: an error while sampling one row fails that request, not its neighbours."""
    model, tok = model_tok
    good = Request(tok.encode(PROMPTS[0]), SamplingParams(max_tokens=6, temperature=1.0, seed=1))
    bad = Request(tok.encode(PROMPTS[1]), SamplingParams(max_tokens=6, temperature=1.0))
    bad.params.temperature = float("nan")  # slips past validation (set after construction): NaN probabilities
    alone = Request(tok.encode(PROMPTS[0]), SamplingParams(max_tokens=6, temperature=1.0, seed=1))
    run_batch(model, tok, [good, bad])
    run_batch(model, tok, [alone])
    assert bad.finish_reason == "error" and "sampling failed" in bad.error
    assert good.finish_reason == "length" and good.completion_ids == alone.completion_ids


@pytest.mark.parametrize("bad", [dict(temperature=float("nan")), dict(temperature=-1.0), dict(seed=2**70),
                                 dict(top_p=0.0), dict(max_tokens=0)])
def test_sampling_params_are_validated(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
    assert SamplingParams(temperature=1e-300).greedy  # below the floor: greedy, never inf/NaN


def test_rows_keep_their_tokens_when_the_batch_is_packed(model_tok):
    """A row that joins late and outlives the first one is packed left (KVCache.realign) and
    still decodes exactly what it decodes alone."""
    model, tok = model_tok
    first = Request(tok.encode(PROMPTS[2]), SamplingParams(max_tokens=120, temperature=1.0, seed=1))
    late = Request(tok.encode(PROMPTS[0]), SamplingParams(max_tokens=100, temperature=1.0, seed=2))
    decoder = Decoder(model, tok, 2)
    decoder.add([first])
    for _ in range(60):
        decoder.step()
    decoder.add([late])
    packed = []
    while decoder.rows:
        before = decoder.batch.cache.pos
        decoder.step()
        packed.append(decoder.batch.cache.pos < before)
    assert any(packed)
    alone = Request(tok.encode(PROMPTS[0]), SamplingParams(max_tokens=100, temperature=1.0, seed=2))
    run_batch(model, tok, [alone])
    assert late.completion_ids == alone.completion_ids and first.finish_reason == "length"


def test_on_done_is_called_once_when_the_request_has_ended(model_tok):
    """The server queues plain requests without a thread and learns of their end through on_done."""
    model, tok = model_tok
    seen = []
    reqs = [Request(tok.encode(p), SamplingParams(max_tokens=n),
                    on_done=lambda r: seen.append((r.prompt_ids, r.done.is_set(), r.finish_reason)))
            for p, n in zip(PROMPTS[:2], (3, 6))]
    run_batch(model, tok, reqs)
    assert sorted(seen) == sorted((r.prompt_ids, True, "length") for r in reqs)
