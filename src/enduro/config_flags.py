"""CLI flags derived from the config dataclasses: one `--flag` per field, help from its docstring.

Adding a field to a config class adds the flag; nothing here names a field.
"""

import ast
import inspect
import itertools
import textwrap
from dataclasses import MISSING, Field, fields
from typing import Annotated, Any

import typer


def field_docs(cls: type) -> dict[str, str]:
    """The string literal that follows each field in the class body (its documentation)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    class_def = tree.body[0]
    assert isinstance(class_def, ast.ClassDef)
    docs: dict[str, str] = {}
    for node, following in itertools.pairwise(class_def.body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
            text = following.value.value
            if isinstance(text, str):
                docs[node.target.id] = " ".join(text.split())
    return docs


def flag_names(name: str, kind: Any) -> list[str]:
    flag = name.replace("_", "-")
    return [f"--{flag}/--no-{flag}"] if kind is bool else [f"--{flag}"]


def _default(item: Field[Any]) -> Any:
    if item.default is not MISSING:
        return item.default
    if item.default_factory is not MISSING:
        return item.default_factory()
    raise TypeError(f"config field {item.name} needs a default to become a flag")


def config_parameters(*classes: type) -> list[inspect.Parameter]:
    """Keyword-only parameters, annotated for typer, for every field of the given dataclasses."""
    parameters = []
    for cls in classes:
        docs = field_docs(cls)
        for item in fields(cls):
            option = typer.Option(*flag_names(item.name, item.type), help=docs.get(item.name, ""))
            parameters.append(
                inspect.Parameter(
                    item.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=_default(item),
                    annotation=Annotated[item.type, option],
                )
            )
    return parameters


def split_by_class(values: dict[str, Any], *classes: type) -> list[dict[str, Any]]:
    """Route flat flag values back to the dataclass each belongs to."""
    return [{f.name: values[f.name] for f in fields(cls) if f.name in values} for cls in classes]
