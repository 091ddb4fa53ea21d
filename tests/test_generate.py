import torch

from codefoundry.infer.generate import (
    complete_batch,
    generate_tokens,
    sample_next,
    stream,
)
from codefoundry.model import Transformer
from codefoundry.presets import get_preset


def _model(**over) -> Transformer:
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    for k, v in over.items():
        setattr(cfg, k, v)
    return Transformer(cfg).eval()


def test_kv_cache_decode_matches_full_forward():
    model = _model()
    x = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 64)
        parts = [model(x[:, :17], cache=cache)]  # prefill
        parts += [model(x[:, i:i + 1], cache=cache) for i in range(17, 30)]  # one token at a time
        parts.append(model(x[:, 30:], cache=cache))  # a multi-token chunk after the cache is warm
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_matches_single_rows():
    model = _model()
    prompts = [[5, 9, 3, 7, 2, 8, 11], [4, 6], [13, 1, 12]]
    # Greedy decoding of a padded batch must give each row's unbatched logits.
    cache = model.new_cache(3, 16)
    width = max(map(len, prompts))
    batch = torch.zeros(3, width, dtype=torch.long)
    for r, p in enumerate(prompts):
        batch[r, width - len(p):] = torch.tensor(p)
    cache.set_padding([len(p) for p in prompts], width)
    with torch.no_grad():
        batched = model(batch, cache=cache)[:, -1]
        for r, p in enumerate(prompts):
            single = model(torch.tensor([p]))[:, -1]
            torch.testing.assert_close(batched[r:r + 1], single, atol=1e-5, rtol=1e-5)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    assert sample_next(logits).item() == 2
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, temperature=1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert picks == {2, 3}
    picks = {sample_next(logits, temperature=1.0, top_p=0.5, generator=g).item() for _ in range(100)}
    assert picks == {2}


def test_stream_joins_to_completion_and_honours_stop(tiny_tokenizer):
    tok, _ = tiny_tokenizer
    model = _model()
    prompt = "def add(a, b):\n"
    pieces = list(stream(model, tok, prompt, max_new_tokens=30, temperature=1.0, seed=3, stop_at_eot=False))
    full = "".join(pieces)
    ids = tok.encode(prompt)
    ref = [int(t[0]) for t in generate_tokens(model, [ids], 30, temperature=1.0, seed=3)]
    assert full == tok.decode(ref)
    stop = full[5:8]
    cut = "".join(stream(model, tok, prompt, max_new_tokens=30, temperature=1.0, seed=3, stop=[stop],
                         stop_at_eot=False))
    assert cut == full[:full.find(stop)]
    [batched] = complete_batch(model, tok, [prompt], 30, temperature=1.0, seed=3, stop=[stop])
    assert batched == cut


def test_strided_windows_score_every_target_once():
    from codefoundry.eval.bpb import score_windows

    for n, t, s in [(1000, 64, 64), (1000, 64, 16), (65, 64, 32), (10, 64, 32), (1, 8, 4)]:
        scored = []
        for start, first in score_windows(n, t, s):
            end = min(start + t, n)
            assert start <= first < end and end - first <= t
            scored.extend(range(first, end))
        assert scored == list(range(n))


def test_strided_bpb_equals_plain_when_stride_is_seq_len(tiny_data):
    from codefoundry.eval.bpb import bits_per_byte
    from codefoundry.model import Transformer
    from codefoundry.presets import get_preset

    torch.manual_seed(0)
    model = Transformer(get_preset("tiny")).eval()
    plain = bits_per_byte(model, tiny_data / "val", seq_len=64)
    same = bits_per_byte(model, tiny_data / "val", seq_len=64, stride=64)
    strided = bits_per_byte(model, tiny_data / "val", seq_len=64, stride=16)
    assert plain["bpb"] == same["bpb"] and plain["tokens"] == strided["tokens"]
    assert strided["bpb"] != plain["bpb"]  # the same targets, scored with different context
