"""benchmarks/digits_finetune.py --small: a finetune onto new classes with `--init_from` and `--class_map` (pretrain
on the digits 0-6, finetune on 0, 3, 5 and the new 7, 8, 9), against the same training from scratch."""
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support import REPO_ROOT
from util import run_state
from util.checkpoint import load_checkpoint
from util.optim import EMA
from util.pretrained import build_model

MAPPED_ROWS = {0: 0, 1: 3, 2: 5}  # finetune classes "0", "3", "5" <- pretrained classes 0, 3, 5


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    """The --small benchmark's output folder and its printed table."""
    out = tmp_path_factory.mktemp("finetune_out")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run([sys.executable, "benchmarks/digits_finetune.py", "--small", "--out", str(out)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_both_runs_are_scored_with_finite_scores_for_every_class_group(benchmark):
    out, stdout = benchmark
    report = json.loads((out / "digits_finetune.json").read_text())
    assert report["finetune_classes"] == ["0", "3", "5", "7", "8", "9"]
    assert [run["name"] for run in report["runs"]] == ["finetuned", "from scratch"]
    assert report["runs"][0]["optimizer_steps"] == report["runs"][1]["optimizer_steps"] > 0
    for run in report["runs"]:
        assert set(run["scores"]) == {"all", "mapped", "new"}
        for scores in run["scores"].values():
            assert 0.0 <= scores["class_consistency"] <= 1.0
            assert math.isfinite(scores["frechet_distance"]) and scores["frechet_distance"] >= 0.0
        assert set(run["scores"]["mapped"]["per_class_accuracy"]) == {"0", "3", "5"}  # scored by digit
        assert set(run["scores"]["new"]["per_class_accuracy"]) == {"7", "8", "9"}
    assert "| finetuned |" in stdout and "| from scratch |" in stdout


def test_the_finetune_starts_from_the_pretrained_weights_with_the_mapped_class_rows(benchmark):
    out, _ = benchmark
    report = json.loads((out / "digits_finetune.json").read_text())
    log = (Path(report["runs"][0]["dir"]) / "log.txt").read_text()
    pretrained = Path(report["pretrain"]["dir"]) / "checkpoint-last.pth"
    assert ("adapted: class_emb.weight: checkpoint [7, 64] -> model [6, 64], 3 row(s) copied from pretrained "
            "classes (0<-0, 1<-3, 2<-5), 3 initialised as in training") in log
    assert f"initialised from {pretrained} (model, epoch 0); optimizer and epoch start fresh" in log


def test_right_after_initialisation_the_mapped_rows_are_the_pretrained_ones(benchmark, tmp_path):
    out, _ = benchmark
    report = json.loads((out / "digits_finetune.json").read_text())
    path = str(Path(report["pretrain"]["dir"]) / "checkpoint-last.pth")
    checkpoint = load_checkpoint(path)
    torch.manual_seed(0)
    model = build_model({**checkpoint["args"], "class_num": 6})
    ema = EMA(model)
    fresh = model.class_emb.weight.detach().clone()  # [6, D]
    run = run_state.RunSettings(output_dir=str(tmp_path), init_from=path, class_rows=MAPPED_ROWS)
    restored = run_state.restore(run, model, ema, None, None, logging.getLogger("test_digits_finetune"))

    assert restored.start_epoch == 0 and restored.path == path
    mine, theirs = list(MAPPED_ROWS), list(MAPPED_ROWS.values())
    for weights, source in ((model, "model"), (ema.module, "model_ema")):
        rows = weights.class_emb.weight.detach()  # [6, D]
        assert torch.equal(rows[mine], checkpoint[source]["class_emb.weight"][theirs])
        assert torch.equal(rows[3:], fresh[3:])  # the new digits 7, 8, 9: as the model initialised them
        assert torch.equal(weights.fake_latent, checkpoint[source]["fake_latent"])  # unconditional embedding kept
