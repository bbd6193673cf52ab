import torch

from gptcli.config import ModelConfig
from gptcli.data.tokenizers.tokenizer import BytesTokenizer, CharTokenizer
from gptcli.infer.generate import (
    SampleText,
    SamplingSettings,
    decode_one_token,
    generate_tokens,
    logits_to_probs,
    next_token,
    prefill,
)
from gptcli.model.gpt import GPT


def test_top_k_keeps_k_tokens():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    probs = logits_to_probs(logits, SamplingSettings(temperature=1.0, top_k=2))
    assert (probs > 0).tolist() == [[False, True, False, True, False]]
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))


def test_top_p_keeps_smallest_nucleus():
    probs_in = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs_in.log()
    kept = logits_to_probs(logits, SamplingSettings(temperature=1.0, top_p=0.75)) > 0
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.75
    kept = logits_to_probs(logits, SamplingSettings(temperature=1.0, top_p=0.1)) > 0
    assert kept.tolist() == [[True, False, False, False]]  # the most likely always stays
    full = logits_to_probs(logits, SamplingSettings(temperature=1.0, top_p=1.0))
    torch.testing.assert_close(full, probs_in)


def test_temperature_sharpens_and_zero_is_greedy():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    cold = logits_to_probs(logits, SamplingSettings(temperature=0.1))
    hot = logits_to_probs(logits, SamplingSettings(temperature=10.0))
    assert cold[0, 2] > 0.99 and hot[0, 2] < 0.5
    assert next_token(logits, SamplingSettings(temperature=0), None).item() == 2


def tiny_model(block_size=8, vocab=20):
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=block_size, vocab_size=vocab)).eval()


def test_generation_runs_past_the_context_and_only_real_ids():
    model = tiny_model(block_size=8, vocab=20)
    out = list(generate_tokens(model, [1, 2, 3], 40, SamplingSettings(temperature=1.0), num_samples=3,
                               generator=torch.Generator().manual_seed(0)))
    tokens = torch.stack(out, dim=1)
    assert tokens.shape == (3, 40) and int(tokens.max()) < 20  # padded ids (20..63) never appear


def test_greedy_with_cache_equals_recomputing_without():
    model = tiny_model(block_size=16, vocab=20)
    prompt = [3, 1, 4, 1, 5]
    cached = [t.item() for t in generate_tokens(model, prompt, 8, SamplingSettings(temperature=0))]
    seq = list(prompt)
    for _ in range(8):
        seq.append(int(model(torch.tensor([seq]))[0, -1, :20].argmax()))
    assert cached == seq[len(prompt):]


def test_decode_step_at_a_position_equals_the_full_forward():
    for model in _model_pair(bias=True):
        tokens = torch.randint(0, 70, (2, 11))
        with torch.inference_mode():
            full = model(tokens)[:, -1]
            cache = model.new_kv_cache(batch_size=2, length=24)
            prefill(model, cache, tokens[:, :10])
            step = decode_one_token(model, cache, tokens[:, 10], torch.tensor([10]))
        torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-4)


def test_two_caches_interleaved_on_one_model_give_each_ones_tokens():
    """Two generations step by step in turn on one model, each with its own cache (different
    prompts and batch sizes), give the tokens each gives alone."""
    model = tiny_model(block_size=32, vocab=20)
    greedy = SamplingSettings(temperature=0)
    prompts = ([3, 1, 4], [2, 7, 1, 8, 2])
    alone = [torch.stack(list(generate_tokens(model, p, 12, greedy, num_samples=b)), dim=1)
             for p, b in zip(prompts, (1, 2))]
    with torch.inference_mode():
        caches = [model.new_kv_cache(b, 32) for b in (1, 2)]
        tokens = [next_token(prefill(model, c, torch.tensor([p] * b)), greedy, None)[:, None]
                  for c, p, b in zip(caches, prompts, (1, 2))]
        for step in range(11):
            for i, (cache, prompt) in enumerate(zip(caches, prompts)):
                pos = torch.tensor([len(prompt) + step])
                logits = decode_one_token(model, cache, tokens[i][:, -1], pos)
                tokens[i] = torch.cat([tokens[i], next_token(logits, greedy, None)[:, None]], dim=1)
    assert torch.equal(tokens[0], alone[0]) and torch.equal(tokens[1], alone[1])


def test_the_model_keeps_no_state_from_generation():
    """No buffer, parameter or attribute appears on any module during or after generation."""
    model = tiny_model(block_size=8, vocab=20)

    def state():
        return ([(name, sorted(vars(m))) for name, m in model.named_modules()],
                [name for name, _ in model.named_buffers()], [name for name, _ in model.named_parameters()])

    before = state()
    tokens = generate_tokens(model, [1, 2, 3], 20, SamplingSettings(temperature=0), num_samples=2)
    next(tokens)
    assert state() == before
    list(tokens)  # on past the context: the sliding-window rewrite too
    assert state() == before


def test_seeded_sampling_is_reproducible():
    model = tiny_model()
    run = lambda: [t.tolist() for t in generate_tokens(model, [1], 10, SamplingSettings(1.0), 2,
                                                        torch.Generator().manual_seed(7))]
    assert run() == run()


def test_sample_text_stop_strings_and_holdback():
    tok = CharTokenizer("abcdefgh\n")
    text = SampleText(tok, stops=["\n\n"])
    shown = "".join(text.add(i) for i in tok.encode("abc\nde\n\nfg"))
    assert text.stopped and text.text == "abc\nde" and shown == "abc\nde"


def test_sample_text_utf8_split_across_tokens():
    tok = BytesTokenizer()
    text = SampleText(tok, stops=[])
    pieces = [text.add(b) for b in "é日".encode()]
    assert pieces[0] == "" and "".join(pieces) + text.finish() == "é日"


def test_sample_text_ends_at_end_of_text():
    tok = BytesTokenizer()
    text = SampleText(tok, stops=[])
    assert text.add(ord("a")) == "a"
    text.add(tok.eot_id)
    assert text.stopped and text.add(ord("b")) == "" and text.tokens == [ord("a")]


def _model_pair(bias: bool):
    import copy

    from gptcli.infer.cpu_layout import for_generation

    torch.manual_seed(0)
    plain = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=70, bias=bias)).eval()
    with torch.no_grad():  # non-zero biases, so a dropped one shows
        for name, p in plain.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return plain, for_generation(copy.deepcopy(plain))


def test_generation_layout_computes_the_same_logits_and_tokens():
    for bias in (True, False):
        plain, fast = _model_pair(bias)
        idx = torch.randint(0, 70, (3, 24))
        with torch.inference_mode():
            torch.testing.assert_close(fast(idx), plain(idx), rtol=1e-5, atol=1e-5)
        greedy = SamplingSettings(temperature=0)
        tokens = [[int(t) for t in generate_tokens(m, [1, 2, 3], 40, greedy)] for m in (plain, fast)]
        assert tokens[0] == tokens[1]  # 40 steps: past the 24-token context, so the cache rebuild too


def test_bf16_generation_follows_the_fp32_model():
    import copy

    from gptcli.infer.cpu_layout import for_generation

    plain, _ = _model_pair(True)
    half = for_generation(copy.deepcopy(plain), torch.bfloat16)
    assert half.lm_head.weight_t.dtype == torch.bfloat16 and half.wte.weight.dtype == torch.bfloat16
    idx = torch.randint(0, 70, (4, 24))
    with torch.inference_mode():
        full, low = plain(idx), half(idx).float()
    assert (full - low).abs().max() < 0.05 * full.abs().max()
    assert (full.argmax(-1) == low.argmax(-1)).float().mean() > 0.9
