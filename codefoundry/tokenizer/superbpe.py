"""SuperBPE: a second BPE stage whose merges may cross whitespace (Liu et al. 2025, "Space Travel").

Stage 1 is ordinary BPE up to a transition vocab size ``t``. As in the paper's code, it is not a
separate run: BPE training is greedy and deterministic, so the first merges of the plain BPE at the
final vocab size *are* the BPE at size ``t``. We train that plain tokenizer once, which also gives the
baseline the chars-per-token gain is measured against.

Stage 2 continues learning merges over coarser pre-tokens (:data:`SUPER_SPLIT_PATTERN`): whole runs of
code within one line, so tokens like ``Ġself.`` or ``Ġreturn Ġself`` can form. HF `tokenizers` cannot
resume training from given merges, so stage 2 is learnt here: the coarse pieces are first encoded with
the stage-1 merges by HF's own BPE model (exactly what encoding will do later, so training and
encoding agree), then the most frequent adjacent pair is merged greedily with incremental pair counts.
The result is an ordinary HF tokenizers JSON: stage-1 merges, then stage-2 merges, with the coarse
split + ByteLevel as pre-tokenizer. ``CodeTokenizer`` loads it, and its fastokens bulk path
reads the same JSON (identical ids, checked on a probe before use).
"""

from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from typing import Iterable

from tokenizers import Tokenizer

from codefoundry.errors import UserError
from codefoundry.tokenizer import special as sp
from codefoundry.tokenizer.bpe import CodeTokenizer, train_tokenizer

# Stage-2 pre-tokens, tried in order: digit groups of at most three (as in stage 1, so number tokens
# stay the same); whitespace up to and including line breaks (a newline is a hard boundary); a run of
# spaces or tabs minus its last one (indentation stays its own token and the last space joins the next
# word, as in stage 1); then a run of anything else within the line, words joined by single spaces,
# carrying trailing line breaks that follow punctuation (stage-1 tokens like ``:Ċ`` stay reachable);
# finally a lone whitespace character.
SUPER_SPLIT_PATTERN = (
    r"\p{N}{1,3}|\s*[\r\n]+|[^\S\r\n]+(?=[^\S\r\n])|"
    r"(?:[^\s\p{N}]|[^\S\r\n](?=[^\s\p{N}]))+[\r\n]*|\s"
)

Pair = tuple[int, int]


def train_superbpe(texts: Iterable[str], vocab_size: int, transition: int, min_frequency: int = 2,
                   show_progress: bool = True) -> tuple[CodeTokenizer, CodeTokenizer]:
    """(SuperBPE, plain BPE) tokenizers of ``vocab_size``; SuperBPE switches to superwords at ``transition``."""
    floor = len(sp.SPECIAL_TOKENS) + 256
    if not floor < transition < vocab_size:
        raise UserError(f"SuperBPE transition {transition} must lie between {floor} and the vocab size {vocab_size}")
    texts = list(texts)  # read twice: stage 1 trains on the documents, stage 2 re-splits them
    plain = train_tokenizer(texts, vocab_size, min_frequency=min_frequency, show_progress=show_progress)
    state = _truncate(json.loads(plain.tk.to_str()), transition)
    state["pre_tokenizer"] = _super_pre_tokenizer()
    stage1 = Tokenizer.from_str(json.dumps(state))
    words, counts = _stage1_words(stage1, texts)
    model = state["model"]
    model["merges"] += [[a, b] for a, b in _learn_merges(words, counts, model["vocab"], vocab_size, min_frequency)]
    return CodeTokenizer(Tokenizer.from_str(json.dumps(state))), plain


def _super_pre_tokenizer() -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": SUPER_SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ]}


def _truncate(state: dict, size: int) -> dict:
    """Keep the BPE as training would have left it on reaching ``size`` tokens (ids grow with merges)."""
    model = state["model"]
    vocab = {t: i for t, i in model["vocab"].items() if i < size}
    merges = []
    for a, b in model["merges"]:
        if vocab.get(a + b) is None:
            break
        merges.append([a, b])
    model["vocab"], model["merges"] = vocab, merges
    model["ignore_merges"] = False  # a whole coarse piece found in the vocab must still be built by merges
    return state


def _stage1_words(stage1: Tokenizer, texts: list[str]) -> tuple[list[list[int]], list[int]]:
    """Distinct coarse pieces of the corpus as stage-1 token ids, with how often each occurs."""
    pieces: Counter[str] = Counter()
    for text in texts:
        pieces.update(p for p, _ in stage1.pre_tokenizer.pre_tokenize_str(text))
    words = [[t.id for t in stage1.model.tokenize(p)] for p in pieces]
    return words, list(pieces.values())


def _learn_merges(words: list[list[int]], counts: list[int], vocab: dict[str, int], vocab_size: int,
                  min_frequency: int) -> list[tuple[str, str]]:
    """Greedy BPE over ``words`` until ``vocab`` (grown in place) holds ``vocab_size`` tokens; returns the merges.

    Pairs touching a line break are never counted, so no stage-2 token spans or even holds a newline.

    Pair counts are kept incrementally: a merge only revisits the words that contain its pair, and a
    lazy max-heap gives the next best pair (counts of existing pairs only ever go down, so a stale heap
    entry is an upper bound that is refreshed when popped).
    """
    id_to_token = {i: t for t, i in vocab.items()}
    blocked = {i for i, t in id_to_token.items() if "Ċ" in t or "č" in t}  # byte-level \n and \r
    pair_counts: dict[Pair, int] = defaultdict(int)
    where: dict[Pair, set[int]] = defaultdict(set)
    for wi, (word, n) in enumerate(zip(words, counts)):
        for pair in _pairs(word, blocked):
            pair_counts[pair] += n
            where[pair].add(wi)
    heap = [(-n, pair) for pair, n in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(vocab) < vocab_size:
        neg, pair = heapq.heappop(heap)
        current = pair_counts.get(pair, 0)
        if current != -neg:
            if current:
                heapq.heappush(heap, (-current, pair))
            continue
        if current < min_frequency:
            break
        left, right = id_to_token[pair[0]], id_to_token[pair[1]]
        new_id = vocab.setdefault(left + right, len(vocab))  # a pair may spell a token stage 1 already has
        id_to_token[new_id] = left + right
        merges.append((left, right))
        for pair_new in _apply(pair, new_id, words, counts, where.pop(pair), blocked, pair_counts, where):
            heapq.heappush(heap, (-pair_counts[pair_new], pair_new))
    return merges


def _pairs(word: list[int], blocked: set[int]) -> Iterable[Pair]:
    return ((a, b) for a, b in zip(word, word[1:]) if a not in blocked and b not in blocked)


def _apply(pair: Pair, new_id: int, words: list[list[int]], counts: list[int], word_ids: set[int],
           blocked: set[int], pair_counts: dict[Pair, int], where: dict[Pair, set[int]]) -> set[Pair]:
    """Merge ``pair`` in the given words, updating pair counts; returns the pairs that gained counts."""
    gained: set[Pair] = set()
    for wi in word_ids:
        word, n = words[wi], counts[wi]
        merged = _merge_word(word, pair, new_id)
        if len(merged) == len(word):
            continue  # ``where`` over-approximates: this word lost the pair to an earlier merge
        for p in _pairs(word, blocked):
            pair_counts[p] -= n
        for p in _pairs(merged, blocked):
            pair_counts[p] += n
            if new_id in p:
                where[p].add(wi)
                gained.add(p)
        words[wi] = merged
    return gained


def _merge_word(word: list[int], pair: Pair, new_id: int) -> list[int]:
    """Left-to-right, non-overlapping replacement: the same result as HF's rank-ordered BPE encoding."""
    out: list[int] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def chars_per_token(tok: CodeTokenizer, texts: list[str]) -> tuple[float, float]:
    """(characters, UTF-8 bytes) per token over ``texts``: the compression a tokenizer buys."""
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    if not n_tokens:
        raise UserError("no text to measure chars per token on")
    return sum(map(len, texts)) / n_tokens, sum(len(t.encode()) for t in texts) / n_tokens
