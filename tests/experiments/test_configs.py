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


def test_config_b_drives_the_benchmark_cli_defaults():
    from gqa_t5x.cli import bench as bench_cli  # noqa: PLC0415 - only this test needs it

    args = bench_cli.build_parser().parse_args([])
    assert (args.batch_size, args.input_length, args.output_length) == (8, 1024, 128)
    config = bench_cli.config_from_args(args)
    assert (config.emb_dim, config.num_heads, config.num_kv_heads, config.mlp_dim,
            config.num_decoder_layers, config.vocab_size) == (512, 8, 8, 1024, 4, 32128)


def test_sanity_model_and_task_steps():
    from gqa_t5x.experiments import sanity  # noqa: PLC0415 - imports seqio

    size = sanity.ModelSize.from_config()
    assert (size.emb_dim, size.num_heads, size.head_dim, size.mlp_dim, size.num_layers) == (
        128, 8, 16, 256, 2)
    assert sanity.ModelSize.from_config(num_kv_heads=2, emb_dim=None).num_kv_heads == 2
    assert sanity.task_settings("qa") == {"steps": 800, "batch_size": 32, "learning_rate": 0.01}
    with pytest.raises(ValueError, match=r"no \[tasks.q\].*qa"):
        sanity.task_settings("q")


def test_tiny_pipeline_model_is_the_sanity_model_on_the_suite_vocabulary():
    from gqa_t5x.experiments import sanity  # noqa: PLC0415 - imports seqio

    pipeline = configs.model_config("tiny_pipeline", num_kv_heads=8)  # attention/*.gin sets it
    sanity_model = sanity.ModelSize.from_config().build(2100).config  # the suite's 2100 ids
    fields = configs.load("tiny_pipeline")["model"]
    assert {k: getattr(sanity_model, k) for k in fields} == {
        k: getattr(pipeline, k) for k in fields}
    assert pipeline.vocab_size == 2176  # 2100 padded to a multiple of 128


def test_gin_bindings_and_the_shell_helper(capsys):
    import importlib.util  # noqa: PLC0415

    assert configs.gin_bindings("config_b")[:2] == [
        "gqa_t5x.models.model_config.vocab_size = 32128",
        "gqa_t5x.models.model_config.emb_dim = 512"]
    spec = importlib.util.spec_from_file_location(
        "config_flags", os.path.join(ROOT, "scripts", "config_flags.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["tiny_pipeline", "--table", "steps"]) == 0
    assert capsys.readouterr().out.split() == [
        "PRETRAIN_STEPS=400", "UPTRAIN_FRACTION=0.1", "FINETUNE_STEPS=1200"]
    assert script.main(["tiny_pipeline"]) == 0
    assert "--gin.gqa_t5x.models.model_config.emb_dim=128" in capsys.readouterr().out.split()
    assert script.main(["tiny_pipeline", "--table", "nope"]) == 2
    assert "no [nope] table" in capsys.readouterr().err
