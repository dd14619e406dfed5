"""``--where`` filters: a small grammar, parsed into a public AST, compiled to parameterised SQL.

Grammar (keywords case-insensitive; column names as in the store, or "double quoted" when they hold spaces)::

    expr       := or_expr
    or_expr    := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | primary
    primary    := "(" expr ")" | predicate
    predicate  := column op literal                          op: = != <> < <= > >=
                | column ["not"] "between" literal "and" literal
                | column ["not"] "in" "(" literal ("," literal)* ")"
                | column "is" ["not"] "null"
    literal    := 'single quoted text' ('' for a quote) | number (-12, 3.5, 1e3)

The AST is a handful of frozen dataclasses (``Compare``, ``Between``, ``In``, ``IsNull``, ``And``, ``Or``,
``Not``): the FAISS store compiles it to SQL here (``to_sql``), the Milvus store (search/milvus_store.py) to
Milvus expressions, and tests evaluate it in Python (``evaluate``). Values are always bound as parameters, never
pasted into SQL text; column names are checked against the store's known columns while parsing, so a compiled
filter only ever names real columns.

Comparisons follow SQL's three-valued logic: a row whose column is null matches neither ``age > 30`` nor
``not (age > 30)``; only ``age is null`` finds it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError

Value = str | int | float
COMPARE_OPS = ("=", "!=", "<", "<=", ">", ">=")
# column kinds a store declares for its filterable columns
TEXT, INTEGER, REAL = "text", "integer", "real"
KINDS = (TEXT, INTEGER, REAL)


@dataclass(frozen=True)
class Compare:
    """``column op value``; ``op`` is one of ``COMPARE_OPS`` (``<>`` is parsed as ``!=``)."""

    column: str
    op: str
    value: Value


@dataclass(frozen=True)
class Between:
    """``column between low and high`` (both ends included, as in SQL)."""

    column: str
    low: Value
    high: Value


@dataclass(frozen=True)
class In:
    """``column in (v1, v2, ...)``; ``values`` is never empty."""

    column: str
    values: tuple[Value, ...]


@dataclass(frozen=True)
class IsNull:
    """``column is null`` (``negated``: ``column is not null``)."""

    column: str
    negated: bool = False


@dataclass(frozen=True)
class And:
    items: tuple[Filter, ...]  # two or more


@dataclass(frozen=True)
class Or:
    items: tuple[Filter, ...]  # two or more


@dataclass(frozen=True)
class Not:
    item: Filter


Filter = Compare | Between | In | IsNull | And | Or | Not


class FilterError(UsageError):
    """A ``--where`` text that does not parse, names an unknown column or compares a column with the wrong kind of
    value. ``position`` is the 0-based character offset of the problem."""

    def __init__(self, message: str, text: str, position: int, columns: Mapping[str, str] | None) -> None:
        pointer = f"\n  {text}\n  {' ' * position}^"
        known = f"\n  known columns: {', '.join(_describe(columns))}" if columns else ""
        super().__init__(f"--where: {message} at position {position + 1}{pointer}{known}")
        self.position = position
        self.text = text


def _describe(columns: Mapping[str, str]) -> list[str]:
    return [f"{name} ({kind})" for name, kind in columns.items()]


# ---------------------------------------------------------------------------------------------------- the lexer

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<number>-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)
  | (?P<string>'(?:[^']|'')*')
  | (?P<quoted>"(?:[^"]|"")+")
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><=|>=|!=|<>|==|=|<|>)
  | (?P<punct>[(),])
    """,
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "not", "between", "in", "is", "null"}


@dataclass(frozen=True)
class _Token:
    kind: str  # number string column keyword op punct end
    text: str
    value: Any
    pos: int


def _tokens(text: str, columns: Mapping[str, str] | None) -> list[_Token]:
    out: list[_Token] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            bad = text[pos]
            hint = " (an unclosed quote?)" if bad in "'\"" else ""
            raise FilterError(f"unexpected character {bad!r}{hint}", text, pos, columns)
        kind, raw = m.lastgroup or "", m.group()
        if kind == "number":
            value: Any = float(raw) if any(c in raw for c in ".eE") else int(raw)
            out.append(_Token("number", raw, value, pos))
        elif kind == "string":
            out.append(_Token("string", raw, raw[1:-1].replace("''", "'"), pos))
        elif kind == "quoted":
            out.append(_Token("column", raw, raw[1:-1].replace('""', '"'), pos))
        elif kind == "word":
            low = raw.lower()
            out.append(_Token("keyword", raw, low, pos) if low in _KEYWORDS else _Token("column", raw, raw, pos))
        elif kind == "op":
            op = {"<>": "!=", "==": "="}.get(raw, raw)
            out.append(_Token("op", raw, op, pos))
        elif kind == "punct":
            out.append(_Token("punct", raw, raw, pos))
        pos = m.end()
    out.append(_Token("end", "", None, len(text)))
    return out


# ---------------------------------------------------------------------------------------------------- the parser


class _Parser:
    def __init__(self, text: str, columns: Mapping[str, str] | None) -> None:
        self.text = text
        self.columns = dict(columns) if columns is not None else None
        self._lower = {c.lower(): c for c in self.columns} if self.columns is not None else {}
        self.toks = _tokens(text, columns)
        self.i = 0

    def error(self, message: str, tok: _Token | None = None) -> FilterError:
        tok = tok or self.peek()
        return FilterError(message, self.text, tok.pos, self.columns)

    def peek(self) -> _Token:
        return self.toks[self.i]

    def take(self) -> _Token:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def at_keyword(self, *words: str) -> bool:
        tok = self.peek()
        return tok.kind == "keyword" and tok.value in words

    def expect_keyword(self, word: str, after: str) -> None:
        if not self.at_keyword(word):
            raise self.error(f"expected '{word}' after {after}, found {self._found()}")
        self.take()

    def _found(self) -> str:
        tok = self.peek()
        return "the end of the filter" if tok.kind == "end" else repr(tok.text)

    def parse(self) -> Filter:
        if self.peek().kind == "end":
            raise self.error("the filter is empty")
        expr = self.or_expr()
        if self.peek().kind != "end":
            raise self.error(f"expected 'and', 'or' or the end of the filter, found {self._found()}")
        return expr

    def or_expr(self) -> Filter:
        items = [self.and_expr()]
        while self.at_keyword("or"):
            self.take()
            items.append(self.and_expr())
        return items[0] if len(items) == 1 else Or(tuple(items))

    def and_expr(self) -> Filter:
        items = [self.not_expr()]
        while self.at_keyword("and"):
            self.take()
            items.append(self.not_expr())
        return items[0] if len(items) == 1 else And(tuple(items))

    def not_expr(self) -> Filter:
        if self.at_keyword("not"):
            self.take()
            return Not(self.not_expr())
        return self.primary()

    def primary(self) -> Filter:
        tok = self.peek()
        if tok.kind == "punct" and tok.value == "(":
            self.take()
            expr = self.or_expr()
            if not (self.peek().kind == "punct" and self.peek().value == ")"):
                raise self.error(f"expected ')' to close the '(' at position {tok.pos + 1}, found {self._found()}")
            self.take()
            return expr
        return self.predicate()

    def column(self) -> tuple[str, str | None, _Token]:
        tok = self.peek()
        if tok.kind != "column":
            what = "a column name" if tok.kind != "end" else "a condition"
            raise self.error(f"expected {what} (like city = 'Paris'), found {self._found()}")
        self.take()
        if self.columns is None:
            return tok.value, None, tok
        name = self._lower.get(tok.value.lower())
        if name is None:
            raise self.error(f"unknown column {tok.value!r}", tok)
        return name, self.columns[name], tok

    def literal(self, column: str, kind: str | None) -> Value:
        tok = self.peek()
        if tok.kind == "keyword" and tok.value == "null":
            raise self.error(f"compare with null using '{column} is null' or '{column} is not null'")
        if tok.kind not in ("number", "string"):
            hint = " (text values go in single quotes: 'Paris')" if tok.kind == "column" else ""
            raise self.error(f"expected a value for {column}, found {self._found()}{hint}")
        self.take()
        if kind == TEXT and tok.kind == "number":
            raise self.error(f"column {column} holds text: quote the value ('{tok.text}')", tok)
        if kind in (INTEGER, REAL) and tok.kind == "string":
            raise self.error(f"column {column} holds numbers: {tok.text} is text", tok)
        return tok.value

    def predicate(self) -> Filter:
        column, kind, col_tok = self.column()
        tok = self.peek()
        if tok.kind == "op":
            self.take()
            return Compare(column, tok.value, self.literal(column, kind))
        negated = False
        if self.at_keyword("not"):
            self.take()
            negated = True
            if not self.at_keyword("between", "in"):
                raise self.error(f"expected 'between' or 'in' after '{column} not', found {self._found()}")
        if self.at_keyword("between"):
            self.take()
            low = self.literal(column, kind)
            self.expect_keyword("and", f"'{column} between {low!r}'")
            high = self.literal(column, kind)
            node: Filter = Between(column, low, high)
            return Not(node) if negated else node
        if self.at_keyword("in"):
            self.take()
            if not (self.peek().kind == "punct" and self.peek().value == "("):
                raise self.error(f"expected '(' after '{column} in', found {self._found()}")
            self.take()
            values = [self.literal(column, kind)]
            while self.peek().kind == "punct" and self.peek().value == ",":
                self.take()
                values.append(self.literal(column, kind))
            if not (self.peek().kind == "punct" and self.peek().value == ")"):
                raise self.error(f"expected ',' or ')' in the list after '{column} in', found {self._found()}")
            self.take()
            node = In(column, tuple(values))
            return Not(node) if negated else node
        if self.at_keyword("is"):
            self.take()
            is_not = False
            if self.at_keyword("not"):
                self.take()
                is_not = True
            self.expect_keyword("null", f"'{column} is{' not' if is_not else ''}'")
            return IsNull(column, is_not)
        raise self.error(
            f"expected an operator after {col_tok.text} (= != < <= > >= between in is), found {self._found()}"
        )


def parse(text: str, columns: Mapping[str, str] | None = None) -> Filter:
    """Parse a ``--where`` text. With ``columns`` (name -> ``text``/``integer``/``real``), column names are
    checked (case-insensitively, returned as the store spells them) and each value's kind against its column.
    Raises ``FilterError`` (a ``UsageError``) naming the position, what was expected and the known columns."""
    return _Parser(text, columns).parse()


def columns_of(expr: Filter) -> set[str]:
    """The columns a filter names."""
    if isinstance(expr, (And, Or)):
        return set().union(*(columns_of(e) for e in expr.items))
    if isinstance(expr, Not):
        return columns_of(expr.item)
    return {expr.column}


# ------------------------------------------------------------------------------------------------ SQL and Python


def quote_identifier(name: str) -> str:
    """A column name as an SQL identifier (only names checked against the store's columns reach here)."""
    return '"' + name.replace('"', '""') + '"'


def to_sql(expr: Filter) -> tuple[str, list[Value]]:
    """``(sql, params)``: a WHERE clause body with ``?`` placeholders; values go only into ``params``."""
    params: list[Value] = []
    return _sql(expr, params), params


def _sql(expr: Filter, params: list[Value]) -> str:
    if isinstance(expr, Compare):
        params.append(expr.value)
        return f"{quote_identifier(expr.column)} {expr.op} ?"
    if isinstance(expr, Between):
        params += [expr.low, expr.high]
        return f"{quote_identifier(expr.column)} BETWEEN ? AND ?"
    if isinstance(expr, In):
        params += list(expr.values)
        return f"{quote_identifier(expr.column)} IN ({', '.join('?' * len(expr.values))})"
    if isinstance(expr, IsNull):
        return f"{quote_identifier(expr.column)} IS {'NOT ' if expr.negated else ''}NULL"
    if isinstance(expr, And):
        return "(" + " AND ".join(_sql(e, params) for e in expr.items) + ")"
    if isinstance(expr, Or):
        return "(" + " OR ".join(_sql(e, params) for e in expr.items) + ")"
    if isinstance(expr, Not):
        return f"(NOT {_sql(expr.item, params)})"
    raise TypeError(f"not a filter node: {expr!r}")


def evaluate(expr: Filter, row: Mapping[str, Any]) -> bool | None:
    """The filter on one row (column -> value, None for null) with SQL's three-valued logic: None = unknown.
    A row matches when this returns True. Used by tests as the brute-force reference."""
    if isinstance(expr, Compare):
        v = row.get(expr.column)
        if v is None:
            return None
        w = expr.value
        return {
            "=": v == w,
            "!=": v != w,
            "<": v < w,
            "<=": v <= w,
            ">": v > w,
            ">=": v >= w,
        }[expr.op]
    if isinstance(expr, Between):
        v = row.get(expr.column)
        return None if v is None else bool(expr.low <= v <= expr.high)
    if isinstance(expr, In):
        v = row.get(expr.column)
        return None if v is None else v in expr.values
    if isinstance(expr, IsNull):
        return (row.get(expr.column) is None) != expr.negated
    if isinstance(expr, Not):
        inner = evaluate(expr.item, row)
        return None if inner is None else not inner
    if isinstance(expr, And):
        results = [evaluate(e, row) for e in expr.items]
        return False if False in results else (None if None in results else True)
    if isinstance(expr, Or):
        results = [evaluate(e, row) for e in expr.items]
        return True if True in results else (None if None in results else False)
    raise TypeError(f"not a filter node: {expr!r}")
