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
