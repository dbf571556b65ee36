"""Table 1's evaluation mixtures: their members, the average as Table 1 computes it (checked
against the paper's own rows), and `gqa-eval` on a synthetic mixture."""

import math
import re

import numpy as np
import pytest
import seqio

from gqa_t5x.data import mixtures, synthetic, tasks  # noqa: F401 - registration

PAPER = ["cnn_dailymail", "arxiv", "pubmed", "media_sum", "multi_news", "wmt14_ende",
         "trivia_qa"]


def test_mixtures_are_registered_with_the_papers_tasks():
    def members(name):
        return sorted(t.name for t in seqio.get_mixture_or_task(name).tasks)

    assert members("summarization_mixture") == sorted(PAPER[:5])
    assert members("translation_mixture") == ["wmt14_ende"]
    assert members("qa_mixture") == ["trivia_qa"]
    assert members("table1_mixture") == sorted(PAPER)
    assert members("synthetic_table1_mixture") == ["synthetic_qa", "synthetic_summarize",
                                                   "synthetic_translate"]
    assert members("synthetic_qa_mixture") == ["synthetic_qa"]


def test_table1_average_reproduces_the_papers_rows():
    # Table 1's MHA-Large, MHA-XXL and GQA-8-XXL rows: the seven printed scores average to the
    # printed averages within rounding (each printed score is itself rounded to 0.1: GQA-8's
    # average of the rounded scores is 47.157, printed 47.1).
    for row, average in (([42.9, 44.6, 46.2, 35.5, 46.6, 27.7, 78.2], 46.0),
                         ([43.8, 45.6, 47.5, 36.4, 46.9, 28.4, 81.9], 47.2),
                         ([43.5, 45.4, 47.7, 36.3, 47.2, 28.4, 81.6], 47.1)):
        metric_names = ["rouge1"] * 5 + ["bleu", "f1"]
        flat = {f"{t}/{m}": v for t, m, v in zip(PAPER, metric_names, row)}
        flat.update({f"{t}/loss": 9.0 for t in PAPER})  # other metrics are not averaged
        flat["trivia_qa/em"] = 0.0
        got = mixtures.table1_average("table1_mixture", flat)
        assert got["table1_mixture/average"] == pytest.approx(average, abs=0.1)


def test_table1_scores_need_every_task():
    with pytest.raises(KeyError, match="trivia_qa/f1"):
        mixtures.table1_scores(["trivia_qa"], {"trivia_qa/em": 1.0})
    assert mixtures.table1_average("table1_mixture", {"trivia_qa/f1": 1.0}) == {}
    with pytest.raises(KeyError, match="no Table 1 metric"):
        mixtures.primary_metric("c4_span_corruption")


@pytest.mark.slow
def test_gqa_eval_on_a_synthetic_mixture_prints_each_task_and_the_average(tmp_path, capsys):
    from gqa_t5x.checkpoints import save_checkpoint
    from gqa_t5x.cli import run
    from gqa_t5x.experiments import benchmark
    from gqa_t5x.model.config import get_config
    from gqa_t5x.model.network import Transformer

    config = get_config("tiny", vocab_size=2176, emb_dim=16, num_heads=2, num_kv_heads=1,
                        head_dim=8, mlp_dim=32, num_encoder_layers=1, num_decoder_layers=1)
    params = benchmark.random_params(Transformer(config))
    save_checkpoint(str(tmp_path / "ckpt"), params, config, step=3)
    run.eval_main(["--gin_file=runs/eval.gin", f"--gin.MODEL_DIR='{tmp_path / 'eval'}'",
                   f"--gin.CHECKPOINT_PATH='{tmp_path / 'ckpt'}'",
                   "--gin.MIXTURE_OR_TASK_NAME='synthetic_table1_mixture'",
                   "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 8}",
                   "--gin.EVAL_BATCH_SIZE=2", "--gin.EVAL_NUM_EXAMPLES=2"])
    out = capsys.readouterr().out
    values = {m.group(1): float(m.group(2))
              for m in re.finditer(r"^(\S+): (-?[\d.]+)$", out, re.MULTILINE)}
    per_task = [values["synthetic_summarize/rouge1"], values["synthetic_translate/bleu"],
                values["synthetic_qa/f1"]]
    assert all(math.isfinite(v) for v in per_task)
    assert values["synthetic_table1_mixture/average"] == pytest.approx(np.mean(per_task),
                                                                       abs=1e-3)
    assert "Table 1 (synthetic_table1_mixture): synthetic_summarize rouge1" in out
