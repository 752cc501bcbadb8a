"""bench/reeval.py: the metrics on the tokens past a run's own follow exactly from two evaluations, and a
checkpoint is scored only if it is the run's."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

from zsaq_dist.config import validate
from zsaq_dist.eval.metrics import evaluate

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def reeval():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_reeval", BENCH / "reeval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_held_out_metrics_equal_scoring_the_later_tokens_alone(reeval):
    model, teacher = make_tiny_llama(seed=1, hidden=32), make_tiny_llama(seed=2, hidden=32)
    ids = torch.randint(0, 128, (61,), generator=torch.Generator().manual_seed(0))
    long = evaluate(model, ids, seq_len=8, reference=teacher, progress=False)
    short = evaluate(model, ids[:24], seq_len=8, reference=teacher, progress=False)
    alone = evaluate(model, ids[24:], seq_len=8, reference=teacher, progress=False)
    after = reeval.held_out(long, short)
    assert after["tokens"] == alone["tokens"] == long["tokens"] - short["tokens"]
    for k in ("ppl", "nll", "kl", "top1"):
        assert after[k] == pytest.approx(alone[k], rel=1e-6), k
    assert after["ppl"] != pytest.approx(long["ppl"], rel=1e-3)  # the later tokens score differently
    with pytest.raises(SystemExit, match="--eval-tokens must exceed"):
        reeval.held_out(short, long)


@pytest.mark.parametrize("tokens", [16, 17, 18, 24, 61])
def test_predictions_count_as_the_evaluation_does(reeval, tokens):
    ids = torch.zeros(tokens, dtype=torch.long)
    assert (
        reeval.predictions(tokens, 8) == evaluate(make_tiny_llama(hidden=32), ids, seq_len=8, progress=False)["tokens"]
    )
    assert reeval.predictions(4096, 512) == 4088  # the CPU benchmark's 8 windows


def _run_file(command: str) -> dict:
    return {
        "command": command,
        "budget": {
            "steps": 40,
            "batch_size": 4,
            "seq_len": 64,
            "num_sequences": 128,
            "eval_tokens": 4096,
            "eval_seq_len": 512,
        },
        "block_steps": 64,
    }


def _report(path: Path, **method) -> None:
    base = {
        "steps": 40,
        "batch_size": 4,
        "seq_len": 64,
        "seed": 3,
        "block_warmup_steps": 64,
        "seed_data": {"num_sequences": 128},
        "generator": {"radius": 0.03},
        "ascent": False,
    }
    cfg = validate(
        {
            "model": {"path": "tiny"},
            "output": {"dir": str(path)},
            "quant": {"weights": {"bits": 4, "group_size": 64, "symmetric": False}},
            "method": {**base, **method},
        }
    )
    path.mkdir(parents=True)
    (path / "zsaq_report.json").write_text(json.dumps({"config": cfg.model_dump(mode="json")}))


def test_only_the_runs_own_checkpoint_is_scored(reeval, tmp_path, monkeypatch):
    monkeypatch.setattr(reeval.Q, "WORK", tmp_path)
    run = _run_file(
        "python bench/quality.py --tag T-seed3 --settings w4g64-asym "
        "--rows 'zsaq block-warmup ascent=false radius=0.03' --set method.seed=3"
    )
    row = {"setting": "w4g64-asym", "method": "zsaq block-warmup ascent=false radius=0.03"}
    ckpt = reeval.checkpoint_dir(run, row)
    assert ckpt == tmp_path / "T-seed3w4g64-asym-zsaq_block-warmup_ascentfalse_radius0.03"
    with pytest.raises(SystemExit, match="no zsaq_report.json"):
        reeval.check_checkpoint(ckpt, run, row)
    _report(ckpt)
    reeval.check_checkpoint(ckpt, run, row)
    # a checkpoint another run left under the same name: another seed, radius, pool or scheme
    for i, (method, quant_sym) in enumerate(
        [
            ({"seed": 4}, False),
            ({"generator": {"radius": 0.1}}, False),
            ({"seed_data": {"num_sequences": 32}}, False),
            ({}, True),
        ]
    ):
        other = tmp_path / f"other{i}"
        _report(other, **method)
        if quant_sym:
            report = json.loads((other / "zsaq_report.json").read_text())
            report["config"]["quant"]["weights"]["symmetric"] = True
            (other / "zsaq_report.json").write_text(json.dumps(report))
        with pytest.raises(SystemExit, match="is not the checkpoint of"):
            reeval.check_checkpoint(other, run, row)


def test_a_finished_evaluation_is_reused_and_a_stale_or_killed_one_is_not(reeval, tmp_path):

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "zsaq_report.json").write_text("{}")
    os.utime(ckpt / "zsaq_report.json", (1000, 1000))
    ev = {"model": str(ckpt), "seq_len": 512, "ppl": 17.5, "nll": 2.86, "tokens": 16352, "kl": 0.17, "top1": 0.78}
    log = tmp_path / "eval.log"
    log.write_text("Loading weights: 100%\n\n--- stdout ---\n" + json.dumps(ev, indent=2) + "\n")  # as quality._run
    assert reeval.cached(log, str(ckpt), ckpt / "zsaq_report.json", 512) == ev
    assert reeval.cached(log, str(tmp_path / "other"), ckpt / "zsaq_report.json", 512) is None
    assert reeval.cached(log, str(ckpt), ckpt / "zsaq_report.json", 256) is None  # other windows
    os.utime(log, (500, 500))  # the checkpoint was written again after this evaluation
    assert reeval.cached(log, str(ckpt), ckpt / "zsaq_report.json", 512) is None
    log.write_text("Loading weights: 100%\neval:  40%")  # killed before it printed its result
    assert reeval.cached(log, str(ckpt), ckpt / "zsaq_report.json", 512) is None
    assert reeval.cached(tmp_path / "missing.log", str(ckpt), ckpt / "zsaq_report.json", 512) is None


def test_a_rescored_file_names_the_machine_that_trained_its_run(reeval, tmp_path):
    run = tmp_path / "run.json"
    res = {"command": "python bench/quality.py --set method.seed=3", "date": "2026-12-07", "machine": "vm (EPYC)"}
    assert reeval.source_record(run, res) == {"file": str(run), "command": res["command"], "date": "2026-12-07",
                                              "machine": "vm (EPYC)"}
