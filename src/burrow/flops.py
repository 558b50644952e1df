"""FLOPs per token (PaLM, appendix B) and model FLOPs utilization: shape arithmetic, no torch.

The count is PaLM's (Chowdhery et al. 2022, appendix B): a token costs 6N FLOPs in training
(2N forward, 4N backward: each weight is one multiply-add forward and two backward) plus
12·L·H·Q·T for self-attention, with L layers, H query heads, Q the head width and T the
sequence length. MFU = tokens/s x FLOPs per token / peak FLOP/s. The same formula serves the
training log and the Chinchilla planner.
A RETRO model adds its encoder's work on the neighbour tokens and its cross-attention
(retrieval_flops_per_token).

N is the number of weights a token is multiplied by. PaLM counts its shared embedding matrix
in N: 238.3K tokens/s on 6144 TPU v4 chips (PaLM §4.1, Table 3) is 46.2% MFU with N = 540.35B
and would be 45.8% without the embedding. An embedding costs FLOPs only as the output
projection; the input lookup and a learned position table are not matmuls. So with
`embeddings=True` the embedding matrix is counted once, whether or not it is tied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from burrow import blocks
from burrow.errors import UserError

if TYPE_CHECKING:
    from burrow.config import ModelConfig


def matmul_params(cfg: ModelConfig, *, embeddings: bool = True) -> int:
    """N of the 6N: the weights each token is multiplied by.

    With `embeddings=False` this is Kaplan et al.'s non-embedding count; with `embeddings=True`
    the embedding matrix is added once, as the output projection it is used for (PaLM counts
    its shared embedding so). For a tied model without a learned position table that is
    exactly `cfg.num_params()`. In a sparse layer only the router and the top_k experts a
    token is sent to count (Switch: FLOPs grow with active, not total, parameters).
    """
    params = cfg.num_params(embeddings=False, active=True)
    return params + cfg.vocab_size * cfg.d_model if embeddings else params


def attention_flops_per_token(cfg: ModelConfig, seq_len: int | None = None, *,
                              training: bool = True) -> float:
    """FLOPs of the attention scores and their weighted sum per token: 12·L·H·Q·T in training.

    Forward, each of the H heads of each of the L layers takes T dot products of width Q for
    q·k and as many multiply-adds for the weighted sum of values: 4·H·Q·T. Like PaLM, the
    whole T x T square is counted, not the causal half. Transformer-XL relative attention
    (Dai et al. 2019, §3.3, terms (b) and (d)) adds a second score matrix, (q + v)·W_R·r over T
    distances: 6·H·Q·T. Training is three times the forward (backward: two matmuls per one).
    """
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    if seq_len <= 0:
        raise UserError(f"sequence length must be positive, got {seq_len}")
    score_matmuls = 3 if cfg.positions == "relative" else 2
    forward = 2 * score_matmuls * cfg.n_layers * cfg.n_heads * cfg.head_size * seq_len
    return float(3 * forward if training else forward)


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, *, attention: bool = True,
                    embeddings: bool = True, training: bool = True) -> float:
    """Model FLOPs per token, PaLM appendix B: 6N + 12·L·H·Q·T in training, 2N + 4·L·H·Q·T
    forward only (`training=False`).

    `seq_len` is T (default cfg.max_seq_len). `attention=False` drops the attention term, which
    gives Kaplan's and Chinchilla's C = 6N per token. `embeddings` picks N (see matmul_params).
    Model FLOPs are what the model needs, not what the hardware does: recomputed activations
    (checkpointing) are not counted, as in PaLM's MFU.
    """
    passes = 3 if training else 1
    flops = float(passes * 2 * matmul_params(cfg, embeddings=embeddings))
    if attention:
        flops += attention_flops_per_token(cfg, seq_len, training=training)
    if cfg.retro is not None:
        flops += retrieval_flops_per_token(cfg, attention=attention, training=training)
    return flops


def retrieval_flops_per_token(cfg: ModelConfig, *, attention: bool = True,
                              training: bool = True) -> float:
    """What RETRO (Borgeaud et al. 2021, §2.4) adds per decoder token to 2N and the decoder's
    attention, with the training number of neighbours k.

    The encoder reads k neighbours of r tokens for each chunk of m decoder tokens: its weights,
    and the k and v projections of chunked cross-attention, multiply k·r/m tokens per decoder
    token where N counts them once, so (k·r/m - 1) x 2 x their count more. Attention, forward:
    each token's CCA scores k·r keys in each retrieval layer, 2·s·H·Q·k·r (s = 3 score matmuls
    with relative positions, else 2, as in attention_flops_per_token); each neighbour token
    attends to r neighbour tokens and m chunk tokens in each encoder layer, 4·H'·Q'·(r + m).
    Training is three times the forward.
    """
    retro, encoder = cfg.retro, cfg.retro_encoder()
    k, r, m = retro.neighbours, retro.neighbour_length, retro.chunk_size
    neighbour_tokens = k * r / m  # encoder tokens per decoder token
    inner = cfg.n_heads * cfg.head_size
    retrieval_layers = len(cfg.retrieval_layers)
    key_value = retrieval_layers * 2 * inner * (encoder.d_model + int(cfg.bias))
    per_neighbour_token = blocks.retro_encoder_params(cfg) + key_value
    forward = 2 * (neighbour_tokens - 1) * per_neighbour_token
    if attention:
        score_matmuls = 3 if cfg.positions == "relative" else 2
        forward += 2 * score_matmuls * retrieval_layers * inner * k * r
        encoder_inner = encoder.n_heads * encoder.head_size
        forward += neighbour_tokens * encoder.n_layers * 4 * encoder_inner * (r + m)
    return float(3 * forward if training else forward)


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilization: the fraction of the peak that the model's FLOPs use (PaLM §4.1).

    All three are totals over the same devices: for 8 GPUs, tokens/s of all 8 and 8 x the peak.
    """
    if peak_flops <= 0:
        raise UserError(f"peak FLOP/s must be positive, got {peak_flops}")
    return tokens_per_second * flops_per_token / peak_flops
