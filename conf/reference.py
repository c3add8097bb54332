"""docs/recipes.md, written from the schema's own field descriptions: `python -m conf.reference` rewrites it, and a
test fails when it is stale. Hand-written (pydantic's JSON schema has the facts, not a table a person reads)."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from conf.schema import RunConfig, SweepConfig

TARGET = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"
INTRO = """# Recipe reference

Generated from `conf/schema.py` by `python -m conf.reference`; do not edit by hand. A recipe is a YAML file
validated by this one schema, which holds every default; unknown keys are errors, and any problem stops the command
before work with one line naming the file and the key. `-o key=value` on the command line overrides any key
(`-o train.max_steps=10`, `-o train.lora.r=8`).
"""


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return ""
    return f"`{str(value) if isinstance(value, Path) else repr(value)}`".replace("|", "\\|")


def _type(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "").replace("pathlib.", "")
    return f"`{text}`".replace("|", "\\|")


def _rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += _rows(annotation, f"{key}.")
            continue
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{key}` | {_type(annotation)} | {_default(field)} | {description} |")
    return rows


def _section(title: str, model: type[BaseModel]) -> list[str]:
    lines = [f"## {title}", "", inspect.cleandoc(model.__doc__ or ""), ""]
    sections = {name: field.annotation for name, field in model.model_fields.items()
                if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)}
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"] + _rows(model) + [""]
    for name, section in sections.items():
        if section.__doc__ and section.__doc__ != BaseModel.__doc__:
            lines += [f"**`{name}`**: {' '.join(inspect.cleandoc(section.__doc__).split())}", ""]
    return lines


def markdown() -> str:
    lines = [INTRO, *_section("Recipes (`loraflow run CONFIG`)", RunConfig),
             *_section("Sweeps (`loraflow sweep SWEEP`)", SweepConfig)]
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    TARGET.write_text(markdown(), encoding="utf-8")
    sys.stdout.write(f"wrote {TARGET}\n")
