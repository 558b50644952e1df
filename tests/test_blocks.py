"""Block parts are registered, not wired in: a kind defined here, outside the package, builds,
trains, reports through the generic channel and is counted, with no file under src/ edited."""

import dataclasses

import pytest
import torch
from torch import nn

from burrow import ModelConfig, Transformer, UserError, blocks, presets
from burrow.blocks import LayerSpec
from burrow.config import RunConfig
from burrow.model.context import ForwardContext, Init
from burrow.train.optim import build_optimizer


class GatedShift(nn.Module):
    """A toy extra sublayer: each token mixes in the previous one through a learned gate, and
    reports a loss term (the gate's mean square, coefficient 0.1) and a statistic."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.gate = nn.Linear(cfg.d_model, cfg.d_model, bias=True)
        self.mix = nn.Parameter(torch.zeros(cfg.d_model, 2))  # a matrix without weight decay

    def init_weights(self, init: Init) -> None:
        init.linear(self.gate, residual=True)
        nn.init.constant_(self.mix, 0.5)

    def no_weight_decay(self) -> list[nn.Parameter]:
        return [self.mix]

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        previous = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        gate = torch.sigmoid(self.gate(x))
        ctx.report("shift_penalty", self.layer, 0.1 * gate.square().mean(), loss=True)
        ctx.report("shift_gate", self.layer, gate.mean())
        return gate * (self.mix[:, 0] * x + self.mix[:, 1] * previous)


def gated_shift_params(cfg: ModelConfig, layer: int, active: bool = False) -> int:
    return cfg.d_model * cfg.d_model + cfg.d_model + 2 * cfg.d_model


@pytest.fixture
def toy_kind():
    kind = blocks.register("extra", "gated_shift", GatedShift, gated_shift_params,
                           "a test's toy sublayer")
    yield kind
    blocks._KINDS.pop(("extra", "gated_shift"))


def toy_config(**fields) -> ModelConfig:
    layers = [LayerSpec(), LayerSpec(extras=("gated_shift",)), LayerSpec(ffn="mlp")]
    base = dict(vocab_size=64, d_model=16, n_layers=3, n_heads=2, max_seq_len=16,
                layers=layers)
    base.update(fields)
    return ModelConfig(**base)


@pytest.mark.parametrize("block", ["serial", "parallel"])
def test_a_part_registered_outside_the_package_builds_trains_and_is_counted(toy_kind, block):
    cfg = toy_config(block=block)
    torch.manual_seed(0)
    model = Transformer(cfg)
    assert isinstance(model.blocks[1].extras[0], GatedShift)
    assert not model.blocks[0].extras and not model.blocks[2].extras
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    assert float(model.blocks[1].extras[0].mix.detach().mean()) == 0.5  # its own init ran

    optimizer = build_optimizer(model, RunConfig(model=cfg).train)
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    toy = model.blocks[1].extras[0]
    assert id(toy.gate.weight) in decayed and id(toy.mix) not in decayed

    ids = torch.randint(0, 64, (2, 12))
    out = model(ids[:, :-1], labels=ids[:, 1:])
    names = {(term.name, term.layer, term.is_loss) for term in out.aux}
    assert names == {("shift_penalty", 1, True), ("shift_gate", 1, False)}
    penalty = next(term.value for term in out.aux if term.is_loss)
    torch.testing.assert_close(out.loss, out.cross_entropy + penalty)
    before = toy.gate.weight.detach().clone()
    out.loss.backward()
    optimizer.step()
    assert not torch.equal(toy.gate.weight, before)


def test_a_registered_part_trains_from_the_command_line_path(toy_kind, tmp_path):
    """The trainer logs the toy's terms by name, knowing nothing of its kind."""
    from burrow.train import train
    from burrow.train.metrics import MetricsLog
    from conftest import tiny_run_config

    cfg = tiny_run_config(max_steps=4, log_every=2)
    n = cfg.model.n_layers
    cfg.model = dataclasses.replace(
        cfg.model, layers=[LayerSpec(extras=("gated_shift",))] * n)
    train(cfg, tmp_path / "run", verbose=False)
    rows = [r for r in MetricsLog(tmp_path / "run" / "metrics.jsonl").rows()
            if r["split"] == "train"]
    assert rows[-1]["aux"]["shift_penalty"]["layers"] == list(range(n))
    loaded = RunConfig.load(tmp_path / "run" / "config.yaml")
    assert loaded.model.layers == cfg.model.layers


def test_layer_specs_round_trip_and_are_checked():
    derived = toy_config(layers=None, n_layers=4)
    assert [derived.layer_spec(i) for i in range(4)] == [LayerSpec()] * 4
    explicit = toy_config(layers=[{"mixer": "attention", "ffn": "mlp"}] * 3)
    assert explicit.layers == [LayerSpec()] * 3
    with pytest.raises(UserError, match="no ffn block part called 'nope'"):
        toy_config(layers=[{"ffn": "nope"}] * 3)
    with pytest.raises(UserError, match=r"describes 2 blocks but model\.n_layers is 3"):
        toy_config(layers=[{}] * 2)
    with pytest.raises(UserError, match="unknown key"):
        toy_config(layers=[{"mlp": "mlp"}] * 3)
    with pytest.raises(UserError, match=r"model\.moe\.num_experts"):
        toy_config(layers=[{"ffn": "switch"}] * 3)


def test_every_preset_counts_what_its_model_holds():
    """The counts of blocks.py against the modules, on the meta device: the parts' parameter
    arithmetic and their modules describe the same tensors."""
    for name in presets.names():
        cfg = presets.get(name)
        if cfg.num_params() > 3e9:  # building 100 meta layers takes long; shapes repeat
            cfg = dataclasses.replace(cfg, n_layers=min(cfg.n_layers, 4))
        with torch.device("meta"):
            model = Transformer(cfg)
        assert sum(p.numel() for p in model.parameters()) == cfg.num_params(), name
