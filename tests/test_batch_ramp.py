"""Batch ramps (PaLM §5): the batch is a function of the step, the data one stream in order,
accumulation exact over a change of batch, and a resume across a change bit for bit."""

import json
from pathlib import Path

import pytest
import torch

from burrow import TrainConfig, Transformer, UserError
from burrow.data import BatchLoader
from burrow.parallel import ParallelDims
from burrow.train import Trainer, train
from burrow.train.batches import BatchSchedule
from burrow.train.checkpoint import load_weights
from conftest import tiny_run_config

# Micro-batches of 4 sequences of 64 tokens (256 tokens); steps 0-3 take one, 4-7 two, 8-11 three.
RAMP = dict(max_steps=12, batch_tokens=256, micro_batch_size=4, seq_len=64,
            batch_ramp="4:512,8:768", save_every=4, keep_checkpoints=0)


def reference_batch(step: int, batch_tokens: int, ramp: list[tuple[int, int]]) -> int:
    """The tokens of `step`, read off the ramp by a plain walk over its entries."""
    tokens = batch_tokens
    for first, size in ramp:
        if step >= first:
            tokens = size
    return tokens


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["split"] == "train"]


# -- the config and the schedule ---------------------------------------------------------------

def test_a_ramp_is_parsed_in_order():
    train_cfg = TrainConfig(batch_ramp=" 50000:2097152, 115000:4194304 ")
    assert train_cfg.batch_changes() == [(50000, 2097152), (115000, 4194304)]
    assert TrainConfig().batch_changes() == []


@pytest.mark.parametrize(("ramp", "message"), [
    ("50000", "not a list of STEP:TOKENS"),
    ("50k:2M", "not a list of STEP:TOKENS"),
    ("10:-512", "not a list of STEP:TOKENS"),
    ("0:512", "starts at step 0, whose batch is train.batch_tokens"),
    ("8:512,4:768", "step 4 comes after step 8"),
    ("4:512,4:768", "step 4 comes after step 4"),
    ("4:0", "has 0 tokens"),
])
def test_a_bad_ramp_is_one_line(ramp, message):
    with pytest.raises(UserError, match=message) as caught:
        TrainConfig(batch_ramp=ramp)
    assert "\n" not in str(caught.value)


def test_the_flag_takes_a_ramp_and_refuses_a_bad_one(capsys):
    from burrow.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "--batch-ramp", "50000:2097152,115000:4194304"])
    assert args.train_batch_ramp == "50000:2097152,115000:4194304"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--batch-ramp", "0:512"])
    assert "starts at step 0" in capsys.readouterr().err


def test_every_step_gets_the_ramps_batch():
    ramp = [(3, 2048), (7, 512), (9, 4096)]
    schedule = BatchSchedule.for_train(
        TrainConfig(batch_tokens=1024, micro_batch_size=2, seq_len=64,
                    batch_ramp=",".join(f"{step}:{tokens}" for step, tokens in ramp)), 2)
    assert schedule.ramped and schedule.micro_tokens == 2 * 64 * 2
    for step in range(15):
        assert schedule.tokens(step) == reference_batch(step, 1024, ramp), step
        assert schedule.accumulation(step) == reference_batch(step, 1024, ramp) // 256
    for start in range(15):
        for end in range(start, 15):
            assert schedule.tokens_between(start, end) == sum(
                reference_batch(step, 1024, ramp) for step in range(start, end)), (start, end)


def test_palms_ramp():
    """PaLM §5: 512 sequences of 2,048 tokens until step 50k, 1,024 until 115k, then 2,048 to
    the end at step 255k, which is one pass over its 780B tokens."""
    palm = TrainConfig(seq_len=2048, micro_batch_size=8, batch_tokens=512 * 2048,
                       batch_ramp="50000:2097152,115000:4194304")
    schedule = BatchSchedule.for_train(palm, data_parallel=64)
    sequences = {step: schedule.tokens(step) // 2048
                 for step in (0, 49_999, 50_000, 114_999, 115_000, 254_999)}
    assert sequences == {0: 512, 49_999: 512, 50_000: 1024, 114_999: 1024, 115_000: 2048,
                         254_999: 2048}
    assert schedule.accumulation(0) == 1 and schedule.accumulation(115_000) == 4
    assert schedule.tokens_between(0, 255_000) == pytest.approx(780e9, rel=0.01)


def test_without_a_ramp_the_batch_is_rounded_as_before():
    schedule = BatchSchedule.for_train(TrainConfig(batch_tokens=1000, micro_batch_size=4,
                                                   seq_len=64), 1)
    assert not schedule.ramped and schedule.tokens(0) == schedule.tokens(10**6) == 1024


def test_every_batch_of_a_ramp_must_be_whole_micro_batches():
    cfg = TrainConfig(batch_tokens=512, micro_batch_size=4, seq_len=64, batch_ramp="4:768")
    assert BatchSchedule.for_train(cfg, 1).accumulation(4) == 3
    # on two ranks a micro-batch is 512 tokens: 768 would leave one rank a micro-batch short
    with pytest.raises(UserError, match=r"batch from step 4 \(768 tokens\) is not a whole "
                       r"number of micro-batches of 512 tokens"):
        BatchSchedule.for_train(cfg, 2)
    with pytest.raises(UserError, match=r"train.batch_tokens \(320 tokens\)"):
        BatchSchedule.for_train(TrainConfig(batch_tokens=320, micro_batch_size=4, seq_len=64,
                                            batch_ramp="4:768"), 1)


def test_a_run_that_cannot_ramp_stops_before_anything_is_written(tmp_path):
    cfg = tiny_run_config(batch_ramp="4:320")
    with pytest.raises(UserError, match="whole number of micro-batches"):
        train(cfg, tmp_path / "run", verbose=False)
    assert not (tmp_path / "run").exists()


def test_a_pipeline_refuses_a_ramp():
    cfg = tiny_run_config(batch_ramp="4:512")
    with pytest.raises(UserError, match="pipeline_parallel=2 with a batch ramp"):
        ParallelDims.for_mode("none", 2, pp=2).check_model(cfg)


# -- a ramped run ------------------------------------------------------------------------------

class Recording(Trainer):
    """A Trainer that keeps what each step read and the gradient of step GRADIENT_STEP."""

    GRADIENT_STEP = 8  # the first step of three micro-batches
    last: "Recording"

    def setup(self) -> None:
        super().setup()
        Recording.last = self
        self.inputs: dict[int, list[torch.Tensor]] = {}
        self.targets: dict[int, list[torch.Tensor]] = {}

    def forward_loss(self, inputs, targets, **more):
        self.inputs.setdefault(self.step, []).append(inputs.clone())
        self.targets.setdefault(self.step, []).append(targets.clone())
        return super().forward_loss(inputs, targets, **more)

    def clip_gradients(self, clip):
        if self.step == self.GRADIENT_STEP:
            self.gradients = {name: param.grad.clone()
                              for name, param in self.model.named_parameters()}
        return super().clip_gradients(clip)


@pytest.fixture(scope="module")
def ramped(tmp_path_factory):
    """Twelve steps of the RAMP run, checkpointed every four, and what each step read."""
    cfg = tiny_run_config(**RAMP)
    run_dir = tmp_path_factory.mktemp("ramp") / "run"
    train(cfg, run_dir, verbose=False, trainer_class=Recording)
    return cfg, run_dir, Recording.last


def reference_batches(cfg) -> list[int]:
    return [reference_batch(step, cfg.train.batch_tokens, [(4, 512), (8, 768)])
            for step in range(cfg.train.max_steps)]


def test_a_ramped_run_reads_the_stream_in_order(ramped):
    """Each step's sequences are the next ones of a loader without a ramp, taken in the
    amounts the ramp gives."""
    cfg, _, trainer = ramped
    stream = BatchLoader(trainer.train_data, 4, 64, seed=cfg.train.seed)
    for step, tokens in enumerate(reference_batches(cfg)):
        expected = [stream.next_batch() for _ in range(tokens // (4 * 64))]
        assert len(trainer.inputs[step]) == len(expected), step
        assert torch.equal(torch.cat(trainer.inputs[step]),
                           torch.cat([inputs for inputs, _ in expected])), step
        assert torch.equal(torch.cat(trainer.targets[step]),
                           torch.cat([targets for _, targets in expected])), step


def test_the_tokens_are_the_sum_of_the_steps_batches(ramped):
    cfg, run_dir, _ = ramped
    batches = reference_batches(cfg)
    rows = train_rows(run_dir)
    assert [row["step"] for row in rows] == list(range(1, 13))
    assert [row["batch_tokens"] for row in rows] == batches
    assert [row["tokens"] for row in rows] == [sum(batches[:step]) for step in range(1, 13)]


def test_accumulation_over_a_larger_batch_is_one_batch(ramped):
    """The first step of three micro-batches: its loss and gradient are those of its twelve
    sequences in one batch, computed from the weights the step started with."""
    cfg, run_dir, trainer = ramped
    step = Recording.GRADIENT_STEP
    model = Transformer(cfg.model)
    load_weights(run_dir / "checkpoints" / f"step_{step}", model)
    out = model(torch.cat(trainer.inputs[step]), labels=torch.cat(trainer.targets[step]))
    out.loss.backward()
    logged = next(row["loss"] for row in train_rows(run_dir) if row["step"] == step + 1)
    assert logged == pytest.approx(out.loss.item(), rel=1e-5)
    for name, param in model.named_parameters():
        assert torch.allclose(trainer.gradients[name], param.grad, rtol=1e-4, atol=1e-7), name


@pytest.mark.parametrize("stop", [6, 8])
def test_a_resume_across_a_change_of_batch_is_exact(ramped, tmp_path, monkeypatch, stop):
    """Stopped at step 6 (between two changes) or 8 (the last step of the old batch), then
    resumed: the same losses, bit for bit, and the same token counts as the run that did not
    stop."""
    cfg, run_dir, _ = ramped
    original = Trainer.train_step

    def stopping(self):
        result = original(self)
        if self.step == stop:
            self._on_signal(2, None)
        return result

    monkeypatch.setattr(Trainer, "train_step", stopping)
    assert train(cfg, tmp_path / "run", verbose=False)["step"] == stop
    monkeypatch.setattr(Trainer, "train_step", original)
    assert train(cfg, tmp_path / "run", resume=True, verbose=False)["step"] == 12
    straight, resumed = train_rows(run_dir), train_rows(tmp_path / "run")
    assert [row["loss"] for row in resumed] == [row["loss"] for row in straight]
    assert [row["tokens"] for row in resumed] == [row["tokens"] for row in straight]
