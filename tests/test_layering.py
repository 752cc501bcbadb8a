"""The core (quant, optim, minimax, data, eval) is plain torch: it imports with deepspeed and ray blocked."""

from __future__ import annotations

import subprocess
import sys

CORE = ["zsaq_dist.config", "zsaq_dist.quant", "zsaq_dist.optim.sam", "zsaq_dist.minimax", "zsaq_dist.data", "zsaq_dist.eval"]

BLOCK = """
import importlib, importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('deepspeed', 'ray'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import pkgutil, zsaq_dist
for mod in {mods!r}:
    m = importlib.import_module(mod)
    for info in pkgutil.walk_packages(getattr(m, '__path__', []), mod + '.'):
        importlib.import_module(info.name)
assert not any(k.split('.')[0] in ('deepspeed', 'ray') for k in sys.modules)
print('ok')
"""


def test_core_imports_without_deepspeed_or_ray():
    out = subprocess.run([sys.executable, "-c", BLOCK.format(mods=CORE)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
