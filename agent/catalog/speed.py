"""The decode speed model: how many bytes one generated token reads, and tokens per second.

Decode is bound by memory reads: each token streams the weights the matmuls use (the
token embedding only when it doubles as the output head) and the K and V of every cell
already in the context. The prediction is made at TYPICAL_CONTEXT_TOKENS of context, not
at n_ctx: a chat turn rarely fills the window, and counting the whole KV cache made the
prediction for a small model several times too slow.

Without anything learned, tokens/s = measured bandwidth x DEFAULT_EFFICIENCY / bytes per
token. Once the device has decoded with this llama.cpp build, the learned effective read
rate (bytes per second, agent.catalog.learned.LearnedSpeed) replaces bandwidth x
efficiency: the variant's own when it has run here, else the build's median over the
variants that have. Pure arithmetic on a GGUF header; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.catalog.estimate import KV_TYPE_BYTES
from agent.catalog.gguf import GGUFInfo

# Fraction of the measured read bandwidth a decode step achieves on CPU before this device
# has measured one itself; the learned rate replaces it after the first generation.
DEFAULT_EFFICIENCY = 0.55
# The context a decoded token is predicted at (capped at n_ctx): a prompt of a few hundred
# tokens and its answer.
TYPICAL_CONTEXT_TOKENS = 512


@dataclass(frozen=True)
class DecodeCost:
    """What one decoded token reads: fixed weights plus K and V per context cell."""

    weights_bytes: int
    kv_bytes_per_cell: float

    def bytes_per_token(self, context_tokens: float) -> float:
        return self.weights_bytes + self.kv_bytes_per_cell * max(context_tokens, 0.0)


def decode_cost(info: GGUFInfo, kv_type: str) -> DecodeCost:
    tied = not any(t.name == "output.weight" for t in info.tensors)
    streamed = sum(t.nbytes for t in info.tensors if t.name != "token_embd.weight" or tied)
    per_cell = (info.block_count * info.head_count_kv * (info.key_length + info.value_length)
                * KV_TYPE_BYTES[kv_type])
    return DecodeCost(streamed, per_cell)


def typical_context(n_ctx: int) -> int:
    return min(n_ctx, TYPICAL_CONTEXT_TOKENS)


def predict_tokens_per_s(
    info: GGUFInfo, n_ctx: int, kv_type: str, bandwidth_gbps: float | None,
    efficiency: float = DEFAULT_EFFICIENCY, learned_bytes_per_s: float | None = None,
) -> float | None:
    """Decode tok/s at the typical context fill; None when neither a learned rate nor a
    measured bandwidth is known."""
    rate = learned_bytes_per_s or (bandwidth_gbps * 1e9 * efficiency if bandwidth_gbps else None)
    if not rate:
        return None
    return rate / decode_cost(info, kv_type).bytes_per_token(typical_context(n_ctx))
