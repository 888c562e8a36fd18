from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, flatten, load_config, to_yaml


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "train:\n  max_steps: 7\nmodel:\n  n_layer: 2\n  cutoffs: [10, 20]\n")
    cfg = load_config(p, ["train.max_steps=9", "model.d_model=64"])
    assert isinstance(cfg, Config)
    assert cfg.train.max_steps == 9 and cfg.model.n_layer == 2 and cfg.model.d_model == 64
    assert cfg.model.cutoffs == [10, 20]
    assert flatten(cfg)["model.d_model"] == 64
    assert "max_steps: 9" in to_yaml(cfg)


def test_unknown_key_named(tmp_path):
    p = write(tmp_path, "train:\n  max_stepz: 7\n")
    with pytest.raises(ConfigError, match="train.max_stepz"):
        load_config(p)
    with pytest.raises(ConfigError, match="model.nope"):
        load_config(None, ["model.nope=1"])


def test_wrong_type_named(tmp_path):
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(None, ["train.max_steps=abc"])
    with pytest.raises(ConfigError, match="tokenizer.kind"):
        load_config(None, ["tokenizer.kind=wordpiece"])


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.max_steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("override, named", [
    ("train.n_streams=0", r"train.n_streams=0 is out of range: it must be >= 1"),
    ("train.micro_batches=0", r"train.micro_batches=0 is out of range: it must be >= 1"),
    ("train.lr=-1", r"train.lr=-1.0 is out of range: it must be > 0.0"),
    ("train.zero_stage=4", r"train.zero_stage=4 is out of range: it must be in \[0, 3\]"),
    ("model.tgt_len=-4", r"model.tgt_len=-4 is out of range: it must be >= 1"),
    ("model.dropout=1.5", r"model.dropout=1.5 is out of range: it must be in \[0, 1\)"),
    ("model.cutoffs=[20,10]", r"model.cutoffs=\[20, 10\] must increase strictly"),
    ("eval.mem_len=-5", r"eval.mem_len=-5 is out of range: it must be >= -1 \(-1: keep the training attention span\)"),
    ("data.workers=-3", r"data.workers=-3 is out of range: it must be >= 0 \(0: every CPU\)"),
    ("data.lm1b_valid_shard=0", r"data.lm1b_valid_shard=0 is out of range: it must be in \[1, 49\]"),
    ("generate.top_p=0", r"generate.top_p=0.0 is out of range: it must be in \(0, 1\]"),
    ("eval.mem_lens=[0,-2]", r"eval.mem_lens\[1\]=-2 is out of range: every entry must be >= 0"),
])
def test_every_value_is_checked_at_load_naming_key_value_and_range(override, named):
    with pytest.raises(ConfigError, match=named):
        load_config(None, [override])


def test_a_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 0.1\n  max_steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+ column \d+: not valid YAML"):
        load_config(bad)


def test_paper_configs_load_and_pass_the_range_checks():
    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        load_config(path)
