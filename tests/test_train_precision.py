import pytest
import torch

from codefoundry.errors import UserError
from codefoundry.model import Transformer
from codefoundry.presets import get_preset
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
