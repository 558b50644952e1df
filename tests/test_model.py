"""The transformer against naive references: attention, positions, losses, generation."""

import math

import pytest
import torch
import torch.nn.functional as F

from burrow import ModelConfig, Transformer, UserError
from burrow.infer import generate, sample_next
from burrow.model.norms import RMSNormFunction
from burrow.model.positions import rotary_tables


def tiny(**overrides) -> ModelConfig:
    fields = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=48)
    fields.update(overrides)
    return ModelConfig(**fields)


VARIANTS = {
    "rope-mha-serial": tiny(),
    "rope-mqa-parallel": tiny(n_kv_heads=1, block="parallel", ffn="gelu", norm="layernorm"),
    "rope-gqa": tiny(n_kv_heads=2, head_dim=12),
    "relative-gopher": tiny(positions="relative", tie_embeddings=True, ffn="gelu"),
    "learned-gpt3": tiny(positions="learned", bias=True, norm="layernorm", ffn="gelu",
                         tie_embeddings=True),
    "palm-fan-in": tiny(n_kv_heads=1, block="parallel", tie_embeddings=True, init="fan_in",
                        z_loss=1e-4),
}


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    # Non-zero u, v and biases so that the references test them too.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith((".u", ".v", "bias")):
                parameter.normal_(std=0.1)
    return model


def norm_by_hand(norm: torch.nn.Module, x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich 2019) or LayerNorm (Ba et al. 2016) from their formulas, with
    the module's weights only."""
    if cfg.norm == "rmsnorm":
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * norm.weight
    centred = x - x.mean(-1, keepdim=True)
    y = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * norm.weight
    return y if norm.bias is None else y + norm.bias


def linear_by_hand(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    y = x @ layer.weight.T
    return y if layer.bias is None else y + layer.bias


def mlp_by_hand(mlp: torch.nn.Module, x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """SwiGLU (Shazeer 2020): down(silu(gate x) * up x); GELU MLP: down(gelu(up x))."""
    if cfg.ffn == "swiglu":
        gate = linear_by_hand(mlp.gate_proj, x)
        hidden = gate * torch.sigmoid(gate) * linear_by_hand(mlp.up_proj, x)
    else:
        up = linear_by_hand(mlp.up_proj, x)
        hidden = 0.5 * up * (1 + torch.erf(up / math.sqrt(2)))
    return linear_by_hand(mlp.down_proj, hidden)


def naive_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """The forward pass written out position by position, from the papers' equations, with
    the model's weights and none of its modules' code."""
    cfg = model.cfg
    B, T = ids.shape
    H, K, D = cfg.n_heads, cfg.kv_heads, cfg.head_size
    x = model.embed.weight[ids]
    if cfg.positions == "learned":
        x = x + model.pos_embed.weight[:T]
    for block in model.blocks:
        attn = block.attn
        h = norm_by_hand(block.attn_norm, x, cfg)
        q = linear_by_hand(attn.q_proj, h).view(B, T, H, D)
        k = linear_by_hand(attn.k_proj, h).view(B, T, K, D).repeat_interleave(H // K, dim=2)
        v = linear_by_hand(attn.v_proj, h).view(B, T, K, D).repeat_interleave(H // K, dim=2)
        if cfg.positions == "rope":
            q = rope_by_complex_numbers(q, cfg.rope_theta)
            k = rope_by_complex_numbers(k, cfg.rope_theta)
        scores = torch.full((B, H, T, T), float("-inf"))
        for i in range(T):
            for j in range(i + 1):
                if cfg.positions == "relative":
                    rel = attn.relative
                    r = linear_by_hand(rel.W_R, sinusoid_by_hand(i - j, cfg.d_model))
                    r = r.view(H, D)
                    content = ((q[:, i] + rel.u[:, 0]) * k[:, j]).sum(-1)
                    position = ((q[:, i] + rel.v[:, 0]) * r).sum(-1)
                    scores[:, :, i, j] = (content + position) / math.sqrt(D)
                else:
                    scores[:, :, i, j] = (q[:, i] * k[:, j]).sum(-1) / math.sqrt(D)
        weights = scores.softmax(-1)  # (B, H, T, T)
        y = torch.einsum("bhij,bjhd->bihd", weights, v).reshape(B, T, H * D)
        attended = linear_by_hand(attn.o_proj, y)
        if cfg.block == "parallel":
            x = x + attended + mlp_by_hand(block.mlp, h, cfg)
        else:
            x = x + attended
            x = x + mlp_by_hand(block.mlp, norm_by_hand(block.mlp_norm, x, cfg), cfg)
    x = norm_by_hand(model.norm, x, cfg)
    weight = model.embed.weight if model.head is None else model.head.weight
    return x @ weight.T * model.logit_scale


def sinusoid_by_hand(distance: int, dim: int) -> torch.Tensor:
    """Vaswani et al.'s encoding of one distance, sines then cosines (Transformer-XL's order):
    sin(d / 10000^(2i/dim)), cos(d / 10000^(2i/dim))."""
    angles = torch.tensor([distance / 10000 ** (2 * i / dim) for i in range(dim // 2)])
    return torch.cat([angles.sin(), angles.cos()])


def rope_by_complex_numbers(x: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE as a rotation in the complex plane of pairs (x_i, x_{i+D/2}): x * e^{i t w}."""
    _, T, _, D = x.shape
    half = D // 2
    pairs = torch.complex(x[..., :half], x[..., half:])
    frequency = theta ** (-torch.arange(half) / half)
    angle = torch.arange(T)[:, None] * frequency[None, :]
    rotated = pairs * torch.polar(torch.ones_like(angle), angle)[None, :, None, :]
    return torch.cat([rotated.real, rotated.imag], dim=-1)


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_matches_naive_reference(name):
    model = build(VARIANTS[name])
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, naive_logits(model, ids), atol=2e-5,
                                   rtol=1e-4)


@pytest.mark.parametrize("name", VARIANTS)
def test_causal(name):
    model = build(VARIANTS[name])
    ids = torch.randint(0, model.cfg.vocab_size, (1, 12))
    changed = ids.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % model.cfg.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[:, :7], model(changed).logits[:, :7])


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_cache_generation_equals_full_forward_passes(name):
    model = build(VARIANTS[name])
    prompt = torch.randint(0, model.cfg.vocab_size, (3, 5))
    generated = generate(model, prompt, 30, temperature=0.0)
    sequence = prompt
    with torch.no_grad():
        for _ in range(30):
            next_token = model(sequence).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)


def test_generation_leaves_the_model_ready_to_train():
    """generate runs in inference mode, yet what it returns is an ordinary tensor that a
    training step accepts, and the model is back in training mode."""
    model = build(VARIANTS["rope-mha-serial"]).train()
    generated = generate(model, torch.zeros(2, 3, dtype=torch.long), 6, temperature=0.0)
    assert not generated.is_inference() and model.training
    model(generated[:, :-1], labels=generated[:, 1:]).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("rows", [1, 3, 257])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("outputs", [48, 53])
def test_row_block_linear_equals_the_linear_it_views(rows, bias, outputs):
    """Block by block (up to 256 rows) or whole (more), with rows left over from the blocks
    or not: the layer's own product, its weight not copied."""
    from burrow.infer.matvec import BLOCKS, MAX_ROWS, RowBlockLinear

    linear = torch.nn.Linear(40, outputs, bias=bias)
    blocked = RowBlockLinear(linear.weight, linear.bias)
    assert blocked.blocks.data_ptr() == linear.weight.data_ptr() and rows != MAX_ROWS
    assert (0 if blocked.rest is None else len(blocked.rest)) == outputs % BLOCKS
    x = torch.randn(1, rows, 40)
    with torch.no_grad():
        torch.testing.assert_close(blocked(x), linear(x), atol=1e-6, rtol=1e-6)


def structure(model: torch.nn.Module) -> list[tuple[str, type, int]]:
    """Every module's name and type and every tensor's identity: what decoding must not change."""
    return ([(name, type(module), 0) for name, module in model.named_modules()]
            + [(name, type(tensor), id(tensor)) for name, tensor in model.named_parameters()])


@pytest.mark.parametrize("name", ["rope-mha-serial", "learned-gpt3"])
def test_row_block_decoding_gives_the_logits_of_the_default_kernels(monkeypatch, name):
    """Every linear layer, and a tied model's embedding as its output layer, read block by
    block in a decoding copy: same logits, same greedy tokens as the plain layers, the same
    weights (shared, not copied), and the model itself untouched."""
    from burrow.infer import matvec
    from burrow.infer.matvec import decoding_copy

    model = build(VARIANTS[name])
    tied = model.cfg.tie_embeddings
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    before = structure(model)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
        view, swapped = decoding_copy(model, min_bytes=0, max_stacked_bytes=-1)
        assert swapped == len(linears) + tied and view is not model
        assert isinstance(view.head, matvec.RowBlockLinear)
        assert view.head.weight.data_ptr() == model.output_weight.data_ptr()
        torch.testing.assert_close(view(ids).logits, expected, atol=1e-5, rtol=1e-5)
        assert decoding_copy(model)[1] == 0  # small enough for the caches: no blocks
    assert decoding_copy(model, min_bytes=0) == (model, 0)  # a gradient is wanted
    assert structure(model) == before
    monkeypatch.setattr(matvec, "MIN_BYTES", 0)
    steps = matvec.MIN_STACKED_STEPS  # enough for stacked q, k, v and gate, up too
    greedy = generate(model, ids, steps, temperature=0.0)
    sequence = ids
    with torch.no_grad():
        for _ in range(steps):
            sequence = torch.cat([sequence, model(sequence).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(greedy, sequence)
    assert structure(model) == before


@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize("name", ["rope-gqa", "learned-gpt3", "palm-fan-in"])
def test_stacked_decoding_gives_the_logits_of_separate_layers(name, blocked):
    """q, k, v (of GQA's unequal widths, with biases or not) and gate, up stacked into one
    product each in a decoding copy: the same logits; a gradient, or a model over the size
    limit, keeps them apart; the model itself never holds a stacked copy."""
    from burrow.infer.matvec import MIN_STACKED_STEPS, decoding_copy
    from burrow.model.attention import Attention
    from burrow.model.mlp import SwiGLU

    def stackable(module):
        return [m for m in module.modules() if isinstance(m, (Attention, SwiGLU))]

    model = build(VARIANTS[name])
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9))
    min_bytes = 0 if blocked else 2**40
    with torch.no_grad():
        expected = model(ids).logits
        view, _ = decoding_copy(model, min_bytes=min_bytes)
        assert all(m.stacked is not None for m in stackable(view))
        attention = stackable(view)[0]
        assert attention.stacked.output_sizes == [
            getattr(attention, name).out_features for name in attention.stackable]
        torch.testing.assert_close(view(ids).logits, expected, atol=1e-5, rtol=1e-5)
        view, _ = decoding_copy(model, min_bytes=min_bytes, max_stacked_bytes=1000)
        assert all(m.stacked is None for m in stackable(view))
        view, _ = decoding_copy(model, min_bytes=min_bytes, steps=MIN_STACKED_STEPS - 1)
        assert all(m.stacked is None for m in stackable(view))  # too few steps to repay it
    view, _ = decoding_copy(model, min_bytes=min_bytes)  # a gradient is wanted
    assert view is model
    assert all(m.stacked is None for m in stackable(model))


@pytest.mark.parametrize("name", ["rope-gqa", "palm-fan-in"])
def test_compiled_decode_steps_generate_the_same_tokens(monkeypatch, name):
    """One compiled graph serves every position: the same tokens as eager, sampled or not,
    with the weights read block by block (model/matvec.py)."""
    from burrow.infer import matvec

    monkeypatch.setattr(matvec, "MIN_BYTES", 0)
    model = build(VARIANTS[name])
    prompt = torch.randint(0, model.cfg.vocab_size, (2, 4))
    before = generate(model, prompt, 12, temperature=0.0)
    assert torch.equal(generate(model, prompt, 12, temperature=0.0, compile=True), before)
    assert torch.equal(generate(model, prompt, 12, temperature=0.9, seed=3, compile=True),
                       generate(model, prompt, 12, temperature=0.9, seed=3))
    with torch.no_grad():  # the compiled step reads the weights, it did not keep them
        for parameter, other in zip(model.parameters(), build(VARIANTS[name], 1).parameters()):
            parameter.copy_(other)
    after = generate(model, prompt, 12, temperature=0.0)
    assert not torch.equal(after, before)
    assert torch.equal(generate(model, prompt, 12, temperature=0.0, compile=True), after)
    # Other prompt and generation lengths in the same bucket of cache lengths: the same graph.
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    longer = torch.randint(0, model.cfg.vocab_size, (2, 9))
    assert torch.equal(generate(model, longer, 5, temperature=0.0, compile=True),
                       generate(model, longer, 5, temperature=0.0))
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("name", VARIANTS)
def test_chunked_prefill_with_cache_equals_one_pass(name):
    from burrow.infer import KVCache

    model = build(VARIANTS[name])
    ids = torch.randint(0, model.cfg.vocab_size, (2, 14))
    cache = KVCache(model.cfg, 2, 14)
    with torch.no_grad():
        first = model(ids[:, :6], cache=cache).logits
        second = model(ids[:, 6:], cache=cache, start=6).logits
        torch.testing.assert_close(torch.cat([first, second], 1), model(ids).logits,
                                   atol=1e-5, rtol=1e-4)


def test_cache_reads_the_written_positions_eagerly_and_all_of_them_compiled():
    """An int start: attention reads positions 0..start+T-1 and needs no mask for one query.
    A tensor start (a compiled step): the whole buffers, the unwritten positions masked."""
    from burrow.infer import KVCache

    cfg = VARIANTS["rope-gqa"]
    cache = KVCache(cfg, 2, 10)
    k, v = torch.randn(2, 2, 3, 12), torch.randn(2, 2, 3, 12)
    keys, values = cache.update(0, 4, k, v)
    assert keys.shape[2] == values.shape[2] == 7 and torch.equal(keys[:, :, 4:], k)
    positions = torch.arange(4, 7)
    assert torch.equal(cache.visible(4, positions), torch.arange(7)[None] <= positions[:, None])
    assert cache.visible(6, torch.tensor([6])) is None
    keys, _ = cache.update(0, torch.tensor(7), k[:, :, :1], v[:, :, :1])
    assert keys.shape[2] == 10 and torch.equal(keys[:, :, 7], k[:, :, 0])
    assert torch.equal(cache.visible(torch.tensor(7), torch.tensor([7]))[0],
                       torch.arange(10) <= 7)
    for start in (4, torch.tensor(4)):  # RoPE's tables, made once for every position
        for table, expected in zip(cache.rotary_at(start, positions),
                                   rotary_tables(cfg, positions)):
            torch.testing.assert_close(table, expected)


def test_sampling_is_seeded_and_respects_top_k():
    model = build(VARIANTS["rope-mha-serial"])
    prompt = torch.zeros(1, 3, dtype=torch.long)
    a = generate(model, prompt, 20, temperature=1.0, top_k=5, seed=7)
    b = generate(model, prompt, 20, temperature=1.0, top_k=5, seed=7)
    assert torch.equal(a, b)
    logits = torch.randn(4, 50)
    allowed = logits.topk(5, dim=-1).indices
    for seed in range(20):
        token = sample_next(logits, 1.0, 5, None, torch.Generator().manual_seed(seed))
        assert (allowed == token).any(dim=-1).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    seen = {int(sample_next(logits, 1.0, None, 0.75, torch.Generator().manual_seed(s)))
            for s in range(200)}
    assert seen == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3
    seen = {int(sample_next(logits, 1.0, None, 0.81, torch.Generator().manual_seed(s)))
            for s in range(300)}
    assert seen == {0, 1, 2}


def test_loss_is_cross_entropy_plus_z_loss():
    cfg = tiny(z_loss=1e-2)
    model = build(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    labels = torch.randint(0, cfg.vocab_size, (2, 10))
    labels[0, :3] = -100
    out = model(ids, labels)
    logits = out.logits.reshape(-1, cfg.vocab_size)
    flat = labels.reshape(-1)
    valid = flat != -100
    log_z = torch.logsumexp(logits[valid], -1)
    cross_entropy = (log_z - logits[valid].gather(1, flat[valid, None])[:, 0]).mean()
    torch.testing.assert_close(out.cross_entropy, cross_entropy)
    torch.testing.assert_close(out.loss, cross_entropy + 1e-2 * (log_z ** 2).mean())


def test_initial_loss_is_near_uniform():
    cfg = tiny(vocab_size=512)
    model = build(cfg)
    ids = torch.randint(0, 512, (4, 32))
    loss = model(ids, ids).cross_entropy.item()
    assert abs(loss - math.log(512)) < 0.1


def test_init_table():
    cfg = tiny(d_model=256, n_layers=8, vocab_size=1000)
    model = Transformer(cfg)
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    down = model.blocks[0].mlp.down_proj.weight.std().item()
    assert down == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    palm = Transformer(tiny(d_model=256, vocab_size=1000, init="fan_in", tie_embeddings=True))
    assert palm.embed.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert palm.blocks[0].attn.q_proj.weight.std().item() == pytest.approx(256 ** -0.5, rel=0.05)


def test_parameter_count_is_exact_on_meta_device():
    for cfg in VARIANTS.values():
        with torch.device("meta"):
            model = Transformer(cfg)
        assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
        embeddings = model.embed.weight.numel()
        embeddings += 0 if model.head is None else model.head.weight.numel()
        embeddings += 0 if model.pos_embed is None else model.pos_embed.weight.numel()
        assert cfg.num_params(embeddings=False) == cfg.num_params() - embeddings


def test_too_long_inputs_are_user_errors():
    model = build(tiny(max_seq_len=16))
    with pytest.raises(UserError, match="context"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(UserError, match="context"):
        generate(model, torch.zeros(1, 10, dtype=torch.long), 7)


def test_gradients_reach_every_parameter():
    for cfg in VARIANTS.values():
        model = build(cfg).train()
        ids = torch.randint(0, cfg.vocab_size, (2, 8))
        model(ids, ids).loss.backward()
        for name, parameter in model.named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_dropout_only_in_training():
    model = build(tiny(dropout=0.5))
    ids = torch.randint(0, 61, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model(ids).logits)
        model.train()
        assert not torch.allclose(model(ids).logits, model(ids).logits)


def test_bf16_autocast_forward_runs():
    model = build(tiny())
    ids = torch.randint(0, 61, (1, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, ids)
    assert out.loss.dtype == torch.float32
    assert F.mse_loss(out.logits.float(), model(ids).logits).item() < 1e-2


def test_rmsnorm_and_its_gradients_equal_torchs():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(16, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(3, 5, 16, dtype=torch.float64)
    ours = RMSNormFunction.apply(x, weight, 1e-5)
    ours_grads = torch.autograd.grad(ours, (x, weight), grad_y)
    theirs = F.rms_norm(x, (16,), weight, 1e-5)
    theirs_grads = torch.autograd.grad(theirs, (x, weight), grad_y)
    torch.testing.assert_close(ours, theirs)
    for mine, reference in zip(ours_grads, theirs_grads, strict=True):
        torch.testing.assert_close(mine, reference)
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFunction.apply(a, b, 1e-5),
                                    (x[:1, :2].detach().requires_grad_(), weight))


def test_rmsnorm_keeps_a_bfloat16_input_in_bfloat16_with_float32_statistics():
    x = (torch.randn(4, 64) * 300).bfloat16().requires_grad_()
    weight = torch.nn.Parameter(torch.rand(64) + 0.5)
    y = RMSNormFunction.apply(x, weight, 1e-5)
    y.float().square().sum().backward()
    assert y.dtype == x.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    reference = F.rms_norm(x.detach().float(), (64,), weight.detach(), 1e-5)
    torch.testing.assert_close(y.float(), reference, atol=0.02, rtol=0.01)
