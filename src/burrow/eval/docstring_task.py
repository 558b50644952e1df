"""stdlib_docstrings: a multiple-choice task made from the standard library's own docstrings.

No task data can be downloaded everywhere burrow runs, but every machine has the running
Python's standard library, whose docstrings are real text nobody here wrote. Each question shows
a function's signature and the opening of its docstring; the four choices are docstring first
lines, one of them the function's own and three drawn from other functions:

    def message_from_string(s, *args, **kws):
        \"\"\"                                   <- the context
    Parse a string into a Message object model.   <- the right choice (three others are wrong)

The functions come from the files the default held-out split keeps out of training (2% of the
stdlib's files, chosen by a hash of the path: data/sources.py), so a model trained on `--data
stdlib` has not read the answers. The task is an lm-evaluation-harness YAML with local files,
written to $BURROW_CACHE/tasks/ and found by `burrow eval --tasks stdlib_docstrings`.
"""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path
from typing import Any

from burrow.data.cache import cache_dir
from burrow.data.sources import STDLIB, source_files, split_of
from burrow.files import write_text

TASK_NAME = "stdlib_docstrings"
HELD_OUT = 0.02  # DataConfig.val_fraction's default: the files `--data stdlib` holds out
CHOICES = 4  # like ARC and HellaSwag: chance is 25%
SEED = 0  # the distractors and the right answer's place
MIN_CHARS, MAX_CHARS = 12, 120  # a first line that says something, and fits a line

# The harness's YAML (docs/evaluation.md): loglikelihood of each choice after the context.
# acc_norm divides by the choice's length in bytes, so long docstrings are not penalised.
TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def docstring_functions(val_fraction: float = HELD_OUT) -> list[dict[str, str]]:
    """Functions and methods with a public name and a docstring whose first line is between
    MIN_CHARS and MAX_CHARS characters, from the stdlib's held-out files, in file order:
    {"source", "signature", "docstring"} each, one per distinct first line."""
    found, seen = [], set()
    for name, path in source_files(STDLIB):
        if split_of(name, val_fraction) != "val":
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):  # test data that is not Python on purpose
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or (
                    node.name.startswith("_")):
                continue
            docstring = ast.get_docstring(node, clean=True)
            first = docstring.strip().splitlines()[0].strip() if docstring else ""
            if not MIN_CHARS <= len(first) <= MAX_CHARS or first in seen:
                continue
            seen.add(first)
            found.append({"source": f"{name}:{node.lineno}",
                          "signature": f"def {node.name}({ast.unparse(node.args)}):",
                          "docstring": first})
    return found


def make_documents(functions: list[dict[str, str]], seed: int = SEED) -> list[dict[str, Any]]:
    """One question per function: its signature and an open docstring as context, and four
    first lines, its own at a random place among three others'."""
    rng = random.Random(seed)
    lines = [function["docstring"] for function in functions]
    documents = []
    for index, function in enumerate(functions):
        others = rng.sample([i for i in range(len(lines)) if i != index], CHOICES - 1)
        label = rng.randrange(CHOICES)
        choices = [lines[i] for i in others]
        choices.insert(label, function["docstring"])
        documents.append({"context": f'{function["signature"]}\n    """', "choices": choices,
                          "label": label, "source": function["source"]})
    return documents


def write_task(directory: Path | None = None) -> Path:
    """Write (or leave, if unchanged) the task's YAML and data into directory (default
    $BURROW_CACHE/tasks): the directory to give the harness as an include path."""
    directory = Path(directory) if directory is not None else cache_dir() / "tasks"
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{TASK_NAME}.jsonl"
    text = "".join(json.dumps(document) + "\n"
                   for document in make_documents(docstring_functions()))
    for path, content in ((data, text),
                          (directory / f"{TASK_NAME}.yaml",
                           TASK_YAML.format(name=TASK_NAME, data=json.dumps(str(data))))):
        if not path.is_file() or path.read_text() != content:
            write_text(path, content)
    return directory
