"""Inventory filters: which devices a rollout targets, which rows the fleet table shows.

A filter is a small boolean language over what the controller stores about each device
(its status, and the probe, profile, labels and selection in its retained meta). It is parsed
once into a tree of frozen terms (``parse_filter``), bounded in length, terms and nesting,
and then evaluated per device without parsing again. Pure: no I/O, no registry, no clock.

Grammar (keywords ``and``, ``or``, ``not`` are case-insensitive; ``not`` binds tightest,
then ``and``, then ``or``; parentheses group)::

    filter     := or_expr
    or_expr    := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | "(" or_expr ")" | term
    term       := "label:" KEY ["=" | "!=" VALUE]    a label is set / has (or not) this value
                | "flag:" NAME                          the CPU has this ISA flag
                | NUMBER_FIELD OP NUMBER                OP: = != < <= > >=
                | TEXT_FIELD ("=" | "!=") VALUE

    NUMBER_FIELD  ram_gib   RAM this agent may use, GiB: the cgroup limit when it has one,
                            else the total (the probe's, not what is free right now)
                  vram_gib  dedicated VRAM over every GPU, GiB (0 for a device without one)
    TEXT_FIELD    id        device id
                  state     starting ready busy degraded draining stopped lost
                  board     the probe's board or model string (matched case-insensitively)
                  arch      x86_64, aarch64, ...
                  profile   the matched device profile's name
                  pool      the pool the device joined
                  quant     the variant it runs now (e.g. Q4_K_M)
                  version   the agent version it reports

A VALUE is a bare word (letters, digits and ``_ . - / + : * ? [ ] @``) or a double-quoted
string without a double quote in it (``board="Raspberry Pi 5*"``). Text values and label values
are shell-style globs (``*``, ``?``, ``[...]``) matched against the whole value. Flags are the
probe's normalised names (avx2, avx512f, amx_int8, neon, dotprod, i8mm, sve ...).

A term about a fact the device has not reported (no meta yet, no probe, no such label) is
false, whichever operator it uses, so ``arch!=x86_64`` does not pick a device of unknown
arch; ``not arch=x86_64`` does.

Example: ``ram_gib>=4 and flag:dotprod and label:site=store-12``,
``(label:role=kiosk or label:role=till) and not state=lost``, ``id=store-12-*``.

Python API::

    flt = parse_filter(text)         # InventoryFilter, or FilterError (code ``bad_filter``)
    flt.matches(facts_of(record))    # record: anything with .id, .state, .meta (DeviceRecord)

``facts_of`` reads a validated meta (agent.fleet.schemas): ``probe.cpu.arch``,
``probe.cpu.flags``, ``probe.memory.total_bytes`` / ``cgroup_limit_bytes``,
``probe.gpus[].vram_total_bytes``, ``probe.board``, ``labels``, ``profile.name`` (else
``selection.profile``), ``selection.quant``, ``pool`` and ``version``; the record's own
``state`` and ``agent_version``. Callers that evaluate many filters over one fleet may keep the
facts per record version: they are immutable.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from agent.config import LABEL_WORD
from agent.errors import FilterError, shown

MAX_FILTER_CHARS = 1024
MAX_TERMS = 64
MAX_DEPTH = 16  # parentheses and ``not`` nested inside one another
GIB = float(1 << 30)

NUMBER_FIELDS = ("ram_gib", "vram_gib")
TEXT_FIELDS = ("id", "state", "board", "arch", "profile", "pool", "quant", "version")
Operator = Literal["=", "!=", "<", "<=", ">", ">="]
_COMPARE = {
    "=": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<paren>[()])
      | (?P<op>!=|<=|>=|=|<|>)
      | "(?P<quoted>[^"]*)"
      | (?P<word>[A-Za-z0-9_./+:*?\[\]@-]+)
    )""",
    re.VERBOSE,
)
_TRAILING_SPACE = re.compile(r"\s*\Z")
_KEYWORDS = ("and", "or", "not")
_WORD = re.compile(LABEL_WORD)  # a label key or a flag name


# --- the facts a filter reads --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What a filter can ask about one device; None where the device has not said."""

    id: str
    state: str | None = None
    board: str | None = None
    arch: str | None = None
    profile: str | None = None
    pool: str | None = None
    quant: str | None = None
    version: str | None = None
    flags: frozenset[str] = frozenset()
    labels: Mapping[str, str] | None = None
    ram_gib: float | None = None
    vram_gib: float | None = None


class _Record(Protocol):
    id: str
    state: str | None
    meta: dict[str, Any]


def facts_of(record: _Record) -> DeviceFacts:
    """The facts of a registry record (agent.fleet.registry.DeviceRecord) whose meta passed
    agent.fleet.schemas, so every key read here has its type or is absent."""
    meta = record.meta or {}
    probe = meta.get("probe") or meta.get("device") or {}
    cpu = probe.get("cpu") or {}
    memory = probe.get("memory") or {}
    selection = meta.get("selection") or {}
    profile = (meta.get("profile") or {}).get("name") or selection.get("profile")
    ram = memory.get("total_bytes")
    limit = memory.get("cgroup_limit_bytes")
    if limit is not None and (ram is None or limit < ram):
        ram = limit
    gpus = probe.get("gpus") or []
    vram = sum(gpu.get("vram_total_bytes") or 0 for gpu in gpus) if probe else None
    return DeviceFacts(
        id=record.id,
        state=record.state,
        board=probe.get("board"),
        arch=cpu.get("arch"),
        profile=profile,
        pool=meta.get("pool"),
        quant=selection.get("quant"),
        version=getattr(record, "agent_version", None) or meta.get("version"),
        flags=frozenset(cpu.get("flags") or ()),
        labels=meta.get("labels"),
        ram_gib=ram / GIB if ram else None,
        vram_gib=vram / GIB if vram is not None else None,
    )


# --- the parsed filter ----------------------------------------------------------------------


def _glob(pattern: str, *, fold_case: bool = False) -> re.Pattern[str]:
    # fnmatch.translate keeps a run of stars from backtracking (it uses atomic groups).
    return re.compile(fnmatch.translate(pattern), re.IGNORECASE if fold_case else 0)


@dataclass(frozen=True, slots=True)
class LabelTerm:
    key: str
    pattern: re.Pattern[str] | None  # None: the label is set, whatever its value
    negate: bool = False

    def matches(self, facts: DeviceFacts) -> bool:
        value = facts.labels.get(self.key) if facts.labels else None
        if value is None:
            return False
        if self.pattern is None:
            return True
        return (self.pattern.fullmatch(value) is not None) != self.negate


@dataclass(frozen=True, slots=True)
class FlagTerm:
    flag: str

    def matches(self, facts: DeviceFacts) -> bool:
        return self.flag in facts.flags


@dataclass(frozen=True, slots=True)
class NumberTerm:
    field: str
    op: Operator
    value: float

    def matches(self, facts: DeviceFacts) -> bool:
        have = getattr(facts, self.field)
        return have is not None and _COMPARE[self.op](have, self.value)


@dataclass(frozen=True, slots=True)
class TextTerm:
    field: str
    pattern: re.Pattern[str]
    negate: bool = False

    def matches(self, facts: DeviceFacts) -> bool:
        have = getattr(facts, self.field)
        return have is not None and (self.pattern.fullmatch(have) is not None) != self.negate


@dataclass(frozen=True, slots=True)
class AllOf:
    terms: tuple[Node, ...]

    def matches(self, facts: DeviceFacts) -> bool:
        return all(term.matches(facts) for term in self.terms)


@dataclass(frozen=True, slots=True)
class AnyOf:
    terms: tuple[Node, ...]

    def matches(self, facts: DeviceFacts) -> bool:
        return any(term.matches(facts) for term in self.terms)


@dataclass(frozen=True, slots=True)
class NoneOf:
    term: Node

    def matches(self, facts: DeviceFacts) -> bool:
        return not self.term.matches(facts)


Node = LabelTerm | FlagTerm | NumberTerm | TextTerm | AllOf | AnyOf | NoneOf


@dataclass(frozen=True, slots=True)
class InventoryFilter:
    """A parsed filter: ``text`` as given, ``root`` the tree ``matches`` walks."""

    text: str
    root: Node

    def matches(self, facts: DeviceFacts) -> bool:
        return self.root.matches(facts)


# --- parsing ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    kind: Literal["paren", "op", "quoted", "word"]
    text: str
    at: int  # character offset, for the error message


def _tokens(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while _TRAILING_SPACE.match(text, position) is None:
        found = _TOKEN.match(text, position)
        if found is None:
            at = len(text) - len(text[position:].lstrip())
            raise FilterError(f"filter: unexpected {shown(text[at:at + 10])} at {at}", at=at)
        kind = found.lastgroup
        tokens.append(_Token(kind, found.group(kind), found.start(kind)))
        position = found.end()
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.index = 0
        self.terms = 0
        self.end = len(text)

    def _peek(self) -> _Token | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def _next(self, wanted: str) -> _Token:
        token = self._peek()
        if token is None:
            raise FilterError(f"filter: expected {wanted} at the end", at=self.end)
        self.index += 1
        return token

    def _keyword(self, word: str) -> bool:
        token = self._peek()
        if token is not None and token.kind == "word" and token.text.lower() == word:
            self.index += 1
            return True
        return False

    def parse(self) -> Node:
        if not self.tokens:
            raise FilterError("filter: empty (give a term such as label:site=store-12)", at=0)
        node = self._or(0)
        token = self._peek()
        if token is not None:
            raise FilterError(
                f"filter: unexpected {shown(token.text)} at {token.at} (join terms with and/or)",
                at=token.at)
        return node

    def _or(self, depth: int) -> Node:
        terms = [self._and(depth)]
        while self._keyword("or"):
            terms.append(self._and(depth))
        return terms[0] if len(terms) == 1 else AnyOf(tuple(terms))

    def _and(self, depth: int) -> Node:
        terms = [self._not(depth)]
        while self._keyword("and"):
            terms.append(self._not(depth))
        return terms[0] if len(terms) == 1 else AllOf(tuple(terms))

    def _not(self, depth: int) -> Node:
        token = self._peek()
        opens = token is not None and token.kind == "paren" and token.text == "("
        if token is not None and (opens or self._keyword("not")):
            if depth >= MAX_DEPTH:
                raise FilterError(f"filter: nested deeper than {MAX_DEPTH} at {token.at}",
                                  at=token.at)
            if token.kind == "word":
                return NoneOf(self._not(depth + 1))
            self.index += 1
            node = self._or(depth + 1)
            closing = self._next("')'")
            if closing.text != ")":
                raise FilterError(f"filter: expected ')' at {closing.at}", at=closing.at)
            return node
        return self._term()

    def _term(self) -> Node:
        token = self._next("a term")
        if token.kind != "word" or token.text.lower() in _KEYWORDS:
            raise FilterError(f"filter: expected a term at {token.at}, found {shown(token.text)}",
                              at=token.at)
        self.terms += 1
        if self.terms > MAX_TERMS:
            raise FilterError(f"filter: more than {MAX_TERMS} terms", at=token.at)
        key = token.text
        if key.startswith("flag:"):
            flag = key.removeprefix("flag:")
            if not _WORD.fullmatch(flag):
                raise FilterError(f"filter: {shown(key)} at {token.at}: a flag is one word "
                                  "(flag:avx2, flag:dotprod)", at=token.at)
            return FlagTerm(flag.lower())
        if key.startswith("label:"):
            label = key.removeprefix("label:")
            if not _WORD.fullmatch(label):
                raise FilterError(f"filter: {shown(key)} at {token.at}: a label key is one word",
                                  at=token.at)
            op = self._peek()
            if op is None or op.kind != "op":
                return LabelTerm(label, None)
            operator, value = self._comparison(key, ("=", "!="))
            return LabelTerm(label, _glob(value), negate=operator == "!=")
        if key in NUMBER_FIELDS:
            operator, value = self._comparison(key, tuple(_COMPARE))
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if not math.isfinite(number) or abs(number) > 1e9:
                raise FilterError(f"filter: {key} takes a number, not {shown(value)}", at=token.at)
            return NumberTerm(key, operator, number)
        if key in TEXT_FIELDS:
            operator, value = self._comparison(key, ("=", "!="))
            return TextTerm(key, _glob(value, fold_case=key == "board"), negate=operator == "!=")
        raise FilterError(
            f"filter: unknown key {shown(key)} at {token.at} (known: label:KEY, flag:NAME, "
            f"{', '.join(NUMBER_FIELDS + TEXT_FIELDS)})", at=token.at)

    def _comparison(self, key: str, allowed: tuple[str, ...]) -> tuple[Operator, str]:
        op = self._next(f"an operator after {key}")
        if op.kind != "op" or op.text not in allowed:
            raise FilterError(f"filter: {key} takes {' '.join(allowed)} at {op.at}, "
                              f"found {shown(op.text)}", at=op.at)
        value = self._next(f"a value after {key}{op.text}")
        if value.kind not in ("word", "quoted"):
            raise FilterError(f"filter: expected a value at {value.at}, found {shown(value.text)}",
                              at=value.at)
        return op.text, value.text  # type: ignore[return-value]


def parse_filter(text: str) -> InventoryFilter:
    """``text`` parsed (see the module docstring), or FilterError naming where it went wrong."""
    if not isinstance(text, str):
        raise FilterError("filter: must be a string", at=0)
    if len(text) > MAX_FILTER_CHARS:
        raise FilterError(f"filter: longer than {MAX_FILTER_CHARS} characters", at=MAX_FILTER_CHARS)
    return InventoryFilter(text, _Parser(text).parse())
