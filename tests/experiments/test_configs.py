"""configs/*.toml: every shipped experiment file parses; the loader reads the top-level folder."""

import os
import tomllib

import pytest

from gqa_t5x.experiments import configs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_loader_reads_the_top_level_configs_folder():
    folder = os.path.join(ROOT, "configs")
    assert configs.names() == sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".toml"))
    for name in configs.names():
        with open(os.path.join(folder, f"{name}.toml"), "rb") as f:
            assert configs.load(name) == tomllib.load(f)


def test_config_b_model():
    config = configs.model_config("config_b")
    assert (config.emb_dim, config.num_heads, config.head_dim) == (512, 8, 64)
    assert config.vocab_size == 32128
    assert (config.num_encoder_layers, config.num_decoder_layers) == (4, 4)


def test_unknown_config_names_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="config_b"):
        configs.load("no_such_experiment")
