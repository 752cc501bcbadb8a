"""Print the config reference (Markdown) from zsaq_dist.config, for README.md.

    python scripts/config_reference.py
"""

from __future__ import annotations

import json
import typing

from pydantic import BaseModel

from zsaq_dist.config import Config


def _type(ann) -> str:
    s = str(ann).replace("typing.", "").replace("zsaq_dist.config.", "")
    return s.replace("<class '", "").replace("'>", "").replace("NoneType", "null").replace(" | ", " or ")


def rows(model: type[BaseModel], prefix: str = ""):
    """(key, type, default, description) for every leaf key of ``model``."""
    for name, f in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = f.annotation
        sub = [a for a in (typing.get_args(ann) or (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if sub:
            default = "required" if f.is_required() else ("null" if f.default is None else "")
            if default:
                yield key, sub[0].__name__ + (" or null" if type(None) in typing.get_args(ann) else ""), default, f.description or ""
            yield from rows(sub[0], key + ".")
            continue
        default = "required" if f.is_required() else json.dumps(f.default)
        yield key, _type(ann), default, f.description or ""


def main() -> None:
    print("| key | type | default | meaning |")
    print("|---|---|---|---|")
    for key, typ, default, desc in rows(Config):
        print(f"| `{key}` | {typ} | `{default}` | {desc} |")


if __name__ == "__main__":
    main()
