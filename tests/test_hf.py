"""Hugging Face interop: an exported run gives transformers' Llama our logits, and comes back."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local files
transformers = pytest.importorskip("transformers")

from burrow import ModelConfig, RunConfig, TrainConfig, Transformer  # noqa: E402
from burrow.cli import main  # noqa: E402
from burrow.data import Tokenizer  # noqa: E402
from burrow.infer import generate  # noqa: E402
from burrow.interop import export_hf, import_hf  # noqa: E402
from burrow.run import load_run  # noqa: E402
from burrow.train.checkpoint import save_checkpoint  # noqa: E402
from conftest import CORPUS  # noqa: E402

VOCAB = 384
SHAPES = {
    "mha-untied": dict(n_heads=4),
    "gqa-tied": dict(n_heads=4, n_kv_heads=2, tie_embeddings=True),
    "mqa-wide-heads": dict(n_heads=4, n_kv_heads=1, head_dim=16, d_ff=48, rope_theta=500.0,
                           norm_eps=1e-6),
}


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    texts = [path.read_text() for path in sorted(CORPUS.glob("*.py"))]
    out = tmp_path_factory.mktemp("tokenizer")
    Tokenizer.train(texts, VOCAB, out, sample_bytes=20_000, num_threads=1)
    return out / "tokenizer.model"


def make_run(run_dir: Path, tokenizer_file: Path, **fields) -> Transformer:
    """A run directory holding a random model: every tensor drawn, norm weights included."""
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, max_seq_len=64, **fields)
    model = Transformer(cfg)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1.0 + 0.2 * noise if "norm" in name else 0.3 * noise)
    run_dir.mkdir(parents=True)
    RunConfig(model=cfg, train=TrainConfig(seq_len=64)).save(run_dir / "config.yaml")
    shutil.copyfile(tokenizer_file, run_dir / "tokenizer.model")
    save_checkpoint(run_dir, 0, model, None, {"step": 0})
    return model.eval()


def load_llama(directory: Path):
    return transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_export_gives_our_logits_and_tokens_and_imports_back(shape, tokenizer_file, tmp_path):
    model = make_run(tmp_path / "run", tokenizer_file, **SHAPES[shape])
    export_hf(tmp_path / "run", tmp_path / "hf")
    llama = load_llama(tmp_path / "hf")
    ids = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, llama(ids).logits
    assert (ours - theirs).abs().max() < 1e-4

    prompt = torch.tensor([Tokenizer.load(tokenizer_file).encode("def f(x):\n    return")])
    greedy = generate(model, prompt, 20, temperature=0.0, eos_id=2)
    assert torch.equal(llama.generate(prompt, do_sample=False, max_new_tokens=20), greedy)

    # Import what transformers itself writes (its own config.json keys, its tied weights).
    llama.save_pretrained(tmp_path / "saved")
    shutil.copyfile(tokenizer_file, tmp_path / "saved" / "tokenizer.model")
    import_hf(tmp_path / "saved", tmp_path / "back")
    back, _, cfg = load_run(tmp_path / "back")
    assert cfg.model.num_params() == model.cfg.num_params() and cfg.data.keep_tokenizer
    assert cfg.model.rope_theta == model.cfg.rope_theta
    theirs_state, ours_state = back.state_dict(), model.state_dict()
    assert theirs_state.keys() == ours_state.keys()
    assert all(torch.equal(theirs_state[name], ours_state[name]) for name in ours_state)


def test_exported_tokenizer_matches_ours(tokenizer_file, tmp_path):
    make_run(tmp_path / "run", tokenizer_file, n_heads=4)
    export_hf(tmp_path / "run", tmp_path / "hf")
    ours = Tokenizer.load(tokenizer_file)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = [path.read_text() for path in sorted(CORPUS.glob("*.py"))]
    texts += ["  two spaces", "x = 12345\n\t\ty", "naïve 漢字 🦫", "<s>not special</s>", ""]
    for text in texts:
        ids = ours.encode(text)
        assert theirs.encode(text) == ids  # no <s> added, no dummy prefix
        assert theirs.decode(ids) == text
    # The one difference: burrow encodes a literal "▁" as its bytes, transformers as a space.
    assert theirs.decode(ours.encode("a\u2581b")) == "a\u2581b"
    assert theirs.encode("a\u2581b") != ours.encode("a\u2581b")


@pytest.mark.parametrize("model_type, dummy_prefix", [("unigram", False), ("bpe", True)])
def test_exported_unigram_and_dummy_prefix_tokenizers_match(model_type, dummy_prefix, tmp_path):
    """A unigram vocabulary, and a dummy-prefix one like Llama's own (re-exported imports)."""
    import sentencepiece as spm

    from burrow.data.tokenizer import TRAINER_OPTIONS
    from burrow.interop.hf import write_hf_tokenizer

    texts = [path.read_text() for path in sorted(CORPUS.glob("*.py"))]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text[:4000] for text in texts), model_prefix=str(tmp_path / "sp"),
        vocab_size=512, model_type=model_type, minloglevel=2,
        **{**TRAINER_OPTIONS, "add_dummy_prefix": dummy_prefix})
    write_hf_tokenizer(tmp_path / "sp.model", tmp_path, model_type, max_length=64)
    ours = Tokenizer.load(tmp_path / "sp.model")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in [*texts, "  two spaces", " x", "x = 12345\n\t\ty", "naïve 漢字 🦫", ""]:
        assert theirs.encode(text) == ours.encode(text)
        assert theirs.decode(ours.encode(text)) == ours.decode(ours.encode(text))


def test_imported_run_evaluates_generates_and_fine_tunes(tokenizer_file, tmp_path, capsys):
    make_run(tmp_path / "run", tokenizer_file, n_heads=4, n_kv_heads=2)
    export_hf(tmp_path / "run", tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "tuned")]) == 0
    assert main(["train", "--out", str(tmp_path / "tuned"), "--resume", "--data", str(CORPUS),
                 "--set", "data.val_fraction=0.25", "--max-steps", "2", "--batch-tokens", "256",
                 "--micro-batch-size", "4", "--lr", "1e-3", "--warmup-steps", "1",
                 "--eval-tokens", "256", "--log-every", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step 2/2" in out
    assert (tmp_path / "tuned" / "checkpoints" / "step_2").is_dir()
    # The fine-tuning data was tokenized with the imported vocabulary, which the run keeps.
    kept = Tokenizer.load(tmp_path / "tuned" / "tokenizer.model")
    assert kept.fingerprint == Tokenizer.load(tokenizer_file).fingerprint
    assert main(["eval", str(tmp_path / "tuned"), "--json", "--max-tokens", "512",
                 "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] > 0
    assert main(["generate", str(tmp_path / "tuned"), "--prompt", "def ",
                 "--max-new-tokens", "5", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def assert_one_line_error(capsys, *words: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("burrow: error: "), err
    for word in words:
        assert word in err[0], err[0]


@pytest.mark.parametrize("fields, named", [
    (dict(block="parallel"), "model.block"),
    (dict(positions="relative"), "model.positions"),
    (dict(positions="learned"), "model.positions"),
    (dict(ffn="gelu"), "model.ffn"),
    (dict(norm="layernorm"), "model.norm"),
    (dict(bias=True), "model.bias"),
    (dict(init="fan_in", tie_embeddings=True), "model.init"),
    (dict(moe={"num_experts": 4}), "model.moe.num_experts"),
])
def test_export_refuses_what_llama_cannot_express(fields, named, tokenizer_file, tmp_path,
                                                  capsys):
    make_run(tmp_path / "run", tokenizer_file, n_heads=4, **fields)
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 2
    assert_one_line_error(capsys, named)
    assert not (tmp_path / "hf").exists()


def test_export_refuses_parts_a_llama_lacks(tokenizer_file, tmp_path, capsys):
    from burrow import blocks
    from test_blocks import GatedShift, gated_shift_params

    blocks.register("extra", "gated_shift", GatedShift, gated_shift_params)
    try:
        make_run(tmp_path / "run", tokenizer_file, n_heads=4,
                 layers=[{"extras": ["gated_shift"]}, {}])
        assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 2
    finally:
        blocks._KINDS.pop(("extra", "gated_shift"))
    assert_one_line_error(capsys, "model.layers gives block 0")
    assert not (tmp_path / "hf").exists()


def test_export_allows_training_only_fields(tokenizer_file, tmp_path):
    make_run(tmp_path / "run", tokenizer_file, n_heads=4, z_loss=1e-4, dropout=0.1,
             init="fan_in")
    assert (export_hf(tmp_path / "run", tmp_path / "hf") / "model.safetensors").is_file()


@pytest.mark.parametrize("change, named", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "mistral"}, "model_type"),
])
def test_import_refuses_what_burrow_cannot_express(change, named, tokenizer_file, tmp_path,
                                                   capsys):
    make_run(tmp_path / "run", tokenizer_file, n_heads=4)
    export_hf(tmp_path / "run", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 2
    assert_one_line_error(capsys, named)
    assert not (tmp_path / "back").exists()


def test_import_needs_a_sentencepiece_tokenizer(tokenizer_file, tmp_path, capsys):
    make_run(tmp_path / "run", tokenizer_file, n_heads=4)
    export_hf(tmp_path / "run", tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").unlink()
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 2
    assert_one_line_error(capsys, "import-hf needs a sentencepiece tokenizer.model")


def test_import_reads_sharded_bf16_weights(tokenizer_file, tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_run(tmp_path / "run", tokenizer_file, n_heads=4)
    export_hf(tmp_path / "run", tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    (tmp_path / "hf" / "model.safetensors").unlink()
    names, weight_map = sorted(weights), {}
    for shard, part in enumerate((names[::2], names[1::2])):
        file = f"model-{shard + 1:05d}-of-00002.safetensors"
        save_file({name: weights[name].to(torch.bfloat16) for name in part},
                  tmp_path / "hf" / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    import_hf(tmp_path / "hf", tmp_path / "back")
    back, _, _ = load_run(tmp_path / "back")
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor.to(torch.bfloat16).float())


def test_export_without_the_hf_extra_is_one_line(tokenizer_file, tmp_path, capsys,
                                                  monkeypatch):
    make_run(tmp_path / "run", tokenizer_file, n_heads=4)
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 2
    assert_one_line_error(capsys, "pip install 'burrow-lm[hf]'")
    assert not (tmp_path / "hf").exists()
