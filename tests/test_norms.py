"""Training the student's norm layers (``method.norm_lr``), the "(and norms)" of issue #3's scales-first lever.

Off by default (the norms stay at the teacher's values, the optimizer is the old one); on, the norms of
every decoder layer and the final norm train at ``norm_lr`` with the scales (from step 0, so also while
``scales_only_steps`` holds the weights), in the block warm-up as well, and the export writes them.
The DeepSpeed game's test is in tests/test_levers.py, whose process group DeepSpeed keeps.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_qwen2, save_tiny
from test_levers import QUANT, _same, _snapshot
from test_levers import _cfg as levers_cfg

from zsaq_dist.config import MethodCfg, validate
from zsaq_dist.errors import ConfigError
from zsaq_dist.minimax.generator import Generator, noise
from zsaq_dist.minimax.step import (
    generator_ascent_step,
    generator_objective,
    seed_embeddings,
    student_loss,
    teacher_targets,
)
from zsaq_dist.minimax.student import (
    freeze,
    is_norm,
    make_optimizer,
    make_student,
    norm_params,
    set_trainable,
    student_params,
)
from zsaq_dist.minimax.trainer import train
from zsaq_dist.quant import quant_modules


def _cfg(tmp_path, **method):
    """tests/test_levers.py's tiny game (4 steps, SAM, no warm-up) with the norms trained."""
    return levers_cfg(tmp_path, **{"norm_lr": 1e-3, **method})


def _norm_names(model) -> set[str]:
    return {f"{n}.{k}" for n, m in model.named_modules() if is_norm(m) for k, _ in m.named_parameters(recurse=False)}


def _quant_names(model) -> set[str]:
    return {f"{n}.{k}" for n, _ in quant_modules(model) for k in ("weight", "weight_scale")}


def _moved(student, teacher) -> set[str]:
    """The student's tensors that differ from the teacher's tensor of the same name."""
    t_state = teacher.state_dict()
    return {n for n, v in student.state_dict().items() if n in t_state and not torch.equal(v, t_state[n])}


# --- which tensors, and the optimizer --------------------------------------------------------------


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_qwen2])
def test_the_norms_are_every_layers_two_and_the_final_one(make):
    model = make(hidden=32, layers=2)
    expected = {f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")}
    assert _norm_names(model) == expected | {"model.norm.weight"}


def test_norms_are_frozen_by_default_and_the_optimizer_is_the_old_one():
    m = MethodCfg()
    assert m.norm_lr == 0.0
    student = make_student(make_tiny_llama(hidden=32), QUANT, True)
    assert norm_params(student) == []
    assert {n for n, p in student.named_parameters() if p.requires_grad} == _quant_names(student)
    opt = make_optimizer(*student_params(student), m, norm_params(student))
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(m.lr, m.weight_decay), (m.scale_lr, 0.0)]


def test_train_norms_makes_them_trainable_in_their_own_group():
    m = MethodCfg(norm_lr=2e-4, weight_decay=0.1)
    student = make_student(make_tiny_llama(hidden=32), QUANT, True, train_norms=True)
    norms = norm_params(student)
    names = {n for n, p in student.named_parameters() if p.requires_grad}
    assert names == _quant_names(student) | _norm_names(student) and len(norms) == len(_norm_names(student))
    opt = make_optimizer(*student_params(student), m, norms)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(m.lr, 0.1), (m.scale_lr, 0.0), (2e-4, 0.0)]
    assert opt.param_groups[2]["params"] == norms


def test_a_model_without_norm_layers_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    with pytest.raises(ConfigError, match="set method.norm_lr: 0"):
        set_trainable(model, False, train_norms=True)


def test_config_rejects_a_negative_norm_lr(tmp_path):
    with pytest.raises(ConfigError, match="greater than or equal to 0"):
        _cfg(tmp_path, norm_lr=-1e-4)


# --- gradient ownership ----------------------------------------------------------------------------


def test_the_norms_take_gradients_in_the_student_phase_only():
    teacher = freeze(make_tiny_llama(hidden=32))
    student = make_student(teacher, QUANT, True, train_norms=True)
    cfg = MethodCfg.model_validate({"seq_len": 8, "norm_lr": 1e-4, "generator": {"noise_dim": 8, "hidden_dim": 16}})
    torch.manual_seed(0)
    gen = Generator(32, 8, 16, 0.5)
    e = seed_embeddings(teacher, torch.randint(0, 128, (3, 8), generator=torch.Generator().manual_seed(1)))
    z = noise(0, 0, range(3), (8, 8))
    params = list(gen.parameters())
    generator_ascent_step(
        lambda: generator_objective(teacher, student, gen, z, e, cfg), params, torch.optim.Adam(params), 1.0
    )
    assert all(p.grad is None for p in list(student.parameters()) + list(teacher.parameters()))
    with torch.no_grad():
        x = gen(z, e)
    student_loss(student, x, teacher_targets(teacher, x, cfg), cfg)[0].backward()
    got = {n for n, p in student.named_parameters() if p.grad is not None}
    assert got == _quant_names(student) | _norm_names(student)
    assert all(p.grad is None for p in teacher.parameters())


# --- the single-process trainer and the block warm-up ----------------------------------------------


def _train_with_snapshots(cfg, layers=2):
    """Single-process run; (history, [(weights, scales, norms) after every step], student, teacher)."""
    teacher = make_tiny_llama(hidden=32, layers=layers)
    student = make_student(teacher, cfg.quant, True)  # train() makes the norms trainable from norm_lr
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    groups = []

    def snap(*_):
        if not groups:  # after the warm-up (if any), when train() has set what is trainable
            weights, scales = student_params(student)
            groups.extend([weights, scales, norm_params(student)])
        return tuple(_snapshot(g) for g in groups)

    snaps = []
    hist = train(teacher, student, None, cfg, progress=False, on_step=lambda s, m: snaps.append(snap()))
    assert all(torch.equal(v, t0[k]) for k, v in teacher.state_dict().items())
    return hist, snaps, student, teacher


def test_trainer_trains_the_norms_from_step_zero_also_while_only_the_scales_do(tmp_path):
    k = 2
    cfg = _cfg(tmp_path, scales_only_steps=k)
    hist, snaps, student, teacher = _train_with_snapshots(cfg)
    assert hist["lr"][:k] == [0.0] * k
    for step in range(1, k):  # weights held, scales and norms moving
        assert _same(snaps[step][0], snaps[step - 1][0]), step
        assert not _same(snaps[step][1], snaps[step - 1][1]) and not _same(snaps[step][2], snaps[step - 1][2]), step
    for step in range(k, 4):
        assert not any(_same(snaps[step][i], snaps[step - 1][i]) for i in range(3)), step
    moved = _moved(student, teacher)
    assert _norm_names(student) <= moved and not (moved - _norm_names(student) - _quant_names(student))


def test_norm_lr_zero_leaves_the_norms_at_the_teachers_values(tmp_path):
    _, _, student, teacher = _train_with_snapshots(_cfg(tmp_path, norm_lr=0.0))
    assert _moved(student, teacher) == {f"{n}.weight" for n, _ in quant_modules(student)}


def test_the_block_warmup_trains_each_layers_norms_and_puts_them_back_with_the_layer(tmp_path):
    cfg = _cfg(tmp_path, steps=0, block_warmup_steps=6, block_warmup_lr=3e-4, norm_lr=1e-3)
    hist, _, student, teacher = _train_with_snapshots(cfg, layers=3)
    assert all(r["kept"] and r["loss_after"] < r["loss_before"] for r in hist["block_warmup"]["layers"])
    moved = _moved(student, teacher)
    layer_norms = _norm_names(student) - {"model.norm.weight"}
    assert layer_norms <= moved and "model.norm.weight" not in moved  # the final norm is in no decoder layer
    # a warm-up that makes every layer worse puts its norms back too
    cfg = _cfg(tmp_path, steps=0, block_warmup_steps=2, block_warmup_lr=1.0, norm_lr=1.0)
    hist, _, student, teacher = _train_with_snapshots(cfg)
    assert [r["kept"] for r in hist["block_warmup"]["layers"]] == [False, False]
    assert not _moved(student, teacher) & _norm_names(student)


# --- the export ------------------------------------------------------------------------------------


def test_quantize_with_norms_exports_the_trained_norms(tmp_path):
    """`zsaq quantize` with ``norm_lr``: the checkpoint holds the trained norms and reloads to the student's logits."""
    import yaml
    from safetensors.torch import load_file
    from test_load_fixtures import make_word_tokenizer
    from transformers import AutoModelForCausalLM

    from zsaq_dist.cli import main
    from zsaq_dist.config import ModelCfg
    from zsaq_dist.io.load import load_model

    model_dir = save_tiny(make_tiny_llama(), tmp_path / "m")
    make_word_tokenizer().save_pretrained(model_dir)
    raw = _cfg(tmp_path, steps=2, block_warmup_steps=2).model_dump(mode="json")
    raw |= {"model": {"path": model_dir}, "dist": {"launcher": "local"}}
    raw["quant"] = {"weights": {"bits": 4, "group_size": 32}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    assert main(["quantize", str(tmp_path / "cfg.yaml")]) == 0

    cfg = validate(raw)
    teacher, tok = load_model(ModelCfg(path=model_dir))
    student = make_student(teacher, cfg.quant, True)
    train(teacher, student, tok, cfg, progress=False)  # the seed sequences come from the run's cache
    written = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        written |= load_file(f)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for name in _norm_names(student):
        assert torch.equal(written[name], s_state[name]) and not torch.equal(written[name], t_state[name]), name
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = student(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
