"""Hugging Face interop: a run directory to a Llama directory that transformers loads, and back.

A burrow model with rotary positions, RMSNorm, SwiGLU, serial blocks and no biases is a Llama
(Touvron et al. 2023) with other parameter names. Both use the rotate-half layout of RoPE,
pairing dimension i with i + D/2 at inv_freq_i = theta^(-2i/D), so q_proj and k_proj are copied
as they are: the permutation that Meta's original interleaved checkpoints need is not wanted.
The logits agree to float32 round-off (tests/test_hf.py).

Neither direction imports transformers: config.json is plain JSON in the keys every
transformers version reads, and the export's tokenizer.json is built with `tokenizers` (which
the `hf` extra installs), so that transformers loads it without protobuf.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from burrow.blocks import LayerSpec
from burrow.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from burrow.data import Tokenizer
from burrow.data.tokenizer import META_SYMBOL, MODEL_FILE
from burrow.errors import UserError
from burrow.files import new_file_mode
from burrow.model import Transformer
from burrow.run import check_run_dir, load_run
from burrow.train.checkpoint import model_state, save_checkpoint

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def hf_names(cfg: ModelConfig) -> dict[str, str]:
    """burrow parameter name -> Llama parameter name, for every tensor of Transformer(cfg)."""
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        names["head.weight"] = "lm_head.weight"
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        names[ours + "attn_norm.weight"] = theirs + "input_layernorm.weight"
        names[ours + "mlp_norm.weight"] = theirs + "post_attention_layernorm.weight"
        for projection in ("q", "k", "v", "o"):
            names[f"{ours}attn.{projection}_proj.weight"] = (
                f"{theirs}self_attn.{projection}_proj.weight")
        for projection in ("gate", "up", "down"):
            names[f"{ours}mlp.{projection}_proj.weight"] = f"{theirs}mlp.{projection}_proj.weight"
    return names


# -- export --------------------------------------------------------------------------------------

def check_exportable(cfg: ModelConfig) -> None:
    """Raise UserError naming the first field whose choice Llama cannot express.

    Training-only fields pass: z_loss changes the loss, not the logits; dropout is off at
    inference; init only sets the starting point (except for the logit scale below).
    """
    unusual = [layer for layer in range(cfg.n_layers)
               if cfg.layer_spec(layer) != LayerSpec(mixer="attention", ffn="mlp")]
    refusals = [
        (bool(unusual) and not cfg.moe.enabled, f"model.layers gives block "
         f"{unusual[0] if unusual else ''} parts a Llama lacks; only attention and a dense MLP "
         "export"),
        (cfg.moe.enabled, f"model.moe.num_experts={cfg.moe.num_experts}: a Llama has no "
         "experts (burrow does not write Mixtral); distil the model into a dense one with "
         "`burrow distill` and export that"),
        (cfg.block == "parallel", "model.block='parallel' (PaLM's attention and MLP side by "
         "side) has no Llama equivalent: Llama's blocks are serial"),
        (cfg.positions != "rope", f"model.positions={cfg.positions!r} has no Llama equivalent: "
         "Llama uses rotary positions (rope)"),
        (cfg.ffn != "swiglu", f"model.ffn={cfg.ffn!r} has no Llama equivalent: Llama's MLP is "
         "SwiGLU"),
        (cfg.norm != "rmsnorm", f"model.norm={cfg.norm!r} has no Llama equivalent: Llama uses "
         "RMSNorm"),
        (cfg.bias, "model.bias=true: the Llama export carries no biases (train with "
         "model.bias=false)"),
        (cfg.scaled_tied_logits, f"model.init={cfg.init!r} with model.tie_embeddings=true "
         "scales the logits by d_model^-1/2 (PaLM section 2), which a Llama config cannot "
         "express"),
    ]
    for refused, reason in refusals:
        if refused:
            raise UserError(f"cannot export to Llama: {reason}")


def llama_config(cfg: ModelConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """config.json of the Llama equivalent of cfg (rope_theta at top level: every version)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "torch_dtype": "float32",
        "use_cache": True,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": None,
    }


def export_hf(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the latest checkpoint of a run as a Llama directory; return out_dir.

    out_dir gets config.json, model.safetensors (float32), generation_config.json and the
    tokenizer (tokenizer.model, tokenizer.json, tokenizer_config.json). It is written whole
    or not at all.
    """
    run_dir, out_dir = check_run_dir(Path(run_dir)), Path(out_dir)
    cfg = RunConfig.load(run_dir / "config.yaml")
    check_exportable(cfg.model)
    _check_free(out_dir)
    model, tokenizer, cfg = load_run(run_dir)
    weights = model_state(model)
    names = hf_names(cfg.model)
    if set(weights) != set(names):
        raise UserError(f"cannot export {run_dir}: its weights are not those of a Llama "
                        f"({', '.join(sorted(set(weights) ^ set(names))[:3])})")

    def write(staging: Path) -> None:
        save_file({names[name]: tensor for name, tensor in weights.items()}, staging / WEIGHTS,
                  metadata={"format": "pt"})
        os.chmod(staging / WEIGHTS, new_file_mode())  # safetensors writes it 0600
        _write_json(staging / "config.json", llama_config(cfg.model, tokenizer))
        # burrow's `generate` pads finished rows with </s>; so does transformers' with this.
        _write_json(staging / "generation_config.json", {
            "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
            "pad_token_id": tokenizer.eos_id})
        write_hf_tokenizer(run_dir / MODEL_FILE, staging, cfg.data.tokenizer_type,
                           cfg.model.max_seq_len)

    _write_whole(out_dir, write)
    return out_dir


def write_hf_tokenizer(model_file: Path, out_dir: Path, model_type: str,
                       max_length: int) -> None:
    """tokenizer.model, plus a tokenizer.json and tokenizer_config.json that reproduce it.

    tokenizer.json spells out sentencepiece's pipeline: spaces become "▁" (after a "▁" put in
    front of the text when the model was trained with a dummy prefix, as Llama's was), then BPE
    (or unigram) over the whole text with byte fallback; nothing is added, no <s> or </s>.
    tokenizer_config.json names PreTrainedTokenizerFast, which every transformers version loads
    from tokenizer.json as it is, without protobuf. (For LlamaTokenizer, transformers 4 converts
    tokenizer.model again, with protobuf, and transformers 5 rebuilds its own pipeline, which
    for a dummy-prefix vocabulary differs on text that starts with a space.)
    The ids then equal burrow's on any text but one with a literal "▁", which burrow
    encodes as its three UTF-8 bytes and transformers (like plain sentencepiece) as a space,
    and, for a unigram model only, one with a literal "<s>", "</s>" or "<unk>", which
    transformers' unigram matches as the control piece. Decoding burrow's ids gives burrow's
    text.
    """
    try:
        from tokenizers import AddedToken, decoders, normalizers
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.models import BPE, Unigram
    except ImportError:
        raise UserError("export-hf needs the hf extra: pip install 'burrow-lm[hf]'") from None
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]

    def named(i: int) -> str | None:  # sentencepiece gives -1 for a token it was trained without
        return pieces[i] if i >= 0 else None

    if model_type == "unigram":
        model = Unigram([(pieces[i], sp.get_score(i)) for i in range(len(pieces))],
                        unk_id=sp.unk_id(), byte_fallback=True)
    else:
        vocab = {text: i for i, text in enumerate(pieces)}
        model = BPE(vocab=vocab, merges=_bpe_merges(sp, vocab), unk_token=named(sp.unk_id()),
                    fuse_unk=True, byte_fallback=True)
    dummy_prefix = sp.encode("a", out_type=str)[0].startswith(META_SYMBOL)
    backend = HFTokenizer(model)
    spaces = [normalizers.Replace(" ", META_SYMBOL)]
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend(META_SYMBOL), *spaces] if dummy_prefix else spaces)
    steps = [decoders.Replace(META_SYMBOL, " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(
        [*steps, decoders.Strip(content=" ", left=1)] if dummy_prefix else steps)
    backend.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False)
                                for i in range(len(pieces)) if sp.is_control(i)
                                or sp.is_unknown(i)])
    backend.save(str(out_dir / "tokenizer.json"))
    shutil.copyfile(model_file, out_dir / MODEL_FILE)
    _write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": named(sp.bos_id()), "eos_token": named(sp.eos_id()),
        "unk_token": named(sp.unk_id()), "pad_token": None,
        "add_bos_token": False, "add_eos_token": False,  # burrow adds neither
        # "<s>" typed in the text is text, as in burrow, not the control token.
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    })


def _bpe_merges(sp: spm.SentencePieceProcessor, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The merges that make each piece, ranked like sentencepiece's scores (piece id order)."""
    merges = []
    for piece, i in vocab.items():
        if sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((i, vocab[left], left, right))
    return [(left, right) for _, _, left, right in sorted(merges)]


# -- import --------------------------------------------------------------------------------------

def model_config_from_llama(raw: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a Llama config.json, or UserError naming the field burrow lacks."""
    if raw.get("model_type") != "llama":
        raise UserError(f"config.json: model_type={raw.get('model_type')!r} is not supported; "
                        "import-hf reads Llama models (model_type 'llama')")
    if raw.get("hidden_act", "silu") != "silu":
        raise UserError(f"config.json: hidden_act={raw['hidden_act']!r} is not supported; "
                        "burrow's SwiGLU uses silu")
    for flag in ("attention_bias", "mlp_bias"):
        if raw.get(flag):
            raise UserError(f"config.json: {flag}=true is not supported; burrow imports Llama "
                            "models without biases")
    for key in ("rope_scaling", "rope_parameters"):  # transformers 4 and 5 spell it so
        rope = raw.get(key) or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise UserError(f"config.json: {key} asks for {kind!r} RoPE scaling; burrow has "
                            "plain RoPE only")
    rope_parameters = raw.get("rope_parameters") or {}  # transformers 5 keeps theta here
    try:
        heads, width = int(raw["num_attention_heads"]), int(raw["hidden_size"])
        head_dim = int(raw.get("head_dim") or width // heads)
        return ModelConfig(
            vocab_size=int(raw["vocab_size"]), d_model=width,
            n_layers=int(raw["num_hidden_layers"]), n_heads=heads,
            n_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=None if head_dim * heads == width else head_dim,
            d_ff=int(raw["intermediate_size"]), ffn="swiglu", norm="rmsnorm", positions="rope",
            block="serial", tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bias=False, max_seq_len=int(raw.get("max_position_embeddings", 2048)),
            rope_theta=float(rope_parameters.get("rope_theta", raw.get("rope_theta", 10000.0))),
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)),  # LlamaConfig's defaults
        )
    except KeyError as error:
        raise UserError(f"config.json has no {error.args[0]}; is it a Llama config?") from None


def import_hf(hf_dir: str | Path, out_run_dir: str | Path) -> Path:
    """Make a run directory from a local Llama directory; return it.

    Reads config.json, model.safetensors (or the shards its index names) and the
    sentencepiece tokenizer.model, and writes config.yaml, tokenizer.model and
    checkpoints/step_0/ (float32 weights, an empty optimiser state), whole or not at all.
    `burrow eval`, `generate` and `train --resume` take the result; its config sets
    data.keep_tokenizer, so fine-tuning data is tokenized with the imported vocabulary.
    """
    hf_dir, out_run_dir = Path(hf_dir), Path(out_run_dir)
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise UserError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    try:
        model_cfg = model_config_from_llama(json.loads(config_file.read_text()))
    except json.JSONDecodeError as error:
        raise UserError(f"{config_file} is not valid JSON: {error}") from None
    if not (hf_dir / MODEL_FILE).is_file():
        raise UserError(f"import-hf needs a sentencepiece tokenizer.model; {hf_dir} has none")
    try:
        tokenizer = Tokenizer.load(hf_dir / MODEL_FILE)
    except RuntimeError:
        raise UserError(f"{hf_dir / MODEL_FILE} is not a sentencepiece model") from None
    if tokenizer.vocab_size != model_cfg.vocab_size:
        raise UserError(f"config.json: vocab_size={model_cfg.vocab_size} but tokenizer.model "
                        f"has {tokenizer.vocab_size} pieces; burrow needs them equal")
    _check_free(out_run_dir)
    weights = _llama_weights(hf_dir, model_cfg)
    with torch.device("meta"):
        model = Transformer(model_cfg)
    for name, expected in model.state_dict().items():
        if weights[name].shape != expected.shape:
            raise UserError(f"{hf_names(model_cfg)[name]} in {hf_dir} has shape "
                            f"{tuple(weights[name].shape)}; config.json implies "
                            f"{tuple(expected.shape)}")
    model.load_state_dict(weights, strict=True, assign=True)
    cfg = RunConfig(model=model_cfg, data=DataConfig(keep_tokenizer=True),
                    train=TrainConfig(seq_len=min(TrainConfig.seq_len, model_cfg.max_seq_len)))

    def write(staging: Path) -> None:
        cfg.save(staging / "config.yaml")
        tokenizer.save(staging)
        # Step 0, no optimiser, loader or RNG state: `train --resume` starts those fresh.
        save_checkpoint(staging, 0, model, None, {"step": 0})

    _write_whole(out_run_dir, write)
    return out_run_dir


def _llama_weights(hf_dir: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The safetensors weights of hf_dir under burrow's names, as float32."""
    index = hf_dir / WEIGHTS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({hf_dir / name for name in weight_map.values()})
    elif (hf_dir / WEIGHTS).is_file():
        files = [hf_dir / WEIGHTS]
    else:
        raise UserError(f"{hf_dir} has no {WEIGHTS} (or {WEIGHTS_INDEX}); import-hf reads "
                        "safetensors weights only")
    theirs: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            theirs.update(load_file(file))
        except (SafetensorError, OSError) as error:
            raise UserError(f"cannot read {file}: {error}") from None
    for name in list(theirs):
        # Old checkpoints store the rotary frequencies; tied ones sometimes a copy of the head.
        if name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings
                                                    and name == "lm_head.weight"):
            del theirs[name]
    names = hf_names(cfg)
    missing = sorted(set(names.values()) - set(theirs))
    unexpected = sorted(set(theirs) - set(names.values()))
    if missing or unexpected:
        problem = (f"lacks {', '.join(missing[:3])}" if missing
                   else f"has tensors a Llama of this config lacks: {', '.join(unexpected[:3])}")
        raise UserError(f"the weights in {hf_dir} do not fit its config.json: it {problem}")
    return {ours: theirs[hf].to(torch.float32) for ours, hf in names.items()}


# -- files ---------------------------------------------------------------------------------------

def _check_free(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; choose another output directory")


def _write_whole(out: Path, write) -> None:
    """Run write(staging) in a sibling directory, then rename it to out (absent or empty)."""
    staging = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        write(staging)
        if out.is_dir():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
