"""The migration files as a DBA reads them: each function defined once, or redefined with the reason in the header."""

from __future__ import annotations

import re
from pathlib import Path

from service.store import migrations

_DEFINITION = re.compile(r"\bCREATE\s+(?:OR\s+REPLACE\s+)?FUNCTION\s+([a-z_][a-z0-9_]*)\s*\(", re.IGNORECASE)
# "-- Redefines <function>: <why>" in the file's leading comment block.
_REASON = re.compile(r"^--\s*Redefines\s+([a-z_][a-z0-9_]*)\s*:\s*\S", re.IGNORECASE)


def _header(sql: str) -> list[str]:
    """The comment lines a migration opens with."""
    lines = []
    for line in sql.splitlines():
        if not line.startswith("--"):
            break
        lines.append(line)
    return lines


def unexplained_redefinitions(directory: Path) -> list[str]:
    """Each function defined again by a later migration whose header does not say why."""
    defined: dict[str, str] = {}
    problems = []
    for migration in migrations.discover(directory):
        file = f"{migration.version:04d}_{migration.name}.sql"
        explained = {m[1].lower() for line in _header(migration.sql) if (m := _REASON.match(line))}
        for name in dict.fromkeys(n.lower() for n in _DEFINITION.findall(migration.sql)):
            if name in defined and name not in explained:
                problems.append(f"{file} redefines {name} (first defined in {defined[name]}) without saying why")
            defined.setdefault(name, file)
    return problems


def test_every_function_of_the_schema_is_defined_once_or_redefined_with_its_reason() -> None:
    assert unexplained_redefinitions(migrations.MIGRATIONS_DIR) == []


def test_a_function_redefined_without_a_reason_in_the_header_is_caught(tmp_path: Path) -> None:
    (tmp_path / "0001_create_things.sql").write_text(
        "-- Things.\nCREATE FUNCTION count_things() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$;\n"
    )
    later = tmp_path / "0002_count_things_faster.sql"
    later.write_text(
        "-- Things, counted faster.\n"
        "CREATE OR REPLACE FUNCTION count_things() RETURNS int LANGUAGE sql AS $$ SELECT 2 $$;\n"
    )
    silent = unexplained_redefinitions(tmp_path)
    later.write_text("-- Redefines count_things: an index answers it now.\n" + later.read_text())

    assert silent == [
        "0002_count_things_faster.sql redefines count_things (first defined in 0001_create_things.sql) "
        "without saying why"
    ]
    assert unexplained_redefinitions(tmp_path) == []
