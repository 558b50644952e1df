"""The tokenizer is lossless: decode(encode(s)) == s for every string, and never <unk>."""

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from burrow.data import Tokenizer
from burrow.data.sources import source_files
from burrow.data.tokenizer import CHUNK_CHARS, sample_chunks
from burrow.errors import UserError


def stdlib_slice(max_chars: int) -> list[str]:
    """Every 7th UTF-8 file of the stdlib corpus until max_chars characters: real, varied code."""
    texts, total = [], 0
    for _, path in source_files("stdlib")[::7]:
        try:
            text = path.read_text("utf-8")
        except UnicodeDecodeError:
            continue
        texts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return texts


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return stdlib_slice(300_000)


@pytest.fixture(scope="session")
def tokenizer(corpus, tmp_path_factory) -> Tokenizer:
    return Tokenizer.train(corpus, 512, tmp_path_factory.mktemp("bpe"), num_threads=2)


@pytest.fixture(scope="session")
def unigram(corpus, tmp_path_factory) -> Tokenizer:
    return Tokenizer.train(
        corpus, 512, tmp_path_factory.mktemp("unigram"), model_type="unigram", num_threads=2
    )


TRAPS = [
    "",
    " ",
    "   ",
    "  leading spaces",
    "trailing spaces  ",
    "a  b   c    d",
    "\n",
    "\n\n\n",
    "\r\n",
    "line\r\nline\r\n",
    "\t",
    "\tindented\t",
    "\x00",
    "x\x00y",
    "\x01\x1b[0m\x7f",
    "\u2581",  # sentencepiece's meta symbol for a space
    "a\u2581b",
    " \u2581 ",
    "\u2581\u2581",
    "\u2581\n\u2581",
    "<s>",
    "</s>",
    "<unk>",
    "<pad>",
    "<0x41>",
    "<s>hello</s>",
    " \u2047 ",  # what sentencepiece shows for <unk>
    "日本語のテキスト",
    "😀👍🏽",
    "\ufeffbom",
    "ﬁ ligature",  # NFKC would change it
    "e\u0301",  # combining accent, NFC would change it
    "\u200b\u200d",
    "\U0010ffff",
    "1234567890",
    "def f(x):\n    return x  # done\n",
]


@pytest.mark.parametrize("text", TRAPS)
def test_traps_round_trip_without_unk(tokenizer, unigram, text):
    for model in (tokenizer, unigram):
        ids = model.encode(text)
        assert model.decode(ids) == text
        assert model.unk_id not in ids


ANY_CHARACTER = st.characters(blacklist_categories=("Cs",))  # all but surrogates
PIECES = st.sampled_from(
    [" ", "  ", "\n", "\r\n", "\t", "\x00", "\u2581", "<s>", "</s>", "<unk>", "<0x41>", "def ", "0"]
)
# mostly the troublesome pieces above, glued together with arbitrary characters
MIXED = st.lists(st.one_of(PIECES, ANY_CHARACTER), max_size=40).map("".join)
PROPERTY = settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))


@PROPERTY
@given(st.text(alphabet=ANY_CHARACTER))
@example("\u2581 \u2581")
def test_any_text_round_trips_without_unk(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_id not in ids
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


@PROPERTY
@given(MIXED)
def test_mixed_text_round_trips_without_unk(tokenizer, unigram, text):
    for model in (tokenizer, unigram):
        ids = model.encode(text)
        assert model.decode(ids) == text
        assert model.unk_id not in ids


@PROPERTY
@given(MIXED)
@example("\u2581 \u2581\n")
def test_token_byte_lengths_add_up_to_the_text(tokenizer, unigram, text):
    for model in (tokenizer, unigram):
        lengths = model.byte_lengths()
        assert sum(lengths[i] for i in model.encode(text)) == len(text.encode("utf-8"))
        assert lengths[model.eos_id] == 0 and lengths[model.bos_id] == 0


def test_meta_symbol_is_encoded_as_its_bytes(tokenizer):
    pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode("\u2581")]
    assert pieces == ["<0xE2>", "<0x96>", "<0x81>"]  # UTF-8 of U+2581
    assert tokenizer.decode(tokenizer.encode("a \u2581 b")) == "a \u2581 b"


def test_real_code_round_trips_and_compresses(tokenizer, corpus):
    num_bytes = num_tokens = 0
    for text in corpus:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        num_bytes, num_tokens = num_bytes + len(text.encode()), num_tokens + len(ids)
    assert num_bytes / num_tokens > 1.6  # bytes per token, even with only 512 pieces


def test_special_ids_and_decoding_of_specials(tokenizer):
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert tokenizer.vocab_size == 512
    ids = tokenizer.encode("x = 1")
    assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id]) == "x = 1"


def test_newlines_are_learned_inside_pieces(tokenizer):
    # training sentences keep whole lines with their newlines, so pieces like "):\n" exist
    pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    assert any(len(piece) > 1 and "\n" in piece for piece in pieces)


def test_digits_are_split(tokenizer):
    pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    learned = [piece for piece in pieces if not piece.startswith("<")]  # not <0x41>, <s>, ...
    assert not any(sum(c.isdigit() for c in piece) > 1 for piece in learned)
    assert [tokenizer.id_to_piece(i) for i in tokenizer.encode("2024")] == ["2", "0", "2", "4"]


def test_save_and_load(tokenizer, tmp_path):
    file = tokenizer.save(tmp_path / "saved")
    for path in (file, tmp_path / "saved"):
        loaded = Tokenizer.load(path)
        assert loaded.fingerprint == tokenizer.fingerprint
        assert loaded.encode("print('hi')\n") == tokenizer.encode("print('hi')\n")
    with pytest.raises(UserError, match="no tokenizer"):
        Tokenizer.load(tmp_path / "missing")


def test_decode_accepts_arrays_and_tensors(tokenizer):
    import numpy as np
    import torch

    ids = tokenizer.encode("for i in range(3):")
    assert tokenizer.decode(np.array(ids, dtype=np.uint16)) == "for i in range(3):"
    assert tokenizer.decode(torch.tensor(ids)) == "for i in range(3):"


@pytest.mark.parametrize(
    ("texts", "vocab_size", "model_type", "message"),
    [
        (["abc abd"] * 20, 4096, "bpe", "Vocabulary size too high"),
        (["abc abd"] * 20, 100, "bpe", "smaller than required_chars"),
        ([], 512, "bpe", "no text"),
        (["abc"], 512, "wordpiece", "unknown tokenizer model type"),
    ],
)
def test_training_errors_are_user_errors(tmp_path, texts, vocab_size, model_type, message):
    with pytest.raises(UserError, match=message):
        Tokenizer.train(texts, vocab_size, tmp_path, model_type=model_type)


def test_sample_keeps_everything_that_fits_in_order():
    texts = ["a\u2581b\n" * 3000, "x" * 10_000, "short"]  # the 10,000-char line must be cut
    chunks = sample_chunks(texts, 10**9, seed=0)
    assert "".join(chunks) == "".join(texts).replace("\u2581", "")
    assert max(len(chunk) for chunk in chunks) <= CHUNK_CHARS
    assert all("\u2581" not in chunk for chunk in chunks)


def test_sample_is_bounded_random_and_seeded():
    texts = [f"line {i} " + "é" * (i % 50) + "\n" for i in range(20_000)]
    budget = 50_000
    sample = sample_chunks(texts, budget, seed=0)
    size = sum(len(chunk.encode()) for chunk in sample)
    assert budget - 4 * CHUNK_CHARS < size <= budget
    assert sample == sample_chunks(texts, budget, seed=0)
    assert sample != sample_chunks(texts, budget, seed=1)
    # spread over the whole corpus, not taken from its beginning
    lines = [int(line.split()[1]) for chunk in sample for line in chunk.splitlines()]
    assert min(lines) < 2_000 and max(lines) > 18_000
