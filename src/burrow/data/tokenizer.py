"""A lossless sentencepiece tokenizer with PaLM's vocabulary settings.

PaLM (Chowdhery et al. 2022, section 2) uses a sentencepiece vocabulary that is lossless and
reversible: whitespace is kept, digits are split into single tokens, and characters outside the
vocabulary fall back to their UTF-8 bytes. With those settings sentencepiece alone still loses
one character: its meta symbol "▁" (U+2581), which stands for a space inside pieces, so a "▁" in
the text comes back as " ". `Tokenizer.encode` cuts the text at every literal "▁" and emits the
byte-fallback tokens of its UTF-8 bytes there, which decode to "▁". With that,
``decode(encode(s)) == s`` for every string s without surrogates.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from burrow.errors import UserError

MODEL_FILE = "tokenizer.model"
META_SYMBOL = "\u2581"  # sentencepiece's stand-in for a space
DEFAULT_SAMPLE_BYTES = 16 * 2**20  # compresses the stdlib as well as 32 MiB, in half the time
CHUNK_CHARS = 1024  # training text is cut into pieces of at most this many characters

# PaLM's lossless vocabulary, in sentencepiece's option names. Special ids are sentencepiece's
# defaults: <unk>=0 (never produced for text), <s>=1, </s>=2; there is no padding token.
TRAINER_OPTIONS = {
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": False,
    "allow_whitespace_only_pieces": True,
    "character_coverage": 0.9995,
    "max_sentence_length": 4 * CHUNK_CHARS,  # a UTF-8 character is at most 4 bytes
}


def _chunks(text: str) -> Iterator[str]:
    """Cut a document into training sentences of at most CHUNK_CHARS characters.

    Cuts fall after a newline where possible, so that sentences hold whole lines and pieces
    such as "):\\n" can be learned; a longer line is cut where the limit falls. The text is
    also cut at every "▁", which the encoder never passes to sentencepiece.
    """
    for segment in text.split(META_SYMBOL):
        start = 0
        while start < len(segment):
            end = min(start + CHUNK_CHARS, len(segment))
            if end < len(segment):
                newline = segment.rfind("\n", start, end)
                if newline > start:
                    end = newline + 1
            yield segment[start:end]
            start = end


def sample_chunks(texts: Iterable[str], sample_bytes: int, seed: int) -> list[str]:
    """A uniform random sample of the texts' chunks, at most sample_bytes of UTF-8, in order.

    Each chunk draws a random priority; the chunks with the lowest priorities are kept while
    they fit in the budget (a bottom-k sample over a stream), so memory stays bounded however
    large the corpus, and a corpus smaller than the budget is used whole.
    """
    rng = random.Random(seed)
    kept: list[tuple[float, int, str, int]] = []  # max-heap on priority: (-priority, index, ...)
    kept_bytes = 0
    for index, chunk in enumerate(chunk for text in texts for chunk in _chunks(text)):
        size = len(chunk.encode("utf-8"))
        heapq.heappush(kept, (-rng.random(), index, chunk, size))
        kept_bytes += size
        while kept_bytes > sample_bytes:
            kept_bytes -= heapq.heappop(kept)[3]
    return [chunk for _, _, chunk, _ in sorted(kept, key=lambda item: item[1])]


class Tokenizer:
    """Text to token ids and back, losslessly; wraps a trained sentencepiece model."""

    def __init__(self, model_proto: bytes):
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._byte_lengths: list[int] | None = None  # byte_lengths(), computed on first use
        self.vocab_size: int = self._sp.vocab_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.unk_id: int = self._sp.unk_id()
        # identifies the vocabulary: equal for equal models, wherever they were trained
        self.fingerprint: str = hashlib.sha256(model_proto).hexdigest()[:16]
        self._meta_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in META_SYMBOL.encode()]

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        out_dir: Path,
        *,
        model_type: str = "bpe",
        sample_bytes: int = DEFAULT_SAMPLE_BYTES,
        seed: int = 0,
        num_threads: int | None = None,
    ) -> Tokenizer:
        """Train on a sample of the texts (see `sample_chunks`) and write out_dir/tokenizer.model.

        model_type is "bpe" or "unigram". Raises UserError when there is no text, or when the
        vocabulary size does not fit the text (sentencepiece says which sizes would).
        """
        if model_type not in ("bpe", "unigram"):
            raise UserError(f"unknown tokenizer model type {model_type!r}; use 'bpe' or 'unigram'")
        sentences = sample_chunks(texts, sample_bytes, seed)
        if not sentences:
            raise UserError("cannot train a tokenizer on no text; give a source that holds text")
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                num_threads=num_threads or os.cpu_count() or 1,
                minloglevel=2,
                **TRAINER_OPTIONS,
            )
        except RuntimeError as error:
            reason = str(error).rsplit("] ", 1)[-1].strip()
            raise UserError(
                f"cannot train a {vocab_size}-token tokenizer on this text: {reason}"
            ) from None
        tokenizer = cls(model.getvalue())
        tokenizer.save(out_dir)
        return tokenizer

    @classmethod
    def load(cls, path: Path | str) -> Tokenizer:
        """Load from a .model file, or from the directory that holds tokenizer.model."""
        path = Path(path)
        file = path / MODEL_FILE if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"no tokenizer at {file}; train one with `burrow tokenizer train`")
        return cls(file.read_bytes())

    def save(self, directory: Path | str) -> Path:
        """Write directory/tokenizer.model (creating the directory) and return its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        file = directory / MODEL_FILE
        file.write_bytes(self._sp.serialized_model_proto())
        return file

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without <s> or </s>; decode() gives the text back exactly."""
        if META_SYMBOL not in text:
            return self._sp.encode(text)
        ids: list[int] = []
        for i, segment in enumerate(text.split(META_SYMBOL)):
            if i:
                ids.extend(self._meta_ids)
            ids.extend(self._sp.encode(segment))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (a list, a numpy array or a tensor); <s> and </s> decode to ""."""
        return self._sp.decode(ids.tolist() if hasattr(ids, "tolist") else list(ids))

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of an id, as sentencepiece writes it ("▁" for a space)."""
        return self._sp.id_to_piece(token_id)

    def byte_lengths(self) -> list[int]:
        """The UTF-8 bytes each token id stands for in decoded text: its piece's (a space for
        each "▁"), 1 for a byte-fallback token, 0 for <s>, </s> and <unk>. No dummy prefix is
        added, so a text's token byte lengths add up to its size. Computed once per tokenizer
        (a sentencepiece call per id); each call returns a fresh list."""
        if self._byte_lengths is not None:
            return list(self._byte_lengths)
        lengths = []
        for token in range(self.vocab_size):
            if self._sp.is_control(token) or self._sp.is_unknown(token):
                lengths.append(0)
            elif self._sp.is_byte(token):
                lengths.append(1)
            else:
                piece = self._sp.id_to_piece(token)
                lengths.append(len(piece.replace(META_SYMBOL, " ").encode("utf-8")))
        self._byte_lengths = lengths
        return list(lengths)
