import pytest
import torch

from codefoundry.errors import UserError
from codefoundry.model import Transformer
from codefoundry.presets import PRESETS, get_preset
from codefoundry.train.fp8 import convert_to_fp8, fp8_config, fp8_eligible
from codefoundry.train.runtime import apply_linear_precision

gpu_fp8 = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                             reason="needs a CUDA GPU with FP8 (compute capability >= 8.9)")


def test_fp8_is_refused_cleanly_without_an_fp8_gpu():
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this machine has FP8")
    with pytest.raises(UserError, match="FP8"):
        apply_linear_precision(Transformer(get_preset("tiny")), "fp8-rowwise", torch.device("cpu"))


def test_unknown_precision_is_a_user_error():
    with pytest.raises(UserError, match="tcfp12"):
        apply_linear_precision(Transformer(get_preset("tiny")), "fp4", torch.device("cpu"))


@gpu_fp8
@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_training_steps_reduce_loss(recipe):
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    model = Transformer(cfg).cuda()
    apply_linear_precision(model, f"fp8-{recipe}", torch.device("cuda"))
    assert any(type(m).__name__ == "Float8Linear" for m in model.modules())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, cfg.vocab_size, (8, 65), device="cuda")
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


TINY = ["tiny", "cf-tiny", "moe-tiny", "yxanul-tiny", "nanocode-tiny", "pythoncoder-tiny"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_fp8_layer_rule_for_every_preset(name):
    """Converted: only linears with both dims % 16 == 0, never the LM head or the routed experts."""
    with torch.device("meta"):
        model = Transformer(get_preset(name))
    chosen = {fqn for fqn, m in model.named_modules() if fp8_eligible(m, fqn)}
    assert chosen, "no layer would run in FP8"
    for fqn in chosen:
        m = model.get_submodule(fqn)
        assert m.in_features % 16 == 0 and m.out_features % 16 == 0
        assert fqn != "lm_head" and ".experts." not in fqn
    assert all(fp8_config(r).pad_inner_dim for r in ("tensorwise", "rowwise"))


def _checked_scaled_mm(calls):
    """torch._scaled_mm with the shape rule its CUDA version enforces (mat1's trailing dim and both of
    mat2's divisible by 16; the CPU version does not check)."""
    real = torch._scaled_mm

    def scaled_mm(a, b, *args, **kwargs):
        assert all(d % 16 == 0 for d in (a.shape[1], *b.shape)), f"FP8 GEMM {tuple(a.shape)} @ {tuple(b.shape)}"
        calls.append((tuple(a.shape), tuple(b.shape)))
        return real(a, b, *args, **kwargs)
    return scaled_mm


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("name", TINY)
def test_every_tiny_preset_takes_an_fp8_step_with_gpu_shaped_gemms(monkeypatch, name, recipe):
    """Real FP8 casts and torch._scaled_mm on CPU: backward on B*(T-1) MTP rows and MoE layers must not
    hand the GEMM an unaligned inner dimension; Smooth-SwiGLU's down projection must be FP8 too."""
    from torchao.float8 import convert_to_float8_training

    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", _checked_scaled_mm(calls))
    torch.manual_seed(0)
    cfg = get_preset(name)
    model = Transformer(cfg)
    convert_to_float8_training(model, config=fp8_config(recipe), module_filter_fn=fp8_eligible)
    down = model.blocks[0].mlp.down_proj if not cfg.n_experts else model.blocks[0].mlp.shared_experts[0].down_proj
    assert type(down).__name__ == "Float8Linear"
    down_calls = []
    down.register_forward_hook(lambda *a: down_calls.append(1))
    x = torch.randint(0, cfg.vocab_size, (3, 38))  # 3 x 37 rows: not a multiple of 16
    with torch.autocast("cpu", torch.bfloat16):
        loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    assert torch.isfinite(loss) and len(calls) >= 3 * 4 and down_calls
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and ".experts." not in n)


def test_fp8_emulation_trains_on_cpu():
    torch.manual_seed(0)
    cfg = get_preset("cf-tiny")
    model = Transformer(cfg)
    assert convert_to_fp8(model, "rowwise", torch.device("cpu"), emulate=True) > 0
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, cfg.vocab_size, (4, 33))
    losses = []
    for _ in range(8):
        with torch.autocast("cpu", torch.bfloat16):
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
