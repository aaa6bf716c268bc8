"""Brace patterns ("{00000..00331}", "{a,b}"): parsed once, counted before expanding, checked without expanding.

A pattern is parsed into a small tree (literal text, alternatives, numeric ranges, literal groups). Its
size is computed from the tree, so a pattern naming a million locations is refused before a single
string is built, and nesting deeper than `MAX_DEPTH` is refused instead of recursing without bound.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass

from core.errors import LocationError

MAX_DEPTH = 8  # brace groups inside brace groups; real shard patterns use one or two levels
MAX_PATTERN_CHARS = 4096
DEFAULT_LIMIT = 1_000_000  # locations one pattern may name (LAION-2B has ~231k shards)
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")
MAX_TOTAL_CHARS = 128 * 1024 * 1024  # all expansions together: bounds the memory one pattern can take


@dataclass(frozen=True)
class _Lit:
    text: str


@dataclass(frozen=True)
class _Alt:
    options: tuple[tuple, ...]  # each option a sequence of nodes


@dataclass(frozen=True)
class _Range:
    lo: int
    hi: int
    step: int
    width: int  # zero padding (0: none)

    @property
    def size(self) -> int:  # not __len__: a range may be larger than an index-sized integer
        return abs(self.hi - self.lo) // self.step + 1

    def values(self) -> Iterator[str]:
        rng = range(self.lo, self.hi + 1, self.step) if self.hi >= self.lo else range(self.lo, self.hi - 1, -self.step)
        return (f"{v:0{self.width}d}" if self.width else str(v) for v in rng)


@dataclass(frozen=True)
class _Group:  # braces that are neither a list nor a range stay literal, as in bash; their inside expands
    body: tuple


def _match_brace(text: str, start: int) -> tuple[int, list[int]]:
    """Index of the brace closing text[start], and the positions of its top-level commas (-1 if unbalanced)."""
    depth, commas = 0, list[int]()
    for i in range(start, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i, commas
        elif c == "," and depth == 1:
            commas.append(i)
    return -1, []


def _parse(text: str, depth: int, param: str | None, whole: str) -> tuple:
    if depth > MAX_DEPTH:
        raise LocationError(f"the pattern {whole[:200]!r} nests braces deeper than {MAX_DEPTH} levels", param=param)
    nodes: list = []
    pos = 0
    while True:
        start = text.find("{", pos)
        if start < 0:
            break
        end, commas = _match_brace(text, start)
        if end < 0:
            break  # unbalanced: the rest is literal
        if start > pos:
            nodes.append(_Lit(text[pos:start]))
        body = text[start + 1:end]
        if commas:
            bounds = [start, *commas, end]
            nodes.append(_Alt(tuple(_parse(text[bounds[i] + 1:bounds[i + 1]], depth + 1, param, whole)
                                    for i in range(len(bounds) - 1))))
        elif m := _RANGE.match(body):
            a, b, s = m.group(1), m.group(2), m.group(3)
            step = abs(int(s)) if s else 1
            # zero padding as bash and braceexpand do: when either end is written with a leading zero
            padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (a, b))
            nodes.append(_Range(int(a), int(b), step or 1, max(len(a), len(b)) if padded else 0))
        else:
            nodes.append(_Group(_parse(body, depth + 1, param, whole)))
        pos = end + 1
    if pos < len(text):
        nodes.append(_Lit(text[pos:]))
    return tuple(nodes)


def _count(seq: tuple) -> int:
    n = 1
    for node in seq:
        if isinstance(node, _Alt):
            n *= sum(_count(o) for o in node.options)
        elif isinstance(node, _Range):
            n *= node.size
        elif isinstance(node, _Group):
            n *= _count(node.body)
    return n


def _max_len(seq: tuple) -> int:
    n = 0
    for node in seq:
        if isinstance(node, _Lit):
            n += len(node.text)
        elif isinstance(node, _Alt):
            n += max(_max_len(o) for o in node.options)
        elif isinstance(node, _Range):
            n += max(node.width, len(str(node.lo)), len(str(node.hi)))
        else:
            n += 2 + _max_len(node.body)
    return n


def _expand(seq: tuple) -> Iterator[str]:
    parts: list[list[str] | Iterator[str]] = []
    for node in seq:
        if isinstance(node, _Lit):
            parts.append([node.text])
        elif isinstance(node, _Alt):
            parts.append([x for o in node.options for x in _expand(o)])
        elif isinstance(node, _Range):
            parts.append(list(node.values()))
        else:
            parts.append(["{" + x + "}" for x in _expand(node.body)])
    return ("".join(p) for p in itertools.product(*parts))


class BracePattern:
    """A parsed pattern: `len()` without expanding; `expand()` only after the size check."""

    def __init__(self, pattern: str, *, limit: int = DEFAULT_LIMIT, param: str | None = None):
        if len(pattern) > MAX_PATTERN_CHARS:
            raise LocationError(f"a location may be at most {MAX_PATTERN_CHARS} characters", param=param)
        self.pattern, self.param, self.limit = pattern, param, limit
        self._seq = _parse(pattern, 0, param, pattern)
        self.count = _count(self._seq)
        if self.count > limit:
            raise LocationError(f"the pattern {pattern[:200]!r} expands to more than {limit} locations",
                                param=param)
        longest = _max_len(self._seq)
        if longest > MAX_PATTERN_CHARS or self.count * longest > MAX_TOTAL_CHARS:
            raise LocationError(f"the pattern {pattern[:200]!r} expands to locations that are too long", param=param)

    def __len__(self) -> int:
        return self.count

    @property
    def is_literal(self) -> bool:
        """True when the pattern names exactly itself (no list or range in it)."""
        return all(isinstance(n, _Lit) for n in self._seq)

    def expand(self) -> list[str]:
        return list(_expand(self._seq))

    def first(self) -> str:
        return next(_expand(self._seq))

    def split_dir(self) -> tuple[BracePattern, BracePattern] | None:
        """(directory part, last component) split at the last '/' outside every brace group, or None when a
        brace group holds a '/' (then the directories cannot be told apart without expanding)."""
        cut = None
        for i, node in enumerate(self._seq):
            if isinstance(node, _Lit) and "/" in node.text:
                cut = (i, node.text.rfind("/"))
            elif not isinstance(node, _Lit) and _has_slash(node):
                return None
        if cut is None:
            head, tail = (), self._seq
        else:
            i, j = cut
            lit = self._seq[i].text
            head = (*self._seq[:i], _Lit(lit[:j + 1]))
            tail = (*((_Lit(lit[j + 1:]),) if lit[j + 1:] else ()), *self._seq[i + 1:])
        return self._from_seq(head), self._from_seq(tail)

    def _from_seq(self, seq: tuple) -> BracePattern:
        out = object.__new__(BracePattern)
        out.pattern, out.param, out.limit, out._seq, out.count = self.pattern, self.param, self.limit, seq, _count(seq)
        return out

    def can_be_dot_name(self) -> bool:
        """Whether some expansion is exactly '.' or '..' (a last component that would climb directories)."""
        return bool(_dot_outputs(self._seq) & {".", ".."})


def _has_slash(node) -> bool:  # noqa: ANN001 - a tree node
    if isinstance(node, _Lit):
        return "/" in node.text
    if isinstance(node, _Alt):
        return any(_has_slash(n) for o in node.options for n in o)
    if isinstance(node, _Group):
        return any(_has_slash(n) for n in node.body)
    return False  # ranges produce digits and '-'


def _dot_outputs(seq: tuple) -> set[str]:
    """The outputs of `seq` that are '', '.' or '..' (every other output is dropped as it cannot become one)."""
    keep = {"", ".", ".."}
    acc = {""}
    for node in seq:
        if isinstance(node, _Lit):
            opts = {node.text} & keep
        elif isinstance(node, _Alt):
            opts = set().union(*(_dot_outputs(o) for o in node.options))
        else:  # a range yields digits, a literal group yields braces: never dots only
            opts = set()
        acc = {a + b for a in acc for b in opts} & keep
        if not acc:
            return set()
    return acc


def expand_braces(pattern: str, *, limit: int = DEFAULT_LIMIT, param: str | None = None) -> list[str]:
    """Expand "{00000..00331}" (zero padding kept), "{a,b}", "{0..10..2}" and several (nested) groups, in order.

    A group that is neither a list nor a numeric range stays literal, as in bash. More than `limit`
    results raise LocationError before anything is materialised.
    """
    return BracePattern(pattern, limit=limit, param=param).expand()
