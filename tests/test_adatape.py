"""AdaTape's model: halting, masking, the ponder loss, tape lengths under attention, batching, the
config and its parameter count, and a tiny encoder that learns."""

from __future__ import annotations

import pytest
import torch
import yaml

from burrow import blocks
from burrow.config import AdaTapeConfig, ModelConfig, RunConfig, TrainConfig
from burrow.config.adatape import encoder_params
from burrow.errors import UserError
from burrow.model import Transformer
from burrow.model.adatape import Halting, adaptive_tape_reading, halt_step
from burrow.model.encoder import EncoderClassifier


def tiny(**tape) -> ModelConfig:
    """A two-block encoder config; `tape` fields make it an AdaTape one (None: no tape)."""
    adatape = None if tape.get("off") else {"max_tape_len": 6, "top_k": 2, **tape}
    return ModelConfig(vocab_size=13, d_model=32, n_layers=2, n_heads=4, max_seq_len=24,
                       positions="learned", adatape=adatape)


# -- halting, masking, the ponder loss ------------------------------------------------------

def test_halting_stops_exactly_when_the_top_weights_reach_the_threshold():
    # Hand-built weights, one row per sample, the same every step (sorted descending).
    weights = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.75, 0.25], [0.625, 0.375]])
    state = Halting.start(4, torch.device("cpu"))
    for _ in range(10):
        state = halt_step(state, weights, threshold=2.0, ponder="max")
    # 0.5 x 4 = 2.0 and 1.0 x 2 = 2.0 land on the threshold and halt there; 0.75 x 3 = 2.25
    # and 0.625 x 4 = 2.5 cross it.
    assert state.lengths.tolist() == [4, 2, 3, 4]
    assert state.accumulated.tolist() == [2.0, 2.0, 2.25, 2.5]
    assert not state.running.any()
    # "max": 1 - max weight for every step taken
    assert torch.allclose(state.ponder, torch.tensor([4 * 0.5, 2 * 0.0, 3 * 0.25, 4 * 0.375]))
    # Just above 2.0, the first sample needs a fifth step.
    state = Halting.start(1, torch.device("cpu"))
    for _ in range(10):
        state = halt_step(state, weights[:1], threshold=2.0 + 1e-6, ponder="max")
    assert state.lengths.tolist() == [5]


@pytest.mark.parametrize("top_k, max_steps, expected", [(2, 10, 4), (4, 10, 8), (4, 6, 6)])
def test_uniform_scores_read_threshold_times_k_tokens(top_k, max_steps, expected):
    # Keys all zero: every score is 0 at every step, so each step's weights are 1/k and the
    # threshold 2.0 is reached after 2k steps, unless max_steps comes first.
    bank = torch.cat([torch.zeros(3, 40, 4), torch.randn(3, 40, 12)], dim=-1)
    reading = adaptive_tape_reading(torch.randn(3, 4), bank, 4, top_k, max_steps, 2.0)
    assert reading.lengths.tolist() == [expected] * 3
    assert reading.tape.shape == (3, expected, 16)
    assert torch.allclose(reading.weights, torch.full_like(reading.weights, 1 / top_k))


def test_an_entry_is_never_read_twice():
    torch.manual_seed(0)
    bank = torch.randn(30, 16)
    query = torch.randn(5, 8)
    query[0] = bank[7, :8] * 100  # entry 7 dominates the first sample's first step
    reading = adaptive_tape_reading(query, bank, 8, 3, 10, threshold=100.0)
    assert reading.lengths.tolist() == [10] * 5  # 30 entries: exactly 10 steps of 3
    assert reading.selected[0, 0, 0] == 7
    for row in reading.selected.reshape(5, -1):
        assert len(set(row.tolist())) == 30


def test_a_sample_halts_when_its_bank_runs_out():
    # 10 entries, 3 a step: the fourth step reads the last one alone (weight 1), then nothing
    # is left; no NaN comes of the empty rows.
    bank = torch.randn(2, 10, 16)
    reading = adaptive_tape_reading(torch.randn(2, 8), bank, 8, 3, 10, threshold=100.0)
    assert reading.lengths.tolist() == [4, 4]
    assert torch.isfinite(reading.tape).all() and torch.isfinite(reading.ponder).all()
    assert reading.weights[:, 3, 0].tolist() == [1.0, 1.0]
    assert (reading.selected[:, 3, 1:] >= 0).all()  # a finite index, weight 0


def independent_ponder(weights: torch.Tensor, lengths: torch.Tensor, kind: str) -> torch.Tensor:
    """Sum over each sample's steps of 1 - sum w^2 ("entropy") or 1 - max w ("max")."""
    out = []
    for sample, length in zip(weights, lengths.tolist()):
        steps = sample[:length]
        terms = 1 - (steps.max(-1).values if kind == "max" else (steps ** 2).sum(-1))
        out.append(terms.sum())
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["entropy", "max"])
def test_ponder_loss_is_the_weighted_mean_of_remainder_terms(kind):
    torch.manual_seed(1)
    cfg = tiny(bank="learnable", bank_size=40, top_k=3, max_tape_len=8, ponder=kind,
               act_loss_weight=0.3)
    model = EncoderClassifier(cfg, 2)
    ids, labels = torch.randint(0, 13, (6, 10)), torch.randint(0, 2, (6,))
    reading = model.tape_reader(embedded(model, ids), ids, context())
    # The lengths follow from the weights: the first step whose summed top weights reach 2.0.
    reached = (reading.weights[..., 0].cumsum(1) >= 2.0).long().argmax(1) + 1
    full = reading.weights[..., 0].sum(1) < 2.0
    assert reading.lengths.tolist() == torch.where(full, 8, reached).tolist()
    expected = independent_ponder(reading.weights, reading.lengths, kind)
    assert torch.allclose(reading.ponder, expected)
    out = model(ids, labels)
    [term] = [a for a in out.aux if a.name == "adatape_ponder"]
    assert term.is_loss
    assert torch.allclose(term.value, 0.3 * expected.mean())
    assert torch.allclose(out.loss, out.cross_entropy + 0.3 * expected.mean())
    [length] = [a for a in out.aux if a.name == "tape_length"]
    assert not length.is_loss and length.value == reading.lengths.float().mean()


def embedded(model: EncoderClassifier, ids: torch.Tensor) -> torch.Tensor:
    """The encoder's input sequence: CLS, then the tokens, with learned positions."""
    x = torch.cat([model.cls.expand(len(ids), -1, -1), model.embed(ids)], dim=1)
    return x + model.pos_embed(torch.arange(x.shape[1]))


def context():
    from burrow.model.context import ForwardContext

    return ForwardContext(torch.arange(1), causal=False)


# -- tape lengths under attention, batching -------------------------------------------------

@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_tape_tokens_past_a_length_change_nothing(positions):
    torch.manual_seed(2)
    cfg = tiny(bank="input", max_tape_len=5)
    cfg.positions = positions
    model = EncoderClassifier(cfg, 3)
    nn_init_head(model)
    ids = torch.randint(0, 13, (3, 9))
    real = model.tape_reader.forward

    def read_with(lengths, noise_from):
        """The real reading with these lengths, noise in the tape from step noise_from[b]."""
        def forward(x, input_ids, ctx):
            reading = real(x, input_ids, ctx)
            tape = reading.tape.clone()
            for b, start in enumerate(noise_from):
                tape[b, start:] = torch.randn_like(tape[b, start:]) * 5
            return reading._replace(tape=tape, lengths=torch.tensor(lengths))
        model.tape_reader.forward = forward
        return model(ids).logits

    L = 4  # every sample reads 4 tokens at init (top_k 2, near-uniform weights)
    base = read_with([1, 3, L], [L, L, L])
    assert torch.allclose(read_with([1, 3, L], [1, 3, L]), base, atol=1e-6)
    # Control: noise in a token a sample does read changes its logits.
    changed = read_with([1, 3, L], [0, 3, L])
    assert not torch.allclose(changed[0], base[0], atol=1e-4)
    assert torch.allclose(changed[1:], base[1:], atol=1e-6)


def nn_init_head(model: EncoderClassifier) -> None:
    """A random head: the zero one would hide every difference in the logits."""
    torch.nn.init.normal_(model.head.weight)


@pytest.mark.parametrize("shared", [True, False])
def test_the_batch_reads_the_tapes_each_sample_reads_alone(shared):
    torch.manual_seed(3)
    B, N, d, w = 7, 50, 16, 8
    shape = (N, d) if shared else (B, N, d)
    bank = torch.nn.functional.layer_norm(torch.randn(shape), (d,))
    query = torch.randn(B, w) * 3
    batch = adaptive_tape_reading(query, bank, w, 4, 12, 2.0)
    assert len(set(batch.lengths.tolist())) > 1  # the samples halt at different steps
    L = batch.tape.shape[1]
    for b in range(B):
        alone = adaptive_tape_reading(query[b:b + 1], bank if shared else bank[b:b + 1], w, 4,
                                      12, 2.0)
        n = int(alone.lengths)
        assert n == batch.lengths[b]
        assert torch.equal(alone.selected[0], batch.selected[b, :n])
        assert torch.allclose(alone.tape[0], batch.tape[b, :n], atol=1e-6)
        assert torch.allclose(alone.ponder, batch.ponder[b:b + 1])
        assert (batch.tape[b, n:L] == 0).all() and (batch.selected[b, n:L] == -1).all()


# -- config, parameter count ----------------------------------------------------------------

@pytest.mark.parametrize("fields, name", [
    ({"threshold": 0.0}, "model.adatape.threshold"),
    ({"threshold": -1.0}, "model.adatape.threshold"),
    ({"max_tape_len": 0}, "model.adatape.max_tape_len"),
    ({"top_k": 0}, "model.adatape.top_k"),
    ({"bank": "learnable", "bank_size": 4, "top_k": 5}, "model.adatape.bank_size"),
    ({"bank": "memory"}, "model.adatape.bank"),
    ({"query": "first"}, "model.adatape.query"),
    ({"ponder": "sum"}, "model.adatape.ponder"),
    ({"act_loss_weight": -0.1}, "model.adatape.act_loss_weight"),
    ({"read_layer": -1}, "model.adatape.read_layer"),
    ({"read_layer": 2}, "model.adatape.read_layer"),
    ({"bank": "learnable", "query": "cls"}, "model.adatape.query"),
    ({"tape_len": 3}, "model.adatape.tape_len"),
])
def test_bad_adatape_fields_name_the_field(fields, name):
    with pytest.raises(UserError, match=name.replace(".", r"\.")):
        ModelConfig(n_layers=2, adatape=fields)


def test_the_section_checks_itself():
    with pytest.raises(UserError, match=r"model\.adatape\.threshold must be positive"):
        AdaTapeConfig(threshold=0.0)
    config = AdaTapeConfig()
    config.max_tape_len = 0
    with pytest.raises(UserError, match=r"model\.adatape\.max_tape_len"):
        config.validate()


def test_the_model_refuses_what_it_cannot_run():
    with pytest.raises(UserError, match=r"model\.positions"):
        ModelConfig(positions="relative", adatape={})
    with pytest.raises(UserError, match="encoder-only"):
        Transformer(tiny())
    model = EncoderClassifier(tiny(top_k=4), 2)
    with pytest.raises(UserError, match=r"model\.max_seq_len"):
        model(torch.zeros(1, 24, dtype=torch.long))  # 24 tokens + CLS > 24 positions
    with pytest.raises(UserError, match=r"model\.adatape\.top_k"):
        model(torch.zeros(1, 3, dtype=torch.long))  # an input bank of 3 entries, top_k 4


@pytest.mark.parametrize("extra", [
    {"off": True},
    {"bank": "input"},
    {"bank": "learnable", "bank_size": 100, "query": "cls", "read_layer": 1},
    {"bank": "input", "tape_ffn": False},
])
@pytest.mark.parametrize("shape", [{}, {"ffn": "gelu", "norm": "layernorm", "bias": True,
                                        "positions": "rope"}])
def test_num_params_is_exact(extra, shape):
    cfg = tiny(**extra)
    for name, value in shape.items():
        setattr(cfg, name, value)
    cfg.validate()
    model = EncoderClassifier(cfg, 5)
    built = sum(p.numel() for p in model.parameters())
    assert built == encoder_params(cfg, 5)
    if cfg.adatape is not None:
        assert built == cfg.num_params() + 5 * (cfg.d_model + 1)
        tables = cfg.vocab_size * cfg.d_model + cfg.max_seq_len * cfg.d_model * (
            cfg.positions == "learned")
        assert cfg.num_params(embeddings=False) == cfg.num_params() - tables


def test_tape_mlp_is_chosen_for_the_blocks_that_see_the_tape():
    cfg = ModelConfig(n_layers=3, adatape={"read_layer": 1})
    assert [cfg.layer_spec(layer).ffn for layer in range(3)] == ["mlp", "tape_mlp", "tape_mlp"]
    cfg.adatape.tape_ffn = False
    assert [cfg.layer_spec(layer).ffn for layer in range(3)] == ["mlp"] * 3
    assert blocks.kind("ffn", "tape_mlp").num_params(cfg, 0, True) == blocks.mlp_params(cfg, 0)


def test_yaml_round_trip():
    run = RunConfig(model=tiny(bank="learnable", bank_size=64, threshold=1.5, query="mean",
                               ponder="max", read_layer=1, tape_ffn=False),
                    train=TrainConfig(seq_len=16))
    text = yaml.safe_dump(run.to_dict(), sort_keys=False)
    again = RunConfig.from_dict(yaml.safe_load(text))
    assert again.model == run.model
    assert isinstance(again.model.adatape, AdaTapeConfig)
    assert again.model.adatape.threshold == 1.5
    assert "adatape" not in RunConfig().to_dict()["model"]  # no tape, no section
    from_dict = ModelConfig(adatape={"bank": "learnable", "bank_size": "64"})
    assert from_dict.adatape == AdaTapeConfig(bank="learnable", bank_size=64)


# -- training -------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [{"off": True}, {"bank": "input"},
                                   {"bank": "learnable", "bank_size": 64}])
def test_a_tiny_encoder_learns_a_trivial_task(extra):
    torch.manual_seed(0)
    model = EncoderClassifier(tiny(**extra), 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 13, (16, 8))
    labels = (ids[:, 2] < 6).long()  # the class is whether the third token is below 6
    losses = []
    for _ in range(30):
        out = model(ids, labels)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.cross_entropy.item())
    assert losses[-1] < 0.5 * losses[0]
    if "off" not in extra:
        assert out.tape_lengths.shape == (16,) and out.tape_lengths.dtype == torch.long
        reader = model.tape_reader
        bank = reader.bank.weight if extra["bank"] == "input" else reader.bank
        assert bank.grad is not None and bank.grad.abs().sum() > 0
        tape_mlp = model.blocks[0].mlp.tape_mlp  # the last block's reaches no CLS
        assert any(p.grad.abs().sum() > 0 for p in tape_mlp.parameters())
    else:
        assert out.tape_lengths is None


def test_a_whole_input_is_one_token_and_the_bank_still_has_one_entry_per_element():
    """AdaTapeParity's input: the sequence's one-hot vectors through one linear map, one token;
    the tape still reads from a bank of the T elements."""
    torch.manual_seed(0)
    cfg = tiny(bank="input")
    whole = EncoderClassifier(cfg, 2, whole_input=8)
    assert whole.embed.weight.shape == (cfg.d_model, 8 * cfg.vocab_size)
    ids = torch.randint(0, cfg.vocab_size, (4, 8))
    # the embedding is the one-hot matmul: column block t, row ids[t], summed over t
    expected = whole.embed.bias + sum(whole.embed.weight[:, t * cfg.vocab_size + ids[:, t]].T
                                      for t in range(8))
    torch.testing.assert_close(whole.embed_inputs(ids)[:, 0], expected)
    out = whole(ids, torch.zeros(4, dtype=torch.long))
    assert out.logits.shape == (4, 2) and out.tape_lengths.shape == (4,)
    out.loss.backward()
    assert whole.embed.weight.grad.abs().sum() > 0
    with pytest.raises(UserError, match="whole sequences of 8 tokens, got 7"):
        whole(ids[:, :7])
    with pytest.raises(UserError, match="whole_input"):
        EncoderClassifier(cfg, 2, whole_input=0)
