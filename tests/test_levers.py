"""Levers for quality per step: the SAM radius schedule (``rho_final``), the scales-only warm phase,
and where SAM perturbs (``sam_space``: the latent weights, or after the quantizer).

Both paths run them: the single-process trainer (``minimax.trainer``) and the DeepSpeed game
(``dist.game.DistGame``) in this process as one gloo worker.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import free_ports, make_tiny_llama

from zsaq_dist.config import QuantCfg, validate
from zsaq_dist.errors import ConfigError
from zsaq_dist.minimax.step import (
    on_quantized_weights,
    sam_student_step,
    student_loss,
    teacher_targets,
    torch_mechanics,
)
from zsaq_dist.minimax.student import (
    make_optimizer,
    make_student,
    make_student_scheduler,
    norm_params,
    student_params,
)
from zsaq_dist.minimax.trainer import train
from zsaq_dist.optim.sam import EPS, global_norm
from zsaq_dist.optim.schedule import delayed_lr_factor, lr_factor, make_scheduler, rho_at
from zsaq_dist.quant import quant_modules

QUANT = QuantCfg.model_validate({"weights": {"bits": 3, "group_size": 16}})


def _cfg(tmp_path, **method):
    base = {
        "steps": 4,
        "batch_size": 2,
        "seq_len": 8,
        "lr": 1e-3,
        "scale_lr": 1e-4,
        "warmup_steps": 1,
        "rho": 0.1,
        "seed": 5,
        "block_warmup_steps": 0,  # the game's own steps from RTN: the warm-up is tested in test_blockwise
        "generator": {"noise_dim": 8, "hidden_dim": 16},
        "seed_data": {"num_sequences": 4, "cache_dir": str(tmp_path / "seed")},
    }
    return validate(
        {
            "model": {"path": "tiny"},
            "output": {"dir": str(tmp_path / "out")},
            "quant": QUANT.model_dump(),
            "method": {**base, **method},
        }
    )


def _snapshot(params) -> list[torch.Tensor]:
    """Exact copies; under ZeRO-3 the tensor the forward reads is the partition ``ds_tensor``."""
    return [(p.ds_tensor if hasattr(p, "ds_tensor") else p).detach().clone() for p in params]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _train_with_snapshots(cfg):
    """Single-process run; (history, [(weights, scales) before step 0 and after every step], student)."""
    teacher = make_tiny_llama(hidden=32)
    student = make_student(teacher, cfg.quant, cfg.method.learnable_scales)
    weights, scales = student_params(student)
    snaps = [(_snapshot(weights), _snapshot(scales))]
    hist = train(
        teacher,
        student,
        None,
        cfg,
        progress=False,
        on_step=lambda s, m: snaps.append((_snapshot(weights), _snapshot(scales))),
    )
    return hist, snaps, student


# --- schedules (pure functions) ---------------------------------------------------------------


def test_schedule_rho_at_ends_midpoint_and_constant_cases():
    assert rho_at(0, 11, 0.1, 0.02) == 0.1  # exact, not approximately
    assert rho_at(10, 11, 0.1, 0.02) == 0.02
    assert rho_at(5, 11, 0.1, 0.02) == pytest.approx(0.06, abs=1e-12)
    assert rho_at(2, 11, 0.1, 0.02) == pytest.approx(0.02 + 0.08 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    seq = [rho_at(s, 11, 0.1, 0.02) for s in range(11)]
    assert all(a > b for a, b in zip(seq, seq[1:], strict=False))
    assert rho_at(10, 11, 0.0, 0.05) == 0.05  # the cosine also runs upwards
    for step in range(7):
        assert rho_at(step, 7, 0.05, None) == 0.05
        assert rho_at(step, 7, 0.05, 0.05) == 0.05
    assert rho_at(0, 1, 0.1, 0.0) == 0.1 and rho_at(0, 0, 0.1, 0.0) == 0.1


def test_schedule_delayed_lr_factor_starts_its_own_warmup_and_decay():
    assert [delayed_lr_factor(s, 3, 10, warmup=2) for s in range(3)] == [0.0, 0.0, 0.0]
    for s in range(3, 10):
        assert delayed_lr_factor(s, 3, 10, warmup=2) == lr_factor(s - 3, 7, warmup=2)
    assert delayed_lr_factor(3, 3, 10, warmup=2) == pytest.approx(1 / 3)
    for s in range(10):  # start 0 is the undelayed schedule, bit for bit
        assert delayed_lr_factor(s, 0, 10, warmup=2) == lr_factor(s, 10, warmup=2)


def test_schedule_make_scheduler_holds_a_group_until_its_start():
    w, sc = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([{"params": [w], "lr": 1.0}, {"params": [sc], "lr": 0.5}])
    sched = make_scheduler(opt, 6, warmup=1, starts=[2, 0])
    lrs = []
    for _ in range(6):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert [w_lr for w_lr, _ in lrs] == [0.0, 0.0] + [lr_factor(s, 4, warmup=1) for s in range(4)]
    assert [s_lr for _, s_lr in lrs] == [0.5 * lr_factor(s, 6, warmup=1) for s in range(6)]
    with pytest.raises(ValueError, match="param groups"):
        make_scheduler(opt, 6, starts=[1])


def test_schedule_student_scheduler_without_warm_phase_is_the_old_one():
    cfg = _cfg_method(scales_only_steps=0)
    student = make_student(make_tiny_llama(hidden=32), QUANT, True)
    a, b = make_optimizer(*student_params(student), cfg), make_optimizer(*student_params(student), cfg)
    sa, sb = make_student_scheduler(a, cfg), make_scheduler(b, cfg.steps, cfg.warmup_steps, cfg.schedule)
    for _ in range(cfg.steps):
        assert [g["lr"] for g in a.param_groups] == [g["lr"] for g in b.param_groups]
        a.step()  # no gradients: a no-op, in the order LambdaLR expects
        b.step()
        sa.step()
        sb.step()


def _cfg_method(**kw):
    from zsaq_dist.config import MethodCfg

    return MethodCfg.model_validate({"steps": 6, "warmup_steps": 2, "lr": 1e-3, "scale_lr": 1e-4, **kw})


# --- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,msg",
    [
        ({"scales_only_steps": 2, "learnable_scales": False}, "learnable_scales: true"),
        ({"scales_only_steps": 2, "scale_lr": 0.0}, "scale_lr > 0"),
        ({"scales_only_steps": 4}, "scales_only_steps < steps"),
        ({"scales_only_steps": -1}, "greater than or equal to 0"),
        ({"rho_final": -0.1}, "greater than or equal to 0"),
        ({"sam_space": "quantized", "adaptive_sam": True}, "adaptive_sam: false or sam_space: latent"),
        ({"sam_space": "weights"}, "'quantized' or 'latent'"),
    ],
)
def test_config_levers_are_validated(tmp_path, method, msg):
    with pytest.raises(ConfigError, match=msg):
        _cfg(tmp_path, **method)


def test_config_levers_defaults_and_accepted_values(tmp_path):
    m = _cfg(tmp_path).method
    assert m.rho_final is None and m.scales_only_steps == 0 and m.sam_space == "quantized"
    m = _cfg(tmp_path, scales_only_steps=3, rho_final=0.0).method
    assert m.scales_only_steps == 3 and m.rho_final == 0.0


# --- single-process trainer ------------------------------------------------------------------------


def test_trainer_rho_final_equal_to_rho_is_bit_identical_to_constant(tmp_path):
    h_const, s_const, _ = _train_with_snapshots(_cfg(tmp_path))
    h_same, s_same, _ = _train_with_snapshots(_cfg(tmp_path, rho_final=0.1))
    for k in ("loss", "kl", "sam_loss", "gen_obj", "lr", "rho"):
        assert h_const[k] == h_same[k], k
    assert h_const["rho"] == [0.1] * 4
    assert all(_same(a[0], b[0]) and _same(a[1], b[1]) for a, b in zip(s_const, s_same, strict=True))


def test_trainer_rho_schedule_is_used_and_changes_training(tmp_path):
    h_const, s_const, _ = _train_with_snapshots(_cfg(tmp_path))
    h_sched, s_sched, _ = _train_with_snapshots(_cfg(tmp_path, rho_final=0.01))
    assert h_sched["rho"] == [rho_at(s, 4, 0.1, 0.01) for s in range(4)]
    assert h_sched["rho"][0] == 0.1 and h_sched["rho"][-1] == 0.01
    # step 0 runs at the same radius; after that the perturbation (and so the trajectory) differs
    assert h_sched["sam_loss"][0] == h_const["sam_loss"][0]
    assert h_sched["sam_loss"][1:] != h_const["sam_loss"][1:]
    assert not _same(s_sched[-1][0], s_const[-1][0])


def test_trainer_scales_only_steps_freeze_the_weights_then_train_both(tmp_path):
    k = 2
    hist, snaps, _ = _train_with_snapshots(_cfg(tmp_path, scales_only_steps=k, weight_decay=0.1))
    (w0, s0) = snaps[0]
    for step in range(k):  # after steps 0..k-1: weights bit-identical, scales moved every step
        w, s = snaps[step + 1]
        assert _same(w, w0), step
        assert not _same(s, snaps[step][1]), step
    assert hist["lr"][:k] == [0.0] * k
    # from step k on the weights move, starting their own warm-up: lr * 1/(warmup+1) at step k
    assert hist["lr"][k] == pytest.approx(1e-3 * lr_factor(0, 4 - k, warmup=1))
    for step in range(k, 4):
        assert not _same(snaps[step + 1][0], snaps[step][0]), step
    assert hist["rho"] == [0.1] * 4 and all(v is not None for v in hist["sam_loss"])  # SAM runs throughout


def test_trainer_without_warm_phase_moves_weights_at_step_zero(tmp_path):
    _, snaps, _ = _train_with_snapshots(_cfg(tmp_path))
    assert not _same(snaps[1][0], snaps[0][0])


# --- SAM after the quantizer (sam_space: quantized) -----------------------------------------------


def _one_sam_step(student, x, target, m, rho, lr, space):
    weights, _ = student_params(student)
    opt = torch.optim.SGD(weights, lr=lr)
    mech = torch_mechanics(opt, weights)
    if space == "quantized":
        mech = on_quantized_weights(mech, [q for _, q in quant_modules(student)])
    return sam_student_step(lambda: student_loss(student, x, target, m), mech, rho)


def test_sam_on_quantized_weights_steps_with_the_gradient_at_q_of_w_plus_e():
    """By hand: g at Q(w); e = rho g / ||g||; g' at Q(w) + e (rounding of w kept); w - lr g'. Bit for bit."""
    m, rho, lr = _cfg_method(), 0.05, 0.1
    teacher = make_tiny_llama(hidden=32)
    student = make_student(teacher, QUANT)
    torch.manual_seed(1)
    x = torch.randn(2, 8, 32)
    target = teacher_targets(teacher, x, m)

    ref = copy.deepcopy(student)
    weights, _ = student_params(ref)
    mods = [q for _, q in quant_modules(ref)]
    loss, _ = student_loss(ref, x, target, m)
    loss.backward()
    g = [p.grad for p in weights]
    scale = rho / (global_norm(weights, g) + EPS)
    for q, gi in zip(mods, g, strict=True):
        q.sam_delta = gi.float() * scale
        q.weight.grad = None
    loss_adv, _ = student_loss(ref, x, target, m)
    loss_adv.backward()
    with torch.no_grad():
        expected = [p - lr * p.grad for p in weights]

    latent = copy.deepcopy(student)
    metrics = _one_sam_step(student, x, target, m, rho, lr, "quantized")
    assert metrics["sam_loss"] == float(loss_adv) and metrics["loss"] == float(loss)
    assert all(q.sam_delta is None for _, q in quant_modules(student))  # released: the forward is Q(w) again
    assert _same([p.detach() for p in student_params(student)[0]], expected)
    # the latent perturbation lands elsewhere: Q(w + e) re-rounds, so this test can tell the two apart
    _one_sam_step(latent, x, target, m, rho, lr, "latent")
    assert not _same(_snapshot(student_params(latent)[0]), expected)


def test_sam_on_quantized_weights_shares_one_delta_per_tied_weight():
    student = make_student(make_tiny_llama(hidden=32), QUANT)
    a, b = [q for _, q in quant_modules(student)][:2]
    b.weight = a.weight  # two modules, one weight (tied)
    opt = torch.optim.SGD([a.weight], lr=0.1)
    mech = on_quantized_weights(torch_mechanics(opt, [a.weight]), [a, b])
    a.weight.grad = torch.ones_like(a.weight)
    deltas, grads = mech.tensors_and_grads()
    assert len(deltas) == 1 and a.sam_delta is b.sam_delta is deltas[0] and grads[0] is a.weight.grad
    assert not mech.keep_copy  # the deltas are dropped after the second pass, not restored
    mech.release()
    assert a.sam_delta is None and b.sam_delta is None


def test_trainer_sam_space_quantized_at_rho_zero_is_the_plain_optimizer(tmp_path):
    h_lat, s_lat, _ = _train_with_snapshots(_cfg(tmp_path, rho=0.0, sam_space="latent"))
    h_q, s_q, _ = _train_with_snapshots(_cfg(tmp_path, rho=0.0, sam_space="quantized"))
    assert h_lat["loss"] == h_q["loss"] and _same(s_lat[-1][0], s_q[-1][0]) and _same(s_lat[-1][1], s_q[-1][1])


def test_trainer_sam_space_quantized_trains_and_differs_from_latent(tmp_path):
    h_lat, s_lat, _ = _train_with_snapshots(_cfg(tmp_path, sam_space="latent"))
    h_q, s_q, student = _train_with_snapshots(_cfg(tmp_path, sam_space="quantized"))
    assert h_q["loss"][0] == h_lat["loss"][0]  # same start; the perturbations differ from there
    assert h_q["sam_loss"][0] != h_lat["sam_loss"][0]
    assert all(v is not None and math.isfinite(v) for v in h_q["sam_loss"])
    assert not _same(s_q[-1][0], s_lat[-1][0])
    assert all(q.sam_delta is None for _, q in quant_modules(student))


# --- DeepSpeed game, one gloo worker in this process --------------------------------------------


@pytest.fixture(scope="module")
def one_worker():
    """A gloo process group of one rank that DeepSpeed joins (as a Ray Train worker of 1).

    One per module: DeepSpeed caches its process groups, so it cannot join a second one in this process.
    """
    pytest.importorskip("deepspeed")
    import torch.distributed as dist

    from zsaq_dist.dist.engines import setup_comm

    (port,) = free_ports(1)
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    with pytest.MonkeyPatch.context() as mp:
        for key, val in {**env, "DS_ACCELERATOR": "cpu"}.items():
            mp.setenv(key, val)
        setup_comm(use_gpu=False)
        yield
        dist.destroy_process_group()


def _dist_game(cfg):
    from zsaq_dist.dist.game import DistGame
    from zsaq_dist.minimax.trainer import Inputs, load_seed_ids, resolve_mode

    teacher = make_tiny_llama(hidden=32)
    student = make_student(teacher, cfg.quant, cfg.method.learnable_scales, train_norms=cfg.method.trains_norms)
    m = cfg.method
    seed_ids = load_seed_ids(teacher, None, None, m)
    torch.manual_seed(m.seed)  # the generator's initial weights, as the trainer and the worker do
    return DistGame(teacher, student, Inputs(teacher, resolve_mode(m), m, seed_ids), cfg)


@pytest.mark.parametrize("stage", [0, 3])
def test_dist_game_follows_the_trainer_on_both_levers(tmp_path, one_worker, stage):
    k = 2
    cfg = _cfg(tmp_path, scales_only_steps=k, rho_final=0.02)
    cfg = cfg.model_copy(update={"dist": cfg.dist.model_copy(update={"zero_stage": stage})})
    ref, ref_snaps, _ = _train_with_snapshots(cfg)
    game = _dist_game(cfg)
    if stage == 3:  # fp32: the optimizer updates the parameter partitions in place, no second fp32 copy
        opt = game.student.optimizer
        pairs = zip(opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat, strict=True)
        assert all(m.data_ptr() == p.data_ptr() for m, p in pairs)
    weights, scales = student_params(game.student.module)
    snaps = [(_snapshot(weights), _snapshot(scales))]
    losses, sam_losses, rhos, lrs = [], [], [], []
    for step in range(cfg.method.steps):
        metrics, _, lr = game.step(step)
        snaps.append((_snapshot(weights), _snapshot(scales)))
        losses.append(metrics["loss"])
        sam_losses.append(metrics["sam_loss"])
        rhos.append(metrics["rho"])
        lrs.append(lr)
    assert rhos == ref["rho"] and rhos[-1] == 0.02
    assert lrs[:k] == [0.0] * k and lrs == pytest.approx(ref["lr"], rel=1e-12)
    for step in range(k):
        assert _same(snaps[step + 1][0], snaps[0][0]), step
        assert not _same(snaps[step + 1][1], snaps[step][1]), step
    for step in range(k, cfg.method.steps):
        assert not _same(snaps[step + 1][0], snaps[step][0]), step
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref["loss"]), atol=1e-4, rtol=0)
    # the loss at w + e: SAM ran at the scheduled radius on both paths
    torch.testing.assert_close(torch.tensor(sam_losses), torch.tensor(ref["sam_loss"]), atol=1e-4, rtol=0)
    final = [t.flatten() for t in snaps[-1][1]]
    torch.testing.assert_close(torch.cat(final), torch.cat([t.flatten() for t in ref_snaps[-1][1]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("stage", [0, 3])
def test_dist_game_trains_the_norms_as_the_trainer_does(tmp_path, one_worker, stage):
    """``norm_lr`` (the "(and norms)" of the scales-first lever; tests/test_norms.py): the engines train the norms
    from step 0 while ``scales_only_steps`` holds the weights, and end where the single process does."""
    cfg = _cfg(tmp_path, scales_only_steps=2, norm_lr=1e-3)
    cfg = cfg.model_copy(update={"dist": cfg.dist.model_copy(update={"zero_stage": stage})})
    teacher = make_tiny_llama(hidden=32)
    student = make_student(teacher, cfg.quant, True)
    ref = train(teacher, student, None, cfg, progress=False)  # makes the norms trainable from norm_lr
    ref_norms = _snapshot(norm_params(student))
    game = _dist_game(cfg)
    norms = norm_params(game.student.module)
    assert len(norms) == len(ref_norms) == 2 * 2 + 1  # two per decoder layer and the final one
    snaps = [_snapshot(norms)]
    losses = []
    for step in range(cfg.method.steps):
        losses.append(game.step(step)[0]["loss"])
        snaps.append(_snapshot(norms))
    assert all(not _same(snaps[s + 1], snaps[s]) for s in range(cfg.method.steps))  # also in steps 0 and 1
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref["loss"]), atol=1e-4, rtol=0)
    got = torch.cat([t.flatten() for t in snaps[-1]])
    torch.testing.assert_close(got, torch.cat([t.flatten() for t in ref_norms]), atol=1e-5, rtol=0)


def test_dist_game_zero0_follows_the_trainer_with_sam_on_quantized_weights(tmp_path, one_worker):
    cfg = _cfg(tmp_path, sam_space="quantized")
    ref, ref_snaps, _ = _train_with_snapshots(cfg)
    game = _dist_game(cfg)
    weights, _ = student_params(game.student.module)
    losses, sam_losses = [], []
    for step in range(cfg.method.steps):
        metrics, _, _ = game.step(step)
        losses.append(metrics["loss"])
        sam_losses.append(metrics["sam_loss"])
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref["loss"]), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(sam_losses), torch.tensor(ref["sam_loss"]), atol=1e-4, rtol=0)
    final = torch.cat([t.flatten() for t in _snapshot(weights)])  # DeepSpeed's AdamW: the tests/test_dist.py bound
    torch.testing.assert_close(final, torch.cat([t.flatten() for t in ref_snaps[-1][0]]), atol=1e-5, rtol=0)
    assert all(q.sam_delta is None for _, q in quant_modules(game.student.module))
