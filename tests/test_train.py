"""The training loop: schedule, resume exactness, atomic checkpoints, golden losses, signals."""

import itertools
import json
import math
import platform
import shutil
from pathlib import Path

import pytest
import torch

from burrow import TrainConfig, UserError, load_run
from burrow.infer import generate
from burrow.train import Trainer, train
from burrow.train.checkpoint import latest_checkpoint, list_checkpoints
from burrow.train.optim import build_optimizer, learning_rate
from conftest import tiny_run_config

GOLDEN = Path(__file__).parent / "golden" / "micro_losses.json"


def losses_of(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if row["split"] == "train"]


def test_gopher_schedule():
    cfg = TrainConfig(max_steps=1000, lr=2e-4, warmup_steps=100, warmup_init_lr=1e-7)
    assert learning_rate(0, cfg) == pytest.approx(1e-7)
    assert learning_rate(50, cfg) == pytest.approx(1e-7 + (2e-4 - 1e-7) / 2)
    assert learning_rate(100, cfg) == pytest.approx(2e-4)
    assert learning_rate(550, cfg) == pytest.approx(2e-5 + 0.5 * 1.8e-4)  # half-way down
    assert learning_rate(1000, cfg) == pytest.approx(2e-5)  # Gopher: 10% of the maximum
    rates = [learning_rate(step, cfg) for step in range(100, 1001)]
    assert all(a >= b for a, b in itertools.pairwise(rates))


def test_constant_and_wsd_schedules():
    constant = TrainConfig(max_steps=100, lr=1e-3, warmup_steps=10, schedule="constant")
    assert learning_rate(10, constant) == learning_rate(99, constant) == 1e-3
    wsd = TrainConfig(max_steps=100, lr=1e-3, warmup_steps=10, schedule="wsd",
                      decay_fraction=0.2, min_lr_ratio=0.0)
    assert learning_rate(79, wsd) == 1e-3
    assert learning_rate(90, wsd) == pytest.approx(5e-4)
    assert learning_rate(100, wsd) == pytest.approx(0.0)


def test_rsqrt_schedule_is_t5s_exactly_and_ignores_the_run_length():
    # T5 (Raffel et al. 2020, §3.1.2): 1 / sqrt(max(n, k)) with k = 10^4; no warmup, no floor
    t5 = TrainConfig(max_steps=500_000, lr=1e-2, warmup_steps=10_000, schedule="rsqrt")
    for n in (0, 1, 5_000, 10_000, 10_001, 40_000, 250_000, 500_000):
        assert learning_rate(n, t5) == pytest.approx(1 / math.sqrt(max(n, 10_000)), rel=1e-12)
    short = TrainConfig(max_steps=500, lr=1e-2, warmup_steps=100, schedule="rsqrt")
    long = TrainConfig(max_steps=50_000, lr=1e-2, warmup_steps=100, schedule="rsqrt")
    assert learning_rate(0, short) == pytest.approx(1e-2)  # no linear warmup
    assert learning_rate(40_000, long) == pytest.approx(5e-4)  # sqrt(100 / 40,000): no floor
    assert all(learning_rate(step, short) == learning_rate(step, long) for step in range(501))


def test_warmup_rsqrt_warms_up_linearly_and_stops_at_the_floor():
    cfg = TrainConfig(max_steps=50_000, lr=1e-2, warmup_steps=100, schedule="warmup_rsqrt",
                      warmup_init_lr=0.0)
    assert learning_rate(50, cfg) == pytest.approx(5e-3)  # halfway up the warmup
    assert learning_rate(400, cfg) == pytest.approx(5e-3)  # sqrt(100 / 400) = 1/2
    assert learning_rate(2500, cfg) == pytest.approx(2e-3)  # sqrt(100 / 2500) = 1/5
    assert learning_rate(40_000, cfg) == pytest.approx(1e-3)  # floor: min_lr_ratio 0.1


def test_schedule_steps_fix_the_schedule_whatever_max_steps():
    planned = TrainConfig(max_steps=1000, lr=1e-3, warmup_steps=100)
    longer = TrainConfig(max_steps=2000, lr=1e-3, warmup_steps=100, schedule_steps=1000)
    assert all(learning_rate(step, longer) == learning_rate(step, planned)
               for step in range(1001))
    assert learning_rate(1500, longer) == pytest.approx(1e-4)  # the floor after its end
    # A run planned long and stopped early follows the rates of the whole plan.
    early = TrainConfig(max_steps=300, lr=1e-3, warmup_steps=100, schedule_steps=1000)
    assert all(learning_rate(step, early) == learning_rate(step, planned) for step in range(301))


def test_wsd_decay_steps_end_at_max_steps_so_a_run_can_be_extended_then_decayed():
    stable = TrainConfig(max_steps=1000, lr=1e-3, warmup_steps=10, schedule="wsd",
                         decay_steps=200, min_lr_ratio=0.0)
    extended = TrainConfig(max_steps=3000, lr=1e-3, warmup_steps=10, schedule="wsd",
                           decay_steps=200, min_lr_ratio=0.0)
    assert learning_rate(799, stable) == 1e-3 and learning_rate(900, stable) == pytest.approx(5e-4)
    assert learning_rate(2799, extended) == 1e-3  # the stable phase stretches
    assert learning_rate(2900, extended) == pytest.approx(5e-4)
    assert learning_rate(3000, extended) == pytest.approx(0.0)


def test_a_longer_resume_says_what_it_does_to_the_schedule(tmp_path, capsys):
    cfg = tiny_run_config(max_steps=4, warmup_steps=1)
    train(cfg, tmp_path / "run", verbose=False)
    longer = tiny_run_config(max_steps=8, warmup_steps=1)
    train(longer, tmp_path / "run", resume=True)
    notes = [line for line in capsys.readouterr().out.splitlines() if "--max-steps" in line]
    before, after = learning_rate(4, cfg.train), learning_rate(4, longer.train)
    assert after > before  # the cosine over 8 steps is higher at step 4 than its end
    assert notes == [f"note: --max-steps 8 (was 4): the cosine schedule is recomputed over 8 "
                     f"steps; the rate at step 4 goes from {before:.2e} to {after:.2e} "
                     "(--schedule-steps 4 keeps the old schedule)"]


def test_extending_a_run_with_schedule_steps_gives_the_losses_of_the_whole_run(tmp_path):
    straight = train(tiny_run_config(max_steps=8, schedule_steps=8), tmp_path / "straight",
                     verbose=False)["train_losses"]
    train(tiny_run_config(max_steps=4, schedule_steps=8), tmp_path / "extended", verbose=False)
    extended = train(tiny_run_config(max_steps=8, schedule_steps=8), tmp_path / "extended",
                     resume=True, verbose=False)
    assert extended["train_losses"] == straight


def test_weight_decay_only_on_matrices():
    from burrow import ModelConfig, Transformer

    model = Transformer(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2,
                                    positions="relative", bias=True, norm="layernorm"))
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() == 2 for p in decayed["params"])
    assert {names[id(p)].rsplit(".", 1)[-1] for p in plain["params"]} == {"weight", "bias",
                                                                          "u", "v"}


def test_switch_routers_are_not_decayed_but_experts_are():
    from burrow import ModelConfig, Transformer
    from burrow.config import MoEConfig

    model = Transformer(ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2,
                                    moe=MoEConfig(num_experts=4)))
    decayed, plain = build_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    assert "blocks.1.mlp.router.weight" in plain_names
    assert {"blocks.1.mlp.experts.up_proj", "blocks.1.mlp.experts.down_proj",
            "blocks.0.mlp.up_proj.weight"} <= decayed_names


def test_training_learns_and_writes_a_complete_run(tmp_path):
    cfg = tiny_run_config(max_steps=30, eval_every=15, save_every=15)
    summary = train(cfg, tmp_path / "run", verbose=False)
    run = tmp_path / "run"
    for name in ("config.yaml", "tokenizer.model", "metrics.jsonl", "loss.png", "samples.txt",
                 "data.json"):
        assert (run / name).is_file(), name
    assert [p.name for p in list_checkpoints(run)] == ["step_15", "step_30"]
    losses = summary["train_losses"]
    assert len(losses) == 30 and losses[-1] < losses[0] - 0.3  # it learns
    assert losses[0] == pytest.approx(math.log(512), abs=0.15)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [row for row in rows if row["split"] == "val"]
    assert [row["step"] for row in val] == [15, 30]
    assert all({"step", "loss", "lr"} <= set(row) for row in rows)
    model, tokenizer, loaded_cfg = load_run(run)
    assert loaded_cfg == cfg
    ids = torch.tensor([tokenizer.encode("def f(x):")])
    assert generate(model, ids, 5, temperature=0).shape == (1, ids.shape[1] + 5)


def test_resume_gives_the_same_losses_as_not_stopping(tmp_path, monkeypatch):
    cfg = tiny_run_config(max_steps=20)
    straight = losses_of(Path(train(cfg, tmp_path / "straight", verbose=False)["run_dir"]))

    # A signal arriving during step 10: the loop finishes the step, saves and stops.
    original = Trainer.train_step

    def stop_after_ten(self):
        result = original(self)
        if self.step == 10:
            self._on_signal(2, None)
        return result

    monkeypatch.setattr(Trainer, "train_step", stop_after_ten)
    first = train(cfg, tmp_path / "stopped", verbose=False)
    assert first["interrupted"] and first["step"] == 10
    monkeypatch.setattr(Trainer, "train_step", original)
    second = train(cfg, tmp_path / "stopped", resume=True, verbose=False)
    assert second["step"] == 20 and not second["interrupted"]
    assert losses_of(tmp_path / "stopped") == straight  # exactly, not approximately


def test_resume_refuses_other_data(tmp_path):
    cfg = tiny_run_config(max_steps=4)
    train(cfg, tmp_path / "run", verbose=False)
    other = tmp_path / "other"
    shutil.copytree(Path(cfg.data.source), other)
    (other / "extra.txt").write_text("some different text\n" * 200)
    cfg.train.max_steps = 8
    cfg.data.source = str(other)
    with pytest.raises(UserError, match="other data"):
        train(cfg, tmp_path / "run", resume=True, verbose=False)
    assert train(cfg, tmp_path / "run", resume=True, allow_data_change=True,
                 verbose=False)["step"] == 8


def test_fresh_run_refuses_to_overwrite_and_resume_needs_a_checkpoint(tmp_path):
    cfg = tiny_run_config(max_steps=2)
    with pytest.raises(UserError, match="no checkpoint"):
        train(cfg, tmp_path / "run", resume=True, verbose=False)
    train(cfg, tmp_path / "run", verbose=False)
    with pytest.raises(UserError, match="--resume"):
        train(cfg, tmp_path / "run", verbose=False)


def test_a_half_written_checkpoint_is_ignored(tmp_path):
    cfg = tiny_run_config(max_steps=4, save_every=2, keep_checkpoints=0)
    train(cfg, tmp_path / "run", verbose=False)
    checkpoints = tmp_path / "run" / "checkpoints"
    shutil.copytree(checkpoints / "step_4", checkpoints / "step_6.tmp")  # a crash mid-write
    (checkpoints / "step_6.tmp" / "model.safetensors").write_bytes(b"\0" * 10)
    assert latest_checkpoint(tmp_path / "run").name == "step_4"
    cfg.train.max_steps = 6
    assert train(cfg, tmp_path / "run", resume=True, verbose=False)["step"] == 6


def test_accumulation_matches_one_big_batch(tmp_path):
    one = train(tiny_run_config(max_steps=3, batch_tokens=512, micro_batch_size=8),
                tmp_path / "one", verbose=False)["train_losses"]
    two = train(tiny_run_config(max_steps=3, batch_tokens=512, micro_batch_size=4),
                tmp_path / "two", verbose=False)["train_losses"]
    # Same 8 sequences per step, split into 2 micro-batches: equal up to float summation order.
    assert one == pytest.approx(two, rel=1e-5)


def platform_key() -> dict:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "machine": platform.machine()}


def test_golden_losses(tmp_path):
    """A short deterministic run's per-step losses, committed; a change must be deliberate.

    Regenerate with BURROW_REGENERATE_GOLDEN=1 and say why in the commit.
    """
    import os

    losses = train(tiny_run_config(max_steps=8), tmp_path / "run",
                   verbose=False)["train_losses"]
    if os.environ.get("BURROW_REGENERATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"platform": platform_key(), "losses": losses}, indent=1))
    golden = json.loads(GOLDEN.read_text())
    if golden["platform"] == platform_key():
        assert losses == golden["losses"]  # bit for bit on the platform that wrote them
    else:  # other kernels sum in another order: equal to float tolerance
        assert losses == pytest.approx(golden["losses"], rel=1e-4)


def test_a_single_file_trains_without_held_out_data(tmp_path):
    from burrow.eval import evaluate

    text = (Path(tiny_run_config().data.source) / "textwrap.py").read_text()
    (tmp_path / "one.txt").write_text(text)
    cfg = tiny_run_config(max_steps=3, eval_every=1)
    cfg.data.source = str(tmp_path / "one.txt")
    summary = train(cfg, tmp_path / "run", verbose=False)
    assert summary["step"] == 3 and summary["val"] is None
    assert (tmp_path / "run" / "loss.png").is_file()
    from burrow.data import TokenDataset
    from burrow.run import prepared_data_of

    empty = TokenDataset(prepared_data_of(tmp_path / "run"), "val")
    model, _, _ = load_run(tmp_path / "run")
    with pytest.raises(UserError, match="no tokens to predict"):
        evaluate(model, empty, seq_len=64)


def test_loss_spike_rolls_back_and_skips_data(tmp_path, monkeypatch):
    """PaLM §5.1 with an injected spike: back to the checkpoint >= 4 steps earlier, skip 3."""
    from burrow.train.spikes import SpikeDetector

    cfg = tiny_run_config(max_steps=16, save_every=4, keep_checkpoints=0, spike_factor=1.5,
                          spike_window=8, spike_rollback=4, spike_skip=3)
    original = Trainer.train_step
    spiked = []

    def spiky(self):
        loss, cross_entropy, grad_norm = original(self)
        if self.step == 10 and not spiked:
            spiked.append(True)
            return loss * 3, cross_entropy, grad_norm
        return loss, cross_entropy, grad_norm

    monkeypatch.setattr(Trainer, "train_step", spiky)
    summary = train(cfg, tmp_path / "run", verbose=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    events = [row for row in rows if row["split"] == "event"]
    assert len(events) == 1
    assert events[0]["step"] == 10 and events[0]["event"] == "loss_spike"
    assert events[0]["rolled_back_to"] == 4 and events[0]["skipped_batches"] == 3  # 10 - 4 >= 4
    assert summary["step"] == 16
    # From step 4: 12 trained steps and 3 skipped, of 4 windows each.
    checkpoints = tmp_path / "run" / "checkpoints"
    at_4 = torch.load(checkpoints / "step_4" / "trainer.pt", weights_only=True)["loader"]
    at_16 = torch.load(checkpoints / "step_16" / "trainer.pt", weights_only=True)["loader"]
    assert at_16["position"] - at_4["position"] == (12 + 3) * 4
    assert not [row for row in rows if row["split"] == "train" and row["loss"] > 10]

    detector = SpikeDetector(factor=2.0, window=8)
    assert [detector.observe(x) for x in (3.0, 3.0, 7.0, 5.0)] == [None, None, 6.0, None]
    assert SpikeDetector(factor=0.0, window=8).observe(1e9) is None  # off


def test_compiled_training_matches_eager(tmp_path):
    """--compile changes the kernels, not the arithmetic: losses agree to float tolerance."""
    eager = train(tiny_run_config(max_steps=4), tmp_path / "eager", verbose=False)
    compiled = train(tiny_run_config(max_steps=4, compile=True), tmp_path / "compiled",
                     verbose=False)
    assert compiled["train_losses"] == pytest.approx(eager["train_losses"], rel=1e-4)
    model, _, _ = load_run(tmp_path / "compiled")  # the raw module's names, no _orig_mod.
    assert set(model.state_dict()) == set(load_run(tmp_path / "eager")[0].state_dict())
