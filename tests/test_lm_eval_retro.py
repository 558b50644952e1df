"""The lm-evaluation-harness backend on a RETRO run with its database: loglikelihood with the
neighbours of every complete chunk retrieved (against the model's logits with neighbours looked
up by hand), the same scores batched and one row at a time, generate_until as generate with
retrieval, `burrow eval RUN --tasks ... --retro-db DB`, its one-line refusals, and the trainer's
task evaluation of a RETRO run retrieving from the database it trains with."""

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from burrow import Transformer
from burrow.cli import main
from burrow.data import Tokenizer, prepare_data
from burrow.infer import generate
from burrow.retrieval import ChunkRetriever, build_database, open_database
from burrow.retrieval.encoder import ENCODERS
from burrow.run import load_run
from burrow.train.checkpoint import save_checkpoint
from conftest import CORPUS, tiny_run_config
from test_retrieval import ByteCountEncoder
from test_retro_generate import edited_copy
from test_retro_train import retro_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local files

CONTEXT = 256  # four chunks of m = 64


@pytest.fixture(autouse=True)
def byte_encoder(monkeypatch):
    monkeypatch.setitem(ENCODERS, ByteCountEncoder.name, ByteCountEncoder)


@pytest.fixture(scope="module")
def harness():
    return pytest.importorskip("lm_eval")


def random_run(directory: Path, cfg, tokenizer_file: Path) -> Path:
    """A run directory holding cfg, the tokenizer and a checkpoint of random weights, large
    enough (std 0.3) that what the model reads moves its scores far."""
    directory.mkdir(parents=True)
    cfg.save(directory / "config.yaml")
    shutil.copyfile(tokenizer_file, directory / "tokenizer.model")
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    save_checkpoint(directory, 0, model, None, {"step": 0})
    return directory


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A database over the test corpus, a RETRO run of context CONTEXT reading it, and a dense
    run, all with the test tokenizer."""
    root = tmp_path_factory.mktemp("retro-tasks")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(ENCODERS, ByteCountEncoder.name, ByteCountEncoder)
        prepared = prepare_data(tiny_run_config(), progress=False)
        db = build_database(str(CORPUS), Tokenizer.load(prepared), root / "db",
                            encoder=ByteCountEncoder.name, progress=False)
    retro = retro_config(db)
    retro.model = dataclasses.replace(retro.model, max_seq_len=CONTEXT)
    tokenizer = prepared / "tokenizer.model"
    return {"db": db, "retro": random_run(root / "retro", retro, tokenizer),
            "dense": random_run(root / "dense", tiny_run_config(), tokenizer)}


@pytest.fixture(scope="module")
def lm(harness, runs):
    from burrow.eval.harness import BurrowLM

    return BurrowLM(runs["retro"], device="cpu", batch_size=4, retro_db=runs["db"])


def requests(kind, *args_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i)
            for i, args in enumerate(args_list)]


def by_hand(model, tokenizer, retriever, context, continuation):
    """(log p(continuation | </s> context), greedy) from the model's logits on the last CONTEXT
    tokens, given the neighbours of each of their complete chunks, each retrieved alone."""
    ids = tokenizer.encode(context + continuation)
    split = next((i for i in range(len(ids) + 1)
                  if len(tokenizer.decode(ids[:i + 1])) > len(context)), len(ids))
    ids = [tokenizer.eos_id, *ids]
    count = len(ids) - 1 - split
    window = ids[-(CONTEXT + 1):]
    inputs = window[:-1]
    m = model.cfg.retro.chunk_size
    found = [torch.as_tensor(retriever([inputs[u * m:(u + 1) * m]])[0][0])
             for u in range(len(inputs) // m)]
    retrieval = {"neighbours": torch.stack(found)[None]} if found else {}
    with torch.no_grad():
        log_probs = F.log_softmax(model(torch.tensor([inputs]), **retrieval).logits[0], -1)
    rows = range(len(window) - 1 - count, len(window) - 1)
    return (sum(float(log_probs[t, window[t + 1]]) for t in rows),
            all(int(log_probs[t].argmax()) == window[t + 1] for t in rows))


def test_loglikelihood_reads_the_neighbours_of_every_complete_chunk(lm, runs):
    from burrow.eval.harness import BurrowLM

    model, tokenizer, cfg = load_run(runs["retro"])
    retriever = ChunkRetriever(open_database(runs["db"]), tokenizer, cfg.model.retro.neighbours)
    text = (CORPUS / "bisect.py").read_text()
    pairs = [("x = 1", "2345"),  # no complete chunk: nothing to retrieve
             (text[:200], text[200:260]),
             (text[:100], text[100:500]),  # the continuation fills chunks of its own
             (text[:1500], text[1500:1560])]  # cut on the left: chunks from the window's start
    results = lm.loglikelihood(requests("loglikelihood", *pairs))
    plain = BurrowLM(runs["retro"], device="cpu").loglikelihood(requests("loglikelihood", *pairs))
    for pair, (score, greedy), (without, _) in zip(pairs, results, plain):
        expected, expected_greedy = by_hand(model, tokenizer, retriever, *pair)
        assert score == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy
        if len(tokenizer.encode("".join(pair))) + 1 > 64:  # a chunk to retrieve for
            assert abs(score - without) > 0.1  # retrieval is really used
        else:
            assert score == without


def test_batches_of_rows_with_different_chunk_counts_score_as_rows_alone(lm, runs):
    """Rows of one batch complete 0 to 4 chunks; the shorter ones' chunks past their end are
    padding, and scoring them alone (no padding at all) gives the same: nothing reads it."""
    from burrow.eval.harness import BurrowLM

    text = (CORPUS / "colorsys.py").read_text()
    pairs = [(text[:40], text[40:60]), (text[:150], text[150:190]), (text[:330], text[330:360]),
             (text[:700], text[700:740])]
    lengths = [len(lm.tok_encode("".join(pair))) + 1 for pair in pairs]
    assert len({min(length - 1, CONTEXT) // 64 for length in lengths}) == 4, lengths
    alone = BurrowLM(runs["retro"], device="cpu", batch_size=1, retro_db=runs["db"])
    batched = lm.loglikelihood(requests("loglikelihood", *pairs))  # one batch of four
    for (score, greedy), (single, single_greedy) in zip(
            batched, alone.loglikelihood(requests("loglikelihood", *pairs))):
        assert score == pytest.approx(single, abs=1e-4)
        assert greedy == single_greedy
    rolling = requests("loglikelihood_rolling", (text[:1200],), (text[2000:2300],))
    assert lm.loglikelihood_rolling(rolling) == pytest.approx(
        alone.loglikelihood_rolling(rolling), abs=1e-3)


def test_greedy_generate_until_retrieves_as_generate_does(lm, runs):
    model, tokenizer, cfg = load_run(runs["retro"])
    prompt = "def insort_right(a, x):\n"
    (text,) = lm.generate_until(requests("generate_until",
                                         (prompt, {"until": [], "max_gen_toks": 150})))
    ids = torch.tensor([[tokenizer.eos_id, *tokenizer.encode(prompt)]])
    retriever = ChunkRetriever(open_database(runs["db"]), tokenizer, cfg.model.retro.neighbours)
    out = generate(model, ids, 150, temperature=0.0, eos_id=tokenizer.eos_id, retrieve=retriever)
    new = out[0, ids.shape[1]:].tolist()
    new = new[:new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new
    assert ids.shape[1] + len(new) > 2 * 64  # crossed chunk boundaries: retrieved twice
    assert text == tokenizer.decode(new)
    assert not torch.equal(out, generate(model, ids, 150, temperature=0.0,
                                         eos_id=tokenizer.eos_id))  # retrieval mattered


def test_burrow_eval_tasks_with_retro_db_retrieves(harness, runs, capsys, monkeypatch):
    calls = []
    retrieve = ChunkRetriever.__call__
    monkeypatch.setattr(ChunkRetriever, "__call__",
                        lambda self, chunks: calls.append(len(chunks)) or retrieve(self, chunks))
    # two examples before each question: every request holds a complete chunk
    assert main(["eval", str(runs["retro"]), "--tasks", "stdlib_docstrings", "--limit", "4",
                 "--num-fewshot", "2", "--retro-db", str(runs["db"])]) == 0
    captured = capsys.readouterr()
    assert "stdlib_docstrings" in captured.out and "acc_norm" in captured.out
    assert "without retrieval" not in captured.err
    assert sum(calls) > 0


@pytest.mark.parametrize("case, message", [
    ("dense", "has no retrieval blocks"),
    ("missing", "no RETRO database at"),
    ("half", "half-built database"),
    ("tokenizer", "built with another tokenizer"),
    ("k alone", "--k needs --retro-db DB"),
])
def test_bad_retro_task_requests_are_one_line(harness, runs, case, message, capsys, tmp_path):
    run, db = runs["retro"], runs["db"]
    if case == "dense":
        run = runs["dense"]
    elif case == "missing":
        db = tmp_path / "nothing"
    elif case == "half":
        db = edited_copy(db, tmp_path / "db", complete=False)
    elif case == "tokenizer":
        db = edited_copy(db, tmp_path / "db", tokenizer_fingerprint="0" * 16)
    argv = ["eval", str(run), "--tasks", "stdlib_docstrings", "--limit", "2"]
    argv += ["--k", "2"] if case == "k alone" else ["--retro-db", str(db)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("burrow: error: ") and message in lines[0]
    assert captured.out == ""


def test_training_a_retro_run_evaluates_its_tasks_with_its_database(harness, runs, tmp_path,
                                                                    monkeypatch):
    from burrow.eval import tasks
    from burrow.train import train

    used = []
    evaluate_tasks = tasks.evaluate_tasks

    def spied(lm, *args, **kwargs):
        used.append(lm.retriever)
        return evaluate_tasks(lm, *args, **kwargs)

    monkeypatch.setattr(tasks, "evaluate_tasks", spied)
    cfg = retro_config(runs["db"], max_steps=1, eval_tokens=256, eval_tasks="stdlib_docstrings",
                       eval_tasks_limit=2)
    train(cfg, tmp_path / "run", verbose=False)
    (retriever,) = used
    assert retriever.db.path == runs["db"] and retriever.k == cfg.model.retro.neighbours


def test_the_harness_command_line_reaches_the_database(lm, runs):
    from burrow.eval.harness import BurrowLM

    made = BurrowLM.create_from_arg_string(
        f"run={runs['retro']},retro_db={runs['db']},retro_k=3", {"device": "cpu"})
    assert made.retriever.db.path == runs["db"] and made.retriever.k == 3
    assert lm.retriever.k == made.cfg.retro.neighbours == 2  # default: the k it trained with
