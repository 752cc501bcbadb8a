"""Block-by-block warm-up (``method.block_warmup_steps``): the layer stream reproduces the model, only the
warmed layer's quantized weights move and its error falls, runs reproduce, the export reloads exactly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_qwen2, save_tiny

from zsaq_dist.config import QuantCfg, validate
from zsaq_dist.errors import ConfigError
from zsaq_dist.minimax.blockwise import (
    Batch,
    Part,
    block_warmup,
    capture_layer_inputs,
    decoder_layers,
    layer_loss,
    warm_layer,
)
from zsaq_dist.minimax.step import seed_embeddings
from zsaq_dist.minimax.student import freeze, make_student
from zsaq_dist.minimax.trainer import plot_history, train
from zsaq_dist.quant import quant_modules

QUANT = QuantCfg.model_validate({"weights": {"bits": 3, "group_size": 16}})


def _cfg(tmp_path, quant=QUANT, **method):
    base = {
        "steps": 0,
        "batch_size": 2,
        "seq_len": 8,
        "seed": 3,
        "block_warmup_steps": 6,
        "block_warmup_lr": 3e-4,
        "scale_lr": 1e-4,
        "generator": {"noise_dim": 8, "hidden_dim": 16},
        "seed_data": {"num_sequences": 5, "cache_dir": str(tmp_path / "seed")},
    }
    return validate(
        {
            "model": {"path": "tiny"},
            "output": {"dir": str(tmp_path / "out")},
            "quant": quant.model_dump(),
            "method": {**base, **method},
            "dist": {"launcher": "local"},
        }
    )


def _ids(n=3, t=8, seed=1):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_qwen2])
def test_layer_stream_reproduces_the_models_hidden_states(make):
    """Layer 0's captured inputs, run through the layers one by one, give the model's own hidden states exactly."""
    model = freeze(make(hidden=32, layers=3))
    _, layers = decoder_layers(model)
    x = seed_embeddings(model, _ids())
    with torch.no_grad():
        ref = model(inputs_embeds=x, output_hidden_states=True, use_cache=False).hidden_states
    h, kwargs = capture_layer_inputs(model, layers, x)
    assert torch.equal(h, ref[0])
    with torch.no_grad():
        for i, layer in enumerate(layers[:-1]):  # the last entry of hidden_states is after the final norm
            out = layer(h, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
            assert torch.equal(h, ref[i + 1]), i


W4A8 = QuantCfg.model_validate({"weights": {"bits": 4, "group_size": 16}, "activations": {"bits": 8}})


@pytest.mark.parametrize("quant", [QUANT, W4A8], ids=["w3", "w4a8"])
def test_warmup_moves_only_quantized_weights_and_lowers_every_layers_error(tmp_path, quant):
    """Also with int8 activations (W4A8): the warm-up trains through their fake quantization as the game does."""
    cfg = _cfg(tmp_path, quant)
    teacher = make_tiny_llama(hidden=32, layers=3)
    student = make_student(teacher, cfg.quant, cfg.method.learnable_scales)
    assert {q.act_bits for _, q in quant_modules(student)} == {8 if quant.activations else None}
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    hist = train(teacher, student, None, cfg, progress=False)
    rec = hist["block_warmup"]
    assert [r["layer"] for r in rec["layers"]] == [0, 1, 2] and rec["steps_per_layer"] == 6
    assert all(r["loss_after"] < r["loss_before"] and r["kept"] for r in rec["layers"])
    assert hist["loss"] == []  # 0 end-to-end steps: the warm-up alone
    assert all(torch.equal(v, t0[k]) for k, v in teacher.state_dict().items())
    trained = {f"{n}.{s}" for n, _ in quant_modules(student) for s in ("weight", "weight_scale")}
    for k, v in student.state_dict().items():
        assert torch.equal(v, s0[k]) != (k in trained), k  # every quantized weight and scale moved; nothing else
    assert all(p.grad is None for p in student.parameters()) and all(p.grad is None for p in teacher.parameters())
    json.dumps(hist)  # goes into zsaq_report.json as is


def test_only_the_warmed_layer_gets_gradients(tmp_path):
    cfg = _cfg(tmp_path, learnable_scales=False)
    teacher = freeze(make_tiny_llama(hidden=32, layers=3))
    student = make_student(teacher, cfg.quant, False)
    _, t_layers = decoder_layers(teacher)
    _, s_layers = decoder_layers(student)
    got = set()
    for name, p in list(student.named_parameters()) + [(f"T.{n}", p) for n, p in teacher.named_parameters()]:
        p.requires_grad_(True)  # every tensor could take a gradient: only the warmed layer's weights do
        p.register_hook(lambda g, name=name: got.add(name))
    b = Batch(*capture_layer_inputs(teacher, t_layers, seed_embeddings(teacher, _ids(2))))
    with torch.no_grad():
        target = t_layers[0](b.h_teacher, **b.kwargs)
    b2 = Batch(target[0] if isinstance(target, tuple) else target, b.kwargs)
    with torch.no_grad():
        t1 = t_layers[1](b2.h_teacher, **b2.kwargs)
    t1 = t1[0] if isinstance(t1, tuple) else t1
    row = warm_layer(s_layers[1], [b2], [t1], cfg.method, learnable_scales=False)
    expected = {f"model.layers.1.{n}.weight" for n, _ in quant_modules(s_layers[1])}
    assert got == expected and row["loss_after"] < row["loss_before"]


def test_a_layer_the_warmup_made_worse_is_put_back(tmp_path):
    cfg = _cfg(tmp_path, block_warmup_lr=1.0, block_warmup_steps=2, block_warmup_margin=0)
    teacher = make_tiny_llama(hidden=32, layers=2)
    student = make_student(teacher, cfg.quant, True)
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    rows = train(teacher, student, None, cfg, progress=False)["block_warmup"]["layers"]
    assert [r["kept"] for r in rows] == [False, False] and all(r["loss_after"] > r["loss_before"] for r in rows)
    assert all(torch.equal(v, s0[k]) for k, v in student.state_dict().items())


def _codes(model):
    return {n: q.int_weight() for n, q in quant_modules(model)}


def _bin_offsets(q):
    """Each weight's distance from its code, in quantization steps (O, I), and where the code is not saturated."""
    with torch.no_grad():
        u = q.weight.reshape(*q.weight_scale.shape, -1) / q.weight_scale.unsqueeze(-1)
        if q.weight_zero_point is not None:
            u = u + q.weight_zero_point.unsqueeze(-1).float()
        c = q.int_weight().reshape(u.shape).float()
        inner = (c > -(1 << (q.bits - 1))) & (c < (1 << (q.bits - 1)) - 1)
    return (u - c).abs(), inner


@pytest.mark.parametrize("symmetric", [True, False])
def test_settle_moves_weights_inside_their_bins_and_keeps_every_code(symmetric):
    quant = QuantCfg.model_validate({"weights": {"bits": 3, "group_size": 16, "symmetric": symmetric}})
    student = make_student(make_tiny_llama(hidden=32, layers=2), quant, True)
    q = next(m for _, m in quant_modules(student))
    with torch.no_grad():  # put a few weights exactly on their bin's edge, as training leaves them
        u = q.weight.reshape(*q.weight_scale.shape, -1) / q.weight_scale.unsqueeze(-1)
        z = 0 if q.weight_zero_point is None else q.weight_zero_point.unsqueeze(-1).float()
        edge = ((torch.round(u + z) + 0.5 - z) * q.weight_scale.unsqueeze(-1)).reshape(q.weight.shape)
        q.weight[:, ::7] = edge[:, ::7]
    codes, fq = q.int_weight(), q.quantized_weight().detach().clone()
    w0 = q.weight.detach().clone()
    dist0, inner = _bin_offsets(q)
    moved = q.settle(0.25)
    assert torch.equal(q.int_weight(), codes) and torch.equal(q.quantized_weight(), fq)  # bit for bit
    dist, _ = _bin_offsets(q)
    assert bool((dist[inner] <= 0.25 + 1e-5).all())  # every unsaturated weight 0.25 steps inside its edges
    far = (dist0 <= 0.25).reshape(w0.shape)  # already that far inside: exactly as it was
    assert torch.equal(q.weight[far], w0[far])
    assert moved == int((q.weight != w0).sum()) > q.weight.shape[0]
    assert q.settle(0.25) == 0  # settled weights stay


def test_the_warmups_margin_changes_no_code_only_where_the_weights_sit(tmp_path):
    """Settling each layer keeps its outputs bit for bit, so the next layers train exactly as without it."""
    runs = {}
    for margin in (0.0, 0.3):
        cfg = _cfg(tmp_path, block_warmup_margin=margin)
        teacher = make_tiny_llama(hidden=32, layers=3)
        student = make_student(teacher, cfg.quant, True)
        rec = train(teacher, student, None, cfg, progress=False)["block_warmup"]
        runs[margin] = (rec, student)
    (r0, s0), (r3, s3) = runs[0.0], runs[0.3]
    c0, c3 = _codes(s0), _codes(s3)
    assert c0.keys() == c3.keys() and all(torch.equal(c0[k], c3[k]) for k in c0)
    for (_, a), (_, b) in zip(quant_modules(s0), quant_modules(s3), strict=True):
        assert torch.equal(a.quantized_weight(), b.quantized_weight())
        dist, inner = _bin_offsets(b)
        assert bool((dist[inner] <= 0.2 + 1e-5).all())
    assert [r["loss_after"] for r in r0["layers"]] == [r["loss_after"] for r in r3["layers"]]
    assert all(r["settled"] == 0 for r in r0["layers"]) and all(r["settled"] > 0 for r in r3["layers"])


def test_layer_loss_is_the_relative_squared_error():
    model = freeze(make_tiny_llama(hidden=32, layers=2))
    _, layers = decoder_layers(model)
    b = Batch(*capture_layer_inputs(model, layers, seed_embeddings(model, _ids(2))))
    with torch.no_grad():
        out = layers[0](b.h_student, **b.kwargs)
        out = out[0] if isinstance(out, tuple) else out
        assert float(layer_loss(layers[0], b, out)) == 0.0
        assert float(layer_loss(layers[0], b, 2 * out)) == pytest.approx(0.25, rel=1e-6)


def test_a_rank_takes_its_share_of_each_minibatch_and_a_stand_in_row_where_none_is_left():
    ids = _ids(3)
    shares = [Part(r, 2, lambda t: None).rows(ids) for r in range(2)]
    assert torch.equal(torch.cat([s for s, _ in shares]), ids) and [w for _, w in shares] == [1.0, 1.0]
    assert [len(s) for s, _ in shares] == [2, 1]
    mine, weight = Part(1, 2, lambda t: None).rows(ids[2:])  # one row for two ranks
    assert torch.equal(mine, ids[2:]) and weight == 0.0  # the same layer calls, nothing added to the sums


def _dp_warmup(tmp_path, part: Part | None) -> dict:
    """The warm-up of a seeded tiny model on 6 sequences in minibatches of 4 (the last one shorter than 3 ranks)."""
    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, batch_size=4, block_warmup_margin=0.2)
    teacher = freeze(make_tiny_llama(hidden=32, layers=3))
    student = make_student(teacher, cfg.quant, True)
    rec = block_warmup(teacher, student, _ids(6, seed=4), cfg.method, True, progress=False, part=part)
    return {"record": rec, "state": student.state_dict()}


def _dp_rank(rank: int, n: int, tmp: str) -> None:
    """One spawned gloo rank of :func:`test_data_parallel_warmup_takes_the_single_processs_steps`."""
    import pathlib

    import torch.distributed as dist

    tmp_path = pathlib.Path(tmp)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), n), rank=rank, world_size=n)
    try:
        got = _dp_warmup(tmp_path, Part(rank, n, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM)))
        torch.save(got, tmp_path / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_data_parallel_warmup_takes_the_single_processs_steps(tmp_path):
    """Three gloo ranks, each with its share of the rows (rank 2 a stand-in for the last, 2-row minibatch), sum
    their errors and gradients: all end with the single process's weights and records, and with the same ones."""
    import torch.multiprocessing as mp

    ref = _dp_warmup(tmp_path, None)
    mp.spawn(_dp_rank, args=(3, str(tmp_path)), nprocs=3)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(3)]
    for other in ranks[1:]:  # every rank alike
        assert all(torch.equal(v, other["state"][k]) for k, v in ranks[0]["state"].items())
    for got in ranks:
        assert got["record"]["workers"] == 3 and ref["record"]["workers"] == 1
        for g, w in zip(got["record"]["layers"], ref["record"]["layers"], strict=True):
            assert (g["loss_before"], g["loss_after"]) == pytest.approx((w["loss_before"], w["loss_after"]), rel=1e-5)
            assert g["kept"] == w["kept"] and g["settled"] == w["settled"] > 0
        for k, v in ref["state"].items():  # Adam divides a near-zero gradient by its own size: the sums' order shows
            torch.testing.assert_close(got["state"][k], v, rtol=0, atol=1e-5, msg=k)


def test_seeded_warmup_reproduces_exactly_and_composes_with_the_game(tmp_path):
    cfg = _cfg(tmp_path, steps=2, name="zsaq")
    runs = []
    for _ in range(2):
        teacher = make_tiny_llama(hidden=32)
        student = make_student(teacher, cfg.quant, True)
        runs.append((train(teacher, student, None, cfg, progress=False), student))
    (h1, s1), (h2, s2) = runs
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in h1["block_warmup"]["layers"]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in h2["block_warmup"]["layers"]]
    assert h1["kl"] == h2["kl"] and len(h1["kl"]) == 2
    assert open(plot_history(h1, str(tmp_path / "curves.png")), "rb").read(4) == b"\x89PNG"  # with a warm-up panel
    assert all(torch.equal(a, b) for a, b in zip(s1.parameters(), s2.parameters(), strict=True))
    # the game starts where the warm-up left the student: its first KL is below the same game's from RTN
    teacher = make_tiny_llama(hidden=32)
    cold = train(teacher, make_student(teacher, cfg.quant, True), None, _cfg(tmp_path, steps=2, block_warmup_steps=0))
    assert h1["kl"][0] < cold["kl"][0]


@pytest.mark.parametrize(
    "method,message",
    [
        ({"name": "rtn"}, "rtn trains nothing"),
        ({"name": "noise"}, "noise"),
        ({"generator": {"mode": "noise"}}, "noise"),
    ],
)
def test_warmup_refuses_methods_without_seed_sequences(tmp_path, method, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, **method)


def test_the_default_warmup_is_off_for_the_methods_without_seed_sequences(tmp_path):
    def steps(**method):
        raw = {"model": {"path": "tiny"}, "output": {"dir": str(tmp_path)}, "method": method}
        return validate(raw).method.block_warmup_steps

    assert steps() == steps(name="self_sample") == 64
    assert steps(name="rtn") == steps(name="noise") == steps(generator={"mode": "noise"}) == 0


def test_model_without_a_decoder_stack_is_refused():
    model = make_tiny_llama(hidden=32, layers=2)
    model.config.num_hidden_layers = 7
    with pytest.raises(ConfigError, match="block_warmup_steps: 0"):
        decoder_layers(model)


def test_quantize_with_warmup_exports_the_warmed_student(tmp_path, capsys):
    """`zsaq quantize` with the warm-up alone: the checkpoint reloads to the in-process warmed student's logits."""
    import yaml
    from test_load_fixtures import make_word_tokenizer
    from transformers import AutoModelForCausalLM

    from zsaq_dist.cli import main

    model_dir = save_tiny(make_tiny_llama(), tmp_path / "m")
    make_word_tokenizer().save_pretrained(model_dir)
    cfg = _cfg(tmp_path, block_warmup_steps=3)
    raw = cfg.model_dump(mode="json") | {"model": {"path": model_dir}}
    raw["quant"] = {"weights": {"bits": 4, "group_size": 32}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    assert main(["quantize", str(tmp_path / "cfg.yaml")]) == 0
    report = json.loads((tmp_path / "out" / "zsaq_report.json").read_text())
    assert len(report["history"]["block_warmup"]["layers"]) == 2 and report["history"]["loss"] == []

    from zsaq_dist.config import ModelCfg
    from zsaq_dist.io.load import load_model

    cfg = validate(raw)
    teacher, tok = load_model(ModelCfg(path=model_dir))
    student = make_student(teacher, cfg.quant, cfg.method.learnable_scales)
    train(teacher, student, tok, cfg, progress=False)  # the seed sequences come from the run's cache
    ids = _ids(2, 16, seed=0)
    with torch.no_grad():
        ref = student(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
