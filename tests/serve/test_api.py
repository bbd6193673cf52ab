"""`gptcli serve` through the official `openai` client and plain HTTP: the same text as
`gptcli sample`, streamed or not; usage counts; batching under concurrent requests; every
bad request answered with its status and OpenAI's error JSON; the API key; lost clients
freeing their rows; start-up errors; shutdown on SIGTERM."""

import http.client
import json
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
from conftest import run_cli
from serving import CONTEXT, random_model, request, start_server

openai = pytest.importorskip("openai")


from gptcli.config import FinetuneRunConfig, config_from_dict, dump_yaml  # noqa: E402
from gptcli.data.tokenizers.tokenizer import BytesTokenizer  # noqa: E402
from gptcli.model.heads import GPTClassifier  # noqa: E402
from gptcli.store.checkpoint import save_checkpoint  # noqa: E402

N = 12  # tokens per answer: prompts and answers stay inside the 64-token context


@pytest.fixture(scope="module")
def lm_server(lm_checkpoint, tmp_path_factory):
    server = start_server(lm_checkpoint, "--max-batch", "8", log_dir=tmp_path_factory.mktemp("lm-log"))
    yield server
    assert server.stop() == 0, server.log()
    assert "Traceback" not in server.log()


@pytest.fixture(scope="module")
def chat_server(chat_checkpoint, tmp_path_factory):
    server = start_server(chat_checkpoint, log_dir=tmp_path_factory.mktemp("chat-log"))
    yield server
    assert server.stop() == 0, server.log()


def client(server, key: str = "unused") -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.api, api_key=key, max_retries=0)


def sampled(checkpoint, prompt: str, capsys, *options: str) -> list[str]:
    """The texts `gptcli sample --json` gives."""
    code, out, err = run_cli(["sample", "-c", checkpoint, "-p", prompt, "-n", str(N), "--json",
                              "--device", "cpu", *options], capsys)
    assert code == 0, err
    return [json.loads(line)["text"] for line in out.splitlines()]


# --- the same text as sample ------------------------------------------------------------


@pytest.mark.parametrize("options, sampling", [
    (("--greedy",), {"temperature": 0}),
    (("--temperature", "0.9", "--top-p", "0.9", "--seed", "7"), {"temperature": 0.9, "top_p": 0.9, "seed": 7}),
])
def test_completion_equals_sample_streamed_or_not(lm_server, lm_checkpoint, capsys, options, sampling):
    (expected,) = sampled(lm_checkpoint, "To be", capsys, *options)
    api = client(lm_server)
    whole = api.completions.create(model="base", prompt="To be", max_tokens=N, **sampling)
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (5, N, 5 + N)
    chunks = list(api.completions.create(model="base", prompt="To be", max_tokens=N, stream=True, **sampling))
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # it streamed
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_choices_equal_sample_num_samples(lm_server, lm_checkpoint, capsys):
    expected = sampled(lm_checkpoint, "abc", capsys, "--num-samples", "3", "--seed", "3", "--temperature", "1")
    answer = client(lm_server).completions.create(model="base", prompt="abc", max_tokens=N, n=3, seed=3,
                                                  temperature=1)
    assert [c.text for c in sorted(answer.choices, key=lambda c: c.index)] == expected
    assert len(set(expected)) == 3 and answer.usage.completion_tokens == 3 * N


def test_chat_completion_equals_sample_on_the_chat_model(chat_server, chat_checkpoint, capsys):
    (expected,) = sampled(chat_checkpoint, "Hello there", capsys, "--greedy")
    api = client(chat_server)
    messages = [{"role": "user", "content": "Hello there"}]
    whole = api.chat.completions.create(model="assistant", messages=messages, max_tokens=N, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content == expected
    chunks = list(api.chat.completions.create(model="assistant", messages=messages, max_tokens=N, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_strings_end_the_text(lm_server, lm_checkpoint, capsys):
    (free,) = sampled(lm_checkpoint, "To be", capsys, "--greedy")
    stop = free[3:5]  # a string the greedy text is known to contain
    answer = client(lm_server).completions.create(model="base", prompt="To be", max_tokens=N, temperature=0,
                                                  stop=[stop])
    assert answer.choices[0].text == free[:free.index(stop)] and answer.choices[0].finish_reason == "stop"


def test_concurrent_requests_get_the_answers_they_get_alone(lm_server):
    """Sixteen prompts at once (8 rows: some wait, rows are reused) give what each gives alone."""
    prompts = [f"prompt number {i} " * (1 + i % 3) for i in range(16)]
    api = client(lm_server)

    def complete(prompt: str, stream: bool) -> str:
        kwargs = {"model": "base", "prompt": prompt, "max_tokens": N, "temperature": 0}
        if stream:
            return "".join(c.choices[0].text for c in api.completions.create(stream=True, **kwargs))
        return api.completions.create(**kwargs).choices[0].text

    alone = [complete(p, False) for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(complete, prompts, [i % 2 == 0 for i in range(16)]))
    assert together == alone and len(set(alone)) > 1


def test_a_list_of_prompts_answers_each(lm_server):
    api = client(lm_server)
    one = [api.completions.create(model="base", prompt=p, max_tokens=4, temperature=0).choices[0].text
           for p in ("ab", "xyz")]
    both = api.completions.create(model="base", prompt=["ab", "xyz"], max_tokens=4, temperature=0)
    assert [c.text for c in sorted(both.choices, key=lambda c: c.index)] == one


def test_max_tokens_is_clipped_to_the_context(lm_server):
    answer = client(lm_server).completions.create(model="base", prompt="a" * 60, max_tokens=1000, temperature=0)
    assert answer.usage.completion_tokens == CONTEXT - 60 and answer.choices[0].finish_reason == "length"


def test_models_health_and_page(lm_server):
    models = client(lm_server).models.list()
    assert [m.id for m in models.data] == ["base"]
    status, health = request(f"{lm_server.url}/health")
    assert status == 200 and health["status"] == "ok" and health["running"] == 0
    parts = urlsplit(lm_server.url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    connection.request("GET", "/")
    response = connection.getresponse()
    assert response.status == 200 and "text/html" in response.getheader("content-type")
    assert b"<html" in response.read().lower()


def test_a_server_with_a_draft_answers_as_sample_and_reports_its_guesses(serve_process, lm_checkpoint, capsys):
    """--draft: the model as its own draft (always right) and prompt lookup; greedy answers
    equal `sample`'s, alone and four at once (batched, then each finishing alone), and
    /health counts the verifications."""
    prompts = ["To be", "abcabcabc", "def f(x):", "1, 2, 3, "]
    expected = [sampled(lm_checkpoint, prompt, capsys, "--greedy")[0] for prompt in prompts]
    for draft in (str(lm_checkpoint), "ngram"):
        server = serve_process(lm_checkpoint, "--draft", draft, "--draft-tokens", "3")
        api = client(server)
        alone = api.completions.create(model="base", prompt=prompts[0], max_tokens=N, temperature=0)
        assert alone.choices[0].text == expected[0]
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda p: api.completions.create(model="base", prompt=p, max_tokens=N,
                                                                     temperature=0), prompts))
        assert [a.choices[0].text for a in answers] == expected
        status, health = request(f"{server.url}/health")
        spec = health["speculation"]
        assert status == 200 and spec["draft"] == draft and spec["draft_tokens"] == 3 and spec["verifications"] > 0
        if draft != "ngram":
            assert spec["acceptance_rate"] == 1.0 and spec["tokens_per_verification"] > 3  # k + 1 but at the budget
        assert server.stop() == 0 and "Traceback" not in server.log()


# --- bad requests -----------------------------------------------------------------------

BAD = [  # (path, body, status, param, words in the message)
    ("/v1/completions", b"{not json", 400, None, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, None, "must be a JSON object"),
    ("/v1/completions", b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400, None, "not valid JSON"),
    ("/v1/completions", b'{"prompt": "a", "max_tokens": 1' + b"0" * 5000 + b"}", 400, None, "not valid JSON"),
    ("/v1/completions", b'{"prompt": "a\\ud800"}', 400, None, "the prompt is not valid UTF-8 text (character 1"),
    ("/v1/completions", {"prompt": 3}, 400, "prompt", "a string or a list of strings"),
    ("/v1/completions", {"prompt": "a", "max_tokens": "10"}, 400, "max_tokens", "valid integer"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens", "at least 1"),
    ("/v1/completions", {"prompt": "a", "temperature": 3}, 400, "temperature", "between 0 and 2"),
    ("/v1/completions", {"prompt": "a", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ("/v1/completions", {"prompt": "a", "stream": "yes"}, 400, "stream", "valid boolean"),
    ("/v1/completions", {"prompt": "a", "n": 9}, 400, "n", "between 1 and 8"),
    ("/v1/completions", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ("/v1/completions", {"prompt": "a", "seed": -1}, 400, "seed", "2**64"),
    ("/v1/completions", {"prompt": "a", "echo": True}, 400, "echo", "not supported"),
    ("/v1/completions", {"prompt": "a", "max_completion_tokens": -3}, 400, "max_completion_tokens", "at least 1"),
    ("/v1/completions", {"prompt": "a", "max_completion_tokens": 2.5}, 400, "max_completion_tokens",
     "valid integer"),
    ("/v1/completions", {"prompt": "a", "logprobs": 0}, 400, "logprobs", "not supported"),
    ("/v1/completions", {"prompt": "a", "top_logprobs": 2}, 400, "top_logprobs", "not supported"),
    ("/v1/completions", {"prompt": "a", "response_format": {"type": "json_object"}}, 400, "response_format",
     "not supported"),
    ("/v1/completions", {"prompt": "a", "response_format": "json"}, 400, "response_format", "valid dictionary"),
    ("/v1/completions", {"prompt": "a", "temperature": -0.5}, 400, "temperature", "between 0 and 2"),
    ("/v1/completions", {"prompt": "a", "n": 0}, 400, "n", "between 1 and 8"),
    ("/v1/completions", {"prompt": "a", "stop": [1]}, 400, "stop", "a string or a list of up to 4 strings"),
    ("/v1/completions", {"prompt": "a", "stop": ""}, 400, "stop", "non-empty strings"),
    ("/v1/completions", {"prompt": "a", "model": "gpt-4"}, 404, "model", "does not exist"),
    ("/v1/completions", {"prompt": "x" * 64}, 400, None, "context is 64"),
    ("/v1/completions", {"prompt": "a<|endoftext|>"}, 400, None, "special token"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "messages",
     "no chat template"),
    ("/v1/classify", {"input": "hi"}, 400, None, "not a classifier"),
    ("/v1/nothing", {"prompt": "a"}, 404, None, "Not Found"),
    ("/v1/models", {"prompt": "a"}, 405, None, "Method Not Allowed"),
]


@pytest.mark.parametrize("path, body, status, param, words", BAD, ids=[f"{b[0]}-{b[3]}-{b[4]}" for b in BAD])
def test_bad_requests_get_their_status_and_error_json(lm_server, path, body, status, param, words):
    got, answer = request(lm_server.url + path, body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert words in error["message"]


def test_a_tiny_temperature_is_greedy_and_head_requests_answer(lm_server):
    body = {"prompt": "ab", "max_tokens": 5}
    greedy = request(f"{lm_server.api}/completions", {**body, "temperature": 0})[1]["choices"][0]["text"]
    status, answer = request(f"{lm_server.api}/completions", {**body, "temperature": 1e-300})
    assert status == 200 and answer["choices"][0]["text"] == greedy
    for path in ("/health", "/v1/models"):
        parts = urlsplit(lm_server.url)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        connection.request("HEAD", path)
        assert connection.getresponse().status == 200


def test_chat_message_errors(chat_server):
    for body, param in (({"messages": []}, "messages"),
                        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
                        ({"messages": [{"role": "user", "content": "a<|end|>"}]}, None)):
        status, answer = request(f"{chat_server.api}/chat/completions", body)
        assert status == 400 and answer["error"]["param"] == param, answer


CHAT_BAD = [  # (fields over a valid body, param, words in the message)
    ({"max_completion_tokens": -3}, "max_completion_tokens", "at least 1"),
    ({"max_completion_tokens": "3"}, "max_completion_tokens", "valid integer"),
    ({"max_tokens": 0}, "max_tokens", "at least 1"),
    ({"stream": 1}, "stream", "valid boolean"),
    ({"tool_choice": "auto"}, "tool_choice", "not supported"),
    ({"functions": [{"name": "f"}]}, "functions", "not supported"),
    ({"function_call": "auto"}, "function_call", "not supported"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "not supported"),
    ({"logprobs": True}, "logprobs", "not supported"),
    ({"top_logprobs": 3}, "top_logprobs", "not supported"),
    ({"messages": [{"role": "user", "content": "hi", "name": 3}]}, "messages", "'messages.0.name'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages", "messages.0.content"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]}, "messages",
     "tool calls are not supported"),
]


@pytest.mark.parametrize("fields, param, words", CHAT_BAD, ids=[f"{b[1]}-{b[2]}" for b in CHAT_BAD])
def test_bad_chat_fields_get_400_naming_them(chat_server, fields, param, words):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}
    status, answer = request(f"{chat_server.api}/chat/completions", body)
    assert status == 400 and answer["error"]["param"] == param and words in answer["error"]["message"], answer


def test_the_budget_fields_and_neutral_values_are_read(lm_server, chat_server):
    """max_completion_tokens is read on both routes (on completions it was ignored: 16 tokens
    came back); neutral values of the unsupported fields pass."""
    status, answer = request(f"{lm_server.api}/completions", {"prompt": "ab", "max_completion_tokens": 3,
                                                              "temperature": 0, "logprobs": None,
                                                              "response_format": {"type": "text"}})
    assert status == 200 and answer["usage"]["completion_tokens"] == 3, answer
    status, answer = request(f"{chat_server.api}/chat/completions", {
        "messages": [{"role": "user", "content": "hi", "name": "ann"}], "max_tokens": 9, "max_completion_tokens": 1,
        "tool_choice": "none", "logprobs": False, "top_logprobs": 0, "temperature": 0})
    assert status == 200 and answer["usage"]["completion_tokens"] == 1, answer


def post_raw(server, path: str, body: bytes, content_type: str | None) -> tuple[int, dict]:
    """POST `body` with exactly this Content-Type header (None: no header at all)."""
    parts = urlsplit(server.url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.request("POST", path, body=body, headers={} if content_type is None else
                           {"Content-Type": content_type})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/classify"])
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_a_body_that_is_not_declared_json_gets_415(lm_server, path, content_type):
    status, answer = post_raw(lm_server, path, b'{"prompt": "a", "max_tokens": 2}', content_type)
    assert status == 415, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and "Content-Type: application/json" in error["message"]


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON", None])
def test_json_bodies_and_bodies_without_a_content_type_are_read(lm_server, content_type):
    status, answer = post_raw(lm_server, "/v1/completions", b'{"prompt": "a", "max_tokens": 2}', content_type)
    assert status == 200 and answer["usage"]["completion_tokens"] == 2, answer


def test_bodies_over_the_limit_get_413(serve_process, lm_checkpoint):
    server = serve_process(lm_checkpoint, "--max-body", "2048")
    status, answer = request(f"{server.api}/completions", {"prompt": "a" * 4000})
    assert status == 413 and "--max-body" in answer["error"]["message"]
    assert request(f"{server.api}/completions", {"prompt": "a", "max_tokens": 2})[0] == 200


def test_the_api_key_is_required(serve_process, lm_checkpoint):
    for server in (serve_process(lm_checkpoint, "--api-key", "s3cret"),
                   serve_process(lm_checkpoint, env={"GPTCLI_API_KEY": "s3cret"})):
        body = {"prompt": "a", "max_tokens": 2}
        assert request(f"{server.api}/completions", body)[0] == 401
        status, answer = request(f"{server.api}/completions", body, headers={"Authorization": "Bearer nope"})
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        assert request(f"{server.api}/completions", body, headers={"Authorization": "Bearer s3cret"})[0] == 200
        with pytest.raises(openai.AuthenticationError):
            client(server, "wrong").models.list()
        assert client(server, "s3cret").models.list().data[0].id == "base"
        assert request(f"{server.url}/health")[0] == 200  # open to load balancers


# --- classifiers ------------------------------------------------------------------------


MEAN_POOLED = dump_yaml(config_from_dict({"finetune": {"task": "classify", "pooling": "mean", "long_text": "pool",
                                                         "pool_stride": 16}}, FinetuneRunConfig))


@pytest.mark.parametrize("config", ["# cls\n", MEAN_POOLED], ids=["last-token", "mean-pooled-windows"])
def test_a_classifier_serves_classify(serve_process, tmp_path, capsys, config):
    """Served probabilities equal `gptcli sample`'s, which reads texts and pools states as
    the checkpoint's config.yaml says (a long text here: five windows when pooled)."""
    checkpoint = save_checkpoint(tmp_path / "sentiment", GPTClassifier(random_model(257), ["neg", "pos"]),
                                 BytesTokenizer(), config)
    long_text = "great film, " * 10  # 120 bytes, past the context
    assert len(long_text) > CONTEXT
    code, out, err = run_cli(["sample", "-c", checkpoint, "-p", long_text, "--json", "--device", "cpu"], capsys)
    expected = json.loads(out)
    server = serve_process(checkpoint)
    status, answer = request(f"{server.api}/classify", {"input": [long_text, "awful"]})
    assert status == 200 and [d["index"] for d in answer["data"]] == [0, 1]
    assert answer["data"][0]["label"] == expected["label"]
    assert answer["data"][0]["probabilities"] == pytest.approx(expected["probs"], abs=1e-6)
    status, answer = request(f"{server.api}/completions", {"prompt": "a"})
    assert status == 400 and "classifier" in answer["error"]["message"]
    status, answer = request(f"{server.api}/classify", {"input": []})
    assert status == 400 and answer["error"]["param"] == "input", answer


def test_the_two_readings_give_different_answers(tmp_path):
    """What makes the test above able to fail: the two readings give different probabilities."""
    from gptcli.infer.load import load

    text = "great film, " * 10
    probs = []
    for name, config in (("last", "# cls\n"), ("mean", MEAN_POOLED)):
        path = save_checkpoint(tmp_path / name, GPTClassifier(random_model(257), ["neg", "pos"]), BytesTokenizer(),
                               config)
        probs.append(load(path, "cpu").probabilities(text)["pos"])
    assert abs(probs[0] - probs[1]) > 1e-3


# --- lost clients, shutdown, start-up ---------------------------------------------------


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory):
    """A model with a long context that never ends a text, so that one answer takes seconds."""
    return save_checkpoint(tmp_path_factory.mktemp("long") / "long", endless_model(8192), BytesTokenizer(),
                           "# long\n")


def endless_model(block_size: int):
    """A random model whose end-of-text logit is always about -1000: the final norm's first
    output is a constant 10 and the (tied) end-of-text row weighs it by -100."""
    import torch

    from gptcli.config import ModelConfig
    from gptcli.model.gpt import GPT

    model = random_model(257)
    grown = GPT(ModelConfig(**{**vars(model.config), "block_size": block_size}))
    grown.load_state_dict({k: v for k, v in model.state_dict().items() if k != "wpe.weight"}, strict=False)
    with torch.no_grad():
        grown.ln_f.weight[0], grown.ln_f.bias[0] = 0.0, 10.0
        grown.lm_head.weight[BytesTokenizer.eot_id, 0] = -100.0
    return grown


def open_stream(server, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    parts = urlsplit(server.url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    connection.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                       headers={"Content-Type": "application/json"})
    return connection, connection.getresponse()


def wait_for_health(server, check, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = request(f"{server.url}/health")[1]
        if check(health) or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


def test_a_lost_stream_frees_its_row(serve_process, long_checkpoint):
    server = serve_process(long_checkpoint, "--max-batch", "1")
    connection, response = open_stream(server, {"prompt": "a", "max_tokens": 8000})
    assert response.readline().startswith(b"data: ")
    assert request(f"{server.url}/health")[1]["running"] == 1
    connection.close()  # the client goes away mid-stream
    health = wait_for_health(server, lambda h: h["running"] == 0)
    assert health["running"] == 0 and health["finished"] == {"cancelled": 1}
    # The row is free: a new request is answered at once.
    status, answer = request(f"{server.api}/completions", {"prompt": "b", "max_tokens": 3}, timeout=10)
    assert status == 200 and answer["usage"]["completion_tokens"] == 3


def test_a_lost_non_streamed_request_frees_its_row(serve_process, long_checkpoint):
    server = serve_process(long_checkpoint, "--max-batch", "1")
    parts = urlsplit(server.url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    connection.request("POST", "/v1/completions", body=json.dumps({"prompt": "a", "max_tokens": 8000}),
                       headers={"Content-Type": "application/json"})
    wait_for_health(server, lambda h: h["running"] == 1)
    connection.close()
    health = wait_for_health(server, lambda h: h["running"] == 0)
    assert health["finished"] == {"cancelled": 1}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_lets_a_short_stream_finish_and_exits_0(serve_process, lm_checkpoint, sig):
    server = serve_process(lm_checkpoint)
    connection, response = open_stream(server, {"prompt": "a", "max_tokens": 40})
    server.process.send_signal(sig)
    body = response.read()
    assert body.rstrip().endswith(b"data: [DONE]")
    assert server.process.wait(30) == 0


@pytest.mark.slow
def test_sigterm_cuts_long_streams_after_the_timeout_and_exits_0(serve_process, long_checkpoint):
    server = serve_process(long_checkpoint, "--shutdown-timeout", "0.5")
    connection, response = open_stream(server, {"prompt": "a", "max_tokens": 8000})
    response.readline()
    started = time.monotonic()
    threading.Timer(0.1, server.process.send_signal, [signal.SIGTERM]).start()
    assert server.process.wait(30) == 0
    assert time.monotonic() - started < 15
    try:
        rest = response.read()
    except http.client.IncompleteRead as cut:  # the connection closed inside a chunk
        rest = cut.partial
    assert b"[DONE]" not in rest


@pytest.mark.slow
def test_requests_still_going_after_the_shutdown_timeout_get_503_or_an_error_event(serve_process,
                                                                                  long_checkpoint):
    server = serve_process(long_checkpoint, "--shutdown-timeout", "1")
    parts = urlsplit(server.url)
    whole = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    whole.request("POST", "/v1/completions", body=json.dumps({"prompt": "a", "max_tokens": 8000}),
                  headers={"Content-Type": "application/json"})
    connection, streamed = open_stream(server, {"prompt": "a", "max_tokens": 8000})
    wait_for_health(server, lambda h: h["running"] == 2)
    server.process.send_signal(signal.SIGTERM)
    response = whole.getresponse()
    assert response.status == 503 and "shutting down" in json.loads(response.read())["error"]["message"]
    events = streamed.read().decode().strip().split("\n\n")
    assert "shutting down" in json.loads(events[-1].removeprefix("data: "))["error"]["message"]
    assert server.process.wait(30) == 0
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("args, message", [
    (["-c", "{tmp}/missing"], "missing"),
    (["-c", "{lm}", "--max-batch", "0"], "--max-batch must be at least 1"),
    (["-c", "{lm}", "--port", "70000"], "--port must be 0..65535"),
    (["-c", "{lm}", "--precision", "fp8"], "--precision"),
    (["-c", "{lm}", "--draft", "ngram", "--draft-tokens", "17"], "--draft-tokens must be 1..16, got 17"),
    (["-c", "{lm}", "--draft", "{tmp}/missing"], "--draft: "),
    (["-c", "{cls}", "--draft", "ngram"], "--draft speeds up generation; .* is a classifier"),
])
def test_start_up_errors_are_one_line_exit_2(tmp_path, lm_checkpoint, capsys, args, message):
    classifier = save_checkpoint(tmp_path / "cls", GPTClassifier(random_model(BytesTokenizer.vocab_size), ["a", "b"]),
                                 BytesTokenizer(), "# cls\n")
    args = [a.format(tmp=tmp_path, lm=lm_checkpoint, cls=classifier) for a in args]
    code, out, err = run_cli(["serve", *args, "--device", "cpu"], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err


def test_a_port_in_use_is_one_line_exit_2(lm_server, lm_checkpoint, capsys):
    port = str(urlsplit(lm_server.url).port)
    code, out, err = run_cli(["serve", "-c", lm_checkpoint, "--port", port, "--device", "cpu"], capsys)
    assert code == 2 and "pick another with --port" in err and len(err.strip().splitlines()) == 1


def test_a_missing_extra_names_it(monkeypatch):
    import importlib.util

    from gptcli.errors import GptcliError
    from gptcli.serve.run import require_serve_extra

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    with pytest.raises(GptcliError, match=r"pip install 'gptcli\[serve\]'"):
        require_serve_extra()
