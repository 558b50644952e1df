"""The `burrow` command: parse arguments, call one function, print. No logic lives here.

It starts at once: the verbs that do arithmetic (presets, plan, fit, --help) import neither torch
nor matplotlib; each verb imports what it needs when it runs. Every numeric flag is checked with
its range as it is parsed, and every mistake a user can make, a file-system error, or Ctrl-C ends
in one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys

from burrow.adatape.cli_args import add_adatape_command
from burrow.config import TrainConfig, field_docs
from burrow.errors import UserError
from burrow.ff.cli_args import add_ff_command
from burrow.flags import (
    COUNT,
    FRACTION,
    HELD_OUT,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    ConfigField,
    Number,
)
from burrow.parallel.cli_args import add_plan_parallel_command


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr naming the verb's help, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"burrow: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        """A verb reports the arguments it does not know itself, so that the error names its
        help (`burrow train --help`) rather than the top level's."""
        parsed, extras = super().parse_known_args(args, namespace)
        if extras and self._subparsers is None:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    """Every TrainConfig field becomes a flag of the same name (--max-steps, --lr, ...), checked
    as it is parsed by TrainConfig's own validation."""
    group = parser.add_argument_group("training (TrainConfig fields; any field of any section "
                                      "also with --set)")
    docs = field_docs(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        kind = ConfigField(TrainConfig, field.name, "train")
        help_text = f"{docs.get(field.name, '')} (default {field.default})".replace("%", "%%")
        boolean = kind.kind is bool
        group.add_argument(_flag(field.name), dest=f"train_{field.name}", type=kind,
                           nargs="?" if boolean else None, const="true" if boolean else None,
                           default=None, metavar="BOOL" if boolean else field.name.upper(),
                           help=help_text)


def _add_text_field(parser: argparse.ArgumentParser, default: str | None = "text",
                    otherwise: str = "") -> None:
    """--text-field wherever --data is: the .jsonl field read (data.text_field)."""
    parser.add_argument("--text-field", default=default, help="field holding the text in .jsonl "
                        f"records (data.text_field); default {otherwise or default}")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="burrow", description="Plan, train, scale and evaluate transformer "
                    "language models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train = commands.add_parser("train", help="train a model into a run directory")
    train.add_argument("--preset", help="model preset (see `burrow presets`); default nano")
    train.add_argument("--config", help="YAML run config (sections model, train, data; the "
                       "ones left out take their defaults)")
    train.add_argument("--recipe", help="train as a paper did: gopher (the Table 1 row nearest "
                       "the model's size), gopher-44m ... gopher-280b, chinchilla-70b, palm, "
                       "switch (see `burrow presets --recipes`); scaled to the run's batch and "
                       "steps, flags still win")
    train.add_argument("--data", help="stdlib, a text file, a directory, a .jsonl file, or a "
                       "prepared directory; default stdlib")
    _add_text_field(train, None, "the config's, else text")
    train.add_argument("--retro-db", metavar="DB", help="the chunk database a RETRO model "
                       "(a retro- preset) retrieves from, made by `burrow retro build`")
    train.add_argument("--retro-fit", metavar="RUN", help="add retrieval to the trained run RUN: "
                       "its weights frozen, only the encoder and chunked cross-attention "
                       "train (RETRO §4.4); needs --retro-db")
    train.add_argument("--out", help="run directory; default runs/PRESET")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                       help="override any config field, e.g. --set model.d_model=384")
    train.add_argument("--plan", metavar="PLAN_JSON", help="train as a plan of burrow "
                       "plan-parallel says: degrees, stages, micro-batches, checkpointed blocks "
                       "and batch (these flags are then taken from the plan)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its latest checkpoint")
    train.add_argument("--allow-data-change", action="store_true",
                       help="with --resume, accept data other than the run was trained on")
    _add_train_flags(train)

    evaluate = commands.add_parser("eval", help="loss, perplexity and bits per byte of a run")
    evaluate.add_argument("run", help="run directory")
    evaluate.add_argument("--data", help="evaluate on all of this source instead of the run's "
                          "held-out split")
    _add_text_field(evaluate, None, "the run's")
    evaluate.add_argument("--max-tokens", type=POSITIVE_INT, help="evaluate at most this many "
                          "tokens")
    evaluate.add_argument("--batch-size", type=POSITIVE_INT, default=8)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--retro-db", metavar="DB", help="a RETRO run's database: evaluate "
                          "with retrieval and without, and bits per byte filtered by overlap; "
                          "with --tasks, score the tasks retrieving from it")
    evaluate.add_argument("--k", type=POSITIVE_INT, help="with --retro-db: neighbours per chunk "
                          "(default the model's; up to the 4 stored, any with --tasks)")
    evaluate.add_argument("--baseline", metavar="DENSE_RUN", help="with --retro-db: a run "
                          "without retrieval (same tokenizer) evaluated on the same chunks")
    evaluate.add_argument("--plot", metavar="PATH", help="with --retro-db: the PNG of bits per "
                          "byte against the overlap alpha; default RUN/filtered_bpb.png")
    evaluate.add_argument("--tasks", help="instead: lm-evaluation-harness tasks, comma-"
                          "separated (stdlib_docstrings is local; hellaswag, arc_easy ... need "
                          "the network once); needs the eval extra (docs/evaluation.md)")
    evaluate.add_argument("--num-fewshot", type=COUNT, help="with --tasks: examples in each "
                          "prompt; default each task's")
    evaluate.add_argument("--limit", type=POSITIVE, help="with --tasks: at most this many "
                          "documents per task (below 1: that fraction of them)")
    evaluate.add_argument("--include-path", action="append", default=[], metavar="DIR",
                          help="with --tasks: a directory of harness task YAML files to search "
                          "too (repeatable)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object (with "
                          "--tasks, the harness's results object)")

    generate = commands.add_parser("generate", help="continue a prompt with a trained model")
    generate.add_argument("run", help="run directory")
    generate.add_argument("--prompt", default="", help="text to continue")
    generate.add_argument("--max-new-tokens", type=POSITIVE_INT, default=200)
    generate.add_argument("--temperature", type=NON_NEGATIVE, default=0.8, help="0 = greedy")
    generate.add_argument("--top-k", type=POSITIVE_INT, default=None)
    generate.add_argument("--top-p", type=FRACTION, default=None)
    generate.add_argument("--seed", type=COUNT, default=0)
    generate.add_argument("--num-samples", type=POSITIVE_INT, default=1,
                          help="continuations of the prompt, generated together as one batch")
    generate.add_argument("--device", default="auto")
    generate.add_argument("--compile", action="store_true", help="torch.compile the one-token "
                          "decode step: a compilation first, then faster tokens")
    generate.add_argument("--retro-db", metavar="DB", help="a RETRO run retrieves from this "
                          "chunk database at each chunk boundary while it samples")
    generate.add_argument("--k", type=POSITIVE_INT, default=None, help="neighbours per chunk "
                          "with --retro-db; default the run's model.retro.neighbours")
    generate.add_argument("--show-sources", action="store_true", help="with --retro-db, print "
                          "after the text where each chunk's neighbours came from")

    presets = commands.add_parser("presets", help="the papers' models with parameter counts")
    presets.add_argument("--seq-len", type=POSITIVE_INT, default=None,
                         help="sequence length for FLOPs per token; default each model's context")
    presets.add_argument("--recipes", action="store_true",
                         help="the papers' training recipes instead of the models")
    presets.add_argument("--json", action="store_true", help="print one JSON object")

    data = commands.add_parser("data", help="data preparation")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    prepare = data_commands.add_parser("prepare", help="tokenize a source into cached shards")
    _add_data_flags(prepare)
    prepare.add_argument("--out", help="prepared directory; default in $BURROW_CACHE")
    prepare.add_argument("--json", action="store_true", help="print one JSON object")

    tokenizer = commands.add_parser("tokenizer", help="tokenizer tools")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True,
                                                  parser_class=Parser)
    tokenizer_train = tokenizer_commands.add_parser("train", help="train a sentencepiece "
                                                    "tokenizer on a source's training split")
    _add_data_flags(tokenizer_train)
    tokenizer_train.add_argument("--out", required=True, help="directory for tokenizer.model")

    export_hf = commands.add_parser("export-hf", help="write a run's latest checkpoint as a "
                                    "Hugging Face Llama directory")
    export_hf.add_argument("run", help="run directory")
    export_hf.add_argument("out", help="new directory for config.json, model.safetensors and "
                           "the tokenizer")

    import_hf = commands.add_parser("import-hf", help="make a run directory from a local "
                                    "Hugging Face Llama directory")
    import_hf.add_argument("dir", help="directory with config.json, safetensors weights and a "
                           "sentencepiece tokenizer.model")
    import_hf.add_argument("out", help="new run directory")
    _add_distill_command(commands)
    _add_scaling_commands(commands)
    add_plan_parallel_command(commands)
    add_ff_command(commands)
    retro_commands = _add_retro_commands(commands)
    adatape_commands = add_adatape_command(commands)
    # named in "required" errors
    for verbs in (commands, data_commands, tokenizer_commands, retro_commands,
                  adatape_commands):
        verbs.metavar = "{" + ",".join(verbs.choices) + "}"
    return parser


def _add_distill_command(commands: argparse._SubParsersAction) -> None:
    distill = commands.add_parser("distill", help="train a dense student on a (sparse) "
                                  "teacher's probabilities and data (Switch Transformer §4)")
    distill.add_argument("--teacher", help="run directory of the teacher")
    distill.add_argument("--student", help="dense preset of the student; it takes the "
                         "teacher's vocabulary and context")
    distill.add_argument("--out", required=True, help="run directory of the student")
    distill.add_argument("--baseline", help="a dense run of the student's shape trained as long "
                         "without a teacher: report the share of the teacher's gain kept")
    distill.add_argument("--label-weight", type=NON_NEGATIVE, help="weight of the cross-entropy "
                         "against the data's tokens (Switch Table 6: 0.75)")
    distill.add_argument("--teacher-weight", type=NON_NEGATIVE, help="weight of the "
                         "cross-entropy against the teacher's probabilities (Switch Table 6: "
                         "0.25)")
    distill.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                         help="override any config field, e.g. --set model.d_ff=512")
    distill.add_argument("--resume", action="store_true",
                         help="continue the distillation in --out from its latest checkpoint")
    distill.add_argument("--json", action="store_true", help="print the report as one JSON "
                         "object")
    _add_train_flags(distill)


def _add_retro_commands(commands: argparse._SubParsersAction) -> argparse._SubParsersAction:
    retro = commands.add_parser("retro", help="RETRO's chunk database: build, query")
    retro_commands = retro.add_subparsers(dest="retro_command", required=True,
                                          parser_class=Parser)
    build = retro_commands.add_parser("build", help="embed a source's 64-token chunks with a "
                                      "frozen encoder into a database with a faiss index; "
                                      "rerun to continue an interrupted build")
    build.add_argument("--data", required=True, help="stdlib, a file, a directory, a .jsonl "
                       "file or a prepared directory")
    _add_text_field(build)
    build.add_argument("--tokenizer", required=True, help="a tokenizer.model file, or a run or "
                       "prepared directory holding one")
    build.add_argument("--out", required=True, help="database directory")
    build.add_argument("--max-chunks", type=POSITIVE_INT, default=None,
                       help="keep only the first N chunks, in document order")
    build.add_argument("--index", default="auto", choices=("auto", "flat", "ivfpq", "opq"),
                       help="auto: exact Flat up to 200,000 chunks, IVF-PQ beyond; opq: IVF-PQ "
                       "after an OPQ rotation; default auto")
    build.add_argument("--batch-size", type=POSITIVE_INT, default=256,
                       help="chunks embedded between two progress records; default 256")

    query = retro_commands.add_parser("query", help="the nearest chunks of a database to a text, "
                                      "with their squared L2 distances")
    query.add_argument("database", help="database directory")
    query.add_argument("--text", required=True, help="text to look up")
    query.add_argument("--k", type=POSITIVE_INT, default=4, help="neighbours; default 4")
    query.add_argument("--nprobe", type=POSITIVE_INT, default=None,
                       help="IVF cells searched (IVF-PQ only); default the database's")
    query.add_argument("--json", action="store_true", help="print one JSON object")
    return retro_commands


def _add_scaling_commands(commands: argparse._SubParsersAction) -> None:
    plan = commands.add_parser("plan", help="Chinchilla: model size, tokens, loss, architecture "
                               "and time for a compute budget")
    budget = plan.add_argument_group("budget (one of)")
    budget.add_argument("--flops", type=POSITIVE, help="training FLOPs C = 6ND, e.g. 5.76e23")
    budget.add_argument("--gpu-hours", type=POSITIVE, help="device-hours on --device at --mfu")
    budget.add_argument("--preset", help="a preset trained on --tokens: how far from optimal")
    budget.add_argument("--tokens", type=POSITIVE, help="tokens the --preset is trained on")
    plan.add_argument("--law", default="chinchilla", help="a built-in law (chinchilla = "
                      "approach 3, chinchilla-1, chinchilla-2, epoch, kaplan) or a law.json "
                      "written by `burrow fit`; default chinchilla")
    plan.add_argument("--device", help="accelerator for the time estimate: h100, a100, "
                      "tpu v4, ... (see burrow.train.hardware.PEAK_FLOPS)")
    plan.add_argument("--mfu", type=FRACTION, default=0.4, help="model FLOPs utilization assumed "
                      "(PaLM: 0.462); with --cluster only the first round's guess; default 0.4")
    plan.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "tf32", "fp32"))
    plan.add_argument("--num-devices", type=POSITIVE_INT, help="devices training together, for "
                      "the wall clock; default 1")
    plan.add_argument("--cluster", metavar="COUNTxGPU", help="plan the model's parallelism on "
                      "these GPUs (64xh100; h100, h200, a100, a100-40gb) and predict its wall "
                      "clock; replaces --device and --num-devices (docs/scaling.md)")
    plan.add_argument("--memory", help="with --cluster: memory per GPU the plan may use (80GB, "
                      "80GiB, 40e9); default the GPU's")
    plan.add_argument("--global-batch", type=POSITIVE_INT, metavar="TOKENS", help="with "
                      "--cluster: tokens per step, whole 2048-token sequences; default 2^21")
    plan.add_argument("--executable", action="store_true", help="with --cluster: only plans "
                      "burrow train --plan runs (always with --emit-config)")
    plan.add_argument("--arch", default="llama", choices=("llama", "chinchilla"),
                      help="architecture family of the suggested model; default llama")
    plan.add_argument("--vocab-size", type=POSITIVE_INT, default=32_000,
                      help="vocabulary of the suggested model (Chinchilla: 32,000)")
    plan.add_argument("--emit-config", metavar="PATH", help="write a run config (YAML) that "
                      "trains the suggested model on its tokens: burrow train --config PATH")
    plan.add_argument("--data", default="stdlib", help="data source written into --emit-config")
    _add_text_field(plan)
    plan.add_argument("--json", action="store_true", help="print one JSON object")

    sweep = commands.add_parser("sweep", help="train IsoFLOP families of models (Chinchilla "
                                "approach 2) and tabulate their losses")
    sweep.add_argument("--budgets", help="comma-separated FLOPs budgets C = 6ND; default "
                       "1e12,3e12,1e13")
    sweep.add_argument("--sizes", type=Number(int, low=3, why="an IsoFLOP parabola needs three "
                                              "points"), help="model sizes per budget; default 5")
    sweep.add_argument("--span", type=Number(float, low=1, low_open=True),
                       help="sizes run from N_opt/SPAN to N_opt*SPAN; default 3")
    sweep.add_argument("--horizons", help="approach 1's horizons (Chinchilla §3.1): a count K "
                       "trains each run also on K-1 shorter cosine cycles, token fractions "
                       "spaced from 1 to 1/16; or the fractions, e.g. 1,0.25,0.0625; default 1")
    sweep.add_argument("--law", default="chinchilla", help="law whose N_opt centres the sizes")
    sweep.add_argument("--arch", default="llama", choices=("llama", "chinchilla"))
    sweep.add_argument("--out", default="sweeps/s1", help="sweep directory; default sweeps/s1")
    sweep.add_argument("--seq-len", type=POSITIVE_INT, default=256)
    sweep.add_argument("--batch-tokens", type=POSITIVE_INT, default=1024,
                       help="tokens per step; default 1024 (4 sequences: more steps for tiny runs)")
    sweep.add_argument("--lr", type=POSITIVE, default=3e-3)
    sweep.add_argument("--eval-tokens", type=POSITIVE_INT, default=65536,
                       help="held-out tokens the final loss is measured on")
    sweep.add_argument("--seed", type=COUNT, default=0)
    sweep.add_argument("--device", default="auto")
    sweep.add_argument("--force", action="store_true",
                       help="replace a different sweep already in --out")
    sweep.add_argument("--dry-run", action="store_true",
                       help="print the runs and the time estimate, train nothing")
    sweep.add_argument("--json", action="store_true", help="progress to stderr; print one JSON "
                       "object (the results and the fit) on stdout")
    _add_data_flags(sweep, vocab_size=None, held_out=Number(float, low=0, high=1, low_open=True,
                                                             high_open=True))

    fit = commands.add_parser("fit", help="fit Chinchilla's three approaches to a sweep or a "
                              "table of runs (N, D or C, loss)")
    fit.add_argument("path", help="a sweep directory, or a CSV / JSON Lines file of runs")
    fit.add_argument("--columns", help="name the columns, e.g. N='Model Size',C='Training FLOP'"
                     ",loss=loss (default: found by name)")
    fit.add_argument("--drop-highest", type=COUNT, default=0, metavar="K",
                     help="leave out the K runs with the highest loss (Epoch AI: 5)")
    fit.add_argument("--bootstrap", type=COUNT, default=200,
                     help="resamples for approach 3's intervals; 0 = none; default 200")
    fit.add_argument("--seed", type=COUNT, default=0)
    fit.add_argument("--name", default="fitted", help="name of the fitted law in law.json")
    fit.add_argument("--smooth-steps", type=COUNT, default=10, metavar="STEPS",
                     help="Gaussian window over which approach 1 smooths a sweep's training "
                     "curves (Chinchilla App. D.1: 10); 0 = none")
    fit.add_argument("--out", help="directory for fit.json, law.json and the figures; default "
                     "the sweep directory itself, or fits/NAME for a table NAME.csv (never the "
                     "table's own folder)")
    fit.add_argument("--json", action="store_true", help="print one JSON object")


def _add_data_flags(parser: argparse.ArgumentParser, vocab_size: int | None = 4096,
                    held_out: Number = HELD_OUT) -> None:
    parser.add_argument("--data", default="stdlib", help="stdlib, a file, a directory or .jsonl")
    default = vocab_size or "512: at 4096 a tiny model is mostly its embedding"
    parser.add_argument("--vocab-size", type=POSITIVE_INT, default=vocab_size,
                        help=f"default {default}")
    parser.add_argument("--val-fraction", type=held_out, default=0.02,
                        help="share of the documents held out; default 0.02")
    _add_text_field(parser)
    parser.add_argument("--tokenizer-type", default="bpe", choices=("bpe", "unigram"))


@functools.cache
def _parser() -> argparse.ArgumentParser:
    """The parser main() reads with, built once per process (parsing leaves it unchanged)."""
    return build_parser()


def main(argv: list[str] | None = None) -> int:
    """Run one verb; its result goes to stdout, a mistake to stderr as one line (status 2)."""
    try:
        try:
            args = _parser().parse_args(argv)
        except SystemExit as stop:  # --help, or a usage mistake argparse has already reported
            return int(stop.code or 0)
        return _dispatch(args)
    except UserError as error:
        return _fail(str(error))
    except KeyboardInterrupt:
        print("burrow: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`burrow presets | head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as error:  # a file-system problem no check foresaw
        from burrow.paths import os_error_message

        return _fail(os_error_message(error))


def _fail(message: str) -> int:
    one_line = " ".join(part.strip() for part in message.splitlines())
    print(f"burrow: error: {one_line}", file=sys.stderr)
    return 2


def _retro(args: argparse.Namespace) -> int:
    from burrow.retrieval import commands as verbs

    if args.retro_command == "build":
        print(verbs.build_command(args))
    else:
        result = verbs.query_command(args)
        print(json.dumps(result) if args.json else verbs.format_query(result))
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in ("plan", "sweep", "fit"):
        from burrow.scaling import commands as verbs
    elif args.command == "retro":
        return _retro(args)
    elif args.command in ("eval", "generate"):
        from burrow import run_commands as verbs
    elif args.command == "plan-parallel":
        from burrow.parallel.planner import commands as verbs
    elif args.command == "ff":
        from burrow.ff import commands as verbs
    elif args.command == "adatape":
        from burrow.adatape import commands as verbs
    else:
        from burrow import commands as verbs

    if args.command in ("train", "distill", "sweep"):
        return getattr(verbs, f"{args.command}_command")(args)
    reports = {  # verbs that print a result, as text or (--json) one JSON object
        "eval": ("eval_command", "format_eval"),
        "presets": ("presets_command", "format_presets"),
        "data": ("prepare_command", "format_prepare"),
        "plan": ("plan_command", "format_plan"),
        "fit": ("fit_command", "format_fit"),
        "plan-parallel": ("plan_parallel_command", "format_plan_parallel"),
        "ff": ("ff_command", "format_ff"),
        "adatape": ("parity_command", "format_parity"),
    }
    if args.command in reports:
        run, formatter = (getattr(verbs, name) for name in reports[args.command])
        result = run(args)
        print(json.dumps(result) if args.json else formatter(result))
        return 0
    messages = {  # verbs that print one text
        "generate": "generate_command",
        "tokenizer": "tokenizer_command",
        "export-hf": "export_hf_command",
        "import-hf": "import_hf_command",
    }
    print(getattr(verbs, messages[args.command])(args))
    return 0
