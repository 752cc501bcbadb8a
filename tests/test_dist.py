"""Ray Train + DeepSpeed on CPU: 2 gloo workers against the single-process trainer.

One embedded Ray instance serves every test of the module. Each Ray run
trains a tiny Llama for a few SAM-SGA steps and exports it; the assertions
compare loss, SAM norm and exported tensors with the single-process path
(``minimax.trainer.train`` + ``io.export``), which is the 1-worker run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, save_tiny
from safetensors.torch import load_file
from test_load_fixtures import make_word_tokenizer

from zsaq_dist.config import Config, validate

STEPS = 4
# Adam moves every weight by about +-lr whatever its gradient's size, so a gradient at rounding-noise
# level (different summation order on 1 vs 2 ranks) can flip its sign and move a weight across a
# quantization boundary. A small lr keeps that rare (see _assert_same_tensors); the steps still change
# scales and codes far beyond the tolerances below.


def _cfg(root: Path, name: str, model: str, sam_space: str = "latent", **dist) -> Config:
    return validate(
        {
            "model": {"path": model},
            "quant": {"weights": {"group_size": 32}},
            "method": {
                "steps": STEPS,
                "batch_size": 2,
                "seq_len": 8,
                "lr": 1e-5,
                "scale_lr": 1e-5,
                "sam_space": sam_space,
                "block_warmup_steps": 0,  # the game's own steps; the warm-up's dist test sets it (_with_warmup)
                "seed_data": {"num_sequences": 4, "cache_dir": str(root / "seed")},
                "generator": {"noise_dim": 8, "hidden_dim": 16},
            },
            "dist": dist,
            "output": {"dir": str(root / name)},
            "eval": {"seq_len": 16, "max_tokens": 64, "batch_size": 2},
        }
    )


def _tensors(out: str | Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(out).glob("model-*.safetensors"))
    assert files, f"no shards in {out}"
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def _assert_same_tensors(a: dict, b: dict, atol: float, bits: int = 4) -> None:
    """Floats within ``atol``; integer codes equal except where float reassociation crosses a rounding boundary.

    1 and 2 ranks sum gradients in different orders; Adam's normalised step turns a sign flip of a
    rounding-noise gradient into a full ``lr`` move, so a weight that sits on a rounding boundary may land on
    the neighbouring code. Such flips must be rare (<= 0.5% of a layer's codes) and exactly one step.
    """
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)
        elif k.endswith("weight_packed"):
            shape = torch.Size(a[k.replace("weight_packed", "weight_shape")].tolist())
            ca, cb = (unpack_from_int32(t, bits, shape).int() for t in (a[k], b[k]))
            diff = (ca - cb).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.005, (k, int((diff > 0).sum()))
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def model_dir(root) -> str:
    path = save_tiny(make_tiny_llama(seed=3), root / "tiny")
    make_word_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=3, include_dashboard=False, runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    yield ray
    ray.shutdown()


def _reference(root: Path, model_dir: str, sam_space: str = "latent", change=None) -> dict:
    """The single-process run: trainer history (with SAM norms) and its exported tensors."""
    from zsaq_dist import job
    from zsaq_dist.io.export import export_checkpoint
    from zsaq_dist.minimax.trainer import train

    cfg = _cfg(root, f"ref-{sam_space}" + (f"-{change.__name__}" if change else ""), model_dir, sam_space,
               launcher="local")
    cfg = change(cfg) if change else cfg
    teacher, tok = job.load_teacher(cfg, torch.device("cpu"))
    student = job.build_student(teacher, cfg)
    norms: list[float] = []
    hist = train(teacher, student, tok, cfg, progress=False, on_step=lambda s, m: norms.append(m["grad_norm"]))
    ev = job.evaluate_in_memory(teacher, student, tok, cfg)
    out = export_checkpoint(student, tok, cfg, {}, progress=False)
    return {"loss": hist["loss"], "grad_norm": norms, "tensors": _tensors(out), "eval": ev,
            "block_warmup": hist.get("block_warmup"), "seed_data": hist["seed_data"]}


@pytest.fixture(scope="module")
def reference(root, model_dir) -> dict:
    return _reference(root, model_dir)


@pytest.fixture(scope="module")
def reference_samq(root, model_dir) -> dict:
    return _reference(root, model_dir, "quantized")


def _assert_matches_reference(hist: dict, out: Path, reference: dict) -> None:
    """Loss and SAM norms within 1e-4 of the single-process run, exported tensors within 1e-5."""
    torch.testing.assert_close(torch.tensor(hist["loss"]), torch.tensor(reference["loss"]), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        torch.tensor(hist["grad_norm"]), torch.tensor(reference["grad_norm"]), atol=1e-4, rtol=1e-4
    )
    _assert_same_tensors(_tensors(out), reference["tensors"], atol=1e-5)


def _run(ray_local, cfg: Config) -> dict:
    from zsaq_dist.dist.driver import run

    return run(cfg)


@pytest.mark.parametrize("stage", [3, 2])
def test_two_workers_match_single_process(ray_local, root, model_dir, reference, stage):
    rep = _run(ray_local, _cfg(root, f"z{stage}", model_dir, num_workers=2, zero_stage=stage))
    hist, d = rep["history"], rep["dist"]
    assert d["num_workers"] == 2 and d["zero_stage"] == stage
    # same global batch -> same trajectory, SAM norm = the single-process norm
    _assert_matches_reference(hist, root / f"z{stage}", reference)
    assert all(n > 0 for n in hist["grad_norm"])
    for who in ("teacher", "quantized"):  # evaluated on the engines' modules, every rank a collective forward
        assert rep["eval"][who]["ppl"] == pytest.approx(reference["eval"][who]["ppl"], rel=1e-4)
    assert rep["eval"]["quantized"]["kl"] == pytest.approx(reference["eval"]["quantized"]["kl"], abs=1e-5)
    assert rep["eval"]["tokens_sha256"] == reference["eval"]["tokens_sha256"]  # the same tokens were scored
    assert hist["seed_data"] == reference["seed_data"]  # and trained on the same seed set
    assert rep["eval"]["text"] == reference["eval"]["text"]
    # each rank holds about half: the whole student (ZeRO-3) or its trainable state (ZeRO-2); teacher ZeRO-3
    parts = d["student_partition_numel"]
    assert abs(parts[0] - parts[1]) <= 0.01 * parts[0]
    if stage == 3:
        assert sum(parts) == pytest.approx(d["student_numel"], rel=0.01)
    t = d["teacher_partition_numel"]
    assert max(t) <= 0.51 * d["teacher_numel"]
    # loaded partitioned: the teacher never whole on a rank; a ZeRO-3 student whole only in its scales
    load = d["load"]
    assert load["teacher_sharded"] and load["student_sharded"] == (stage == 3)
    whole = 0 if stage == 3 else rep["total_params"]
    for n in load["resident_numel"]:
        assert whole <= n <= whole + rep["quantized_params"] / 32  # + the g32 scales
    assert json.loads((root / f"z{stage}" / "config.json").read_text())["quantization_config"]["format"]


@pytest.mark.parametrize("stage", [3, 2])
def test_two_workers_match_single_process_with_sam_after_the_quantizer(
    ray_local, root, model_dir, reference, reference_samq, stage
):
    """``sam_space: quantized``: each rank perturbs its partition of a zero delta; the forward adds the whole one."""
    name = f"z{stage}-samq"
    rep = _run(ray_local, _cfg(root, name, model_dir, "quantized", num_workers=2, zero_stage=stage))
    _assert_matches_reference(rep["history"], root / name, reference_samq)
    # the two references differ, so matching the right one is a real check
    assert reference_samq["loss"][1:] != reference["loss"][1:]


def test_recompute_fake_quant_under_zero3(ray_local, root, model_dir, reference):
    """Recomputing the fake quantization in the backward works with ZeRO-3's gather/release hooks.

    Also the whole-model load (``dist.sharded_load: false``, the path GGUF files take): each worker holds
    teacher and student whole until the engines partition them, with the same result.
    """
    cfg = _cfg(root, "z3-recompute", model_dir, num_workers=2, zero_stage=3, sharded_load=False)
    cfg = cfg.model_copy(update={"method": cfg.method.model_copy(update={"recompute_fake_quant": True})})
    rep = _run(ray_local, cfg)
    _assert_matches_reference(rep["history"], root / "z3-recompute", reference)
    load = rep["dist"]["load"]
    assert not load["teacher_sharded"] and not load["student_sharded"]
    assert min(load["resident_numel"]) >= 2 * rep["total_params"]


def test_seed_sequences_written_together_equal_the_single_process_ones(ray_local, root, model_dir):
    """3 batches of seed sequences over 2 ranks of a partitioned teacher: the cached set equals one process's.

    With ``fresh_per_epoch``: 5 steps x 2 samples over 9 per pass make a pool of 18.
    """
    from zsaq_dist import job
    from zsaq_dist.data.seed import cache_path, generate_seed_tokens, model_fingerprint, pool_cfg

    cfg = _cfg(root, "seeds-together", model_dir, num_workers=2, zero_stage=3)
    sd = cfg.method.seed_data.model_copy(
        update={"num_sequences": 9, "fresh_per_epoch": True, "cache_dir": str(root / "seed-together")}
    )
    m = cfg.method.model_copy(update={"steps": 5, "seed_data": sd})
    cfg = cfg.model_copy(update={"method": m, "eval": None})
    _run(ray_local, cfg)
    teacher, tok = job.load_teacher(cfg, torch.device("cpu"))
    pool = pool_cfg(m)
    assert pool.num_sequences == 18
    path = cache_path(model_fingerprint(teacher), pool, m.seq_len, m.seed)  # the same key as one process
    assert [p.name for p in (root / "seed-together").iterdir()] == [path.name]
    expected = generate_seed_tokens(teacher, pool, m.seq_len, m.seed, special_ids=tok.all_special_ids)
    assert torch.equal(torch.load(path, weights_only=True), expected)


def test_non_finite_weights_are_refused_at_sharded_load(ray_local, root):
    model = make_tiny_llama(seed=4)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    path = save_tiny(model, root / "nan-model")
    from zsaq_dist.errors import ZsaqError

    with pytest.raises(ZsaqError, match="down_proj.weight holds NaN or Inf"):
        _run(ray_local, _cfg(root, "nan-out", path, num_workers=2, zero_stage=3))
    assert not (root / "nan-out").exists()


@pytest.mark.parametrize("stage", [0, 3])
def test_bf16_runs_as_mixed_precision(ray_local, root, model_dir, reference_samq, stage):
    """bf16 parameters with fp32 master copies: SAM perturbs, the trajectory tracks fp32, the checkpoint is bf16.

    With the default SAM rule (after the quantizer), so its bf16 deltas are gathered (ZeRO-3) or built whole (ZeRO-0).
    """
    reference = reference_samq
    cfg = _cfg(root, f"bf16-z{stage}", model_dir, "quantized", num_workers=2, zero_stage=stage)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": "bfloat16"})})
    hist = _run(ray_local, cfg)["history"]
    assert len(hist["grad_norm"]) == STEPS and all(math.isfinite(n) and n > 0 for n in hist["grad_norm"])
    torch.testing.assert_close(torch.tensor(hist["loss"]), torch.tensor(reference["loss"]), rtol=0.05, atol=1e-3)
    tensors = _tensors(root / f"bf16-z{stage}")
    assert tensors.keys() == reference["tensors"].keys()
    assert {t.dtype for k, t in tensors.items() if k.endswith("weight_scale")} == {torch.bfloat16}
    hf = json.loads((root / f"bf16-z{stage}" / "config.json").read_text())
    assert hf.get("dtype", hf.get("torch_dtype")) == "bfloat16"


def test_local_launcher_refuses_to_train_in_bf16(tmp_path):
    from zsaq_dist.errors import ConfigError
    from zsaq_dist.job import check_local_dtype

    cfg = _cfg(tmp_path, "out", "unused", launcher="local")
    check_local_dtype(cfg)
    bf16 = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": "bfloat16"})})
    with pytest.raises(ConfigError, match="dist.launcher: ray"):
        check_local_dtype(bf16)
    check_local_dtype(bf16.model_copy(update={"method": bf16.method.model_copy(update={"name": "rtn"})}))


def test_killed_worker_resumes_to_the_same_result(ray_local, root, model_dir, reference):
    cfg = _cfg(
        root, "fault", model_dir, num_workers=2, zero_stage=3, checkpoint_every=2, fail_at_step=3, max_failures=1
    )
    rep = _run(ray_local, cfg)
    assert Path(cfg.dist.storage_path or f"{cfg.output.dir}.ray", "fault_injected").is_file()
    assert rep["dist"]["resumed_from_step"] == 2
    _assert_same_tensors(_tensors(root / "fault"), reference["tensors"], atol=1e-5)
    assert rep["history"]["loss"] == pytest.approx(reference["loss"], abs=1e-4)  # restored + resumed steps


def test_checkpoint_of_another_config_is_refused(tmp_path):
    from zsaq_dist.dist import checkpoint
    from zsaq_dist.errors import ConfigError

    torch.save({"config_hash": "aaaa", "next_step": 1}, tmp_path / checkpoint.STATE)
    with pytest.raises(ConfigError, match="config hash aaaa"):
        checkpoint.load(None, "bbbb", str(tmp_path))


def test_only_zero_1_to_3_checkpoints_of_another_worker_count_need_converting(tmp_path):
    from zsaq_dist.dist.checkpoint import needs_universal

    cfg = _cfg(tmp_path, "out", "unused", zero_stage=3)  # this process: 1 worker
    assert needs_universal({"num_workers": 2}, cfg)
    assert not needs_universal({"num_workers": 1}, cfg)
    assert not needs_universal({}, cfg)  # written before the count was recorded
    assert not needs_universal(None, cfg)
    stage0 = cfg.model_copy(update={"dist": cfg.dist.model_copy(update={"zero_stage": 0})})
    assert not needs_universal({"num_workers": 2}, stage0)  # replicated state loads as is


def test_existing_output_fails_before_ray_starts(tmp_path, monkeypatch):
    from zsaq_dist.dist import driver
    from zsaq_dist.errors import ExportError

    (tmp_path / "out").mkdir()
    monkeypatch.setattr(driver, "init_ray", lambda cfg: pytest.fail("Ray must not start"))
    with pytest.raises(ExportError, match="overwrite"):
        driver.run(_cfg(tmp_path, "out", "unused", num_workers=2))


def test_embedded_workers_share_out_the_cores(tmp_path, monkeypatch):
    from zsaq_dist.dist import driver

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(driver, "usable_cpus", lambda: 8)
    threads = lambda **dist: driver._worker_env(_cfg(tmp_path, "out", "unused", **dist))["OMP_NUM_THREADS"]  # noqa: E731
    assert threads(num_workers=1) == "8"  # one worker takes every core, as --local does
    assert threads(num_workers=3) == "2"
    assert threads(num_workers=16) == "1"
    assert threads(num_workers=2, resources_per_worker={"CPU": 3}) == "3"  # what each worker asked for
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert threads(num_workers=1) == "5"  # the user's setting wins


def test_embedded_ray_counts_the_cores_workers_may_use(tmp_path, monkeypatch):
    """Ray's logical CPUs follow the affinity mask, as the workers' threads do, not the host's core count."""
    from zsaq_dist.dist import driver

    monkeypatch.setattr(driver, "usable_cpus", lambda: 4)
    monkeypatch.setattr(driver.os, "cpu_count", lambda: 64)  # a container narrowed to 4 of the host's 64
    cpus = lambda **dist: driver.embedded_cpus(_cfg(tmp_path, "out", "unused", **dist))  # noqa: E731
    assert cpus(num_workers=1) == 4
    assert cpus(num_workers=4) == 5  # four 1-CPU workers and the trainer actor must fit
    assert cpus(num_workers=2, resources_per_worker={"CPU": 3}) == 7


def test_global_batch_must_split_over_workers(tmp_path):
    from zsaq_dist.dist.engines import micro_batch
    from zsaq_dist.errors import ConfigError

    cfg = _cfg(tmp_path, "out", "unused", num_workers=3)
    assert micro_batch(cfg, 2) == 1
    with pytest.raises(ConfigError, match="multiple of 3"):
        micro_batch(cfg, 3)


def test_relative_paths_are_resolved_before_workers_see_them(tmp_path, monkeypatch):
    """Ray workers run in another working directory, so `output.dir: out/x` must mean the caller's out/x."""
    from zsaq_dist.config import validate
    from zsaq_dist.dist.driver import absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "m").mkdir(parents=True)
    raw = {"model": {"path": "models/m"}, "output": {"dir": "out/x"}, "eval": {"text": "t.txt"},
           "method": {"seed_data": {"cache_dir": "seeds"}}}
    cfg = absolute_paths(validate(raw))
    assert cfg.model.path == str(tmp_path / "models" / "m")
    assert cfg.output.dir == str(tmp_path / "out" / "x")
    assert cfg.eval.text == str(tmp_path / "t.txt")
    assert cfg.method.seed_data.cache_dir == str(tmp_path / "seeds")
    for keep in ("org/name", "demo:smollm2-135m-instruct"):
        assert absolute_paths(validate({**raw, "model": {"path": keep}})).model.path == keep
    assert absolute_paths(validate({**raw, "output": {"dir": "s3://b/x"}})).output.dir == "s3://b/x"


def test_gguf_files_and_sharded_load_false_load_whole(tmp_path, model_dir):
    from zsaq_dist.dist.load import shardable

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert shardable(_cfg(tmp_path, "out", model_dir, num_workers=2, zero_stage=3))
    assert not shardable(_cfg(tmp_path, "out", model_dir, num_workers=2, sharded_load=False))
    assert not shardable(_cfg(tmp_path, "out", str(gguf), num_workers=2))


@pytest.mark.parametrize(("stage", "before", "after"), [(3, 2, 1), (2, 1, 2), (0, 2, 1)])
def test_a_job_resumes_on_another_worker_count(ray_local, root, model_dir, reference, stage, before, after):
    """Killed after the step-2 checkpoint, rerun on another worker count: it resumes there and ends as the reference.

    ZeRO 1-3 partitions are converted to a universal checkpoint on the way; ZeRO-0 state loads as is.
    """
    from zsaq_dist.errors import ZsaqError

    name = f"regrow-z{stage}-{before}to{after}"
    killed = _cfg(root, name, model_dir, num_workers=before, zero_stage=stage, checkpoint_every=2, fail_at_step=3)
    with pytest.raises(ZsaqError, match="failed"):
        _run(ray_local, killed)
    rep = _run(ray_local, _cfg(root, name, model_dir, num_workers=after, zero_stage=stage, checkpoint_every=2))
    assert rep["dist"]["resumed_from_step"] == 2 and rep["dist"]["num_workers"] == after
    _assert_same_tensors(_tensors(root / name), reference["tensors"], atol=1e-5)
    assert rep["history"]["loss"] == pytest.approx(reference["loss"], abs=1e-4)


def test_zero3_student_starts_bit_exactly_from_a_checkpoint(ray_local, root, model_dir):
    """method.init_from under ZeRO-3: each partitioned weight is gathered, written by rank 0 and re-partitioned."""
    from test_warmstart import _source

    src = _source(model_dir, root / "init-src", {"weights": {"group_size": 32}})
    cfg = _cfg(root, "init-z3", model_dir, num_workers=2, zero_stage=3)
    cfg = cfg.model_copy(update={"method": cfg.method.model_copy(update={"name": "rtn", "init_from": src})})
    rep = _run(ray_local, cfg)
    assert rep["dist"]["load"]["student_sharded"]
    a, b = _tensors(src), _tensors(root / "init-z3")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference_warmup(root, model_dir) -> dict:
    return _reference(root, model_dir, "latent", _with_warmup)


def _with_warmup(cfg: Config) -> Config:
    return validate(cfg.model_dump(mode="json") | {"method": cfg.method.model_dump(mode="json") | {
        "block_warmup_steps": 3, "block_warmup_lr": 3e-4, "block_warmup_margin": 0.25}})


@pytest.mark.parametrize("stage", [3, 0])
def test_block_warmup_on_two_workers_matches_single_process_and_is_not_redone_on_resume(
    ray_local, root, model_dir, reference_warmup, stage
):
    """The ranks warm each layer data-parallel, as one process (rank 0's values kept); a run killed in the game
    resumes without redoing it."""
    from zsaq_dist.errors import ZsaqError

    ref = reference_warmup
    name = f"warm-z{stage}"
    killed = _with_warmup(_cfg(root, name, model_dir, num_workers=2, zero_stage=stage, checkpoint_every=2,
                               fail_at_step=3))
    with pytest.raises(ZsaqError, match="failed"):
        _run(ray_local, killed)
    rep = _run(ray_local, _with_warmup(_cfg(root, name, model_dir, num_workers=2, zero_stage=stage,
                                            checkpoint_every=2)))
    assert rep["dist"]["resumed_from_step"] == 2
    assert rep["history"]["block_warmup"]["workers"] == 2  # data-parallel: each rank ran half of every minibatch
    got, want = rep["history"]["block_warmup"]["layers"], ref["block_warmup"]["layers"]
    assert any(w["kept"] for w in want)
    for g, w in zip(got, want, strict=True):  # restored with the checkpoint's history: the warm-up ran once
        assert g["kept"] == w["kept"] == (g["loss_after"] <= g["loss_before"])  # a worse layer is put back
        assert (g["loss_before"], g["loss_after"]) == pytest.approx((w["loss_before"], w["loss_after"]), abs=1e-6)
        assert w["settled"] > 0 and g["settled"] == pytest.approx(w["settled"], rel=0.01)  # settled as one process
    _assert_same_tensors(_tensors(root / name), ref["tensors"], atol=1e-5)
    assert rep["history"]["loss"] == pytest.approx(ref["loss"], abs=1e-4)


def _with_norms(cfg: Config) -> Config:
    """The warm-up, the scales-only first half and the norms trained (``method.norm_lr``)."""
    return validate(cfg.model_dump(mode="json") | {"method": cfg.method.model_dump(mode="json") | {
        "block_warmup_steps": 3, "block_warmup_lr": 3e-4, "scales_only_steps": 2, "norm_lr": 1e-5}})


def test_norms_train_on_two_workers_as_in_one_process(ray_local, root, model_dir):
    """``method.norm_lr`` on a ZeRO-3 student loaded partitioned: each layer's norms train in its warm-up turn
    (gathered, rank 0's values kept) and all of them in the game; the export holds what one process trains."""
    ref = _reference(root, model_dir, "latent", _with_norms)
    teacher = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        teacher.update(load_file(f))
    norms = [k for k in teacher if k.endswith("norm.weight")]
    assert len(norms) == 5  # two per decoder layer and the final one
    assert all(not torch.equal(ref["tensors"][k], teacher[k]) for k in norms)
    rep = _run(ray_local, _with_norms(_cfg(root, "norms-z3", model_dir, num_workers=2, zero_stage=3)))
    assert rep["dist"]["load"]["student_sharded"]
    _assert_matches_reference(rep["history"], root / "norms-z3", ref)


def _warmup_alone(cfg: Config) -> Config:
    cfg = _with_warmup(cfg)
    return validate(cfg.model_dump(mode="json") | {"method": cfg.method.model_dump(mode="json") | {"steps": 0}})


def test_block_warmup_alone_on_two_workers_exports_the_single_process_student(ray_local, root, model_dir):
    """``method.steps: 0`` (the warm-up alone, no game step) finishes on Ray and exports what one process does."""
    ref = _reference(root, model_dir, "latent", _warmup_alone)
    assert ref["loss"] == [] and any(r["kept"] for r in ref["block_warmup"]["layers"])
    rep = _run(ray_local, _warmup_alone(_cfg(root, "warm-alone", model_dir, num_workers=2, zero_stage=3)))
    assert rep["history"]["loss"] == [] and rep["history"]["block_warmup"]["workers"] == 2
    got, want = rep["history"]["block_warmup"]["layers"], ref["block_warmup"]["layers"]
    for g, w in zip(got, want, strict=True):
        assert (g["loss_before"], g["loss_after"]) == pytest.approx((w["loss_before"], w["loss_after"]), abs=1e-6)
    _assert_same_tensors(_tensors(root / "warm-alone"), ref["tensors"], atol=1e-5)


def _with_generator(name: str, **values):
    """A config change (for :func:`_reference`, which names its output after ``name``) setting generator keys."""

    def change(cfg: Config) -> Config:
        method = cfg.method.model_dump(mode="json")
        return validate(cfg.model_dump(mode="json") | {"method": method | {"generator": method["generator"] | values}})

    change.__name__ = name
    return change


_with_hard_seeds = _with_generator("_with_hard_seeds", seed_hardness=50.0)  # sharp: a wrong KL state draws other rows


def test_hard_seed_picks_on_two_workers_match_single_process_and_survive_a_kill(ray_local, root, model_dir, reference):
    """``generator.seed_hardness``: ranks gather the global batch's KLs, so every rank draws the same sequences;
    the picker's KLs are in the checkpoint, so a run killed after step 2 (whose draws use them) resumes as one."""
    ref = _reference(root, model_dir, "latent", _with_hard_seeds)
    assert ref["loss"][:2] == reference["loss"][:2] and ref["loss"][2:] != reference["loss"][2:]  # steps 2-3 drew
    cfg = _with_hard_seeds(_cfg(root, "hard-z3", model_dir, num_workers=2, zero_stage=3, checkpoint_every=2,
                                fail_at_step=3, max_failures=1))
    rep = _run(ray_local, cfg)
    assert rep["dist"]["resumed_from_step"] == 2
    _assert_matches_reference(rep["history"], root / "hard-z3", ref)


_with_fading_radius = _with_generator("_with_fading_radius", radius_final=0.0)


def test_a_fading_generator_radius_on_two_workers_matches_single_process(ray_local, root, model_dir, reference):
    """``generator.radius_final``: every rank sets the radius of each step from the step alone (the same
    ``Inputs.begin_step`` as the single process), so the two-worker run follows the single-process one."""
    ref = _reference(root, model_dir, "latent", _with_fading_radius)
    assert ref["loss"][0] == reference["loss"][0] and ref["loss"][1:] != reference["loss"][1:]
    cfg = _with_fading_radius(_cfg(root, "fade-z0", model_dir, num_workers=2, zero_stage=0))
    rep = _run(ray_local, cfg)
    _assert_matches_reference(rep["history"], root / "fade-z0", ref)
