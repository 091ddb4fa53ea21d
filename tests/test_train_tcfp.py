import pytest
import torch
import torch.nn as nn

from codefoundry.model import Transformer
from codefoundry.presets import get_preset
from codefoundry.recipes import build_run_config
from codefoundry.train import tcfp
from codefoundry.train.metrics import read_metrics
from codefoundry.train.smoke import make_synthetic_data
from codefoundry.train.trainer import pretrain


def _data(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "normal":
        return torch.randn(128, 1024, generator=g)
    # heavy-tailed: Student-t with 3 degrees of freedom, plus a few large outliers
    torch.manual_seed(0)  # Chi2.sample draws from the global generator: fix it, whatever ran before
    x = torch.randn(128, 1024, generator=g) / torch.sqrt(torch.distributions.Chi2(3.0).sample((128, 1024)) / 3)
    x[torch.rand(128, 1024, generator=g) < 1e-3] *= 100
    return x


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x - y).norm() / x.norm()).item()


@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_reconstruction_far_below_plain_fp8(kind):
    x = _data(kind)
    err_tcfp, err_fp8 = _rel(x, tcfp.fake_quantize(x)), _rel(x, tcfp.fp8_blockwise(x))
    assert err_tcfp < err_fp8 / 4  # > 2 extra bits
    bits = tcfp.effective_mantissa_bits(x, tcfp.fake_quantize(x))
    assert 5.0 <= bits <= 7.5, bits  # ~5.4 on Gaussian data; outliers (block maxima) get the most bits
    assert tcfp.effective_mantissa_bits(x, tcfp.fp8_blockwise(x)) == pytest.approx(3.0, abs=0.4)


def test_codes_shapes_and_edge_cases():
    x = torch.randn(3, 5, 70)  # last dim not a multiple of the block
    x[0, 0] = 0.0  # an all-zero block
    q = tcfp.quantize(x)
    assert q.hi.dtype == torch.float8_e4m3fn and q.lo.dtype == torch.int8 and q.hi.shape == (15, 3, 32)
    assert int(q.lo.min()) >= -8 and int(q.lo.max()) <= 7
    y = tcfp.dequantize(q)
    assert y.shape == x.shape and torch.equal(y[0, 0], x[0, 0]) and torch.isfinite(y).all()
    assert tcfp.BITS_PER_VALUE == 12.5
    # delayed scaling with a stale (too small) amax saturates instead of overflowing to NaN
    small = tcfp.block_amax(x) / 8
    assert torch.isfinite(tcfp.fake_quantize(x, amax=small)).all()


def test_stochastic_rounding_is_unbiased():
    x = torch.randn(1, 64).repeat(4000, 1)
    det = tcfp.fake_quantize(x)[0]
    sr_mean = tcfp.fake_quantize(x, stochastic=True).mean(0)
    assert (sr_mean - x[0]).abs().mean() < (det - x[0]).abs().mean() / 3


def test_linear_layer_gradients_pass_straight_through():
    torch.manual_seed(0)
    ref = nn.Linear(96, 48)
    layer = tcfp.TCFPLinear(96, 48, quantize_grad=False)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(8, 96, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    ref(x).square().sum().backward()
    layer(x2).square().sum().backward()
    assert _rel(ref.weight.grad, layer.weight.grad) < 0.02 and _rel(x.grad, x2.grad) < 0.02
    assert set(layer.state_dict()) == set(ref.state_dict())  # checkpoints stay plain nn.Linear


def test_convert_skips_the_head_and_keeps_parameters():
    model = Transformer(get_preset("tiny"))
    params = {id(p) for p in model.parameters()}
    n = tcfp.convert_to_tcfp12(model)
    assert n == 7 * 2 and type(model.lm_head) is nn.Linear
    assert {id(p) for p in model.parameters()} == params


def test_tiny_model_born_quantized_trains_like_fp32(tmp_path):
    data = make_synthetic_data(tmp_path / "syn")

    def final_loss(precision: str) -> float:
        out = tmp_path / precision
        run = build_run_config("tiny", None, [f"train.data={data}", f"train.out={out}", "train.max_steps=30",
                                              "train.seq_len=64", "train.batch_size=8", "train.log_every=1",
                                              "train.warmup_steps=5", f"train.linear_precision={precision}"])
        pretrain(run, show_progress=False)
        losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
        return sum(losses[-5:]) / 5

    fp32, quant = final_loss("default"), final_loss("tcfp12")
    assert abs(quant - fp32) / fp32 < 0.03, (quant, fp32)


INTERPRETED_CHECK = """
import torch
from codefoundry.train import tcfp, tcfp_triton

torch.manual_seed(0)
for m, n, k in [(16, 16, 32), (40, 50, 96), (70, 33, 80)]:  # ragged tiles, K padded to whole blocks
    x = torch.randn(m, k) * torch.logspace(-3, 2, k)  # blocks of very different magnitude
    w = torch.randn(n, k) * 0.05
    qx, qw = tcfp.quantize(x), tcfp.quantize(w, amax=tcfp.block_amax(w) * 0.5)  # delayed scale: saturation
    got = tcfp_triton.tcfp12_matmul(qx, qw, block_m=32, block_n=32)
    torch.testing.assert_close(got, tcfp.dequantize(qx) @ tcfp.dequantize(qw).t(), atol=1e-5, rtol=1e-5)
assert not tcfp_triton.available(torch.device("cpu"))  # used only on FP8 GPUs

layer = tcfp.TCFPLinear(64, 48, stochastic_rounding=False)
x = torch.randn(2, 5, 64, requires_grad=True)
want = layer(x)
kernel, calls = tcfp_triton.tcfp12_matmul, []
tcfp_triton.available = lambda device: True
tcfp_triton.tcfp12_matmul = lambda *a: calls.append(1) or kernel(*a, 32, 32)
got = layer(x)
assert calls, "the layer did not take the kernel"
torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
got.sum().backward()
assert x.grad.shape == x.shape and layer.weight.grad.shape == layer.weight.shape
print("ok")
"""


def test_triton_kernel_equals_the_emulated_reference_under_the_interpreter():
    """The FP8 GEMM kernel run by Triton's CPU interpreter (which must be on before triton is imported,
    hence a fresh process) against dequantize-then-matmul; and TCFPLinear taking it where available."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", INTERPRETED_CHECK], check=False, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
