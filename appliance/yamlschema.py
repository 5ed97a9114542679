"""Turn a YAML node tree into typed, frozen dataclasses, with errors that point at the file.

This module owns the *mechanism* of strict configuration loading; ``config.py`` owns the
*schema* (which sections and keys exist). A section is a frozen dataclass; each field's type
hint says how its YAML value is read:

* ``str``, ``int``, ``float``, ``bool`` — the YAML scalar must already have that type
  (``port: "104"`` is a string, not a port);
* ``Annotated[T, Check(fn, "what is expected")]`` — ``fn(value)`` must return True;
* ``Annotated[T, Parse(fn, "what is expected")]`` — ``fn(scalar text)`` converts, raising
  ``ValueError`` on bad input (durations, byte sizes, networks); a ``Check`` beside it tests
  the converted value (a duration above zero);
* ``Annotated[T, Custom(fn)]`` — ``fn(node, path, ctx)`` reads the node itself (for free-form
  parts such as rule conditions) and reports through ``ctx.error``;
* ``Literal[...]``, ``tuple[T, ...]`` (a YAML list), ``Mapping[str, T]`` (a YAML mapping of
  names), ``T | None`` and nested dataclasses.

YAML anchors and aliases (``&retry`` ... ``*retry``) and merge keys (``<<: *central``, which
give a mapping the entries it does not set itself) mean what YAML 1.1 says.

A field with a default is optional; one without is required. Unknown keys are errors. Every
error carries the file, line and column (1-based) of the offending key or item and the dotted
key path, e.g. ``appliance.yaml:14:5: destinations.central.port: expected an integer 1-65535,
got "104a"``. All errors of a file are collected, not just the first.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

T = TypeVar("T")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration file."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"

    def as_warning(self) -> str:
        """The same, for something the file may mean (the box runs with it)."""
        return f"{self.file}:{self.line}:{self.column}: warning: {self.path}: {self.message}"


class ConfigError(Exception):
    """A configuration file that cannot be used; ``problems`` lists every reason."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True)
class Check:
    """A predicate on an already-typed value, with the words for what was expected."""

    predicate: Callable[[Any], bool]
    expected: str


@dataclass(frozen=True)
class Parse:
    """A converter from the scalar's text; raises ValueError when the text is not valid."""

    convert: Callable[[str], Any]
    expected: str


@dataclass(frozen=True)
class Custom:
    """Reads the node itself: ``read(node, path, ctx)`` returns the value or reports errors."""

    read: Callable[[Node, str, Context], Any]


class Context:
    """Collects problems while one file is read."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.problems: list[Problem] = []

    def error(self, node: Node | None, path: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        column = node.start_mark.column + 1 if node is not None else 1
        self.problems.append(Problem(self.filename, line, column, path, message))


class _Invalid:
    """Marks a value that failed to read; the error is already reported."""


INVALID: Any = _Invalid()

_SCALAR_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def describe(node: Node) -> str:
    """How a node appears in an error message: its text in quotes, or its kind."""
    if isinstance(node, ScalarNode):
        if node.tag.endswith(":null"):
            return "nothing"
        return f'"{node.value}"'
    return "a list" if isinstance(node, SequenceNode) else "a mapping"


_CONSTRUCTOR = yaml.SafeLoader("")
# What PyYAML's constructors raise for a value their tag cannot take (``!!int abc``, a date
# such as 2024-02-30, ``!!timestamp soon``, ``!!bool maybe``).
_UNCONSTRUCTIBLE = (yaml.YAMLError, ValueError, TypeError, KeyError, AttributeError, OverflowError)


def scalar_value(node: Node) -> Any:
    """The Python value of a node, resolved by YAML's own tag rules; INVALID when its text is
    not a value of its tag (a plain 2024-02-30 looks like a date and is none), which each
    reader reports as a value it did not expect."""
    try:
        return _CONSTRUCTOR.construct_object(node, deep=True)
    except _UNCONSTRUCTIBLE:
        return INVALID


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def mapping_items(node: MappingNode, path: str, ctx: Context) -> list[tuple[str, Node, Node]]:
    """(key text, key node, value node) for each entry; reports non-string and repeated keys."""
    seen: dict[str, Node] = {}
    items: list[tuple[str, Node, Node]] = []
    for key_node, value_node in node.value:
        if not isinstance(key_node, ScalarNode) or key_node.tag.endswith(":null"):
            ctx.error(key_node, path, "keys must be plain names")
            continue
        key = str(key_node.value)
        if key in seen:
            ctx.error(key_node, join(path, key), f"repeated key (first at line {seen[key].start_mark.line + 1})")
            continue
        seen[key] = key_node
        items.append((key, key_node, value_node))
    return items


def read(
    tp: Any, node: Node, path: str, ctx: Context, where: Node | None = None, expected: str | None = None
) -> Any:
    """Read ``node`` as type ``tp``; ``where`` is the node errors point at (default: ``node``);
    ``expected`` words what a scalar should have been (default: its type)."""
    at = where if where is not None else node
    origin = get_origin(tp)

    if origin is typing.Annotated:
        base, *extras = get_args(tp)
        custom = next((e for e in extras if isinstance(e, Custom)), None)
        if custom is not None:
            return custom.read(node, path, ctx)
        parse = next((e for e in extras if isinstance(e, Parse)), None)
        checks = [e for e in extras if isinstance(e, Check)]
        if parse is not None:
            value = _read_parsed(parse, base, node, path, ctx, at)
        else:
            value = read(base, node, path, ctx, where, checks[0].expected if checks else None)
        if value is INVALID:
            return INVALID
        for check in checks:
            if not check.predicate(value):
                ctx.error(at, path, f"expected {check.expected}, got {describe(node)}")
                return INVALID
        return value

    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if isinstance(node, ScalarNode) and node.tag.endswith(":null"):
            return None
        return read(options[0], node, path, ctx, where, expected)

    if origin is Literal:
        choices = get_args(tp)
        value = scalar_value(node) if isinstance(node, ScalarNode) else INVALID
        if value not in choices:
            words = ", ".join(str(c) for c in choices)
            ctx.error(at, path, f"expected one of {words}, got {describe(node)}")
            return INVALID
        return value

    if origin is tuple:
        item_type = get_args(tp)[0]
        if isinstance(node, ScalarNode) and node.tag.endswith(":null"):
            return ()
        if not isinstance(node, SequenceNode):
            ctx.error(at, path, f"expected a list, got {describe(node)}")
            return INVALID
        items = [read(item_type, item, f"{path}[{i}]", ctx) for i, item in enumerate(node.value)]
        return INVALID if any(i is INVALID for i in items) else tuple(items)

    if origin in (Mapping, dict, typing.Mapping) or origin is getattr(typing, "Mapping", None):
        value_type = get_args(tp)[1]
        if isinstance(node, ScalarNode) and node.tag.endswith(":null"):
            return types.MappingProxyType({})
        if not isinstance(node, MappingNode):
            ctx.error(at, path, f"expected a mapping of names, got {describe(node)}")
            return INVALID
        result = {}
        for key, key_node, value_node in mapping_items(node, path, ctx):
            result[key] = read(value_type, value_node, join(path, key), ctx, key_node)
        if any(v is INVALID for v in result.values()):
            return INVALID
        return types.MappingProxyType(result)

    if dataclasses.is_dataclass(tp):
        return read_section(typing.cast(type, tp), node, path, ctx, at)

    if tp in _SCALAR_WORDS:
        words = expected or _SCALAR_WORDS[tp]
        if not isinstance(node, ScalarNode):
            ctx.error(at, path, f"expected {words}, got {describe(node)}")
            return INVALID
        value = scalar_value(node)
        ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if tp is str and not node.tag.endswith(":str"):
            ok = False
        if not ok:
            ctx.error(at, path, f"expected {words}, got {describe(node)}{_quoting_hint(tp, node)}")
            return INVALID
        return value

    raise TypeError(f"configuration type not supported: {tp!r}")


def _quoting_hint(expected: type, node: ScalarNode) -> str:
    """Why a scalar that reads as the right value is not one: YAML's own typing of an unquoted
    word (NO, on, 1234 are a boolean and a number, not text), or quotes around a number."""
    if expected is str and node.style is None and not node.tag.endswith(":null"):
        kind = {"bool": "a yes/no value", "int": "a number", "float": "a number"}.get(node.tag.rsplit(":", 1)[-1])
        if kind is not None:
            return f" (YAML reads {node.value} without quotes as {kind}: write \"{node.value}\")"
    if expected in (int, float) and node.style in ("'", '"') and node.tag.endswith(":str"):
        try:
            expected(node.value)
        except ValueError:
            return ""
        return f" (in quotes it is text: write {node.value} without them)"
    return ""


def _read_parsed(parse: Parse, base: Any, node: Node, path: str, ctx: Context, at: Node) -> Any:
    if not isinstance(node, ScalarNode) or node.tag.endswith(":null"):
        ctx.error(at, path, f"expected {parse.expected}, got {describe(node)}")
        return INVALID
    try:
        return parse.convert(str(node.value))
    except ValueError:
        ctx.error(at, path, f"expected {parse.expected}, got {describe(node)}")
        return INVALID


def read_section(cls: type[T], node: Node, path: str, ctx: Context, where: Node | None = None) -> T:
    """Read a mapping node into the frozen dataclass ``cls``."""
    at = where if where is not None else node
    if isinstance(node, ScalarNode) and node.tag.endswith(":null"):
        node = MappingNode("tag:yaml.org,2002:map", [], node.start_mark, node.end_mark)
    if not isinstance(node, MappingNode):
        ctx.error(at, path, f"expected a mapping, got {describe(node)}")
        return typing.cast(T, INVALID)
    hints = get_type_hints(cls, include_extras=True)
    # YAML key -> field; a field may name its key (``continue`` is a Python keyword).
    fields = {
        f.metadata.get("yaml", f.name): f
        for f in dataclasses.fields(typing.cast(Any, cls))
        if f.init and not f.metadata.get("internal")
    }
    values: dict[str, Any] = {}
    for key, key_node, value_node in mapping_items(node, path, ctx):
        field = fields.get(key)
        if field is None:
            ctx.error(key_node, join(path, key), f"unknown key (known keys: {', '.join(fields)})")
            continue
        values[field.name] = read(hints[field.name], value_node, join(path, key), ctx, key_node)
    for key, field in fields.items():
        if field.name in values:
            continue
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            ctx.error(at, join(path, key), "required key is missing")
            values[field.name] = INVALID
    if any(v is INVALID for v in values.values()):
        return typing.cast(T, INVALID)
    return cls(**values)


def compose(text: str, ctx: Context) -> Node | None:
    """Parse YAML text into a node tree, its merge keys expanded; a syntax error, a character
    YAML refuses or a tag it cannot read becomes a located problem."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        column = mark.column + 1 if mark else 1
        ctx.problems.append(Problem(ctx.filename, line, column, "", f"YAML syntax error: {exc.problem}"))
        return None
    except yaml.reader.ReaderError as exc:
        # Not a MarkedYAMLError: it has the character's index in the text, not a line.
        line, column = line_and_column(text, exc.position)
        ctx.problems.append(Problem(ctx.filename, line, column, "", _refused_character(exc.character)))
        return None
    except yaml.YAMLError as exc:
        ctx.problems.append(Problem(ctx.filename, 1, 1, "", f"YAML error: {exc}"))
        return None
    except RecursionError:
        # PyYAML composes nested nodes recursively: some hundreds of levels exhaust the stack.
        # The readers below recurse less per level, so a file composed is one they can read.
        ctx.problems.append(Problem(ctx.filename, 1, 1, "", "the file nests lists or mappings too deeply for "
                                                            "YAML to read (hundreds of levels)"))
        return None
    if root is not None:
        _MergeKeys(ctx).expand(root, "")
        _check_tags(root, "", ctx, set())
    return root


_LINE_BREAK = re.compile(r"\r\n|[\n\r\x85\u2028\u2029]")


def line_and_column(text: str, index: int) -> tuple[int, int]:
    """The 1-based line and column of ``text[index]``, lines broken as YAML breaks them."""
    line, start = 1, 0
    for match in _LINE_BREAK.finditer(text, 0, index):
        line, start = line + 1, match.end()
    return line, index - start + 1


_CHARACTER_NAMES = {0x00: "a NUL byte", 0x0C: "a form feed", 0x1B: "an escape character", 0x7F: "a DEL character"}


def _refused_character(code: int) -> str:
    name = _CHARACTER_NAMES.get(code, "a control character" if code < 0x20 or 0x7F <= code < 0xA0
                                else "a character")
    message = f"the file holds {name} (U+{code:04X}), which a YAML file cannot hold, not even in a comment"
    if code == 0:
        # What a FAT partition shows of a write cut off by a power loss.
        return message + "; NUL bytes at its end are the mark of a write cut short: check the file and remove them"
    return message + "; remove it"


_COLLECTION_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}


def _check_tags(node: Node, path: str, ctx: Context, seen: set[int]) -> None:
    """Report a tag PyYAML has no constructor for (``!foo``) or a value its explicit tag cannot
    take (``!!int abc``): the readers go by a node's text and tag, and would either miss the
    tag or fail on the value."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, ScalarNode):
        # The tag YAML would give the text on its own; another one was written in the file.
        implicit = _CONSTRUCTOR.resolve(ScalarNode, node.value, (node.style is None, node.style is not None))
        if node.tag == implicit:
            return
        if node.tag not in _CONSTRUCTOR.yaml_constructors:
            ctx.error(node, path, f'unknown YAML tag "{_short_tag(node.tag)}" (leave it out)')
        elif node.tag in _COLLECTION_TAGS or scalar_value(node) is INVALID:
            ctx.error(node, path, f'"{node.value}" is not a valid {_short_tag(node.tag)}')
        return
    if node.tag not in _COLLECTION_TAGS:
        ctx.error(node, path, f'unknown YAML tag "{_short_tag(node.tag)}" (leave it out)')
    if isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            _check_tags(item, f"{path}[{i}]", ctx, seen)
    elif isinstance(node, MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, ScalarNode) else "?"
            _check_tags(key_node, join(path, key), ctx, seen)
            _check_tags(value_node, join(path, key), ctx, seen)


def _short_tag(tag: str) -> str:
    return "!!" + tag[len("tag:yaml.org,2002:"):] if tag.startswith("tag:yaml.org,2002:") else tag


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _MergeKeys:
    """Expands YAML's merge keys (``<<: *defaults``, or ``<<: [*a, *b]``) in a node tree, in
    place, as YAML 1.1's merge key type defines them: a mapping gets the entries of the merged
    mappings that it does not set itself, and of several merged mappings the first that has a
    key gives it. (PyYAML builds Python objects from the node tree only; this file is read
    from the tree itself.) The readers then see plain mappings, and each merged entry keeps the
    line and column where it is written, for errors to point at."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.done: set[int] = set()
        self.open: set[int] = set()  # being expanded: an alias back to one of them is a loop

    def expand(self, node: Node, path: str) -> None:
        if id(node) in self.done or id(node) in self.open:
            return
        self.open.add(id(node))
        if isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                self.expand(item, f"{path}[{i}]")
        elif isinstance(node, MappingNode):
            for key_node, value_node in node.value:
                if not _is_merge(key_node):
                    self.expand(value_node, join(path, str(getattr(key_node, "value", "?"))))
            node.value = self._merged(node, path)
        self.open.discard(id(node))
        self.done.add(id(node))

    def _merged(self, node: MappingNode, path: str) -> list[tuple[Node, Node]]:
        own = [(k, v) for k, v in node.value if not _is_merge(k)]
        if len(own) == len(node.value):
            return own
        where = join(path, "<<")
        sources: list[MappingNode] = []
        for key_node, value_node in node.value:
            if not _is_merge(key_node):
                continue
            items = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
            for item in items:
                if not isinstance(item, MappingNode):
                    self.ctx.error(item, where, f"expected a mapping (or a list of mappings) to merge, "
                                                f"got {describe(item)}")
                elif id(item) in self.open:
                    self.ctx.error(key_node, where, "a mapping cannot merge itself (an alias to a mapping "
                                                    "it is part of)")
                else:
                    self.expand(item, where)
                    sources.append(item)
        taken = {k.value for k, _ in own if isinstance(k, ScalarNode)}
        merged: list[tuple[Node, Node]] = []
        for source in sources:
            for key_node, value_node in source.value:
                key = key_node.value if isinstance(key_node, ScalarNode) else None
                if key is None or key not in taken:
                    merged.append((key_node, value_node))
                    if key is not None:
                        taken.add(key)
        return merged + own


def _is_merge(key_node: Node) -> bool:
    return isinstance(key_node, ScalarNode) and key_node.tag == _MERGE_TAG
