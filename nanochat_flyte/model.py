"""The nanochat GPT of the original release, written from its description.

A decoder-only transformer with rotary position embeddings (no learned positions), RMSNorm on queries and
keys, a ReLU^2 MLP four times as wide as the model, untied input embedding and output head, no biases,
parameter-free RMSNorm everywhere, and logits soft-capped at 15. Generation runs through a KV cache.
"""

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat_flyte.config import ConfigError

HEAD_DIM = 128  # nanochat keeps heads 128 wide and adds heads as the model widens
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

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd: {self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig.n_kv_head: n_head={self.n_head} is not a multiple of {self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"GPTConfig.n_head: head_dim {self.head_dim} must be even for rotary embeddings")

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, sequence_len: int) -> "GPTConfig":
        """nanochat's one-knob model size: width = depth * 64, heads of 128 (depth 8 -> dim 512, 4 heads)."""
        model_dim = depth * 64
        n_head = max(1, math.ceil(model_dim / HEAD_DIM))
        if model_dim % n_head:
            raise ConfigError("depth", f"depth {depth} gives model_dim {model_dim}, which does not split into "
                                       f"{n_head} equal heads; use an even depth (or 1, 3, 7, 15)")
        return cls(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                   n_kv_head=n_head, n_embd=model_dim)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, int]) -> "GPTConfig":
        return cls(**values)


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rotary_angles(start: int, length: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for positions start..start+length, shaped (1, length, 1, head_dim/2) to broadcast over
    batch and heads. Computed per call (a few thousand numbers): no buffer to keep on the right device."""
    inv_freq = ROTARY_BASE ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    positions = torch.arange(start, start + length, dtype=torch.float32, device=device)
    angles = positions[:, None] * inv_freq[None, :]
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (first half, second half) pair of x (B, T, heads, head_dim) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)
    return rotated.to(x.dtype)  # the angles are float32; keep the autocast dtype of the activations


class KVCache:
    """Keys and values of every layer for the positions seen so far, preallocated for max_len positions."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int):
        self.shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.max_len = max_len
        self.pos = 0  # positions already stored; the next tokens get rotary positions from here
        # Allocated on first use, in the dtype the keys arrive in (autocast decides it, not us).
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new k, v (B, kv_heads, T, head_dim); return all keys and values up to them."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} needed")
        if self.keys is None:
            self.keys, self.values = k.new_empty(self.shape), v.new_empty(self.shape)
        self.keys[layer, :, :, self.pos:end] = k
        self.values[layer, :, :, self.pos:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Called once every layer has stored the new tokens."""
        self.pos += num_tokens


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
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)
        gqa = self.n_kv_head != self.n_head
        Tq, Tk = q.size(2), k.size(2)
        if Tq == Tk:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # new queries see the whole cached prefix, and each other causally
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
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
    """Build anywhere (also under torch.device("meta")), move to the device, then call init_weights().

    Parameters stay float32: torch.autocast runs the matmuls in bf16/fp16, and fp16 training needs float32
    weights for its GradScaler.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.padded_vocab_size, config.n_embd),
            "h": nn.ModuleList(Block(config, layer) for layer in range(config.n_layer)),
        })
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)

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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_reduction: str = "mean",
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, vocab_size), or with targets the cross-entropy loss ("mean", "sum",
        or "none" for per-token losses shaped like targets; targets of -1 are ignored)."""
        T = idx.size(1)
        start = 0 if kv_cache is None else kv_cache.pos
        cos, sin = rotary_angles(start, T, self.config.head_dim, idx.device)
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        # Drop the padding columns, then softcap and score in float32 whatever the autocast dtype.
        logits = self.lm_head(norm(x))[..., :self.config.vocab_size].float()
        logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)
        return loss.view_as(targets) if loss_reduction == "none" else loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> int:
        """Training FLOPs per token: 6 per matmul weight (2 for the forward multiply-add, 4 for the backward),
        the embedding lookup excluded; plus attention's QK^T and AV, 2 * 2 * seq_len * head_dim per head
        forward, times 3 with the backward."""
        c = self.config
        matmul_params = self.num_params() - self.transformer.wte.weight.numel()
        return 6 * matmul_params + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len

    @torch.inference_mode()
    def generate(self, tokens: list[int], max_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 42) -> Iterator[int]:
        """Yield max_tokens new token ids after the prompt: one prefill pass, then one token per step through
        the KV cache. temperature 0 is greedy; top_k None or 0 keeps the whole vocabulary."""
        if not tokens:
            raise ValueError("generate needs at least one prompt token")
        device = self.lm_head.weight.device
        generator = torch.Generator(device=device).manual_seed(seed)
        kv_cache = KVCache(self.config, batch_size=1, max_len=len(tokens) + max_tokens)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self(ids, kv_cache=kv_cache)[:, -1, :]
            ids = sample_next_token(logits, generator, temperature, top_k)
            yield ids.item()


def sample_next_token(logits: torch.Tensor, generator: torch.Generator, temperature: float,
                      top_k: int | None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k:
        kth_largest = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
