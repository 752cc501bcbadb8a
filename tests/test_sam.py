"""SAM perturb/restore: equals a reference implementation, restores bit-exactly, rho=0 is plain AdamW."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from conftest import make_tiny_llama
from torch import nn

from zsaq_dist.config import MethodCfg, QuantCfg
from zsaq_dist.minimax.step import Targets, sam_student_step, student_loss, teacher_targets, torch_mechanics
from zsaq_dist.minimax.student import make_optimizer, make_student, student_params
from zsaq_dist.optim import global_norm, grad_norm, lr_factor, perturb, perturb_tensors, restore


class RefSAM:
    """Straightforward SAM (davda54/sam style), written independently of zsaq_dist.optim."""

    def __init__(self, params, base, rho, adaptive=False):
        self.params, self.base, self.rho, self.adaptive = list(params), base, rho, adaptive

    @torch.no_grad()
    def first_step(self):
        norm = torch.norm(torch.stack([((p.abs() if self.adaptive else 1.0) * p.grad).norm(2) for p in self.params]), 2)
        self.old = [p.clone() for p in self.params]
        for p in self.params:
            e = (torch.pow(p, 2) if self.adaptive else 1.0) * p.grad * (self.rho / (norm + 1e-12))
            p.add_(e)
        self.base.zero_grad()

    @torch.no_grad()
    def second_step(self):
        for p, old in zip(self.params, self.old, strict=True):
            p.copy_(old)
        self.base.step()
        self.base.zero_grad()


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_matches_reference_over_steps(adaptive):
    x, y = _data()
    ref, ours = _mlp(), _mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    our_opt = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    sam = RefSAM(ref.parameters(), ref_opt, rho=0.2, adaptive=adaptive)
    mech = torch_mechanics(our_opt, list(ours.parameters()))

    def loss_fn(model):
        loss = (model(x) - y).pow(2).mean()
        return loss, {"loss": float(loss.detach())}

    for _ in range(5):
        loss_fn(ref)[0].backward()
        sam.first_step()
        loss_fn(ref)[0].backward()
        sam.second_step()
        sam_student_step(lambda: loss_fn(ours), mech, rho=0.2, adaptive=adaptive)
    for a, b in zip(ref.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # and SAM really differs from plain SGD here
    plain = _mlp()
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    for _ in range(5):
        loss_fn(plain)[0].backward()
        opt.step()
        opt.zero_grad()
    assert not torch.allclose(plain[0].weight, ours[0].weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_restore_is_bit_exact(dtype):
    g = torch.Generator().manual_seed(0)
    ps = [nn.Parameter(torch.randn(7, 5, generator=g).to(dtype)), nn.Parameter(torch.randn(3, generator=g).to(dtype))]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(dtype)
    before = [p.detach().clone() for p in ps]
    state = perturb(ps, rho=0.37)
    assert all(not torch.equal(p, b) for p, b in zip(ps, before, strict=True))
    restore(state)
    for p, b in zip(ps, before, strict=True):
        assert torch.equal(
            p.view(torch.int16 if dtype != torch.float32 else torch.int32),
            b.view(torch.int16 if dtype != torch.float32 else torch.int32),
        )


def test_perturbation_has_norm_rho_and_skips_gradless():
    ps = [nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(3)), nn.Parameter(torch.zeros(2))]
    ps[0].grad, ps[1].grad = torch.arange(4.0), torch.full((3,), -2.0)
    state = perturb(ps, rho=0.5)
    e = torch.cat([ps[0].detach() - 1, ps[1].detach() - 1])
    torch.testing.assert_close(e.norm(), torch.tensor(0.5))
    assert torch.equal(ps[2], torch.zeros(2)) and len(state.tensors) == 2
    torch.testing.assert_close(torch.tensor(state.norm), torch.cat([ps[0].grad, ps[1].grad]).norm())


def test_perturb_without_a_copy_moves_the_same_and_restore_leaves_it():
    a, b = torch.zeros(4), torch.zeros(4)
    g = torch.arange(4.0)
    kept = perturb_tensors([a], [g], rho=0.5)
    free = perturb_tensors([b], [g], rho=0.5, keep=False)
    assert torch.equal(a, b) and free.norm == kept.norm and not free.saved and not free.tensors
    restore(free)
    restore(kept)
    assert torch.equal(a, torch.zeros(4)) and not torch.equal(b, torch.zeros(4))


def test_partitions_give_the_full_norm_and_perturbation():
    """Perturbing flat partitions (as ZeRO-3's ds_tensor) with their grad slices equals perturbing the whole."""
    g = torch.Generator().manual_seed(3)
    full, grad = torch.randn(20, generator=g), torch.randn(20, generator=g)
    parts, gparts = [full[:7].clone(), full[7:].clone()], [grad[:7], grad[7:]]
    torch.testing.assert_close(global_norm(parts, gparts), grad.norm())
    whole = nn.Parameter(full.clone())
    whole.grad = grad.clone()
    perturb([whole], 0.3)
    perturb_tensors(parts, gparts, 0.3)
    # equal up to summation order of the norm (partial sums of squares vs one sum)
    torch.testing.assert_close(torch.cat(parts), whole.detach(), rtol=1e-6, atol=1e-7)


def test_rho_zero_is_plain_adamw_bit_for_bit():
    teacher = make_tiny_llama(hidden=32)
    cfg = MethodCfg(lr=1e-3, scale_lr=1e-3, rho=0.0)
    quant = QuantCfg.model_validate({"weights": {"bits": 4, "group_size": 16}})
    s_sam, s_ref = make_student(teacher, quant, True), make_student(teacher, quant, True)
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(0))
    target = teacher_targets(teacher, x, cfg)
    w, s = student_params(s_sam)
    opt = make_optimizer(w, s, cfg)
    mech = torch_mechanics(opt, w)
    w2, s2 = student_params(s_ref)
    ref_opt = torch.optim.AdamW(
        [{"params": w2, "lr": 1e-3, "weight_decay": 0.0}, {"params": s2, "lr": 1e-3, "weight_decay": 0.0}]
    )
    for _ in range(3):
        sam_student_step(lambda: student_loss(s_sam, x, target, cfg), mech, rho=0.0)
        student_loss(s_ref, x, Targets(target.logits), cfg)[0].backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for a, b in zip(s_sam.parameters(), s_ref.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(w[0], copy.deepcopy(teacher).model.layers[0].self_attn.q_proj.weight)


def test_rho_zero_perturbation_is_exactly_zero():
    p = nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    before = p.detach().clone()
    perturb([p], rho=0.0)
    assert torch.equal(p.detach(), before)


def test_grad_norm_with_gloo_group_of_one(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        ps = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(6))]
        for p in ps:
            p.grad = torch.randn_like(p)
        local = torch.cat([p.grad.flatten() for p in ps]).norm()
        torch.testing.assert_close(grad_norm(ps), local)
        torch.testing.assert_close(grad_norm(ps, group=group), local)
        torch.testing.assert_close(grad_norm(ps, group=dist.group.WORLD), local)
        before = [p.detach().clone() for p in ps]
        state = perturb(ps, 0.1, group=group)
        restore(state)
        assert all(torch.equal(p, b) for p, b in zip(ps, before, strict=True))
    finally:
        dist.destroy_process_group()


def test_lr_schedule():
    assert lr_factor(0, 10, warmup=2) == pytest.approx(1 / 3)
    assert lr_factor(2, 10, warmup=2) == pytest.approx(1.0)
    assert lr_factor(6, 10, warmup=2) == pytest.approx(0.5)
    assert lr_factor(9, 10, warmup=0, kind="constant") == 1.0
    assert all(lr_factor(s, 10) >= lr_factor(s + 1, 10) for s in range(10))
