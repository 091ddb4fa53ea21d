"""CPU proofs of what the GPU run relies on: every tiny preset compiles as one graph
(``fullgraph=True``; the ``aot_eager`` backend traces forward and backward like inductor does,
without generating code) and trains, then evaluates, without recompiling.

Exactly two graphs may exist at the end: the training step's and the evaluation's (eval mode
and no_grad are a different program); switching back and forth must reuse them.
"""

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module
from torch._dynamo.backends.registry import lookup_backend

from codefoundry.model import Transformer
from codefoundry.model.masking import force_attention_kernel
from codefoundry.presets import get_preset
from codefoundry.train.runtime import enable_activation_checkpointing

TINY = ["tiny", "cf-tiny", "moe-tiny", "yxanul-tiny", "nanocode-tiny", "pythoncoder-tiny"]


class CountingBackend:
    """aot_eager that counts the graphs it is handed (one per compilation, recompiles included)."""

    def __init__(self) -> None:
        self.graphs = 0
        self.inner = lookup_backend("aot_eager")

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)


def train_then_evaluate(model: Transformer, steps: int = 6, batch: int = 2, seq: int = 64,
                        autocast: bool = False) -> CountingBackend:
    backend = CountingBackend()
    torch._dynamo.reset()
    fwd = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    vocab = model.cfg.vocab_size

    def batch_of():
        x = torch.randint(1, vocab, (batch, seq + 1), generator=gen)
        x[:, ::23] = model.cfg.doc_sep_id  # packed documents, for configs that mask them
        return x[:, :-1], x[:, 1:]

    def run(x, y):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            return fwd(x, y)

    for round_ in range(2):
        model.train()
        for _ in range(steps if round_ == 0 else 2):
            loss = run(*batch_of())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.post_step()
            assert torch.isfinite(loss)
        model.eval()
        with torch.no_grad():
            assert torch.isfinite(run(*batch_of()))
    return backend


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_compile_as_one_graph_and_never_recompile(name):
    torch.manual_seed(0)
    backend = train_then_evaluate(Transformer(get_preset(name)))
    assert backend.graphs == 2


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n not in ("moe-tiny",) else n
                                  for n in TINY])
def test_activation_checkpointing_compiles_as_one_graph(name):
    torch.manual_seed(0)
    model = Transformer(get_preset(name))
    enable_activation_checkpointing(model)
    assert train_then_evaluate(model).graphs == 2


@pytest.mark.slow
def test_moe_grouped_gemm_path_compiles_in_bf16():
    """Under bf16 autocast MoE dispatch takes torch._grouped_mm with device-side offsets."""
    torch.manual_seed(0)
    assert train_then_evaluate(Transformer(get_preset("moe-tiny")), autocast=True).graphs == 2


@pytest.mark.slow
def test_flex_attention_path_compiles_with_document_masks_and_sinks(monkeypatch):
    """The CUDA path for sinks and document masks (block mask built inside the graph), traced on CPU.

    FlexAttention's CPU guard against autograd is lifted as in test_model_attention.py.
    """
    import dataclasses

    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("moe-tiny"), doc_mask=True)
    with force_attention_kernel("flex"):
        assert train_then_evaluate(Transformer(cfg)).graphs == 2


def test_chunked_cross_entropy_compiles():
    import dataclasses

    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(get_preset("cf-tiny"), loss_chunk=48))
    assert model.loss_chunk_rows() == 48
    assert train_then_evaluate(model).graphs == 2
