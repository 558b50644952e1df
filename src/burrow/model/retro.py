"""RETRO's model side (Borgeaud et al. 2021, §2.4): the neighbour encoder and chunked
cross-attention (CCA), the extra block part "cca" (blocks.py; settings in model.retro).

Shapes: B batch, T tokens, m chunk size, C = T // m complete chunks, k neighbours per chunk, r
tokens per neighbour (the retrieved chunk and its continuation), d the decoder's width, d' the
encoder's, H heads, D head width, N a flattened batch.

How the neighbours flow: `Transformer.forward(input_ids, neighbours=(B, C, k, r))` puts them
and its token embedding on the ForwardContext. The first retrieval layer's CCA runs the encoder
on them, conditioned on its own input (the activations H_u of the chunk each neighbour was
retrieved for, §2.4), and leaves the encoded neighbours on the context for the later retrieval
layers. Without neighbours every CCA adds zeros: the model is its decoder alone.

With a KV cache (generation), a pass continues a sequence whose first `start` tokens are
cached; `neighbours` still covers every complete chunk of the whole sequence. A chunk's
encoding needs H_u over all its m positions, some computed in earlier passes, so the cache
carries a RetroCache (below): the first retrieval layer's inputs of the unfinished chunk and
the encoded neighbours of the last complete one. CCA's output at a position depends only on its
query and the encoded neighbours of the chunk it attends to, so a cached pass gives what a full
pass over the whole sequence would.

Positions (a choice, documented in docs/retro.md): a neighbour's first m tokens are aligned with
the chunk it was retrieved for, so a query at offset i from chunk u's start and a neighbour
token at offset j are i - j apart. CCA scores that distance with Transformer-XL's relative
attention when the decoder uses it (RETRO's decoder is Gopher's, and Table 9's parameter
increments include a W_R per CCA layer), with rotary positions otherwise; the encoder always
uses rotary positions, which have no parameters (Table 9 leaves no room for a W_R there).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from burrow.config import ModelConfig
from burrow.model.context import ForwardContext, Init
from burrow.model.mlp import dense_mlp
from burrow.model.norms import make_dropout, make_norm
from burrow.model.positions import apply_rotary, rotary_tables, sinusoids

Rotary = tuple[torch.Tensor, torch.Tensor]


class RetroAttention(nn.Module):
    """Multi-head attention of queries from one sequence over keys and values from another (or
    the same), with no causal mask: softmax(q k^T / sqrt(D) + bias) v (RETRO eq. of CA, §2.4).
    Queries and output have width `query_width`, keys and values `key_width`."""

    def __init__(self, query_width: int, key_width: int, heads: int, head_dim: int, bias: bool,
                 dropout: float = 0.0, zero_output: bool = False):
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, head_dim, dropout
        self.zero_output = zero_output
        inner = heads * head_dim
        self.q_proj = nn.Linear(query_width, inner, bias=bias)
        self.k_proj = nn.Linear(key_width, inner, bias=bias)
        self.v_proj = nn.Linear(key_width, inner, bias=bias)
        self.o_proj = nn.Linear(inner, query_width, bias=bias)

    def init_weights(self, init: Init) -> None:
        """q, k, v as linear layers; o as a residual output, or zero with `zero_output` (CCA:
        retrieval starts as a no-op, so a RETRO-fitted model starts from its baseline)."""
        for layer in (self.q_proj, self.k_proj, self.v_proj):
            init.linear(layer)
        if self.zero_output:
            nn.init.zeros_(self.o_proj.weight)
            if self.o_proj.bias is not None:
                nn.init.zeros_(self.o_proj.bias)
        else:
            init.linear(self.o_proj, residual=True)

    def project(self, x: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q (N, H, Tq, D) from x (N, Tq, .); k, v (N, H, Tk, D) from memory (N, Tk, .)."""
        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(*y.shape[:2], self.heads, self.head_dim).transpose(1, 2)
        return split(self.q_proj(x)), split(self.k_proj(memory)), split(self.v_proj(memory))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).flatten(2))  # (N, Tq, query_width)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, query_rotary: Rotary,
                key_rotary: Rotary) -> torch.Tensor:
        q, k, v = self.project(x, memory)
        return self.attend(apply_rotary(q, *query_rotary), apply_rotary(k, *key_rotary), v)


class RelativeCrossPositions(nn.Module):
    """Transformer-XL relative attention (Dai et al. 2019, §3.3) between two sequences: the
    score of query i and key j gains (q_i + v) . W_R s(i - j), s the sinusoidal encoding of a
    distance that may be negative (a neighbour's continuation lies after the query)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.d_model, self.heads, self.head_dim = cfg.d_model, cfg.n_heads, cfg.head_size
        self.W_R = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_size, bias=False)
        self.u = nn.Parameter(torch.zeros(cfg.n_heads, 1, cfg.head_size))
        self.v = nn.Parameter(torch.zeros(cfg.n_heads, 1, cfg.head_size))

    def init_weights(self, init: Init) -> None:
        init.linear(self.W_R)
        nn.init.zeros_(self.u)
        nn.init.zeros_(self.v)

    def no_weight_decay(self) -> list[nn.Parameter]:
        """u and v are biases of the attention scores, not weight matrices."""
        return [self.u, self.v]

    def forward(self, q: torch.Tensor, distance: torch.Tensor, nearest: int, count: int
                ) -> torch.Tensor:
        # q (N, H, Tq, D); distance (Tq, Tk), its values in nearest .. nearest + count - 1
        steps = torch.arange(nearest, nearest + count, device=q.device)
        encodings = self.W_R(sinusoids(steps, self.d_model).to(q.dtype))
        encodings = encodings.view(count, self.heads, self.head_dim)  # (count, H, D)
        by_distance = torch.einsum("nhtd,shd->nhts", q + self.v, encodings)
        index = (distance - nearest).expand(*q.shape[:2], *distance.shape)
        return by_distance.gather(-1, index) / math.sqrt(self.head_dim)  # (N, H, Tq, Tk)


class EncoderLayer(nn.Module):
    """One layer of the neighbour encoder: bidirectional self-attention over the neighbour,
    cross-attention to the retrieving chunk's activations H_u (§2.4: "conditioned on H_u"), and
    an MLP, each behind a norm on a residual stream of width d'."""

    def __init__(self, cfg: ModelConfig, encoder: ModelConfig):
        super().__init__()
        width, heads, head = encoder.d_model, encoder.n_heads, encoder.head_size
        self.self_norm = make_norm(encoder)
        self.self_attn = RetroAttention(width, width, heads, head, cfg.bias, encoder.dropout)
        self.cross_norm = make_norm(encoder)
        self.cross_attn = RetroAttention(width, cfg.d_model, heads, head, cfg.bias,
                                         encoder.dropout)
        self.mlp_norm = make_norm(encoder)
        self.mlp = dense_mlp(encoder, 0)
        self.dropout = make_dropout(encoder.dropout)

    def forward(self, x: torch.Tensor, chunk: torch.Tensor, at_neighbour: Rotary,
                at_chunk: Rotary) -> torch.Tensor:
        # x (N, r, d'), chunk (N, m, d)
        h = self.self_norm(x)
        x = x + self.dropout(self.self_attn(h, h, at_neighbour, at_neighbour))
        x = x + self.dropout(self.cross_attn(self.cross_norm(x), chunk, at_neighbour, at_chunk))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class NeighbourEncoder(nn.Module):
    """RETRO's encoder (§2.4): E_u^j = Encoder(RET(C_u)^j, H_u), each neighbour embedded with
    the decoder's own token embedding (Table 9's increments leave no room for a second table),
    projected to width d' where it differs from d, through the encoder layers and a norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.shape = cfg.retro_encoder()  # width, heads, layers, norm and MLP kind
        width = self.shape.d_model
        self.project = (nn.Linear(cfg.d_model, width, bias=cfg.bias) if width != cfg.d_model
                        else None)
        self.layers = nn.ModuleList(EncoderLayer(cfg, self.shape)
                                    for _ in range(self.shape.n_layers))
        self.norm = make_norm(self.shape)

    def init_weights(self, init: Init) -> None:
        if self.project is not None:
            init.linear(self.project)

    def forward(self, neighbours: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
        # neighbours (B, C, k, r, d) embedded; chunks (B, C, m, d) -> (B, C, k, r, d')
        B, C, k, r, d = neighbours.shape
        m = chunks.shape[2]
        x = neighbours.reshape(B * C * k, r, d)
        if self.project is not None:
            x = self.project(x)
        chunk = chunks[:, :, None].expand(B, C, k, m, d).reshape(B * C * k, m, d)
        # Neighbour token j and chunk token j are aligned: both count from the chunk's start.
        at_neighbour = rotary_tables(self.shape, torch.arange(r, device=x.device))
        at_chunk = rotary_tables(self.shape, torch.arange(m, device=x.device))
        for layer in self.layers:
            x = layer(x, chunk, at_neighbour, at_chunk)
        return self.norm(x).view(B, C, k, r, -1)


class RetroCache:
    """What chunked cross-attention keeps between the passes of one generation: the KV cache's
    `retro` (infer/cache.py), read and written by the first retrieval layer's part.

    length: the tokens that passed with neighbours so far, positions 0 ... length - 1; the next
        pass with neighbours must start there (the model checks it).
    partial (B, length % m, d): the first retrieval layer's inputs at the positions of the
        chunk not yet complete, the start of its H_u; None before the first pass.
    encoded (B, 1, k, r, d'): the encoded neighbours of the last complete chunk, length // m - 1,
        which the next pass's first positions still attend to (a query at position p attends
        to chunk (p + 1) // m - 1); None before the first chunk is complete.

    Nothing older is kept: no later position attends to an earlier chunk.
    """

    def __init__(self) -> None:
        self.length = 0
        self.partial: torch.Tensor | None = None
        self.encoded: torch.Tensor | None = None


class ChunkedCrossAttention(nn.Module):
    """CCA (§2.4, Listing 1), the extra part "cca" of a retrieval layer.

    The attending chunk H_u^+ is the last token of chunk u and the first m - 1 tokens of chunk
    u + 1; it attends to the k neighbours of chunk u, their k x r tokens merged into one key
    axis. So no token sees neighbours retrieved with its own future, the first m - 1 tokens
    see none (their output is zero: the residual passes them on), and the last token of the
    sequence sees the last chunk's. The first retrieval layer also runs the encoder (and holds
    its parameters). With ctx.neighbours None the output is zero.
    """

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer, self.chunk_size = cfg, layer, cfg.retro.chunk_size
        width = cfg.retro.encoder_width or cfg.d_model
        self.attention = RetroAttention(cfg.d_model, width, cfg.n_heads, cfg.head_size,
                                        cfg.bias, cfg.dropout, zero_output=True)
        self.relative = RelativeCrossPositions(cfg) if cfg.positions == "relative" else None
        self.encoder = NeighbourEncoder(cfg) if layer == cfg.retrieval_layers[0] else None

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        # x (B, T, d): positions start ... end - 1 of the sequence (start 0 without a cache)
        B, T, d = x.shape
        m, start = self.chunk_size, ctx.start
        end = start + T
        if ctx.neighbours is None:  # no retrieval
            return torch.zeros_like(x)
        if self.encoder is not None:
            ctx.encoded_neighbours = self.encode(x, ctx)
        first = max(start, m - 1)  # the first position that sees any neighbours
        if first >= end:  # no chunk complete yet
            return torch.zeros_like(x)
        # Listing 1, from position `first`: drop the positions before it, pad to whole
        # attending chunks (the last token of chunk u and the first m - 1 of chunk u + 1), and
        # attend attending chunk u to E_u, for chunks u0 ... end // m - 1.
        u0 = (first + 1) // m - 1
        chunks = end // m - u0
        offset = first - (m - 1) - u0 * m  # of position `first` within its attending chunk
        attending = F.pad(x[:, first - start:], (0, 0, offset, chunks * m - offset - (end - first)))
        attending = attending.reshape(B * chunks, m, d)
        encoded = ctx.encoded_neighbours  # (B, chunks, k, r, d')
        k, r = encoded.shape[2:4]
        memory = encoded.reshape(B * chunks, k * r, -1)
        q, keys, values = self.attention.project(attending, memory)
        query_offset = torch.arange(m - 1, 2 * m - 1, device=x.device)  # from chunk u's start
        key_offset = torch.arange(r, device=x.device).repeat(k)  # within each neighbour
        bias = None
        if self.relative is not None:
            distance = query_offset[:, None] - key_offset[None, :]
            bias = self.relative(q, distance, m - r, m + r - 1)  # distances m-r .. 2m-2
            q = q + self.relative.u
        else:
            q = apply_rotary(q, *rotary_tables(self.cfg, query_offset))
            keys = apply_rotary(keys, *rotary_tables(self.cfg, key_offset))
        y = self.attention.attend(q, keys, values, bias).reshape(B, chunks * m, d)
        y = F.pad(y[:, offset:offset + end - first], (0, 0, first - start, 0))  # positions
        if ctx.statistics:
            ctx.report("cca_output_rms", self.layer, y.detach().square().mean().sqrt())
        return y

    def encode(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        """The encoded neighbours (B, n, k, r, d') of the chunks this pass's positions attend
        to, u0 ... end // m - 1 (see forward), or None where none does.

        Chunks start // m ... end // m - 1 complete in this pass and are encoded here,
        conditioned on this layer's input over their positions (H_u, §2.4); under a cache the
        start of the first was kept by an earlier pass, and this pass keeps what the next
        needs (RetroCache)."""
        B, T, d = x.shape
        m, start, cache = self.chunk_size, ctx.start, ctx.retro_cache
        end = start + T
        done, complete = start // m, end // m  # chunks complete before / after this pass
        inputs = x  # positions done * m ... end - 1
        if cache is not None and cache.partial is not None:
            inputs = torch.cat([cache.partial, x], dim=1)
        encoded = None
        if complete > done:
            chunks = inputs[:, :(complete - done) * m].reshape(B, complete - done, m, d)  # H_u
            encoded = self.encoder(ctx.embed(ctx.neighbours[:, done:complete]), chunks)
        if cache is None:
            return encoded
        previous = cache.encoded  # chunk done - 1
        cache.partial = inputs[:, (complete - done) * m:].clone()
        if encoded is not None:
            cache.encoded = encoded[:, -1:].clone()
        cache.length = end
        if (max(start, m - 1) + 1) // m - 1 < done:  # the first positions attend to chunk done-1
            encoded = previous if encoded is None else torch.cat([previous, encoded], dim=1)
        return encoded


def retro_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters retrieval adds to a model, by name: every chunked cross-attention (the
    encoder within the first) and the norm in front of it. RETRO-fitting (§4.4) trains these
    and freezes the others, those of the baseline."""
    prefixes = []
    for index, block in enumerate(model.blocks):
        for position, part in enumerate(block.extras):
            if isinstance(part, ChunkedCrossAttention):
                prefixes.append(f"blocks.{index}.extras.{position}.")
                if hasattr(block, "extra_norms"):
                    prefixes.append(f"blocks.{index}.extra_norms.{position}.")
    return {name: parameter for name, parameter in model.named_parameters()
            if name.startswith(tuple(prefixes))}
