"""``singularity-ds config-docs``: the schema as a markdown table (docs/config.md is its output)."""
from .check import type_name
from .schema import keys

HEADER = """# Config keys

Every key a singularity-ds config holds: the original Singularity's keys and singularity-ds's own.
A task config (`singularity_ds/configs/*.yaml`, or your own YAML) sets what its task needs; a key it
leaves out takes the default below. Overlays and `key=value` overrides are checked against these
types, ranges and choices when loaded.

Generated from `singularity_ds/config/schema.py` by `singularity-ds config-docs > docs/config.md`;
do not edit by hand (a test checks that it is current).

"""


def _flow(v) -> str:
    """A value as the YAML files write it: ``{image: 128, video: 96}``, ``[0.9, 0.999]``, ``null``."""
    if v is None:
        return "null"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_flow(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_flow(x) for x in v) + "]"
    return str(v) if v != "" else "''"


def _accepts(spec) -> str:
    if spec.choices or spec.pattern:
        return ", ".join(list(spec.choices or ()) + ([spec.pattern[1]] if spec.pattern else []))
    if spec.ge is not None and spec.le is not None:
        return f"[{spec.ge}, {spec.le}]"
    bounds = [f">= {spec.ge}" if spec.ge is not None else "", f"> {spec.gt}" if spec.gt is not None else "",
              f"<= {spec.le}" if spec.le is not None else ""]
    return ", ".join(b for b in bounds if b)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_docs() -> str:
    """The markdown reference: one row per key (a group's row carries its doc; the keys of an
    ``{image, video}`` value are described by their key's row)."""
    rows = ["| key | type | default | accepts | doc |", "|---|---|---|---|---|"]
    for spec in keys().values():
        if spec.member:
            continue
        if spec.group is not None and spec.group is spec.type:
            rows.append(f"| **{spec.path}** | group | | | {_cell(spec.doc)} |")
            continue
        rows.append(f"| `{spec.path}` | {_cell(type_name(spec.type))} | `{_cell(_flow(spec.default))}` | "
                    f"{_cell(_accepts(spec))} | {_cell(spec.doc)} |")
    return HEADER + "\n".join(rows) + "\n"
