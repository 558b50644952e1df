"""Switch Transformer layers against hand-built routings and a naive per-token reference."""

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from burrow import ModelConfig, Transformer
from burrow.config import MoEConfig, RunConfig, override_dict
from burrow.errors import UserError
from burrow.flops import flops_per_token, matmul_params
from burrow.infer import KVCache, generate
from burrow.model.context import ForwardContext, Init
from burrow.model.mlp import GeluMLP, SwiGLU
from burrow.model.moe import SwitchMLP

INIT = Init("gpt2", n_layers=4)


def overridden(items: list[str]) -> RunConfig:
    """The default config with the CLI's --set overrides applied, as the CLI applies them."""
    return RunConfig.from_dict(override_dict(RunConfig().to_dict(), items))


def moe_config(**moe) -> ModelConfig:
    fields = dict(num_experts=4)
    fields.update(moe)
    return ModelConfig(vocab_size=128, d_model=16, n_layers=4, n_heads=2, d_ff=24,
                       max_seq_len=32, moe=MoEConfig(**fields))


def hand_routed(num_experts: int, d_ff: int, capacity_factor: float, sharpness: float
                ) -> SwitchMLP:
    """A layer of width num_experts whose router sends the one-hot token e_i to expert i,
    with logits sharpness x e_i."""
    cfg = ModelConfig(vocab_size=16, d_model=num_experts, n_layers=2, n_heads=1, d_ff=d_ff,
                      max_seq_len=8, moe=MoEConfig(num_experts=num_experts,
                                                   capacity_factor=capacity_factor))
    layer = SwitchMLP(cfg, layer=1)
    layer.experts.init_weights(INIT)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(num_experts) * sharpness)
    return layer


def run_layer(layer: SwitchMLP, x: torch.Tensor, statistics: bool = True):
    """The layer's output and what it reported (balance_loss, z_loss, dropped, load), or None
    where it reported nothing."""
    ctx = ForwardContext(torch.arange(x.shape[1]), statistics=statistics)
    y = layer(x, ctx)
    if not ctx.aux:
        return y, None
    terms = {term.name: term.value for term in ctx.aux}
    assert {term.layer for term in ctx.aux} == {layer.layer}
    return y, SimpleNamespace(balance_loss=terms["balance_loss"], z_loss=terms["router_z_loss"],
                              dropped=terms["dropped"], load=terms["expert_load"])


def reference(layer: SwitchMLP, x: torch.Tensor, dispatched: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, float]:
    """A token at a time: first choices in token order, then second choices; an expert takes
    tokens until it holds `capacity`; output = sum of kept gate x expert(token). Assignments
    whose `dispatched` (S, k) is False (GShard's random routing) are skipped and take no slot."""
    tokens = x.reshape(-1, x.shape[-1])
    logits = tokens.double() @ layer.router.weight.double().t()
    probs = logits.softmax(-1)
    gates, experts = probs.topk(layer.top_k, dim=-1)
    if layer.top_k > 1:
        gates = gates / gates.sum(-1, keepdim=True)
    if dispatched is None:
        dispatched = torch.ones_like(experts, dtype=torch.bool)
    counts = torch.bincount(experts[dispatched], minlength=layer.num_experts)
    # Switch eq. 3, written out here: factor x k x tokens / experts, rounded up; dropless, the
    # busiest expert's load.
    factor = layer.capacity_factor if layer.training else layer.eval_capacity_factor
    capacity = (int(counts.max()) if layer.dropless
                else math.ceil(factor * layer.top_k * len(tokens) / layer.num_experts))
    taken = [0] * layer.num_experts
    out = torch.zeros_like(tokens, dtype=torch.float64)
    dropped = 0
    weights = {name: p.double() for name, p in layer.experts.named_parameters()}
    for choice in range(layer.top_k):
        for t in range(len(tokens)):
            if not dispatched[t, choice]:
                continue
            e = int(experts[t, choice])
            if taken[e] >= capacity:
                dropped += 1
                continue
            taken[e] += 1
            h = tokens[t].double()
            if "gate_proj" in weights:
                hidden = F.silu(h @ weights["gate_proj"][e]) * (h @ weights["up_proj"][e])
            else:
                hidden = F.gelu(h @ weights["up_proj"][e])
            out[t] += gates[t, choice] * (hidden @ weights["down_proj"][e])
    return out.view_as(x), dropped / int(dispatched.sum())


@pytest.mark.parametrize("top_k,ffn,factor", [(1, "swiglu", 1.25), (2, "swiglu", 1.0),
                                              (1, "gelu", 0.5), (2, "gelu", 2.0)])
def test_switch_layer_matches_a_per_token_reference(top_k, ffn, factor):
    torch.manual_seed(0)
    cfg = dataclasses.replace(moe_config(top_k=top_k, capacity_factor=factor), ffn=ffn)
    layer = SwitchMLP(cfg, layer=1)
    layer.router.init_weights(INIT)
    layer.experts.init_weights(INIT)
    with torch.no_grad():  # a router sharp enough to load some experts over capacity
        layer.router.weight.mul_(40)
    x = torch.randn(3, 10, cfg.d_model)
    seen = {}  # top-2 in training: the second choices random routing sent
    layer.router.register_forward_hook(lambda module, args, out: seen.update(sent=out[4]))
    y, stats = run_layer(layer, x)
    expected, dropped = reference(layer, x, seen["sent"])
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-6)
    assert float(stats.dropped) == pytest.approx(dropped)
    if factor < 1:
        assert dropped > 0


def test_capacity_drops_the_last_tokens_of_an_overloaded_expert():
    """Hand-built routing: 8 tokens, 2 experts, 5 tokens want expert 0. Capacity
    ceil(1.5 x 8 / 2) = 6 keeps all; ceil(1.0 x 8 / 2) = 4 drops the fifth (in batch order),
    whose output is exactly zero so the residual passes it unchanged (Switch §2.2)."""
    layer = hand_routed(num_experts=2, d_ff=4, capacity_factor=1.0, sharpness=10)
    wants = [0, 1, 0, 0, 1, 0, 1, 0]  # expert 0 five times: tokens 0, 2, 3, 5, 7
    x = torch.stack([torch.eye(2)[e] for e in wants])[None]  # (1, 8, 2)
    assert layer.capacity(8, torch.tensor([5, 3])) == 4
    y, stats = run_layer(layer, x)
    assert float(stats.dropped) == pytest.approx(1 / 8)
    assert stats.load.tolist() == pytest.approx([5 / 8, 3 / 8])
    assert torch.equal(y[0, 7], torch.zeros(2))
    assert all(y[0, t].abs().sum() > 0 for t in range(7))
    layer.capacity_factor = 1.5
    assert layer.capacity(8, torch.tensor([5, 3])) == 6
    y_roomy, stats = run_layer(layer, x)
    assert float(stats.dropped) == 0 and y_roomy[0, 7].abs().sum() > 0
    torch.testing.assert_close(y_roomy[0, :7], y[0, :7])


def test_evaluation_uses_its_own_capacity_factor_and_dropless_drops_nothing():
    layer = SwitchMLP(moe_config(capacity_factor=1.0, eval_capacity_factor=2.0), layer=1)
    counts = torch.tensor([40, 0, 0, 0])
    assert layer.capacity(40, counts) == 10
    layer.eval()
    assert layer.capacity(40, counts) == 20
    layer.dropless = True
    assert layer.capacity(40, counts) == 40
    torch.manual_seed(0)
    layer.train()
    layer.router.init_weights(INIT)
    layer.experts.init_weights(INIT)
    with torch.no_grad():
        layer.router.weight.mul_(100)
    x = torch.randn(2, 16, 16)
    y, stats = run_layer(layer, x)
    assert float(stats.dropped) == 0
    torch.testing.assert_close(y.double(), reference(layer, x)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_k,tokens,ffn", [(1, 2, "swiglu"), (2, 1, "gelu"),
                                               (1, 1, "swiglu")])
def test_a_few_tokens_at_inference_go_through_their_experts_only(monkeypatch, top_k, tokens,
                                                                   ffn):
    """One or two assignments for 8 experts and no gradient (decoding): the experts run once,
    on the chosen experts' weights only (one expert's own weights, not a copy), and the
    outputs are the capacity buffers' and the per-token reference's."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(moe_config(num_experts=8, top_k=top_k), ffn=ffn)
    layer = SwitchMLP(cfg, layer=1).eval()
    layer.router.init_weights(INIT)
    layer.experts.init_weights(INIT)
    with torch.no_grad():
        layer.router.weight.mul_(40)
    x = torch.randn(1, tokens, cfg.d_model)
    buffered, _ = run_layer(layer, x)  # with a gradient: the capacity buffers, every expert
    runs = []
    mlp = layer.experts._mlp
    monkeypatch.setattr(layer.experts, "_mlp", lambda x, *weights: runs.append(
        weights[-1]) or mlp(x, *weights))
    with torch.no_grad():
        y, _ = run_layer(layer, x)
        expert = int(layer.router(x[0])[3][0, 0])
    [down] = runs
    if top_k * tokens == 1:
        assert down.data_ptr() == layer.experts.down_proj[expert].data_ptr()
    else:
        assert down.shape == (2, *layer.experts.down_proj.shape[1:])
    torch.testing.assert_close(y, buffered.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(y.double(), reference(layer, x)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_one_token_decoding_skips_the_queue_and_gives_the_same_output(monkeypatch, top_k):
    """One token without statistics (a decode step): no sort, since nothing can be dropped,
    and the output of the full dispatch and combine."""
    torch.manual_seed(0)
    layer = SwitchMLP(moe_config(num_experts=8, top_k=top_k), layer=1).eval()
    layer.router.init_weights(INIT)
    layer.experts.init_weights(INIT)
    x = torch.randn(1, 1, layer.router.weight.shape[1])
    with torch.no_grad():
        full, stats = run_layer(layer, x)
        monkeypatch.setattr(torch, "argsort", None)  # the queue is not built
        y, none = run_layer(layer, x, statistics=False)
    assert stats is not None and none is None
    torch.testing.assert_close(y, full, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(y.double(), reference(layer, x)[0], rtol=1e-5, atol=1e-6)


def test_a_few_tokens_at_inference_keep_the_capacity():
    """Hand-built routing, 16 experts, 3 tokens at evaluation: capacity ceil(2.0 x 3 / 16) = 1,
    so the second token for expert 0 is dropped on the few-token path too."""
    layer = hand_routed(num_experts=16, d_ff=4, capacity_factor=1.0, sharpness=10).eval()
    x = torch.stack([torch.eye(16)[e] for e in (0, 0, 3)])[None]  # (1, 3, 16)
    with torch.no_grad():
        assert layer.reads_chosen_experts_only(3) and not layer.reads_chosen_experts_only(5)
        y, stats = run_layer(layer, x)
    assert float(stats.dropped) == pytest.approx(1 / 3)
    assert torch.equal(y[0, 1], torch.zeros(16)) and y[0, 0].abs().sum() > 0
    torch.testing.assert_close(y, run_layer(layer, x)[0].detach())


def test_balance_loss_is_alpha_under_uniform_routing_and_grows_under_collapse():
    """Switch eq. 4: alpha * N * sum_i f_i * P_i = alpha when f and P are both uniform."""
    layer = hand_routed(num_experts=4, d_ff=4, capacity_factor=4.0, sharpness=3)
    balanced = torch.eye(4).repeat(3, 1)[None]  # each expert wins 3 of 12 tokens, by symmetry
    _, stats = run_layer(layer, balanced)
    assert float(stats.balance_loss) == pytest.approx(0.01, rel=1e-6)
    assert stats.load.tolist() == [0.25] * 4
    collapsed = torch.eye(4)[[0] * 12][None]  # every token to expert 0
    _, collapsed_stats = run_layer(layer, collapsed)
    assert float(collapsed_stats.balance_loss) > 2.5 * 0.01
    with torch.no_grad():  # the limit: all of f and all of P on one expert gives alpha * N
        layer.router.weight.mul_(100)
    _, limit = run_layer(layer, collapsed)
    assert float(limit.balance_loss) == pytest.approx(0.01 * 4, rel=1e-4)


def test_router_z_loss_is_the_mean_squared_log_normaliser():
    torch.manual_seed(0)
    layer = SwitchMLP(moe_config(), layer=1)
    layer.router.init_weights(INIT)
    x = torch.randn(2, 8, 16)
    _, stats = run_layer(layer, x)
    logits = x.reshape(-1, 16) @ layer.router.weight.t()
    expected = 1e-3 * (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(stats.z_loss, expected)


def test_router_runs_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    layer = SwitchMLP(moe_config(), layer=1)
    layer.router.init_weights(INIT)
    layer.experts.init_weights(INIT)
    seen = {}
    layer.router.register_forward_hook(lambda module, args, out: seen.update(
        logits=out[0], probs=out[1], gates=out[2]))
    x = torch.randn(2, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, stats = run_layer(layer, x)
    assert seen["logits"].dtype == seen["probs"].dtype == seen["gates"].dtype == torch.float32
    assert stats.balance_loss.dtype == torch.float32
    exact = x.reshape(-1, 16) @ layer.router.weight.t()
    torch.testing.assert_close(seen["logits"], exact)  # not bf16-rounded
    assert y.dtype == torch.float32  # the experts themselves ran in bf16 under autocast


@pytest.mark.parametrize("ffn,dense", [("swiglu", SwiGLU), ("gelu", GeluMLP)])
def test_one_expert_equals_the_dense_mlp_it_was_initialised_from(ffn, dense):
    torch.manual_seed(0)
    cfg = dataclasses.replace(moe_config(num_experts=1), ffn=ffn)
    mlp = dense(cfg)
    layer = SwitchMLP(cfg, layer=1)
    layer.router.init_weights(INIT)
    with torch.no_grad():
        for name in ("up_proj", "gate_proj", "down_proj"):
            if hasattr(mlp, name):
                getattr(layer.experts, name)[0].copy_(getattr(mlp, name).weight.t())
    x = torch.randn(3, 7, cfg.d_model)
    y, stats = run_layer(layer, x)
    torch.testing.assert_close(y, mlp(x))  # one expert: gate probability exactly 1
    assert float(stats.dropped) == 0 and float(stats.balance_loss) == pytest.approx(0.01)


def test_jitter_only_in_training():
    torch.manual_seed(0)
    layer = SwitchMLP(moe_config(jitter=0.01), layer=1)
    layer.router.init_weights(INIT)
    x = torch.randn(2, 8, 16)
    first, second = layer.router(x.view(-1, 16))[0], layer.router(x.view(-1, 16))[0]
    assert not torch.equal(first, second)
    exact = x.view(-1, 16) @ layer.router.weight.t()
    # each input scaled by at most 1 +- 0.01 moves a logit by at most 0.01 |x| . |w|
    bound = 0.01 * (x.view(-1, 16).abs() @ layer.router.weight.abs().t())
    assert ((first - exact).abs() <= bound + 1e-7).all()
    layer.eval()
    torch.testing.assert_close(layer.router(x.view(-1, 16))[0],
                               x.view(-1, 16) @ layer.router.weight.t())


def test_expert_init_is_switch_scaled_truncated_normal():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, d_model=256, n_layers=2, n_heads=4, d_ff=512,
                      moe=MoEConfig(num_experts=8))
    model = Transformer(cfg)
    experts = model.blocks[1].mlp.experts
    for weight, fan_in in ((experts.up_proj, 256), (experts.down_proj, 512),
                           (model.blocks[1].mlp.router.weight, 256)):
        std = math.sqrt(0.1 / fan_in)
        assert weight.abs().max() <= 2 * std + 1e-7
        # N(0, s) truncated at 2 sigma has standard deviation 0.880 s
        assert float(weight.std()) == pytest.approx(0.880 * std, rel=0.05)


def test_model_loss_adds_the_routers_losses_and_they_train_the_router():
    torch.manual_seed(0)
    cfg = moe_config()
    model = Transformer(cfg)
    ids = torch.randint(0, 128, (2, 16))
    out = model(ids, ids)
    losses = [term for term in out.aux if term.is_loss]
    assert sorted({term.layer for term in losses}) == cfg.sparse_layers == [1, 3]
    assert sorted(term.name for term in losses) == ["balance_loss"] * 2 + ["router_z_loss"] * 2
    extra = sum(float(term.value) for term in losses)
    assert float(out.loss - out.cross_entropy) == pytest.approx(extra, rel=1e-5)
    out.loss.backward()
    assert model.blocks[1].mlp.router.weight.grad.abs().sum() > 0
    assert model.blocks[0].mlp.up_proj.weight.grad is not None  # block 0 stays dense
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


def test_parameter_and_flop_counts_of_a_sparse_model():
    dense = ModelConfig(vocab_size=128, d_model=16, n_layers=4, n_heads=2, d_ff=24)
    sparse = dataclasses.replace(dense, moe=MoEConfig(num_experts=8, top_k=2))
    expert = 3 * 16 * 24
    assert sparse.sparse_layers == [1, 3]
    assert sparse.num_params() == dense.num_params() + 2 * (7 * expert + 16 * 8)
    assert sparse.num_params(active=True) == dense.num_params() + 2 * (expert + 16 * 8)
    assert matmul_params(sparse) == matmul_params(dense) + 2 * (expert + 16 * 8)
    assert flops_per_token(sparse, 32) - flops_per_token(dense, 32) == 6 * 2 * (expert + 128)
    every = dataclasses.replace(dense, moe=MoEConfig(num_experts=8, every=1, d_ff=12))
    assert every.sparse_layers == [0, 1, 2, 3]
    assert every.num_params(active=True) == dense.num_params() - 4 * expert + 4 * (
        3 * 16 * 12 + 16 * 8)


@pytest.mark.parametrize("moe,words", [
    (dict(num_experts=4, top_k=5), "model.moe.top_k"),
    (dict(num_experts=-1), "model.moe.num_experts"),
    (dict(num_experts=4, capacity_factor=0), "model.moe.capacity_factor"),
    (dict(num_experts=4, jitter=1.5), "model.moe.jitter"),
    (dict(num_experts=4, balance_loss=-1), "model.moe.balance_loss"),
    (dict(num_experts=4, every=5), "model.moe.every"),
])
def test_bad_moe_configs_name_the_field(moe, words):
    with pytest.raises(UserError, match=words.replace(".", r"\.")):
        ModelConfig(n_layers=4, moe=MoEConfig(**moe))


def test_moe_config_round_trips_and_takes_nested_overrides(tmp_path):
    cfg = overridden(["model.moe.num_experts=8", "model.moe.top_k=2",
                                        "model.moe.dropless=true"])
    assert cfg.model.moe == MoEConfig(num_experts=8, top_k=2, dropless=True)
    cfg.save(tmp_path / "config.yaml")
    assert RunConfig.load(tmp_path / "config.yaml").model == cfg.model
    with pytest.raises(UserError, match=r"model\.moe\.nope"):
        overridden(["model.moe.nope=1"])
    with pytest.raises(UserError, match=r"model\.d_model is not a section"):
        overridden(["model.d_model.x=1"])


def test_compiled_sparse_model_matches_eager():
    torch.manual_seed(0)
    model = Transformer(moe_config())
    ids = torch.randint(0, 128, (2, 16))
    eager = model(ids, ids)
    compiled = torch.compile(model)(ids, ids)
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-5, atol=1e-5)


def test_compiled_sparse_decoding_generates_the_eager_tokens():
    """One token per step for 8 experts: the chosen experts' path, compiled and eager, the
    same tokens as forward passes over the whole sequence; decoding steps report no router
    statistics, forward passes do."""
    torch.manual_seed(0)
    model = Transformer(moe_config(num_experts=8)).eval()
    prompt = torch.randint(0, 128, (1, 5))
    eager = generate(model, prompt, 12, temperature=0.0)
    assert torch.equal(generate(model, prompt, 12, temperature=0.0, compile=True), eager)
    sequence = prompt
    with torch.no_grad():
        for _ in range(12):
            out = model(sequence)
            reported = {term.layer for term in out.aux}
            assert reported == {i for i, b in enumerate(model.blocks)
                                if isinstance(b.mlp, SwitchMLP)}
            sequence = torch.cat([sequence, out.logits[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(sequence, eager)
        cache = KVCache(model.cfg, 1, 6)
        assert model(prompt, cache=cache).aux == []  # decoding asks for no statistics


def test_sparse_training_logs_router_metrics_and_plots(tmp_path):
    from burrow.train import train
    from burrow.train.metrics import MetricsLog
    from conftest import tiny_run_config

    cfg = tiny_run_config(max_steps=6, log_every=3)
    cfg.model = dataclasses.replace(cfg.model, moe=MoEConfig(num_experts=4, every=1))
    summary = train(cfg, tmp_path / "run", verbose=False)
    rows = MetricsLog(tmp_path / "run" / "metrics.jsonl").rows()
    logged = [row for row in rows if row["split"] == "train"]
    assert [row["step"] for row in logged] == [3, 6]
    aux = logged[-1]["aux"]
    assert set(aux) == {"balance_loss", "router_z_loss", "dropped", "expert_load"}
    assert all(term["layers"] == [0, 1] for term in aux.values())
    assert all(sum(load) == pytest.approx(1.0) for load in aux["expert_load"]["values"])
    assert all(0.0 <= dropped < 1.0 for dropped in aux["dropped"]["values"])
    assert all(b > 0 for b in aux["balance_loss"]["values"] + aux["router_z_loss"]["values"])
    assert (tmp_path / "run" / "experts.png").stat().st_size > 0
    assert summary["step"] == 6
