"""The layers the planner gives strategies to: the embedding, each transformer block, the head.

The embedding and the output head (final norm, projection to the vocabulary, loss) are layers of
their own because with a large vocabulary they can hold more memory than a block: a 256k x 18k
matrix and its logits. Each layer is reduced to the few numbers the cost model needs, per token
so that any micro-batch scales them: parameters, FLOPs, saved activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from burrow import blocks, flops
from burrow.errors import UserError

if TYPE_CHECKING:
    from burrow.config import ModelConfig

PRECISIONS = ("bf16", "fp32")

# Bytes per parameter of model state with Adam (ZeRO, Rajbhandari et al. 2020, §3.1: 16 per
# parameter in mixed precision: bf16 weights 2 + bf16 gradients 2 + fp32 master weights,
# momentum and variance 12). Training in fp32 also comes to 16: weights, gradients and the two
# moments at 4 each. The precisions differ in activations and in the bytes communicated.
STATE_BYTES_PER_PARAM = {"bf16": 16, "fp32": 16}
# Bytes per element of activations and of the weights and gradients sent between GPUs.
ELEMENT_BYTES = {"bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class LayerShape:
    """One layer as the cost model sees it; every per-token figure is for one whole sequence
    position, before tensor parallelism divides it."""

    # "embedding", "block 0", ..., "head".
    name: str
    # "embedding", "block" or "head".
    kind: str
    # Parameters the layer holds (all experts of a sparse layer).
    params: int
    # Forward FLOPs per token: 2 per multiply-add of a weight a token meets, plus attention.
    forward_flops_per_token: float
    # Bytes kept for the backward pass per token without checkpointing.
    activation_bytes_per_token: float
    # Bytes kept per token when the layer is checkpointed: its input alone.
    checkpoint_bytes_per_token: float
    # Bytes per token of the activation the layer hands to the next one (d_model elements).
    boundary_bytes_per_token: float
    # Activation-sized collectives tensor parallelism needs in one forward pass (as many again
    # in the backward pass).
    tp_collectives: int


def model_layers(cfg: ModelConfig, seq_len: int, *, precision: str = "bf16",
                 flash_attention: bool = True, shared_head: bool = True) -> list[LayerShape]:
    """The embedding, cfg.n_layers blocks and the head of `cfg` at `seq_len` tokens.

    `shared_head`: with tied embeddings, whether the head uses the embedding's matrix on the
    same GPUs (one pipeline stage holds both) or keeps a copy of its own (the last stage, as
    Megatron does, the two gradients summed). `flash_attention`: attention saves no T x T
    scores (PyTorch's SDPA kernels recompute them in the backward pass).
    """
    if cfg.retro is not None:
        raise UserError("the parallel planner does not model RETRO's retrieval yet; plan the "
                        "dense model it extends (e.g. the matching gopher- preset)")
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    element = ELEMENT_BYTES[precision]
    width, vocab = cfg.d_model, cfg.vocab_size
    boundary = element * width
    embedding_params = vocab * width + (cfg.max_seq_len * width if cfg.positions == "learned"
                                        else 0)
    # The embedding's lookup is no matmul, and it saves only token ids for its backward pass:
    # its output is kept by the first block as that block's input.
    layers = [LayerShape("embedding", "embedding", embedding_params, 0.0, 0.0, 0.0, boundary, 1)]
    attention_forward = flops.attention_flops_per_token(cfg, seq_len, training=False)
    for layer in range(cfg.n_layers):
        layers.append(LayerShape(
            f"block {layer}", "block", blocks.block_params(cfg, layer),
            2.0 * blocks.block_params(cfg, layer, active=True) + attention_forward / cfg.n_layers,
            block_activation_bytes(cfg, seq_len, flash_attention) * element / 2, boundary,
            boundary, 4))
    head_params = blocks.norm_params(cfg) + (0 if cfg.tie_embeddings and shared_head
                                             else vocab * width)
    # The head keeps the final norm's and the projection's inputs, and the logits twice: in the
    # compute precision, and in fp32 for a stable softmax in the loss.
    head_activation = 2 * boundary + vocab * (element + 4)
    layers.append(LayerShape("head", "head", head_params, 2.0 * vocab * width, head_activation,
                             boundary, boundary, 1))
    return layers


def block_activation_bytes(cfg: ModelConfig, seq_len: int, flash_attention: bool) -> float:
    """Bytes a block saves for its backward pass per token in 16-bit training, without tensor
    parallelism: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
    Transformer Models"), eq. 1, s·b·h·(34 + 5·a·s/h) per layer, i.e. 34·h + 5·a·s per token:
    11·h for attention's inputs and outputs, 19·h for the MLP's, 4·h for the two norms' inputs
    (dropout masks included), and 5·a·s for the T x T scores, softmax and its dropout mask,
    which flash attention does not keep. Tensor parallelism with sequence parallelism divides
    all of it by t (their §4.2.2); full recomputation keeps only the 2·s·b·h input (their §5).
    """
    scores = 0 if flash_attention else 5 * cfg.n_heads * seq_len
    return 34.0 * cfg.d_model + scores
