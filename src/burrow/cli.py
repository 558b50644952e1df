"""The `burrow` command: parse arguments, call one function, print. No logic lives here."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from burrow.config import TrainConfig, field_docs
from burrow.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"burrow: error: {message} (see `{self.prog} --help`)\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    """Every TrainConfig field becomes a flag of the same name (--max-steps, --lr, ...)."""
    group = parser.add_argument_group("training (TrainConfig fields; any field of any section "
                                      "also with --set)")
    docs = field_docs(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        kind = {"int": int, "float": float, "bool": str}.get(str(field.type), str)
        help_text = f"{docs.get(field.name, '')} (default {field.default})".replace("%", "%%")
        metavar = "BOOL" if field.type == "bool" else field.name.upper()
        group.add_argument(_flag(field.name), dest=f"train_{field.name}", type=kind,
                           nargs="?" if field.type == "bool" else None,
                           const="true" if field.type == "bool" else None,
                           default=None, metavar=metavar, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="burrow", description="Plan, train, scale and evaluate transformer "
                    "language models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train = commands.add_parser("train", help="train a model into a run directory")
    train.add_argument("--preset", help="model preset (see `burrow presets`); default nano")
    train.add_argument("--config", help="YAML run config (sections model, train, data)")
    train.add_argument("--data", help="stdlib, a text file, a directory, a .jsonl file, or a "
                       "prepared directory; default stdlib")
    train.add_argument("--out", help="run directory; default runs/PRESET")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                       help="override any config field, e.g. --set model.d_model=384")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its latest checkpoint")
    train.add_argument("--allow-data-change", action="store_true",
                       help="with --resume, accept data other than the run was trained on")
    _add_train_flags(train)

    evaluate = commands.add_parser("eval", help="loss, perplexity and bits per byte of a run")
    evaluate.add_argument("run", help="run directory")
    evaluate.add_argument("--data", help="evaluate on all of this source instead of the run's "
                          "held-out split")
    evaluate.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")

    generate = commands.add_parser("generate", help="continue a prompt with a trained model")
    generate.add_argument("run", help="run directory")
    generate.add_argument("--prompt", default="", help="text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=200)
    generate.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--device", default="auto")

    presets = commands.add_parser("presets", help="the papers' models with parameter counts")
    presets.add_argument("--seq-len", type=int, default=None,
                         help="sequence length for FLOPs per token; default each model's context")
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
    return parser


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="stdlib", help="stdlib, a file, a directory or .jsonl")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--val-fraction", type=float, default=0.02)
    parser.add_argument("--text-field", default="text", help="field of .jsonl records")
    parser.add_argument("--tokenizer-type", default="bpe", choices=("bpe", "unigram"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except UserError as error:
        print(f"burrow: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("burrow: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from burrow import commands

    if args.command == "train":
        return commands.train_command(args)
    reports = {  # verbs that print a result, as text or (--json) one JSON object
        "eval": (commands.eval_command, commands.format_eval),
        "presets": (commands.presets_command, commands.format_presets),
        "data": (commands.prepare_command, commands.format_prepare),
    }
    if args.command in reports:
        run, formatter = reports[args.command]
        result = run(args)
        print(json.dumps(result) if args.json else formatter(result))
        return 0
    messages = {  # verbs that print one text
        "generate": commands.generate_command,
        "tokenizer": commands.tokenizer_command,
        "export-hf": commands.export_hf_command,
        "import-hf": commands.import_hf_command,
    }
    print(messages[args.command](args))
    return 0
