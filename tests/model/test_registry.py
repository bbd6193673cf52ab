"""The model registry (`arch` in checkpoints) and the classifier head over any model: the
checkpoint layout it keeps, LoRA under it, and checkpoints written before either existed."""

import json

import pytest
import torch
from conftest import gpt2_shapes
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gptcli.config import ModelConfig
from gptcli.data.tokenizers.tokenizer import BytesTokenizer
from gptcli.errors import GptcliError
from gptcli.model import get_arch
from gptcli.model.gpt import GPT
from gptcli.model.heads import GPTClassifier
from gptcli.model.lora import LoRASpec, apply_lora, merge_lora
from gptcli.store.checkpoint import WEIGHTS, load_model, save_checkpoint, write_manifest

CFG = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=257)  # 320 padded rows
LABELS = ["neg", "pos", "neutral"]


def old_classifier_weights() -> dict[str, torch.Tensor]:
    """A classifier's tensors under the names checkpoints had when the classifier was a GPT
    subclass: GPT-2's names (the tied lm_head stored once, as wte) plus `score.weight`."""
    shapes = gpt2_shapes(CFG.n_layer, CFG.n_embd, 320, CFG.block_size) | {"score.weight": (len(LABELS), CFG.n_embd)}
    generator = torch.Generator().manual_seed(0)
    return {name: 0.1 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def write_old_checkpoint(path, weights: dict[str, torch.Tensor], **metadata) -> None:
    """A checkpoint directory as gptcli wrote it before `arch` was recorded."""
    tokenizer = BytesTokenizer()
    path.mkdir()
    config = {k: getattr(CFG, k) for k in ModelConfig.__dataclass_fields__}
    save_file(weights, path / WEIGHTS, metadata={
        "format": "gptcli/1", "model_config": json.dumps(config), "tokenizer": json.dumps(tokenizer.spec),
        "tokenizer_fingerprint": tokenizer.fingerprint(), **metadata})
    tokenizer.save(path / "tokenizer")
    (path / "config.yaml").write_text("# old checkpoint\n")
    write_manifest(path)


def test_old_classifier_checkpoint_loads_and_round_trips_bit_identically(tmp_path):
    weights = old_classifier_weights()
    write_old_checkpoint(tmp_path / "old", weights, task="classify", labels=json.dumps(LABELS))
    model, tokenizer = load_model(tmp_path / "old")
    assert model.arch == "gpt2" and model.labels == LABELS  # no `arch`: a gpt2 checkpoint

    # The head computes score(last hidden state) of a GPT holding exactly the trunk tensors.
    trunk = GPT(CFG).eval()
    missing, unexpected = trunk.load_state_dict({k: v for k, v in weights.items() if k != "score.weight"},
                                                strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # tied to wte
    idx = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        expected = trunk.hidden_states(idx)[:, -1] @ weights["score.weight"].T  # (B, K)
        torch.testing.assert_close(model(idx), expected, rtol=0, atol=0)

    save_checkpoint(tmp_path / "new", model, tokenizer, "# re-saved\n")
    again = load_file(tmp_path / "new" / WEIGHTS)
    assert again.keys() == weights.keys()
    assert all(torch.equal(again[k], weights[k]) for k in weights)
    with safe_open(str(tmp_path / "new" / WEIGHTS), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["arch"] == "gpt2" and metadata["task"] == "classify"
    assert json.loads(metadata["labels"]) == LABELS


def test_head_state_dict_is_the_trunks_names_plus_score():
    torch.manual_seed(0)
    trunk = GPT(CFG)
    names = list(trunk.state_dict())
    head = GPTClassifier(trunk, LABELS)
    assert list(head.state_dict()) == [*names, "score.weight"]
    assert [n for n, _ in head.named_parameters()][-1] == "score.weight"  # trunk first: optimizer order
    state = {k: torch.randn_like(v) for k, v in head.state_dict().items()}
    state["lm_head.weight"] = state["wte.weight"]
    head.load_state_dict(state)  # strict: every name matches
    assert torch.equal(trunk.h[1].mlp.c_fc.weight, state["h.1.mlp.c_fc.weight"])
    missing, unexpected = head.load_state_dict({"wte.weight": state["wte.weight"], "nope": torch.zeros(1)},
                                               strict=False)
    assert "h.0.ln_1.weight" in missing and "score.weight" in missing and unexpected == ["nope"]


def test_head_offers_the_model_protocol_through_its_trunk():
    trunk = GPT(CFG)
    head = GPTClassifier(trunk, LABELS)
    assert head.blocks is trunk.h and head.config is trunk.config and head.arch == "gpt2"
    head.activation_checkpointing = True  # what the training loop sets: the trunk runs the blocks
    assert trunk.activation_checkpointing
    assert head.num_params() == trunk.num_params() + 3 * 16
    assert head.flops_per_token() == trunk.flops_per_token() + 6 * 3 * 16


def test_lora_under_the_head_keeps_names_and_merges(tmp_path):
    torch.manual_seed(0)
    head = GPTClassifier(GPT(CFG), LABELS).eval()
    assert apply_lora(head, LoRASpec(rank=2, alpha=4.0, dropout=0.0, targets=("attn.c_attn",))) == 2
    for name, p in head.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # non-zero adapters, as after training
    assert "h.0.attn.c_attn.lora_A" in head.state_dict()
    idx = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        adapted = head(idx)
    loaded, _ = load_model(save_checkpoint(tmp_path / "lora", head, BytesTokenizer(), "# t\n"))
    assert loaded.lora_spec == head.lora_spec
    merge_lora(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), adapted, atol=1e-5, rtol=1e-4)


def test_lm_checkpoint_records_its_arch_and_old_ones_load_as_gpt2(tmp_path):
    torch.manual_seed(0)
    model = GPT(CFG)
    with safe_open(str(save_checkpoint(tmp_path / "new", model, BytesTokenizer(), "# t\n") / WEIGHTS),
                   framework="pt") as f:
        assert f.metadata()["arch"] == "gpt2" and f.metadata()["task"] == "lm"
    weights = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    write_old_checkpoint(tmp_path / "old", weights, task="lm")
    loaded, _ = load_model(tmp_path / "old")
    assert type(loaded) is get_arch("gpt2").model
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in weights.items())


def test_unknown_arch_is_a_one_line_error(tmp_path):
    with pytest.raises(GptcliError, match=r"^unknown model architecture 'llama9'; gptcli knows gpt2, llama$"):
        get_arch("llama9")
    weights = {k: v for k, v in GPT(CFG).state_dict().items() if k != "lm_head.weight"}
    write_old_checkpoint(tmp_path / "future", weights, task="lm", arch="llama9")
    with pytest.raises(GptcliError, match=r"model.safetensors: unknown model architecture 'llama9'; "
                                          r"gptcli knows gpt2, llama$") as error:
        load_model(tmp_path / "future")
    assert "\n" not in str(error.value)
