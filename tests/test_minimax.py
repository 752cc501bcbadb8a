"""The SAM-SGA game: who gets gradients, ascent/descent signs, GM gradients, reproducibility, modes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_qwen2

from zsaq_dist.config import MethodCfg, QuantCfg, validate
from zsaq_dist.errors import ConfigError
from zsaq_dist.minimax import losses
from zsaq_dist.minimax.generator import Generator, embedding_stats, noise, noise_inputs
from zsaq_dist.minimax.step import (
    generator_ascent_step,
    generator_objective,
    sam_student_step,
    seed_embeddings,
    student_loss,
    teacher_targets,
    torch_mechanics,
)
from zsaq_dist.minimax.student import freeze, make_optimizer, make_student, student_params
from zsaq_dist.minimax.trainer import plot_history, train

QUANT = QuantCfg.model_validate({"weights": {"bits": 3, "group_size": 16}})


def _setup(gm=0.0, div=0.0, nat=0.1, r_nat="nll", learnable=True):
    teacher = freeze(make_tiny_llama(hidden=32))
    student = make_student(teacher, QUANT, learnable_scales=learnable)
    cfg = MethodCfg.model_validate(
        {
            "lr": 1e-4,
            "scale_lr": 1e-5,
            "seq_len": 8,
            "generator": {
                "lambda_gm": gm,
                "lambda_div": div,
                "lambda_nat": nat,
                "r_nat": r_nat,
                "noise_dim": 8,
                "hidden_dim": 16,
                "radius": 0.5,
                "lr": 0.05,
            },
        }
    )
    torch.manual_seed(0)
    gen = Generator(32, 8, 16, 0.5)
    ids = torch.randint(0, 128, (3, 8), generator=torch.Generator().manual_seed(1))
    e = seed_embeddings(teacher, ids)
    z = noise(0, 0, range(3), (8, 8))
    return teacher, student, gen, cfg, e, z


def _no_grads(model):
    return all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("gm,div,r_nat", [(0.0, 0.0, "nll"), (0.5, 0.5, "norm")])
def test_generator_phase_only_generator_gets_grads(gm, div, r_nat):
    teacher, student, gen, cfg, e, z = _setup(gm, div, r_nat=r_nat)
    opt = torch.optim.Adam(gen.parameters(), lr=1e-3, maximize=True)
    obj = lambda: generator_objective(teacher, student, gen, z, e, cfg)  # noqa: E731
    params = list(gen.parameters())
    obj()[0].backward(inputs=params)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert _no_grads(teacher) and _no_grads(student)
    opt.zero_grad()
    m = generator_ascent_step(obj, params, opt, grad_clip=1.0)
    assert _no_grads(teacher) and _no_grads(student)
    assert ("gm" in m) == (gm > 0) and ("div" in m) == (div > 0)


def test_student_phase_only_student_gets_grads():
    teacher, student, gen, cfg, e, z = _setup()
    with torch.no_grad():
        x = gen(z, e)
    target = teacher_targets(teacher, x, cfg)
    student_loss(student, x, target, cfg)[0].backward()
    weights, scales = student_params(student)
    assert weights and scales
    assert all(p.grad is not None for p in weights + scales)
    trainable = {id(p) for p in weights + scales}
    assert all(p.grad is None for p in student.parameters() if id(p) not in trainable)
    assert _no_grads(teacher) and _no_grads(gen)
    # without learnable scales the scales take no gradient
    _, s2, *_ = _setup(learnable=False)
    assert student_params(s2)[1] == [] and not any(m.requires_grad for n, m in s2.named_parameters() if "scale" in n)


def _kl_before_and_after_ascent(teacher, student, gen, cfg, e, z, steps=3):
    """The generator's KL on ``(z, e)`` before and after ``steps`` ascent steps (Adam, lr 0.05), the student fixed."""
    params = list(gen.parameters())
    opt = torch.optim.Adam(params, lr=0.05, maximize=True)

    def kl_now():
        with torch.no_grad():
            return generator_objective(teacher, student, gen, z, e, cfg)[1]["gen_kl"]

    before = kl_now()
    for _ in range(steps):
        generator_ascent_step(lambda: generator_objective(teacher, student, gen, z, e, cfg), params, opt)
    return before, kl_now()


def test_generator_ascent_increases_kl_for_fixed_student():
    teacher, student, gen, cfg, e, z = _setup(nat=0.0)
    before, after = _kl_before_and_after_ascent(teacher, student, gen, cfg, e, z)
    assert after > before * 1.05
    assert _no_grads(student) and _no_grads(teacher)


def test_student_sam_step_decreases_kl_on_fixed_inputs():
    teacher, student, gen, cfg, e, z = _setup()
    with torch.no_grad():
        x = gen(z, e)
    target = teacher_targets(teacher, x, cfg)
    weights, scales = student_params(student)
    opt = make_optimizer(weights, scales, cfg)
    mech = torch_mechanics(opt, weights, grad_clip=1.0)
    before = student_loss(student, x, target, cfg)[1]["kl"]
    for _ in range(3):
        m = sam_student_step(lambda: student_loss(student, x, target, cfg), mech, rho=0.05)
    assert m["sam_loss"] > 0 and m["grad_norm"] > 0
    assert student_loss(student, x, target, cfg)[1]["kl"] < 0.9 * before


def test_generator_radius_bound():
    torch.manual_seed(0)
    gen = Generator(16, 4, 32, radius=0.2)
    with torch.no_grad():
        gen.adapter[2].weight.mul_(100)  # saturate tanh
    e = torch.randn(2, 5, 16) * 0.03
    x = gen(torch.randn(2, 5, 4), e)
    ratio = (x - e).norm(dim=-1) / e.norm(dim=-1)
    assert ratio.max() <= 0.2 + 1e-6 and ratio.max() > 0.1


def test_noise_rows_do_not_depend_on_batch_split():
    full = noise(7, 3, range(0, 6), (4, 2))
    assert torch.equal(full[2:5], noise(7, 3, range(2, 5), (4, 2)))
    assert not torch.equal(full, noise(7, 4, range(0, 6), (4, 2)))
    stats = embedding_stats(torch.randn(50, 4) * 3 + 1)
    x = noise_inputs(stats, 0, 0, range(200), 16)
    torch.testing.assert_close(x.mean((0, 1)), stats[0], atol=0.1, rtol=0.1)


def test_gm_kl_diversity_gradients_against_finite_differences():
    g = torch.Generator().manual_seed(0)
    shape_h, shape_v = (2, 3, 4), (2, 3, 5)

    def inputs(*shapes):
        return [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]

    h, sl, tl, h2, sl2, tl2 = inputs(shape_h, shape_v, shape_v, shape_h, shape_v, shape_v)

    def gm(h, sl, tl, h2, sl2, tl2):
        return losses.gradient_match(h, _dlogit(sl, tl), h2, _dlogit(sl2, tl2))

    def _dlogit(s, t):  # float64 version of losses.logit_grad
        return torch.softmax(s / 2.0, -1) - torch.softmax(t / 2.0, -1)

    assert torch.autograd.gradcheck(gm, (h, sl, tl, h2, sl2, tl2))
    assert torch.autograd.gradcheck(lambda h, s, t: losses.diversity(h, _dlogit(s, t)), (h, sl, tl))
    # identical neighbours match perfectly
    d = _dlogit(sl, tl)
    torch.testing.assert_close(losses.gradient_match(h, d, h, d), torch.tensor(1.0, dtype=torch.float64))


def test_kl_is_tau_squared_scaled_and_zero_at_equality():
    t = torch.randn(2, 3, 7)
    assert losses.kl(t, t, tau=2.0).abs() < 1e-7
    s = torch.randn(2, 3, 7)
    ref = (
        torch.nn.functional.kl_div(
            torch.log_softmax(s / 2, -1), torch.log_softmax(t / 2, -1), log_target=True, reduction="none"
        )
        .sum(-1)
        .mean()
        * 4
    )
    torch.testing.assert_close(losses.kl(s, t, tau=2.0), ref)


def _cfg(tmp_path, **method):
    base = {
        "steps": 3,
        "batch_size": 2,
        "seq_len": 8,
        "lr": 1e-3,
        "seed": 5,
        "generator": {"noise_dim": 8, "hidden_dim": 16, "lambda_gm": 0.1, "lambda_div": 0.1},
        "seed_data": {"num_sequences": 4, "cache_dir": str(tmp_path / "seed")},
    }
    for k, v in method.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) else v
    return validate(
        {
            "model": {"path": "tiny"},
            "output": {"dir": str(tmp_path / "out")},
            "quant": QUANT.model_dump(),
            "method": base,
        }
    )


def _run(cfg):
    teacher = make_tiny_llama(hidden=32)
    student = make_student(teacher, cfg.quant, cfg.method.learnable_scales)
    hist = train(teacher, student, None, cfg, progress=False)
    return hist, student, teacher


def test_seeded_runs_reproduce_exactly(tmp_path):
    cfg = _cfg(tmp_path)
    h1, s1, teacher = _run(cfg)
    h2, s2, _ = _run(cfg)
    for k in ("loss", "kl", "sam_loss", "gen_obj", "gen_kl", "lr"):
        assert h1[k] == h2[k], k
    assert all(torch.equal(a, b) for a, b in zip(s1.parameters(), s2.parameters(), strict=True))
    assert _no_grads(teacher) and all(p.grad is None for p in s1.parameters())
    assert len(h1["loss"]) == 3 and all(v is not None for v in h1["gen_obj"])
    json.dumps({k: v for k, v in h1.items()})  # goes into zsaq_report.json as is
    png = plot_history(h1, str(tmp_path / "curves.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_history_names_the_seed_set_it_trained_on(tmp_path):
    """``seed_data`` holds the size and the SHA-256 of the int64 token ids the run loaded (the cache's file); another
    seed draws another set, and ``noise``, which reads none, records none."""
    import hashlib

    from zsaq_dist.minimax.trainer import load_seed_ids

    cfg = _cfg(tmp_path, steps=1)
    hist, _, teacher = _run(cfg)
    ids = load_seed_ids(teacher, None, None, cfg.method)
    want = hashlib.sha256(ids.numpy().astype("int64").tobytes()).hexdigest()
    assert hist["seed_data"] == {"sequences": 4, "seq_len": 8, "tokens_sha256": want}
    other, _, _ = _run(_cfg(tmp_path, steps=1, seed=1))
    assert other["seed_data"]["sequences"] == 4 and other["seed_data"]["tokens_sha256"] != want
    assert "seed_data" not in _run(_cfg(tmp_path, steps=1, name="noise"))[0]


def _assert_same_run(h1, s1, h2, s2):
    """Two runs' histories (loss, KL, SAM loss, lr) and every student parameter are equal, bit for bit."""
    for k in ("loss", "kl", "sam_loss", "lr"):
        assert h1[k] == h2[k], k
    assert all(torch.equal(a, b) for a, b in zip(s1.parameters(), s2.parameters(), strict=True))


def test_a_frozen_generator_at_radius_0_trains_as_self_sample(tmp_path):
    """With ``ascent: false`` the generator only moves each seed embedding, by at most ``radius`` times its norm;
    at radius 0 the run is ``self_sample``'s bit for bit (same sequences, same order, same student steps), so a
    gap between the ``ascent=false`` and ``self_sample`` rows is that frozen move's and nothing else's."""
    h_self, s_self, _ = _run(_cfg(tmp_path, name="self_sample"))
    h_gen, s_gen, _ = _run(_cfg(tmp_path, ascent=False, generator={"radius": 0.0}))
    assert (h_self["mode"], h_gen["mode"]) == ("self_sample", "adversarial")
    _assert_same_run(h_self, s_self, h_gen, s_gen)
    h_moved, _, _ = _run(_cfg(tmp_path, ascent=False))  # the default radius 0.1: the inputs move, the run differs
    assert h_moved["kl"] != h_self["kl"]


def test_a_frozen_zero_init_generator_trains_as_self_sample(tmp_path):
    """``generator.adapter_init: zero`` starts the generator as the identity, so with ``ascent: false`` the run is
    ``self_sample``'s bit for bit at the default radius; with the ascent it is not: every move of its inputs away
    from the seed embeddings is one the ascent made."""
    h_self, s_self, _ = _run(_cfg(tmp_path, name="self_sample"))
    h_frozen, s_frozen, _ = _run(_cfg(tmp_path, ascent=False, generator={"adapter_init": "zero"}))
    _assert_same_run(h_self, s_self, h_frozen, s_frozen)
    h_ascent, _, _ = _run(_cfg(tmp_path, generator={"adapter_init": "zero"}))
    assert h_ascent["kl"][0] != h_self["kl"][0]  # the first ascent step comes before the first student step


def test_a_zero_init_generator_starts_as_the_identity_and_its_ascent_moves_it():
    teacher, student, _, cfg, e, z = _setup(nat=0.0)
    torch.manual_seed(0)
    gen = Generator(32, 8, 16, 0.5, init="zero")
    with torch.no_grad():
        assert torch.equal(gen(z, e), e)
    params = list(gen.parameters())
    generator_objective(teacher, student, gen, z, e, cfg)[0].backward(inputs=params)
    first, _, last_w, last_b = (p.grad for p in params)
    assert last_w.abs().sum() > 0 and last_b.abs().sum() > 0  # the ascent reaches the output layer at once
    assert first.abs().sum() == 0  # and the hidden layer only once the output layer is no longer zero
    before, after = _kl_before_and_after_ascent(teacher, student, gen, cfg, e, z)
    assert after > before * 1.05
    with torch.no_grad():
        x = gen(z, e)
    assert not torch.equal(x, e) and ((x - e).norm(dim=-1) / e.norm(dim=-1)).max() <= 0.5 + 1e-6
    with pytest.raises(ValueError, match="'random' or 'zero'"):
        Generator(32, 8, 16, 0.5, init="ones")


@pytest.mark.parametrize(
    "method,mode,gen_steps",
    [
        ({"name": "self_sample"}, "self_sample", 0),
        ({"name": "noise"}, "noise", 0),
        ({"ascent": False}, "adversarial", 0),
        ({"generator": {"student_steps_per_generator_step": 2}}, "adversarial", 2),
        ({"lambda_hidden": 0.5, "learnable_scales": False, "adaptive_sam": True, "sam_space": "latent", "rho": 0.5}, "adversarial", 3),
    ],
)
def test_modes_train(tmp_path, method, mode, gen_steps):
    cfg = _cfg(tmp_path, **method)
    hist, student, _ = _run(cfg)
    assert hist["mode"] == mode and len(hist["kl"]) == 3
    assert sum(v is not None for v in hist["gen_obj"]) == gen_steps
    if cfg.method.lambda_hidden > 0:
        assert all(loss > kl for loss, kl in zip(hist["loss"], hist["kl"], strict=True))
    scales_moved = any(not torch.equal(m.weight_scale, m0.weight_scale) for m, m0 in _scale_pairs(student, cfg))
    assert scales_moved == cfg.method.learnable_scales


def _scale_pairs(student, cfg):
    from zsaq_dist.quant import quant_modules

    rtn = make_student(make_tiny_llama(hidden=32), cfg.quant)
    return [(m, m0) for (_, m), (_, m0) in zip(quant_modules(student), quant_modules(rtn), strict=True)]


def test_qwen2_and_separate_seed_model(tmp_path):
    cfg = _cfg(tmp_path, steps=2, seed_data={"seed_model": "tiny-seed-lm"})
    teacher = make_tiny_qwen2(hidden=32)
    student = make_student(teacher, cfg.quant, True)
    with pytest.raises(ConfigError, match="seed_model"):
        train(teacher, student, None, cfg, progress=False)
    hist = train(teacher, student, None, cfg, progress=False, seed_model=make_tiny_llama(hidden=32))
    assert len(hist["kl"]) == 2 and all(v > 0 for v in hist["kl"])


def test_rtn_does_not_train(tmp_path):
    hist, student, teacher = _run(_cfg(tmp_path, name="rtn"))
    assert hist["loss"] == [] and hist["total_seconds"] == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_train_on_cuda(tmp_path, dtype):
    """Every tensor of the game lands on the model's device and dtype; the KL still goes down."""
    cfg = _cfg(tmp_path, steps=6, lr=1e-4, scale_lr=1e-5)
    teacher = make_tiny_llama(hidden=32).to("cuda", dtype)
    student = make_student(teacher, cfg.quant, True)
    hist = train(teacher, student, None, cfg, progress=False)
    assert all(torch.isfinite(torch.tensor(hist[k])).all() for k in ("loss", "sam_loss", "gen_obj"))
    assert next(student.parameters()).device.type == "cuda"
    if dtype == torch.float32:
        assert min(hist["kl"][3:]) < hist["kl"][0]


def _saved_bytes(fn) -> int:
    seen: set[int] = set()
    total = 0

    def pack(t):
        nonlocal total
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


@pytest.mark.parametrize("act_bits", [None, 8])
def test_recompute_fake_quant_gives_the_same_gradients_and_keeps_less(act_bits):
    """method.recompute_fake_quant: same loss and gradients bit for bit; the weight-sized intermediates are gone."""
    teacher = freeze(make_tiny_llama(seed=5, hidden=64, layers=2))
    quant = QuantCfg.model_validate({"weights": {"bits": 4, "group_size": 16}, "activations": act_bits and {"bits": 8}})
    x = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    grads, saved = [], []
    for recompute in (False, True):
        student = make_student(teacher, quant, learnable_scales=True, recompute=recompute)
        nbytes, logits = _saved_bytes(lambda s=student: s(input_ids=x).logits)
        logits.float().pow(2).mean().backward()
        params = [p for p in student.parameters() if p.requires_grad]
        grads.append([p.grad.clone() for p in params])
        saved.append(nbytes)
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
    assert saved[1] < 0.5 * saved[0], saved
    with torch.no_grad():  # inference does not go through the checkpoint
        student(input_ids=x)


def test_kl_per_sample_averages_to_the_batch_kl():
    s, t = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    per = losses.kl_with_per_sample(s, t, tau=2.0)[1]
    assert per.shape == (3,) and not per.requires_grad
    torch.testing.assert_close(per.mean(), losses.kl(s, t, tau=2.0))
    torch.testing.assert_close(per[1], losses.kl(s[1:2], t[1:2], tau=2.0))


def test_seed_picker_goes_in_order_then_draws_the_hard_sequences():
    from zsaq_dist.minimax.trainer import SeedPicker

    plain = SeedPicker(4, 0.0, seed=0)
    assert plain.rows(7, range(6, 10)).tolist() == [2, 3, 0, 1]  # hardness 0: i mod N, as before
    p = SeedPicker(4, 2.0, seed=0)
    assert p.rows(0, range(0, 4)).tolist() == [0, 1, 2, 3]  # the first pass is in order
    torch.testing.assert_close(p.weights(), torch.full((4,), 0.25, dtype=torch.float64))  # nothing seen yet
    p.observe(torch.tensor([0, 1, 2]), torch.tensor([0.1, 0.2, 0.3]))
    kl = torch.tensor([0.1, 0.2, 0.3, 0.3], dtype=torch.float64)  # sequence 3, unseen, counts as the hardest seen
    torch.testing.assert_close(p.weights(), torch.softmax(2.0 * kl / kl.mean(), 0))
    # a draw depends only on the state and (seed, step, i): how the batch is split does not matter
    whole = p.rows(5, range(20, 24))
    assert torch.equal(torch.cat([p.rows(5, range(20, 22)), p.rows(5, range(22, 24))]), whole)
    assert torch.equal(SeedPicker(4, 2.0, seed=1).rows(5, range(20, 24)), SeedPicker(4, 2.0, seed=1).rows(5, range(20, 24)))
    p.observe(torch.tensor([3]), torch.tensor([5.0]))  # one sequence far harder than the rest
    assert (p.rows(6, range(24, 1024)) == 3).float().mean() > 0.9
    q = SeedPicker(4, 2.0, seed=0)
    q.load_state_dict(p.state_dict())
    assert torch.equal(q.rows(9, range(36, 44)), p.rows(9, range(36, 44)))


def test_the_game_trains_on_the_sequences_it_found_hard(tmp_path, monkeypatch):
    """With ``seed_hardness`` the trainer records every sequence's KL and later steps draw from it; ascent=false does not."""
    from zsaq_dist.minimax import trainer

    asked, observed, pickers = [], [], []
    rows, observe, init = trainer.SeedPicker.rows, trainer.SeedPicker.observe, trainer.SeedPicker.__init__
    monkeypatch.setattr(trainer.SeedPicker, "__init__", lambda self, *a: (init(self, *a), pickers.append(self))[0])
    monkeypatch.setattr(trainer.SeedPicker, "rows", lambda self, step, idx: asked.append(rows(self, step, idx)) or asked[-1])
    monkeypatch.setattr(trainer.SeedPicker, "observe", lambda self, r, kl: (observed.append(kl), observe(self, r, kl))[1])
    cfg = _cfg(tmp_path, steps=6, generator={"seed_hardness": 3.0})
    teacher = make_tiny_llama(hidden=32)
    hist = train(teacher, make_student(teacher, cfg.quant, True), None, cfg, progress=False)
    picker = pickers[-1]
    assert picker.hardness == 3.0 and not torch.isnan(picker.kl).any()  # every sequence measured
    # each step asks for its rows three times (generator, student batch, observe): always the same ones
    steps = [asked[3 * k].tolist() for k in range(6)]
    assert all(torch.equal(asked[3 * k], asked[3 * k + j]) for k in range(6) for j in (1, 2))
    assert steps[:2] == [[0, 1], [2, 3]] and steps[2:] != [[0, 1], [2, 3]] * 2  # in order, then drawn
    # what it records is the student's KL on the batch it trained on, at w (the step's logged KL)
    assert [kl.mean().item() for kl in observed] == pytest.approx(hist["kl"], rel=1e-5)
    m = _cfg(tmp_path, ascent=False, generator={"seed_hardness": 3.0}).method
    frozen = trainer.Inputs(teacher, "adversarial", m, torch.zeros(4, 8, dtype=torch.long))
    assert frozen.picker.hardness == 0.0  # the ablation freezes the whole generator: in order


def test_fresh_per_epoch_trains_on_new_sequences_every_pass(tmp_path, monkeypatch):
    """5 steps x 2 samples with 4 sequences per pass: a pool of 12, sample i takes row i (none twice), the first
    pass is the plain run's set, and the block warm-up takes that first set alone."""
    from zsaq_dist.minimax import blockwise, trainer

    asked, warmed = [], []
    rows, batches = trainer.SeedPicker.rows, blockwise.seed_batches
    monkeypatch.setattr(trainer.SeedPicker, "rows", lambda self, step, idx: asked.append(rows(self, step, idx)) or asked[-1])
    monkeypatch.setattr(blockwise, "seed_batches", lambda t, ls, ids, *a: warmed.append(ids) or batches(t, ls, ids, *a))
    cfg = _cfg(tmp_path, steps=5, block_warmup_steps=1, seed_data={"fresh_per_epoch": True})
    teacher = make_tiny_llama(hidden=32)
    train(teacher, make_student(teacher, cfg.quant, True), None, cfg, progress=False)
    pool = trainer.load_seed_ids(teacher, None, None, cfg.method)  # the cache the run wrote
    plain = trainer.load_seed_ids(teacher, None, None, _cfg(tmp_path).method)
    assert len(list((tmp_path / "seed").glob("seed-*.pt"))) == 2  # the pool's and the plain set's
    assert pool.shape == (12, 8) and torch.equal(pool[:4], plain)
    assert len({tuple(r) for r in pool.tolist()}) == 12  # every pass brings new sequences
    assert sorted(set(torch.cat(asked).tolist())) == list(range(10))  # samples 0..9, each its own row
    assert len(warmed) == 1 and torch.equal(warmed[0], plain)


@pytest.mark.parametrize("fraction,clean", [(0.0, []), (0.5, [1, 3, 5]), (0.25, [3]), (1.0, [0, 1, 2, 3, 4, 5])])
def test_clean_fraction_feeds_that_share_of_samples_the_seed_embeddings(fraction, clean):
    from zsaq_dist.minimax.trainer import Inputs, clean_samples

    teacher = freeze(make_tiny_llama(hidden=32))
    ids = torch.randint(0, 128, (6, 8), generator=torch.Generator().manual_seed(1))
    cfg = MethodCfg.model_validate({"seq_len": 8, "generator": {"noise_dim": 8, "hidden_dim": 16, "clean_fraction": fraction}})
    torch.manual_seed(0)
    inp = Inputs(teacher, "adversarial", cfg, ids)
    idx = range(6)
    x, e = inp.student_batch(2, idx), inp.seed_embeds(idx, 2)
    assert clean_samples(idx, fraction).nonzero().flatten().tolist() == clean
    assert [i for i in idx if torch.equal(x[i], e[i])] == clean  # the others are the generator's (radius > 0)
    # by global sample number: a worker's share of the batch is the same rows of the whole batch
    assert torch.equal(inp.student_batch(2, range(3, 6)), x[3:])
    assert clean_samples(range(100), 0.3).sum() == 30


def test_a_fading_radius_goes_from_radius_to_radius_final_and_ends_on_the_seed_embeddings():
    """``generator.radius_final``: step ``k`` of ``steps`` takes the radius ``rho_at(k, steps, radius, radius_final)``
    for its student batch (and its ascent); at ``radius_final: 0`` the last step's inputs are the seed embeddings
    exactly, and no step's move is larger than its radius."""
    from zsaq_dist.minimax.trainer import Inputs
    from zsaq_dist.optim.schedule import rho_at

    teacher = freeze(make_tiny_llama(hidden=32))
    ids = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(1))
    gen = {"noise_dim": 8, "hidden_dim": 16, "radius": 0.3, "radius_final": 0.0}
    cfg = MethodCfg.model_validate({"seq_len": 8, "steps": 5, "generator": gen})
    torch.manual_seed(0)
    inp = Inputs(teacher, "adversarial", cfg, ids)
    with torch.no_grad():
        inp.generator.adapter[2].weight.mul_(100)  # saturate tanh: each move reaches its bound
    idx = range(4)
    ratios = []
    for step in range(5):
        inp.begin_step(step)
        assert inp.generator.radius == rho_at(step, 5, 0.3, 0.0)
        x, e = inp.student_batch(step, idx), inp.seed_embeds(idx, step)
        ratios.append(((x - e).norm(dim=-1) / e.norm(dim=-1)).max().item())
        assert ratios[-1] <= inp.generator.radius + 1e-6
    assert ratios[0] > 0.25 and ratios[0] > ratios[1] > ratios[2] > ratios[3] > 0
    assert torch.equal(x, e)  # radius 0 at the last step: the seed embeddings as they are
    constant = Inputs(teacher, "adversarial", MethodCfg.model_validate(
        {"seq_len": 8, "steps": 5, "generator": gen | {"radius_final": None}}), ids)
    constant.begin_step(4)
    assert constant.generator.radius == 0.3  # null: the radius stays constant


def test_a_run_with_a_fading_radius_starts_as_the_constant_one_and_then_departs(tmp_path):
    h_const, _, _ = _run(_cfg(tmp_path))
    h_fade, _, _ = _run(_cfg(tmp_path, generator={"radius_final": 0.0}))
    assert h_fade["kl"][0] == h_const["kl"][0] and h_fade["gen_kl"][0] == h_const["gen_kl"][0]
    assert h_fade["kl"][1:] != h_const["kl"][1:] and h_fade["gen_kl"][1:] != h_const["gen_kl"][1:]
