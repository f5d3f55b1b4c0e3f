"""Reading a recipe's YAML without surprises: the one guarded loader for recipe files and overrides.

A recipe may come from someone else. YAML can do more than a recipe needs, and PyYAML turns some of
it into crashes or hangs: undecodable bytes, complex keys (``? [a, b]``), self-referencing aliases,
alias bombs (a few hundred bytes that expand to billions of values), and duplicate keys, which
PyYAML silently merges (a second ``train:`` replaces the first). This loader composes the node
graph once, walks it with a budget, refuses each of those with the file and line, and only then
constructs the values (``SafeLoader``: plain data, never objects). Anchors and ``<<`` merges that
stay within the budget keep working.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20  # a recipe is a page of YAML; anything near this is not one
MAX_VALUES = 20_000  # mappings, sequences and scalars after aliases are expanded

LineMap = dict[tuple, "int | str"]


class RecipeYamlError(ValueError):
    """The text is not a recipe's YAML; the message names the place."""


class YamlSyntaxError(RecipeYamlError):
    """Not YAML at all (as opposed to YAML a recipe refuses: aliases, keys, size)."""


def read_text(path: Path) -> str:
    """The recipe file's text (UTF-8), or an error naming the file."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RecipeYamlError(f"{path}: cannot read recipe ({err.strerror or err})") from None
    if len(data) > MAX_BYTES:
        raise RecipeYamlError(f"{path}: {len(data)} bytes is too large for a recipe (limit {MAX_BYTES})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise RecipeYamlError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the recipe as UTF-8") from None


def parse(text: str, source: str) -> tuple[Any, LineMap]:
    """Values of the YAML ``text`` and the 1-based line of every key path (for error messages)."""
    lines: LineMap = {}
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{source}:{mark.line + 1}" if mark else source
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise YamlSyntaxError(f"{where}: invalid YAML: {problem}") from None
        if root is None:
            return None, lines
        _Walk(source, lines).node(root, (), ())
        try:
            return loader.construct_document(root), lines
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{source}:{mark.line + 1}" if mark else source
            raise YamlSyntaxError(f"{where}: invalid YAML: {getattr(err, 'problem', None) or err}") from None
        except ValueError as err:  # an integer of thousands of digits (Python's int conversion limit)
            raise RecipeYamlError(f"{source}: a value is not usable: {str(err).split(';')[0]}") from None
    except RecursionError:
        raise RecipeYamlError(f"{source}: the YAML is nested too deeply (thousands of levels); a recipe is a few "
                              "levels of sections") from None
    finally:
        loader.dispose()


class _Walk:
    """Visits every node as the values would expand, with a budget, recording key lines."""

    def __init__(self, source: str, lines: LineMap):
        self.source, self.lines, self.visited = source, lines, 0

    def node(self, node: yaml.Node, path: tuple, ancestors: tuple) -> None:
        self.visited += 1
        where = f"{self.source}:{node.start_mark.line + 1}"
        if self.visited > MAX_VALUES:
            raise RecipeYamlError(f"{where}: the recipe expands to more than {MAX_VALUES} values (aliases repeating aliases?)")
        if any(node is a for a in ancestors):
            raise RecipeYamlError(f"{where}: an alias refers to a value that contains it; write the value out")
        ancestors = ancestors + (node,)
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise RecipeYamlError(f"{self.source}:{key_node.start_mark.line + 1}: keys must be plain names, not lists or mappings")
                key = key_node.value
                line = key_node.start_mark.line + 1
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` merges into this mapping
                    self.node(value_node, path, ancestors)
                    continue
                if key in seen:
                    raise RecipeYamlError(f"{self.source}:{line}: duplicate key '{key}' (first at line {seen[key]}); "
                                          "YAML would silently keep only the last one")
                seen[key] = line
                self.lines[path + (key,)] = line
                self.node(value_node, path + (key,), ancestors)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.lines[path + (i,)] = item.start_mark.line + 1
                self.node(item, path + (i,), ancestors)


def override_value(text: str, override: str) -> Any:
    """The value of a ``key=value`` override, read as YAML with the same guards (plain text if not YAML)."""
    if not text.strip():
        return None
    try:
        shown = override if len(override) <= 80 else override[:60] + "..."
        value, _ = parse(text, f"override '{shown}'")
    except YamlSyntaxError:
        return text
    return value
