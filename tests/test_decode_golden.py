"""Decoding gives the same tokens as before the one-decoding-step refactor (issue 14).

``tests/data/decode_golden.json`` was recorded from the code at commit 0cf7059 (four separate
decoding loops) by running this file as a script; each test re-runs the same case on the
same tiny checkpoint and seed and must reproduce those tokens exactly. Cases cover static
batches with left padding, greedy and seeded sampling (top-k / top-p), stop strings, stop
tokens, prompts longer than the context, per-row seeds in a mixed batch, chat replies and
both speculative decoders.

    python tests/test_decode_golden.py   # re-record (only when a change of tokens is intended)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers_post import make_checkpoint

from codefoundry.checkpoint import load_model

GOLDEN = Path(__file__).resolve().parent / "data" / "decode_golden.json"
PROMPTS = ["def add(a, b):\n", "import os\n", "class Point:\n    def __init__(self", "x"]
LONG = "def f(x):\n    return x\n" * 60  # longer than the tiny model's 256-token context


def case_generate_tokens(model, tok) -> dict:
    from codefoundry.infer.generate import generate_tokens

    ids = [tok.encode(p) for p in PROMPTS]
    greedy = [t.tolist() for t in generate_tokens(model, ids, 20)]
    sampled = [t.tolist() for t in generate_tokens(model, ids, 20, temperature=1.0, top_k=20, top_p=0.9, seed=5)]
    long = [t.tolist() for t in generate_tokens(model, [tok.encode(LONG)], 12, temperature=0.7, seed=2)]
    return {"greedy": greedy, "sampled": sampled, "long": long}


def case_stream(model, tok) -> dict:
    from codefoundry.infer.generate import stream

    out = {}
    for name, kw in {"greedy": {}, "sampled": {"temperature": 1.0, "seed": 3, "top_p": 0.95},
                     "stop": {"temperature": 1.0, "seed": 3, "stop": ["return", "\n\n"]},
                     "no_eot": {"temperature": 1.2, "seed": 11, "stop_at_eot": False},
                     "long": {"temperature": 0.7, "seed": 2}}.items():
        prompt = LONG if name == "long" else PROMPTS[0]
        out[name] = list(stream(model, tok, prompt, max_new_tokens=40, **kw))
    return out


def case_complete_batch(model, tok) -> dict:
    from codefoundry.infer.generate import complete_batch

    prompts = PROMPTS + [tok.encode("for i in range(")]
    return {"greedy": complete_batch(model, tok, prompts, 24, stop=["\n\n", " len"], batch_size=2),
            "sampled": complete_batch(model, tok, prompts, 24, temperature=0.8, top_p=0.95, stop=["ar", "e"],
                                      seed=1, batch_size=3)}


def case_run_batch(model, tok) -> dict:
    from codefoundry.infer.engine import Request, SamplingParams, run_batch

    specs = [dict(max_tokens=12), dict(max_tokens=30, temperature=1.0, top_p=0.9, seed=7),
             dict(max_tokens=25, stop=["st"]), dict(max_tokens=18, temperature=0.9, top_k=30, seed=8, stop=["rapp"]),
             dict(max_tokens=9, stop_ids={tok.eot_id})]
    reqs = [Request(tok.encode(p), SamplingParams(**s)) for p, s in zip(PROMPTS + ["y = "], specs)]
    run_batch(model, tok, reqs)
    return {"rows": [[r.completion_ids, r.text, r.finish_reason] for r in reqs]}


def case_chat(model, tok) -> dict:
    from codefoundry.infer.chat import ChatSession
    from codefoundry.infer.engine import SamplingParams

    chat = ChatSession(model, tok, SamplingParams(max_tokens=20, temperature=0.8, seed=4), system="be brief")
    return {"replies": [chat.send("hello").content, chat.send("write a loop").content]}


def case_speculative(model, tok, mtp_model, draft) -> dict:
    from codefoundry.infer.speculative import draft_speculative_generate, mtp_speculative_generate

    ids = tok.encode(PROMPTS[2])
    return {"mtp": mtp_speculative_generate(mtp_model, ids, 30, {tok.eot_id})[0],
            "draft": draft_speculative_generate(model, draft, ids, 30, 3, {tok.eot_id})[0],
            "draft_long": draft_speculative_generate(model, draft, tok.encode(LONG), 10, 4)[0]}


def _models(tmp: Path):
    # init_std 0.3: a random model whose greedy output depends on its context (at the default
    # 0.02 it repeats one token, which would make greedy equality say little).
    model, tok = load_model(make_checkpoint(tmp / "target", seed=0, init_std=0.3))
    mtp_model, _ = load_model(make_checkpoint(tmp / "mtp", seed=1, init_std=0.3, mtp_heads=2))
    draft, _ = load_model(make_checkpoint(tmp / "draft", seed=3, init_std=0.3))
    return model, tok, mtp_model, draft


def _record(tmp: Path) -> dict:
    model, tok, mtp_model, draft = _models(tmp)
    return {"generate_tokens": case_generate_tokens(model, tok), "stream": case_stream(model, tok),
            "complete_batch": case_complete_batch(model, tok), "run_batch": case_run_batch(model, tok),
            "chat": case_chat(model, tok), "speculative": case_speculative(model, tok, mtp_model, draft)}


def _json(value):
    return json.loads(json.dumps(value))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return _models(tmp_path_factory.mktemp("golden")), json.loads(GOLDEN.read_text())


def test_generate_tokens_unchanged(setup):
    (model, tok, _, _), golden = setup
    assert _json(case_generate_tokens(model, tok)) == golden["generate_tokens"]


def test_stream_unchanged(setup):
    (model, tok, _, _), golden = setup
    assert _json(case_stream(model, tok)) == golden["stream"]


def test_complete_batch_unchanged(setup):
    (model, tok, _, _), golden = setup
    assert _json(case_complete_batch(model, tok)) == golden["complete_batch"]


def test_run_batch_unchanged(setup):
    (model, tok, _, _), golden = setup
    assert _json(case_run_batch(model, tok)) == golden["run_batch"]


def test_chat_unchanged(setup):
    (model, tok, _, _), golden = setup
    assert _json(case_chat(model, tok)) == golden["chat"]


def test_speculative_unchanged(setup):
    (model, tok, mtp_model, draft), golden = setup
    assert _json(case_speculative(model, tok, mtp_model, draft)) == golden["speculative"]


if __name__ == "__main__":
    import tempfile

    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(_record(Path(tempfile.mkdtemp())), indent=1) + "\n")
    print(f"wrote {GOLDEN}")
