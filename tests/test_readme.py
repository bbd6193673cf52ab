"""Every `gptcli` command the README shows runs, shortened with --set, in a folder laid out
as the README assumes (configs/, ../shared/data, corpora, earlier runs).

Each command has a row in COMMANDS: what must exist first (other commands, run before it
in the same folder) and what is appended to shorten it; a command that cannot run here says
why. A README command without a row, or a row whose command left the README, fails the test.
Folder states are built once per list of prerequisites and copied for each command.
"""

import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    GPT2_TIKTOKEN,
    PY_SNIPPETS,
    SHARED,
    needs_gpt2_ranks,
    needs_shakespeare,
)

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

PRETRAIN = ["--set", "train.max_steps=2", "--set", "train.eval_every=2", "--set", "train.eval_batches=1",
            "--set", "train.save_every=2", "--set", "train.batch_size=2", "--set", "model.n_layer=1",
            "--set", "model.n_head=2", "--set", "model.n_embd=32", "--set", "train.device=cpu",
            "--set", "train.precision=fp32", "--set", "train.compile=off"]
FINETUNE = ["--set", "train.max_steps=2", "--set", "train.eval_every=2", "--set", "train.eval_batches=1",
            "--set", "train.save_every=2", "--set", "train.batch_size=2", "--set", "train.device=cpu",
            "--set", "train.precision=fp32", "--set", "train.compile=off"]
OFFLINE_GPT2 = ["--tokenizer", str(GPT2_TIKTOKEN)]  # tiktoken's own gpt2 files need a download
OFFLINE_GPT2_ARGS = tuple(OFFLINE_GPT2)
PART_1 = "gptcli tokenize fineweb-edu/sample/10BT --out parts/1 --part 1/2"
PART_2 = "gptcli tokenize fineweb-edu/sample/10BT --out parts/2 --part 2/2"
needs_pyarrow = pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow (the data extra) absent")

DEMO = "gptcli pretrain configs/demo.yaml"
CLASSIFY = "gptcli finetune --task classify"
INSTRUCT = "gptcli finetune configs/finetune-instruct.yaml"
SHAKESPEARE_RUN = "gptcli pretrain configs/shakespeare-char.yaml"
IMPORT = "gptcli import-hf hf/gpt2 --out checkpoints/gpt2"
GPT2_CLASSIFY = ("gptcli finetune configs/finetune-classify.yaml --set finetune.init_from=checkpoints/gpt2 "
                 "--set finetune.lora.rank=8 --set finetune.aux_lm_weight=0 --set finetune.pooling=last "
                 "--set finetune.long_text=truncate --set out_dir=runs/gpt2-classify")


SLOW = (pytest.mark.slow,)  # several processes: run with the slow tests
# GPT-2 small's configs read a corpus downloaded and tokenized first: here the built-in one.
ON_STDLIB = ("--set", "data.inputs=[stdlib]", "--set", "data.tokenizer=bytes", "--set", "data.val_fraction=0.05",
             "--set", "model.block_size=64")
SERVER = "a server runs until stopped; tests/serve/ start it and check what it answers"
HUB_MODEL = ("needs a chat model downloaded from the Hub; tests/store/test_hf_llama.py post-trains a small one "
             "made in the test")
SFT_LETTERS = "gptcli finetune configs/finetune-sft-letters.yaml"
DRAFT = "gptcli pretrain configs/demo-draft.yaml"
DEMO_3000 = ("gptcli pretrain configs/demo.yaml --set train.max_steps=3000 --set train.warmup_steps=150 "
             "--set out_dir=runs/demo-3000")
INSTRUCT_3000 = ("gptcli finetune configs/finetune-instruct.yaml --set finetune.init_from=runs/demo-3000 "
                 "--set train.max_steps=800 --set finetune.patience=0 --set out_dir=runs/instruct-3000")
GRPO = "gptcli finetune configs/finetune-grpo.yaml"

# A README command; any command and what to append to it; or a function of the repo folder.
Step = str | tuple[str, tuple[str, ...]] | Callable[[Path], None]


@dataclass(frozen=True)
class Row:
    needs: tuple[Step, ...] = ()  # commands run first, in order, in the same folder
    extra: tuple[str, ...] = ()  # appended to shorten the command (later --set wins)
    skip: str = ""  # why it cannot run here
    data: tuple = ()  # pytest marks for the shared data files it reads
    processes: int | None = None  # torchrun: processes per node here (the README's GPUs, in CPU processes)
    nodes: int = 1  # torchrun --nnodes N: started N times on this machine, meeting on 127.0.0.1


COMMANDS: dict[str, Row] = {
    "gptcli tokenize corpus/ --out data/mycorpus": Row(extra=tuple(OFFLINE_GPT2), data=(needs_gpt2_ranks,)),
    DEMO: Row(),
    'gptcli sample --prompt "def "': Row(needs=(DEMO,), extra=("-n", "8")),
    "gptcli tokenize stdlib --out data/stdlib --tokenizer bytes": Row(),
    "gptcli tokenize ../shared/data/tinyshakespeare.txt --out data/shakespeare --tokenizer char":
        Row(data=(needs_shakespeare,)),
    "gptcli tokenize 'books/**/*.txt' notes/ --out data/books --tokenizer path/to/gpt2.tiktoken":
        Row(data=(needs_gpt2_ranks,)),
    "gptcli tokenize corpus.jsonl --text-field body --out data/corpus --train-bpe 8192": Row(),
    PART_1: Row(extra=OFFLINE_GPT2_ARGS, data=(needs_gpt2_ranks, needs_pyarrow)),
    PART_2: Row(extra=OFFLINE_GPT2_ARGS, data=(needs_gpt2_ranks, needs_pyarrow)),
    "gptcli tokenize --merge parts/1 parts/2 --out data/fineweb-edu": Row(
        needs=((PART_1, OFFLINE_GPT2_ARGS), (PART_2, OFFLINE_GPT2_ARGS)), data=(needs_gpt2_ranks, needs_pyarrow)),
    "gptcli tokenize fineweb-edu/sample/10BT --out data/fineweb-edu --val-fraction 0.0005":
        Row(extra=(*OFFLINE_GPT2_ARGS, "--val-fraction", "0.2"), data=(needs_gpt2_ranks, needs_pyarrow)),
    "torchrun --standalone --nproc_per_node 8 -m gptcli pretrain configs/gpt2-124m-modern.yaml --set "
    "'data.inputs=[data/fineweb-edu]' --set train.grad_accum=5": Row(skip="needs 8 GPUs and the downloaded corpus"),
    SHAKESPEARE_RUN: Row(data=(needs_shakespeare,)),
    "gptcli pretrain configs/shakespeare-char-modern.yaml": Row(data=(needs_shakespeare,)),
    "gptcli pretrain configs/demo.yaml --set train.max_steps=300 --set model.n_layer=2": Row(),
    "gptcli pretrain configs/demo.yaml --resume": Row(needs=(DEMO,), extra=("--set", "train.max_steps=4")),
    "gptcli pretrain configs/demo.yaml --overwrite": Row(needs=(DEMO,)),
    CLASSIFY: Row(needs=(DEMO,)),
    "gptcli finetune configs/finetune-classify.yaml --set finetune.lora.rank=8 --set finetune.aux_lm_weight=0":
        Row(needs=(DEMO,)),
    "gptcli finetune configs/finetune-lm.yaml": Row(needs=(DEMO,), data=(needs_shakespeare,)),
    INSTRUCT: Row(needs=(DEMO,)),
    "gptcli finetune my.yaml --task instruct --resume":
        Row(needs=(DEMO, ("gptcli finetune my.yaml --task instruct", ())), extra=("--set", "train.max_steps=4")),
    'gptcli sample -c runs/classify-stdlib -p "msg = email.message_from_string(text)"':
        Row(needs=(DEMO, CLASSIFY)),
    "gptcli eval -c runs/classify-stdlib --data test.csv --predictions preds.csv": Row(needs=(DEMO, CLASSIFY)),
    "gptcli eval -c runs/classify-stdlib": Row(needs=(DEMO, CLASSIFY)),
    'gptcli sample -c runs/instruct-docstrings -p "def read_config(path):"':
        Row(needs=(DEMO, INSTRUCT), extra=("-n", "8")),
    "gptcli eval -c runs/instruct-docstrings --task generate --metrics rougeL,rouge1,f1":
        Row(needs=(DEMO, INSTRUCT), extra=("--limit", "4", "--max-new-tokens", "8")),
    "gptcli finetune configs/finetune-dpo.yaml": Row(needs=(DEMO, INSTRUCT)),
    DEMO_3000: Row(),
    INSTRUCT_3000: Row(needs=(DEMO_3000,)),
    "gptcli eval -c runs/instruct-3000 --task generate --metrics rougeL,rouge1,f1":
        Row(needs=(DEMO_3000, INSTRUCT_3000), extra=("--limit", "4", "--max-new-tokens", "8")),
    "gptcli finetune configs/finetune-dpo.yaml --set finetune.init_from=runs/instruct-3000 --set out_dir=runs/dpo-3000":
        Row(needs=(DEMO_3000, INSTRUCT_3000)),
    SFT_LETTERS: Row(needs=(DEMO,)),
    GRPO: Row(needs=(DEMO, SFT_LETTERS)),
    'gptcli sample -c runs/grpo-letters -p "Which letter comes later in the alphabet, k or w?"':
        Row(needs=(DEMO, SFT_LETTERS, GRPO), extra=("-n", "4")),
    "gptcli serve -c runs/grpo-letters": Row(skip=SERVER),
    "gptcli import-hf Qwen2.5-0.5B-Instruct --out checkpoints/qwen": Row(skip=HUB_MODEL),
    "gptcli finetune configs/finetune-grpo.yaml --set finetune.init_from=checkpoints/qwen --set finetune.lora.rank=16 "
    "--set out_dir=runs/qwen-grpo": Row(skip=HUB_MODEL),
    IMPORT: Row(data=(needs_gpt2_ranks,)),
    "gptcli import-hf hf/gpt2 --out checkpoints/gpt2 --tokenizer ../shared/data/gpt2.tiktoken":
        Row(data=(needs_gpt2_ranks,)),
    'gptcli sample -c checkpoints/gpt2 -p "The meaning of life is" -n 60 --top-k 40':
        Row(needs=(IMPORT,), data=(needs_gpt2_ranks,)),
    GPT2_CLASSIFY: Row(needs=(IMPORT,), data=(needs_gpt2_ranks,)),
    "gptcli export-gguf checkpoints/gpt2 --out gpt2.gguf --type q8_0": Row(needs=(IMPORT,), data=(needs_gpt2_ranks,)),
    "gptcli eval -c checkpoints/gpt2 --task hellaswag --data hellaswag_val.jsonl":
        Row(needs=(IMPORT,), data=(needs_gpt2_ranks,)),
    "gptcli eval -c checkpoints/gpt2 --task hellaswag --data hellaswag_val.jsonl --limit 1000 --json":
        Row(needs=(IMPORT,), data=(needs_gpt2_ranks,)),
    "gptcli eval -c runs/demo --task choice --data my_tests.jsonl": Row(needs=(DEMO,)),
    "gptcli eval -c runs/demo --task generate --data qa.jsonl --metrics exact_match,f1 --stop '\\n'": Row(needs=(DEMO,)),
    "gptcli eval -c runs/demo --task generate --data summaries.jsonl --metrics rouge1,rouge2,rougeL --max-new-tokens 48":
        Row(needs=(DEMO,)),
    "gptcli eval -c runs/demo --task generate --data translations.jsonl --metrics bleu,chrf --predictions out.jsonl "
    "--json": Row(needs=(DEMO,)),
    "gptcli eval -c runs/demo --task generate --data qa.jsonl --num-samples 8 --temperature 0.8 --seed 0 --metrics "
    "pass@1,pass@8 --reward checks.py:is_right": Row(needs=(DEMO,), extra=("--max-new-tokens", "8")),
    "gptcli export-hf runs/gpt2-classify --out hf/gpt2-classify":
        Row(needs=(IMPORT, GPT2_CLASSIFY), data=(needs_gpt2_ranks,)),
    'gptcli sample -c runs/shakespeare-char -p "ROMEO:" -n 500 --top-k 200 --temperature 0.8':
        Row(needs=(SHAKESPEARE_RUN,), extra=("-n", "20"), data=(needs_shakespeare,)),
    'gptcli sample -c runs/demo/checkpoints/step-000900 -p "class " --stop "\\n\\n" --num-samples 4':
        Row(needs=(DEMO, lambda repo: shutil.copytree(repo / "runs/demo/checkpoints/step-000002",
                                                      repo / "runs/demo/checkpoints/step-000900")),
            extra=("-n", "8")),  # the name the full demo's last checkpoint has
    'gptcli sample -p "import " --greedy --json': Row(needs=(DEMO,), extra=("-n", "8")),
    "gptcli serve -c runs/demo": Row(skip=SERVER),
    "gptcli serve -c runs/demo --draft runs/demo-draft": Row(skip=SERVER),
    DRAFT: Row(),
    'gptcli sample -c runs/demo -p "def " --temperature 0 --draft runs/demo-draft':
        Row(needs=(DEMO, DRAFT), extra=("-n", "8")),
    'gptcli sample -c runs/instruct-docstrings -p "def read_config(path):" --draft ngram':
        Row(needs=(DEMO, INSTRUCT), extra=("-n", "8")),
    "gptcli serve -c runs/instruct-docstrings --host 0.0.0.0 --port 8080 --api-key s3cret --max-batch 32":
        Row(skip=SERVER),
    "gptcli plot runs/demo --out demo.png": Row(needs=(DEMO,)),
    "gptcli plot runs/a runs/b --x tokens --log -o ab.png":
        Row(needs=((DEMO, ("--set", "out_dir=runs/a")), (DEMO, ("--set", "out_dir=runs/b")))),
    "gptcli runs": Row(needs=(DEMO,)),
    "gptcli info runs/demo": Row(needs=(DEMO,)),
    "gptcli eval -c runs/demo": Row(needs=(DEMO,)),
    "gptcli eval -c runs/demo --data notes/ --data 'more/*.md'": Row(needs=(DEMO,)),
    "torchrun --standalone --nproc_per_node 2 -m gptcli pretrain configs/demo.yaml": Row(),
    # The 8-GPU commands run here as 2 CPU processes per node; the two-node one as two
    # torchruns meeting on 127.0.0.1 (HOST0 and the port replaced).
    "torchrun --standalone --nproc_per_node 8 -m gptcli pretrain configs/gpt2-124m.yaml --set train.grad_accum=5":
        Row(processes=2, extra=ON_STDLIB, data=SLOW),
    "torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST0:29500 --rdzv_id run1 -m gptcli "
    "pretrain configs/gpt2-124m.yaml --set train.grad_accum=5": Row(processes=1, nodes=2, extra=ON_STDLIB, data=SLOW),
    "torchrun --standalone --nproc_per_node 2 --max_restarts 3 -m gptcli pretrain configs/demo.yaml": Row(data=SLOW),
    "torchrun --standalone --nproc_per_node 8 -m gptcli finetune configs/finetune-classify.yaml":
        Row(needs=(DEMO,), processes=2, data=SLOW),
    "torchrun --standalone --nproc_per_node 8 -m gptcli pretrain configs/gpt2-124m.yaml --set "
    "train.parallel=fsdp --set train.activation_checkpointing=true --set train.checkpoint=sharded --set "
    "train.async_checkpoint=true": Row(processes=2, extra=ON_STDLIB, data=SLOW),
    # The two fresh-machine commands install the project: CI runs the test one (.ci/run),
    # and their gptcli parts are the DEMO and 'sample --prompt "def "' rows above.
    'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e . && '
    'gptcli pretrain configs/demo.yaml && gptcli sample --prompt "def "':
        Row(skip="installs the project; its gptcli commands have their own rows"),
}


def readme_commands() -> list[str]:
    """The README's shell lines that run gptcli, comments cut, continuations joined."""
    commands = []
    for language, block in re.findall(r"```(\w*)\n(.*?)```", README.read_text(), re.S):
        if language not in ("", "bash"):
            continue  # python, yaml: not shell
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            line = " ".join(shlex.split(line, posix=False))  # one space between words
            if re.match(r"(gptcli |torchrun .*-m gptcli |python3 -m venv .*&& gptcli )", line):
                commands.append(line)
    return list(dict.fromkeys(commands))


def test_every_readme_command_has_a_row():
    shown = readme_commands()
    assert sorted(set(shown) - set(COMMANDS)) == [], "README commands without a row in COMMANDS"
    assert sorted(set(COMMANDS) - set(shown)) == [], "rows for commands no longer in the README"


# --- the folder the README assumes -------------------------------------------------------


def write_generate_items(repo: Path) -> None:
    """The generation tasks' files of `eval --task generate`'s examples, and a reward function."""
    def jsonl(name, rows):
        (repo / name).write_text("".join(json.dumps(row) + "\n" for row in rows))

    jsonl("qa.jsonl", [{"prompt": "import os\nprint(os.", "reference": "path"},
                       {"prompt": "def add(a, b):\n    return", "references": ["a + b", "b + a"]}])
    jsonl("summaries.jsonl", [{"prompt": "def read_config(path):", "reference": "Read the configuration file."}] * 2)
    jsonl("translations.jsonl", [{"prompt": "le chat noir", "reference": "the black cat"},
                                 {"prompt": "la maison", "references": ["the house", "the home"]}])
    (repo / "checks.py").write_text("def is_right(prediction, references):\n"
                                    "    return prediction.strip() in references\n")


def lay_out(root: Path) -> None:
    """configs/, ../shared beside it, and the inputs the README's examples name."""
    repo = root / "repo"
    shutil.copytree(REPO / "configs", repo / "configs")
    (root / "shared").symlink_to(SHARED.parent)
    for folder in ("corpus", "books/a", "notes", "more", "path/to"):
        (repo / folder).mkdir(parents=True)
    for i, text in enumerate(PY_SNIPPETS * 4):
        (repo / "corpus" / f"m{i}.py").write_text(text)
        (repo / "books" / "a" / f"b{i}.txt").write_text(text.upper())
        (repo / "notes" / f"n{i}.md").write_text(text)
        (repo / "more" / f"m{i}.md").write_text(text[::-1])
    (repo / "corpus.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in PY_SNIPPETS * 8))
    if importlib.util.find_spec("pyarrow") is not None:  # a FineWeb-Edu-like folder of Parquet files
        import pyarrow as pa
        import pyarrow.parquet as pq

        (repo / "fineweb-edu" / "sample" / "10BT").mkdir(parents=True)
        for i in range(3):
            rows = [text * (1 + i) for text in PY_SNIPPETS * 4]
            pq.write_table(pa.table({"text": rows, "id": list(range(len(rows)))}),
                           repo / "fineweb-edu" / "sample" / "10BT" / f"00{i}_00000.parquet")
    if GPT2_TIKTOKEN.is_file():
        shutil.copy(GPT2_TIKTOKEN, repo / "path" / "to" / "gpt2.tiktoken")
        make_hf_gpt2(repo / "hf" / "gpt2")
    hellaswag = [{"activity_label": "Cooking", "ctx_a": "A man cracks an egg into a pan.", "ctx_b": "he",
                  "endings": [" stirs it with a fork.", " paints the wall.", " sings.", " jumps."], "label": 0}] * 3
    (repo / "hellaswag_val.jsonl").write_text("".join(json.dumps(row) + "\n" for row in hellaswag))
    (repo / "my_tests.jsonl").write_text("".join(json.dumps({"context": f"import {m}", "choices": ["os", "!!"],
                                                             "label": 0}) + "\n" for m in ("os", "sys")))
    write_generate_items(repo)
    instruct = (REPO / "configs" / "finetune-instruct.yaml").read_text()
    (repo / "my.yaml").write_text(instruct.replace("runs/instruct-docstrings", "runs/my"))
    rows = ["asyncio.run(main())", "msg = email.message_from_string(s)", "root = tkinter.Tk()",
            "tree = xml.etree.ElementTree.parse(f)"]
    labels = ["asyncio", "email", "tkinter", "xml"]
    (repo / "test.csv").write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in zip(rows, labels)))


def make_hf_gpt2(folder: Path) -> None:
    """A tiny random GPT-2 as `save_pretrained` writes it, with GPT-2's tokenizer files
    (derived from the shared ranks, as the hub would serve them)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptcli.data.tokenizers.tokenizer import tiktoken_from_file
    from gptcli.store.hf import tokenizer_files

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=64)).save_pretrained(folder)
    tokenizer = tiktoken_from_file(GPT2_TIKTOKEN)
    vocab, merges = tokenizer_files(tokenizer.encoding._mergeable_ranks)
    vocab["<|endoftext|>"] = tokenizer.eot_id
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def shortened(step: Step) -> list[str]:
    """A command's arguments after `gptcli`, with the shortening its kind needs and then
    what its row (or the step itself) appends."""
    command, extra = step if isinstance(step, tuple) else (step, COMMANDS[step].extra)
    words = shlex.split(command)
    args = words[words.index("gptcli") + 1:] if "gptcli" in words else words[words.index("-m") + 2:]
    kind = {"pretrain": PRETRAIN, "finetune": FINETUNE}.get(args[0], [])
    return [*args, *kind, *extra]


def invoke(args: list[str], cwd: Path, cache: Path) -> tuple[int, str, str]:
    """`gptcli ARGS` in this process, in `cwd`; returns (exit code, stdout, stderr)."""
    from gptcli.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    saved = (sys.argv, os.getcwd(), os.environ.get("GPTCLI_CACHE"))
    sys.argv, code = ["gptcli", *args], 0
    os.chdir(cwd)
    os.environ["GPTCLI_CACHE"] = str(cache)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
        os.environ["GPTCLI_CACHE"] = saved[2] or ""
        if saved[2] is None:
            del os.environ["GPTCLI_CACHE"]
    return code, out.getvalue(), err.getvalue()


class Folders:
    """Folder states by the commands run in them, each built once from the one before."""

    def __init__(self, root: Path):
        self.root = root
        self.cache = root / "cache"
        self.states: dict[tuple[Step, ...], Path] = {(): root / "base"}
        lay_out(root / "base")

    def state(self, needs: tuple[Step, ...]) -> Path:
        if needs not in self.states:
            folder = self.copy(self.state(needs[:-1]), f"state{len(self.states)}")
            if callable(needs[-1]):
                needs[-1](folder / "repo")
            else:
                code, _, err = invoke(shortened(needs[-1]), folder / "repo", self.cache)
                assert code == 0, f"{needs[-1]} (needed first) failed:\n{err[-3000:]}"
            self.states[needs] = folder
        return self.states[needs]

    def copy(self, folder: Path, name: str) -> Path:
        target = self.root / name
        shutil.copytree(folder / "repo", target / "repo", symlinks=True)
        (target / "shared").symlink_to(SHARED.parent)
        return target


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Folders:
    return Folders(tmp_path_factory.mktemp("readme"))


def rows_to_run():
    for command, row in COMMANDS.items():
        marks = [*row.data, *([pytest.mark.skip(reason=row.skip)] if row.skip else [])]
        yield pytest.param(command, marks=marks, id=command[:70])


def run_torchrun(command: str, row: Row, cwd: Path, cache: Path) -> tuple[int, str]:
    """A README torchrun line as `python -m torch.distributed.run`, with its row's process
    count, started once per node (all on this machine); the first failing node's code."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "GPTCLI_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    words = shlex.split(command)
    launcher = words[1:words.index("-m")]
    if row.processes is not None:
        launcher[launcher.index("--nproc_per_node") + 1] = str(row.processes)
    if row.nodes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher[launcher.index("--rdzv_endpoint") + 1] = f"127.0.0.1:{port}"
    logs = [cwd / f"torchrun-node{n}.log" for n in range(row.nodes)]  # files: a full pipe would block a node
    nodes = []
    for log in logs:
        with log.open("w") as stderr:
            nodes.append(subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "gptcli",
                                           *shortened(command)], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                          stderr=stderr))
    results = [(node.wait(timeout=300), log.read_text()) for node, log in zip(nodes, logs)]
    return next(((code, err) for code, err in results if code != 0), results[0])


@pytest.mark.parametrize("command", list(rows_to_run()))
def test_readme_command_runs(command, folders):
    row = COMMANDS[command]
    folder = folders.copy(folders.state(row.needs), f"run-{abs(hash(command))}")
    if command.startswith("torchrun"):
        code, err = run_torchrun(command, row, folder / "repo", folders.cache)
    else:
        code, _, err = invoke(shortened(command), folder / "repo", folders.cache)
    assert code == 0, err[-3000:]
