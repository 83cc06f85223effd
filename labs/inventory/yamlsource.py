"""YAML reading that remembers where every key came from.

PyYAML silently keeps the last of two equal mapping keys; a lab inventory with
two hosts called `b` must be refused instead. We also record the line of every
node so an error can point at it.
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

from labs.errors import ConfigError

KeyPath = tuple[str | int, ...]


def format_path(path: KeyPath) -> str:
    """`("hosts", "b", "devices", 0, "pci")` -> `hosts.b.devices[0].pci`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = str(part)
            # a key with a line break or other control character is shown escaped: the error stays one line
            text = repr(text) if not text.isprintable() else text
            out += ("." if out else "") + text
    return out or "(top level)"


class InventoryError(ConfigError):
    """One line: file, key path, problem."""

    def __init__(self, file: Path | str, path: KeyPath | str, problem: str, line: int | None = None) -> None:
        where = path if isinstance(path, str) else format_path(path)
        where = where if where.isprintable() else repr(where)
        problem = " ".join(problem.split())  # parser messages span lines; ours is always one
        loc = f"{file}:{line}" if line else str(file)
        super().__init__(f"{loc}: {where}: {problem}")
        self.file = str(file)
        self.key_path = where
        self.problem = problem
        self.line = line


class SourceDoc:
    """Parsed YAML plus the line number of each key path."""

    def __init__(self, file: Path, data: Any, lines: dict[KeyPath, int]) -> None:
        self.file = file
        self.data = data
        self.lines = lines

    def line_of(self, path: KeyPath) -> int | None:
        # Fall back to the nearest enclosing node that has a line.
        for cut in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:cut]))
            if line is not None:
                return line
        return None

    def error(self, path: KeyPath, problem: str) -> InventoryError:
        return InventoryError(self.file, path, problem, self.line_of(path))


def _construct(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int], file: Path) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise InventoryError(file, path, "YAML merge keys (<<) are not supported", key_node.start_mark.line + 1)
            key = _construct(key_node, (*path, "<key>"), {}, file)
            if not isinstance(key, Hashable) or isinstance(key, (list, dict)):
                raise InventoryError(file, path, "mapping keys must be scalars", key_node.start_mark.line + 1)
            key = str(key) if not isinstance(key, (str, int)) else key
            if key in out:
                raise InventoryError(
                    file, (*path, key), f"duplicate key '{key}'", key_node.start_mark.line + 1
                )
            out[key] = _construct(value_node, (*path, key), lines, file)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, (*path, i), lines, file) for i, item in enumerate(node.value)]
    return _construct_scalar(node)


def _construct_scalar(node: yaml.Node) -> Any:
    # The composer has already resolved the tag (int, bool, str...); reuse
    # SafeLoader's constructors so scalars mean exactly what they mean in YAML.
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def read_yaml(file: Path) -> SourceDoc:
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InventoryError(file, (), "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InventoryError(file, (), f"cannot read file: {exc}") from None
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise InventoryError(file, (), f"invalid YAML: {exc.problem or exc}", line) from None
    except yaml.YAMLError as exc:
        raise InventoryError(file, (), f"invalid YAML: {exc}") from None
    if len(nodes) != 1 or nodes[0] is None:
        raise InventoryError(file, (), "expected exactly one YAML document with a mapping at the top")
    lines: dict[KeyPath, int] = {}
    try:
        data = _construct(nodes[0], (), lines, file)
    except yaml.YAMLError as exc:
        raise InventoryError(file, (), f"invalid YAML value: {exc}") from None
    if not isinstance(data, dict):
        raise InventoryError(file, (), "the top level must be a mapping")
    return SourceDoc(file, data, lines)
