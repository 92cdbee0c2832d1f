"""Reading YAML and JSON documents from files the daemon and its tools are given, bounded in nesting depth.

PyYAML composes nodes recursively and ``json.loads`` decodes recursively, so a config whose ``policy:`` nests
5,000 levels deep (or a JSON file of 100,000 ``[``) ended ``lmgrd --check`` in a ``RecursionError`` traceback.
Here nesting past :data:`protocol.validation.MAX_NESTING_DEPTH` is refused while the document is read, as a
``yaml.YAMLError`` with the line and column where the limit was passed (so every caller's existing "not valid
YAML" message names the file and place), or as :class:`JSONTooDeep` (a ``ValueError``, what ``json.loads``
raises for bad JSON). No later step (a validator, an error message's ``repr``) then ever sees a deep value.

Pure: no file access (callers read the bytes and name the file). Must not import ``client_stub``.
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from yaml.events import MappingStartEvent, SequenceStartEvent
from yaml.nodes import Node

from protocol.validation import MAX_NESTING_DEPTH, nesting_depth_exceeds

__all__ = ["JSONTooDeep", "YAMLTooDeep", "YAMLValueInvalid", "load_json", "load_yaml"]


class YAMLTooDeep(yaml.MarkedYAMLError):
    """A YAML document nests sequences and mappings more than ``MAX_NESTING_DEPTH`` levels deep."""


class YAMLValueInvalid(yaml.MarkedYAMLError):
    """A YAML scalar that its type cannot hold: a timestamp like 2099-12-62, an integer of 5,000 digits."""


class JSONTooDeep(ValueError):
    """A JSON document nests arrays and objects more than ``MAX_NESTING_DEPTH`` levels deep."""


class _BoundedSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that counts collection nesting while composing and stops past the limit."""

    def __init__(self, stream: str | bytes) -> None:
        super().__init__(stream)
        self._collections = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        collection = self.check_event(SequenceStartEvent, MappingStartEvent)
        if collection:
            self._collections += 1
            if self._collections > MAX_NESTING_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise YAMLTooDeep(None, None, f"sequences and mappings nest more than {MAX_NESTING_DEPTH} levels "
                                  "deep here; no setting needs that many", mark)
        try:
            return super().compose_node(parent, index)
        finally:
            if collection:
                self._collections -= 1

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        # PyYAML's constructors raise plain ValueError for a value that looks like a date but is none
        # (2099-12-62) or an integer past Python's 4,300-digit limit: a YAMLError with the place instead.
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:
            raise YAMLValueInvalid(None, None, f"cannot read this value: {exc}", node.start_mark) from None


def load_yaml(text: str | bytes, name: str | None = None) -> Any:
    """``yaml.safe_load`` with nesting bounded to ``MAX_NESTING_DEPTH`` levels.

    Args:
        text: the document.
        name: the file it came from, named in the error's position (``in "NAME", line 3, column 5``).

    Raises:
        yaml.YAMLError: not valid YAML, nested too deep (:class:`YAMLTooDeep`), or a value its type cannot hold
            (:class:`YAMLValueInvalid`), each with the line.
    """
    loader = _BoundedSafeLoader(text)
    if name is not None:
        loader.name = name  # every mark is made from it, from the first token on
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_json(text: str | bytes) -> Any:
    """``json.loads`` with nesting bounded to ``MAX_NESTING_DEPTH`` levels.

    Raises:
        ValueError: not valid JSON (``json.JSONDecodeError``) or nested too deep (:class:`JSONTooDeep`).
    """
    try:
        doc = json.loads(text)
    except RecursionError:  # the C decoder gives up at the interpreter's limit, long before the stack does
        raise JSONTooDeep(f"arrays and objects nest more than {MAX_NESTING_DEPTH} levels deep") from None
    if nesting_depth_exceeds(doc):
        raise JSONTooDeep(f"arrays and objects nest more than {MAX_NESTING_DEPTH} levels deep")
    return doc
