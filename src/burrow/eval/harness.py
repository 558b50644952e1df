"""burrow runs as models of EleutherAI's lm-evaluation-harness (`pip install burrow-lm[eval]`).

`BurrowLM` is the harness's model interface (lm_eval.api.model.LM, registered as "burrow") over
a run directory or a model in memory; `burrow eval RUN --tasks ...` and the trainer's
`eval_tasks` call it through `burrow.eval.tasks`. It answers the harness's three requests:

- loglikelihood(context, continuation): log p(continuation | context), and whether greedy
  decoding would have produced it. The pair is tokenised as one text, the way the model read
  text in training, and split where the continuation's first character falls (see
  `split_pair`); the context is preceded by </s>, burrow's document separator.
- loglikelihood_rolling(text): log p(text), in the harness's disjoint windows of the model's
  context (lm_eval.utils.get_rolling_token_windows), the first one after </s>.
- generate_until(context, until): greedy (or sampled) text from burrow.infer.generate, with its
  KV cache (and a RETRO model's retrieval at chunk boundaries), cut at the first stop string;
  decoding ends once every row of a batch holds one (or </s>), not at max_gen_toks.

A context too long for the model loses its start (left truncation), as in the harness's own
backends; a continuation longer than the whole context cannot be scored and is refused.

A RETRO model given its chunk database (`BurrowLM(run, retro_db=DB, retro_k=K)`, `burrow eval
RUN --tasks ... --retro-db DB`) reads, in every request, the neighbours of each complete chunk
of the tokens it scores or continues (RETRO §2.4), as it does in training and generation;
without one it is its decoder alone.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from burrow.errors import UserError

DEFAULT_MAX_GEN_TOKS = 256  # the harness's default for generate_until


def split_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of context + continuation tokenised together.

    Tokenised alone, a context may end in a piece that the continuation's first characters
    would have merged with ("def fo" + "o(x)" reads "fo", "o(" but the model saw "foo", "(");
    scoring those pieces would ask the model about a tokenisation it never produces. Instead
    the pair is tokenised as one text and cut before the token that holds the continuation's
    first byte: a piece straddling the boundary belongs to the continuation, whose score is
    then the probability of that piece and all after it, given the tokens before it.
    """
    ids = tokenizer.encode(context + continuation)
    boundary = len(context.encode("utf-8"))
    lengths = tokenizer.byte_lengths()
    end = 0
    for index, token in enumerate(ids):
        end += lengths[token]
        if end > boundary:
            return ids[:index], ids[index:]
    return ids, []


def _is_capacity_limited(cfg: Any) -> bool:
    """Whether tokens of one batch compete for expert capacity (Switch §2.2), so that a
    sequence's scores would depend on the others batched with it."""
    return cfg.moe.enabled and not cfg.moe.dropless


@register_model("burrow")
class BurrowLM(TemplateLM):
    """A burrow model for the harness: `BurrowLM(run="runs/nano")`, or from a model in memory
    `BurrowLM(model=model, tokenizer=tokenizer)`; `--model_args run=runs/nano,batch_size=16`.

    For a RETRO model, `retro_db` (a database directory, or an open Database) is the chunk
    database it retrieves from, with `retro_k` neighbours per chunk (default the model's
    model.retro.neighbours, the k it trained with and `burrow eval --retro-db` reads);
    `--model_args run=runs/retro,retro_db=db/,retro_k=4`. `retriever` is then its
    ChunkRetriever, else None."""

    def __init__(self, run: str | Path | None = None, *, model: Any = None,
                 tokenizer: Any = None, device: str | torch.device = "auto",
                 batch_size: int | str = 8, max_length: int | None = None,
                 seed: int = 0, retro_db: Any = None, retro_k: int | str | None = None,
                 **_harness_settings: Any):
        super().__init__()
        if (run is None) == (model is None):
            raise UserError("BurrowLM needs a run directory (run=...) or a model and its "
                            "tokenizer, not both")
        if model is None:
            from burrow.parallel import resolve_device
            from burrow.run import load_run

            device = resolve_device(str(device))
            model, tokenizer, _ = load_run(run, device=device)
        elif tokenizer is None:
            raise UserError("BurrowLM(model=...) needs the model's tokenizer too")
        self.model, self.tokenizer = model, tokenizer
        self.cfg = model.cfg
        self._device = next(model.parameters()).device
        self.batch_size = 1 if _is_capacity_limited(self.cfg) else _batch_size(batch_size)
        self._max_length = min(max_length or self.cfg.max_seq_len, self.cfg.max_seq_len)
        self.seed = seed
        self.retriever = self._retriever(retro_db, retro_k, "the model" if run is None else run)

    def _retriever(self, db: Any, k: int | str | None, what: str | Path) -> Any:
        """The ChunkRetriever over database `db`, or None without one; a one-line UserError for
        a model without retrieval or a database that does not fit it."""
        if db is None:
            if k is not None:
                raise UserError("retro_k (--k) needs retro_db (--retro-db DB), the database to "
                                "retrieve from")
            return None
        if self.cfg.retro is None:
            raise UserError(f"{what} has no retrieval blocks (model.retro is unset); evaluate "
                            "it without a database (drop --retro-db / retro_db=)")
        from burrow.retrieval import run_retriever

        return run_retriever(db, self.cfg.retro, self.tokenizer,
                             None if k is None else int(k), what=str(what))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None
                               ) -> BurrowLM:
        """From `lm_eval run --model burrow --model_args run=RUN,...`."""
        return super().create_from_arg_string(arg_string, _available(additional_config))

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any],
                            additional_config: dict | None = None) -> BurrowLM:
        return super().create_from_arg_obj(arg_dict, _available(additional_config))

    # -- what the harness asks of every model ------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return f"burrow-sentencepiece-{self.tokenizer.fingerprint}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        context_ids, continuation_ids = split_pair(self.tokenizer, context, continuation)
        return [self.eot_token_id, *context_ids], continuation_ids

    # -- scoring -----------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any
                              ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation token), greedy) for each (key, context ids, continuation
        ids), in batches of similar lengths; the inputs are the last max_length tokens."""
        rows = []
        for _, context, continuation in requests:
            if len(continuation) > self.max_length:
                raise UserError(f"a continuation of {len(continuation)} tokens cannot be scored "
                                f"by a model with a context of {self.max_length} tokens")
            rows.append((context + continuation)[-(self.max_length + 1):])
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # long first: equal pads
        results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        retrieved: dict[tuple[int, ...], np.ndarray] = {}  # chunk -> neighbours: contexts recur
        progress = tqdm(total=len(rows), disable=disable_tqdm, desc="burrow loglikelihood")
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            scores = self._score_batch([rows[i] for i in batch],
                                       [len(requests[i][2]) for i in batch], retrieved)
            for i, score in zip(batch, scores):
                results[i] = score
            progress.update(len(batch))
        progress.close()
        return results

    @torch.no_grad()
    def _score_batch(self, rows: list[list[int]], counts: list[int],
                     retrieved: dict[tuple[int, ...], np.ndarray]) -> list[tuple[float, bool]]:
        """Score the last counts[b] tokens of each row given the ones before; rows are padded on
        the right with </s>, which no scored position can see (causal attention). With a
        retriever, the model reads the neighbours of each row's complete chunks (`_neighbours`;
        `retrieved` keeps those already looked up)."""
        width = max(len(row) for row in rows) - 1
        inputs = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)
        for b, row in enumerate(rows):
            inputs[b, :len(row) - 1] = torch.tensor(row[:-1])
        neighbours = self._neighbours([row[:-1] for row in rows], width, retrieved)
        retrieval = {} if neighbours is None else {"neighbours": neighbours}
        logits = self.model(inputs.to(self.device), **retrieval).logits.float()
        log_probs = F.log_softmax(logits, dim=-1)
        scores = []
        for b, (row, count) in enumerate(zip(rows, counts)):
            if count == 0:
                scores.append((0.0, True))
                continue
            targets = torch.tensor(row[-count:], device=self.device)
            positions = log_probs[b, len(row) - 1 - count:len(row) - 1]  # (count, V)
            score = positions.gather(-1, targets[:, None]).sum()
            scores.append((float(score), bool((positions.argmax(-1) == targets).all())))
        return scores

    def _neighbours(self, inputs: list[list[int]], width: int,
                    retrieved: dict[tuple[int, ...], np.ndarray]) -> torch.Tensor | None:
        """(B, width // m, k, r) token ids of the neighbours of each row's chunks, as the model
        takes them for inputs padded to `width`; None without a retriever or a whole chunk.

        Chunk u of a row is its input tokens u m ... u m + m - 1. Each chunk complete in the
        row's own tokens is looked up (once per distinct chunk: `retrieved`). The others lie in
        the padding and get </s> tokens, which no scored position reads: chunk u's neighbours
        reach positions (u + 1) m - 1 onward only (chunked cross-attention's m - 1 shift,
        model/retro.py), and a row of n tokens completes chunks 0 ... n // m - 1, so a padded
        chunk, u >= n // m, reaches positions >= n, past the row's last scored one.

        Causality: a chunk may hold continuation tokens, the ones being scored. The same shift
        makes its neighbours inform only the predictions at its last position and after, those
        of tokens that follow the chunk; so each token is scored given neighbours retrieved with
        tokens before it, as generation samples it (infer/generate.py retrieves a chunk once
        its last token is known), never with its own future.
        """
        if self.retriever is None or width < self.cfg.retro.chunk_size:
            return None
        m = self.cfg.retro.chunk_size
        chunks = [[tuple(row[u * m:(u + 1) * m]) for u in range(len(row) // m)]
                  for row in inputs]
        missing = list(dict.fromkeys(chunk for row in chunks for chunk in row
                                     if chunk not in retrieved))
        if missing:
            found, _ = self.retriever([list(chunk) for chunk in missing])
            retrieved.update(zip(missing, np.asarray(found, dtype=np.int64)))
        neighbours = np.full((len(inputs), width // m, self.retriever.k,
                              self.cfg.retro.neighbour_length), self.eot_token_id, dtype=np.int64)
        for b, row in enumerate(chunks):
            for u, chunk in enumerate(row):
                neighbours[b, u] = retrieved[chunk]
        return torch.from_numpy(neighbours).to(self.device)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                              ) -> list[float]:
        """log p(text) over disjoint windows of max_length predicted tokens: the first
        conditioned on </s>, each later one on the max_length tokens before it."""
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.eot_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (score, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += score
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation --------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continue each context (after </s>) until a stop string or max_gen_toks tokens;
        requests with prompts of one length and the same settings run as one batch."""
        from burrow.infer import generate

        prepared = [self._generation_request(*request.args) for request in requests]
        results = [""] * len(requests)
        keyed = sorted(range(len(prepared)), key=lambda i: prepared[i][0])
        progress = tqdm(total=len(prepared), disable=disable_tqdm, desc="burrow generate")
        for key, group in itertools.groupby(keyed, key=lambda i: prepared[i][0]):
            length, new_tokens, temperature, top_k, top_p = key
            indices = list(group)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                prompts = torch.tensor([prepared[i][1] for i in batch], device=self.device)
                stops = [prepared[i][2] for i in batch]
                out = generate(self.model, prompts, new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=self.seed,
                               eos_id=self.eot_token_id, retrieve=self.retriever,
                               stop=lambda new, stops=stops: self._all_stopped(new, stops))
                for i, row in zip(batch, out[:, length:].tolist()):
                    kept = row[:row.index(self.eot_token_id)] if self.eot_token_id in row else row
                    results[i] = cut_at_stop(self.tok_decode(kept), prepared[i][2])
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                progress.update(len(batch))
        progress.close()
        return results

    def _all_stopped(self, new: torch.Tensor, stops: list[list[str]]) -> bool:
        """Whether every row of the batch has ended: emitted </s> or a stop string. Greedy
        tokens do not depend on when the loop stops, so stopping here returns what running
        to max_gen_toks and cutting would."""
        for row, row_stops in zip(new.tolist(), stops):
            if self.eot_token_id in row:
                continue
            if not row_stops:
                return False
            text = self.tok_decode(row)
            if not any(stop in text for stop in row_stops):
                return False
        return True

    def _generation_request(self, context: str, settings: dict[str, Any]
                            ) -> tuple[tuple[int, int, float, int | None, float | None],
                                       list[int], list[str]]:
        """((prompt length, new tokens, temperature, top_k, top_p), prompt ids, stop strings)
        of one generate_until request; the prompt loses its start if prompt and new tokens
        would not fit in the context."""
        settings = dict(settings or {})
        until = settings.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        new_tokens = int(settings.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        new_tokens = min(new_tokens, self.max_length - 1)
        sample = settings.pop("do_sample", False)
        temperature = float(settings.pop("temperature", 0.0 if not sample else 1.0))
        if not sample:
            temperature = 0.0
        top_k, top_p = settings.pop("top_k", None), settings.pop("top_p", None)
        prompt = [self.eot_token_id, *self.tok_encode(context)]
        prompt = prompt[-(self.max_length - new_tokens):]
        return ((len(prompt), new_tokens, temperature, top_k, top_p), prompt,
                [stop for stop in until if stop])


def _available(config: dict | None) -> dict:
    """The harness's command line asks for cuda:0 unless told otherwise; where there is no
    GPU, the CPU it is, as with its HF backend."""
    config = dict(config or {})
    if str(config.get("device") or "").startswith("cuda") and not torch.cuda.is_available():
        config["device"] = "cpu"
    return config


def cut_at_stop(text: str, stops: list[str]) -> str:
    """text up to the first occurrence of any stop string (the harness's `until`)."""
    cut = min((text.find(stop) for stop in stops if stop in text), default=len(text))
    return text[:cut]


def _batch_size(value: int | str) -> int:
    """The harness passes batch sizes as given on its command line: "8", 8, or "auto"."""
    if str(value).startswith("auto"):
        return 8
    size = int(value)
    if size < 1:
        raise UserError(f"batch_size must be >= 1, got {size}")
    return size


def hf_backend(run: str | Path, directory: str | Path, *, device: str = "cpu",
               batch_size: int = 8) -> Any:
    """The harness's own HF backend (lm_eval.models.huggingface.HFLM) on `run` exported to
    `directory` (`burrow export-hf`), reading texts as BurrowLM does: its tokenizer puts </s>
    before each text and the harness is told that </s> is the prefix token. The same task
    through both backends gives the same scores (tests/test_lm_eval.py), and bench/lm_eval.py
    times them against each other. Needs transformers and accelerate (the `hf` and `eval`
    extras)."""
    import json

    from lm_eval.models.huggingface import HFLM

    from burrow.interop import export_hf
    from burrow.run import load_run

    _, tokenizer, _ = load_run(run, device="cpu")
    directory = Path(directory)
    export_hf(run, directory)
    tokenizer_json = directory / "tokenizer.json"
    spec = json.loads(tokenizer_json.read_text())
    eos = tokenizer.eos_id
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": "</s>", "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                                       {"Sequence": {"id": "B", "type_id": 0}}],
                              "special_tokens": {"</s>": {"id": "</s>", "ids": [eos],
                                                          "tokens": ["</s>"]}}}
    tokenizer_json.write_text(json.dumps(spec))
    return HFLM(pretrained=str(directory), device=device, batch_size=batch_size,
                dtype="float32", prefix_token_id=eos)
