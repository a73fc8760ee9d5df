"""The OpenAI-compatible server, tested over HTTP against real servers on 127.0.0.1 (tests/chat_server.py): answers
equal what the engine computes for the same request, in OpenAI's shapes, through raw HTTP and the `openai` client;
bad requests get 4xx in OpenAI's error shape; concurrency, the 429 limit, disconnects and the API key."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import openai
import pytest
import requests
import torch
from chat_server import API_KEY, CONTEXT, start_server, stop_server

from nanochat_flyte.cli.serve import main
from nanochat_flyte.errors import UserError
from nanochat_flyte.inference.engine import Engine, SamplingParams
from nanochat_flyte.inference.serve import model_name_of

HELLO = [{"role": "user", "content": "Hello there"}]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def chat_engine(chat_checkpoint):
    return Engine.from_checkpoint(chat_checkpoint, "cpu")


@pytest.fixture(scope="module")
def base_engine(base_checkpoint):
    return Engine.from_checkpoint(base_checkpoint, "cpu")


def expected(engine: Engine, messages: list[dict], **params) -> str:
    """The engine's answer to the request, computed here, in the test process."""
    return engine.generate_batch([engine.chat_prompt(messages)], SamplingParams(**params))[0].text


def post(server, body, headers=None, timeout=60, **kwargs):
    return requests.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=timeout, **kwargs)


def sse_events(response) -> Iterator[dict | str]:
    """The data of each server-sent event as it arrives: parsed JSON, or the final "[DONE]"."""
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            yield data if data == "[DONE]" else json.loads(data)
        else:
            assert line == "", f"not server-sent events: {line!r}"


def streamed_text(server, body, headers=None) -> str:
    with post(server, {**body, "stream": True}, headers, stream=True) as response:
        assert response.status_code == 200, response.text
        events = list(sse_events(response))
    assert events[-1] == "[DONE]"
    return "".join(event["choices"][0]["delta"].get("content", "") for event in events[:-1] if event["choices"])


# ---------------------------------------------------------------------------- completions


def test_a_non_streamed_completion(chat_server, chat_engine):
    response = post(chat_server, {"model": "anything", "messages": HELLO, "max_tokens": 12, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.headers["X-Nanochat-Mode"] == "chat"
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == chat_server.health()["model"] and body["system_fingerprint"] == "nanochat-flyte-chat"
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected(chat_engine, HELLO, max_tokens=12)}
    assert choice["finish_reason"] == "length"
    prompt_tokens = len(chat_engine.chat_prompt(HELLO))
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 12,
                             "total_tokens": prompt_tokens + 12}


def test_a_streamed_completion_arrives_token_by_token(chat_server, chat_engine):
    messages = [{"role": "system", "content": "Answer briefly."}, *HELLO, {"role": "assistant", "content": "Hi!"},
                {"role": "user", "content": "Tell me about the sea."}]
    request = {"messages": messages, "max_completion_tokens": 20, "temperature": 0.9, "seed": 5, "stream": True,
               "stream_options": {"include_usage": True}}
    with post(chat_server, request, stream=True) as response:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(response))
    first, *content, last, usage, done = events
    assert done == "[DONE]"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len({event["id"] for event in events[:-1]}) == 1
    assert all(event["object"] == "chat.completion.chunk" for event in events[:-1])
    deltas = [event["choices"][0]["delta"]["content"] for event in content]
    assert len(deltas) == 20  # one chunk per token: plain ASCII words, no stop strings to hold text back
    assert "".join(deltas) == expected(chat_engine, messages, max_tokens=20, temperature=0.9, top_k=50, seed=5)
    assert last["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length", "logprobs": None}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 20


def test_stop_strings_end_the_answer(chat_server, chat_engine):
    full = expected(chat_engine, HELLO, max_tokens=12)
    stop = full.split()[2]  # the third word of the answer
    body = post(chat_server, {"messages": HELLO, "max_tokens": 12, "temperature": 0, "stop": [stop, "zzz"]}).json()
    assert body["choices"][0]["message"]["content"] == full[:full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"
    assert streamed_text(chat_server, {"messages": HELLO, "max_tokens": 12, "temperature": 0, "stop": stop,
                                       "stream_options": {"include_usage": None}}) == full[:full.index(stop)]


def test_the_openai_client(chat_server, chat_engine):
    client = openai.OpenAI(base_url=f"{chat_server.url}/v1", api_key="not-needed", max_retries=0)
    (model,) = client.models.list().data
    assert model.id == chat_server.health()["model"]
    answer = expected(chat_engine, HELLO, max_tokens=10)
    completion = client.chat.completions.create(model=model.id, messages=HELLO, max_tokens=10, temperature=0)
    assert completion.choices[0].message.content == answer
    assert completion.usage.completion_tokens == 10
    stream = client.chat.completions.create(model=model.id, messages=HELLO, max_tokens=10, temperature=0,
                                            stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == answer
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=model.id, messages=HELLO, n=2)
    assert refused.value.status_code == 400 and refused.value.body["param"] == "n"


def test_eight_concurrent_streams_are_all_correct_and_never_mixed(chat_server, chat_engine):
    # Sampled answers (greedy answers of this tiny model are all alike) to prompts of different lengths. The model
    # often ends its text early: of 32 candidates, the 8 longest answers are asked, so that the streams overlap.
    # The expected answers come from one engine batch (tests/test_engine.py shows batched rows equal rows alone).
    words = ["cat", "river", "teacher", "moon", "road", "song", "city", "map"]
    candidates = [[{"role": "user", "content": f"Story {i}: the {words[i % 8]}" + " again" * (i % 5)}]
                  for i in range(32)]
    params = [{"max_tokens": 100, "temperature": 0.8, "top_k": 40, "seed": i} for i in range(32)]
    completions = chat_engine.generate_batch([chat_engine.chat_prompt(c) for c in candidates],
                                             [SamplingParams(**p) for p in params])
    longest = sorted(range(32), key=lambda i: -len(completions[i].tokens))[:8]
    assert len(completions[longest[-1]].tokens) >= 30
    requests_ = [{"messages": candidates[i], **params[i]} for i in longest]
    answers = [completions[i].text for i in longest]
    assert len(set(answers)) == 8
    results, spans = [None] * 8, [None] * 8
    start = threading.Barrier(8)

    def run(index: int) -> None:
        start.wait()
        with post(chat_server, {**requests_[index], "stream": True}, stream=True) as response:
            text, first = "", None
            for event in sse_events(response):
                if event != "[DONE]" and event["choices"] and event["choices"][0]["delta"].get("content"):
                    first = first or time.monotonic()
                    text += event["choices"][0]["delta"]["content"]
            results[index], spans[index] = text, (first, time.monotonic())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == answers
    assert max(first for first, _ in spans) < min(end for _, end in spans), spans  # all 8 streamed at once


# ---------------------------------------------------------------------------- bad requests


LONG = [{"role": "user", "content": "The cat sees a small boat. " * (CONTEXT // 4)}]


@pytest.mark.parametrize("body, status, param, fragment", [
    ({"messages": []}, 400, "messages", "non-empty list"),
    ({}, 400, "messages", "non-empty list"),
    ({"messages": [{"role": "assistant", "content": "Hi"}]}, 400, "messages", "messages[0].role: expected user"),
    ({"messages": [*HELLO, *HELLO]}, 400, "messages", "messages[1].role: expected assistant"),
    ({"messages": [{"role": "user", "content": 7}]}, 400, "messages", "messages[0].content"),
    ({"messages": [{"role": "wizard", "content": "Hi"}]}, 400, "messages", "messages[0].role"),
    ({"messages": LONG}, 400, "messages", f"this model's context is {CONTEXT} tokens"),
    ({"messages": HELLO, "max_tokens": 0}, 400, "max_tokens", f"from 1 to {CONTEXT}"),
    ({"messages": HELLO, "max_tokens": CONTEXT + 1}, 400, "max_tokens", f"from 1 to {CONTEXT}"),
    ({"messages": HELLO, "max_completion_tokens": "ten"}, 400, "max_completion_tokens", "an integer"),
    ({"messages": HELLO, "temperature": 3}, 400, "temperature", "from 0 to 2"),
    ({"messages": HELLO, "n": 2}, 400, "n", "only 1 is supported"),
    ({"messages": HELLO, "top_p": 0.5}, 400, "top_p", "only 1 is supported"),
    ({"messages": HELLO, "n": True}, 400, "n", "only 1 is supported (one answer per request), got true"),
    ({"messages": HELLO, "top_p": True}, 400, "top_p", "got true"),
    ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "up to 4"),
    ({"messages": HELLO, "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
    ([HELLO], 400, None, "must be a JSON object"),
    ({"messages": HELLO, "stream": True, "stream_options": {"include_usage": "no"}}, 400, "stream_options",
     "include_usage: must be true or false"),
    ({"messages": HELLO, "stream": True, "stream_options": []}, 400, "stream_options", "must be an object"),
    ({"messages": HELLO, "stream_options": {"include_usage": True}}, 400, "stream_options",
     "only allowed when stream is true"),
], ids=["no-messages", "missing-messages", "assistant-first", "two-users", "content-not-text", "unknown-role",
        "longer-than-context", "max-tokens-0", "max-tokens-over-context", "max-tokens-not-int", "temperature",
        "n", "top-p", "n-true", "top-p-true", "five-stops", "tools", "not-an-object", "include-usage-not-bool",
        "stream-options-not-an-object", "stream-options-without-stream"])
def test_bad_requests_get_a_clear_4xx_in_openai_shape(chat_server, body, status, param, fragment):
    response = post(chat_server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and fragment in error["message"]


def test_a_conversation_of_more_text_than_the_context_holds_is_refused_before_it_is_tokenized(chat_engine,
                                                                                              monkeypatch):
    """A megabyte of history took seconds to tokenize (and its calculator annotations to check) only to be refused:
    text that no tokenization fits in the context is refused at once, by its length."""
    from fastapi.testclient import TestClient

    from nanochat_flyte.inference.serve import create_app

    def never(messages):
        raise AssertionError("tokenized")

    monkeypatch.setattr(chat_engine, "chat_prompt", never)
    text = "<<1+1=2>>" * (CONTEXT * chat_engine.max_token_bytes // 9 + 1)
    messages = [*HELLO, {"role": "assistant", "content": text}, *HELLO]
    with TestClient(create_app(chat_engine, model_name="unit")) as client:
        response = client.post("/v1/chat/completions", json={"messages": messages})
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert f"more than this model's context of {CONTEXT} tokens can hold" in error["message"]


def test_plain_completion_mode_weighs_the_last_message_only(base_engine):
    """A base checkpoint continues the last user message alone: a long history before it is no reason to refuse."""
    from fastapi.testclient import TestClient

    from nanochat_flyte.inference.serve import create_app

    history = "The cat sees a small boat. " * (CONTEXT * base_engine.max_token_bytes // 20)
    messages = [{"role": "user", "content": history}, {"role": "assistant", "content": "Yes."},
                {"role": "user", "content": "The river"}]
    with TestClient(create_app(base_engine, model_name="unit")) as client:
        response = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert response.status_code == 200, response.text


def test_requests_waiting_to_be_tokenized_count_towards_the_concurrency_limit(chat_engine, monkeypatch):
    """Requests parse one at a time: a burst of long ones queued without bound, holding up everyone's. Those
    queued count towards max_concurrent, as the answers being generated do."""
    from fastapi.testclient import TestClient

    from nanochat_flyte.inference import serve

    parse, parsing, release = serve.parse_chat_request, threading.Event(), threading.Event()

    def slow_parse(state, raw):
        parsing.set()
        release.wait(60)
        return parse(state, raw)

    monkeypatch.setattr(serve, "parse_chat_request", slow_parse)
    body = {"messages": HELLO, "max_tokens": 1}
    with TestClient(serve.create_app(chat_engine, model_name="unit", max_concurrent=1)) as client:
        first = []
        waiting = threading.Thread(target=lambda: first.append(client.post("/v1/chat/completions", json=body)))
        waiting.start()
        try:
            assert parsing.wait(60)
            busy = client.post("/v1/chat/completions", json=body)
            assert busy.status_code == 429 and busy.json()["error"]["code"] == "rate_limit_exceeded"
        finally:
            release.set()
            waiting.join(60)
        assert first[0].status_code == 200
        assert client.post("/v1/chat/completions", json=body).status_code == 200  # counted out again


def test_a_developer_message_is_a_system_message(chat_server, chat_engine):
    """OpenAI's newer clients send the system prompt as role "developer"."""
    answer = post(chat_server, {"messages": [{"role": "developer", "content": "Be brief."}, *HELLO],
                                "max_tokens": 8, "temperature": 0})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == expected(
        chat_engine, [{"role": "system", "content": "Be brief."}, *HELLO], max_tokens=8)


def test_the_access_log_names_the_connection_not_a_forwarded_for_header(chat_server):
    """uvicorn took a loopback client's X-Forwarded-For for its address and logged it as sent (C1 controls too)."""
    requests.get(f"{chat_server.url}/health?probe=forwarded", headers={"X-Forwarded-For": "6.6.6.6"}, timeout=10)
    deadline = time.monotonic() + 10
    while "probe=forwarded" not in chat_server.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    (line,) = [line for line in chat_server.log.read_text().splitlines() if "probe=forwarded" in line]
    assert "127.0.0.1:" in line and "6.6.6.6" not in line


def test_invalid_json_oversized_bodies_and_unknown_routes(chat_server):
    url = f"{chat_server.url}/v1/chat/completions"
    response = requests.post(url, data=b'{"messages": [', headers={"Content-Type": "application/json"}, timeout=10)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    huge = json.dumps({"messages": [{"role": "user", "content": "x" * 1_100_000}]})
    response = requests.post(url, data=huge, timeout=10)
    assert response.status_code == 413 and "over the limit of 1000000 bytes" in response.json()["error"]["message"]

    def chunked():  # no Content-Length: the limit is enforced while reading
        for _ in range(12):
            yield b"x" * 100_000

    response = requests.post(url, data=chunked(), timeout=10)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    response = requests.get(url, timeout=10)
    assert response.status_code == 405 and response.json()["error"]["message"] == "Method Not Allowed"
    assert response.headers["Allow"] == "POST"
    for path in ("/", "/health"):  # as load balancers and uptime checks ask
        assert requests.head(f"{chat_server.url}{path}", timeout=10).status_code == 200
    response = requests.get(f"{chat_server.url}/v1/nothing", timeout=10)
    assert response.status_code == 404 and "error" in response.json()
    assert chat_server.health()["status"] == "ok"  # none of it hurt the server
    assert chat_server.process.poll() is None


def test_json_nested_too_deeply_is_invalid_json_not_a_crash(chat_server):
    response = requests.post(f"{chat_server.url}/v1/chat/completions", data=b"[" * 100_000,
                             headers={"Content-Type": "application/json"}, timeout=10)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == {"message": "the request body is not valid JSON: nested too deeply",
                                        "type": "invalid_request_error", "param": None, "code": "invalid_json"}
    assert "RecursionError" not in chat_server.log.read_text()
    response = requests.post(f"{chat_server.url}/v1/chat/completions", timeout=10,  # beyond Python's 4,300 digits
                             data=b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}",
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json", response.text
    assert "Traceback" not in chat_server.log.read_text()


# ---------------------------------------------------------------------------- base model, limits, disconnects, key


def test_a_generation_that_fails_is_a_500_or_an_error_event_and_the_server_goes_on(chat_engine, monkeypatch):
    """A forward pass that raises (a GPU out of memory) mid-answer: the non-streamed request gets a 500 in OpenAI's
    shape; a stream, whose 200 is sent already, an `error` event and [DONE]; the next request is answered. In
    process (FastAPI's TestClient), to inject the failure at the engine's forward pass."""
    from fastapi.testclient import TestClient

    from nanochat_flyte.inference import engine as engine_module
    from nanochat_flyte.inference.serve import create_app

    next_token_logits, failures = engine_module.next_token_logits, []

    def logits_or_fail(model, ids, **kwargs):  # once per request marked to fail, at its third token
        if failures and kwargs["cache"].lengths[0] >= failures[0] + 2:
            failures.pop()
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return next_token_logits(model, ids, **kwargs)

    monkeypatch.setattr(engine_module, "next_token_logits", logits_or_fail)
    body = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8, "temperature": 0}
    prompt_tokens = len(chat_engine.chat_prompt(body["messages"]))
    with TestClient(create_app(chat_engine, model_name="unit")) as client:
        failures.append(prompt_tokens)
        failed = client.post("/v1/chat/completions", json=body)
        assert failed.status_code == 500
        assert failed.json()["error"] == {"message": "generation failed: OutOfMemoryError", "type": "server_error",
                                          "param": None, "code": None}
        failures.append(prompt_tokens)
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
            assert stream.status_code == 200
            events = [line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-2])["error"]["message"] == "generation failed: OutOfMemoryError"
        assert events[-1] == "[DONE]"
        answered = client.post("/v1/chat/completions", json=body)
        assert answered.status_code == 200
        assert answered.json()["choices"][0]["message"]["content"] == expected(chat_engine, body["messages"],
                                                                               max_tokens=8)


def test_a_base_checkpoint_is_served_as_plain_completion_and_says_so(base_server, base_engine):
    health = base_server.health()
    assert (health["phase"], health["mode"], health["auth"]) == ("base", "completion", True)
    messages = [*HELLO, {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "The river"}]
    response = post(base_server, {"messages": messages, "max_tokens": 8, "temperature": 0}, AUTH)
    assert response.status_code == 200, response.text
    assert response.headers["X-Nanochat-Mode"] == "completion"
    body = response.json()
    assert body["system_fingerprint"] == "nanochat-flyte-completion"
    # the last user message alone, continued as plain text
    plain = base_engine.complete("The river", SamplingParams(max_tokens=8)).text
    assert body["choices"][0]["message"]["content"] == plain == expected(base_engine, messages, max_tokens=8)
    assert "BASE checkpoint" in base_server.log.read_text()


def test_a_local_server_answers_its_own_names_and_json_only(chat_server):
    """A page of another site can make a browser send a form or text to 127.0.0.1 without asking, or, with its
    name pointed at 127.0.0.1 (DNS rebinding), read the answers: neither gets one."""
    body = json.dumps({"messages": HELLO, "max_tokens": 1}).encode()
    as_text = requests.post(f"{chat_server.url}/v1/chat/completions", data=body, timeout=10,
                            headers={"Content-Type": "text/plain"})
    assert as_text.status_code == 415 and as_text.json()["error"]["code"] == "unsupported_media_type"
    rebound = requests.post(f"{chat_server.url}/v1/chat/completions", data=body, timeout=10,
                            headers={"Content-Type": "application/json", "Host": "attacker.example"})
    assert rebound.status_code == 400
    for host in ("localhost", "127.0.0.1"):
        answered = requests.post(f"{chat_server.url}/v1/chat/completions", data=body, timeout=10,
                                 headers={"Content-Type": "application/json; charset=utf-8", "Host": host})
        assert answered.status_code == 200, answered.text
        assert answered.json()["model"] in {model["id"] for model in
                                            requests.get(f"{chat_server.url}/v1/models", timeout=10).json()["data"]}
    name = requests.get(f"{chat_server.url}/v1/models", timeout=10).json()["data"][0]["id"]
    assert requests.get(f"{chat_server.url}/v1/models/{name}", timeout=10).json()["id"] == name
    missing = requests.get(f"{chat_server.url}/v1/models/gpt-4", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    with post(chat_server, {"messages": HELLO, "max_tokens": 2, "stream": True}, stream=True) as stream:
        assert stream.headers["X-Accel-Buffering"] == "no"  # a reverse proxy passes each event on at once
        list(stream.iter_lines())


def test_the_api_key_protects_the_api(base_server):
    assert post(base_server, {"messages": HELLO, "max_tokens": 1}).status_code == 401
    wrong = post(base_server, {"messages": HELLO, "max_tokens": 1}, {"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(f"{base_server.url}/v1/models", timeout=10).status_code == 401
    assert requests.get(f"{base_server.url}/v1/models", headers=AUTH, timeout=10).status_code == 200
    assert requests.get(f"{base_server.url}/", timeout=10).status_code == 200  # the page itself holds no secret
    assert post(base_server, {"messages": HELLO, "max_tokens": 1}, AUTH).status_code == 200


def test_servers_listen_on_localhost_by_default(base_server, chat_server):
    for server in (base_server, chat_server):
        assert re.search(r"Uvicorn running on http://127\.0\.0\.1:\d+", server.log.read_text())


def test_a_server_open_beyond_localhost_without_a_key_warns_and_answers_as_its_model_name(base_checkpoint,
                                                                                           tmp_path):
    server = start_server(base_checkpoint, tmp_path / "open.log", "--host", "0.0.0.0", "--model-name", "my-model",
                          env={"NANOCHAT_API_KEY": ""})
    try:
        assert [model["id"] for model in requests.get(f"{server.url}/v1/models", timeout=10).json()["data"]] == [
            "my-model"]
        answer = post(server, {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2})
        assert answer.status_code == 200 and answer.json()["model"] == "my-model"
    finally:
        stop_server(server)
    assert "WARNING:     listening on 0.0.0.0 without an API key" in server.log.read_text()


def test_any_loopback_address_keeps_the_host_check_and_a_key_no_client_can_send_is_refused(base_checkpoint,
                                                                                             tmp_path):
    # 127.0.0.2 is this machine's too: a page of a name pointed at it (DNS rebinding) reads no answer either
    server = start_server(base_checkpoint, tmp_path / "alias.log", "--host", "127.0.0.2", env={"NANOCHAT_API_KEY": ""})
    try:
        assert server.url.startswith("http://127.0.0.2:") and requests.get(f"{server.url}/health", timeout=10).ok
        assert requests.get(f"{server.url}/health", headers={"Host": "attacker.example"}, timeout=10).status_code == 400
    finally:
        stop_server(server)
    assert "without an API key" not in server.log.read_text()
    # HTTP clients send headers in ASCII (httpx refuses others; a server reads them as latin-1): no match, ever
    refused = subprocess.run([sys.executable, "-m", "nanochat_flyte", "serve", "--checkpoint", str(base_checkpoint)],
                             env={**os.environ, "NANOCHAT_API_KEY": "clé"}, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and refused.stderr.strip().splitlines() == [
        "error: NANOCHAT_API_KEY: a client can send only printable ASCII in its Authorization header; choose a key of "
        "those characters"]


def test_a_key_from_a_file_ending_in_a_newline_is_the_key_and_a_proxys_name_can_be_allowed(base_checkpoint,
                                                                                            tmp_path):
    server = start_server(base_checkpoint, tmp_path / "key.log", "--allowed-host", "chat.example.org",
                          env={"NANOCHAT_API_KEY": "s3cret\n"})
    try:
        for token in ("s3cret", "s3cret "):
            assert requests.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {token}"},
                                timeout=10).status_code == 200
        assert requests.get(f"{server.url}/v1/models", timeout=10).status_code == 401
        # a reverse proxy that forwards its public name is answered; other names are not
        assert requests.get(f"{server.url}/health", headers={"Host": "chat.example.org"}, timeout=10).ok
        assert requests.get(f"{server.url}/health", headers={"Host": "other.example"}, timeout=10).status_code == 400
    finally:
        stop_server(server)


def wait_until_idle(server, seconds: float = 10, accounted: int = 0) -> dict:
    """The server's health once nothing is active and at least `accounted` requests have ended (a request the
    client gave up on may still be parsed or queued, not yet active, when the client's timeout fires)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        health = server.health()
        if not health["active"] and sum(health["requests"].values()) >= accounted:
            return health
        time.sleep(0.05)
    return server.health()


def test_beyond_the_concurrency_limit_the_answer_is_429(base_server):
    long_answer = {"messages": HELLO, "max_tokens": CONTEXT, "temperature": 0, "stream": True}
    with post(base_server, long_answer, AUTH, stream=True) as streaming:
        lines = streaming.iter_lines()  # (kept: a dropped iterator closes the connection, which cancels the answer)
        next(lines)  # the first event: the answer is being generated
        busy = post(base_server, {"messages": HELLO, "max_tokens": 1}, AUTH)
        assert busy.status_code == 429 and busy.headers["Retry-After"] == "2"  # OpenAI's clients wait as long
        assert busy.json()["error"]["type"] == "rate_limit_error"
        assert busy.json()["error"]["code"] == "rate_limit_exceeded"
        assert busy.json()["error"]["message"] == ("the server is busy: 1 request is being tokenized or answered; "
                                                   "retry shortly")
    wait_until_idle(base_server)
    assert post(base_server, {"messages": HELLO, "max_tokens": 1}, AUTH).status_code == 200


def test_a_client_that_disconnects_mid_stream_frees_its_slot(base_server):
    before = base_server.health()["requests"]
    long_answer = {"messages": HELLO, "max_tokens": CONTEXT, "temperature": 0, "stream": True}
    with post(base_server, long_answer, AUTH, stream=True) as streaming:
        lines = streaming.iter_lines()
        for _ in range(3):  # the role, then two tokens
            next(lines)
            next(lines)
    # the connection is closed with most of the answer still to come: decoding stops, the slot is free
    health = wait_until_idle(base_server)
    assert health["active"] == 0
    assert health["requests"]["cancelled"] == before["cancelled"] + 1
    assert health["requests"]["completed"] == before["completed"]
    tokens = [int(n) for n in re.findall(r"cancelled after (\d+) tokens", base_server.log.read_text())]
    assert tokens and tokens[-1] < CONTEXT - 10
    assert post(base_server, {"messages": HELLO, "max_tokens": 1}, AUTH).status_code == 200


def test_a_client_that_gives_up_on_a_non_streamed_answer_frees_its_slot(base_server):
    before = base_server.health()["requests"]
    # The client stops waiting 0.02 s after sending and closes the connection; the server looks every 0.05 s
    # (DISCONNECT_POLL_S), long before the answer's ~240 tokens are written (about 0.3 s on 2 CPU cores: a 4x faster
    # machine still has time to spare). At a 0.3 s wait, an unloaded machine sometimes finished the answer first.
    with pytest.raises(requests.ReadTimeout):  # (5 s to connect: a connection slow to open is no give-up)
        post(base_server, {"messages": HELLO, "max_tokens": CONTEXT, "temperature": 0}, AUTH, timeout=(5, 0.02))
    health = wait_until_idle(base_server, accounted=sum(before.values()) + 1)
    assert health["requests"]["cancelled"] == before["cancelled"] + 1
    assert health["requests"]["completed"] == before["completed"]


# ---------------------------------------------------------------------------- connections


@pytest.fixture(scope="module")
def strict_server(base_checkpoint, tmp_path_factory):
    """The base checkpoint served with small connection limits: 4 open at once, 1 s to send a request."""
    server = start_server(base_checkpoint, tmp_path_factory.mktemp("logs") / "strict_server.log",
                          "--max-connections", "4", "--request-timeout", "1")
    yield server
    stop_server(server)


def raw_connection(server, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=10)
    sock.sendall(data)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_a_connection_that_does_not_send_its_request_in_time_is_closed(strict_server):
    start = time.monotonic()
    silent = raw_connection(strict_server)
    half_headers = raw_connection(strict_server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    half_body = raw_connection(strict_server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                              b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
    assert read_until_closed(silent) == read_until_closed(half_headers) == b""  # closed, without an answer
    head, _, body = read_until_closed(half_body).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert 1.0 <= time.monotonic() - start < 30  # after the 1 s timeout; the bound is slack for a loaded machine
    for sock in (silent, half_headers, half_body):
        sock.close()
    assert strict_server.health()["status"] == "ok"


def test_a_request_answered_before_its_body_is_in_closes_its_connection(strict_server):
    """A 404 (or a 401, a 429) answers before the body is read: the connection closes after it, rather than wait
    for the rest of a body that would hold it open beyond every timeout."""
    unread = raw_connection(strict_server, b"POST /v1/nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                           b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
    answer = b""
    while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < int(
            re.search(rb"content-length: (\d+)", answer.lower())[1]):
        answer += unread.recv(65536)  # the whole answer: its head and body may come in two writes
    assert answer.startswith(b"HTTP/1.1 404 ")
    unread.settimeout(4)  # beyond the 1 s request timeout
    try:
        unread.sendall(b"[")  # more of the body, after the answer: it stopped uvicorn's keep-alive timer
        assert unread.recv(65536) == b""  # closed
    except ConnectionResetError:
        pass  # closed, and the byte sent after it refused
    finally:
        unread.close()


def test_beyond_the_connection_limit_a_new_connection_gets_503(strict_server):
    idle = [raw_connection(strict_server) for _ in range(4)]
    refused = raw_connection(strict_server)
    answer = read_until_closed(refused)
    assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert answer.endswith(b"\r\n\r\ntoo many open connections: retry shortly\n")
    for sock in [*idle, refused]:
        sock.close()
    deadline = time.monotonic() + 10
    while requests.get(f"{strict_server.url}/health", timeout=10).status_code != 200:  # until it sees them closed
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_clients_that_stop_reading_are_cut_off_and_keep_nobody_out(strict_server):
    """Four connections (the limit) pipeline requests for the page and read none of the answers: once the buffers
    between them and the server are full and the request timeout (1 s) passes, the server cuts them off, and a new
    client is answered again. Before, they held their connections, and so the server, for good."""
    port = int(strict_server.url.rsplit(":", 1)[1])
    pipelined = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 1000  # 13 MB of answers: far beyond any buffer
    stalled = []
    for _ in range(4):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, set before connecting
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        sock.sendall(pipelined)
        stalled.append(sock)
    deadline = time.monotonic() + 30  # the 1 s timeout, with slack for a loaded machine
    while requests.get(f"{strict_server.url}/health", timeout=10).status_code != 200:  # 503 while they are open
        assert time.monotonic() < deadline, "connections that read nothing still hold the server"
        time.sleep(0.1)
    for sock in stalled:
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        assert received.count(b"HTTP/1.1 200 OK") < 1000  # cut off, not answered in full
        sock.close()


def test_broken_framing_gets_uvicorns_plain_text_400_and_a_client_gone_mid_body_one_log_line(strict_server):
    garbled = raw_connection(strict_server, b"NOT HTTP AT ALL\r\n\r\n")
    assert read_until_closed(garbled).endswith(b"\r\n\r\nInvalid HTTP request received.")
    logged = len(strict_server.log.read_text())
    gone = raw_connection(strict_server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                         b"Content-Length: 100\r\n\r\n{\"messages\"")
    time.sleep(0.2)
    gone.close()
    deadline = time.monotonic() + 5
    while "client went away" not in (new := strict_server.log.read_text()[logged:]):
        assert time.monotonic() < deadline, new
        time.sleep(0.05)
    assert "client went away while sending its request" in new and "Traceback" not in new
    for sock in (garbled, gone):
        sock.close()


# ---------------------------------------------------------------------------- the command line


def test_a_server_that_requires_a_key_refuses_to_start_without_one_before_the_model_loads(tmp_path, monkeypatch,
                                                                                          capsys):
    missing = ["--checkpoint", str(tmp_path), "--require-api-key"]  # no checkpoint: this refusal comes first
    for unset in ("", " \n"):
        monkeypatch.setenv("NANOCHAT_API_KEY", unset)
        with pytest.raises(UserError, match=r"^--require-api-key: NANOCHAT_API_KEY is not set \(or empty\)"):
            main(missing)
    monkeypatch.setenv("NANOCHAT_API_KEY", "s3cret")
    with pytest.raises(SystemExit):  # with a key, past the check to the checkpoint's
        main(missing)
    assert "not a checkpoint directory" in capsys.readouterr().err


def test_a_host_or_port_that_cannot_be_listened_on_is_refused_before_the_model_loads(tmp_path):
    missing = ["--checkpoint", str(tmp_path)]  # no checkpoint there: a refusal after loading would not get this far
    with pytest.raises(UserError, match=r"^--host: '256\.1\.1\.1' is neither an IP address nor a known host name"):
        main([*missing, "--host", "256.1.1.1"])
    with pytest.raises(UserError, match=r"^--host: 192\.0\.2\.1 is not an address of this machine$"):
        main([*missing, "--host", "192.0.2.1"])  # TEST-NET-1: documentation only, nobody's address
    with pytest.raises(UserError, match=r"^--host: empty: give an address to listen on"):
        main([*missing, "--host", ""])  # uvicorn would have listened on every address
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for host in ("127.0.0.1", "localhost", "0.0.0.0"):
            with pytest.raises(UserError, match=f"^--port: {port} is already in use on {host}$"):
                main([*missing, "--host", host, "--port", str(port)])


@pytest.mark.parametrize("checkpoint, name", [
    ("s3://bucket/runs/d20/checkpoint/", "d20-checkpoint"), ("runs/chat", "runs-chat"), ("/checkpoint", "checkpoint"),
    ("file:///checkpoint", "checkpoint"), ("ckpt", "ckpt"), ("/", "nanochat"),
])
def test_the_model_is_named_after_the_checkpoints_last_two_folders(checkpoint, name):
    assert model_name_of(checkpoint) == name
