"""Configs: validation names the field and the fix; YAML and --set round trips."""

import dataclasses

import pytest

from burrow import ModelConfig, RunConfig, TrainConfig, UserError
from burrow.config import override_dict


def overridden(items: list[str]) -> RunConfig:
    """The default config with the CLI's --set overrides applied, as the CLI applies them."""
    return RunConfig.from_dict(override_dict(RunConfig().to_dict(), items))


@pytest.mark.parametrize("fields, words", [
    (dict(d_model=100, n_heads=3), "model.d_model=100 is not divisible by model.n_heads=3"),
    (dict(n_heads=8, n_kv_heads=3), "model.n_kv_heads=3"),
    (dict(ffn="relu"), "model.ffn='relu' is not one of swiglu, gelu"),
    (dict(positions="alibi"), "model.positions"),
    (dict(norm="batchnorm"), "model.norm"),
    (dict(block="sandwich"), "model.block"),
    (dict(d_model=96, n_heads=32), "even model.head_dim"),
    (dict(dropout=1.0), "model.dropout"),
    (dict(z_loss=-1), "model.z_loss"),
    (dict(vocab_size=0), "model.vocab_size must be positive"),
])
def test_invalid_model_configs_name_the_field(fields, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(".", r"\.")):
        ModelConfig(**fields)


def test_defaults_resolve():
    cfg = ModelConfig(d_model=256, n_heads=8)
    assert (cfg.kv_heads, cfg.head_size, cfg.ffn_size) == (8, 32, 688)  # 8/3 * 256 -> 688
    assert ModelConfig(d_model=256, ffn="gelu").ffn_size == 1024


def test_train_config_validation():
    with pytest.raises(UserError, match=r"train\.schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(UserError, match=r"train\.lr must be positive"):
        TrainConfig(lr=0)
    cfg = RunConfig(model=ModelConfig(max_seq_len=128), train=TrainConfig(seq_len=256))
    with pytest.raises(UserError, match=r"exceeds model\.max_seq_len"):
        cfg.validate()


def test_yaml_round_trip(tmp_path):
    cfg = RunConfig(model=ModelConfig(n_kv_heads=2, positions="relative", z_loss=1e-4),
                    train=TrainConfig(lr=1e-3, compile=True), preset="custom")
    cfg.save(tmp_path / "config.yaml")
    assert RunConfig.load(tmp_path / "config.yaml") == cfg


def test_overrides_are_typed_and_checked():
    cfg = overridden(["model.d_model=384", "model.n_heads=6",
                                        "train.lr=2e-4", "train.compile=true",
                                        "model.n_kv_heads=null"])
    assert cfg.model.d_model == 384 and cfg.train.lr == 2e-4 and cfg.train.compile is True
    assert cfg.model.n_kv_heads is None
    with pytest.raises(UserError, match=r"did you mean model\.d_model"):
        overridden(["model.d_modle=3"])
    with pytest.raises(UserError, match="not a valid int"):
        overridden(["model.n_layers=2.5"])
    with pytest.raises(UserError, match=r"SECTION\.FIELD=VALUE"):
        overridden(["d_model=3"])


def test_bad_yaml_files(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: [1, 2")
    with pytest.raises(UserError, match="not valid YAML"):
        RunConfig.load(path)
    path.write_text("modle: {}")
    with pytest.raises(UserError, match="unknown config section"):
        RunConfig.load(path)
    with pytest.raises(UserError, match="does not exist"):
        RunConfig.load(tmp_path / "missing.yaml")


def test_every_field_is_documented():
    from burrow.config import DataConfig, field_docs

    for kind in (ModelConfig, TrainConfig, DataConfig):
        docs = field_docs(kind)
        assert set(docs) == {field.name for field in dataclasses.fields(kind)}, kind
        assert all(len(text) > 10 for text in docs.values())


def test_train_flags_and_set_overrides_are_validated_together(tmp_path):
    """A flag that is valid only with a --set beside it (and the other way round) is accepted."""
    from burrow.cli import build_parser
    from burrow.commands import run_config_from_args

    args = build_parser().parse_args(["train", "--out", str(tmp_path / "run"), "--seq-len", "512",
                                      "--set", "model.max_seq_len=512", "--expert-parallel", "2",
                                      "--set", "model.moe.num_experts=4"])
    cfg, _ = run_config_from_args(args)
    assert (cfg.train.seq_len, cfg.model.max_seq_len) == (512, 512)
    assert (cfg.train.expert_parallel, cfg.model.moe.num_experts) == (2, 4)
