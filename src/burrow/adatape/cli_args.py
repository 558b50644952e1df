"""The flags of `burrow adatape parity`; torch-free, so that `burrow --help` starts at once."""

from __future__ import annotations

import argparse

from burrow.adatape.settings import DEFAULTS, MODELS
from burrow.config.adatape import AdaTapeConfig
from burrow.flags import COUNT, POSITIVE, POSITIVE_INT

TAPE = AdaTapeConfig()


def add_adatape_command(commands: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """`burrow adatape parity`; returns the sub-verbs' action (for the "required" message)."""
    adatape = commands.add_parser("adatape", help="AdaTape (Xue et al. 2023): adaptive tape "
                                  "tokens; the parity task (docs/adatape.md)")
    verbs = adatape.add_subparsers(dest="adatape_command", required=True)
    parity = verbs.add_parser("parity", help="train AdaTape, a Transformer and a Universal "
                              "Transformer of matched size on parity; accuracy, tape length, "
                              "FLOPs and plots")
    task = parity.add_argument_group("task")
    task.add_argument("--length", type=POSITIVE_INT, default=DEFAULTS.length,
                      help=f"elements per sequence; default {DEFAULTS.length} (scenic's "
                      "parity_dataset.py)")
    task.add_argument("--sampling", choices=("uniform", "graves"), default=DEFAULTS.sampling,
                      help="uniform: every element -1, 0 or +1 with equal odds (scenic); "
                      "graves: 1 to length non-zeros (Graves 2016 §3.1); default uniform")
    task.add_argument("--input", choices=("tokens", "whole"), default=DEFAULTS.input,
                      help="tokens: a position per element; whole: the sequence as one "
                      "embedded token, as scenic's parity model (not the UT's); default whole")
    task.add_argument("--eval-size", type=POSITIVE_INT, default=DEFAULTS.eval_size,
                      help=f"held-out sequences; default {DEFAULTS.eval_size}")
    train = parity.add_argument_group("training (each model on the same stream)")
    train.add_argument("--models", default=",".join(MODELS),
                       help=f"comma-separated; default {','.join(MODELS)}")
    train.add_argument("--steps", type=POSITIVE_INT, default=DEFAULTS.steps,
                       help=f"optimizer steps per model; default {DEFAULTS.steps}")
    train.add_argument("--batch-size", type=POSITIVE_INT, default=DEFAULTS.batch_size,
                       help=f"default {DEFAULTS.batch_size}")
    train.add_argument("--lr", type=POSITIVE, default=DEFAULTS.lr,
                       help=f"AdamW's peak learning rate; default {DEFAULTS.lr:g}")
    train.add_argument("--warmup-steps", type=COUNT, default=None,
                       help="linear warmup, then cosine decay; default a tenth of --steps")
    train.add_argument("--eval-every", type=POSITIVE_INT, default=None,
                       help="steps between held-out evaluations; default --steps / 20")
    train.add_argument("--seed", type=COUNT, default=DEFAULTS.seed)
    train.add_argument("--device", default=DEFAULTS.device, help="cpu, cuda or auto; "
                       "default cpu")
    shape = parity.add_argument_group("model (AdaTape's; the others' widths match its "
                                      "parameter count)")
    shape.add_argument("--d-model", type=POSITIVE_INT, default=DEFAULTS.d_model,
                       help=f"default {DEFAULTS.d_model}")
    shape.add_argument("--layers", type=POSITIVE_INT, default=DEFAULTS.n_layers,
                       help=f"blocks of AdaTape and the Transformer; the Universal "
                       f"Transformer's ACT takes at most twice as many steps; default "
                       f"{DEFAULTS.n_layers}")
    shape.add_argument("--heads", type=POSITIVE_INT, default=DEFAULTS.n_heads,
                       help=f"default {DEFAULTS.n_heads}")
    tape = parity.add_argument_group("AdaTape (model.adatape; defaults AdaTapeConfig's)")
    tape.add_argument("--bank", choices=("input", "learnable"),
                      help=f"where tape tokens come from; default {TAPE.bank}")
    tape.add_argument("--threshold", type=POSITIVE, help="halting threshold of adaptive tape "
                      f"reading; default {TAPE.threshold:g}")
    tape.add_argument("--max-tape-len", type=POSITIVE_INT,
                      help=f"most tape tokens appended; default {TAPE.max_tape_len}")
    tape.add_argument("--top-k", type=POSITIVE_INT,
                      help=f"bank entries merged into each tape token; default {TAPE.top_k}")
    tape.add_argument("--bank-size", type=POSITIVE_INT,
                      help=f"entries of a learnable bank; default {TAPE.bank_size}")
    parity.add_argument("--out", help="directory for result.json, accuracy.png and "
                        "tape_length.png; default runs/adatape-parity-LENGTH")
    parity.add_argument("--json", action="store_true", help="print one JSON object")
    return verbs
