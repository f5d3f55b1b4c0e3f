"""Recipe problems as one line each: where in the file, which key, what to do.

Pydantic's errors name internals and no line; a user needs ``recipe.yaml:12: unknown key 'lr' at
train.lr; did you mean 'learning_rate'?``.
"""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, BaseModel


def describe(error: dict, source: str, lines: dict[tuple, int | str], schema: type[BaseModel]) -> str:
    """One line for one pydantic error: where (file:line or override), which key, what to do."""
    loc = tuple(error["loc"])
    # Errors raised by model validators end their loc at the section; strip pydantic's internals.
    loc = tuple(p for p in loc if not (isinstance(p, str) and p.startswith("function-")))
    if loc[:2] == ("data", "eval") and len(loc) > 2 and loc[2] in ("sources", "named"):
        loc = loc[:2] + loc[3:]  # the tag of data.eval's form (schema.EvalSets), not a key the user wrote
    dotted = ".".join(str(p) for p in loc) or "(recipe)"
    where = locate(source, lines, loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        section = loc[:-1]
        if section[:2] == ("data", "eval") and len(section) > 2 and isinstance(section[2], str):
            section = section[:2] + section[3:]  # data.eval.<set name>.k: the set's name is not a key of the schema
        valid = _valid_keys(schema, section)
        hint = _suggest(str(loc[-1]), valid)
        tip = f"did you mean {hint}?" if hint else f"valid keys here: {', '.join(valid)}"
        return f"{where}: unknown key '{loc[-1]}' at {dotted}; {tip}"
    if kind == "missing":
        return f"{where}: missing required key {dotted}"
    message = error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    shown = "" if isinstance(got, (dict, list)) or kind.startswith("value_error") else f" (got {got!r})"
    return f"{where}: {dotted}: {message}{shown}"


def locate(source: str, lines: dict[tuple, int | str], loc: tuple) -> str:
    """``file:line`` for a YAML key (or its nearest enclosing one), ``file (command-line override)``
    for an override."""
    line = _nearest_line(loc, lines)
    if isinstance(line, int):
        return f"{source}:{line}"
    return f"{source} ({line})" if line else source


def _nearest_line(loc: tuple, lines: dict[tuple, int | str]) -> int | str | None:
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _valid_keys(schema: type[BaseModel], section_loc: tuple) -> list[str]:
    """Field names (and aliases) of the schema section at ``section_loc``."""
    model: Any = schema
    for part in section_loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = _section_type(field.annotation)
        if model is None:
            return []
    names: list[str] = []
    for name, field in model.model_fields.items():
        names.append(name)
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.extend(a for a in alias.choices if isinstance(a, str) and a != name)
    return names


def _section_type(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def _suggest(word: str, candidates: list[str]) -> str | None:
    """Closest valid key by edit distance (transpositions count as one edit)."""
    scored = sorted((_edit_distance(word.lower(), c.lower()), c) for c in candidates)
    close = [c for d, c in scored if d <= max(1, len(word) // 3)]
    if not close:
        return None
    best = close[0]
    # Name the alias target too, e.g. 'rank' is an alias of 'r'.
    model_names = [c for c in candidates if c != best and _edit_distance(best, c) > 0 and best.startswith(c)]
    extra = f" (or '{model_names[0]}')" if model_names else ""
    return f"'{best}'{extra}"


def _edit_distance(a: str, b: str) -> int:
    """Optimal string alignment distance (Levenshtein + adjacent transpositions)."""
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        d[i][0] = i
    for j in range(len(b) + 1):
        d[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]
