"""--where filters: the parser's AST, its errors (position, known columns), and the compiled SQL run by real SQLite
against the Python evaluator as brute force, including hostile values that must stay values."""

from __future__ import annotations

import random
import sqlite3

import pytest

from finderpartner.errors import UsageError
from finderpartner.search.filters import (
    And,
    Between,
    Compare,
    FilterError,
    In,
    IsNull,
    Not,
    Or,
    columns_of,
    evaluate,
    parse,
    to_sql,
)

COLUMNS = {"id": "integer", "path": "text", "city": "text", "age": "integer", "height": "real", "hair color": "text"}


def test_the_issue_example_parses_into_the_documented_tree() -> None:
    expr = parse("city = 'Paris' and age between 25 and 35", COLUMNS)
    assert expr == And((Compare("city", "=", "Paris"), Between("age", 25, 35)))


def test_precedence_parentheses_not_in_is_null_and_case() -> None:
    expr = parse("NOT City <> 'Lyon' or (Age in (1, 2.5, -3) AND height is not null)", COLUMNS)
    assert expr == Or(
        (
            Not(Compare("city", "!=", "Lyon")),
            And((In("age", (1, 2.5, -3)), IsNull("height", negated=True))),
        )
    )
    assert parse("age not between 1 and 2", COLUMNS) == Not(Between("age", 1, 2))
    assert parse("city not in ('a')", COLUMNS) == Not(In("city", ("a",)))
    assert parse("\"hair color\" = 'its red'", COLUMNS) == Compare("hair color", "=", "its red")
    assert parse("city = 'it''s'", COLUMNS) == Compare("city", "=", "it's")
    assert parse("a = 1e3 or b = .5", None) == Or((Compare("a", "=", 1000.0), Compare("b", "=", 0.5)))
    assert columns_of(parse("city = 'x' and (age > 1 or not height < 2)", COLUMNS)) == {"city", "age", "height"}


@pytest.mark.parametrize(
    ("text", "position", "words"),
    [
        ("", 1, "empty"),
        ("city = ", 8, "expected a value for city"),
        ("city = Paris", 8, "single quotes"),
        ("town = 'Paris'", 1, "unknown column 'town'"),
        ("age > '30'", 7, "holds numbers"),
        ("city = 3", 8, "holds text"),
        ("age between 1 or 2", 15, "expected 'and'"),
        ("(age > 1", 9, "expected ')'"),
        ("age > 1 city = 'x'", 9, "expected 'and', 'or'"),
        ("city = 'Paris", 8, "unclosed quote"),
        ("age = null", 7, "age is null"),
        ("age in (1, 2", 13, "expected ',' or ')'"),
        ("age is 3", 8, "expected 'null'"),
        ("age ~ 3", 5, "unexpected character"),
        ("city", 5, "expected an operator"),
        ("city = 'Paris'; DROP TABLE photos", 15, "unexpected character ';'"),
    ],
)
def test_a_malformed_filter_names_the_position_and_the_known_columns(text: str, position: int, words: str) -> None:
    with pytest.raises(FilterError) as caught:
        parse(text, COLUMNS)
    message = str(caught.value)
    assert isinstance(caught.value, UsageError)  # exit code 2 through the CLI
    assert words in message, message
    assert f"at position {position}" in message, message
    assert "known columns: id (integer), path (text), city (text), age (integer)" in message
    assert caught.value.position == position - 1


def _table(rows: list[dict]) -> sqlite3.Connection:
    db = sqlite3.connect(":memory:")
    db.execute(
        'CREATE TABLE photos (id INTEGER PRIMARY KEY, path TEXT, city TEXT, age INTEGER, height REAL, "hair color" TEXT)'
    )
    db.executemany(
        "INSERT INTO photos VALUES (:id, :path, :city, :age, :height, :hair)",
        [{**r, "hair": r["hair color"]} for r in rows],
    )
    return db


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    cities = ["Paris", "Lyon", "O'Brien's town", "Nice", None]
    return [
        {
            "id": i,
            "path": f"p/{i}.jpg",
            "city": rng.choice(cities),
            "age": rng.choice([None, *range(18, 70)]),
            "height": rng.choice([None, 1.5, 1.62, 1.7, 1.85]),
            "hair color": rng.choice(["red", "black", None]),
        }
        for i in range(n)
    ]


FILTERS = [
    "city = 'Paris' and age between 25 and 35",
    "city != 'Paris'",
    "not city = 'Paris'",
    "not (age > 30 or height <= 1.62)",
    "city in ('Lyon', 'O''Brien''s town') or age is null",
    "age not in (20, 21, 22) and height is not null",
    "age not between 30 and 60 and not (city is null)",
    "\"hair color\" = 'red' and (age >= 40 or city < 'M')",
    "height > 1.6 and height < 1.8 or age = 18",
    "city = 'x'' OR 1=1 --'",  # a hostile value stays one value: matches nothing
    "city = 'Paris''; DROP TABLE photos; --'",
]


@pytest.mark.parametrize("text", FILTERS)
def test_compiled_sql_selects_exactly_the_rows_the_python_evaluator_accepts(text: str) -> None:
    rows = _rows(400)
    db = _table(rows)
    sql, params = to_sql(parse(text, COLUMNS))
    got = {r[0] for r in db.execute(f"SELECT id FROM photos WHERE {sql}", params)}
    expected = {r["id"] for r in rows if evaluate(parse(text, COLUMNS), r) is True}
    assert got == expected
    assert db.execute("SELECT count(*) FROM photos").fetchone()[0] == 400  # nothing executed from a value


def test_values_never_reach_the_sql_text() -> None:
    sql, params = to_sql(parse("city = 'Robert''); DROP TABLE photos;--' or age in (1, 2)", COLUMNS))
    assert "DROP" not in sql and "Robert" not in sql
    assert params == ["Robert'); DROP TABLE photos;--", 1, 2]
    assert sql == '("city" = ? OR "age" IN (?, ?))'


def test_the_ast_is_frozen_and_hashable() -> None:
    expr = parse("city = 'Paris' and age in (1, 2)", COLUMNS)
    with pytest.raises(AttributeError):
        expr.items = ()  # type: ignore[misc, union-attr]
    assert hash(expr) == hash(parse("city = 'Paris' and age in (1, 2)", COLUMNS))
