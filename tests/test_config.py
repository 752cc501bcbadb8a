"""Config: validation messages that say what to do, overrides, every recipe under configs/ validates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from zsaq_dist.config import Config, load_config, validate
from zsaq_dist.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model": {"path": "m"}, "output": {"dir": "o"}}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_validates_and_has_a_command_header(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    head = path.read_text().splitlines()[0]
    assert head.startswith("#") and "zsaq" in head, f"{path.name} must start with the command that runs it"


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"quant\.weights\.bitz: unknown key"):
        validate({**BASE, "quant": {"weights": {"bitz": 4}}})


@pytest.mark.parametrize(
    "quant,msg",
    [
        ({"weights": {"bits": 9}}, "use an integer from 2 to 8"),
        ({"weights": {"bits": 1}}, "use an integer from 2 to 8"),
        ({"weights": {"group_size": 0}}, "positive integer, or null"),
        ({"weights": {"bits": 4}, "activations": {"bits": 4}}, "8-bit dynamic per-token"),
        ({"weights": {"bits": 8, "group_size": 128}, "activations": {"bits": 8}}, "group_size: null"),
        ({"weights": {"bits": 4, "group_size": None}, "activations": {"bits": 8}}, "give weights.group_size"),
    ],
)
def test_bits_the_format_cannot_hold(quant, msg):
    with pytest.raises(ConfigError, match=msg):
        validate({**BASE, "quant": quant})


def test_fresh_seeds_refuse_hard_picks_of_a_pool_they_never_repeat():
    method = {"seed_data": {"fresh_per_epoch": True}, "generator": {"seed_hardness": 1.0}}
    with pytest.raises(ConfigError, match="set seed_hardness: 0 or fresh_per_epoch: false"):
        validate({**BASE, "method": method})
    assert validate({**BASE, "method": {"seed_data": {"fresh_per_epoch": True}}}).method.seed_data.fresh_per_epoch


def test_missing_required_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="output: required key is missing"):
        validate({"model": {"path": "m"}})
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(BASE))
    cfg = load_config(p, ["quant.weights.bits=3", "quant.weights.group_size=null", "method.name=rtn", "quant.ignore=[lm_head, re:.*gate.*]"])
    assert cfg.quant.weights.bits == 3 and cfg.quant.weights.group_size is None
    assert cfg.method.name == "rtn" and cfg.quant.ignore == ["lm_head", "re:.*gate.*"]
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(p, ["quant.weights.bits"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_format_and_hash():
    a = validate({**BASE, "quant": {"weights": {"bits": 8, "group_size": None}, "activations": {"bits": 8}}})
    assert a.quant.format == "int-quantized"
    b = validate(BASE)
    assert b.quant.format == "pack-quantized"
    c = validate({**BASE, "output": {"dir": "elsewhere"}, "dist": {"num_workers": 4}})
    assert b.hash() == c.hash() != a.hash()


def test_readme_config_reference_is_current():
    import subprocess
    import sys

    table = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_reference.py")], capture_output=True, text=True, check=True).stdout
    assert table.strip() in (ROOT / "README.md").read_text(), "regenerate it: python scripts/config_reference.py"
