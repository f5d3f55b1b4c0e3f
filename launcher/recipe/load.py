"""From a recipe file to the frozen, resolved :class:`Recipe`: YAML (the guarded reader) -> CLI
overrides (``a.b.c=value``) -> pydantic schema -> what the recipe implies -> the rules.

Every problem on the way is a :class:`RecipeError` whose lines name the key path, the YAML line
it came from and what to do. Everything that reads or changes a recipe goes through
:func:`validate_recipe`, so no recipe escapes the rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ftl.recipe import errors as recipe_errors, rules, safe_yaml as recipe_yaml
from ftl.recipe.schema import Recipe, RecipeError



def load_recipe(path: str | Path, overrides: list[str] | None = None, check_files: bool = False) -> Recipe:
    """Read a recipe file, apply ``key.sub=value`` overrides and validate it (``check_files``: also
    that its local model and data paths exist, each error at its ``file:line``)."""
    path = Path(path)
    try:
        raw, lines = recipe_yaml.parse(recipe_yaml.read_text(path), str(path))
    except recipe_yaml.RecipeYamlError as err:
        raise RecipeError([str(err)]) from None
    if not isinstance(raw, dict):
        raise RecipeError([f"{path}: a recipe is a YAML mapping with sections model, data, method, train, output"])
    for override in overrides or []:
        lines[apply_override(raw, override)] = "command-line override"
    recipe = validate_recipe(raw, source=str(path), lines=lines)
    missing = recipe.missing_files() if check_files else []
    if missing:
        raise RecipeError([f"{recipe_errors.locate(str(path), lines, key)}: {'.'.join(map(str, key))}: {message}"
                           for key, message in missing])
    return recipe


def validate_recipe(raw: dict, source: str = "<recipe>", lines: dict[tuple, int | str] | None = None) -> Recipe:
    """Validate a recipe dict, translating pydantic errors into one actionable line each."""
    lines = lines or {}
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError([recipe_errors.describe(e, source, lines, Recipe) for e in err.errors()]) from None
    recipe = with_implied(recipe)
    problems = [f"{recipe_errors.locate(source, lines, key)}: {'.'.join(map(str, key))}: {message}" for key, message in rules.check(recipe)]
    if problems:
        raise RecipeError(problems)
    return recipe


def with_values(recipe: Recipe, values: dict[str, Any]) -> Recipe:
    """A new recipe with dotted keys set (``output.dir``, ``data.train.0.path``), validated again:
    recipes are frozen, so a change goes through the same rules as the file."""
    raw = recipe.model_dump(mode="json")
    for key, value in values.items():
        *parents, last = key.split(".")
        node: Any = raw
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(last) if isinstance(node, list) else last] = value
    return validate_recipe(raw, source="<recipe>")


def with_implied(recipe: Recipe) -> Recipe:
    """A copy with what the recipe implies filled in: ``method.type: qlora`` means a 4-bit base; a
    Slurm job's nodes are its machines and its GPUs per node its processes per machine, whichever
    of the two the recipe sets (set both otherwise, and ``ftl.recipe.rules`` reports the disagreement).
    ``slurm.gpus_per_node: 0`` asks for no GPUs (a CPU cluster)."""
    quant, dist, slurm = recipe.quantization, recipe.distributed, recipe.slurm
    updates: dict[str, Any] = {}
    if recipe.method.type == "qlora" and quant.bits is None:
        updates["quantization"] = quant.model_copy(update={"bits": 4})
    machines = slurm.nodes if slurm.nodes > 1 and dist.num_machines == 1 else dist.num_machines
    processes = slurm.gpus_per_node if slurm.gpus_per_node and dist.num_processes == 1 else dist.num_processes
    if (machines, processes) != (dist.num_machines, dist.num_processes):
        updates["distributed"] = dist.model_copy(update={"num_machines": machines, "num_processes": processes})
    nodes = machines if slurm.nodes == 1 else slurm.nodes  # (a 1-node job of several machines is never meant)
    gpus = processes if slurm.gpus_per_node is None and processes > 1 else slurm.gpus_per_node
    if (nodes, gpus) != (slurm.nodes, slurm.gpus_per_node):
        updates["slurm"] = slurm.model_copy(update={"nodes": nodes, "gpus_per_node": gpus})
    return recipe.model_copy(update=updates) if updates else recipe


def apply_override(raw: dict, override: str) -> tuple:
    key, sep, value = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise RecipeError([f"override '{override}': expected key.sub=value with no empty part, e.g. train.learning_rate=1e-4"])
    node: Any = raw
    path: list[Any] = []
    for i, part in enumerate(parts):
        if isinstance(node, dict) and part.isdigit() and part not in node and path and path[-1] in ("train", "eval"):
            # data.train.0.path: a single source may be written as one mapping, item 0 of its list
            if part != "0":
                raise RecipeError([f"override '{override}': {'.'.join(map(str, path))} has 1 item; index {part} is out of range (0)"])
            path.append(0)
            if i == len(parts) - 1:
                raise RecipeError([f"override '{override}': name a key of item 0 (e.g. {key}.path=...)"])
            continue
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError([f"override '{override}': {'.'.join(map(str, path))} has {len(node)} item(s); '{part}' is "
                                   f"not an index of it (0 to {len(node) - 1})"])
            index: Any = int(part)
        else:
            index = part
        path.append(index)
        if i == len(parts) - 1:
            break
        child = node[index] if isinstance(node, list) else node.get(part)
        if child is None:
            child = node[index] = {}
        if not isinstance(child, (dict, list)):
            raise RecipeError([f"override '{override}': '{part}' is not a section"])
        node = child
    try:
        node[path[-1]] = recipe_yaml.override_value(value, override)
    except recipe_yaml.RecipeYamlError as err:
        raise RecipeError([str(err)]) from None
    return tuple(path)
