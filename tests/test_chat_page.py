"""The chat page in a real browser: headless Chromium (Debian's `chromium` package, driven by Playwright) opens the
page served by a real server, sends messages, and sees the answer stream in, token by token. The screenshot is
saved in the test's tmp dir (chat_page.png), as an artifact to look at.

Without Debian's chromium or the playwright package these tests skip, saying so; .ci/run installs both."""

import json
import shutil
from pathlib import Path

import pytest
from chat_server import API_KEY, start_server, stop_server
from helpers import make_data_dir, tiny_config

from nanochat_flyte.hostile_text import hidden, shown
from nanochat_flyte.inference.engine import Engine, SamplingParams
from nanochat_flyte.training.pretrain import train

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip("no browser: Debian's chromium is not installed (`apt-get install chromium`, as .ci/run does)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                                             "(pip install -e '.[test]')")

LAUNCH_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]
RECORD_ANSWER_TEXT = """() => {
    // every text the newest answer shows while it streams in
    window.seen = [];
    new MutationObserver(() => {
        const answers = document.querySelectorAll(".assistant");
        if (answers.length) window.seen.push(answers[answers.length - 1].textContent);
    }).observe(document.getElementById("messages"), {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        # Playwright gives each launch a fresh temporary profile (--user-data-dir) and runs it headless
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1000, "height": 720})
    yield page
    page.close()


def ask(page, text: str) -> str:
    """Send text as the user; wait until the answer has finished streaming; return it."""
    before = page.locator(".assistant").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    answer = page.locator(".assistant").nth(before)
    answer.wait_for()
    page.wait_for_selector(".assistant.streaming", state="detached", timeout=60_000)
    return answer.text_content()


def expected(engine: Engine, messages: list[dict], max_tokens: int) -> str:
    return engine.generate_batch([engine.chat_prompt(messages)], SamplingParams(max_tokens=max_tokens))[0].text


def test_the_page_streams_answers_keeps_the_conversation_and_shows_errors(page, chat_server, chat_checkpoint,
                                                                           tmp_path):
    engine = Engine.from_checkpoint(chat_checkpoint, "cpu")
    page.goto(chat_server.url)
    page.wait_for_function("document.getElementById('model').textContent.includes('chat checkpoint')")
    assert not page.is_visible("#banner")  # a chat checkpoint: no base-model warning
    page.fill("#temperature", "0")  # greedy: the answers can be compared with the engine's
    page.fill("#max-tokens", "60")
    page.evaluate(RECORD_ANSWER_TEXT)

    # the stream's bytes come in at 20 KB/s (Chromium's network emulation), so that the answer arrives in many reads
    # even where the tiny model writes it all before the browser reads once (a loaded 2-core machine did)
    network = page.context.new_cdp_session(page)
    network.send("Network.enable")
    network.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0,
                                                       "downloadThroughput": 20_000, "uploadThroughput": -1})
    first = ask(page, "Hello there")
    network.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                       "uploadThroughput": -1})
    assert first == expected(engine, [{"role": "user", "content": "Hello there"}], 60)
    seen = [text for text in dict.fromkeys(page.evaluate("window.seen")) if text]
    assert len(seen) >= 2, seen  # the answer grew over several renders, not in one piece
    assert all(first.startswith(text) for text in seen)
    assert page.locator(".note").last.text_content() == "(the answer reached the token limit)"
    page.screenshot(path=tmp_path / "chat_page.png", full_page=True)
    assert (tmp_path / "chat_page.png").stat().st_size > 10_000

    # the page sends the whole conversation: the second answer follows the first
    sent = []
    page.on("request", lambda request: sent.append(request.post_data_json) if request.method == "POST" else None)
    second = ask(page, "Tell me more")
    history = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "Tell me more"}]
    assert [body["messages"] for body in sent] == [history]  # (this tiny model may answer alike without it)
    assert second == expected(engine, history, 60)

    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    assert ask(page, "Tell me more") == expected(engine, [{"role": "user", "content": "Tell me more"}], 60)

    # a server's refusal: the error says why, and the question goes back into the box, unsent and unshown
    page.fill("#input", "word " * 300)  # more tokens than the model's context of 256
    page.press("#input", "Enter")
    error = page.locator(".error")
    error.wait_for()
    assert error.text_content().startswith("400: messages: the conversation is ")
    assert error.text_content().endswith("Start a New chat, or send a shorter message. Your message is back in the "
                                         "box.")
    assert page.input_value("#input") == ("word " * 300).strip()
    assert page.locator(".user").count() == 1  # the refused question is not shown as asked


def stream_of(*chunks: dict) -> str:
    """A chat completion stream as OpenAI (and our server) sends it: one server-sent event per chunk, then [DONE]."""
    return "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"


def test_the_page_spells_out_what_a_model_hides_in_its_text_as_the_terminal_does(page, chat_server):
    """A right-to-left override would show "efas # / fr- mr" as "rm -rf / # safe". The page's list is the terminal's
    (hostile_text.py): every character up to U+3400 and the other invisible ones, compared one by one."""
    page.goto(chat_server.url)
    codes = [*range(0xD800), *range(0xFE00, 0x10000), *range(0xE0000, 0xE0200)]
    text = "".join(map(chr, codes))
    on_page, marks = page.evaluate("""text => {
        const div = document.createElement("div");
        showModelText(div, text);
        return [div.textContent, [...div.querySelectorAll(".escape")].map(mark => mark.textContent)];
    }""", text)
    assert on_page == shown(text)
    assert marks == [shown(chr(code)) for code in codes if hidden(chr(code))]
    assert "\\u202e" in marks and "\\U000e0041" in marks and "\\ufe00" in marks and "\\x1b" in marks


def test_an_empty_answer_keeps_the_turns_alternating(page, chat_server):
    page.goto(chat_server.url)
    page.wait_for_function("document.getElementById('model').textContent.includes('chat checkpoint')")
    # the model's first token ends its turn: a stream with a role and a finish, no text
    chunk = {"object": "chat.completion.chunk"}
    empty = stream_of(chunk | {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
                      chunk | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=empty))
    page.fill("#input", "Hello there")
    page.press("#input", "Enter")
    page.locator(".note").wait_for()
    assert page.locator(".note").text_content() == "(the model answered nothing)"
    page.unroute("**/v1/chat/completions")

    # the real server takes the next turn: the conversation goes on. The model samples (the page's default
    # temperature), and may itself answer nothing, so the test waits for the request's end, not for a bubble
    page.fill("#max-tokens", "16")
    sent = []
    page.on("request", lambda request: sent.append(request.post_data_json) if request.method == "POST" else None)
    with page.expect_response("**/v1/chat/completions") as response:
        page.fill("#input", "Are you there?")
        page.press("#input", "Enter")
    assert response.value.status == 200
    page.wait_for_function("controller === null")  # the answer has streamed in to its end
    assert [body["messages"] for body in sent] == [[{"role": "user", "content": "Hello there"},
                                                    {"role": "assistant", "content": ""},
                                                    {"role": "user", "content": "Are you there?"}]]
    assert page.locator(".error").count() == 0


def test_new_chat_during_an_answer_starts_empty(page, chat_server):
    page.goto(chat_server.url)
    page.wait_for_function("document.getElementById('model').textContent.includes('chat checkpoint')")
    network = page.context.new_cdp_session(page)  # 1 KB/s: the answer is still streaming when New chat is clicked
    network.send("Network.enable")
    network.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0,
                                                       "downloadThroughput": 1_000, "uploadThroughput": -1})
    page.fill("#temperature", "0")  # greedy: an answer of many tokens, still streaming when New chat is clicked
    page.fill("#max-tokens", "256")
    page.fill("#input", "Hello there")
    page.press("#input", "Enter")
    page.locator(".assistant.streaming").wait_for()
    page.click("#new-chat")
    page.wait_for_function("controller === null")  # the stopped request has run its error handling
    assert page.locator("#messages").inner_text() == "New chat. Ask something."


def test_a_base_model_page_says_so_and_asks_for_the_api_key(page, base_server, base_checkpoint):
    page.goto(base_server.url)
    page.wait_for_function("document.getElementById('model').textContent.includes('base checkpoint')")
    assert "This is a BASE model" in page.text_content("#banner") and page.is_visible("#banner")
    assert page.is_visible("#api-key")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "12")
    page.fill("#input", "The river")
    page.press("#input", "Enter")
    page.locator(".error").wait_for()
    assert page.locator(".error").text_content().startswith("401: a valid API key is needed")
    page.fill("#api-key", API_KEY)
    answer = ask(page, "The river")
    base = Engine.from_checkpoint(base_checkpoint, "cpu")
    assert answer == base.complete("The river", SamplingParams(max_tokens=12)).text


def test_max_tokens_stays_within_a_short_models_context(page, tmp_path):
    """The page's default of 256 tokens is more than a 64-token model takes (the server refuses it with a 400, as it
    did the smoke preset's 128-token model): the page lowers it to the model's context."""
    checkpoint = tmp_path / "short"
    train(tiny_config(max_seq_len=64, num_iterations=2, eval_every=2, sample_every=2, save_every=2, eval_tokens=128),
          make_data_dir(tmp_path / "data", n_train_tokens=5_000, n_val_tokens=500), checkpoint)
    server = start_server(checkpoint, tmp_path / "server.log")
    try:
        page.goto(server.url)
        page.wait_for_function("document.getElementById('model').textContent.includes('context 64 tokens')")
        assert page.input_value("#max-tokens") == "64" and page.get_attribute("#max-tokens", "max") == "64"
        page.fill("#input", "The river")
        page.press("#input", "Enter")
        page.wait_for_function("controller === null")  # the answer has ended
        assert page.locator(".error").count() == 0
    finally:
        stop_server(server)


def test_settings_out_of_range_are_named_before_anything_is_sent_and_kept_across_reloads(page, chat_server):
    page.goto(chat_server.url)
    page.wait_for_function("document.getElementById('top-k').max !== ''")  # /health has given the vocabulary size
    vocab_size = chat_server.health()["vocab_size"]
    sent = []
    page.on("request", lambda request: sent.append(request.url) if request.method == "POST" else None)
    for field, value, problem in (("#max-tokens", "0", "max tokens: must be a whole number from 1 to 256, got 0"),
                                  ("#max-tokens", "12.5", "max tokens: must be a whole number from 1 to 256, got 12.5"),
                                  ("#temperature", "-5", "temperature: must be a number from 0 to 2, got -5"),
                                  ("#top-k", "99999", f"top-k: must be a whole number from 0 to {vocab_size}, got "
                                                      "99999")):
        page.fill(field, value)
        page.fill("#input", "Hello")
        page.press("#input", "Enter")
        assert page.locator(".error").last.text_content() == problem
        assert page.evaluate("document.activeElement.id") == field[1:]  # the field to mend has the focus
        assert page.input_value("#input") == "Hello"  # the question waits in the box
        page.fill(field, page.get_attribute(field, "value"))  # back to its default
    assert sent == [] and page.locator(".user").count() == 0

    # an emptied field is its default (0.6), not Number("") = 0; the settings outlive a reload
    page.fill("#temperature", "")
    page.fill("#top-k", "5")
    page.press("#top-k", "Tab")  # a change event: the settings are saved
    with page.expect_request("**/v1/chat/completions") as request:
        page.fill("#input", "Hello")
        page.click("#send")
    assert request.value.post_data_json["temperature"] == 0.6 and request.value.post_data_json["top_k"] == 5
    assert page.evaluate("document.activeElement.id") == "input"  # a click on Send leaves the typing in the box
    page.wait_for_function("controller === null")
    page.reload()
    page.wait_for_function("document.getElementById('model').textContent.includes('chat checkpoint')")
    assert page.input_value("#top-k") == "5"


def test_an_unreachable_server_gives_the_question_back(page, chat_server):
    page.goto(chat_server.url)
    page.wait_for_function("document.getElementById('model').textContent.includes('chat checkpoint')")
    page.route("**/v1/chat/completions", lambda route: route.abort("connectionrefused"))
    page.fill("#input", "Are you there?")
    page.press("#input", "Enter")
    page.locator(".error").wait_for()
    assert page.locator(".error").text_content() == ("cannot reach the server: is it still running? Your message is "
                                                     "back in the box.")
    assert page.input_value("#input") == "Are you there?" and page.locator(".user").count() == 0
    page.unroute("**/v1/chat/completions")
    page.fill("#max-tokens", "4")
    page.press("#input", "Enter")  # sent again, as it was
    page.locator(".user").wait_for()
    page.wait_for_function("controller === null")
    assert page.locator(".user").text_content() == "Are you there?"


def test_enter_that_ends_an_input_method_composition_sends_nothing(page, chat_server):
    page.goto(chat_server.url)
    page.wait_for_function("controller === null")
    page.fill("#input", "にほん")
    page.evaluate("""() => document.getElementById("input").dispatchEvent(new KeyboardEvent("keydown",
        {key: "Enter", keyCode: 229, isComposing: true, bubbles: true, cancelable: true}))""")
    assert page.locator(".user").count() == 0 and page.input_value("#input") == "にほん"


def test_on_a_phone_a_long_url_wraps_and_the_view_stays_where_the_reader_scrolled(browser, chat_server):
    page = browser.new_page(viewport={"width": 390, "height": 500})
    try:
        page.goto(chat_server.url)
        page.wait_for_function("document.getElementById('model').textContent.includes('chat checkpoint')")
        url = "https://example.com/" + "a" * 280
        page.fill("#temperature", "0")  # greedy: sampled, the one token could end the answer, which leaves no bubble
        page.fill("#max-tokens", "1")
        ask(page, f"Please open {url}")
        bubble = page.locator(".user").bounding_box()
        assert bubble["x"] >= 0 and bubble["x"] + bubble["width"] <= 390  # inside the screen, the text wrapped

        # a slow stream (1 KB/s): the reader scrolls up while it comes in, and the page leaves them there
        network = page.context.new_cdp_session(page)
        network.send("Network.enable")
        network.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0,
                                                           "downloadThroughput": 1_000, "uploadThroughput": -1})
        page.fill("#max-tokens", "64")
        page.fill("#input", "Tell me more")
        page.press("#input", "Enter")
        page.wait_for_function("document.querySelector('.assistant.streaming')?.textContent.length > 0")
        page.evaluate("document.getElementById('messages').scrollTop = 0")
        page.wait_for_selector(".assistant.streaming", state="detached", timeout=60_000)
        assert page.evaluate("document.getElementById('messages').scrollTop") == 0
    finally:
        page.close()
