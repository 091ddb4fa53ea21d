"""Multi-token prediction: the loss, and speculative decoding that reproduces greedy decoding exactly."""

import dataclasses

import pytest
import torch

from codefoundry.errors import UserError
from codefoundry.infer.generate import generate_tokens
from codefoundry.infer.speculative import (
    draft_speculative_generate,
    mtp_speculative_generate,
)
from codefoundry.model import Transformer
from codefoundry.presets import get_preset

VOCAB = 61


def pattern(gen: torch.Generator, batch: int, length: int) -> torch.Tensor:
    """x[t+1] = (7 x[t] + 2) mod 61 from a random start: fully predictable, so heads can learn it."""
    x = [torch.randint(0, VOCAB, (batch, 1), generator=gen)]
    for _ in range(length - 1):
        x.append((7 * x[-1] + 2) % VOCAB)
    return torch.cat(x, dim=1)


@pytest.fixture(scope="module")
def trained() -> Transformer:
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("pythoncoder-tiny"), vocab_size=VOCAB, mtp_heads=2, dropout=0.0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(80):
        seq = pattern(gen, 16, 33)
        model(seq[:, :-1], seq[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_mtp_loss_is_part_of_training_loss_only():
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(get_preset("pythoncoder-tiny"), dropout=0.0))
    x, y = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    train_loss = model(x, y)
    mtp = model.extra_metrics()["mtp_loss"]
    model.eval()
    torch.testing.assert_close(train_loss - model(x, y), torch.tensor(mtp), atol=1e-5, rtol=1e-5)
    model.train()
    model(x, y).backward()
    assert model.mtp[0].proj.weight.grad.abs().sum() > 0


def test_mtp_ignores_positions_whose_input_token_is_unknown():
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(get_preset("pythoncoder-tiny"), dropout=0.0))
    x, y = torch.randint(0, 512, (1, 12)), torch.randint(0, 512, (1, 12))
    y_masked = y.clone()
    y_masked[0, :5] = -100  # e.g. a prompt: only positions whose inputs and target are known count
    state, hn = model.mtp[0](model.hidden_states(x)[:, 5:11], model.embed(y[:, 5:11]))
    expected = torch.nn.functional.cross_entropy(model.logits(hn)[0], y[0, 6:12])
    model(x, y_masked)
    assert model.extra_metrics()["mtp_loss"] == pytest.approx(0.3 * expected.item(), rel=1e-4)


def _greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    return [int(t) for t in generate_tokens(model, [prompt], n)]


def test_self_speculative_decoding_is_exactly_greedy_with_fewer_calls(trained):
    gen = torch.Generator().manual_seed(5)
    for prompt in pattern(gen, 3, 6).tolist():
        ids, stats = mtp_speculative_generate(trained, prompt, 40)
        assert ids == _greedy(trained, prompt, 40)
        assert stats["tokens"] == 40 and stats["model_calls"] < 40 / 1.8
        assert stats["acceptance"] > 0.5


def test_self_speculative_decoding_with_untrained_heads_stays_exact():
    torch.manual_seed(1)
    model = Transformer(dataclasses.replace(get_preset("pythoncoder-tiny"), mtp_heads=2)).eval()
    ids, stats = mtp_speculative_generate(model, [0, 5, 9, 11], 25, stop_ids=set())
    assert ids == _greedy(model, [0, 5, 9, 11], 25)
    assert stats["model_calls"] <= 25


def test_speculative_stops_at_stop_id(trained):
    prompt = pattern(torch.Generator().manual_seed(2), 1, 6)[0].tolist()
    full = _greedy(trained, prompt, 30)
    stop = full[10]
    ids, _ = mtp_speculative_generate(trained, prompt, 30, stop_ids={stop})
    assert ids == full[:full.index(stop) + 1]


def test_needs_mtp_heads():
    model = Transformer(get_preset("tiny"))
    with pytest.raises(UserError):
        mtp_speculative_generate(model, [1, 2], 5)


def test_draft_model_speculative_decoding_is_exactly_greedy(trained):
    prompt = pattern(torch.Generator().manual_seed(3), 1, 6)[0].tolist()
    expected = _greedy(trained, prompt, 30)
    ids, stats = draft_speculative_generate(trained, trained, prompt, 30, k=3)
    assert ids == expected and stats["acceptance"] == 1.0
    assert stats["model_calls"] == 1 + -(-29 // 4)  # prefill, then k + 1 = 4 tokens per call
    torch.manual_seed(7)
    weak = Transformer(dataclasses.replace(trained.cfg, n_layers=1, mtp_heads=0)).eval()
    ids, stats = draft_speculative_generate(trained, weak, prompt, 30, k=3)
    assert ids == expected and stats["draft_calls"] > 0
