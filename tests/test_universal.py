"""The Universal Transformer with ACT (model/universal.py): halting, remainders and the ponder
cost against a naive per-position loop, the weighted state against its formula, one block's
weights shared over depth, attention in both directions."""

import math

import pytest
import torch

from burrow import ModelConfig
from burrow.errors import UserError
from burrow.model.context import ForwardContext
from burrow.model.positions import sinusoids
from burrow.model.universal import Halting, UniversalTransformer, coordinates

EPSILON = 0.01


def naive_act(halts: list[float], max_steps: int, epsilon: float = EPSILON):
    """Graves 2016 §2 for one position, step by step: (weights, N, R)."""
    weights, total = [], 0.0
    for n, h in enumerate(halts[:max_steps], start=1):
        if n == max_steps or total + h >= 1 - epsilon:
            weights.append(1 - total)
            return weights, n, 1 - total
        weights.append(h)
        total += h
    raise AssertionError("a position always halts by max_steps")


def run_halting(halts: torch.Tensor, epsilon: float = EPSILON):
    """Feed hand-built halting scores (steps, B, S) to Halting; the weights (steps, B, S)."""
    steps = halts.shape[0]
    halting = Halting(halts.shape[1:], halts.device, epsilon)
    weights = [halting.weights(halts[n], last=n == steps - 1) for n in range(steps)]
    return torch.stack(weights), halting


@pytest.mark.parametrize("seed", range(4))
def test_halting_equals_a_naive_loop_per_position(seed):
    generator = torch.Generator().manual_seed(seed)
    steps, B, S = 6, 3, 5
    halts = torch.rand(steps, B, S, generator=generator) * 0.6
    halts[:, 0, 0] = 0.01  # never reaches the threshold: stopped by max_steps
    halts[0, 1, 1] = 0.995  # halts at once, R = 1
    halts[:2, 2, 2] = torch.tensor([0.49, 0.5])  # lands exactly on 1 - eps: halts (>=)
    weights, halting = run_halting(halts)
    for b in range(B):
        for s in range(S):
            expected, n, r = naive_act(halts[:, b, s].tolist(), steps)
            got = weights[:, b, s]
            assert got[:n].tolist() == pytest.approx(expected, abs=1e-6)
            assert got[n:].abs().sum() == 0  # nothing after the halting step
            assert halting.steps[b, s] == n and float(halting.remainders[b, s]) == (
                pytest.approx(r, abs=1e-6))
            assert float(halting.ponder_cost()[b, s]) == pytest.approx(n + r, abs=1e-6)
    assert torch.allclose(weights.sum(0), torch.ones(B, S))  # p_1 + ... + p_N = 1
    assert halting.steps[0, 0] == steps and halting.steps[1, 1] == 1
    assert halting.steps[2, 2] == 2 and halting.done()


def test_the_ponder_cost_gradient_reaches_the_halting_scores_through_the_remainder():
    halts = torch.tensor([[[0.3]], [[0.3]], [[0.3]], [[0.3]]], requires_grad=True)
    _, halting = run_halting(halts)
    halting.ponder_cost().sum().backward()
    # N = 4, R = 1 - (h1 + h2 + h3): dR/dh = -1 for the first three steps, 0 for the last
    assert halts.grad.flatten().tolist() == [-1.0, -1.0, -1.0, 0.0]


def config(**fields) -> ModelConfig:
    shape = dict(vocab_size=3, d_model=16, n_layers=4, n_heads=2, positions="learned",
                 max_seq_len=16, ffn="gelu", norm="layernorm")
    return ModelConfig(**{**shape, **fields})


def constant_halting(model: UniversalTransformer, h: float) -> None:
    """Make the halting unit say h at every position and step."""
    with torch.no_grad():
        model.halt.weight.zero_()
        model.halt.bias.fill_(math.log(h / (1 - h)))


@pytest.mark.parametrize("h, max_steps, n, r", [
    (0.3, 8, 4, 0.1),  # 0.3 x 3 = 0.9, 0.9 + 0.3 >= 0.99: halts at step 4 with R = 0.1
    (0.1, 3, 3, 0.8),  # never reaches 0.99: the third step takes R = 1 - 0.2
    (0.995, 5, 1, 1.0),  # halts at the first step
])
def test_the_output_is_the_halting_weighted_sum_of_the_states(h, max_steps, n, r):
    torch.manual_seed(0)
    model = UniversalTransformer(config(), num_classes=2, max_steps=max_steps, ponder_cost=0.05)
    constant_halting(model, h)
    with torch.no_grad():
        model.head.weight.normal_()  # zero at init: logits would not tell states apart
    ids = torch.randint(0, 3, (2, 7))
    labels = torch.tensor([0, 1])
    out = model(ids, labels)
    # the states by hand: coordinates added, the one block applied, n times
    state = torch.cat([model.cls.expand(2, 1, -1), model.embed(ids)], dim=1)
    ctx = ForwardContext(torch.arange(8), causal=False)
    weighted = torch.zeros_like(state)
    for step, weight in enumerate([h] * (n - 1) + [r], start=1):
        state = model.block(state + coordinates(8, step, 16, state.device), ctx)
        weighted = weighted + weight * state
    logits = model.head(model.norm(weighted[:, 0]))
    assert torch.allclose(out.logits, logits, atol=1e-5)
    aux = {term.name: term for term in out.aux}
    assert aux["ponder"].is_loss and not aux["ponder_steps"].is_loss
    assert float(aux["ponder"].value.detach()) == pytest.approx(0.05 * (n + r), rel=1e-5)
    assert float(aux["ponder_steps"].value) == n
    assert torch.allclose(out.loss, out.cross_entropy + aux["ponder"].value)
    assert out.tape_lengths is None


def test_coordinates_are_the_sinusoids_of_position_plus_those_of_step():
    table = coordinates(5, 3, 8, torch.device("cpu"))
    assert torch.allclose(table, sinusoids(torch.arange(5), 8) + sinusoids(torch.tensor([3]), 8))
    assert not torch.allclose(table, coordinates(5, 4, 8, torch.device("cpu")))


def test_one_block_serves_every_step():
    counts = {steps: sum(p.numel() for p in UniversalTransformer(config(), max_steps=steps)
                         .parameters())
              for steps in (1, 2, 12)}
    assert len(set(counts.values())) == 1
    deep = UniversalTransformer(config(n_layers=9))
    assert sum(p.numel() for p in deep.parameters()) == counts[1] and deep.max_steps == 9


def test_every_position_sees_every_other():
    torch.manual_seed(0)
    model = UniversalTransformer(config(), max_steps=3)
    with torch.no_grad():
        model.head.weight.normal_()
    ids = torch.zeros(1, 6, dtype=torch.long)
    changed = ids.clone()
    changed[0, -1] = 2
    # the class vector comes first: only attention to later positions can carry the change
    assert not torch.equal(model(ids).logits, model(changed).logits)


def test_it_learns_and_its_halting_unit_learns():
    torch.manual_seed(0)
    model = UniversalTransformer(config(), max_steps=4)
    with torch.no_grad():  # zero at init, as the encoder's: no gradient would pass it yet
        model.head.weight.normal_()
    ids = torch.randint(0, 3, (8, 5))
    out = model(ids, ids[:, 0].clamp(max=1))
    out.loss.backward()
    assert model.halt.bias.grad.abs() > 0 and model.block.attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("fields, kwargs, words", [
    ({}, {"max_steps": 0}, "max_steps"),
    ({}, {"epsilon": 1.0}, "epsilon"),
    ({}, {"ponder_cost": -1}, "ponder_cost"),
    ({"positions": "relative"}, {}, "relative"),
])
def test_bad_shapes_are_user_errors(fields, kwargs, words):
    with pytest.raises(UserError, match=words):
        UniversalTransformer(config(**fields), **kwargs)
