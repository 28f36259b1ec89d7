"""The decoder shared by every supported family (Llama, Mistral, Qwen2, Qwen3).

Module attribute names equal the Hugging Face checkpoint keys, so loading is a plain
state-dict copy. Tokens arrive flattened across sequences ([T] ids at explicit [T]
positions); how attention finds each sequence's keys is the engine's business, handed in
as an ``AttentionBackend`` so this file never learns about pages.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from loom.models.config import ModelConfig
from loom.models.layers import (
    GatedMLP,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    fuse_linears,
)


class AttentionBackend(Protocol):
    """Stores this step's K/V for ``layer`` and attends each query over its sequence."""

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q: [T, heads, head_dim]; k, v: [T, kv_heads, head_dim] -> [T, heads * head_dim]."""
        ...


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, q_dim, bias=cfg.attention_bias)
        self.k_proj = Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.v_proj = Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.o_proj = Linear(q_dim, cfg.hidden_size, bias=False)
        self.qkv_proj: Linear | None = None
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def fuse(self) -> None:
        """Replace q/k/v projections by one GEMM (after loading: fewer, larger matmuls)."""
        self.qkv_proj = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        t = x.shape[0]
        if self.qkv_proj is not None and self.q_norm is None:
            # q and k sit side by side in the fused output: rotate them in one call.
            qkv = self.qkv_proj(x)
            qk_dim = (self.num_heads + self.num_kv_heads) * self.head_dim
            qk = apply_rotary(qkv[:, :qk_dim].view(t, -1, self.head_dim), cos, sin)
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            v = qkv[:, qk_dim:].view(t, self.num_kv_heads, self.head_dim)
            out: torch.Tensor = self.o_proj(attn(self.layer, q, k, v))
            return out
        if self.qkv_proj is not None:
            kv_dim = self.num_kv_heads * self.head_dim
            q_, k_, v_ = self.qkv_proj(x).split(
                [self.num_heads * self.head_dim, kv_dim, kv_dim], dim=-1
            )
        else:
            q_, k_, v_ = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q_.view(t, self.num_heads, self.head_dim)
        k = k_.view(t, self.num_kv_heads, self.head_dim)
        v = v_.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        result: torch.Tensor = self.o_proj(attn(self.layer, q, k, v))
        return result


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn)
        out: torch.Tensor = x + self.mlp(self.post_attention_layernorm(x))
        return out


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)


class CausalLM(nn.Module):
    """Decoder + LM head. ``forward`` computes logits only at ``logits_index``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def fuse_projections(self) -> None:
        """Fuse q/k/v and gate/up projections of every layer (done once after loading)."""
        for module in list(self.modules()):
            if isinstance(module, (Attention, GatedMLP)):
                module.fuse()

    def optimize_for_inference(self) -> None:
        """Fuse projections and prepack weights for the fast CPU kernels (after loading)."""
        self.fuse_projections()
        for module in self.modules():
            if isinstance(module, Linear):
                module.prepack()

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        logits_index: torch.Tensor,
        max_position: int | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T]; logits_index: [N] into T -> float32 logits [N, vocab].
        ``max_position``: the largest position, when known (saves reading it back)."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary.cos_sin(positions, x.dtype, max_position)
        for layer in self.model.layers:
            x = layer(x, cos, sin, attn)
        # NOTE: only the rows that are sampled go through the final norm and the LM head;
        # for a 128-token prefill that skips 127 of 128 vocab-sized matmul rows.
        x = self.model.norm(x.index_select(0, logits_index))
        logits: torch.Tensor = self.lm_head(x)
        return logits.float()
