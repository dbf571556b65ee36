"""Every gin file parses; the macros reach the library functions; t5x-style flags."""

import glob
import os

import gin
import pytest
from gin import config_parser

from gqa_t5x.cli import run as run_cli
from gqa_t5x.training import (
    evaluate,  # noqa: F401 - registers configurables
    models,
    optim,
)

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "gqa_t5x", "gin")
REQUIRED = ["MODEL_DIR='/tmp/m'", "INITIAL_CHECKPOINT_PATH='/tmp/c'",
            "MIXTURE_OR_TASK_NAME='synthetic_qa'", "INFER_OUTPUT_PATH='/tmp/p.jsonl'"]


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _q(name):
    """A bound parameter's value, with macros resolved."""
    value = gin.query_parameter(name)
    while isinstance(value, gin.config.ConfigurableReference) and \
            value.configurable.wrapped is gin.config.macro:
        value = gin.query_parameter("%" + value.scoped_selector.split("/")[0])
    return value


def _ours():
    files = glob.glob(os.path.join(GIN_DIR, "**", "*.gin"), recursive=True)
    return sorted(os.path.relpath(f, GIN_DIR) for f in files if "/t5x/" not in f)


def test_gin_dir_has_every_preset_attention_and_run():
    names = set(_ours())
    for p in ("t5_1_1_small", "t5_1_1_base", "t5_1_1_large", "t5_1_1_xl", "t5_1_1_xxl", "tiny"):
        assert f"models/{p}.gin" in names
    for a in ("mha", "mqa", "gqa8"):
        assert f"attention/{a}.gin" in names
    for r in ("pretrain", "uptrain", "finetune", "eval", "infer"):
        assert f"runs/{r}.gin" in names


@pytest.mark.parametrize("name", _ours())
def test_each_gin_file_parses(name):
    run_cli.parse_gin([name], bindings=REQUIRED)


class _Syntax(config_parser.ParserDelegate):
    """Accepts every reference: checks syntax without importing or resolving anything."""

    def configurable_reference(self, scoped_name, evaluate):
        return ("@", scoped_name, evaluate)

    def macro(self, name):
        return ("%", name)


@pytest.mark.parametrize("name", sorted(glob.glob(os.path.join(GIN_DIR, "t5x", "*.gin"))))
def test_t5x_fragments_are_valid_gin_syntax(name):
    # t5x is not installed, so its imports cannot run; the parser still checks every statement.
    with open(name) as f:
        statements = list(config_parser.ConfigParser(f, _Syntax()))
    assert statements
    selectors = {getattr(s, "selector", "") for s in statements}
    if name.endswith("model.gin"):
        assert "network.Transformer" in selectors
        assert "models.EncoderDecoderModel" in selectors


@pytest.mark.parametrize("attention,kv", [("mha", 16), ("gqa8", 8), ("mqa", 1)])
def test_model_and_attention_files_set_the_config(attention, kv):
    run_cli.parse_gin(["models/t5_1_1_large.gin", f"attention/{attention}.gin"])
    config = models.model_config()
    assert (config.emb_dim, config.num_heads, config.num_kv_heads) == (1024, 16, kv)
    assert config.grouped == ("decoder_self", "cross")
    assert models.build_model().config == config


def test_num_kv_heads_macro_overrides():
    run_cli.parse_gin(["models/t5_1_1_xxl.gin", "attention/gqa8.gin"],
                      bindings=["NUM_KV_HEADS=4"])
    assert models.model_config().num_kv_heads == 4


def test_mha_gin_follows_an_overridden_head_count():
    run_cli.parse_gin(["models/tiny.gin", "attention/mha.gin"],
                      bindings=["gqa_t5x.models.model_config.num_heads=8"])
    config = models.model_config()
    assert (config.num_heads, config.num_kv_heads) == (8, 8)


def test_pretrain_recipe_bindings():
    run_cli.parse_gin(["models/tiny.gin", "attention/mha.gin", "runs/pretrain.gin"],
                      bindings=["MODEL_DIR='/tmp/m'", "TRAIN_STEPS=77", "BATCH_SIZE=16"])
    q = _q
    assert q("gqa_t5x.train.train.model_dir") == "/tmp/m"
    assert q("gqa_t5x.train.train.train_steps") == 77
    assert q("gqa_t5x.train.train.batch_size") == 16
    assert q("gqa_t5x.train.train.task_feature_lengths") == {"inputs": 512, "targets": 114}
    schedule = optim.rsqrt_schedule()
    assert float(schedule(0)) == pytest.approx(0.01)
    assert float(schedule(40_000)) == pytest.approx(0.005)
    assert models.build_model().config.dropout_rate == 0.0


def test_uptrain_includes_pretrain_and_uses_fraction():
    run_cli.parse_gin(["models/tiny.gin", "attention/mqa.gin", "runs/uptrain.gin"],
                      bindings=REQUIRED[:2])
    q = _q
    assert q("gqa_t5x.train.train.uptrain_fraction") == 0.05
    assert q("gqa_t5x.train.train.train_steps") is None
    assert q("gqa_t5x.train.train.initial_step_mode") == "continue"
    assert q("gqa_t5x.optim.rsqrt_schedule.warmup_steps") == 10_000


def test_finetune_recipe():
    run_cli.parse_gin(["models/tiny.gin", "attention/gqa8.gin", "runs/finetune.gin"],
                      bindings=REQUIRED + ["NUM_KV_HEADS=2"])
    assert float(optim.constant_schedule()(5)) == pytest.approx(1e-3)
    assert models.build_model().config.dropout_rate == pytest.approx(0.1)
    settings = evaluate.EvalSettings()
    assert settings.every_steps == 1000 and settings.split == "validation"


def test_flags_become_gin_bindings():
    args = run_cli.parse_flags(["--gin_file=a.gin", "--gin_file", "b.gin",
                                "--gin.MODEL_DIR='/x'", "--gin.TRAIN_STEPS=5",
                                "--gin_search_paths=/p,/q", "--gin_bindings=SEED=3"], "test")
    assert args.gin_file == ["a.gin", "b.gin"]
    assert args.gin_bindings == ["SEED=3", "MODEL_DIR='/x'", "TRAIN_STEPS=5"]
    assert args.gin_search_paths == ["/p,/q"]


def test_flag_errors():
    with pytest.raises(SystemExit):
        run_cli.parse_flags(["--gin_file=a.gin", "--bogus=1"], "test")
    with pytest.raises(SystemExit):
        run_cli.parse_flags(["--gin.MODEL_DIR"], "test")


def test_missing_gin_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="runs/pretrian.gin"):
        run_cli.parse_gin(["runs/pretrian.gin"], search_paths=[str(tmp_path)])


def test_search_path_finds_user_files(tmp_path):
    (tmp_path / "mine.gin").write_text("import gqa_t5x.models\n"
                                       "gqa_t5x.models.model_config.preset = 't5_1_1_base'\n")
    run_cli.parse_gin(["mine.gin"], search_paths=[str(tmp_path)])
    assert models.model_config().emb_dim == 768


def test_kernels_bind_through_gin():
    run_cli.parse_gin(["models/tiny.gin"], bindings=["gqa_t5x.models.model_config.kernels='xla'"])
    assert models.model_config().kernels == "xla"
    gin.clear_config()
    run_cli.parse_gin(["models/tiny.gin"], bindings=["gqa_t5x.models.model_config.kernels='tpu'"])
    with pytest.raises(ValueError, match="kernels='tpu' is not one of"):
        models.model_config()
