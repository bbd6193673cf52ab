"""Labelled data read exactly: quoted newlines kept, no row split at U+2028 or form feeds,
a byte-order mark accepted, and every error naming the file's own line of the record."""

import json

import pytest
from conftest import PY_SNIPPETS, tiny_config

from gptcli.config import FinetuneRunConfig, config_from_dict
from gptcli.data.text.records import column, read_records
from gptcli.errors import GptcliError
from gptcli.events import Notice
from gptcli.tasks.finetune import finetune
from gptcli.tasks.pretrain import pretrain


def write(path, text: str):
    """Write text byte for byte: no newline translation, whatever the platform."""
    path.write_bytes(text.encode("utf-8"))
    return path


def test_csv_quoted_newlines_are_kept_as_written(tmp_path):
    data = write(tmp_path / "code.csv", 'text,label\r\n"def f():\n    return 1\n",lf\r\n'
                                        '"x = 1\r\ny = 2",crlf\r\nplain,none\r\n')
    records = read_records(data)
    assert [r["text"] for r in records] == ["def f():\n    return 1\n", "x = 1\r\ny = 2", "plain"]
    assert [r.line for r in records] == [2, 5, 7]


def test_tsv_quoted_newline_is_kept(tmp_path):
    records = read_records(write(tmp_path / "d.tsv", 'text\tlabel\n"a\nb"\tx\n'))
    assert records == [{"text": "a\nb", "label": "x"}]


def test_csv_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    records = read_records(write(tmp_path / "excel.csv", "\ufefftext,label\nhello,a\n"))
    assert records == [{"text": "hello", "label": "a"}]
    assert column(records, "text", "excel.csv", "finetune.text_column") == ["hello"]


def test_form_feed_and_unicode_line_separators_do_not_split_rows(tmp_path):
    fields = ["page\x0cbreak", "para\u2028graph", "next\u0085line\u2029end", "v\x0btab\x1cfs"]
    text = "text,label\n" + "".join(f"{f},{i}\n" for i, f in enumerate(fields))
    records = read_records(write(tmp_path / "odd.csv", text))
    assert [r["text"] for r in records] == fields
    assert [r.line for r in records] == [2, 3, 4, 5]


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    rows = [{"prompt": "a\u2028b", "response": "c\u2029d\x0ce"}, {"prompt": "x", "response": "y"}]
    text = "\ufeff" + "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n"
    assert "\u2028" in text  # written raw, not as an escape
    records = read_records(write(tmp_path / "chat.jsonl", text))
    assert records == rows
    assert [r.line for r in records] == [1, 2]


@pytest.mark.parametrize("name, text, message", [
    # the second record spans lines 3-4, so the bad one starts on line 5 (and ends on 6)
    ("wide.csv", 'text,label\nok,a\n"two\nlines",b\n"x\ny",c,extra\n',
     "wide.csv:5: more values than columns"),
    ("open.csv", 'text,label\nok,a\n"never closed,b\nmore,c\n', "open.csv:3: invalid CSV"),
    ("bad.jsonl", '{"text": "a\u2028b", "label": 1}\n\n{"text": \n', r"bad.jsonl:3: invalid JSON"),
    ("list.jsonl", '{"text": "a\u2028b", "label": 1}\r\n[1]\r\n', "list.jsonl:2: expected a JSON object"),
    ("latin1.csv", "text,label\ncaf\xe9,a\n", "latin1.csv:2: invalid UTF-8 at byte 14"),
])
def test_read_errors_name_the_line_where_the_record_starts(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_bytes(text.encode("latin-1" if "latin1" in name else "utf-8"))
    with pytest.raises(GptcliError, match=message):
        read_records(path)


def test_missing_column_names_the_line_after_a_multiline_record(tmp_path):
    data = write(tmp_path / "short.csv", 'text,label\n"a\n\nb",x\nno label here\n')
    records = read_records(data)
    with pytest.raises(GptcliError, match="short.csv:5: record has no 'label' column"):
        column(records, "label", data, "finetune.label_column")


# ---------------------------------------------------------------------------------------
# Through finetune: lines survive the seeded train/val shuffle; instruct's too_long policy.


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A byte-level model with a 64-token context, trained one step: just a checkpoint."""
    root = tmp_path_factory.mktemp("records-base")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(PY_SNIPPETS) * 20)
    cfg = tiny_config([str(corpus)], root / "base", max_steps=1, eval_every=1, save_every=1)
    cfg["model"]["block_size"] = 64
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GPTCLI_CACHE", str(root / "cache"))
        pretrain(config_from_dict(cfg))
    return root / "base"


def ft_config(tmp_path, base_run, task, **finetune_keys) -> FinetuneRunConfig:
    return config_from_dict({
        "out_dir": str(tmp_path / "ft"),
        "seed": 3,
        "finetune": {"task": task, "init_from": str(base_run), "val_fraction": 0.25, **finetune_keys},
        "train": {"batch_size": 2, "max_steps": 1, "eval_every": 1, "eval_batches": 1, "save_every": 1,
                  "precision": "fp32", "compile": "off", "device": "cpu"},
    }, FinetuneRunConfig)


def test_classify_error_names_the_file_line_after_the_shuffle(tmp_path, base_run):
    rows = ['"multi\nline",a'] + [f"text {i},{'ab'[i % 2]}" for i in range(15)]
    rows.insert(9, "label missing")  # after the two-line first record: line 2 + 1 + 9 = 12
    data = write(tmp_path / "cls.csv", "text,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(GptcliError, match=r"cls\.csv:12: record has no 'label' column"):
        finetune(ft_config(tmp_path, base_run, "classify", train_file=str(data)))


def chat(prompt: str, response: str = "ok") -> str:
    return json.dumps({"prompt": prompt, "response": response})


def test_instruct_error_names_the_file_line_after_the_shuffle(tmp_path, base_run):
    lines = [chat(f"q{i}") for i in range(15)]
    lines[10] = json.dumps({"messages": [{"role": "robot", "content": "beep"}]})
    data = write(tmp_path / "sft.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(GptcliError, match=r"sft\.jsonl:11: unknown role 'robot'"):
        finetune(ft_config(tmp_path, base_run, "instruct", train_file=str(data)))


LONG = "q" * 100  # over the 64-token context with any chat template


def test_instruct_drops_too_long_conversations_and_counts_them(tmp_path, base_run):
    lines = [chat(LONG if i in (2, 5, 7) else "hi") for i in range(12)]
    train = write(tmp_path / "train.jsonl", "\n".join(lines))
    val = write(tmp_path / "val.jsonl", "\n".join([chat("hi"), chat(LONG), chat("hey")]))
    events = []
    result = finetune(ft_config(tmp_path, base_run, "instruct", train_file=str(train), val_file=str(val)),
                      on_event=events.append)
    notes = [e.message for e in events if isinstance(e, Notice)]
    assert "dropped 3 of 12 training and 1 of 3 validation conversations longer than the 64-token " \
           "context (finetune.too_long=drop)" in notes
    assert result.steps == 1


@pytest.mark.parametrize("policy, val_rows, message", [
    ("error", [chat("hi")], r"train\.jsonl:3: conversation is \d+ tokens, longer than the 64-token"),
    ("drop", [chat(LONG), chat(LONG)], "all 2 validation conversations are longer than the 64-token"),
])
def test_instruct_too_long_refusals(tmp_path, base_run, policy, val_rows, message):
    train = write(tmp_path / "train.jsonl", "\n".join([chat("hi"), chat("ho"), chat(LONG), chat("hu")]))
    val = write(tmp_path / "val.jsonl", "\n".join(val_rows))
    cfg = ft_config(tmp_path, base_run, "instruct", train_file=str(train), val_file=str(val), too_long=policy)
    with pytest.raises(GptcliError, match=message):
        finetune(cfg)
    assert not (tmp_path / "ft").exists()


def test_a_missing_column_error_stays_short_with_a_huge_header(tmp_path):
    from gptcli.data.text.records import column

    path = tmp_path / "wide.csv"
    header = ",".join(f"column_{i}" for i in range(200_000))
    path.write_text(header + "\n" + ",".join("x" * 200_000) + "\n")
    with pytest.raises(GptcliError) as info:
        column(read_records(path), "text", path, "finetune.text_column")
    assert len(str(info.value)) < 600 and f"{path}:2" in str(info.value)
