"""RETRO-fitting (Borgeaud et al. 2021, §4.4): retrieval added to a trained model.

The RETRO model takes the trained run's decoder as it is, every weight frozen, and trains only
what retrieval adds: the neighbour encoder and the chunked cross-attention layers with their
norms (model/retro.py, `retro_parameters`). The paper retro-fits its 7B baseline this way, on
6M sequences (3% of its pre-training), and recovers most of a RETRO model trained from scratch.
CCA's output projection starts at zero, so the retro-fitted model starts exactly at the
baseline, and without neighbours it stays the baseline whatever it has trained: its CCA layers
then add zeros and nothing else moved.

    burrow train --retro-fit runs/nano --retro-db db/stdlib --out runs/nano-retro --max-steps 300
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from burrow.config import RetroConfig, RunConfig
from burrow.data import Tokenizer
from burrow.errors import UserError
from burrow.files import copy_file
from burrow.model.retro import retro_parameters
from burrow.run import load_run
from burrow.train.distill import trained_config
from burrow.train.trainer import Trainer


def retrofit_config(base_dir: Path | str, retro: RetroConfig | None = None) -> RunConfig:
    """The run config that retro-fits the trained run in base_dir: its model with retrieval
    (model.retro: `retro`, or RETRO's defaults for its depth), its data, tokenizer and training
    settings, until flags say otherwise."""
    base = trained_config(Path(base_dir), "run to retro-fit")
    if base.model.retro is not None:
        raise UserError(f"{base_dir} already retrieves (model.retro is set); retro-fit a model "
                        "without retrieval")
    model = dataclasses.replace(base.model, retro=retro or RetroConfig())
    return RunConfig(model=model, train=base.train, data=base.data, preset=base.preset,
                     retro_fit=str(Path(base_dir).expanduser().resolve()))


class RetroFitter(Trainer):
    """A Trainer that starts from the weights of cfg.retro_fit's run and trains only the
    parameters retrieval adds. The data is the base run's, tokenized as it was (the same
    prepared shards, so the neighbours looked up for them serve both runs)."""

    def setup(self) -> None:
        tokenizer = self.run_dir / "tokenizer.model"  # data.keep_tokenizer reads it from here
        if self.cfg.data.keep_tokenizer and self.runtime.is_main and not tokenizer.exists():
            copy_file(Path(self.cfg.retro_fit) / "tokenizer.model", tokenizer)
        self.runtime.barrier()
        super().setup()

    def prepare_model(self) -> None:
        base_tokenizer = Tokenizer.load(Path(self.cfg.retro_fit) / "tokenizer.model")
        if base_tokenizer.fingerprint != self.tokenizer.fingerprint:
            raise UserError(f"the data is tokenized with another vocabulary than "
                            f"{self.cfg.retro_fit} was trained with; retro-fit on its data "
                            "(drop --data) or pass --set data.keep_tokenizer=true")
        trainable = retro_parameters(self.model)
        if not self.resume:  # a resume reloads every weight from its own checkpoint
            base, _, _ = load_run(self.cfg.retro_fit, device=self.device)
            missing, unexpected = self.model.load_state_dict(base.state_dict(), strict=False)
            if unexpected or set(missing) - set(trainable):
                raise UserError(f"{self.cfg.retro_fit}'s weights do not fit this model "
                                f"(unexpected {unexpected[:3]}, missing "
                                f"{sorted(set(missing) - set(trainable))[:3]}); retro-fit it "
                                "with its own model settings")
            del base
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(name in trainable)
        count = sum(parameter.numel() for parameter in trainable.values())
        self.log(f"retro-fit: the decoder of {self.cfg.retro_fit} frozen; training {count:,} of "
                 f"{self.cfg.model.num_params():,} parameters (encoder and chunked "
                 "cross-attention)")
