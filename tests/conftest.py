"""Shared fixtures: a small real corpus, a private data cache, a tiny training config."""

import os
import sys
from pathlib import Path

import pytest

from burrow import ModelConfig, RunConfig, TrainConfig
from burrow.config import DataConfig

CORPUS = Path(__file__).parent / "data" / "corpus"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Prepared data goes to a per-session cache, never the user's ~/.cache/burrow."""
    cache = tmp_path_factory.mktemp("burrow-cache")
    old = os.environ.get("BURROW_CACHE")
    os.environ["BURROW_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("BURROW_CACHE", None)
    else:
        os.environ["BURROW_CACHE"] = old


def tiny_run_config(**train) -> RunConfig:
    """A micro model on the test corpus: a few seconds for 20 steps on 2 cores."""
    fields = dict(max_steps=20, batch_tokens=256, micro_batch_size=4, seq_len=64, lr=3e-3,
                  warmup_steps=4, eval_every=0, save_every=0, log_every=1, eval_tokens=2048,
                  seed=0, device="cpu")
    fields.update(train)
    model = ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=2, max_seq_len=64)
    return RunConfig(model=model, train=TrainConfig(**fields),
                     data=DataConfig(source=str(CORPUS), val_fraction=0.25), preset="micro")


def burrow_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "burrow", *args]


@pytest.fixture(scope="session")
def single_run(tmp_path_factory) -> Path:
    """Eight steps of test_parallel.COMMON in one process, ending with a held-out evaluation:
    the run every parallel layout (data, tensor, pipeline) must reproduce."""
    from test_parallel import train

    out = tmp_path_factory.mktemp("single") / "run"
    train(out, 8)
    return out


@pytest.fixture(scope="session")
def single(single_run) -> list[float]:
    """The train losses of `single_run`, step by step."""
    from burrow.train.metrics import MetricsLog

    return [row["loss"] for row in MetricsLog(single_run / "metrics.jsonl").rows()
            if row["split"] == "train"]
