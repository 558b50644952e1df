"""The lm-evaluation-harness backend: its scores against the model's own logits, burrow eval and
burrow generate, the local task through the harness, the harness's HF backend on the exported
model, and task evaluation during training."""

import json
import os
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

from burrow.cli import main
from burrow.data import tokenize_source
from burrow.eval import token_nats
from burrow.run import load_run
from conftest import CORPUS

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local files


@pytest.fixture(scope="module")
def harness():
    return pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def lm(harness, single_run):
    from burrow.eval.harness import BurrowLM

    return BurrowLM(single_run, device="cpu", batch_size=3)


def requests(kind, *args_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i)
            for i, args in enumerate(args_list)]


def straddling_pair(tokenizer, text):
    """(context, continuation) of text cut inside a token of two or more characters."""
    ids, offset = tokenizer.encode(text), 0
    for token in ids:
        piece = tokenizer.decode([token])
        if len(piece) >= 2 and piece.isalpha():
            cut = offset + len(piece) // 2
            return text[:cut], text[cut:]
        offset += len(piece)
    raise AssertionError("no piece of two letters")


def reference_loglikelihood(model, tokenizer, context, continuation, context_len):
    """log p(continuation | </s> context) from the logits: the pair tokenised as one text, the
    continuation being the tokens from the one that holds its first character (found by
    decoding prefixes), the inputs the last context_len tokens."""
    ids = tokenizer.encode(context + continuation)
    split = next((i for i in range(len(ids) + 1)
                  if len(tokenizer.decode(ids[:i + 1])) > len(context)), len(ids))
    ids = [tokenizer.eos_id, *ids]
    count = len(ids) - 1 - split
    window = ids[-(context_len + 1):]
    with torch.no_grad():
        log_probs = F.log_softmax(model(torch.tensor([window[:-1]])).logits[0].float(), -1)
    rows = range(len(window) - 1 - count, len(window) - 1)
    total = sum(float(log_probs[t, window[t + 1]]) for t in rows)
    greedy = all(int(log_probs[t].argmax()) == window[t + 1] for t in rows)
    return total, greedy


def test_loglikelihood_is_the_sum_of_the_continuations_log_probabilities(lm, single_run):
    model, tokenizer, cfg = load_run(single_run)
    text = (CORPUS / "bisect.py").read_text()
    straddle = straddling_pair(tokenizer, "def insort_right(a, x, lo=0, hi=None):")
    context_ids, _ = tokenizer.encode(straddle[0]), None
    assert tokenizer.encode(straddle[0] + straddle[1])[:len(context_ids)] != context_ids
    pairs = [straddle, ("x = 1", "2345"), ("", "import os"), ("def f(x):\n", "    return x"),
             (text[:400], text[400:430])]  # a context longer than the model's: cut on the left
    results = lm.loglikelihood(requests("loglikelihood", *pairs))
    for (context, continuation), (score, greedy) in zip(pairs, results):
        expected, expected_greedy = reference_loglikelihood(model, tokenizer, context,
                                                            continuation, cfg.model.max_seq_len)
        assert score == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy
    # the split itself: the pair's own tokens, cut before the piece holding the boundary
    from burrow.eval.harness import split_pair

    context_ids, continuation_ids = split_pair(tokenizer, *straddle)
    assert context_ids + continuation_ids == tokenizer.encode("".join(straddle))
    assert straddle[0].startswith(tokenizer.decode(context_ids))
    assert len(tokenizer.decode(context_ids + continuation_ids[:1])) > len(straddle[0])


def test_loglikelihood_refuses_a_continuation_longer_than_the_context(lm):
    from burrow.errors import UserError

    with pytest.raises(UserError, match="cannot be scored"):
        lm.loglikelihood(requests("loglikelihood", ("a", "1" * 80)))


def test_rolling_loglikelihood_is_burrow_evals_on_the_same_windows(lm, single_run, tmp_path):
    """burrow eval's windows start every seq_len tokens of the stream; a first document of
    exactly seq_len tokens puts the </s> before the second at a window's start, which is the
    harness's first window (</s>, then the text)."""
    model, tokenizer, cfg = load_run(single_run)
    length = cfg.model.max_seq_len
    assert cfg.train.seq_len == length
    filler = "7" * length  # digits are split: one token each
    assert len(tokenizer.encode(filler)) == length
    text = (CORPUS / "colorsys.py").read_text()[:900]
    tokens = len(tokenizer.encode(text))
    assert tokens > 2 * length  # three windows or more
    source = tmp_path / "two.jsonl"
    source.write_text(json.dumps({"text": filler}) + "\n" + json.dumps({"text": text}) + "\n")
    nats = token_nats(model, tokenize_source(str(source), tokenizer, progress=False),
                      seq_len=length)
    expected = -nats[length + 1:length + 1 + tokens].sum()
    (score,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (text,)))
    assert score == pytest.approx(expected, rel=1e-5)


@pytest.fixture(scope="module")
def random_run(single_run, tmp_path_factory):
    """single_run's config and tokenizer with random weights: its greedy text varies, where
    eight steps of training give mostly spaces."""
    from burrow import Transformer
    from burrow.train.checkpoint import save_checkpoint

    _, _, cfg = load_run(single_run)
    run = tmp_path_factory.mktemp("random") / "run"
    run.mkdir()
    for name in ("config.yaml", "tokenizer.model"):
        shutil.copyfile(single_run / name, run / name)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    save_checkpoint(run, 0, model, None, {"step": 0})
    return run


def test_greedy_generate_until_is_burrow_generate_and_stops_at_stop_strings(harness, random_run,
                                                                             capsys):
    from burrow.eval.harness import BurrowLM

    lm = BurrowLM(random_run, device="cpu", batch_size=3)
    prompt = "def "
    assert main(["generate", str(random_run), "--prompt", prompt, "--temperature", "0",
                 "--max-new-tokens", "30"]) == 0
    generated = capsys.readouterr().out.rstrip("\n")[len(prompt):]
    # a stop string whose first occurrence is well inside the text
    stop = next(generated[i:i + 2] for i in range(4, len(generated) - 2)
                if generated.find(generated[i:i + 2]) == i)
    settings = {"until": [], "max_gen_toks": 30}
    same_length = "12"  # one batch with the first: prompts of equal length (digits split)
    assert len(lm.tok_encode(same_length)) == len(lm.tok_encode(prompt))
    plain, cut, other = lm.generate_until(requests(
        "generate_until", (prompt, settings), (prompt, {**settings, "until": [stop, "\x00"]}),
        (same_length, settings)))
    assert plain == generated
    assert cut == generated[:generated.find(stop)]
    assert other == lm.generate_until(requests("generate_until", (same_length, settings)))[0]


def test_generation_ends_once_every_row_has_met_a_stop_string(harness, random_run,
                                                              monkeypatch):
    """generate_until stops decoding when each row of a batch holds a stop string (or </s>),
    and returns what decoding to max_gen_toks and cutting returns."""
    import importlib

    from burrow.eval.harness import BurrowLM

    generation = importlib.import_module("burrow.infer.generate")  # the module, not the function

    lm = BurrowLM(random_run, device="cpu", batch_size=2)
    steps = []
    step_logits = generation._step_logits

    def counted(*args, **kwargs):
        steps.append(1)
        return step_logits(*args, **kwargs)

    monkeypatch.setattr(generation, "_step_logits", counted)
    settings = {"until": [], "max_gen_toks": 40}
    full = lm.generate_until(requests("generate_until", ("def ", settings)))[0]
    assert len(steps) == 39  # no stop strings: all 40 tokens (the first needs no step)
    stop = next(full[i:i + 2] for i in range(2, len(full) - 2) if full.find(full[i:i + 2]) == i)
    steps.clear()
    cut = lm.generate_until(requests("generate_until",
                                     ("def ", {**settings, "until": [stop]})))[0]
    assert cut == full[:full.find(stop)]
    assert len(steps) < 20  # ended soon after the stop string, not at 40 tokens
    # a row without a stop string keeps its batch going ("12": a prompt of the same length,
    # so the two run as one batch)
    steps.clear()
    lm.generate_until(requests("generate_until", ("def ", {**settings, "until": [stop]}),
                               ("12", settings)))
    assert len(steps) == 39


def test_local_task_scores_the_same_through_burrow_and_the_hf_backend(lm, single_run, tmp_path):
    """The export and the backend check each other: the harness's HF backend on the exported
    model, its tokenizer putting </s> before each text as burrow's backend does."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from burrow.eval.harness import hf_backend
    from burrow.eval.tasks import evaluate_tasks

    ours = evaluate_tasks(lm, ["stdlib_docstrings"], limit=16, log_samples=True)
    hf = hf_backend(single_run, tmp_path / "hf", batch_size=4)
    theirs = evaluate_tasks(hf, ["stdlib_docstrings"], limit=16, log_samples=True)
    for metric in ("acc,none", "acc_norm,none"):
        assert (ours["results"]["stdlib_docstrings"][metric]
                == theirs["results"]["stdlib_docstrings"][metric])
    for mine, other in zip(ours["samples"]["stdlib_docstrings"],
                           theirs["samples"]["stdlib_docstrings"]):
        assert mine["doc"] == other["doc"]
        ours_scores = [float(response[0][0]) for response in mine["resps"]]
        theirs_scores = [float(response[0][0]) for response in other["resps"]]
        assert ours_scores == pytest.approx(theirs_scores, abs=1e-4)


def test_burrow_eval_tasks_prints_the_table_and_the_results_object(harness, single_run,
                                                                    capsys):
    assert main(["eval", str(single_run), "--tasks", "stdlib_docstrings", "--limit", "4"]) == 0
    table = capsys.readouterr().out
    assert "stdlib_docstrings" in table and "acc_norm" in table
    assert main(["eval", str(single_run), "--tasks", "stdlib_docstrings", "--limit", "4",
                 "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["results"]["stdlib_docstrings"]["sample_len"] == 4


def test_the_local_task_is_made_of_held_out_stdlib_docstrings(harness, tmp_path):
    from burrow.data.sources import split_of
    from burrow.eval.docstring_task import CHOICES, TASK_NAME, write_task

    directory = write_task(tmp_path)
    documents = [json.loads(line) for line in (directory / f"{TASK_NAME}.jsonl").open()]
    assert len(documents) >= 50
    for document in documents:
        assert len(document["choices"]) == CHOICES == len(set(document["choices"]))
        assert split_of(document["source"].rsplit(":", 1)[0], 0.02) == "val"
        assert document["context"].startswith("def ")


@pytest.mark.parametrize(("args", "message"), [
    (["--tasks", "hellaswg"], "did you mean hellaswag"),
    (["--tasks", ","], "no task named"),
    (["--limit", "3"], "need --tasks"),
    (["--tasks", "stdlib_docstrings", "--data", "x"], "--data does not apply"),
])
def test_bad_task_requests_are_one_line(harness, single_run, capsys, args, message):
    assert main(["eval", str(single_run), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_task_needing_the_hub_offline_is_one_line(harness, single_run, capsys, monkeypatch):
    from burrow.eval import tasks

    monkeypatch.setattr(tasks, "hub_reachable", lambda: False)
    assert main(["eval", str(single_run), "--tasks", "arc_easy", "--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert "Hugging Face Hub, which cannot be reached" in err and err.count("\n") == 1


def test_tasks_without_the_harness_installed_say_how_to_install_it(tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` fails
    assert main(["eval", str(tmp_path), "--tasks", "stdlib_docstrings"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'burrow-lm[eval]'" in err and err.count("\n") == 1


def test_training_evaluates_the_tasks_without_changing_the_losses(harness, single, tmp_path):
    from burrow.train.metrics import MetricsLog
    from test_parallel import train

    out = tmp_path / "run"
    losses = train(out, 8, extra=("--eval-tasks", "stdlib_docstrings", "--eval-tasks-every", "4",
                                  "--eval-tasks-limit", "8"))
    assert losses == single
    rows = [row for row in MetricsLog(out / "metrics.jsonl").rows()
            if row["split"] == "tasks"]
    assert [row["step"] for row in rows] == [4, 8]
    for row in rows:
        assert 0.0 <= row["tasks"]["stdlib_docstrings"]["acc"] <= 1.0
    assert (out / "tasks.png").is_file()
