"""What keeps a decoding step's cost sub-linear in its rows, checked for being exact: the
vectorised sampler draws from the right distribution per row, incremental detokenizing gives
the text and the deltas that decoding every id gives, DecodeBatch reuses its masks, and the
server hands a step's text to the event loop in one wake-up."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
import torch
from helpers_post import tiny_checkpoint
from tokenizers import Tokenizer, decoders
from tokenizers.models import BPE

from codefoundry.checkpoint import load_model
from codefoundry.infer.decode import DecodeBatch, TextDeltas
from codefoundry.infer.sampling import SamplingParams, sample_free_rows, sample_rows


class ReferenceDeltas:
    """The former TextDeltas: decode every id at every token (the behaviour to keep)."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer, self.stop, self.ids, self.shown, self.stopped = tokenizer, stop, [], 0, False
        self.hold = max((len(s) for s in stop), default=1) - 1

    def cut(self) -> tuple[str, bool]:
        text = self.tokenizer.decode(self.ids)
        at = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        return (text[:at], True) if at >= 0 else (text, False)

    def add(self, token: int) -> str:
        self.ids.append(token)
        text, self.stopped = self.cut()
        safe = len(text) if self.stopped else len(text) - self.hold
        if not self.stopped and text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        return self.show(safe, text)

    def flush(self) -> str:
        text = self.cut()[0]
        return self.show(len(text), text)

    def show(self, upto: int, text: str) -> str:
        if upto <= self.shown:
            return ""
        delta, self.shown = text[self.shown:upto], upto
        return delta


class SentencePieceLike:
    """A Llama-style decoder (metaspace, byte fallback, the first space stripped): a window of
    ids decodes differently from the same ids inside the whole, which incremental decoding must
    absorb. Its ids are drawn as whole pieces or the two bytes of one character, never two
    characters' bytes in a row: ByteFallback turns a whole run of bytes into U+FFFD when any of
    them is invalid, so where runs meet, decoding every id is no reference at all."""

    def __init__(self) -> None:
        pieces = ["<unk>", "\u2581def", "\u2581x", "(", ")", ":", "\u2581", "a", "\u2581return", "\u2581\u2581"]
        pieces += [f"<0x{b:02X}>" for b in range(256)]
        self.tk = Tokenizer(BPE({p: i for i, p in enumerate(pieces)}, [], unk_token="<unk>", byte_fallback=True))
        self.tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                             decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        self.pieces = len(pieces) - 256

    def draw(self, rng: random.Random, n: int) -> list[int]:
        ids: list[int] = []
        while len(ids) < n:
            if ids and ids[-1] >= self.pieces or rng.random() < 0.7:
                ids.append(rng.randrange(1, self.pieces))
            else:
                ids += [self.pieces + b for b in rng.choice("\u00e9\u00f1").encode()]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=False)


@pytest.fixture(scope="module")
def model_tok():
    return load_model(tiny_checkpoint())


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_incremental_detokenizing_gives_the_same_text_and_deltas(model_tok, kind):
    tok = model_tok[1] if kind == "byte-level" else SentencePieceLike()
    rng = random.Random(0)
    split_chars = 0
    for _ in range(400):
        stop = rng.choice([[], ["e"], ["return", "\n\n"], ["a)", "\ufffd"], [" x", "xyz"]])
        n = rng.randint(1, 40)
        ids = [rng.randrange(tok.vocab_size) for _ in range(n)] if kind == "byte-level" else tok.draw(rng, n)
        ref, new = ReferenceDeltas(tok, stop), TextDeltas(tok, stop)
        got, want = [], []
        for t in ids:
            got.append(new.add(t))
            want.append(ref.add(t))
            split_chars += tok.decode(ref.ids).endswith("\ufffd")
            if ref.stopped:
                break
        got.append(new.flush())
        want.append(ref.flush())
        assert (got, new.text, new.stopped) == (want, ref.cut()[0], ref.stopped), (stop, ids)
    assert split_chars > 50  # the cases include characters split across tokens


def test_vectorised_sampler_draws_each_rows_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0])
    settings = [SamplingParams(temperature=1.0), SamplingParams(temperature=2.0),
                SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0, top_p=0.7)]
    draws = 4000
    params = [p for p in settings for _ in range(draws)]
    tokens, bad = sample_free_rows(logits.repeat(len(params), 1), params)
    assert bad == []
    for i, p in enumerate(settings):
        counts = torch.bincount(tokens[i * draws:(i + 1) * draws], minlength=4).float() / draws
        expected = (logits / p.temperature).softmax(-1)
        if p.top_k:
            expected = torch.tensor([0.0, 0.0, *logits[2:].softmax(-1).tolist()])
        if p.top_p < 1:  # 0.64 for token 3 is short of 0.7: the smallest prefix reaching it adds token 2
            expected = torch.tensor([0.0, 0.0, *logits[2:].softmax(-1).tolist()])
        assert counts.tolist() == pytest.approx(expected.tolist(), abs=0.03), p


def test_a_nan_row_fails_alone_and_seeded_rows_keep_their_stream():
    logits = torch.randn(3, 50)
    logits[1] = float("nan")
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, seed=4)]
    gens = [None, None, torch.Generator().manual_seed(4)]
    tokens, failed = sample_rows(logits, params, gens)
    assert list(failed) == [1] and 0 <= int(tokens[0]) < 50
    alone = torch.multinomial((logits[2:] / 0.8).softmax(-1), 1, generator=torch.Generator().manual_seed(4))
    assert int(tokens[2]) == int(alone)  # a seed gives the tokens it always gave
    assert list(sample_rows(logits[:2], params[:2], gens[:2])[1]) == [1]  # every row unseeded: the same


def test_decode_batch_rebuilds_its_masks_only_when_rows_change(model_tok):
    model, tok = model_tok
    batch = DecodeBatch(model, 3)
    batch.join([tok.encode("def f(x):"), tok.encode("x")])
    batch.step(torch.tensor([1, 2]))
    mask = batch._key_valid
    assert mask is not None and batch._row_pos is None  # left padding, one static batch
    batch.step(torch.tensor([1, 2]))
    assert batch._key_valid is mask
    batch.join([tok.encode("import os")])
    batch.step(torch.tensor([1, 2, 3]))
    assert batch._key_valid is not mask and batch._row_pos.tolist() == batch.positions
    batch.leave({0})
    batch.step(torch.tensor([2, 3]))
    assert batch._key_valid.shape[0] == 2 and batch._row_pos.tolist() == batch.positions


def test_outbox_wakes_the_loop_once_for_a_steps_text():
    from codefoundry.infer.server import _joined, _Outbox

    class Job:
        def __init__(self) -> None:
            self.got: list = []

        def receive(self, item) -> None:
            self.got.append(item)

    loop = asyncio.new_event_loop()
    try:
        outbox, jobs, wakeups = _Outbox(loop), [Job() for _ in range(32)], []
        deliver = outbox._deliver
        outbox._deliver = lambda: (wakeups.append(1), deliver())
        worker = threading.Thread(target=lambda: [outbox.put(job, (0, f"t{i}")) for i, job in enumerate(jobs)])
        worker.start()
        worker.join()
        loop.run_until_complete(asyncio.sleep(0.01))
    finally:
        loop.close()
    assert len(wakeups) == 1 and [job.got for job in jobs] == [[(0, f"t{i}")] for i in range(32)]
    done = object()
    assert _joined([(0, "a"), (1, "b"), (0, "c"), (0, done), (1, "d")]) == [(0, "ac"), (1, "bd"), (0, done)]
