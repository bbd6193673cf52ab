"""Generation-task evaluation (`eval --task generate`): the rewards and metrics against the
libraries and estimators they come from, items read with every refusal naming its line,
greedy and seeded predictions equal to `gptcli sample`'s, the predictions file, a chat
model's prompts, an instruct finetune's own validation split, and the CLI."""

import itertools
import json
import math

import numpy as np
import pytest
from conftest import run_cli

from gptcli.errors import GptcliError
from gptcli.evals.generation import (
    GenerateRequest,
    baseline,
    eval_generate_checkpoint,
    read_generate_items,
)
from gptcli.evals.text_metrics import check_metrics, corpus_score, pass_at_k, score
from gptcli.infer.load import load
from gptcli.infer.session import GenerationSession, GenerationSettings
from gptcli.rewards import contains, exact_match, get_reward, normalize_answer, token_f1


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- rewards and metrics -----------------------------------------------------------------------


def test_squad_normalisation_exact_match_and_f1():
    assert normalize_answer("  The  Eiffel-Tower, in Paris! ") == "eiffeltower in paris"
    assert exact_match("the Eiffel tower.", ["Big Ben", "Eiffel Tower"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    # prediction "eiffel tower paris" against "eiffel tower": precision 2/3, recall 1 -> F1 0.8
    assert token_f1("Eiffel Tower, Paris", ["the Eiffel Tower"]) == pytest.approx(0.8)
    assert token_f1("paris", ["london", "Paris"]) == 1.0  # the best reference
    assert token_f1("", ["the"]) == 1.0 and token_f1("", ["x"]) == 0.0  # empty after normalisation: SQuAD 2.0
    assert contains("It is the Eiffel Tower.", ["eiffel tower"]) == 1.0
    assert contains("Eiffel Towers", ["eiffel tower"]) == 0.0  # whole words only


def test_a_users_reward_is_loaded_and_its_results_checked(tmp_path):
    (tmp_path / "mine.py").write_text("def longer(p, refs):\n    return len(p) > max(map(len, refs))\n"
                                      "def wild(p, refs):\n    return 7\n")
    assert get_reward(f"{tmp_path}/mine.py:longer")("abcd", ["ab"]) == 1.0
    with pytest.raises(GptcliError, match=r"returned 7; a reward is a number in \[0, 1\]"):
        get_reward(f"{tmp_path}/mine.py:wild")("a", ["b"])
    for name, message in (("nope", "unknown reward 'nope'"), (f"{tmp_path}/mine.py:absent", "no function 'absent'"),
                          (f"{tmp_path}/gone.py:f", "gone.py does not exist")):
        with pytest.raises(GptcliError, match=message):
            get_reward(name)


def test_rouge_bleu_and_chrf_are_the_libraries_own_numbers():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    sacrebleu = pytest.importorskip("sacrebleu")
    predictions = ["the cat sat on the mat", "a quick brown fox", "hello there world", ""]
    references = [["the cat is on the mat"], ["the quick brown fox jumps", "a fast brown fox"], ["hello world"],
                  ["nothing"]]
    result = score([[p] for p in predictions], references, ["rouge1", "rouge2", "rougeL", "bleu", "chrf"])
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for name in ("rouge1", "rouge2", "rougeL"):
        per_item = [scorer.score_multi(refs, p)[name].fmeasure for p, refs in zip(predictions, references)]
        assert result.metrics[name] == pytest.approx(np.mean(per_item))
        assert result.metrics[f"{name}_stderr"] == pytest.approx(np.std(per_item, ddof=1) / 2)
    # sacrebleu: a second reference stream, None where an item has one reference
    streams = [[refs[0] for refs in references], [None, "a fast brown fox", None, None]]
    assert result.metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, streams).score)
    assert result.metrics["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, streams).score)
    assert result.metrics["bleu_stderr"] > 0 and result.metrics["chrf_stderr"] > 0


def test_bleu_and_chrf_equal_the_harness_aggregations():
    metrics = pytest.importorskip("lm_eval.api.metrics", reason="lm-evaluation-harness is not installed")
    predictions = ["the cat sat on the mat", "a quick brown fox", "hello there world"]
    references = [["the cat is on the mat"], ["the quick brown fox jumps"], ["hello world"]]
    items = [(refs[0], p) for p, refs in zip(predictions, references)]  # the harness's (reference, prediction)
    assert corpus_score("bleu", predictions, references) == pytest.approx(metrics.bleu(items))
    assert corpus_score("chrf", predictions, references) == pytest.approx(metrics.chrf(items))


def test_pass_at_k_is_the_unbiased_estimator():
    """The chance that k samples drawn without replacement from n, c correct, hold a correct
    one: counted over every subset."""
    for n, c, k in ((5, 2, 1), (5, 2, 3), (6, 0, 2), (4, 4, 4), (10, 3, 5)):
        subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    result = score([["a", "b", "c"], ["x", "y", "z"]], [["c"], ["q"]], ["pass@1", "pass@2"])
    assert result.metrics["pass@1"] == pytest.approx((1 / 3 + 0) / 2)
    assert result.metrics["pass@2"] == pytest.approx((2 / 3 + 0) / 2)
    assert [r["pass@2"] for r in result.per_item] == pytest.approx([2 / 3, 0.0])


def test_metric_names_are_checked(monkeypatch):
    assert check_metrics(["exact_match", "pass@2"], samples=2) == ("exact_match", "pass@2")
    for names, samples, message in ((["bleurt"], 1, "unknown metric 'bleurt'"),
                                    (["pass@5"], 2, "pass@5 needs at least 5 samples per item; add --num-samples 5"),
                                    (["f1", "f1"], 1, "named twice"), ([], 1, "name at least one metric")):
        with pytest.raises(GptcliError, match=message):
            check_metrics(names, samples)
    monkeypatch.setitem(__import__("sys").modules, "sacrebleu", None)  # as if the extra were not installed
    with pytest.raises(GptcliError, match=r"bleu needs sacrebleu, an optional extra: pip install 'gptcli\[eval\]'"):
        check_metrics(["bleu"], 1)


# --- items ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("row, message", [
    ({"reference": "x"}, "no 'prompt' text or 'messages' list"),
    ({"prompt": "x"}, "no 'reference' text or 'references' list"),
    ({"prompt": "x", "references": []}, "'references' is empty"),
    ({"prompt": "x", "references": "y"}, "'references' must be a list of texts"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "reference": "a"},
     "end with an assistant turn"),
    ({"messages": [{"role": "robot", "content": "q"}], "reference": "a"}, "every message needs a 'role'"),
])
def test_bad_items_name_their_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "ok", "reference": "fine"}, row])
    with pytest.raises(GptcliError, match=rf"g.jsonl:2: .*{message}"):
        read_generate_items(path)


def test_the_no_model_baseline():
    items = read_like([{"prompt": "def read_config_file(path):"}, {"prompt": "def getHTTPResponse(x):"}])
    assert baseline(items) == ("the function's name as words", ["read config file", "get HTTPResponse"])
    assert baseline(read_like([{"prompt": "Summarise: it rained."}])) == ("the prompt copied", ["Summarise: it rained."])


def read_like(rows):
    from gptcli.evals.generation import item_of

    return [item_of({**row, "reference": "r"}, f"x:{i}") for i, row in enumerate(rows, start=1)]


# --- generating ----------------------------------------------------------------------------------

PROMPTS = ["def f(x):", "import os\n", "class A:", "# a comment", "x = [1, 2,", "while True:"]


def test_greedy_predictions_equal_gptcli_sample(lm_checkpoint, tmp_path, capsys):
    data = write_jsonl(tmp_path / "g.jsonl", [{"prompt": p, "reference": "x"} for p in PROMPTS])
    out = tmp_path / "pred.jsonl"
    code, stdout, err = run_cli(["eval", "-c", lm_checkpoint, "--task", "generate", "--data", data,
                                 "--max-new-tokens", "12", "--batch-size", "4", "--predictions", out, "--json"], capsys)
    assert code == 0, err
    metrics = json.loads(stdout.strip().splitlines()[-1])
    assert metrics["items"] == len(PROMPTS) and set(metrics) >= {"exact_match", "exact_match_stderr", "f1", "f1_stderr"}
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["prompt"] for line in lines] == PROMPTS and all(line["references"] == ["x"] for line in lines)
    for line in lines:
        code, sampled, _ = run_cli(["sample", "-c", lm_checkpoint, "-p", line["prompt"], "--temperature", "0",
                                    "-n", "12", "--raw"], capsys)
        assert code == 0 and sampled == line["prompt"] + line["prediction"] + "\n"
        assert len(line["prediction"]) > 0


def test_seeded_samples_equal_gptcli_samples_draws(lm_checkpoint, tmp_path, capsys):
    """Each item's samples are drawn as `gptcli sample --seed S --num-samples K` draws them,
    whatever else decodes beside them."""
    data = write_jsonl(tmp_path / "g.jsonl", [{"prompt": p, "reference": "x"} for p in PROMPTS[:3]])
    out = tmp_path / "pred.jsonl"
    code, _, err = run_cli(["eval", "-c", lm_checkpoint, "--task", "generate", "--data", data, "--max-new-tokens",
                            "8", "--temperature", "1", "--seed", "7", "--num-samples", "3", "--metrics",
                            "pass@1,pass@3", "--predictions", out], capsys)
    assert code == 0, err
    for line in map(json.loads, out.read_text().splitlines()):
        code, sampled, _ = run_cli(["sample", "-c", lm_checkpoint, "-p", line["prompt"], "--temperature", "1",
                                    "--seed", "7", "--num-samples", "3", "-n", "8", "--json"], capsys)
        assert [json.loads(s)["text"] for s in sampled.strip().splitlines()] == line["samples"]
        assert line["prediction"] == line["samples"][0] and line["pass@3"] in (0.0, 1.0)


def test_a_chat_model_answers_through_its_chat_format(chat_checkpoint, tmp_path):
    data = write_jsonl(tmp_path / "g.jsonl", [
        {"prompt": "hello", "reference": "x"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
         "references": ["y", "z"]}])
    _, metrics = eval_generate_checkpoint(chat_checkpoint, GenerateRequest(
        str(data), max_new_tokens=6, predictions=tmp_path / "p.jsonl"))
    session = GenerationSession(load(chat_checkpoint))
    expected = session.generate(session.prompt("hello"), GenerationSettings(max_new_tokens=6, temperature=0.0))
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert lines[0]["prediction"] == expected[0].text and "messages" in lines[1]
    with pytest.raises(GptcliError, match=r"g.jsonl:2: --raw continues text"):
        eval_generate_checkpoint(chat_checkpoint, GenerateRequest(str(data), raw=True))


def test_prompts_keep_their_last_tokens_to_leave_room_for_the_answer(lm_checkpoint):
    session = GenerationSession(load(lm_checkpoint))
    prompt = session.fit(session.prompt("y" * 100), max_new_tokens=24)  # a 64-token context
    assert len(prompt.ids) == 40 and prompt.cropped == 60
    with pytest.raises(GptcliError, match="--max-new-tokens 64 leaves no room for a prompt"):
        session.fit(prompt, 64)


def test_the_cli_refuses_bad_requests_in_one_line(lm_checkpoint, tmp_path, capsys):
    data = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "a", "reference": "b"}, {"prompt": "c"}])
    good = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "a", "reference": "b"}])
    for args, message in (
            (["--task", "generate", "--data", data], "g.jsonl:2: no 'reference' text"),
            (["--task", "generate", "--data", good, "--metrics", "bleurt"], "unknown metric 'bleurt'"),
            (["--task", "generate", "--data", good, "--metrics", "pass@2"], "add --num-samples 2"),
            (["--task", "generate", "--data", good, "--temperature", "-1"], "--temperature must be 0"),
            (["--task", "generate", "--data", good, "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
            (["--task", "generate", "--data", good, "--max-new-tokens", "64"], "leaves no room for a prompt"),
            (["--task", "generate", "--data", good, "--reward", "nope"], "unknown reward"),
            (["--task", "generate"], "is not an instruct finetune"),
            (["--task", "choice", "--data", good, "--metrics", "f1"], "--metrics: for --task generate"),
            (["--task", "generate", "--data", good, "--predictions", good], "would overwrite the input")):
        code, _, err = run_cli(["eval", "-c", lm_checkpoint, *args], capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, (args, err)
    assert json.loads(good.read_text()) == {"prompt": "a", "reference": "b"}


def test_metrics_of_a_generation_are_consistent_with_its_predictions(lm_checkpoint, tmp_path):
    """Items whose reference is the model's own greedy answer (changed in case and
    punctuation) score 1 on exact match; the others 0."""
    session = GenerationSession(load(lm_checkpoint))
    settings = GenerationSettings(max_new_tokens=10, temperature=0.0)
    answers = [session.generate(session.prompt(p), settings)[0].text for p in PROMPTS]
    rows = [{"prompt": p, "reference": (a.upper() + "!") if i % 2 else "zzz"}
            for i, (p, a) in enumerate(zip(PROMPTS, answers))]
    _, metrics = eval_generate_checkpoint(lm_checkpoint, GenerateRequest(
        str(write_jsonl(tmp_path / "g.jsonl", rows)), max_new_tokens=10))
    assert metrics["exact_match"] == pytest.approx(0.5)
    assert metrics["exact_match_stderr"] == pytest.approx(np.std([0, 1] * 3, ddof=1) / math.sqrt(6))
    assert metrics["generated_tokens"] > 0 and metrics["items_per_second"] > 0


def test_a_draft_gives_the_same_greedy_answers(lm_checkpoint, tmp_path, capsys):
    """--draft decodes the items one at a time, speculatively: the same answers and scores,
    with how the guesses fared; refused with --num-samples above 1 and without --task."""
    data = write_jsonl(tmp_path / "g.jsonl", [{"prompt": p, "reference": "x"} for p in PROMPTS])
    args = ["eval", "-c", lm_checkpoint, "--task", "generate", "--data", data, "--max-new-tokens", "12", "--json"]
    code, plain, err = run_cli([*args, "--predictions", tmp_path / "plain.jsonl"], capsys)
    assert code == 0, err
    for draft in ("ngram", str(lm_checkpoint)):
        code, stdout, err = run_cli([*args, "--predictions", tmp_path / "spec.jsonl", "--draft", draft], capsys)
        assert code == 0, err
        assert (tmp_path / "spec.jsonl").read_text() == (tmp_path / "plain.jsonl").read_text()
        metrics = json.loads(stdout.strip().splitlines()[-1])
        assert metrics["exact_match"] == json.loads(plain.strip().splitlines()[-1])["exact_match"]
        assert metrics["speculation"]["verifications"] > 0
    code, _, err = run_cli([*args, "--draft", "ngram", "--num-samples", "2"], capsys)
    assert code == 2 and "--draft speeds up one sample at a time" in err
    code, _, err = run_cli(["eval", "-c", lm_checkpoint, "--draft", "ngram"], capsys)
    assert code == 2 and "--draft/--draft-tokens: for --task generate" in err
