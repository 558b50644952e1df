"""Task suites through EleutherAI's lm-evaluation-harness: which tasks, where they are, and
their scores for a burrow model (eval/harness.py is the model's side).

The harness is an optional extra (`pip install 'burrow-lm[eval]'`); every function here says
in one line how to install it when it is missing. burrow's local task (stdlib_docstrings,
eval/docstring_task.py) and the directories of --include-path are always searched; the
harness's own ~15,000 task definitions only when a name is not among them, as indexing them
takes seconds. Tasks whose data lives on the Hugging Face Hub need the network once (the
`datasets` cache keeps them); where the Hub cannot be reached, such a task fails at once in one
line instead of retrying.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from burrow.errors import UserError

INSTALL = "pip install 'burrow-lm[eval]'"
HUB = ("huggingface.co", 443)


def require_harness() -> None:
    """UserError, saying how to install it, where lm-evaluation-harness is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("task evaluation needs EleutherAI's lm-evaluation-harness, which is "
                        f"not installed: {INSTALL}") from None


def parse_tasks(text: str) -> list[str]:
    """"hellaswag, arc_easy" -> ["hellaswag", "arc_easy"]; UserError for no name at all."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UserError(f"no task named in {text!r}; give task names separated by commas, "
                        "e.g. stdlib_docstrings,arc_easy")
    return names


def task_manager(tasks: Sequence[str], include_paths: Sequence[str | Path] = ()) -> Any:
    """The harness's TaskManager that knows every task named, local ones first; UserError for
    a name it does not know, with the nearest names it does."""
    from lm_eval.tasks import TaskManager

    from burrow.eval.docstring_task import write_task

    paths = [str(write_task())]
    for path in include_paths:
        if not Path(path).expanduser().is_dir():
            raise UserError(f"--include-path {path} is not a directory; give the directory "
                            "holding the task YAML files")
        paths.append(str(Path(path).expanduser().resolve()))
    manager = TaskManager(include_path=paths, include_defaults=False)
    if all(manager.match_tasks([name]) for name in tasks):
        return manager
    manager = _with_harness_tasks(tuple(paths))
    unknown = [name for name in tasks if not manager.match_tasks([name])]
    if unknown:
        near = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f"did you mean {', '.join(near)}?" if near else "see `lm-eval ls tasks`"
        raise UserError(f"unknown task {unknown[0]!r} (tasks not found: {', '.join(unknown)}); "
                        f"{hint}")
    if not hub_reachable():
        go_offline()
    return manager


@functools.cache
def _with_harness_tasks(paths: tuple[str, ...]) -> Any:
    """A TaskManager of the harness's own tasks and those under `paths`, indexed once per
    process (seconds: ~15,000 YAML files)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a connection within `timeout` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.create_connection(HUB, timeout=timeout).close()
    except OSError:
        return False
    return True


def go_offline() -> None:
    """Read the Hub's datasets from the local cache only, so that a task whose data is not
    there fails at once instead of after minutes of retries. The libraries read the setting
    when imported, so one already imported is told directly."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True


def evaluate_tasks(lm: Any, tasks: Sequence[str], *, num_fewshot: int | None = None,
                   limit: int | float | None = None, include_paths: Sequence[str | Path] = (),
                   log_samples: bool = False, manager: Any = None) -> dict[str, Any]:
    """The harness's results object (JSON-ready) of `lm` (a BurrowLM, or any harness model) on
    `tasks`, found by `manager` (default: task_manager(tasks, include_paths)). The harness
    seeds Python's, numpy's and torch's generators as it starts; callers that need theirs
    (the trainer) save and restore them."""
    require_harness()
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    manager = manager or task_manager(tasks, include_paths)
    try:
        results = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot,
                                  limit=limit, task_manager=manager, log_samples=log_samples)
    except ConnectionError as error:  # datasets' "Couldn't reach 'X' on the Hub"
        raise UserError(f"{error}: the task's data comes from the Hugging Face Hub, which "
                        "cannot be reached from here; run it where the network is (its data "
                        "is cached after), or use a local task (--include-path DIR)") from None
    return json.loads(json.dumps(results, default=handle_non_serializable))


def task_scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of a results object: the numbers, without their standard errors
    and filter suffixes ("acc,none" -> "acc")."""
    scores = {}
    for task, metrics in results.get("results", {}).items():
        numbers = {key.split(",")[0]: float(value) for key, value in metrics.items()
                   if isinstance(value, int | float) and not isinstance(value, bool)
                   and "_stderr" not in key and key != "sample_len" and "," in key}
        if numbers:
            scores[task] = numbers
    return scores


def format_results(results: dict[str, Any]) -> str:
    """The harness's own tables: tasks, then groups when there are any."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text.rstrip("\n")
