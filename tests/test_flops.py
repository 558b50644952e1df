"""FLOPs per token (PaLM appendix B), MFU and the peak FLOP/s table."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from burrow import flops, presets
from burrow.config import ModelConfig
from burrow.errors import UserError
from burrow.train import hardware

# d=64, 2 layers, 4 heads of 16, SwiGLU of 160, RMSNorm, untied, V=1000, T=128.
HAND = ModelConfig(vocab_size=1000, d_model=64, n_layers=2, n_heads=4, d_ff=160, ffn="swiglu",
                   norm="rmsnorm", positions="rope", tie_embeddings=False, max_seq_len=128)
# Per layer: q, k, v, o 4·64·64 = 16,384; SwiGLU 3·64·160 = 30,720; two norms 128: 47,232.
# Two layers and the final norm: 94,528 non-embedding weights; with the output matrix (the
# input lookup is not a matmul) N = 94,528 + 1000·64 = 158,528.
HAND_NON_EMBEDDING = 94_528
HAND_N = 158_528
# Attention, forward: 2 matmuls x 2 FLOPs x L·H·Q·T = 4·2·4·16·128 = 65,536.
HAND_ATTENTION_FORWARD = 65_536


def test_flops_per_token_by_hand():
    assert flops.matmul_params(HAND) == HAND_N
    assert flops.matmul_params(HAND, embeddings=False) == HAND_NON_EMBEDDING
    assert flops.flops_per_token(HAND, 128) == 6 * HAND_N + 3 * HAND_ATTENTION_FORWARD
    assert flops.flops_per_token(HAND, 128) == 1_147_776
    assert flops.flops_per_token(HAND, 128, attention=False) == 6 * HAND_N
    assert (flops.flops_per_token(HAND, 128, embeddings=False)
            == 6 * HAND_NON_EMBEDDING + 3 * HAND_ATTENTION_FORWARD)
    assert flops.flops_per_token(HAND, 128, training=False) == 2 * HAND_N + HAND_ATTENTION_FORWARD
    assert flops.flops_per_token(HAND) == flops.flops_per_token(HAND, HAND.max_seq_len)
    # 12·L·H·Q·T grows linearly with T.
    assert (flops.attention_flops_per_token(HAND, 256)
            == 2 * flops.attention_flops_per_token(HAND, 128) == 12 * 2 * 4 * 16 * 256)


def test_embedding_counted_once():
    tied = dataclasses.replace(HAND, tie_embeddings=True)
    assert flops.matmul_params(tied) == tied.num_params()
    assert flops.matmul_params(HAND) == HAND.num_params() - HAND.vocab_size * HAND.d_model
    learned = dataclasses.replace(tied, positions="learned")
    assert flops.matmul_params(learned) == learned.num_params() - 128 * 64


def test_relative_attention_has_a_second_score_matrix():
    relative = dataclasses.replace(HAND, positions="relative")
    assert flops.attention_flops_per_token(relative, 128) == 18 * 2 * 4 * 16 * 128


def test_non_positive_sequence_length_is_an_error():
    with pytest.raises(UserError):
        flops.flops_per_token(HAND, 0)


def test_palm_540b_mfu_of_the_paper():
    # PaLM §4.1, Table 3: 238.3K tokens/s on 6144 TPU v4 chips at 2048 tokens is 46.2% MFU.
    cfg = presets.get("palm-540b")
    per_token = flops.flops_per_token(cfg, 2048)
    six_n = flops.flops_per_token(cfg, 2048, attention=False)
    assert six_n == pytest.approx(6 * 540.35e9, rel=1e-4)  # ~3.24e12
    # The attention term is small beside 6N at 2048 tokens: 12·118·48·256·2048 = 3.56e10.
    assert per_token - six_n == 12 * 118 * 48 * 256 * 2048
    assert (per_token - six_n) / six_n < 0.012
    peak = 6144 * 275e12
    assert round(flops.mfu(238.3e3, per_token, peak), 3) == 0.462
    # PaLM's N includes the (shared) embedding: without it the paper's MFU is not reproduced.
    without = flops.flops_per_token(cfg, 2048, embeddings=False)
    assert round(flops.mfu(238.3e3, without, peak), 3) != 0.462


def test_gpt3_training_compute():
    # Brown et al. 2020, Table D.1: GPT-3 175B, 300B tokens, 3.14e23 FLOPs (6N per token).
    cfg = presets.get("gpt3-175b")
    total = flops.flops_per_token(cfg, attention=False) * 300e9
    assert round(total / 1e23, 2) == 3.14


def test_mfu_arithmetic():
    assert flops.mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)
    assert flops.mfu(0.0, 1e9, 1e13) == 0.0
    with pytest.raises(UserError):
        flops.mfu(1000.0, 1e9, 0.0)


@pytest.mark.parametrize(("device_name", "dtype", "peak"), [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12),
    ("NVIDIA H100 80GB HBM3", torch.float32, 67e12),
    ("NVIDIA H100 80GB HBM3", "tf32", 494.5e12),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
    ("NVIDIA H100 NVL", torch.bfloat16, 835.5e12),
    ("NVIDIA GH200 480GB", torch.bfloat16, 989e12),
    ("NVIDIA H200", torch.bfloat16, 989e12),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
    ("NVIDIA A100-PCIE-40GB", torch.float16, 312e12),
    ("NVIDIA A100 80GB PCIe", torch.float32, 19.5e12),
    ("NVIDIA A10G", torch.bfloat16, 70e12),
    ("NVIDIA A10", torch.bfloat16, 125e12),
    ("NVIDIA L4", torch.bfloat16, 121e12),
    ("NVIDIA L40S", torch.bfloat16, 362.05e12),
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165.2e12),
    ("Tesla V100-SXM2-16GB", torch.float16, 125e12),
    ("Tesla V100-PCIE-32GB", torch.float16, 112e12),
    ("Tesla T4", torch.float16, 65e12),
    ("TPU v4", "bf16", 275e12),
])
def test_peak_lookup_by_device_name(device_name, dtype, peak):
    assert hardware.lookup_peak_flops(device_name, dtype) == peak


def test_peak_lookup_unknown():
    assert hardware.lookup_peak_flops("Some Accelerator 9000", torch.bfloat16) is None
    assert hardware.lookup_peak_flops("Tesla V100-SXM2-16GB", torch.bfloat16) is None  # no bf16
    with pytest.raises(UserError):
        hardware.lookup_peak_flops("NVIDIA H100 80GB HBM3", torch.int8)


def test_measured_matmul_flops_are_positive():
    assert hardware.measure_matmul_flops(64, 64, 64, seconds=0.05) > 0


def test_cpu_peak_is_measured_once():
    first = hardware.device_peak_flops("cpu", torch.float32)
    assert first > 0
    assert hardware.device_peak_flops(torch.device("cpu"), "fp32") == first
