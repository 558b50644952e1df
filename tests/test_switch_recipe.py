"""Switch Transformer's training recipe (Fedus et al. 2021) and GShard's top-2 router (Lepikhin
et al. 2020), each against a formula or a rule written out here."""

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from burrow import ModelConfig, Transformer
from burrow.config import MoEConfig
from burrow.errors import UserError
from burrow.interop.hf import check_exportable
from burrow.model.context import ForwardContext, Init
from burrow.model.moe import Experts, SwitchMLP

# N(0, sigma^2) cut at +-2 sigma keeps a standard deviation of sigma * sqrt(1 - 4 phi(2) /
# (Phi(2) - Phi(-2))): 0.8796 sigma. Switch footnote 6: values beyond two standard deviations
# are drawn again, so sigma is the normal's before the cut (TensorFlow's truncated_normal).
PHI_2 = math.exp(-2) / math.sqrt(2 * math.pi)
TRUNCATED_STD = math.sqrt(1 - 4 * PHI_2 / math.erf(math.sqrt(2)))


def layer_config(**moe) -> ModelConfig:
    fields = dict(num_experts=4, top_k=2)
    fields.update(moe)
    return ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=24,
                       max_seq_len=32, moe=MoEConfig(**fields))


def make_layer(cfg: ModelConfig) -> SwitchMLP:
    """The sparse layer of block 1, its router and experts initialised (Switch §2.4), in
    training mode; its weights need no gradient here."""
    layer = SwitchMLP(cfg, layer=1)
    layer.router.init_weights(Init("gpt2", cfg.n_layers))
    layer.experts.init_weights(Init("gpt2", cfg.n_layers))
    return layer.requires_grad_(False)


def run_layer(layer: SwitchMLP, x: torch.Tensor):
    """The layer's output and its reports by name."""
    ctx = ForwardContext(torch.arange(x.shape[1]))
    y = layer(x, ctx)
    return y, SimpleNamespace(**{term.name: term.value.detach() for term in ctx.aux})


def recording(layer: SwitchMLP) -> dict:
    """What the layer's router returns at each call: `seen["sent"]` is its dispatched (S, k)."""
    seen = {}
    layer.router.register_forward_hook(lambda module, args, out: seen.update(
        gates=out[2], experts=out[3], sent=out[4]))
    return seen


def expert_mlp(layer: SwitchMLP, e: int, token: torch.Tensor) -> torch.Tensor:
    """Expert e of a SwiGLU layer on one token, written out."""
    ex = layer.experts
    return (F.silu(token @ ex.gate_proj[e]) * (token @ ex.up_proj[e])) @ ex.down_proj[e]


# --- §2.4: every weight matrix from N(0, s / fan_in), truncated at two sigma ---------------

@pytest.mark.parametrize("fields", [
    dict(ffn="swiglu", positions="rope", tie_embeddings=False, moe=MoEConfig(num_experts=4)),
    dict(ffn="gelu", positions="relative", tie_embeddings=True, bias=True,
         moe=MoEConfig(num_experts=4, init_scale=0.5)),
    dict(ffn="swiglu", positions="learned"),  # dense: the init is the model's, not the MoE's
])
def test_switch_init_draws_every_weight_matrix_from_a_truncated_normal(fields):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=128,
                      max_seq_len=64, init="switch", **fields)
    model = Transformer(cfg)
    scale = cfg.moe.init_scale
    # every tensor of two or more dimensions but the tables and relative attention's biases
    matrices = {name: p.detach() for name, p in model.named_parameters()
                if p.dim() >= 2 and "embed" not in name and not name.endswith((".u", ".v"))}
    parts = {part for name in matrices for part in name.split(".")}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"} <= parts
    assert ("router" in parts and "experts" in parts) == cfg.moe.enabled
    assert ("W_R" in parts) == (cfg.positions == "relative")
    assert ("head" in parts) != cfg.tie_embeddings
    for name, weight in matrices.items():
        # (out, in) for a linear layer and the router; (experts, in, out) for the experts
        sigma = math.sqrt(scale / weight.shape[1])
        assert float(weight.abs().max()) <= 2 * sigma * (1 + 1e-6), name
        # the standard error of a sample std is about std / sqrt(2n): 5 of them
        tolerance = 5 / math.sqrt(2 * weight.numel())
        assert float(weight.std()) == pytest.approx(TRUNCATED_STD * sigma, rel=tolerance), name
        assert abs(float(weight.mean())) < 5 * sigma / math.sqrt(weight.numel()), name
    for name, p in model.named_parameters():
        if name.endswith("bias") or name.endswith((".u", ".v")):
            assert torch.count_nonzero(p) == 0, name
        elif "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name


def test_switch_init_embeddings_are_unit_normal_and_tied_logits_scaled():
    """Mesh TensorFlow, Switch's code: the embedding table from N(0, 1), not truncated, and
    a tied table's logits times d^-1/2."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, max_seq_len=64,
                      init="switch", tie_embeddings=True, positions="learned")
    model = Transformer(cfg)
    for table in (model.embed.weight, model.pos_embed.weight):
        assert float(table.detach().std()) == pytest.approx(
            1.0, rel=5 / math.sqrt(2 * table.numel()))
    assert float(model.embed.weight.detach().abs().max()) > 3  # not cut at two standard deviations
    ids = torch.randint(0, 512, (1, 8))
    out = model(ids)
    torch.testing.assert_close(out.logits, out.hidden @ model.embed.weight.t() / 8)
    with pytest.raises(UserError, match=r"model\.init='switch'"):
        check_exportable(dataclasses.replace(cfg, positions="rope"))


def test_other_inits_keep_their_tables_and_the_experts_keep_switch_init():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=128,
                      moe=MoEConfig(num_experts=4))
    model = Transformer(cfg).requires_grad_(False)
    assert float(model.blocks[0].attn.q_proj.weight.std()) == pytest.approx(0.02, rel=0.05)
    router = model.blocks[1].mlp.router.weight
    assert float(router.std()) == pytest.approx(TRUNCATED_STD * math.sqrt(0.1 / 64), rel=0.15)
    with pytest.raises(UserError, match=r"model\.init"):
        ModelConfig(init="switchy")


# --- App. C: input jitter on the router -------------------------------------------------

def test_jitter_multiplies_each_router_input_by_a_uniform_factor():
    """Router weights the identity and inputs all ones: the logits are the noise factors."""
    torch.manual_seed(0)
    eps = 0.01
    cfg = ModelConfig(vocab_size=64, d_model=8, n_layers=2, n_heads=2, max_seq_len=32,
                      moe=MoEConfig(num_experts=8, jitter=eps))
    layer = make_layer(cfg)
    layer.router.weight.copy_(torch.eye(8))
    ones = torch.ones(4096, 8)
    factors = layer.router(ones)[0].double().flatten()
    n = len(factors)
    assert float(factors.min()) >= 1 - eps and float(factors.max()) <= 1 + eps
    # U(1 - eps, 1 + eps): mean 1, variance eps^2 / 3; ten equal bins hold n/10 each
    assert float(factors.mean()) == pytest.approx(1.0, abs=5 * eps / math.sqrt(3 * n))
    assert float(factors.var()) == pytest.approx(eps ** 2 / 3, rel=5 * math.sqrt(0.8 / n))
    bins = torch.histc(factors, bins=10, min=1 - eps, max=1 + eps)
    assert (bins - n / 10).abs().max() < 5 * math.sqrt(n * 0.1 * 0.9)
    assert float(layer.router(ones)[0][0].std()) > 0  # each element has its own factor
    layer.eval()
    assert torch.equal(layer.router(ones)[0], torch.ones(4096, 8))


def test_jitter_is_off_in_evaluation_and_the_experts_read_the_clean_token():
    torch.manual_seed(0)
    cfg = layer_config(num_experts=1, top_k=1, jitter=0.5)
    layer = make_layer(cfg)
    x = torch.randn(2, 8, 16)
    # One expert has gate 1 whatever the noise: the output is that expert on the token as it
    # came, in training too (with a jittered token it would not be).
    y, _ = run_layer(layer, x)
    expected = torch.stack([expert_mlp(layer, 0, t) for t in x.view(-1, 16)]).view_as(x)
    torch.testing.assert_close(y, expected)
    wide = make_layer(layer_config(top_k=1, jitter=0.5))
    first, second = run_layer(wide, x)[1].router_z_loss, run_layer(wide, x)[1].router_z_loss
    assert not torch.equal(first, second)  # training: fresh noise in the router every call
    wide.eval()
    assert torch.equal(run_layer(wide, x)[0], run_layer(wide, x)[0])
    clean = make_layer(layer_config(top_k=1)).eval()
    clean.load_state_dict(wide.state_dict())
    assert torch.equal(run_layer(wide, x)[0], run_layer(clean, x)[0])


# --- §2.4, Table 4: expert dropout --------------------------------------------------------

def test_expert_dropout_falls_between_the_two_projections_in_training_only():
    torch.manual_seed(0)
    experts = Experts(layer_config(expert_dropout=0.4))
    for weight in (experts.up_proj, experts.gate_proj, experts.down_proj):
        torch.nn.init.normal_(weight, std=0.3)
    x = torch.randn(4, 6, 16)  # (N, C, d)
    torch.manual_seed(1)
    y = experts(x)
    torch.manual_seed(1)
    hidden = F.silu(x @ experts.gate_proj) * (x @ experts.up_proj)
    expected = F.dropout(hidden, 0.4, training=True) @ experts.down_proj
    torch.testing.assert_close(y, expected)
    plain = hidden @ experts.down_proj
    assert not torch.allclose(y, plain)
    experts.eval()
    torch.testing.assert_close(experts(x), plain)


def test_expert_dropout_leaves_the_dense_layers_and_the_router_alone():
    torch.manual_seed(0)
    cfg = dataclasses.replace(layer_config(top_k=1, expert_dropout=0.5), dropout=0.0)
    model = Transformer(cfg)
    dense, sparse = model.blocks[0].mlp, model.blocks[1].mlp
    x = torch.randn(2, 8, 16)
    assert torch.equal(dense(x), dense(x))
    assert torch.equal(sparse.router(x.view(-1, 16))[0], sparse.router(x.view(-1, 16))[0])
    assert not torch.equal(run_layer(sparse, x)[0], run_layer(sparse, x)[0])
    model.eval()
    undropped = Transformer(dataclasses.replace(cfg, moe=dataclasses.replace(
        cfg.moe, expert_dropout=0.0))).eval()
    undropped.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (2, 8))
    assert torch.equal(model(ids).logits, undropped(ids).logits)


def test_expert_dropout_is_checked():
    with pytest.raises(UserError, match=r"model\.moe\.expert_dropout"):
        MoEConfig(num_experts=4, expert_dropout=1.0)


# --- the router z-loss is ST-MoE's, and optional ------------------------------------------

def test_without_the_router_z_loss_the_loss_is_switchs():
    torch.manual_seed(0)
    cfg = layer_config(top_k=1, router_z_loss=0.0)
    model = Transformer(cfg)
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        out = model(ids, ids)
    balance = sum(float(t.value) for t in out.aux if t.name == "balance_loss")
    assert all(float(t.value) == 0 for t in out.aux if t.name == "router_z_loss")
    assert float(out.loss - out.cross_entropy) == pytest.approx(balance, rel=1e-5)
    assert MoEConfig().router_z_loss == 1e-3  # on by default (ST-MoE eq. 5)


# --- GShard top-2 ---------------------------------------------------------------------------

def test_top2_balance_loss_counts_first_choices_before_capacity():
    """GShard Algorithm 1, line 13: c_e counts the tokens whose first choice is e, dropped or
    not; m_e is the mean gate. In Switch's normalisation: alpha * N * sum_e c_e/S * m_e."""
    torch.manual_seed(0)
    layer = make_layer(layer_config(num_experts=4, capacity_factor=0.5))
    layer.router.weight.mul_(30)  # uneven routing, some first choices over capacity
    x = torch.randn(4, 16, 16)
    _, stats = run_layer(layer, x)
    probs = (x.view(-1, 16).double() @ layer.router.weight.double().t()).softmax(-1)
    top2 = probs.topk(2, dim=-1).indices
    S = probs.shape[0]
    first = torch.bincount(top2[:, 0], minlength=4).double() / S
    expected = 0.01 * 4 * float((first * probs.mean(0)).sum())
    assert float(stats.dropped) > 0
    assert float(stats.balance_loss) == pytest.approx(expected, rel=1e-5)
    both = torch.bincount(top2.flatten(), minlength=4).double() / (2 * S)
    assert abs(0.01 * 4 * float((both * probs.mean(0)).sum()) - expected) > 1e-3 * expected


def test_top2_second_expert_is_used_with_probability_twice_its_gate():
    """Algorithm 1, lines 16-19: g2 normalised over the two, the second expert used when
    2 * g2 > U(0, 1). Over 20,000 seeded tokens the count of second dispatches is the sum of
    the probabilities to within 5 standard deviations, in each band of g2 as well."""
    torch.manual_seed(0)
    layer = make_layer(layer_config(num_experts=8))
    layer.router.weight.mul_(5)
    tokens = torch.randn(20_000, 16)
    _, probs, gates, _, sent = layer.router(tokens)
    top2 = probs.topk(2, dim=-1).values
    g2 = top2[:, 1] / top2.sum(-1)
    torch.testing.assert_close(gates[:, 1], g2)
    assert bool(sent[:, 0].all())  # the first choice always goes
    p = 2 * g2.double()
    assert 0.1 < float(p.mean()) < 0.9  # a spread of probabilities, not all 0 or 1
    for band in ((0.0, 0.1), (0.1, 0.25), (0.25, 0.5)):
        inside = (g2 >= band[0]) & (g2 < band[1])
        expected, spread = p[inside].sum(), (p[inside] * (1 - p[inside])).sum().sqrt()
        assert int(inside.sum()) > 500
        assert abs(float(sent[inside, 1].sum()) - float(expected)) < 5 * float(spread)


def onehot_layer(logits: list[list[float]], capacity_factor: float) -> tuple[SwitchMLP,
                                                                               torch.Tensor]:
    """A top-2 layer with 3 experts whose router weights are the identity, and the tokens
    whose router logits are `logits`."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, d_model=3, n_layers=2, n_heads=1, d_ff=8, max_seq_len=16,
                      positions="learned",
                      moe=MoEConfig(num_experts=3, top_k=2, capacity_factor=capacity_factor))
    layer = make_layer(cfg)
    layer.router.weight.copy_(torch.eye(3))
    return layer, torch.tensor(logits)[None]


def test_a_tiny_second_gate_almost_never_sends_its_token():
    """g2 = e^-15 / (1 + e^-15): the token goes to its first expert alone, with gate g1."""
    layer, x = onehot_layer([[20.0, 5.0, 0.0]] * 4096, capacity_factor=2.0)
    seen = recording(layer)
    y, stats = run_layer(layer, x)
    assert int(seen["sent"][:, 1].sum()) <= 1
    g1 = 1 / (1 + math.exp(-15))
    expected = g1 * expert_mlp(layer, 0, x[0, 0])
    kept = ~seen["sent"][:, 1]
    torch.testing.assert_close(y[0, kept], expected.expand(int(kept.sum()), 3))
    assert stats.expert_load.tolist()[2] == 0


def test_a_second_choice_left_out_takes_no_slot():
    """Four tokens (g2 ~ 3e-7, second choice expert 1, left out) before four tokens whose
    second choice is expert 1 with g2 ~ 0.5 (sent: 2 * g2 > U(0, 1) almost surely). Expert 1
    has ceil(0.75 x 2 x 8 / 3) = 4 slots: the left-out choices take none of them (GShard:
    random routing "conserves the overall expert capacity"), so nothing is dropped."""
    late = [0.0, 10.0, 10.0 + 1e-3]  # first expert 2, second expert 1
    layer, x = onehot_layer([[20.0, 5.0, 0.0]] * 4 + [late] * 4, capacity_factor=0.75)
    seen = recording(layer)
    y, stats = run_layer(layer, x)
    assert layer.capacity(8, torch.tensor([4, 4, 4])) == 4
    assert seen["sent"][:, 1].tolist() == [False] * 4 + [True] * 4
    assert float(stats.dropped) == 0
    assert stats.expert_load.tolist() == pytest.approx([1 / 3] * 3)
    g = seen["gates"][4]
    expected = g[0] * expert_mlp(layer, 2, x[0, 4]) + g[1] * expert_mlp(layer, 1, x[0, 4])
    torch.testing.assert_close(y[0, 4], expected)


def test_top2_evaluation_is_deterministic_and_sends_every_second_choice():
    torch.manual_seed(0)
    layer = make_layer(layer_config(num_experts=4, capacity_factor=4.0))
    x = torch.randn(2, 16, 16)
    layer.eval()
    seen = recording(layer)
    y, _ = run_layer(layer, x)
    assert seen["sent"] is None
    assert torch.equal(run_layer(layer, x)[0], y)
    tokens = x.view(-1, 16)
    expected = torch.stack([sum(g * expert_mlp(layer, int(e), t) for g, e in zip(gs, es))
                            for t, gs, es in zip(tokens, seen["gates"], seen["experts"])])
    torch.testing.assert_close(y.view(-1, 16), expected)
    layer.train()
    run_layer(layer, x)
    assert seen["sent"] is not None  # random routing in training


def test_top1_routing_has_no_randomness_of_its_own():
    torch.manual_seed(0)
    layer = make_layer(layer_config(top_k=1))
    x = torch.randn(2, 16, 16)
    seen = recording(layer)
    y, _ = run_layer(layer, x)
    assert seen["sent"] is None
    assert torch.equal(run_layer(layer, x)[0], y)
