"""Does a RETRO run read its neighbours? Four measurements that tell a retrieval gain from a
decoder that learned to ignore them.

    .venv/bin/python bench/retro_reading.py --run RUN --db DB [--baseline DENSE_RUN]
    .venv/bin/python bench/retro_reading.py --db DB --prepared PREPARED --oracle-steps 300

1. `neighbours` (with --run): the run's loss on the held-out windows' tokens that can see
   neighbours (positions m ... T - 1), with its stored neighbours, without retrieval, with other
   chunks' neighbours (the control of `burrow eval --retro-db`) and with oracle neighbours:
   chunk u "retrieves" the held-out stream's own tokens [u m, u m + r), so the tokens of chunk
   u + 1 are in the continuation it reads, at a fixed offset. A model that reads its neighbours
   drops far below "off" with the oracle; one that ignores them does not move.
2. `copyable` (the data): the fraction of chunk u + 1's tokens whose 4-gram (with the three
   tokens before) occurs in the values of chunk u's k neighbours, against the same with the
   neighbours of a random chunk. It bounds what copying from retrieved text can give.
3. `induction` (with --run, and --baseline): the loss on the second copy of a repeated random
   token sequence against the first; a decoder that copies from its own context (induction
   heads) has a far lower second-copy loss. Reading neighbours by content is the same skill.
4. `oracle_training` (with --oracle-steps): a fresh model of the run's config (or retro-nano)
   trained with oracle neighbours, its loss with them and without every 25 steps: whether the
   architecture can learn to read at all, and how fast.

Prints one JSON object on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from harness import emit, log, machine, run_main, warn_if_busy

import burrow
from burrow.data import TokenDataset
from burrow.eval.retro import control_rows
from burrow.retrieval import open_database, retrieved_tokens
from burrow.retrieval.neighbours import open_neighbours
from burrow.run import prepared_data_of


def oracle_neighbours(dataset: TokenDataset, starts: np.ndarray, seq_len: int, m: int, r: int,
                      k: int) -> torch.Tensor:
    """(B, C, k, r): chunk u of each window gets the stream's own tokens [u m, u m + r), k times."""
    chunks = seq_len // m
    rows = [[np.stack([dataset.window(int(s) + u * m, r)] * k) for u in range(chunks)]
            for s in starts]
    return torch.from_numpy(np.asarray(rows, dtype=np.int64))


def neighbour_losses(run: Path, db_path: Path, windows: int) -> dict[str, float]:
    from burrow.train.retrieval import Retrieval

    model, _, cfg = burrow.load_run(run)
    retro, seq_len = cfg.model.retro, cfg.train.seq_len
    m, r, k = retro.chunk_size, retro.chunk_size + retro.continuation, retro.neighbours
    prepared = prepared_data_of(run)
    dataset = TokenDataset(prepared, "val")
    cfg.data.retro_db = str(db_path)
    retrieval = Retrieval(cfg, prepared, splits=("val",), progress=False)
    starts = np.arange(min(windows, (dataset.num_tokens - 1) // seq_len)) * seq_len
    rows = control_rows(len(retrieval.ids["val"]))
    kinds = {
        "off": None,
        "stored": lambda s: retrieval.batch("val", s, seq_len)["neighbours"],
        "other_chunks": lambda s: retrieval.batch("val", s, seq_len, rows=rows)["neighbours"],
        "oracle": lambda s: oracle_neighbours(dataset, s, seq_len, m, r, k),
    }
    result = {}
    for name, neighbours in kinds.items():
        total, count = 0.0, 0
        for i in range(0, len(starts), 8):
            s = starts[i:i + 8]
            x = torch.from_numpy(np.stack([dataset.window(int(a), seq_len + 1) for a in s])
                                 .astype(np.int64))
            extra = {} if neighbours is None else {"neighbours": neighbours(s)}
            with torch.no_grad():
                logits = model(x[:, :-1], **extra).logits.float()
            nll = -torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None])[..., 0]
            total += nll[:, m:].sum().item()
            count += nll[:, m:].numel()
        result[name] = round(total / count, 4)
        log(f"neighbours {name}: {result[name]} nats/token")
    result["tokens"] = count
    return result


def copyable(db_path: Path, prepared: Path, k: int, sample: int) -> dict[str, dict]:
    db = open_database(db_path)
    m = db.chunk_tokens
    result = {}
    for split in ("val", "train"):
        dataset, table = TokenDataset(prepared, split), open_neighbours(db, prepared, split)
        rng = np.random.default_rng(0)
        last = len(table) - 1
        chunks = np.arange(last) if last <= sample else rng.choice(last, sample, replace=False)
        counts = {"retrieved": [0, 0], "random": [0, 0]}
        for u in chunks:
            following = dataset.window((int(u) + 1) * m - 3, m + 3)
            for kind, row in (("retrieved", u), ("random", rng.integers(0, last))):
                values = retrieved_tokens(db, np.asarray(table[row][:k]))
                grams = {tuple(v[i:i + 4]) for v in values for i in range(len(v) - 3)}
                hits = sum(tuple(following[t - 3:t + 1]) in grams
                           for t in range(3, len(following)))
                counts[kind][0] += hits
                counts[kind][1] += len(following) - 3
        result[split] = {kind: round(h / n, 4) for kind, (h, n) in counts.items()}
        result[split]["chunks"] = len(chunks)
        log(f"copyable {split}: {result[split]}")
    return result


def induction(runs: list[Path], length: int = 64, batch: int = 16) -> dict[str, dict]:
    result = {}
    for run in runs:
        model, _, cfg = burrow.load_run(run)
        generator = torch.Generator().manual_seed(0)
        x = torch.randint(10, cfg.model.vocab_size, (batch, length), generator=generator)
        x = torch.cat([x, x], 1)
        with torch.no_grad():
            logits = model(x).logits.float()[:, :-1]
        nll = -torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None])[..., 0]
        result[str(run)] = {"first_copy": round(nll[:, :length - 1].mean().item(), 3),
                            "second_copy": round(nll[:, length:].mean().item(), 3)}
        log(f"induction {run}: {result[str(run)]}")
    return result


def oracle_training(cfg: burrow.ModelConfig, prepared: Path, steps: int, seq_len: int = 256,
                    batch: int = 16, lr: float = 3e-3) -> list[dict]:
    torch.manual_seed(0)
    model = burrow.Transformer(cfg)
    m = cfg.retro.chunk_size
    r, k = m + cfg.retro.continuation, cfg.retro.neighbours
    dataset = TokenDataset(prepared, "train")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng, curve, begun = np.random.default_rng(0), [], time.time()
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / 50)
        starts = rng.integers(0, (dataset.num_tokens - 2 * seq_len) // m, size=batch) * m
        x = torch.from_numpy(np.stack([dataset.window(int(a), seq_len + 1) for a in starts])
                             .astype(np.int64))
        out = model(x[:, :-1], labels=x[:, 1:],
                    neighbours=oracle_neighbours(dataset, starts, seq_len, m, r, k))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0:
            with torch.no_grad():
                off = model(x[:, :-1], labels=x[:, 1:]).loss.item()
            curve.append({"step": step, "loss_oracle": round(out.loss.item(), 3),
                          "loss_off": round(off, 3)})
            log(f"oracle training {curve[-1]} {time.time() - begun:.0f}s")
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, required=True, help="the RETRO database")
    parser.add_argument("--run", type=Path, help="a RETRO run trained with --db")
    parser.add_argument("--baseline", type=Path, help="a dense run, for the induction check")
    parser.add_argument("--prepared", type=Path, help="prepared data (default: the run's)")
    parser.add_argument("--windows", type=int, default=120, help="held-out windows read")
    parser.add_argument("--sample", type=int, default=3000, help="chunks for `copyable`")
    parser.add_argument("--oracle-steps", type=int, default=0)
    args = parser.parse_args()
    warn_if_busy()
    prepared = args.prepared or (prepared_data_of(args.run) if args.run else None)
    if prepared is None:
        raise burrow.UserError("give --run or --prepared")
    result: dict = {"machine": machine(torch.device("cpu")), "db": str(args.db),
                    "run": str(args.run)}
    cfg = burrow.presets.get("retro-nano")
    if args.run:
        cfg = burrow.RunConfig.load(args.run / "config.yaml").model
        result["neighbours"] = neighbour_losses(args.run, args.db, args.windows)
        result["induction"] = induction([args.run] + ([args.baseline] if args.baseline else []))
    result["copyable"] = copyable(args.db, prepared, cfg.retro.neighbours, args.sample)
    if args.oracle_steps:
        result["oracle_training"] = oracle_training(cfg, prepared, args.oracle_steps)
    emit(result)


if __name__ == "__main__":
    run_main(main)
