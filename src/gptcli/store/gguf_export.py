"""`gptcli export-gguf`: a checkpoint as one GGUF file that llama.cpp (and so ollama and LM
Studio) loads, written with the `gguf` package (`pip install 'gptcli[gguf]'`).

The route is the one llama.cpp's own converter takes from a Hugging Face directory, without
the directory: the checkpoint's tensors in HF names and layouts (the export-hf mappings, the
family's `hf` entry in gptcli/families/) are renamed to GGUF's with gguf's own name map, so a
checkpoint exports to GGUF exactly when export-hf can write it and its family's `gguf` entry
(the GGUF architecture, the settings it reads, the tensors' layout) accepts it:
  arch gpt2  -> GGUF `gpt2`   (GPT-2's Conv1D weights turned back to (out, in));
  arch llama -> GGUF `llama`, `qwen2` or `qwen3`, the class export-hf would pick (Mistral's
                shape, n_embd not a multiple of n_head, is refused). llama.cpp's `llama`
                rotates query and key in interleaved pairs, where gptcli and HF rotate the
                two halves of each head: the `llama` export reorders the rows of q and k so
                that pairs (i, i + d/2) sit side by side (Qwen's GGUF classes rotate halves,
                as gptcli does: no reordering).

Tokenizer: a tiktoken BPE with GPT-2's pre-tokenizer pattern (gpt2, r50k_base, or one
trained with `tokenize --train-bpe`), written as GGUF's `gpt2` tokenizer model: every id's
bytes in GPT-2's byte-to-character spelling, the merge that makes each multi-byte token, and
special tokens (`<|endoftext|>`, an instruct checkpoint's chat tokens) as control tokens.
Other tokenizers are refused. No chat template is written: llama.cpp's chat front ends need
one to use the chat tokens (a prompt can still spell them).

Types (`--type`): f32, f16 (default) or q8_0 (blocks of 32 int8 values with an f16 scale,
llama.cpp's 8-bit type) for the matrices; one-dimensional tensors (norms, biases) stay f32,
and a matrix whose rows are not a whole number of q8_0 blocks is written f16, as llama.cpp's
converter does. The file is written beside the target and renamed into place at the end.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from gptcli.config import ModelConfig
from gptcli.data.tokenizers.bpe import GPT2_PATTERN
from gptcli.data.tokenizers.tokenizer import TiktokenTokenizer, Tokenizer, WithAddedTokens
from gptcli.errors import GptcliError
from gptcli.families import Family, get_family
from gptcli.model.lora import merge_lora
from gptcli.outputs import check_output_file, input_paths
from gptcli.store.checkpoint import checkpoint_task, load_model, run_of
from gptcli.store.hf import export_state, tokenizer_files

TYPES = ("f32", "f16", "q8_0")
EXTRA = "pip install 'gptcli[gguf]'"
GGUF_MAGIC = b"GGUF"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GptcliError(f"export-gguf needs the gguf package: {EXTRA}") from None
    return gguf


def export_gguf(source: Path, out: str | Path, dtype: str = "f16", overwrite: bool = False) -> Path:
    """Write the checkpoint directory `source` as the GGUF file `out` (see the module
    docstring); `overwrite` replaces a GGUF file already there, never anything else."""
    if dtype not in TYPES:
        raise GptcliError(f"--type must be one of {', '.join(TYPES)}, got {dtype!r}")
    gguf = _gguf()
    run = run_of(source)
    target = check_output_file(out, input_paths([run, source]), "--out")
    _check_replaceable(target, Path(out), overwrite)
    if checkpoint_task(source) == "classify":
        raise GptcliError(f"{source} is a classifier; llama.cpp runs language models: export a pretrained, "
                          f"lm or instruct checkpoint (export-hf writes classifiers for transformers)")
    model, tokenizer = load_model(source)
    if model.lora_spec is not None:
        merge_lora(model)
    cfg = model.config
    family = get_family(cfg.arch)
    arch = _gguf_arch(family, cfg, source)
    tokens, types, merges = _vocabulary(tokenizer, source)
    weights = export_state(model, classifier=False)

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        writer = gguf.GGUFWriter(partial, arch)
        _write_settings(writer, gguf, family, cfg, arch, dtype, source)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tokenizer.eot_id)
        writer.add_eos_token_id(tokenizer.eot_id)
        writer.add_add_bos_token(False)  # gptcli prompts are the text's ids alone
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.n_layer)
        for hf_name, value in family.gguf.tensors(family.hf.weights(weights, cfg), cfg, arch).items():
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise GptcliError(f"{source}: gguf has no {arch} tensor for {hf_name}")
            _add_tensor(writer, gguf, name, value, dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, target)
    except OSError as exc:
        raise GptcliError(f"could not write {out} ({exc.strerror or exc}); free disk space or choose "
                          f"another --out; nothing was written") from None
    finally:
        partial.unlink(missing_ok=True)
    return Path(out)


def _check_replaceable(target: Path, shown: Path, overwrite: bool) -> None:
    """An existing file at `target` is replaced only with `overwrite`, and only if it is GGUF."""
    if not target.exists():
        return
    with open(target, "rb") as f:
        is_gguf = f.read(4) == GGUF_MAGIC
    if not is_gguf:
        raise GptcliError(f"--out {shown} exists and is not a GGUF file; choose another --out")
    if not overwrite:
        raise GptcliError(f"--out {shown} exists; pass --overwrite to replace it")


def _gguf_arch(family: Family, cfg: ModelConfig, source: Path) -> str:
    """GGUF's architecture for `cfg` (its family's choice), or the reason there is none."""
    if family.hf is None or family.gguf is None:
        raise GptcliError(f"{source} cannot be exported: llama.cpp has no architecture for arch {family.name}")
    problems = family.hf.export_problems(cfg)
    if problems:
        raise GptcliError(f"{source} cannot be exported: llama.cpp's {family.hf.name} models do not compute "
                          f"{'; '.join(problems)}")
    try:
        return family.gguf.arch(cfg)
    except GptcliError as exc:
        raise GptcliError(f"{source} cannot be exported: {exc}") from None


def _vocabulary(tokenizer: Tokenizer, source: Path) -> tuple[list[str], list[int], list[str]]:
    """GGUF's token strings, token types and merges for `tokenizer` (its added tokens, such
    as an instruct checkpoint's chat tokens, are control tokens)."""
    bpe = tokenizer.base if isinstance(tokenizer, WithAddedTokens) else tokenizer
    if not (isinstance(bpe, TiktokenTokenizer) and bpe.encoding._pat_str == GPT2_PATTERN):
        raise GptcliError(f"{source} uses the {tokenizer.name} tokenizer; export-gguf writes tiktoken BPEs "
                          f"with GPT-2's pattern (gpt2, r50k_base, or --train-bpe)")
    gguf = _gguf()
    vocab, merges = tokenizer_files(bpe.encoding._mergeable_ranks)
    tokens = [f"[PAD{i}]" for i in range(tokenizer.vocab_size)]  # ids no token has (none expected)
    types = [gguf.TokenType.UNUSED] * tokenizer.vocab_size
    for spelled, i in vocab.items():
        tokens[i], types[i] = spelled, gguf.TokenType.NORMAL
    for special, i in tokenizer.special_tokens.items():
        tokens[i], types[i] = special, gguf.TokenType.CONTROL
    return tokens, [int(t) for t in types], merges


def _write_settings(writer, gguf, family: Family, cfg: ModelConfig, arch: str, dtype: str,
                    source: Path) -> None:
    writer.add_name(source.name)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.mlp_hidden)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    for method, value in family.gguf.settings(cfg, arch).items():  # what this architecture reads
        getattr(writer, method)(value)


def _add_tensor(writer, gguf, name: str, value: torch.Tensor, dtype: str) -> None:
    data = value.detach().float().contiguous().numpy()
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    if data.ndim == 1 or dtype == "f32":
        writer.add_tensor(name, data.astype(np.float32))
    elif dtype == "q8_0" and data.shape[-1] % block == 0:
        writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                          raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(name, data.astype(np.float16))
