"""The nanochat GPT of the original release, written from its description.

A decoder-only transformer with rotary position embeddings (no learned positions), RMSNorm on queries and
keys, a ReLU^2 MLP four times as wide as the model, untied input embedding and output head, no biases,
parameter-free RMSNorm everywhere, and logits soft-capped at 15. One later nanochat addition is an option
(GPTConfig.residual_scalars, off by default): learned per-layer scalars on the residual stream. The KV cache
serves the inference engine (engine.py): rows of a batch hold sequences of different lengths.
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat_flyte.config import model_width
from nanochat_flyte.model.chunked_loss import IGNORE_INDEX, chunked_cross_entropy

LOGIT_SOFTCAP = 15.0  # logits = 15 * tanh(logits / 15): bounded logits keep early training stable
ROTARY_BASE = 10_000
VOCAB_MULTIPLE = 64  # GPT-2's 50257 is odd; tensor-core matmuls run faster on a padded, aligned vocabulary


@dataclass
class GPTConfig:
    sequence_len: int = 512
    vocab_size: int = 50257
    n_layer: int = 8
    n_head: int = 4
    n_kv_head: int = 4  # fewer than n_head = grouped-query attention
    n_embd: int = 512
    # Learned per-layer scalars on the residual stream (nanochat, 2026-01): before block i,
    # x = resid_lambdas[i] * x + x0_lambdas[i] * x0, where x0 is the normalised token embedding. Off in the
    # original release; nanochat measured -0.010 val bpb at depth 8 for no measurable compute.
    residual_scalars: bool = False

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd: {self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig.n_kv_head: n_head={self.n_head} is not a multiple of {self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"GPTConfig.n_head: head_dim {self.head_dim} must be even for rotary embeddings")

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, sequence_len: int,
                   residual_scalars: bool = False) -> "GPTConfig":
        """nanochat's one-knob model size (config.model_width): width = depth * 64, heads of 128."""
        model_dim, n_head = model_width(depth)
        return cls(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                   n_kv_head=n_head, n_embd=model_dim, residual_scalars=residual_scalars)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    def to_dict(self) -> dict[str, int | bool]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, int | bool]) -> "GPTConfig":
        return cls(**values)  # a checkpoint from before residual_scalars existed has none: the original model


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rotary_table(num_positions: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's angles, (num_positions, head_dim/2) in float32."""
    inv_freq = ROTARY_BASE ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(num_positions, dtype=torch.float32)[:, None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (first half, second half) pair of x (B, T, heads, head_dim) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)
    return rotated.to(x.dtype)  # the angles are float32; keep the autocast dtype of the activations


class KVCache:
    """Keys and values of every layer for up to max_len positions per row, preallocated.

    Each row (one sequence) has its own length: rows of a batch may hold prompts of different lengths, and each
    row's new tokens get rotary positions from its own length on and attend only to its own stored positions.
    A forward pass feeds every row the same number of new tokens (one, when decoding a batch): start(T) before it,
    advance(T) after it. They stay outside the forward pass, so that a compiled forward sees tensors and fixed
    numbers only, not the Python list of lengths that changes at every step.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int):
        if max_len > config.sequence_len:
            raise ValueError(f"KV cache max_len: {max_len} positions exceed the model's context of "
                             f"{config.sequence_len}")
        self.config, self.max_len = config, max_len
        self.shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.lengths = [0] * batch_size  # positions already stored in each row
        # Allocated on first use, in the dtype the keys arrive in (autocast decides it, not us).
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # (B, T) positions of the tokens being fed, set by start()
        self._mask: torch.Tensor | None = None  # (B, 1, T, keys) which stored keys each new token sees
        self._end = 0  # keys to attend over in this forward pass: up to the longest row, or all (attend_all)

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def start(self, num_new: int, device: torch.device, attend_all: bool = False) -> None:
        """Before a forward pass of num_new tokens per row: their positions (B, num_new), and which stored keys
        each one sees. Then the forward pass; then advance(num_new).

        attend_all: attend over every slot of the cache, the ones past each row's length masked out, instead of up
        to the longest row: the shapes then stay the same from step to step, as a compiled decode step needs (the
        extra slots are a few more dot products per token)."""
        end = max(self.lengths) + num_new
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} needed")
        lengths = torch.tensor(self.lengths, device=device)
        self.positions = lengths[:, None] + torch.arange(num_new, device=device)
        if attend_all:
            end = self.max_len
        # Key j is visible to the new token at position p of the same row when j <= p: the row's stored prefix
        # and the new tokens causally; never another row's longer prefix (the slots past this row's length).
        # No mask when every row starts empty: plain causal attention.
        keys = torch.arange(end, device=device)
        self._mask = None if end == num_new else (keys <= self.positions[:, :, None])[:, None]
        self._end = end

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store this layer's new k, v (B, kv_heads, T, head_dim); return the keys and values of every row up
        to the longest (or all max_len of them, with start's attend_all), and the attention mask (None = causal)."""
        if self.keys is None:  # zeros: a masked-out slot still enters the attention sums (times 0); never NaN
            self.keys, self.values = k.new_zeros(self.shape), v.new_zeros(self.shape)
        rows = torch.arange(k.size(0), device=k.device)[:, None]
        # (B, T) indices into rows and positions; the heads dimension in between is taken whole
        self.keys[layer][rows, :, self.positions] = k.transpose(1, 2)
        self.values[layer][rows, :, self.positions] = v.transpose(1, 2)
        return self.keys[layer, :, :, :self._end], self.values[layer, :, :, :self._end], self._mask

    def advance(self, num_tokens: int) -> None:
        """Called once every layer has stored the new tokens."""
        self.lengths = [length + num_tokens for length in self.lengths]

    def unpad(self, padding: list[int]) -> None:
        """Forget the last padding[row] positions of each row: right padding, fed so that rows of different
        lengths could share a forward pass. They are masked from then on, and the row's next tokens overwrite them."""
        self.lengths = [length - pad for length, pad in zip(self.lengths, padding, strict=True)]

    @classmethod
    def stack(cls, caches: list["KVCache"]) -> "KVCache":
        """One cache of the rows of all `caches` (of the same model and max_len, each used at least once); one cache
        is its own stack."""
        if len(caches) == 1:
            return caches[0]
        lengths = [length for cache in caches for length in cache.lengths]
        stacked = cls(caches[0].config, len(lengths), caches[0].max_len)
        stacked.keys = torch.cat([cache.keys for cache in caches], dim=1)
        stacked.values = torch.cat([cache.values for cache in caches], dim=1)
        stacked.lengths = lengths
        return stacked

    def keep(self, rows: list[int]) -> None:
        """Drop every row not in `rows` (the batch shrinks when sequences finish)."""
        index = torch.tensor(rows, device=self.keys.device)
        self.keys, self.values = self.keys.index_select(1, index), self.values.index_select(1, index)
        self.lengths = [self.lengths[row] for row in rows]
        self.shape = (self.shape[0], len(rows), *self.shape[2:])


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, kv_cache: KVCache | None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
        mask = None  # causal
        if kv_cache is not None:  # new queries also see their row's cached prefix
            k, v, mask = kv_cache.update(self.layer, k, v)
        gqa = self.n_kv_head != self.n_head
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache: KVCache | None):
        x = x + self.attn(norm(x), cos, sin, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    """Build on the CPU or the device, move it there, then call init_weights(). Not under torch.device("meta"):
    init_weights() sets the parameters but not the rotary tables, which __init__ computes.

    Parameters stay float32: torch.autocast runs the matmuls in bf16/fp16, and fp16 training needs float32
    weights for its GradScaler.

    loss_chunk_tokens: 0 computes the loss from the logits of every position at once; N > 0 computes lm_head,
    softcap and cross-entropy N tokens at a time without keeping the logits (chunked_loss.py). Training sets it
    from RunConfig.loss_chunk_tokens; it is no part of the model's shape and no part of a checkpoint.
    """

    def __init__(self, config: GPTConfig, loss_chunk_tokens: int = 0):
        super().__init__()
        self.config = config
        self.loss_chunk_tokens = loss_chunk_tokens
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.padded_vocab_size, config.n_embd),
            "h": nn.ModuleList(Block(config, layer) for layer in range(config.n_layer)),
        })
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # A table, not angles computed in forward(): torch.compile fuses that computation into every layer's
        # rotary kernel, forward and backward, and the H200 profile showed it as the costliest memory-bound
        # kernel of a step. Not in state_dict: it follows from the config, and older checkpoints lack it.
        cos, sin = rotary_table(config.sequence_len, config.head_dim)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)
        if config.residual_scalars:  # values set in init_weights
            self.resid_lambdas = nn.Parameter(torch.empty(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.empty(config.n_layer))

    def scalar_parameters(self) -> list[nn.Parameter]:
        """The per-layer residual scalars, [resid_lambdas, x0_lambdas], or [] in the original model."""
        return [self.resid_lambdas, self.x0_lambdas] if self.config.residual_scalars else []

    @torch.no_grad()
    def init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                # 1/sqrt(fan_in), shrunk further for layers narrower than their input (arXiv:2310.17813)
                std = fan_in ** -0.5 * min(1.0, (fan_out / fan_in) ** 0.5)
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=1.0)  # RMSNorm follows, so the scale is free
        # Zero what writes into the residual stream, so every block starts as the identity, and zero the
        # head, so the first prediction is uniform (loss = ln vocab_size).
        nn.init.zeros_(self.lm_head.weight)
        for block in self.transformer.h:
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        if self.config.residual_scalars:  # start as the original model: the residual as it is, no x0 in it
            nn.init.ones_(self.resid_lambdas)
            nn.init.zeros_(self.x0_lambdas)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_reduction: str = "mean",
                kv_cache: KVCache | None = None, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, vocab_size), or with targets the cross-entropy loss ("mean", "sum",
        or "none" for per-token losses shaped like targets; targets of -1 are ignored, and run eagerly, their
        positions never reach the head).
        logits_at, a (B, T) bool mask: only the logits of those positions, (N, vocab_size) in row-major order.
        Evaluation and decoding need a few positions, and at every position the logits would be the largest
        tensor of the forward (16 x 512 x 50,257 floats: 1.6 GB) and lm_head about half of a d8 model's FLOPs.
        kv_cache: its start(T) called before, its advance(T) due after (KVCache)."""
        T = idx.size(1)
        if kv_cache is None:
            if T > self.config.sequence_len:
                raise ValueError(f"{T} tokens exceed the model's context of {self.config.sequence_len}")
            cos, sin = self.rotary_cos[None, :T], self.rotary_sin[None, :T]
        else:  # each row continues from its own length: the caller's kv_cache.start(T) set the positions
            cos, sin = self.rotary_cos[kv_cache.positions], self.rotary_sin[kv_cache.positions]
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B or 1, T, 1, head_dim/2): broadcast over heads
        x = x0 = norm(self.transformer.wte(idx))
        for layer, block in enumerate(self.transformer.h):
            if self.config.residual_scalars:
                x = self.resid_lambdas[layer] * x + self.x0_lambdas[layer] * x0
            x = block(x, cos, sin, kv_cache)
        x = norm(x)
        if logits_at is not None:
            assert targets is None, "logits_at selects logits; the loss needs them all"
            x = x[logits_at]
        if targets is None:
            return self.capped_logits(x)
        if torch.compiler.is_compiling():  # one shape for every batch: a compiled graph scores every position
            return self.head_loss(x, targets, loss_reduction)
        # Only positions whose target counts need logits: SFT trains on the assistant's tokens and RL on the sampled
        # answers, a fraction of each row. Eagerly the rest is skipped (on a GPU the host waits once for the count);
        # in a compiled graph the count, different in every batch, would make each batch a new graph.
        counted = targets != IGNORE_INDEX
        losses = self.head_loss(x[counted], targets[counted], loss_reduction)
        return losses.new_zeros(targets.shape).masked_scatter(counted, losses) if loss_reduction == "none" else losses

    def capped_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of x (..., n_embd): the padding columns dropped, softcapped in float32 whatever the autocast
        dtype."""
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        return LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        """The cross-entropy of x (..., n_embd) against targets (...), as forward() describes it."""
        if self.loss_chunk_tokens:
            return chunked_cross_entropy(x, self.lm_head.weight, targets, vocab_size=self.config.vocab_size,
                                         softcap=LOGIT_SOFTCAP, chunk_tokens=self.loss_chunk_tokens,
                                         reduction=reduction)
        logits = self.capped_logits(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction=reduction)
        return loss.view_as(targets) if reduction == "none" else loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> int:
        """Training FLOPs per token: 6 per matmul weight (2 for the forward multiply-add, 4 for the backward),
        the embedding lookup excluded; plus attention's QK^T and AV, 2 * 2 * seq_len * head_dim per head
        forward, times 3 with the backward."""
        c = self.config
        scalars = sum(p.numel() for p in self.scalar_parameters())
        matmul_params = self.num_params() - self.transformer.wte.weight.numel() - scalars
        return 6 * matmul_params + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len
