"""bench/render.py turns the benchmark JSON files into Markdown (and a PNG) without running anything."""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def render():
    return _load("render")


def _row(method, bits, sym, data, ppl, kl, top1, seconds=1.5, rss=812.4):
    return {
        "method": method,
        "bits": bits,
        "group_size": 64,
        "symmetric": sym,
        "data": data,
        "ppl": ppl,
        "dppl": ppl - 10.0,
        "kl": kl,
        "top1": top1,
        "seconds": seconds,
        "peak_rss_mb": rss,
    }


def _peers() -> dict:
    teacher = {
        "method": "fp32 (teacher)",
        "bits": 32,
        "group_size": None,
        "symmetric": None,
        "data": "none",
        "ppl": 10.0,
        "dppl": 0.0,
        "kl": 0.0,
        "top1": 1.0,
        "seconds": 0.0,
        "peak_rss_mb": None,
    }
    return {
        "machine": "TestCPU, 2 cores",
        "date": "2026-11-22 21:00 UTC",
        "command": "python bench/peers.py --quick",
        "notes": ["Not run in this table (time budget): AWQ W4 asym."],
        "rows": [
            teacher,
            _row("HQQ", 4, False, "none", 11.25, 0.0312, 0.9123),
            _row("GPTQ (llm-compressor)", 3, True, "real-data calibration", 14.5, 0.25, 0.8),
        ],
    }


def test_render_peers_table(render, tmp_path):
    (tmp_path / "peers.json").write_text(json.dumps(_peers()))
    md = render.render(tmp_path)
    lines = md.splitlines()
    assert lines[0] == "## Results"
    assert "- machine: TestCPU, 2 cores" in lines and "- date: 2026-11-22 21:00 UTC" in lines
    assert "- command: `python bench/peers.py --quick`" in lines
    rows = [ln for ln in lines if ln.startswith("| ")]
    assert len(rows) == 4  # header + teacher + 2 rows
    assert rows[0].startswith("| method | bits | group | sym | data | ppl | Δppl | KL | top-1")
    assert rows[1] == "| fp32 (teacher) | 32 | - | - | none | 10.000 | +0.000 | 0.0000 | 100.00% | 0 | - |"
    assert rows[2] == "| HQQ | 4 | g64 | asym | none | 11.250 | +1.250 | 0.0312 | 91.23% | 2 | 812 |"
    assert "| GPTQ (llm-compressor) | 3 | g64 | sym | real-data calibration | 14.500 | +4.500 | 0.2500 |" in rows[3]
    png = tmp_path / "peers.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![Peers: HQQ, GPTQ, AWQ side by side](peers.png)" in md
    assert md.rstrip().endswith("Not run in this table (time budget): AWQ W4 asym.")


def test_render_merges_quality_first_and_cli_writes_file(render, tmp_path):
    (tmp_path / "peers.json").write_text(json.dumps(_peers()))
    quality = {
        "machine": "m",
        "date": "d",
        "command": "python bench/quality.py",
        "rows": [_row("zsaq", 4, True, "none", 10.5, float("nan"), 0.95)],
    }
    (tmp_path / "quality.json").write_text(json.dumps(quality))
    render.main(["--results", str(tmp_path), "--no-png"])
    md = (tmp_path / "RESULTS.md").read_text()
    assert md.index("### Quality") < md.index("### Peers")
    assert "| zsaq | 4 | g64 | sym | none | 10.500 | +0.500 | - | 95.00% | 2 | 812 |" in md
    assert not (tmp_path / "peers.png").exists()


def test_render_without_results_says_how_to_get_them(render, tmp_path):
    md = render.render(tmp_path)
    assert "python bench/peers.py" in md and "|" not in md


def test_plan_grid(monkeypatch):
    """The default grid, --quick and --all select the rows the README describes (no venv, no model)."""
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("peers", None)
    peers = _load("peers")
    full = peers.plan(quick=False)
    assert all(r["group_size"] == 64 for r in full)
    keys = {(r["method"], r["bits"], r["symmetric"], r["data"]) for r in full}
    assert ("gptq", 3, True, "self") in keys and ("hqq", 3, False, "none") in keys and ("rtn", 4, False, "none") in keys
    assert not any(r["method"] == "awq" for r in full)
    assert {r["bits"] for r in peers.plan(quick=True)} == {4}
    everything = peers.plan(quick=False, everything=True)
    assert ("awq", 4, False, "real") in {(r["method"], r["bits"], r["symmetric"], r["data"]) for r in everything}
    # --only gptq --bits 4 --sym asym: the one row a bigger calibration budget is spent on
    args = argparse.Namespace(only=["gptq"], bits=[4], sym=["asym"])
    picked = [(r["method"], r["bits"], r["symmetric"], r["data"]) for r in everything if peers.selected(r, args)]
    assert picked == [("gptq", 4, False, "real")]
    no_filter = argparse.Namespace(only=None, bits=None, sym=None)
    assert all(peers.selected(r, no_filter) for r in everything)


def test_readme_section_is_rewritten_between_markers_with_ratios(render, tmp_path):
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    rows = [
        _row("RTN (zsaq_dist)", 3, True, "none", 30.0, 1.0, 0.5),
        _row("GPTQ", 3, True, "real-data calibration", 15.0, 0.5, 0.6),
    ]
    (results / "peers.json").write_text(json.dumps({"machine": "m", "date": "d", "command": "c", "rows": rows}))
    q = [
        dict(_row("rtn", 3, True, "none", 50.0, 1.0, 0.5), setting="w3g64"),
        dict(_row("zsaq", 3, True, "self-generated (zero-shot)", 20.0, 0.4, 0.7), setting="w3g64"),
    ]
    (results / "quality_gpu.json").write_text(json.dumps({"machine": "m", "date": "d", "command": "c", "rows": q}))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:begin (bench/render.py --readme) -->\nold\n<!-- results:end -->\ntail\n")
    render.update_readme(readme, results)
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro") and text.rstrip().endswith("tail")
    assert "zsaq +10.00 (0.25x)" in text  # (20 - 10) / (50 - 10)
    assert "+5.00 = 0.25x RTN sym (+20.00)" in text
    # the tables themselves stay in RESULTS.md, linked from the README rather than copied into it
    assert "| method |" not in text and "[`bench/results/RESULTS.md`](bench/results/RESULTS.md)" in text


def _quality_run(path: Path, seed: int | None, rows: list[dict], pool: int = 32) -> Path:
    cmd = "python bench/quality.py --steps 40" + (f" --set method.seed={seed}" if seed is not None else "")
    budget = {"steps": 40, "num_sequences": pool}
    result = {"machine": "m", "date": f"2026-11-2{seed or 0}", "command": cmd, "budget": budget, "rows": rows}
    path.write_text(json.dumps(result))
    return path


def test_seeds_summarises_runs_per_method_with_where_sam_perturbed(tmp_path):
    seeds = _load("seeds")
    fp = {"setting": "fp", "method": "fp", "dppl": 0.0}

    def row(method, dppl, **extra):
        r = {**_row(method, 4, False, "self-generated (zero-shot)", 10.0 + dppl, 0.2, 0.77), "setting": "w4g64-asym"}
        return {**r, **extra}

    old0 = _quality_run(tmp_path / "a0.json", None, [fp, row("zsaq", 3.4), row("zsaq rho=0", 3.3)])
    old1 = _quality_run(tmp_path / "a1.json", 1, [fp, row("zsaq", 3.2), row("zsaq rho=0", 3.3)])
    new0 = _quality_run(tmp_path / "b0.json", 0, [fp, row("zsaq sam=quantized", 3.1, train_kl=0.3)])
    new1 = _quality_run(tmp_path / "b1.json", 1, [fp, row("zsaq", 3.0, sam_space="quantized", train_kl=0.2)])
    out = seeds.summarise([old0, old1, new0, new1], {old0, old1}, "quantized")
    by = {r["method"]: r for r in out["rows"]}
    assert set(by) == {"zsaq, SAM latent", "zsaq rho=0", "zsaq, SAM quantized"}
    assert by["zsaq, SAM latent"]["seeds"] == {"0": pytest.approx(3.4), "1": pytest.approx(3.2)}
    assert by["zsaq, SAM quantized"]["dppl"] == pytest.approx(3.05)
    # the game's own KL is averaged where every seed recorded it, and left out where one did not
    assert by["zsaq, SAM quantized"]["train_kl"] == pytest.approx(0.25) and "train_kl" not in by["zsaq rho=0"]
    assert by["zsaq rho=0"]["per_seed"] == "0: +3.300 / 1: +3.300"
    pair = next(p for p in out["paired"] if {p["a"], p["b"]} == {"zsaq, SAM quantized", "zsaq rho=0"})
    sign = 1 if pair["a"] == "zsaq, SAM quantized" else -1
    assert sign * pair["mean_a_minus_b"] == pytest.approx(-0.25) and pair["seeds"] == 2
    with pytest.raises(SystemExit, match="appears twice"):
        seeds.summarise([old0, old0], set(), "quantized")
    # a run that names its seed (bench/reeval.py's files, whose command is not quality.py's) is taken at it
    named = json.loads(old1.read_text()) | {"command": "python bench/reeval.py --eval-tokens 16384", "seed": 1}
    (tmp_path / "r1.json").write_text(json.dumps(named))
    again = seeds.summarise([old0, tmp_path / "r1.json"], set(), "quantized")
    assert next(r for r in again["rows"] if r["method"] == "zsaq rho=0")["seeds"].keys() == {"0", "1"}


def test_seeds_records_the_machine_that_trained_each_run_and_holds_a_summary_to_one_on_request(tmp_path):
    """Runs on two CPUs round otherwise (their seed sets can differ): each source names the machine that trained it,
    a re-scored run (bench/reeval.py) the one its source run trained on, and ``--one-machine`` refuses a mix."""
    seeds = _load("seeds")
    fp = {"setting": "fp", "method": "fp", "dppl": 0.0}
    zsaq = {**_row("zsaq", 4, False, "self-generated (zero-shot)", 12.5, 0.2, 0.77), "setting": "w4"}
    a = _quality_run(tmp_path / "a.json", 0, [fp, zsaq])
    b = _quality_run(tmp_path / "b.json", 1, [fp, {**zsaq, "ppl": 12.7, "dppl": 2.7}])
    b.write_text(json.dumps(json.loads(b.read_text()) | {"machine": "n"}))
    # b re-scored on machine m: bench/reeval.py's file, naming its source run, which recorded the training machine
    source = {"file": str(b), "command": "python bench/quality.py --set method.seed=1", "date": "2026-11-21"}
    r = tmp_path / "r.json"
    r.write_text(json.dumps(json.loads(b.read_text()) | {"machine": "m", "command": "python bench/reeval.py",
                                                           "seed": 1, "source": source}))
    out = seeds.summarise([a, r], set(), "quantized")
    assert [(s["machine"], s.get("scored_on")) for s in out["sources"]] == [("m", None), ("n", "m")]
    assert seeds.machines(out["sources"]) == "m; n"
    with pytest.raises(SystemExit, match=r"r\.json was trained on n, .*a\.json on m"):
        seeds.summarise([a, r], set(), "quantized", one_machine=True)
    # a re-scored file that names its source's machine (bench/reeval.py writes it) is taken at its word
    r.write_text(json.dumps(json.loads(r.read_text()) | {"source": {**source, "machine": "m"}}))
    assert seeds.machines(seeds.summarise([a, r], set(), "quantized", one_machine=True)["sources"]) == "m"
    # one whose source run is gone, and which does not name the machine, is an error that names the file
    r.write_text(json.dumps(json.loads(r.read_text()) | {"source": {**source, "file": str(tmp_path / "gone.json")}}))
    with pytest.raises(SystemExit, match="gone.json"):
        seeds.summarise([r], set(), "quantized")
    # the CLI: --one-machine is stored in the summary's command, so --again keeps it
    out_path = tmp_path / "sum.json"
    with pytest.raises(SystemExit, match="b.json was trained on n"):
        seeds.main(["--runs", str(a), str(b), "--out", str(out_path), "--one-machine"])
    seeds.main(["--runs", str(a), "--out", str(out_path), "--one-machine"])
    written = json.loads(out_path.read_text())
    assert written["machine"] == "m" and "--one-machine" in written["command"]
    assert "--one-machine" in seeds.again_argv(out_path, [str(b)])
    with pytest.raises(SystemExit, match="b.json was trained on n"):
        seeds.main(["--again", str(out_path), "--add", str(b)])


def test_seeds_labels_small_rho_as_sam_and_notes_ties_per_setting(tmp_path):
    seeds = _load("seeds")
    fp = {"setting": "fp", "method": "fp", "dppl": 0.0}

    def row(setting, method, dppl):
        r = _row(method, 4, False, "self-generated (zero-shot)", 10.0 + dppl, 0.2, 0.77)
        return {**r, "setting": setting, "sam_space": None if method == "zsaq rho=0" else "quantized"}

    runs = [
        _quality_run(tmp_path / f"s{seed}.json", seed, [fp] + [row(st, m, d) for st, m, d in rows])
        for seed, rows in enumerate(
            [
                [("w4", "zsaq", 2.0), ("w4", "zsaq rho=0", 2.0), ("w4", "zsaq rho=0.01", 1.9), ("w3", "zsaq", 18.0)],
                [("w4", "zsaq", 2.0), ("w4", "zsaq rho=0", 2.1), ("w4", "zsaq rho=0.01", 2.2), ("w3", "zsaq", 17.0)],
            ]
        )
    ]
    runs.append(_quality_run(tmp_path / "w3.json", 0, [fp, row("w3", "zsaq rho=0", 17.5)]))
    # the warm-up alone runs no game step: no SAM label, even where its row says sam_space (older runs did)
    runs.append(_quality_run(tmp_path / "warm.json", 0, [fp, row("w3", "block-warmup", 17.9)]))
    # a row whose warm-up settled its weights is told apart from one whose did not, by its recorded margin
    settled = {**row("w3", "zsaq block-warmup", 17.1), "block_warmup": {"steps": 64, "lr": 3e-4, "margin": 0.1}}
    runs.append(_quality_run(tmp_path / "margin.json", 0, [fp, settled, {**settled, "method": "zsaq margin=0.1"}]))
    # and one trained on new seed sequences every pass from one that went over the same set again
    fresh = {**row("w3", "zsaq", 16.0), "fresh_per_epoch": True}
    runs.append(_quality_run(tmp_path / "fresh.json", 0, [fp, fresh], pool=16))
    out = seeds.summarise(runs, set(), "quantized")
    methods = {(r["setting"], r["method"]) for r in out["rows"]}
    assert methods == {("w4", "zsaq, SAM quantized"), ("w4", "zsaq rho=0"), ("w4", "zsaq rho=0.01, SAM quantized"),
                       ("w3", "zsaq, SAM quantized"), ("w3", "zsaq rho=0"), ("w3", "block-warmup"),
                       ("w3", "zsaq block-warmup margin=0.1, SAM quantized"), ("w3", "zsaq margin=0.1, SAM quantized"),
                       ("w3", "zsaq fresh, SAM quantized")}
    lines = seeds.notes(out["paired"], "zsaq, SAM quantized")
    w4 = next(line for line in lines if line.startswith("w4:"))
    # rho=0 ties at seed 0 and loses at seed 1: a tie is a win for neither side; each gap has its standard
    # error over seeds (sd of the paired differences / sqrt(2): 0.05 for 0, +0.1; 0.15 for -0.1, +0.2)
    assert "zsaq rho=0 +0.050 ± 0.050 (better at 0 of 2 seeds)" in w4
    assert "zsaq rho=0.01, SAM quantized +0.050 ± 0.150 (better at 1 of 2 seeds)" in w4
    w3 = next(line for line in lines if line.startswith("w3:"))
    assert "zsaq rho=0 -0.500 (better at 1 of 1 seeds)" in w3  # paired on seed 0 only
    # with pool labels, runs on different seed pools are told apart (the budget's num_sequences)
    pools = seeds.summarise(runs[-2:], set(), "quantized", pool_label=True)
    assert {r["method"] for r in pools["rows"]} == {"zsaq block-warmup margin=0.1 pool=32, SAM quantized",
                                                    "zsaq margin=0.1 pool=32, SAM quantized",
                                                    "zsaq fresh pool=16, SAM quantized"}
    seeds.plot({**out, "sources": out["sources"]}, tmp_path / "seeds.png")
    assert (tmp_path / "seeds.png").stat().st_size > 0


def test_paired_words_a_summary_pair_from_either_side(tmp_path):
    seeds, paired = _load("seeds"), _load("paired")
    fp = {"setting": "fp", "method": "fp", "dppl": 0.0}

    def row(method, dppl):
        r = _row(method, 4, False, "self-generated (zero-shot)", 10.0 + dppl, 0.2, 0.77)
        return {**r, "setting": "w4", "sam_space": "quantized"}

    # self_sample minus zsaq per seed: -0.3, -0.1, +0.1, -0.5 (mean -0.2, sd 0.2582, se 0.1291)
    dppl = {0: (3.0, 2.7), 1: (2.8, 2.7), 2: (2.6, 2.7), 3: (3.2, 2.7)}
    runs = [_quality_run(tmp_path / f"s{s}.json", s, [fp, row("zsaq", z), row("self_sample", q)])
            for s, (z, q) in dppl.items()]
    summary = seeds.summarise(runs, set(), "quantized")
    z, q = "zsaq, SAM quantized", "self_sample, SAM quantized"
    ss = paired.compare(summary, q, z)
    assert (ss["seeds"], ss["a_wins"], ss["verdict"]) == (4, 3, "level")  # 0.2 < 2 * 0.129
    assert ss["mean"] == pytest.approx(0.2) and ss["se"] == pytest.approx(0.2582 / 2, abs=1e-4)
    assert paired.words(ss) == "ahead at 3 of 4 seeds, by 0.20 ± 0.13"
    zs = paired.compare(summary, z, q)  # the same pair from the other side: the mean turns round
    assert zs["mean"] == pytest.approx(-0.2) and zs["a_wins"] == 1
    assert paired.words(zs) == "ahead at 1 of 4 seeds but behind on average, by 0.20 ± 0.13"
    # a gap of at least two standard errors is a verdict
    wide = seeds.summarise([runs[0], runs[3]], set(), "quantized")  # -0.3, -0.5: mean -0.4, se 0.1
    assert paired.compare(wide, q, z)["verdict"] == "ahead" and paired.compare(wide, z, q)["verdict"] == "behind"
    one = paired.compare(seeds.summarise(runs[:1], set(), "quantized"), z, q)
    assert one["se"] is None and paired.words(one) == "ahead at 0 of 1 seeds but behind on average, by 0.30"
    with pytest.raises(SystemExit, match="no row 'zsaq'"):
        paired.compare(summary, "zsaq", q)


def test_paired_counts_the_seeds_at_which_both_rows_trained_on_the_same_seed_set(tmp_path, capsys, monkeypatch):
    """Seed 0: both rows record set "a"; seed 1: zsaq "b", self_sample "c" (another pool, or another machine's
    rounding); seed 2: self_sample's run predates the record. A summary of older runs carries no such count."""
    seeds, paired = _load("seeds"), _load("paired")
    fp = {"setting": "fp", "method": "fp", "dppl": 0.0}

    def row(method, dppl, sha):
        r = _row(method, 4, False, "self-generated (zero-shot)", 10.0 + dppl, 0.2, 0.77)
        data = {"sequences": 128, "seq_len": 64, "tokens_sha256": sha} if sha else None
        return {**r, "setting": "w4", "sam_space": "quantized", "seed_data": data}

    sets = {0: ("a", "a"), 1: ("b", "c"), 2: ("d", None)}
    runs = [_quality_run(tmp_path / f"s{s}.json", s, [fp, row("zsaq", 2.7, z), row("self_sample", 2.9, q)])
            for s, (z, q) in sets.items()]
    summary = seeds.summarise(runs, set(), "quantized")
    z, q = "zsaq, SAM quantized", "self_sample, SAM quantized"
    by = {r["method"]: r for r in summary["rows"]}
    assert by[z]["seed_sets"] == {"0": "a", "1": "b", "2": "d"} and by[q]["seed_sets"] == {"0": "a", "1": "c", "2": None}
    c = paired.compare(summary, z, q)
    assert (c["seeds"], c["seed_sets_recorded"], c["same_seed_set"]) == (3, 2, 1)
    (tmp_path / "sum.json").write_text(json.dumps(summary))
    monkeypatch.setattr(sys, "argv", ["paired.py", str(tmp_path / "sum.json"), z, q])
    paired.main()
    assert capsys.readouterr().out.strip().endswith("(ahead); the same seed set at 1 of 2 seeds")
    old = seeds.summarise([_quality_run(tmp_path / "o.json", 0, [fp, row("zsaq", 2.7, None),
                                                                 row("self_sample", 2.9, None)])], set(), "quantized")
    assert "seed_sets" not in old["rows"][0] and "same_seed_set" not in old["paired"][0]
    assert paired.seed_sets(paired.compare(old, z, q)) == ""


def test_paired_reads_the_kl_to_the_teacher_per_seed_as_it_reads_the_perplexity(tmp_path, capsys, monkeypatch):
    """KL per seed: zsaq 0.170, 0.180, 0.175; rho=0 0.160, 0.172, 0.170 (rho=0 lower at 3 of 3; b minus a over
    seeds -0.010, -0.008, -0.005: mean -0.00767, sd 0.002517, se 0.001453), while the perplexity calls it level."""
    seeds, paired = _load("seeds"), _load("paired")
    fp = {"setting": "fp", "method": "fp", "dppl": 0.0}

    def row(method, dppl, kl):
        r = _row(method, 4, False, "self-generated (zero-shot)", 10.0 + dppl, kl, 0.77)
        return {**r, "setting": "w4", "sam_space": None if method.endswith("rho=0") else "quantized"}

    per_seed = {0: ((2.7, 0.170), (2.8, 0.160)), 1: ((2.9, 0.180), (2.6, 0.172)), 2: ((2.6, 0.175), (2.7, 0.170))}
    runs = [_quality_run(tmp_path / f"s{s}.json", s, [fp, row("zsaq", *z), row("zsaq rho=0", *r)])
            for s, (z, r) in per_seed.items()]
    summary = seeds.summarise(runs, set(), "quantized")
    z, r = "zsaq, SAM quantized", "zsaq rho=0"
    assert {x["method"]: x["seeds_kl"] for x in summary["rows"]}[z] == {"0": 0.170, "1": 0.180, "2": 0.175}
    c = paired.compare(summary, z, r, metric="kl")
    assert (c["metric"], c["seeds"], c["a_wins"], c["verdict"]) == ("kl", 3, 0, "behind")
    assert c["mean"] == pytest.approx(-0.023 / 3) and c["se"] == pytest.approx(0.0014530, abs=1e-6)
    assert paired.words(c) == "ahead at 0 of 3 seeds but behind on average, by 0.0077 ± 0.0015"
    d = paired.compare(summary, z, r)  # the perplexity, the default: level
    assert (d["metric"], d["a_wins"], d["verdict"]) == ("dppl", 2, "level")
    assert paired.compare(summary, r, z, metric="kl")["verdict"] == "ahead"
    (tmp_path / "sum.json").write_text(json.dumps(summary))
    monkeypatch.setattr(sys, "argv", ["paired.py", str(tmp_path / "sum.json"), z, r, "--metric", "kl"])
    paired.main()
    assert capsys.readouterr().out.startswith(f"{z} against {r} in KL: ahead at 0 of 3 seeds but behind")
    with pytest.raises(SystemExit, match="unknown metric 'top1'"):
        paired.compare(summary, z, r, metric="top1")
    old = {**summary, "paired": [{k: v for k, v in q.items() if k != "kl"} for q in summary["paired"]]}
    with pytest.raises(SystemExit, match="predates per-seed KL: write it again with python bench/seeds.py --again"):
        paired.compare(old, z, r, metric="kl")
    assert paired.compare(old, z, r)["mean"] == d["mean"]  # the perplexity still reads from an older summary


def test_quality_records_a_failed_row_runs_the_rest_and_exits_nonzero(tmp_path, monkeypatch):
    quality = _load("quality")
    import zsaq_dist.io.demo as demo

    monkeypatch.setattr(demo, "fetch_demo_model", lambda: tmp_path / "teacher")
    monkeypatch.setattr(quality, "WORK", tmp_path / "work")
    monkeypatch.setattr(quality, "_eval", lambda *a, **k: {"ppl": 10.0, "kl": 0.0, "top1": 1.0})
    ran, threads = [], {}

    def run_row(setting, row, teacher, fp_ppl, args, n_threads=None):
        ran.append(row)
        threads[row] = n_threads
        if row == "zsaq":  # say, out of GPU memory beside the other rows
            raise RuntimeError("zsaq quantize failed (exit 1); log: x.log\nCUDA out of memory")
        return {**_row(row, 4, False, "self-generated (zero-shot)", 12.0, 0.1, 0.9), "setting": setting}

    monkeypatch.setattr(quality, "run_row", run_row)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    argv = ["quality.py", "--results", str(tmp_path), "--tag", "t", "--settings", "w4g64-asym",
            "--rows", "zsaq", "self_sample", "zsaq rho=0", "--jobs", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match=r"1 row\(s\) failed .*w4g64-asym zsaq"):
        quality.main()
    assert sorted(ran) == ["self_sample", "zsaq", "zsaq rho=0"]  # the failing first row stopped nothing
    # the first row runs alone (it writes the seed set) on every core; the rest side by side on their share
    assert threads == {"zsaq": 7, "self_sample": None, "zsaq rho=0": None}
    result = json.loads((tmp_path / "quality_t.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["fp", "self_sample", "zsaq rho=0"]
    assert result["failed"] == [{"setting": "w4g64-asym", "method": "zsaq",
                                 "error": "zsaq quantize failed (exit 1); log: x.log"}]
    assert (tmp_path / "quality_t.png").is_file()


def _standing_results(tmp_path: Path, seeds_mod) -> Path:
    """A results folder with one seeds summary (zsaq, self_sample, ascent=false, rtn over seeds 0-3) and a
    peers table, in the shapes bench/seeds.py and bench/peers.py write."""
    fp = {"setting": "fp", "method": "fp", "dppl": 0.0}

    def row(method, dppl):
        r = _row(method, 4, False, "self-generated (zero-shot)", 10.0 + dppl, 0.2, 0.77)
        return {**r, "setting": "w4", "sam_space": None if method == "rtn" else "quantized"}

    # per seed: zsaq, self_sample (zsaq ahead by 0.3, 0.5: ahead), ascent=false (-0.3, -0.1, +0.1, -0.5: behind
    # within two standard errors), rho=0 (zsaq ahead by 0.1, 0.3, -0.1, +0.1: ahead within them)
    per_seed = {0: (3.0, 3.3, 2.7, 3.1), 1: (2.8, 3.3, 2.7, 3.1), 2: (2.6, None, 2.7, 2.5), 3: (3.2, None, 2.7, 3.3)}
    runs = []
    for s, (z, q, a, r) in per_seed.items():
        rows = [fp, row("zsaq", z), row("zsaq ascent=false", a), row("zsaq rho=0", r)]
        rows += [row("self_sample", q)] if q is not None else []
        rows += [row("rtn", 8.0)] if s == 0 else []
        runs.append(_quality_run(tmp_path / f"run{s}.json", s, rows))
    results = tmp_path / "results"
    results.mkdir()
    (results / "summary.json").write_text(json.dumps(seeds_mod.summarise(runs, set(), "quantized")))
    peers = [{**_row("HQQ", 4, False, "none", 12.9, 0.3, 0.7), "dppl": 2.9}]
    (results / "peers.json").write_text(json.dumps({"machine": "m", "date": "d", "command": "c", "rows": peers}))
    return results


def test_standing_checks_each_kind_of_target_from_the_summaries(tmp_path, monkeypatch):
    standing = _load("standing")
    results = _standing_results(tmp_path, _load("seeds"))
    T, z = standing.Target, "zsaq, SAM quantized"
    monkeypatch.setattr(standing, "TARGETS", [
        T("half of RTN", "W4", "ratio", "summary.json", z, "rtn", at_most=0.5),
        T("third of RTN", "W4", "ratio", "summary.json", z, "rtn", at_most=1 / 3),
        T("below HQQ", "W4", "below", "summary.json", z, ("peers.json", {"method": "HQQ", "bits": 4})),
        T("beats self_sample", "W4", "paired", "summary.json", z, "self_sample, SAM quantized"),
        T("ascent helps", "W4", "paired", "summary.json", z, "zsaq ascent=false, SAM quantized",
          held_out="summary.json", note="a note"),
        T("SAM helps", "W4", "paired", "summary.json", z, "zsaq rho=0"),
    ])
    lines = standing.table(results).splitlines()
    assert len(lines) == 2 + 6
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    # zsaq's mean +2.9 against RTN +8.0: 0.36x, met at half and missed at a third
    assert cells[0][2] == "zsaq +2.900 (mean of 4 seeds) against rtn +8.000: 0.36x" and cells[0][4] == "**met**"
    assert cells[1][4] == "**missed**"
    # HQQ +2.9: zsaq's mean is not lower (it is equal), though it is lower at seeds 1 and 2
    assert cells[2][2] == "zsaq +2.900 (mean of 4 seeds) against HQQ +2.900, lower at 2 of 4 seeds"
    assert cells[2][4] == "**missed**"
    assert cells[3][2] == "ahead at 2 of 2 seeds, by 0.40 ± 0.10 (ahead)" and cells[3][4] == "**met**"
    assert cells[3][3] == "-"
    assert cells[4][2] == "ahead at 1 of 4 seeds but behind on average, by 0.20 ± 0.13 (level)"
    assert cells[4][3] == cells[4][2] and cells[4][4] == "**missed**"
    assert cells[4][5] == "`summary.json`; a note"
    assert cells[5][2] == "ahead at 3 of 4 seeds, by 0.10 ± 0.08 (level)" and cells[5][4] == "**not shown**"
    monkeypatch.setattr(standing, "TARGETS", [T("x", "W4", "below", "summary.json", "zsaq", ("peers.json", {}))])
    with pytest.raises(SystemExit, match="0 rows match"):
        standing.table(results)
    monkeypatch.setattr(standing, "TARGETS", [T("x", "W4", "ratio", "gone.json", z, "rtn", at_most=0.5)])
    with pytest.raises(SystemExit, match="gone.json is missing"):
        standing.table(results)


def test_standing_rewrites_the_readme_between_its_markers(tmp_path, monkeypatch):
    standing = _load("standing")
    results = _standing_results(tmp_path, _load("seeds"))
    monkeypatch.setattr(standing, "TARGETS", [
        standing.Target("half of RTN", "W4", "ratio", "summary.json", "zsaq, SAM quantized", "rtn", at_most=0.5)])
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{standing.BEGIN}\nold\n{standing.END}\ntail\n")
    standing.update_readme(readme, results)
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith(f"{standing.END}\ntail\n")
    assert standing.table(results) in text
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="lacks the markers"):
        standing.update_readme(readme, results)


def test_the_readme_standing_table_is_the_committed_summaries(tmp_path):
    """The README's table is what bench/standing.py makes of bench/results/ now (regenerate it when either
    changes: python bench/standing.py --readme README.md)."""
    standing = _load("standing")
    readme = (BENCH.parent / "README.md").read_text()
    assert standing.BEGIN in readme, "the README lost its standing markers"
    block = readme.split(standing.BEGIN, 1)[1].split(standing.END, 1)[0]
    assert block.strip() == standing.table().strip(), "regenerate it: python bench/standing.py --readme README.md"


def test_seeds_again_writes_a_summary_from_its_own_command_with_runs_added(tmp_path, monkeypatch):
    seeds = _load("seeds")
    fp = {"setting": "fp", "method": "fp", "dppl": 0.0}
    row = {**_row("zsaq", 4, False, "self-generated (zero-shot)", 13.0, 0.2, 0.77), "setting": "w4"}
    for s in range(3):
        _quality_run(tmp_path / f"r{s}.json", s, [fp, {**row, "dppl": 3.0 + s}])
    monkeypatch.chdir(tmp_path)  # the stored command's paths are relative to where it ran
    seeds.main(["--runs", "r0.json", "r1.json", "--out", "sum.json", "--pool-label", "--ref", "zsaq pool=32"])
    first = json.loads((tmp_path / "sum.json").read_text())
    assert first["command"] == "python bench/seeds.py --runs r0.json r1.json --out sum.json --pool-label --ref 'zsaq pool=32'"
    # a run already summarised is not added twice; the new one is, and the command stored is whole again
    assert seeds.again_argv(tmp_path / "sum.json", ["r1.json", "r2.json"]) == [
        "--runs", "r0.json", "r1.json", "r2.json", "--out", "sum.json", "--ref", "zsaq pool=32", "--pool-label"]
    seeds.main(["--again", "sum.json", "--add", "r2.json"])
    again = json.loads((tmp_path / "sum.json").read_text())
    assert again["rows"][0]["seeds"] == {"0": 3.0, "1": 4.0, "2": 5.0} and len(again["sources"]) == 3
    assert again["command"].startswith("python bench/seeds.py --runs r0.json r1.json r2.json --out sum.json")
    for bad in (["--again", "sum.json", "--out", "x.json"], ["--add", "r2.json", "--runs", "r0.json", "--out", "x"]):
        with pytest.raises(SystemExit):
            seeds.main(bad)
    (tmp_path / "other.json").write_text(json.dumps({"command": "python bench/quality.py --tag x"}))
    with pytest.raises(SystemExit, match="not written by bench/seeds.py"):
        seeds.again_argv(tmp_path / "other.json", [])


def test_seeds_steps_label_pairs_a_longer_game_with_a_shorter_at_each_seed(tmp_path, monkeypatch):
    """Runs of 40 and 80 game steps at seeds 0 and 1: with ``--steps-label`` they are rows of one summary, paired
    per seed; without it the same method at one seed twice is refused. The stored command keeps the flag."""
    seeds = _load("seeds")
    fp = {"setting": "fp", "method": "fp", "dppl": 0.0}
    row = {**_row("zsaq", 4, False, "self-generated (zero-shot)", 13.0, 0.2, 0.77), "setting": "w4", "sam_space": "quantized"}
    runs = []
    for steps, dppl in ((40, (3.0, 3.2)), (80, (2.7, 3.1))):
        for seed in (0, 1):
            path = _quality_run(tmp_path / f"s{steps}-{seed}.json", seed, [fp, {**row, "dppl": dppl[seed]}], pool=128)
            result = json.loads(path.read_text())
            path.write_text(json.dumps({**result, "budget": {**result["budget"], "steps": steps}}))
            runs.append(path)
    with pytest.raises(SystemExit, match="appears twice"):
        seeds.summarise(runs, set(), "quantized", pool_label=True)
    out = seeds.summarise(runs, set(), "quantized", pool_label=True, steps_label=True)
    assert {r["method"] for r in out["rows"]} == {"zsaq pool=128 steps=40, SAM quantized",
                                                  "zsaq pool=128 steps=80, SAM quantized"}
    pair = next(q for q in out["paired"] if {q["a"], q["b"]} == {"zsaq pool=128 steps=40, SAM quantized",
                                                                 "zsaq pool=128 steps=80, SAM quantized"})
    longer_minus_shorter = pair["mean_a_minus_b"] * (1 if "steps=80" in pair["a"] else -1)
    assert pair["seeds"] == 2 and longer_minus_shorter == pytest.approx(-0.2)
    monkeypatch.chdir(tmp_path)
    seeds.main(["--runs", *[p.name for p in runs], "--out", "sum.json", "--pool-label", "--steps-label"])
    written = json.loads((tmp_path / "sum.json").read_text())
    assert written["budget"] is None  # pool and steps are in the row names instead
    assert seeds.again_argv(tmp_path / "sum.json", [])[-2:] == ["--pool-label", "--steps-label"]


def test_seedtable_prints_the_rows_per_seed_from_a_summary(tmp_path):
    seedtable = _load("seedtable")
    summary = json.loads((_standing_results(tmp_path, _load("seeds")) / "summary.json").read_text())
    text = seedtable.table(summary, [("zsaq", "zsaq, SAM quantized"), ("`self_sample`", "self_sample, SAM quantized")])
    assert text.splitlines() == [
        "| rows | seed 0 | seed 1 | seed 2 | seed 3 | mean of the seeds shown | KL / top-1, mean over its seeds |",
        "|---|---|---|---|---|---|---|",
        "| zsaq | +3.000 | +2.800 | +2.600 | +3.200 | +2.900 | 0.2000 / 77.00% |",
        "| `self_sample` | +3.300 | +3.300 |  |  | +3.300 | 0.2000 / 77.00% |",
    ]
    text = seedtable.table(summary, [("rtn", "rtn")], seeds=["1", "2"])
    assert text.splitlines()[2] == "| rtn |  |  | - | 0.2000 / 77.00% |"
    with pytest.raises(SystemExit, match="no row 'zsaq rho=0, SAM quantized'.*'zsaq rho=0'"):
        seedtable.table(summary, [("x", "zsaq rho=0, SAM quantized")])
    assert seedtable.parse_row("`rho=0`|zsaq rho=0") == ("`rho=0`", "zsaq rho=0")
    assert seedtable.parse_row("zsaq rho=0") == ("zsaq rho=0", "zsaq rho=0")


def test_paired_over_named_seeds_recomputes_from_the_summary_s_per_seed_values(tmp_path, capsys, monkeypatch):
    """``--seeds`` keeps an older section's pair reproducible after its summary gains seeds: the pair is read again
    from the rows' per-seed Δppl and KL over just those seeds. Over every shared seed it is the summary's own entry,
    bit for bit; a seed one of the rows did not run is an error that names it."""
    seeds, paired = _load("seeds"), _load("paired")
    fp = {"setting": "fp", "method": "fp", "dppl": 0.0}

    def row(method, dppl, kl):
        r = _row(method, 4, False, "self-generated (zero-shot)", 10.0 + dppl, kl, 0.77)
        return {**r, "setting": "w4", "sam_space": "quantized"}

    # self_sample minus zsaq per seed: -0.3, -0.1, +0.1, -0.5; in KL -0.010, +0.002, +0.004, -0.020
    per_seed = {0: ((3.0, 0.180), (2.7, 0.170)), 1: ((2.8, 0.170), (2.7, 0.172)),
                2: ((2.6, 0.166), (2.7, 0.170)), 3: ((3.2, 0.190), (2.7, 0.170))}
    runs = [_quality_run(tmp_path / f"s{s}.json", s, [fp, row("zsaq", *z), row("self_sample", *q)])
            for s, (z, q) in per_seed.items()]
    runs.append(_quality_run(tmp_path / "s4.json", 4, [fp, row("zsaq", 2.5, 0.160)]))  # zsaq alone at seed 4
    summary = seeds.summarise(runs, set(), "quantized")
    z, q = "zsaq, SAM quantized", "self_sample, SAM quantized"
    for metric in ("dppl", "kl"):
        assert paired.compare(summary, q, z, metric=metric, seeds=["3", "1", "0", "2", "0"]) == paired.compare(
            summary, q, z, metric=metric)
    two = paired.compare(summary, q, z, seeds=["0", "3"])  # -0.3, -0.5: mean 0.4 for self_sample, sd 0.1414
    assert (two["seeds"], two["a_wins"], two["verdict"]) == (2, 2, "ahead")
    assert two["mean"] == pytest.approx(0.4) and two["se"] == pytest.approx(0.1)
    kl = paired.compare(summary, q, z, metric="kl", seeds=["1", "2"])  # +0.002, +0.004: zsaq lower at both
    assert (kl["a_wins"], kl["mean"]) == (0, pytest.approx(-0.003))
    assert paired.compare(summary, q, z, seeds=["2"])["verdict"] == "one seed"
    with pytest.raises(SystemExit, match=r"seed 4: 'self_sample, SAM quantized' did not run it"):
        paired.compare(summary, q, z, seeds=["0", "4"])
    (tmp_path / "sum.json").write_text(json.dumps(summary))
    monkeypatch.setattr(sys, "argv", ["paired.py", str(tmp_path / "sum.json"), q, z, "--seeds", "0", "3"])
    paired.main()
    assert capsys.readouterr().out.strip() == f"{q} against {z}: ahead at 2 of 2 seeds, by 0.40 ± 0.10 (ahead)"


PAIR_LINE = re.compile(r"^\s+(?:(\S+), )?(.+?) against (.+?)( in KL)?: (ahead at .*?) \((?:ahead|behind|level|one seed)\)")


def test_every_pair_quoted_in_bench_readme_is_reproduced_from_a_summary():
    """Each indented ``SETTING, A against B[ in KL]: ahead at ...`` line of bench/README.md is ``bench/paired.py`` on
    one of the committed summaries, over every seed the rows share or over a ``--seeds`` list its section names. A
    section may name a row by a short label it defines in its prose ("norms 1e-4"): then any row of the setting
    may stand for it, so a line whose numbers no pair in any summary gives is what fails, a stale or hand-edited one.
    """
    paired = _load("paired")
    summaries = [json.loads(p.read_text()) for p in sorted((BENCH / "results").glob("*seeds.json"))]
    sections = (BENCH / "README.md").read_text().split("\n### ")
    checked, stale = 0, []
    for section in sections:
        seed_lists = [None] + [m.split() for m in re.findall(r"--seeds ((?:\d+ ?)+)", section)]
        for line in section.splitlines():
            m = PAIR_LINE.match(line)
            if not m:
                continue
            setting, a, b, kl, said = m.groups()
            checked += 1
            if not any(said == got for got in _pairs(paired, summaries, setting, a, b, "kl" if kl else "dppl",
                                                    seed_lists)):
                stale.append(line.strip())
    assert checked > 200 and not stale, f"{len(stale)} of {checked} quoted pairs reproduced by no summary: {stale}"


def _pairs(paired, summaries, setting, a, b, metric, seed_lists):
    """The words of every pair ``a`` against ``b`` could stand for, in every summary, over each seed list; a line
    ``A over B against C over D`` is ``--gain``'s."""
    names = a.split(" over ") + b.split(" over ") if " over " in a and " over " in b else [a, b]
    for summary in summaries:
        methods = sorted({r["method"] for r in summary["rows"] if setting in (None, r["setting"])})
        for rows in itertools.product(*([n] if n in methods else methods for n in names)):
            if len(set(rows)) < len(rows):
                continue
            for seeds in seed_lists:
                try:
                    if len(rows) == 4:
                        yield paired.words(paired.gain(summary, *rows, setting, metric, seeds))
                    else:
                        yield paired.words(paired.compare(summary, *rows, setting, metric, seeds))
                except (SystemExit, KeyError):  # not paired there, not over those seeds, or an older summary
                    continue


def test_paired_gain_pairs_one_change_s_gain_for_two_methods_seed_by_seed(tmp_path, capsys, monkeypatch):
    """zsaq's gain from a lever against self_sample's from the same lever. Per seed zsaq with it minus without:
    -0.4, -0.2, -0.3; self_sample likewise: -0.1, +0.1, -0.1; the second minus the first: 0.3, 0.3, 0.2 (mean
    0.2667, sd 0.05774, se 0.03333). Seed 3, where only the zsaq rows ran, is left out."""
    seeds, paired = _load("seeds"), _load("paired")
    fp = {"setting": "fp", "method": "fp", "dppl": 0.0}

    def row(method, dppl, kl=0.2):
        r = _row(method, 4, False, "self-generated (zero-shot)", 10.0 + dppl, kl, 0.77)
        return {**r, "setting": "w4", "sam_space": "quantized"}

    per_seed = {0: (2.4, 2.8, 2.6, 2.7), 1: (2.5, 2.7, 2.6, 2.5), 2: (2.6, 2.9, 2.7, 2.8)}
    runs = [_quality_run(tmp_path / f"s{s}.json", s, [fp, row("zsaq lever", zl, 0.17 + s / 100), row("zsaq", z),
                                                      row("self_sample lever", ql), row("self_sample", q)])
            for s, (zl, z, ql, q) in per_seed.items()]
    runs.append(_quality_run(tmp_path / "s3.json", 3, [fp, row("zsaq lever", 1.0), row("zsaq", 5.0)]))
    summary = seeds.summarise(runs, set(), "quantized")
    zl, z, ql, q = (f"{m}, SAM quantized" for m in ("zsaq lever", "zsaq", "self_sample lever", "self_sample"))
    g = paired.gain(summary, zl, z, ql, q)
    assert (g["a"], g["b"]) == (f"{zl} over {z}", f"{ql} over {q}")
    assert (g["seeds"], g["a_wins"], g["verdict"]) == (3, 3, "ahead")
    assert g["mean"] == pytest.approx(0.8 / 3) and g["se"] == pytest.approx(0.057735 / 3 ** 0.5, abs=1e-6)
    back = paired.gain(summary, ql, q, zl, z)  # the other way round: the same gap, turned
    assert back["mean"] == pytest.approx(-0.8 / 3) and (back["a_wins"], back["verdict"]) == (0, "behind")
    kl = paired.gain(summary, zl, z, ql, q, metric="kl")  # zsaq's lever: KL -0.03, -0.02, -0.01; self_sample's 0
    assert kl["mean"] == pytest.approx(0.02) and kl["a_wins"] == 3
    assert paired.gain(summary, zl, z, ql, q, seeds=["0", "1"])["mean"] == pytest.approx(0.3)
    with pytest.raises(SystemExit, match=r"seed 3: 'self_sample lever, SAM quantized' did not run it"):
        paired.gain(summary, zl, z, ql, q, seeds=["0", "3"])
    (tmp_path / "sum.json").write_text(json.dumps(summary))
    monkeypatch.setattr(sys, "argv", ["paired.py", str(tmp_path / "sum.json"), zl, z, "--gain", ql, q])
    paired.main()
    assert capsys.readouterr().out.strip() == (f"{zl} over {z} against {ql} over {q}: ahead at 3 of 3 seeds, by "
                                               "0.27 ± 0.03 (ahead)")
    monkeypatch.setattr(sys, "argv", ["paired.py", str(tmp_path / "sum.json"), zl, z, q, "--gain", ql, q])
    with pytest.raises(SystemExit, match="pass one B"):
        paired.main()
