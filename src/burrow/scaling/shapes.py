"""The nearest sensible architecture for a parameter count: depth and width rules.

A scaling law gives N, not a model. `choose_shape` turns N into a `ModelConfig` with the rules
the published compute-optimal models follow:

1. **Aspect ratio.** d_model / n_layers is that of published models of the same size,
   interpolated in log N between them (`ASPECT_RATIOS`): 32 for burrow's CPU presets, 64 at
   117M, 78 at 1B and 98 at 9B (Chinchilla Table A9), 102 for Chinchilla 70B (Table 4), 128 for
   GPT-3 175B and 156 for PaLM 540B. Kaplan et al. (2020, §3.1, Figure 5) found the loss within
   a few percent over ratios 20-200, so the rule picks a conventional shape, not a better one.
2. **Width.** The d_model that gives N at that ratio, rounded to a whole number of heads. The
   head width is 128 from d_model 1024 and 64 below (Chinchilla Table A9's kv_size), and for
   the tiny models a CPU can train, 32 below 256 and 16 below 128.
3. **Depth.** The number of layers (at least 2) whose exact count is nearest N. Where that
   still misses N by more than 5% (tiny models, where one layer is a big step), the width on
   the other side of the ideal is taken if its best depth lands nearer.

The smallest model the rules build is 2 layers of d_model 32; a smaller N is an error.

N is the count in C = 6ND: the weights a token is multiplied by, `flops.matmul_params`, with
the embedding matrix once (as the output projection). For a tied model that is `num_params()`,
Hoffmann et al.'s N; an untied model stores one more V x d_model matrix, which costs no FLOPs.

Two architectures: "llama" (burrow's default and Llama's: RoPE, RMSNorm, SwiGLU with d_ff = 8/3
d_model rounded up to a multiple of 256 as Llama does from d_model 1024, of 8 below, untied)
and "chinchilla" (Gopher's and Chinchilla's: relative positions, RMSNorm, GELU with d_ff =
4 d_model, tied embeddings). For 70B the rules give Chinchilla's exact shape with "chinchilla"
(80 layers, d_model 8192, 64 heads of 128) and 81 layers of 8448 with "llama", whose SwiGLU
block has 12 d_model^2 weights against Chinchilla's 13 (W_R of relative attention).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise

from burrow.config import ModelConfig
from burrow.errors import UserError
from burrow.flops import matmul_params

ARCHITECTURES = ("llama", "chinchilla")

# (N, d_model / n_layers) of published models, by size.
ASPECT_RATIOS: tuple[tuple[float, float], ...] = (
    (4.2e6, 32.0),     # burrow small: 192 / 6 (micro and nano: 32 too)
    (1.17e8, 64.0),    # Chinchilla Table A9, 117M: 768 / 12
    (1.018e9, 77.9),   # Table A9, 1.018B: 1792 / 23
    (9.293e9, 97.5),   # Table A9, 9.293B: 4096 / 42
    (7.0e10, 102.4),   # Chinchilla 70B (Table 4): 8192 / 80
    (1.75e11, 128.0),  # GPT-3 175B (Table 2.1): 12288 / 96
    (5.4e11, 156.2),   # PaLM 540B (Table 1): 18432 / 118
)

# The smallest model the rules build: two layers of two 16-wide heads.
MIN_LAYERS = 2
MIN_D_MODEL = 32


def aspect_ratio(n_params: float) -> float:
    """Target d_model / n_layers for N parameters: ASPECT_RATIOS interpolated in log N."""
    points = ASPECT_RATIOS
    if n_params <= points[0][0]:
        return points[0][1]
    for (n_low, r_low), (n_high, r_high) in pairwise(points):
        if n_params <= n_high:
            t = math.log(n_params / n_low) / math.log(n_high / n_low)
            return r_low + t * (r_high - r_low)
    return points[-1][1]


def head_width(d_model: float) -> int:
    """Per-head width: 128 from d_model 1024, 64 from 256 (Chinchilla Table A9), then 32, 16."""
    for threshold, width in ((1024, 128), (256, 64), (128, 32)):
        if d_model >= threshold:
            return width
    return 16


def make_shape(d_model: int, n_layers: int, *, vocab_size: int, max_seq_len: int,
               arch: str = "llama") -> ModelConfig:
    """A ModelConfig of `arch` with this width and depth and the head rule of `head_width`."""
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown architecture {arch!r}; choose {' or '.join(ARCHITECTURES)}")
    heads = d_model // head_width(d_model)
    if arch == "chinchilla":
        # Gopher / Chinchilla (Rae et al. 2021, §3; Hoffmann et al. 2022, §4.1).
        return ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                           n_heads=heads, d_ff=4 * d_model, ffn="gelu", norm="rmsnorm",
                           positions="relative", tie_embeddings=True, max_seq_len=max_seq_len)
    multiple = 256 if d_model >= 1024 else 8  # Llama's multiple_of; ModelConfig's default below
    d_ff = -(-8 * d_model // 3 // multiple) * multiple
    return ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                       n_heads=heads, d_ff=d_ff, ffn="swiglu", norm="rmsnorm", positions="rope",
                       tie_embeddings=False, max_seq_len=max_seq_len)


def smallest_shape(*, vocab_size: int, max_seq_len: int, arch: str = "llama") -> ModelConfig:
    """The smallest model the rules build (MIN_LAYERS layers of MIN_D_MODEL)."""
    return make_shape(MIN_D_MODEL, MIN_LAYERS, vocab_size=vocab_size, max_seq_len=max_seq_len,
                      arch=arch)


def _width(n_params: float, ratio: float, per_layer: float, per_width: float) -> float:
    """d solving per_layer·d³/ratio + per_width·d = N (layers = d / ratio), by bisection."""
    low, high = 1.0, 1e6
    for _ in range(100):
        mid = math.sqrt(low * high)
        if per_layer * mid**3 / ratio + per_width * mid > n_params:
            high = mid
        else:
            low = mid
    return low


def choose_shape(n_params: float, *, vocab_size: int = 32_000, max_seq_len: int = 2048,
                 arch: str = "llama") -> ModelConfig:
    """The nearest sensible architecture to N parameters (the rules in the module docstring).

    Raises UserError when N is below the smallest model the rules build.
    """
    smallest = smallest_shape(vocab_size=vocab_size, max_seq_len=max_seq_len, arch=arch)
    if n_params < matmul_params(smallest):
        raise UserError(f"{n_params:,.0f} parameters is below the smallest sensible model: "
                        f"{MIN_LAYERS} layers of d_model {MIN_D_MODEL} with a {vocab_size:,}-token "
                        f"vocabulary has {matmul_params(smallest):,}; raise the budget or lower "
                        "the vocabulary size")

    def count(d_model: int, n_layers: int) -> int:
        return matmul_params(make_shape(d_model, n_layers, vocab_size=vocab_size,
                                        max_seq_len=max_seq_len, arch=arch))

    # Weights per layer as a multiple of d_model², measured at the width found so far (the
    # rounding of d_ff makes it depend on the width a little).
    d_model = 1024
    for _ in range(3):
        per_layer = (count(d_model, 2) - count(d_model, 1)) / d_model**2
        ideal = _width(n_params, aspect_ratio(n_params), per_layer, vocab_size)
        step = head_width(ideal)
        d_model = max(MIN_D_MODEL, step * max(1, round(ideal / step)))
    below = max(MIN_D_MODEL, step * math.floor(ideal / step))
    candidates = [(width, _depth(count, width, n_params)) for width in (below, below + step)]

    def miss(shape: tuple[int, int]) -> float:
        return abs(math.log(count(*shape) / n_params))

    # The width nearer the ideal keeps the aspect ratio; the other one is taken only when the
    # first misses N by more than 5% (tiny models, where one layer is a large step).
    nearest = min(candidates, key=lambda shape: abs(shape[0] - ideal))
    other = max(candidates, key=lambda shape: abs(shape[0] - ideal))
    width, depth = other if miss(nearest) > 0.05 and miss(other) < miss(nearest) else nearest
    return make_shape(width, depth, vocab_size=vocab_size, max_seq_len=max_seq_len, arch=arch)


def _depth(count: Callable[[int, int], int], d_model: int, n_params: float) -> int:
    """The number of layers (at least MIN_LAYERS) whose count at this width is nearest N."""
    layer = count(d_model, 2) - count(d_model, 1)
    base = count(d_model, 1) - layer  # embedding and final norm
    guess = max(MIN_LAYERS, round((n_params - base) / layer))
    return min((n for n in (guess - 1, guess, guess + 1) if n >= MIN_LAYERS),
               key=lambda n: abs(math.log(count(d_model, n) / n_params)))
