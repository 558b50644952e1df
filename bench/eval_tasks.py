"""Task accuracy of trained runs through burrow's harness backend, and its speed against the
harness's HF backend on the same model.

    .venv/bin/python bench/eval_tasks.py runs/nano runs/small runs/switch-micro \
        --speed runs/small > bench/results/eval_tasks.json

For each RUN: its accuracy on a task of lm-evaluation-harness (default the local
`stdlib_docstrings`: four choices, chance 25%) with the harness's standard errors, as
`burrow eval RUN --tasks TASK` prints it. With `--speed RUN`: that run exported to Hugging Face
(`burrow.eval.harness.hf_backend`) and the same task timed through both backends in alternating
rounds (bench/harness.py): first the backends alone (`loglikelihood` on the task's requests,
built once by the harness), then the whole task through `simple_evaluate` as a user runs it.
The rate is loglikelihood requests per second, and the two backends' scores are compared
request by request (they must agree to float tolerance: the export and the backend check each
other).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from harness import (
    common_parser,
    emit,
    log,
    machine,
    paired_rounds,
    require_transformers,
    run_main,
    set_threads,
    summary,
    warn_if_busy,
)

from burrow.eval.harness import BurrowLM, hf_backend
from burrow.eval.tasks import evaluate_tasks, require_harness, task_manager
from burrow.run import load_run


def accuracy(run: Path, task: str, batch_size: int, device: str, limit: int | None,
             manager: Any) -> dict[str, Any]:
    """The run's scores on `task`, with what the run is (size, tokens trained)."""
    _, _, cfg = load_run(run, device="cpu")
    rows = (run / "metrics.jsonl").read_text().splitlines()
    train = [row for row in map(json.loads, rows) if row.get("split") == "train"]
    lm = BurrowLM(run, device=device, batch_size=batch_size)
    results = evaluate_tasks(lm, [task], limit=limit, manager=manager)
    metrics = results["results"][task]
    result = {"run": str(run), "preset": cfg.preset, "params": cfg.model.num_params(),
              "experts": cfg.model.moe.num_experts if cfg.model.moe.enabled else 0,
              "steps": train[-1]["step"] if train else 0,
              "tokens": train[-1].get("tokens") if train else 0,
              "questions": results["n-samples"][task]["effective"],
              "acc": metrics["acc,none"], "acc_stderr": metrics["acc_stderr,none"],
              "acc_norm": metrics["acc_norm,none"],
              "acc_norm_stderr": metrics["acc_norm_stderr,none"]}
    log(f"{run}: acc {result['acc']:.3f} ± {result['acc_stderr']:.3f}, acc_norm "
        f"{result['acc_norm']:.3f} ± {result['acc_norm_stderr']:.3f} "
        f"({result['questions']} questions)")
    return result


def speed(run: Path, task: str, batch_size: int, device: str, limit: int | None,
          rounds: int, manager: Any) -> dict[str, Any]:
    """Requests per second through burrow's backend and the HF backend, alternating."""
    require_transformers()
    ours = BurrowLM(run, device=device, batch_size=batch_size)
    with tempfile.TemporaryDirectory() as directory:
        theirs = hf_backend(run, Path(directory) / "hf", device=device, batch_size=batch_size)
        first = evaluate_tasks(ours, [task], limit=limit, manager=manager, log_samples=True)
        other = evaluate_tasks(theirs, [task], limit=limit, manager=manager, log_samples=True)
        scores = [[float(r[0][0]) for r in sample["resps"]] for sample in first["samples"][task]]
        rival = [[float(r[0][0]) for r in sample["resps"]] for sample in other["samples"][task]]
        requests = sum(map(len, scores))
        difference = max(abs(a - b) for mine, them in zip(scores, rival)
                         for a, b in zip(mine, them))
        log(f"{requests} requests a round; largest difference between the backends' "
            f"log-likelihoods {difference:.2e}")

        task_object = manager.load([task])["tasks"][task]
        task_object.build_all_requests(limit=limit, rank=0, world_size=1)
        instances = task_object.instances

        def backend_rate(lm: Any) -> float:
            start = time.perf_counter()
            lm.loglikelihood(instances, disable_tqdm=True)
            if torch.cuda.is_available() and device.startswith("cuda"):
                torch.cuda.synchronize()
            return len(instances) / (time.perf_counter() - start)

        log("the backends alone: loglikelihood on the task's requests")
        backends = paired_rounds(lambda: backend_rate(ours), lambda: backend_rate(theirs),
                                 rounds, warmup=1)

        def rate(lm: Any) -> float:
            start = time.perf_counter()
            evaluate_tasks(lm, [task], limit=limit, manager=manager)
            if torch.cuda.is_available() and device.startswith("cuda"):
                torch.cuda.synchronize()
            return requests / (time.perf_counter() - start)

        log("the whole task through the harness (requests built, run, scored)")
        paired = paired_rounds(lambda: rate(ours), lambda: rate(theirs), rounds, warmup=0)
    return {"run": str(run), "requests_per_round": requests, "batch_size": batch_size,
            "largest_loglikelihood_difference": difference,
            "same_accuracy": (first["results"][task]["acc,none"]
                              == other["results"][task]["acc,none"]),
            "backend_burrow_requests_per_s": summary(backends.ours),
            "backend_hf_requests_per_s": summary(backends.theirs),
            "backend_ratio_burrow_over_hf": summary(backends.ratios()),
            "burrow_requests_per_s": summary(paired.ours),
            "hf_requests_per_s": summary(paired.theirs),
            "ratio_burrow_over_hf": summary(paired.ratios())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     parents=[common_parser("rounds", "threads", "device")])
    parser.add_argument("runs", type=Path, nargs="*", help="run directories to score")
    parser.add_argument("--task", default="stdlib_docstrings")
    parser.add_argument("--limit", type=int, default=None, help="questions (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--speed", type=Path, default=None,
                        help="a run to time against the HF backend on its export")
    parser.set_defaults(rounds=3)
    args = parser.parse_args()
    require_harness()
    set_threads(args.threads)
    manager = task_manager([args.task])
    result: dict[str, Any] = {"machine": machine(torch.device(args.device)), "task": args.task,
                              "runs": [accuracy(run, args.task, args.batch_size, args.device,
                                                args.limit, manager) for run in args.runs]}
    if args.speed is not None:
        warn_if_busy()
        result["speed"] = speed(args.speed, args.task, args.batch_size, args.device, args.limit,
                                args.rounds, manager)
        for prefix, what in (("backend_", "the backends alone"), ("", "the whole task")):
            ratio = result["speed"][f"{prefix}ratio_burrow_over_hf"]
            ours = result["speed"][f"{prefix}burrow_requests_per_s"]["median"]
            theirs = result["speed"][f"{prefix}hf_requests_per_s"]["median"]
            log(f"{what}: burrow / hf requests per second {ratio['median']:.2f}x "
                f"(min {ratio['min']:.2f}, max {ratio['max']:.2f}; {ours:,.1f} vs {theirs:,.1f})")
    emit(result)


if __name__ == "__main__":
    run_main(main)
