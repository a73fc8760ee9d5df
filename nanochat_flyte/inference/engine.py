"""The inference engine: the one way every front end generates text (chat CLI, server, sample CLI, the samples
taken during training, chat evaluation, RL's rollouts).

A request is a prompt (token ids) and its SamplingParams. The engine prefills the prompts that arrive together in
one forward pass (right-padded, each into its own row of a KV cache), then decodes the rows together, one token
per row per forward pass. Every row has its own length and
rotary positions (model.KVCache), so a batch of prompts of different lengths computes, row by row, what each
prompt computes alone. A row stops on its own: at `<|assistant_end|>` or `<|endoftext|>` (the end of the text),
at a stop string, at max_tokens, or where the model's context is full; the batch then shrinks to the rows that
go on. Each row samples with its own seeded generator: a request gives the same tokens in any batch, but for a
batch's float round-off, which can at times tip a draw (or a greedy choice between near-equal logits).

Text streams out as soon as it is certain: never half a UTF-8 character, never text that may turn out to be the
start of a stop string (it is held back until the next tokens decide).

A chat model has a calculator (calculator.py): when it closes an expression (<|python_start|> 48/2 <|python_end|>),
the engine feeds it the result (<|output_start|> 24 <|output_end|>) as its next tokens instead of sampling them.
The text shows the call as GSM8K writes it: "<<48/2=24>>".

    engine = Engine.from_checkpoint("s3://bucket/run/checkpoint")   # base or chat, any fsspec URI
    for delta in engine.stream(engine.chat_prompt([{"role": "user", "content": "Hi"}]), SamplingParams()):
        print(delta, end="", flush=True)

A base checkpoint was never taught the chat format: chat_prompt() then falls back to plain completion of the last
user message (engine.chat_mode says which; front ends say so).
"""

import codecs
import math
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import tiktoken
import torch
import torch.nn.functional as F

from nanochat_flyte.config import CUDA_GRAPH_COMPILE_MODES
from nanochat_flyte.data.conversation import ChatTokens, normalize, render_prompt
from nanochat_flyte.data.tokenizer import EOT
from nanochat_flyte.inference.calculator import calculate
from nanochat_flyte.model.checkpoint import load_model
from nanochat_flyte.model.device import Precision, compiled, replays_cuda_graphs, select_device, select_precision
from nanochat_flyte.model.gpt import GPT, KVCache

STOP_TOKENS = ("<|assistant_end|>", EOT)  # the end of the assistant's turn; the end of the text
# Below this temperature sampling is greedy: the most likely token already has all the probability, and logits divided
# by a temperature under about 1e-37 overflow float32, which would make every probability NaN.
GREEDY_BELOW_TEMPERATURE = 1e-5
CHAT_TEMPERATURE = 0.6  # nanochat's chat default: less repetitive than greedy, still on topic
DEFAULT_TOP_K = 50  # the chat's and the samples': the 50 likeliest tokens, no long tail of nonsense


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None  # None or 0 = whole vocabulary
    seed: int = 42
    stop: tuple[str, ...] = ()  # stop strings, checked on the decoded text

    def validate(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be an integer >= 1, got {self.max_tokens!r}")
        # `not <=` also refuses NaN; an infinite temperature would turn every probability into NaN
        if not isinstance(self.temperature, int | float) or not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature: must be a finite number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"top_k: must be an integer >= 0 (0: the whole vocabulary), got {self.top_k!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed: must be an integer, got {self.seed!r}")
        if not all(isinstance(stop, str) and stop for stop in self.stop):
            raise ValueError(f"stop: must be non-empty strings, got {self.stop!r}")


@dataclass
class Completion:
    tokens: list[int]  # generated ids, without the stop token (with those that spelled a stop string)
    text: str  # decoded, cut before a stop string
    finish_reason: str  # "stop" (assistant_end, eot or a stop string) or "length" (max_tokens or the context)
    forced: list[int] = field(default_factory=list)  # positions in tokens that the calculator wrote, not the model
    stop_token: int | None = None  # the stop token the model sampled, if it stopped on one


def sample_next_token(logits: torch.Tensor, generators: list[torch.Generator], temperature: float,
                      top_k: int | None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B, 1); row i draws its one uniform number from generators[i], so its token
    does not depend on the other rows. Samples by inverting the cumulative distribution: torch.multinomial costs
    ~7 ms for a 50k vocabulary on a CPU, this ~0.3 ms; and the whole batch shares one top-k, softmax and search,
    where a GPU pays a kernel launch for each."""
    if temperature < GREEDY_BELOW_TEMPERATURE:
        return logits.argmax(dim=-1, keepdim=True)
    ids = None
    if top_k and top_k < logits.size(-1):
        logits, ids = torch.topk(logits, top_k, dim=-1)
    cumulative = F.softmax(logits / temperature, dim=-1).cumsum(dim=-1)
    draws = torch.cat([torch.rand(1, generator=generator, device=logits.device) for generator in generators])
    uniform = draws[:, None] * cumulative[:, -1:]
    # the first token whose cumulative probability passes the uniform draw; the clamp guards float round-off
    choice = torch.searchsorted(cumulative, uniform, right=True).clamp_(max=logits.size(-1) - 1)
    return choice if ids is None else ids.gather(-1, choice)


def next_token_logits(model: torch.nn.Module, ids: list[list[int]], *, pad_id: int, device: torch.device,
                      precision: Precision, cache: KVCache | None = None, attend_all: bool = False) -> torch.Tensor:
    """The next-token logits (B, V) after each row of ids: the logits of each row's last token only. Rows of
    different lengths share one forward pass, right-padded: causal attention keeps the padding out of the real
    tokens' sight, and a KV cache forgets it again (KVCache.unpad), so the row's next tokens overwrite it.
    attend_all: see KVCache.start (the compiled decode step)."""
    lengths = [len(row) for row in ids]
    width = max(lengths)
    inputs = torch.tensor([row + [pad_id] * (width - len(row)) for row in ids], device=device)
    if cache is not None:
        cache.start(width, device, attend_all)
    with precision.autocast():
        if width == 1:  # one token a row (a decode step): its logits are all there are
            logits = model(inputs, kv_cache=cache)[:, -1]
        else:
            last = torch.zeros_like(inputs, dtype=torch.bool)
            last[torch.arange(len(ids)), torch.tensor(lengths) - 1] = True
            logits = model(inputs, kv_cache=cache, logits_at=last)
    if cache is not None:
        cache.advance(width)
        cache.unpad([width - length for length in lengths])
    return logits


class TextStream:
    """Token ids in, text deltas out: only whole UTF-8 characters, and text cut before the first stop string.

    Text that could be the start of a stop string is held back until later tokens rule it in or out. Invalid
    UTF-8 becomes U+FFFD, as tokenizer.decode() does.
    """

    def __init__(self, tokenizer: tiktoken.Encoding, stop: tuple[str, ...], shown_as: dict[int, str] | None = None):
        self.tokenizer, self.stop = tokenizer, stop
        self.shown_as = shown_as or {}  # special tokens shown as other text (the calculator's)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # keeps a partial character back
        self.text = ""  # all the text decoded so far (cut at a stop string once one is found)
        self.sent = 0  # characters of text already handed out
        self.stopped = False  # a stop string was found

    def add(self, token: int) -> str:
        if token in self.shown_as:  # a special token ends any character left unfinished before it
            return self._append(self.utf8.decode(b"", final=True) + self.shown_as[token], final=False)
        return self._append(self.utf8.decode(self.tokenizer.decode_single_token_bytes(token)), final=False)

    def close(self) -> str:
        """The text still held back: the end of the text has come."""
        return self._append(self.utf8.decode(b"", final=True), final=True)

    def _append(self, piece: str, final: bool) -> str:
        self.text += piece
        # Text already sent cannot start a stop string (it was held back while it could), so search after it.
        found = [at for stop in self.stop if (at := self.text.find(stop, self.sent)) >= 0]
        if found:
            self.text, self.stopped, final = self.text[:min(found)], True, True
        end = len(self.text) if final else len(self.text) - self._maybe_stop_start()
        delta, self.sent = self.text[self.sent:end], end
        return delta

    def _maybe_stop_start(self) -> int:
        """Length of the longest unsent tail of the text that a stop string starts with."""
        unsent = self.text[self.sent:]
        for length in range(min(len(unsent), max(map(len, self.stop), default=1) - 1), 0, -1):
            if any(stop.startswith(unsent[-length:]) for stop in self.stop):
                return length
        return 0


@dataclass
class Sequence:
    """One request being decoded: its prompt, its tokens so far, its text, and how it finished."""
    prompt: list[int]
    params: SamplingParams
    max_new: int  # max_tokens, or fewer where the prompt leaves less room in the model's context
    stop_ids: frozenset[int]
    text: TextStream
    generator: torch.Generator
    tools: ChatTokens | None = None  # the calculator's tokens, for a chat model
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False  # set from another thread: the batch drops the sequence before its next step
    expression: list[int] | None = None  # the calculation being written, after <|python_start|>
    forced: list[int] = field(default_factory=list)  # the calculator's answer: the next tokens, not sampled
    forced_at: list[int] = field(default_factory=list)  # where in tokens the calculator's answers went
    stop_token: int | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    def accept(self, token: int) -> str:
        """Take the next sampled token; return the text it makes certain (may be empty)."""
        if token in self.stop_ids:
            self.finish_reason, self.stop_token = "stop", token
            return self.text.close()
        self.tokens.append(token)
        delta = self.text.add(token)
        if self.tools is not None:
            self._use_calculator(token)
        if self.text.stopped:
            self.finish_reason = "stop"
        elif len(self.tokens) == self.max_new:
            self.finish_reason = "length"
            delta += self.text.close()
        return delta

    def _use_calculator(self, token: int) -> None:
        tools = self.tools
        if token == tools.python_start:
            self.expression = []
        elif token == tools.python_end and self.expression is not None:
            result = calculate(self.text.tokenizer.decode(self.expression))
            self.expression = None
            if result is not None:  # no answer (not arithmetic): the model goes on by itself
                self.forced = [tools.output_start, *self.text.tokenizer.encode_ordinary(result), tools.output_end]
        elif self.expression is not None:
            self.expression.append(token)

    def next_token(self, sampled: int) -> int:
        """The token this sequence takes next: the calculator's answer comes before anything sampled."""
        if not self.forced:
            return sampled
        self.forced_at.append(len(self.tokens))
        return self.forced.pop(0)

    def completion(self) -> Completion:
        return Completion(list(self.tokens), self.text.text, self.finish_reason, list(self.forced_at),
                          self.stop_token)


class ResidentCache:
    """The KV cache storage of an engine whose decode step replays CUDA graphs, kept from request to request.

    A CUDA graph reads and writes the cache at the addresses it was recorded with; a cache at a new address gets
    its graph recorded anew, at every request (and torch keeps every graph it recorded). So such an engine's
    batches keep their cache in this one storage: a batch of n rows holds its rows in the storage's first n, a view
    that starts at the same address for every n, so each batch size's graph replays from one request to the next.
    The storage doubles when a batch outgrows it (each graph is then recorded once more), and never shrinks. It
    serves one batch at a time: a second batch running alongside keeps its cache in tensors of its own, recorded
    for at each change, until the storage is free.
    """

    def __init__(self, static_addresses: bool):
        self.static_addresses = static_addresses  # tell torch.compile the addresses stay (on a GPU)
        self.keys: torch.Tensor | None = None  # (layers, rows, kv_heads, positions, head_dim)
        self.values: torch.Tensor | None = None
        self._user: weakref.ref | None = None  # the batch the storage serves; free once it is gone
        self._lock = threading.Lock()

    def hold(self, caches: list[KVCache], batch: "Batch") -> KVCache:
        """The rows of `caches`, in order, as the batch's one cache: in the storage where it is free for the batch
        (rows already at its front stay there; the others are copied in once), else in tensors of their own."""
        with self._lock:
            user = self._user() if self._user is not None else None
            lent = user is None or user is batch
            if lent:
                self._user = weakref.ref(batch)
        if not lent:
            cache = KVCache.stack(caches)
        else:
            settled = caches[0].batch_size if self._at_front(caches[0]) else 0
            rows = sum(cache.batch_size for cache in caches)
            self._make_room(caches[-1], rows, settled)
            at = settled
            for part in caches[1:] if settled else caches:
                self.keys[:, at:at + part.batch_size].copy_(part.keys)
                self.values[:, at:at + part.batch_size].copy_(part.values)
                at += part.batch_size
            cache = KVCache(caches[0].config, rows, caches[0].max_len)
            cache.keys, cache.values = self.keys[:, :rows], self.values[:, :rows]
            cache.lengths = [length for part in caches for length in part.lengths]
        if self.static_addresses:  # CUDA graphs read the cache where it lies instead of copying it in each replay
            for tensor in (cache.keys, cache.values):  # (torch exposes this hint only under torch._dynamo)
                torch._dynamo.mark_static_address(tensor, guard=False)
        return cache

    def release(self, batch: "Batch") -> None:
        """The batch has no rows left: the next one may take the storage."""
        with self._lock:
            if self._user is not None and self._user() is batch:
                self._user = None

    def _at_front(self, cache: KVCache) -> bool:
        return self.keys is not None and cache.keys.data_ptr() == self.keys.data_ptr()

    def _make_room(self, like: KVCache, rows: int, settled: int) -> None:
        """Storage for `rows` rows laid out as `like`'s, keeping its first `settled` rows."""
        keys = like.keys
        fits = (self.keys is not None and self.keys.dtype == keys.dtype and self.keys.device == keys.device
                and self.keys.shape[2:] == keys.shape[2:])
        if fits and self.keys.size(1) >= rows:
            return
        capacity = max(rows, 2 * self.keys.size(1)) if fits else rows
        old_keys, old_values = (self.keys, self.values) if settled else (None, None)
        self.keys = self.values = None  # the old storage goes before the new one comes, unless rows stay in it
        shape = (keys.size(0), capacity, *keys.shape[2:])
        self.keys, self.values = keys.new_empty(shape), like.values.new_empty(shape)
        if settled:
            self.keys[:, :settled].copy_(old_keys[:, :settled])
            self.values[:, :settled].copy_(old_values[:, :settled])


class Batch:
    """Sequences that decode together through one KV cache of max_len positions per row."""

    def __init__(self, engine: "Engine", max_len: int):
        self.engine, self.max_len = engine, max_len
        self.sequences: list[Sequence] = []
        self.cache: KVCache | None = None
        self.next_ids: list[int] = []  # each sequence's last token: the input of the next step

    def _logits(self, ids: list[list[int]], cache: KVCache, decoding: bool) -> torch.Tensor:
        """Prefill runs the model as it is (prompts of any length, one token included); a decode step, one token a
        row, runs the engine's decode model (compiled, if the engine compiles it)."""
        engine = self.engine
        compiled = decoding and engine.compiled
        return next_token_logits(engine.decode_model if compiled else engine.model, ids,
                                 pad_id=engine.tokenizer.eot_token, device=engine.device, precision=engine.precision,
                                 cache=cache, attend_all=compiled)

    @staticmethod
    def _sample(logits: torch.Tensor, sequences: list[Sequence]) -> list[int]:
        if all(sequence.params.temperature < GREEDY_BELOW_TEMPERATURE for sequence in sequences):
            sampled = logits.argmax(dim=-1).tolist()
        else:  # rows with the same settings sample together, each with its own generator
            settings: dict[tuple, list[int]] = {}
            for row, sequence in enumerate(sequences):
                settings.setdefault((sequence.params.temperature, sequence.params.top_k), []).append(row)
            ids = torch.empty(len(sequences), dtype=torch.long, device=logits.device)
            for (temperature, top_k), rows in settings.items():
                index = torch.tensor(rows, device=logits.device)
                ids[index] = sample_next_token(logits[index], [sequences[row].generator for row in rows],
                                               temperature, top_k).view(-1)
            sampled = ids.tolist()  # one device sync for the whole batch
        return [sequence.next_token(token) for sequence, token in zip(sequences, sampled)]

    @torch.inference_mode()
    def add(self, sequences: list[Sequence]) -> list[tuple[Sequence, str]]:
        """Prefill the prompts together (one forward pass, one new cache row each), sample each one's first token,
        and let each join the batch unless that token already ends it. Returns (sequence, text delta) for each."""
        if not sequences:
            return []
        cache = KVCache(self.engine.model.config, batch_size=len(sequences), max_len=self.max_len)
        tokens = self._sample(self._logits([sequence.prompt for sequence in sequences], cache, decoding=False),
                              sequences)
        events = [(sequence, sequence.accept(token)) for sequence, token in zip(sequences, tokens)]
        going = [row for row, sequence in enumerate(sequences) if not sequence.done]
        if going:
            cache.keep(going)
            self._settle([part for part in (self.cache, cache) if part is not None])
            # only now: a prefill that fails (out of memory) leaves the batch as it was, its sequences going on
            self.sequences += [sequences[row] for row in going]
            self.next_ids += [tokens[row] for row in going]
        return events

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, str]]:
        """One token for every sequence in the batch. Returns (sequence, text delta) for each; finished sequences
        leave the batch."""
        self._keep_going()  # cancelled ones leave before the forward pass
        if not self.sequences:
            return []
        logits = self._logits([[token] for token in self.next_ids], self.cache, decoding=True)
        tokens = self._sample(logits, self.sequences)
        events = [(sequence, sequence.accept(token)) for sequence, token in zip(self.sequences, tokens)]
        self.next_ids = tokens
        self._keep_going()
        return events

    def _keep_going(self) -> None:
        going = [row for row, sequence in enumerate(self.sequences) if not sequence.done]
        if len(going) == len(self.sequences):
            return
        self.sequences = [self.sequences[row] for row in going]
        self.next_ids = [self.next_ids[row] for row in going]
        if going:
            self.cache.keep(going)
            self._settle([self.cache])
        else:
            self.close()

    def _settle(self, caches: list[KVCache]) -> None:
        """The batch's cache becomes the rows of `caches`, in the engine's storage where it keeps one."""
        resident = self.engine.resident_cache
        self.cache = resident.hold(caches, self) if resident is not None else KVCache.stack(caches)

    def close(self) -> None:
        """Drop every row and the cache (its memory, or the engine's storage, is free for the next batch)."""
        self.sequences, self.next_ids, self.cache = [], [], None
        if self.engine.resident_cache is not None:
            self.engine.resident_cache.release(self)


class Engine:
    """compile: torch.compile the decode step (one token a row). Its kernels are fused and each KV cache spans the
    model's whole context (KVCache.start's attend_all), so one compiled graph serves every step and request of a
    batch size. compile_mode: torch.compile's mode ("reduce-overhead": replayed as CUDA graphs, with the caches in
    one storage kept from request to request, ResidentCache)."""

    def __init__(self, model: GPT, tokenizer: tiktoken.Encoding, precision: Precision, phase: str = "base",
                 compile: bool = False, compile_mode: str = "default"):
        self.model, self.tokenizer, self.precision, self.phase = model, tokenizer, precision, phase
        self.device = model.lm_head.weight.device
        self.compiled = compile
        self.decode_model = compiled(model, compile_mode) if compile else model
        self.cuda_graphs = replays_cuda_graphs(compile, compile_mode, self.device)
        # on a CPU such a mode replays no graphs, but its engine keeps the same storage (and so tests it there)
        keeps_storage = compile and compile_mode in CUDA_GRAPH_COMPILE_MODES
        self.resident_cache = ResidentCache(static_addresses=self.cuda_graphs) if keeps_storage else None
        self.context = model.config.sequence_len  # the longest sequence the model was trained on
        self.max_token_bytes = max(map(len, tokenizer.token_byte_values()))  # GPT-2's: 128
        self.stop_ids = frozenset(tokenizer.encode_single_token(token) for token in STOP_TOKENS
                                  if token in tokenizer.special_tokens_set)
        # the calculator is part of the chat format: a base model never learned to call it
        self.tools = ChatTokens.of(tokenizer) if self.chat_mode else None
        self.tool_text = {} if self.tools is None else {
            self.tools.python_start: "<<", self.tools.python_end: "=", self.tools.output_start: "",
            self.tools.output_end: ">>"}

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, device: str = "auto", compile: bool = False) -> "Engine":
        """Any checkpoint directory or fsspec URI, base or chat; precision follows the device, as in training."""
        torch_device = select_device(device)
        loaded = load_model(checkpoint, torch_device)
        return cls(loaded.model, loaded.tokenizer, select_precision(torch_device, "auto"), loaded.phase, compile)

    def cache_len(self, needed: int) -> int:
        """A new KV cache's positions: what the requests need, or with a compiled decode step the whole context
        (one shape for every request)."""
        return self.context if self.compiled else needed

    # ------------------------------------------------------------------ prompts

    @property
    def chat_mode(self) -> bool:
        """Whether messages are rendered as a conversation (a chat checkpoint) or the last user message is
        continued as plain text (a base checkpoint: it never saw the chat format)."""
        return self.phase == "chat"

    def completion_prompt(self, text: str) -> list[int]:
        # training documents start with <|endoftext|>: with it in front the text reads as the start of a document
        return [self.tokenizer.eot_token, *self.tokenizer.encode_ordinary(text)]

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The prompt for the assistant's next reply. Raises ConversationError for messages that break the rules
        (also in plain completion mode)."""
        if self.chat_mode:  # the replies' calls are those whose result is the calculator's, as the engine wrote them
            return render_prompt(self.tokenizer, messages, is_call=lambda expression, result: calculate(expression)
                                 == result)
        normalize(messages, ends_with="user")  # the same rules in both modes
        return self.completion_prompt(messages[-1]["content"])  # alone: no system message folded into it

    # ------------------------------------------------------------------ generation

    def sequence(self, prompt: list[int], params: SamplingParams) -> Sequence:
        """A request checked and ready to decode. ValueError names the problem."""
        params.validate()
        if not prompt:
            raise ValueError("prompt: needs at least one token")
        if len(prompt) >= self.context:
            raise ValueError(f"prompt: {len(prompt)} tokens leave no room in the model's context of "
                             f"{self.context} tokens")
        if not all(isinstance(token, int) and 0 <= token < self.tokenizer.n_vocab for token in prompt):
            raise ValueError(f"prompt: token ids must be integers in [0, {self.tokenizer.n_vocab})")
        return Sequence(prompt=list(prompt), params=params, max_new=min(params.max_tokens, self.context - len(prompt)),
                        stop_ids=self.stop_ids, text=TextStream(self.tokenizer, tuple(params.stop), self.tool_text),
                        generator=torch.Generator(device=self.device).manual_seed(params.seed), tools=self.tools)

    def generate_batch(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
                       ) -> list[Completion]:
        """All prompts decoded together through one batched KV cache, each row stopping on its own; equal to
        running each prompt alone. `params` holds for every prompt, or is a list: one for each prompt."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params: {len(params)} SamplingParams for {len(prompts)} prompts")
        sequences = [self.sequence(prompt, row_params) for prompt, row_params in zip(prompts, params)]
        if not sequences:
            return []
        batch = Batch(self, max_len=self.cache_len(max(len(s.prompt) + s.max_new for s in sequences)))
        batch.add(sequences)
        while batch.sequences:
            batch.step()
        return [sequence.completion() for sequence in sequences]

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[str]:
        """Text deltas as they are produced."""
        return self.decode(self.sequence(prompt, params))

    def decode(self, sequence: Sequence) -> Iterator[str]:
        """stream() for a Sequence made by sequence(): its completion() tells how it finished."""
        batch = Batch(self, max_len=self.cache_len(len(sequence.prompt) + sequence.max_new))
        events = batch.add([sequence])
        while events:
            yield from (delta for _, delta in events if delta)
            events = batch.step()

    def complete(self, text: str, params: SamplingParams) -> Completion:
        """Plain text completion (a base model's job): the continuation of text."""
        return self.generate_batch([self.completion_prompt(text)], params)[0]


