"""Weight-only int8 (`--quantize int8`): the linear layer within its error bound on both of
its paths, a quantized model close to fp32 (loss, greedy tokens), and the option through
sample, eval, serve and chat's loader."""

import copy
import json

import pytest
import torch
from conftest import run_cli
from serving import random_model, request, start_server
from torch import nn

from gptcli.data.tokenizers.tokenizer import BytesTokenizer
from gptcli.infer.cpu_layout import InferenceLinear, for_generation
from gptcli.infer.generate import decode_one_token, prefill
from gptcli.infer.load import load
from gptcli.infer.quantize import (
    KERNEL_MAX_ROWS,
    Int8Linear,
    quantize_int8,
    quantize_model,
)
from gptcli.model.heads import GPTClassifier
from gptcli.model.lora import LoRASpec, apply_lora, merge_lora
from gptcli.store.checkpoint import save_checkpoint

BF16_EPS = 2.0**-8  # bf16 keeps 8 significant bits: round to nearest is off by at most 2^-9


def int8_error_bound(x: torch.Tensor, linear: nn.Linear, rounded_to_bf16: bool) -> torch.Tensor:
    """How far x W^T + b can be from the int8 layer's output, per output, (M, N).

    Quantization moves each weight by at most s_j / 2, so output j by at most
    ||x||_1 s_j / 2. Where the product runs in bf16, x, the scales and the output are each
    rounded (relative error 2^-9 each), which adds at most 3 x 2^-9 < 2^-7 of |x| |W|^T.
    The 1e-5 of |x| |W|^T covers fp32 summation."""
    _, scales = quantize_int8(linear.weight)
    magnitude = x.abs().float() @ linear.weight.abs().t()
    bound = x.abs().float().sum(-1, keepdim=True) * scales / 2 + 1e-5 * magnitude + 1e-6
    return bound + 2 * BF16_EPS * magnitude if rounded_to_bf16 else bound


@pytest.mark.parametrize("rows", [1, 3, KERNEL_MAX_ROWS, KERNEL_MAX_ROWS + 1, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_within_the_quantization_bound(rows, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(96, 80)
    x = torch.randn(rows, 96)
    exact = linear(x).detach()
    layer = Int8Linear.from_linear(linear).to(dtype)
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (80, 96)
    with torch.inference_mode():
        y = layer(x.to(dtype)[None])[0]  # (1, M, in): any leading shape
    assert y.dtype == dtype and y.shape == (rows, 80)
    on_kernel_in_bf16 = rows <= KERNEL_MAX_ROWS or dtype == torch.bfloat16
    bound = int8_error_bound(x.to(dtype).float(), linear, on_kernel_in_bf16)
    error = (y.float() - exact).abs()
    assert (error <= bound).all(), (error / bound).max()
    assert error.max() > 0  # the weights really are int8


def test_dequantized_path_equals_the_kernel():
    """The path off the CPU kernel (other devices, many rows) computes the same product."""
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(64, 48, bias=False)).to(torch.bfloat16)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    kernel = torch._weight_int8pack_mm(x, layer.weight, layer.scales)
    torch.testing.assert_close(layer.dequantized_matmul(x), kernel, rtol=2 * BF16_EPS, atol=1e-3)


def test_zero_rows_and_scales():
    weight = torch.zeros(4, 8)
    weight[1] = torch.linspace(-2.54, 1.0, 8)
    q, scales = quantize_int8(weight)
    assert scales.tolist()[0] == 1.0 and q[0].abs().sum() == 0  # a zero row: no division by 0
    assert q[1].min() == -127 and scales[1] == pytest.approx(0.02)


def test_every_linear_becomes_int8_the_embedding_stays_float():
    model = random_model(257).eval()  # tied head
    apply_lora(model, LoRASpec(rank=2, alpha=2.0, dropout=0.0, targets=("c_attn",)))
    with torch.no_grad():
        model.h[0].attn.c_attn.lora_B.fill_(0.1)  # an adapter that changes the output
    merged = copy.deepcopy(model)
    merge_lora(merged)
    quantize_model(model, "int8")
    quantize_model(merged, "int8")
    assert not [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert isinstance(model.lm_head, Int8Linear) and model.wte.weight.dtype == torch.float32
    with torch.inference_mode():  # the adapter was merged, not dropped
        torch.testing.assert_close(model(torch.tensor([[1, 2, 3]])), merged(torch.tensor([[1, 2, 3]])))
    for_generation(model, torch.bfloat16)  # nothing left for the CPU layout; scales follow the dtype
    assert not any(isinstance(m, InferenceLinear) for m in model.modules())
    assert model.lm_head.weight.dtype == torch.int8 and model.lm_head.scales.dtype == torch.bfloat16


@torch.inference_mode()
def forced_greedy_agreement(reference, other, prompt: torch.Tensor, steps: int) -> float:
    """Share of steps where `other`'s greedy token is `reference`'s, both fed reference's."""
    caches = [m.new_kv_cache(1, prompt.size(1) + steps) for m in (reference, other)]
    logits = [prefill(m, c, prompt) for m, c in zip((reference, other), caches)]
    same = 0
    for step in range(steps):
        token = logits[0].argmax(-1)
        same += int(logits[1].argmax(-1) == token)
        position = torch.tensor([prompt.size(1) + step])
        logits = [decode_one_token(m, c, token, position) for m, c in zip((reference, other), caches)]
    return same / steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_model_stays_close_to_fp32(dtype):
    base = random_model(257).eval()
    reference = for_generation(copy.deepcopy(base))
    quantized = for_generation(copy.deepcopy(base), dtype, "int8")
    prompt = torch.tensor([list(b"def add(a, b):")])
    # Measured: all 48 steps agree, with fp32 and with bf16 activations.
    assert forced_greedy_agreement(reference, quantized, prompt, 48) >= 0.9
    text = torch.tensor([list(b"class Point:\n    def __init__(self, x, y):\n        self.x = x\n")])
    with torch.inference_mode():
        losses = [m(text[:, :-1], text[:, 1:]).item() for m in (reference, quantized)]
    assert losses[1] == pytest.approx(losses[0], rel=0.02)


def test_sample_quantize_int8(lm_checkpoint, capsys):
    code, out, err = run_cli(["sample", "-c", lm_checkpoint, "-p", "def ", "-n", "12", "--greedy", "--json",
                              "--device", "cpu", "--quantize", "int8"], capsys)
    assert code == 0, err
    assert len(json.loads(out)["tokens"]) > 0


def test_eval_quantize_int8_is_close(lm_checkpoint, tmp_path, capsys):
    (tmp_path / "text.txt").write_text("def add(a, b):\n    return a + b\n" * 8)
    losses = []
    for quantize in ("none", "int8"):
        code, out, err = run_cli(["eval", "-c", lm_checkpoint, "--data", tmp_path / "text.txt", "--json",
                                  "--device", "cpu", "--precision", "fp32", "--quantize", quantize], capsys)
        assert code == 0, err
        losses.append(json.loads(out.splitlines()[-1])["loss"])
    assert losses[1] == pytest.approx(losses[0], rel=0.02) and losses[1] != losses[0]


def test_chat_and_serve_load_through_one_place(chat_checkpoint):
    loaded = load(chat_checkpoint, "cpu", "auto", "int8", expect=("chat",))
    assert isinstance(loaded.model.lm_head, Int8Linear)


def test_serve_quantize_int8_answers(lm_checkpoint, tmp_path):
    server = start_server(lm_checkpoint, "--quantize", "int8", log_dir=tmp_path)
    try:
        status, answer = request(f"{server.api}/completions", {"prompt": "def ", "max_tokens": 6, "temperature": 0})
        assert status == 200 and answer["usage"]["completion_tokens"] > 0, answer
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.parametrize("command", [["sample"], ["chat"], ["eval"], ["serve", "--port", "0"]])
def test_bad_quantize_is_one_line_exit_2(command, lm_checkpoint, capsys):
    code, out, err = run_cli([*command, "-c", lm_checkpoint, "--device", "cpu", "--quantize", "int4"], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "--quantize must be one of none, int8" in err


@pytest.mark.parametrize("command", [["sample", "-p", "great"], ["eval", "--data", "x.csv"], ["serve", "--port", "0"]])
def test_quantize_refused_for_a_classifier(command, tmp_path, capsys):
    checkpoint = save_checkpoint(tmp_path / "cls", GPTClassifier(random_model(257), ["neg", "pos"]),
                                 BytesTokenizer(), "# cls\n")
    code, out, err = run_cli([*command, "-c", checkpoint, "--device", "cpu", "--quantize", "int8"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--quantize is for language models" in err
