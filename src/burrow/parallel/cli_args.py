"""The flags of `burrow plan-parallel`; torch- and numpy-free (and apart from the planner
package, which needs numpy), so that `burrow --help` starts at once."""

from __future__ import annotations

import argparse

from burrow.flags import FRACTION, POSITIVE_INT


def add_plan_parallel_command(commands: argparse._SubParsersAction) -> None:
    plan = commands.add_parser("plan-parallel", help="Galvatron: the fastest per-layer mix of "
                               "data, sharded, tensor and pipeline parallelism and "
                               "checkpointing that fits the GPUs' memory (docs/galvatron.md)")
    plan.add_argument("--preset", required=True, help="the model (see `burrow presets`)")
    plan.add_argument("--gpus", type=POSITIVE_INT, required=True, help="number of GPUs")
    plan.add_argument("--hardware", default="h100", help="h100, h200, a100 or a100-40gb "
                      "(datasheet figures), or local (this machine's profile, as --profile); "
                      "default h100")
    plan.add_argument("--memory", help="memory per GPU the plan may use: 80GB, 80GiB or bytes "
                      "(40e9); default the hardware's")
    plan.add_argument("--seq-len", type=POSITIVE_INT, help="tokens per sequence; default the "
                      "preset's context")
    plan.add_argument("--global-batch", type=POSITIVE_INT, metavar="TOKENS", help="tokens per "
                      "step, a whole number of sequences; default about 2^21 (2.1M, Gopher "
                      "7.1B's batch)")
    plan.add_argument("--precision", choices=("bf16", "fp32"),
                      help="bf16: mixed precision (fp32 master weights and Adam moments); "
                      "default bf16, or what a profile was measured in")
    plan.add_argument("--efficiency", type=FRACTION, help="share of the bf16 peak a layer's "
                      "matmuls sustain; default 0.6")
    plan.add_argument("--executable", action="store_true", help="search only plans burrow "
                      "train --plan can run: one tensor-parallel degree for every layer, a "
                      "data-parallel layout per layer, checkpointing per block, tensor "
                      "parallelism inside pipeline stages when it divides the sequence")
    plan.add_argument("--out", metavar="PLAN_JSON", help="write the searched plan to this file")
    plan.add_argument("--profile", nargs="?", const="", metavar="PROFILE_JSON",
                      help="plan for this machine from its measured profile, --gpus read as "
                      "processes: the cached one ($BURROW_CACHE/profiles/), or this file; what "
                      "is missing is measured first")
    plan.add_argument("--profile-only", action="store_true", help="measure this machine's "
                      "layers and collectives anew, save the profile and print its figures")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
