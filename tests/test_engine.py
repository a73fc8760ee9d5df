"""The inference engine: KV-cache decoding equals full recomputation, batched rows equal the same requests alone
(also when they join a running batch), stop tokens, stop strings, UTF-8 and context limits.

Two kinds of tiny models, both with the real GPT-2 tokenizer:
- a randomized GPT, whose every prediction depends on the whole context (for the cache and batching checks);
- a scripted GPT whose blocks are the identity (zero output projections, as init_weights leaves them), so that each
  prediction depends only on the last token: a chosen token -> next token table, to spell out exact texts.
"""

import threading
import time

import pytest
import torch
from helpers import load_bench

from nanochat_flyte.data.conversation import ConversationError, render_prompt
from nanochat_flyte.data.tokenizer import gpt2_tokenizer
from nanochat_flyte.inference import engine as engine_module
from nanochat_flyte.inference.engine import Batch, Engine, SamplingParams, TextStream, sample_next_token
from nanochat_flyte.inference.scheduler import Request, Scheduler
from nanochat_flyte.model.device import select_precision
from nanochat_flyte.model.gpt import GPT, GPTConfig

TOKENIZER = gpt2_tokenizer()
CPU = select_precision(torch.device("cpu"))
ASSISTANT_END = TOKENIZER.encode_single_token("<|assistant_end|>")
EOT = TOKENIZER.eot_token


def randomized_engine(context: int = 48, seed: int = 0, phase: str = "base") -> Engine:
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=context, vocab_size=TOKENIZER.n_vocab, n_layer=2, n_head=2, n_kv_head=1,
                       n_embd=32)  # grouped-query attention, as bigger configs may use
    model = GPT(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)  # fresh models predict uniformly (zero head); make predictions vary
    return Engine(model.eval(), TOKENIZER, CPU, phase)


def scripted_engine(next_token: dict[int, int], context: int = 64, phase: str = "chat") -> Engine:
    """A GPT that answers token a with next_token[a] (and token 0, "!", after any other token)."""
    config = GPTConfig(sequence_len=context, vocab_size=TOKENIZER.n_vocab, n_layer=1, n_head=1, n_kv_head=1,
                       n_embd=64)
    assert len(next_token) <= config.n_embd
    model = GPT(config)
    model.init_weights()  # zero attention and MLP output projections: x = norm(embedding of the last token)
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
        for slot, (token, following) in enumerate(next_token.items()):
            model.transformer.wte.weight[token, slot] = 1.0  # token -> its own direction
            model.lm_head.weight[following, slot] = 1.0  # that direction -> a high logit for the next token
    return Engine(model.eval(), TOKENIZER, CPU, phase)


def chain(*tokens: int) -> dict[int, int]:
    return dict(zip(tokens, tokens[1:]))


def recompute_greedy(engine: Engine, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(engine.model(torch.tensor([ids]))[0, -1].argmax().item())
    return ids[len(prompt):]


def tokens_of(text: str) -> list[int]:
    return TOKENIZER.encode_ordinary(text)


# ---------------------------------------------------------------------------- the KV cache and batching


def test_kv_cache_stream_equals_greedy_decoding_without_cache():
    engine = randomized_engine()
    prompt = [EOT, *tokens_of("The cat sees")]
    sequence = engine.sequence(prompt, SamplingParams(max_tokens=16))
    text = "".join(engine.decode(sequence))
    assert sequence.tokens == recompute_greedy(engine, prompt, 16)
    assert len(set(sequence.tokens)) > 4  # the randomized model does not just repeat one token
    assert text == TOKENIZER.decode(sequence.tokens) == engine.generate_batch([prompt], SamplingParams(16))[0].text
    assert sequence.completion().finish_reason == "length"


# The sampled cases keep to the top 50 tokens: a draw over the whole 50k vocabulary can land within a float32 rounding
# of a boundary, where a batched row that differs from a lone one by 1e-6 (on some CPUs) draws another token.
@pytest.mark.parametrize("params", [SamplingParams(max_tokens=24),
                                    SamplingParams(max_tokens=24, temperature=1.0, top_k=50),
                                    SamplingParams(max_tokens=24, temperature=0.8, top_k=20, seed=3)],
                         ids=["greedy", "temperature", "top-k"])
def test_batched_rows_give_the_tokens_of_each_request_alone(params):
    engine = randomized_engine(context=32)
    # 3 to 20 tokens: each row has its own positions; the context (32) leaves them 24, 24, 20, 12 new tokens, so
    # rows finish at different steps and the batch shrinks under the others
    prompts = [tokens_of(text)[:length] for text, length in
               [("A teacher builds the long road.", 3), ("My neighbour paints three red apples today.", 7),
                ("Every student remembers the map near the sea, and the old machine follows the river", 12),
                ("The city carries a quiet song with great care. " * 4, 20)]]
    batched = engine.generate_batch(prompts, params)
    alone = [engine.generate_batch([prompt], params)[0] for prompt in prompts]
    assert [len(c.tokens) for c in batched] == [24, 24, 20, 12]
    assert batched == alone
    if params.temperature == 0:
        assert [c.tokens for c in batched] == [recompute_greedy(engine, p, len(c.tokens))
                                               for p, c in zip(prompts, batched)]
    assert len({tuple(c.tokens) for c in batched}) == 4  # four different answers: none took another row's tokens


def test_the_compiled_decode_step_gives_the_tokens_of_the_eager_one():
    """Engine(compile=True): the decode step through torch.compile, over KV caches of the whole context, for a
    batch that shrinks as rows finish (greedy and sampled rows) and for a prompt alone after it."""
    eager = randomized_engine(context=32)
    compiled = Engine(eager.model, TOKENIZER, CPU, "base", compile=True)
    assert isinstance(compiled.decode_model, torch._dynamo.eval_frame.OptimizedModule)
    assert (compiled.cache_len(10), eager.cache_len(10)) == (32, 10)
    prompts = [tokens_of("A teacher builds the long road.")[:3], tokens_of("My neighbour paints three red apples.")]
    params = [SamplingParams(max_tokens=20), SamplingParams(max_tokens=12, temperature=0.8, top_k=20, seed=3)]
    batched = compiled.generate_batch(prompts, params)
    assert batched == eager.generate_batch(prompts, params)
    assert [len(c.tokens) for c in batched] == [20, 12]
    alone = SamplingParams(max_tokens=16)
    assert compiled.generate_batch(prompts[1:], alone) == eager.generate_batch(prompts[1:], alone)


def graph_replaying_engine(eager: Engine) -> Engine:
    """The engine of a decode step that replays CUDA graphs (reduce-overhead): on a CPU it replays none, but it
    keeps its caches in the same ResidentCache."""
    engine = Engine(eager.model, TOKENIZER, CPU, "base", compile=True, compile_mode="reduce-overhead")
    assert engine.resident_cache is not None and not engine.cuda_graphs
    return engine


def test_a_graph_replaying_engine_keeps_every_batch_cache_in_one_storage_lent_to_one_batch_at_a_time():
    """ResidentCache: request after request, a batch's KV cache lies at the same address (where a CUDA graph
    recorded it), whatever the batch's size up to the storage's, also when a request joins a running batch; a batch
    running alongside keeps its own cache and takes the storage once the first is gone; a bigger batch doubles it.
    Every answer is the eager engine's for the request alone."""
    eager = randomized_engine(context=32)
    engine = graph_replaying_engine(eager)
    prompts = [tokens_of(text) for text in ("A teacher builds", "My neighbour paints three", "The river", "A song")]
    params = SamplingParams(max_tokens=6)
    alone = [eager.generate_batch([prompt], params)[0] for prompt in prompts]

    def decode(batch: Batch, rows: list[int], joining: tuple[int, ...] = ()) -> set[int]:
        """The cache's addresses while `rows` decode, `joining` joining them after one step."""
        sequences = {row: engine.sequence(prompts[row], params) for row in (*rows, *joining)}
        batch.add([sequences[row] for row in rows])
        addresses = {batch.cache.keys.data_ptr()}
        batch.step()
        batch.add([sequences[row] for row in joining])
        while batch.sequences:
            addresses.add(batch.cache.keys.data_ptr())
            batch.step()
        assert {row: sequence.completion() for row, sequence in sequences.items()} == {row: alone[row]
                                                                                     for row in sequences}
        return addresses

    def batch() -> Batch:
        return Batch(engine, max_len=engine.context)

    storage = engine.resident_cache
    assert len(decode(batch(), [0], joining=(1,))) == 2 and storage.keys.size(1) == 2  # one row, then two
    address = storage.keys.data_ptr()
    assert decode(batch(), [2, 3]) == {address}
    assert decode(batch(), [0], joining=(1,)) == {address}  # the joining row goes in behind the first
    assert decode(batch(), [2]) == {address}
    holder = batch()
    holder.add([engine.sequence(prompts[0], params)])
    assert address not in decode(batch(), [1, 2])  # while the holder has rows, the storage is its own
    del holder  # gone with its rows (an abandoned stream): the storage is free again
    assert decode(batch(), [3]) == {address}
    assert decode(batch(), [0, 1, 2]) == {storage.keys.data_ptr()} and storage.keys.size(1) == 4  # doubled


def test_a_decode_error_fails_the_requests_in_flight_and_frees_the_cache_for_the_next(monkeypatch):
    """The server's Scheduler: a forward pass that raises (a GPU out of memory) ends the requests in flight with the
    error; the storage of a graph-replaying engine is free again, and the next request is answered as if alone."""
    eager = randomized_engine(context=64)
    engine = graph_replaying_engine(eager)
    failed = threading.Event()

    next_token_logits = engine_module.next_token_logits

    def logits_or_fail(model, ids, **kwargs):  # once, at a decode step of a request well under way
        if kwargs["cache"].lengths[0] >= 5 and not failed.is_set():
            failed.set()
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return next_token_logits(model, ids, **kwargs)

    monkeypatch.setattr(engine_module, "next_token_logits", logits_or_fail)
    scheduler = Scheduler(engine)
    params = SamplingParams(max_tokens=20)

    def answer(prompt: list[int]) -> Request:
        progress = threading.Event()
        request = scheduler.submit(prompt, params, progress.set)
        while not request.take()[1]:
            assert progress.wait(60), "no progress from the decode thread"
            progress.clear()
        return request

    doomed = answer(tokens_of("The cat"))
    assert isinstance(doomed.error, torch.OutOfMemoryError) and len(doomed.sequence.tokens) < 20
    spare = Batch(engine, max_len=engine.context)  # takes the storage only if the failed batch let it go
    spare.add([engine.sequence(tokens_of("A song"), SamplingParams(max_tokens=3))])
    assert spare.cache.keys.data_ptr() == engine.resident_cache.keys.data_ptr()
    spare.close()
    after = answer(tokens_of("The river"))
    assert after.error is None
    assert after.sequence.completion() == eager.generate_batch([tokens_of("The river")], params)[0]


def test_a_prompt_that_fails_to_load_fails_alone_and_the_answers_in_flight_go_on(monkeypatch):
    """A prompt too long for the memory left (a GPU out of memory in its prefill) fails its own request; the batch
    it was to join decodes on, token for token as it would have."""
    engine = randomized_engine(context=64)
    long_prompt = tokens_of("The cat sees a small boat near the sea with great care today")
    next_token_logits = engine_module.next_token_logits

    def logits_or_fail(model, ids, **kwargs):
        if any(len(row) >= len(long_prompt) for row in ids):  # the long prompt's prefill
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return next_token_logits(model, ids, **kwargs)

    monkeypatch.setattr(engine_module, "next_token_logits", logits_or_fail)
    scheduler = Scheduler(engine)
    params = SamplingParams(max_tokens=20)
    progress = threading.Event()
    running = scheduler.submit(tokens_of("The river"), params, progress.set)
    while len(running.sequence.tokens) < 3:  # decoding
        assert progress.wait(60), "no progress from the decode thread"
        progress.clear()
    doomed = scheduler.submit(long_prompt, params, progress.set)
    for request in (doomed, running):
        while not request.take()[1]:
            assert progress.wait(60), "no progress from the decode thread"
            progress.clear()
    assert isinstance(doomed.error, torch.OutOfMemoryError) and not doomed.sequence.tokens[1:]
    assert running.error is None
    monkeypatch.setattr(engine_module, "next_token_logits", next_token_logits)
    assert running.sequence.completion() == engine.generate_batch([tokens_of("The river")], params)[0]


def test_a_one_token_prompt_is_prefilled_by_the_model_not_the_compiled_decode_step():
    eager = randomized_engine(context=32)
    engine = Engine(eager.model, TOKENIZER, CPU, "base", compile=True)
    compiled, stored_before = engine.decode_model, []
    engine.decode_model = lambda inputs, kv_cache: stored_before.append(kv_cache.lengths) or compiled(
        inputs, kv_cache=kv_cache)
    assert engine.generate_batch([[EOT]], SamplingParams(max_tokens=4)) == eager.generate_batch(
        [[EOT]], SamplingParams(max_tokens=4))
    assert stored_before == [[1], [2], [3]]  # three decode steps after the prefill; none over an empty cache


def test_a_row_that_ends_at_its_first_token_leaves_the_prefilled_batch_and_the_others_go_on():
    hello, world, comma, there, moon = (tokens_of(word)[0] for word in (" Hello", " world", ",", " there", " moon"))
    engine = scripted_engine({**chain(hello, world, comma, there, moon), comma: ASSISTANT_END})
    prompts = [[EOT, hello], [EOT, world, world, comma], [EOT, world, world, world, world, world, world, there]]
    batched = engine.generate_batch(prompts, SamplingParams(max_tokens=6))
    assert [(c.tokens, c.finish_reason) for c in batched] == [([world, comma], "stop"), ([], "stop"),
                                                               ([moon] + [0] * 5, "length")]  # "!" is token 0
    assert batched == [engine.generate_batch([prompt], SamplingParams(max_tokens=6))[0] for prompt in prompts]


def test_each_row_may_have_its_own_sampling_params():
    engine = randomized_engine()
    prompts = [tokens_of("The cat sees"), tokens_of("A teacher"), tokens_of("The river carries three")]
    params = [SamplingParams(max_tokens=5), SamplingParams(max_tokens=9, temperature=1.0, seed=1),
              SamplingParams(max_tokens=7, temperature=0.7, top_k=10, seed=2)]
    batched = engine.generate_batch(prompts, params)
    assert batched == [engine.generate_batch([p], q)[0] for p, q in zip(prompts, params)]
    assert [len(c.tokens) for c in batched] == [5, 9, 7]
    with pytest.raises(ValueError, match="params: 2 SamplingParams for 3 prompts"):
        engine.generate_batch(prompts, params[:2])


def test_sampling_follows_the_softmax_of_the_logits_over_temperature_and_top_k():
    generators = [torch.Generator().manual_seed(0)] * 10_000  # one generator drawing for every row, in turn
    logits = torch.tensor([[0.0, 1.0, 2.0, -3.0]]).repeat(10_000, 1)  # 10,000 rows: one draw each
    for temperature, top_k in [(1.0, None), (0.5, None), (2.0, 2)]:
        draws = sample_next_token(logits, generators, temperature, top_k).view(-1)
        frequencies = torch.bincount(draws, minlength=4) / draws.numel()
        kept = logits[0] if top_k is None else logits[0].masked_fill(logits[0] < 1.0, float("-inf"))
        torch.testing.assert_close(frequencies, torch.softmax(kept / temperature, dim=0), atol=0.02, rtol=0)
    assert (sample_next_token(logits[:5], generators[:5], 0.0, None).view(-1) == 2).all()  # temperature 0: argmax
    # a temperature too small to divide by (logits / 1e-40 overflow to inf: every probability NaN) is greedy too
    for top_k in (None, 2):
        assert (sample_next_token(logits[:5], generators[:5], 1e-40, top_k).view(-1) == 2).all()


def test_seeded_sampling_is_reproducible():
    engine = randomized_engine()

    def sample(seed: int, top_k: int | None) -> list[int]:
        params = SamplingParams(max_tokens=12, temperature=1.0, top_k=top_k, seed=seed)
        return engine.generate_batch([[1, 2]], params)[0].tokens

    assert sample(7, None) == sample(7, None)
    assert sample(7, 5) == sample(7, 5)
    assert sample(7, None) != sample(8, None)
    greedy = engine.generate_batch([[1, 2]], SamplingParams(max_tokens=12))[0].tokens
    assert sample(7, 1) == sample(8, 1) == greedy  # top_k 1 leaves only the argmax


def test_scheduler_requests_joining_a_running_batch_match_requests_alone():
    engine = randomized_engine(context=64)
    scheduler = Scheduler(engine)
    prompts = [tokens_of(text) for text in ("The river explains", "A quiet song", "Three red apples near the sea",
                                            "The old machine", "My neighbour sees the bright moon")]
    # sampled rows draw from the top 50, as the chat does: over the whole vocabulary, a batch's float round-off in the
    # logits (they differ from a row's alone by ~1e-6 on some CPUs) moves a 50k-term cumulative sum to flip a draw
    params = [SamplingParams(max_tokens=30 + 3 * i, temperature=0.7 * (i % 2), top_k=50, seed=i)
              for i in range(len(prompts))]
    requests, texts = [], [""] * len(prompts)
    events = [threading.Event() for _ in prompts]
    for index, (prompt, param) in enumerate(zip(prompts, params)):
        requests.append(scheduler.submit(prompt, param, events[index].set))
        if index == 2:  # the first ones are decoding by now: the next join a running batch
            assert events[0].wait(30)
    for index, request in enumerate(requests):
        finished = False
        while not finished:
            assert events[index].wait(60), "no progress from the decode thread"
            events[index].clear()
            deltas, finished = request.take()
            texts[index] += "".join(deltas)
        assert request.error is None
    for prompt, param, request, text in zip(prompts, params, requests, texts):
        alone = engine.generate_batch([prompt], param)[0]
        assert request.sequence.completion() == alone
        assert text == alone.text


def test_a_cancelled_request_leaves_the_batch_and_the_others_go_on():
    engine = randomized_engine(context=256)
    scheduler = Scheduler(engine)
    progress, done = threading.Event(), threading.Event()
    cancelled = scheduler.submit(tokens_of("The cat"), SamplingParams(max_tokens=250), progress.set)
    kept = scheduler.submit(tokens_of("The river"), SamplingParams(max_tokens=40), done.set)
    assert progress.wait(30)
    cancelled.cancel()
    while not kept.take()[1]:
        assert done.wait(60)
        done.clear()
    assert kept.sequence.completion() == engine.generate_batch([tokens_of("The river")], SamplingParams(40))[0]
    decoded = len(cancelled.sequence.tokens)
    # the two decoded in step until the cancel: a cancel that did nothing would leave it as many tokens as the other
    assert decoded < len(kept.sequence.tokens) and cancelled.sequence.finish_reason is None
    time.sleep(0.2)
    assert len(cancelled.sequence.tokens) == decoded


# ---------------------------------------------------------------------------- stop conditions and text


def test_stops_at_assistant_end_and_at_the_end_of_the_text():
    hello, world, comma, there, moon = (tokens_of(word)[0] for word in (" Hello", " world", ",", " there", " moon"))
    engine = scripted_engine({**chain(hello, world, comma, ASSISTANT_END), **chain(EOT, there, moon, EOT)})
    completion = engine.generate_batch([[EOT, hello]], SamplingParams(max_tokens=10))[0]
    assert (completion.tokens, completion.text, completion.finish_reason) == ([world, comma], " world,", "stop")
    # both prompts in one batch: each row stops on its own step
    first, second = engine.generate_batch([[hello], [EOT]], SamplingParams(max_tokens=10))
    assert (second.tokens, second.text, second.finish_reason) == ([there, moon], " there moon", "stop")
    assert first == completion and (first.stop_token, second.stop_token) == (ASSISTANT_END, EOT)
    cut = engine.generate_batch([[hello]], SamplingParams(max_tokens=1))[0]
    assert (cut.finish_reason, cut.stop_token, cut.forced) == ("length", None, [])


def test_a_chat_model_gets_the_calculators_answer_as_its_next_tokens():
    special = TOKENIZER.encode_single_token
    start, python_start, python_end, output_start, output_end = (special(f"<|{name}|>") for name in (
        "assistant_start", "python_start", "python_end", "output_start", "output_end"))
    half, clips = tokens_of("Half is"), tokens_of(" clips")
    expression, answer = tokens_of("48/2"), tokens_of("24")
    # the model writes the call, then whatever it predicts after <|python_end|> ("!") is replaced by the answer; it
    # goes on by itself after <|output_end|>
    engine = scripted_engine(chain(start, *half, python_start, *expression, python_end)
                             | chain(output_end, *clips, ASSISTANT_END))
    completion = engine.generate_batch([[EOT, start]], SamplingParams(max_tokens=20))[0]
    assert completion.tokens == [*half, python_start, *expression, python_end, output_start, *answer, output_end,
                                 *clips]
    assert completion.text == "Half is<<48/2=24>> clips" and completion.finish_reason == "stop"
    # what RL must not train on: the calculator's tokens; and the stop token the model chose
    first_forced = len(half) + 1 + len(expression) + 1
    assert completion.forced == list(range(first_forced, first_forced + len(answer) + 2))
    assert completion.stop_token == ASSISTANT_END
    assert "".join(engine.stream([EOT, start], SamplingParams(max_tokens=20))) == completion.text
    # not arithmetic: no answer, and the model goes on by itself ("!" after "!")
    engine = scripted_engine(chain(start, python_start, *tokens_of("x"), python_end))
    assert engine.generate_batch([[EOT, start]], SamplingParams(max_tokens=6))[0].text == "<<x=!!!"
    # a base model never learned the tool: its special tokens are left alone
    engine = scripted_engine(chain(start, python_start, *expression, python_end), phase="base")
    completion = engine.generate_batch([[EOT, start]], SamplingParams(max_tokens=6))[0]
    assert completion.text == "<|python_start|>48/2<|python_end|>!"


def test_stop_strings_cut_the_text_and_hold_back_what_may_start_one():
    words = [tokens_of(word)[0] for word in (" Hello", " world", ",", " Bob", " and", " the", " moon")]
    engine = scripted_engine(chain(*words, ASSISTANT_END))
    prompt = [words[0]]
    # " world" could be the start of " world!": held back until "," rules it out
    deltas = list(engine.stream(prompt, SamplingParams(max_tokens=20, stop=(" world!", "the m"))))
    assert deltas == [" world,", " Bob", " and", " "]
    assert "".join(deltas) == " world, Bob and "
    completion = engine.generate_batch([prompt], SamplingParams(max_tokens=20, stop=(" world!", "the m")))[0]
    assert (completion.text, completion.finish_reason) == (" world, Bob and ", "stop")
    assert completion.tokens == words[1:7]  # " the" and " moon" spelled the stop string: theirs, not their text
    stopped = engine.generate_batch([prompt], SamplingParams(max_tokens=20, stop=("Bob",)))[0]
    assert (stopped.text, stopped.tokens, stopped.finish_reason) == (" world, ", words[1:4], "stop")
    # held-back text is let out when the sequence ends another way
    ended = list(engine.stream(prompt, SamplingParams(max_tokens=20, stop=(" moon!",))))
    assert "".join(ended) == " world, Bob and the moon" and ended[-1] == " moon"


def test_streaming_never_splits_a_utf8_character():
    smile = tokens_of("🙂")  # one character, two byte-level tokens
    assert len(smile) == 2
    hello, world = tokens_of(" Hello")[0], tokens_of(" world")[0]
    engine = scripted_engine(chain(hello, *smile, world, ASSISTANT_END))
    deltas = list(engine.stream([EOT, hello], SamplingParams(max_tokens=10)))
    assert deltas == ["🙂", " world"]
    # cut after the first byte-level token: the incomplete character becomes U+FFFD, as tokenizer.decode does
    cut = engine.generate_batch([[EOT, hello]], SamplingParams(max_tokens=1))[0]
    assert cut.text == TOKENIZER.decode(smile[:1]) == "\ufffd"


def test_text_stream_with_overlapping_stop_strings():
    stream = TextStream(TOKENIZER, ("ab", "abc", "xyz"))
    deltas = [stream._append(piece, final=False) for piece in ("1a", "x", "y", "2a")]
    assert deltas == ["1", "a", "", "xy2"]  # "a" may start "ab", "x" and "xy" may start "xyz"
    assert stream._append("b", final=False) == "" and stream.stopped and stream.text == "1axy2"


def test_the_context_limits_the_new_tokens():
    engine = randomized_engine(context=16)
    completion = engine.generate_batch([list(range(10))], SamplingParams(max_tokens=100))[0]
    assert (len(completion.tokens), completion.finish_reason) == (6, "length")  # 10 + 6 = the context of 16
    with pytest.raises(ValueError, match="prompt: 16 tokens leave no room in the model's context of 16"):
        engine.generate_batch([list(range(16))], SamplingParams())


@pytest.mark.parametrize("params, field", [(SamplingParams(max_tokens=0), "max_tokens"),
                                           (SamplingParams(temperature=-1), "temperature"),
                                           (SamplingParams(temperature=float("nan")), "temperature"),
                                           (SamplingParams(temperature=float("inf")), "temperature"),
                                           (SamplingParams(top_k=-2), "top_k"),
                                           (SamplingParams(stop=("",)), "stop")])
def test_bad_sampling_params_name_the_field(params, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        randomized_engine().stream([1, 2], params)


def test_bad_prompts_are_refused():
    engine = randomized_engine()
    with pytest.raises(ValueError, match="prompt: needs at least one token"):
        engine.generate_batch([[]], SamplingParams())
    with pytest.raises(ValueError, match="prompt: token ids"):
        engine.generate_batch([[TOKENIZER.n_vocab]], SamplingParams())


# ---------------------------------------------------------------------------- prompts


def test_chat_prompt_renders_the_conversation_for_a_chat_model():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}]
    engine = randomized_engine(phase="chat")
    assert engine.chat_mode and engine.chat_prompt(messages) == render_prompt(TOKENIZER, messages)


def test_a_reply_sent_back_is_read_back_into_the_calls_the_engine_made_and_nothing_else():
    # "<<48/2=24>>" is the calculator's own answer: a tool call; a reply's C++ `<< x = y >>` is not arithmetic, and
    # "<<2+2=5>>" not the calculator's answer: text, as the model wrote it
    engine = randomized_engine(phase="chat")
    reply = "Half is <<48/2=24>>24. cout << x = y >> z; <<2+2=5>>"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply},
                {"role": "user", "content": "Go on"}]
    parts = [{"type": "text", "text": "Half is "}, {"type": "python", "text": "48/2"},
             {"type": "python_output", "text": "24"}, {"type": "text", "text": "24. cout << x = y >> z; <<2+2=5>>"}]
    assert engine.chat_prompt(messages) == render_prompt(TOKENIZER, [messages[0], {"role": "assistant",
                                                                                   "content": parts}, messages[2]])


def test_a_base_model_continues_the_last_user_message_as_plain_text():
    engine = randomized_engine(phase="base")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "The capital of France is"}]
    assert not engine.chat_mode
    assert engine.chat_prompt(messages) == [EOT, *tokens_of("The capital of France is")]
    system = {"role": "system", "content": "You are a helpful assistant."}  # what OpenAI clients often send
    assert engine.chat_prompt([system, messages[-1]]) == engine.chat_prompt([system, *messages]) == engine.chat_prompt(
        messages)
    with pytest.raises(ConversationError, match=r"messages\[1\].role"):  # the rules hold in both modes
        engine.chat_prompt([messages[0], messages[0]])


def test_the_engine_bench_measures_prefill_and_batched_decoding(capsys):
    bench = load_bench("engine_throughput")
    result = bench.main(["--depth", "1", "--seq-len", "64", "--prompt-tokens", "16", "--new-tokens", "4",
                         "--batch-sizes", "1,3", "--repeats", "1", "--device", "cpu"])
    assert result["prefill_ms"] > 0 and set(result["decode_tokens_per_sec"]) == {1, 3}
    assert result["one_prompt_decode_tokens_per_sec"] > 0 and result["compile_mode"] is None
    assert "batch 3:" in capsys.readouterr().out
    compiled = bench.main(["--depth", "1", "--seq-len", "64", "--prompt-tokens", "16", "--new-tokens", "4",
                           "--batch-sizes", "1", "--repeats", "1", "--device", "cpu", "--compile"])
    assert compiled["compile_mode"] == "default" and compiled["one_prompt_decode_tokens_per_sec"] > 0
    assert "compiled decode step (default)" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a prompt and reply that do not fit the context
        bench.main(["--depth", "1", "--seq-len", "16", "--prompt-tokens", "16", "--device", "cpu"])
