"""Evaluation: held-out loss, perplexity, bits per byte and the compressor yardstick."""

from burrow.eval.evaluate import compressor_bits_per_byte, evaluate, split_text, token_nats

__all__ = ["compressor_bits_per_byte", "evaluate", "split_text", "token_nats"]
