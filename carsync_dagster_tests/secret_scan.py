"""Search everything a sync leaves behind for secrets (issue 15): texts (a command's output),
every column of every table of every schema in a database (the warehouse, Dagster's run and
event storage), and every file under a folder (compute logs, landed pages, Parquet, the Dagster
home). Tests and benchmarks call `scan`; it returns each place a secret was found, never the
secret itself.

The spellings searched for are worked out here, independently of the code under test
(carsync_dagster.redaction), so a spelling that code forgets is still found."""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, quote_plus

import psycopg
from psycopg import sql

# Shorter base64 fragments could turn up by chance in a large dump.
_MIN_FRAGMENT = 8


@dataclass(frozen=True)
class Hit:
    secret: str  # the name the caller gave it, e.g. "API key"
    form: str  # raw, %-encoded, JSON-escaped, base64
    where: str  # e.g. "stderr", "table dagster.event_logs column event (3 rows)", "file …"

    def __str__(self) -> str:
        return f"{self.secret} ({self.form}) in {self.where}"


def spellings(secret: str) -> dict[str, str]:
    """Every spelling of `secret` searched for, with its form's name."""
    forms: dict[str, str] = {}
    for text in (quote(secret, safe=""), quote(secret), quote_plus(secret, safe="")):
        forms[text] = forms[_lower_hex(text)] = "%-encoded"
    forms[json.dumps(secret)[1:-1]] = "JSON-escaped"
    raw = secret.encode()
    for shift in range(3):
        # Inside a longer base64 text the secret may start at any byte alignment; the groups
        # of four characters that encode its bytes alone are the same whatever surrounds it.
        full = base64.b64encode(b"\0" * shift + raw).decode()
        alone = full.rstrip("=") if not shift else ""
        fragment = full[4 if shift else 0 : 4 * ((shift + len(raw)) // 3)]
        for text in (alone, fragment):
            if len(text) >= _MIN_FRAGMENT or text == alone:
                forms[text] = forms[text.replace("+", "-").replace("/", "_")] = "base64"
    forms[secret] = "raw"  # last: a secret that needs no encoding is found as raw
    return {text: form for text, form in forms.items() if text}


def _lower_hex(text: str) -> str:
    parts = text.split("%")
    return parts[0] + "".join(f"%{part[:2].lower()}{part[2:]}" for part in parts[1:])


def scan(
    secrets: Mapping[str, str],
    *,
    texts: Mapping[str, str | bytes] | None = None,
    databases: Sequence[str] = (),
    folders: Sequence[Path] = (),
) -> list[Hit]:
    """Where the `secrets` (name → value) are found: in `texts` (name → content), in any column
    of any table in any schema of the `databases` (libpq URLs; system catalogs aside), in any
    file under `folders` (compressed files and Parquet searched as what they hold)."""
    forms = {
        name: {text.encode(): form for text, form in spellings(value).items()}
        for name, value in secrets.items()
        if value
    }
    hits: list[Hit] = []
    for where, content in (texts or {}).items():
        data = content.encode() if isinstance(content, str) else content
        hits += _search(forms, data, where)
    for url in databases:
        hits += _scan_database(forms, url)
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
            for data, what in _file_contents(path):
                hits += _search(forms, data, f"file {path}{what}")
    return hits


Forms = Mapping[str, Mapping[bytes, str]]


def _search(forms: Forms, data: bytes, where: str) -> list[Hit]:
    hits = []
    for name, spelled in forms.items():
        found = sorted({form for text, form in spelled.items() if text in data})
        hits += [Hit(name, form, where) for form in found]
    return hits


def _file_contents(path: Path) -> list[tuple[bytes, str]]:
    """The file's bytes, and what they hold when compressed (gzip, zlib) or Parquet."""
    try:
        data = path.read_bytes()
    except OSError:  # gone meanwhile (a spool file), or a socket
        return []
    contents = [(data, "")]
    unpacked = _inflated(data)
    if unpacked is not None:
        contents.append((unpacked, " (decompressed)"))
    if data[:4] == b"PAR1":
        import polars as pl

        # Not readable as Parquet after all: its bytes were searched.
        with contextlib.suppress(pl.exceptions.PolarsError, OSError):
            contents.append((pl.read_parquet(path).write_ndjson().encode(), " (Parquet rows)"))
    return contents


def _inflated(data: bytes) -> bytes | None:
    """gzip or zlib data decompressed; None for anything else."""
    try:
        if data[:2] == b"\x1f\x8b":
            return gzip.decompress(data)
        if data[:1] == b"\x78":
            return zlib.decompress(data)
    except (OSError, EOFError, zlib.error):
        pass
    return None


def _scan_database(forms: Forms, url: str) -> list[Hit]:
    hits: list[Hit] = []
    with psycopg.connect(url, autocommit=True) as conn:
        database = conn.info.dbname
        columns = conn.execute(
            "SELECT c.table_schema, c.table_name, c.column_name, c.data_type"
            " FROM information_schema.columns c JOIN information_schema.tables t"
            " USING (table_schema, table_name)"
            " WHERE t.table_type = 'BASE TABLE'"
            " AND c.table_schema <> 'information_schema' AND c.table_schema !~ '^pg_'"
            " ORDER BY 1, 2, c.ordinal_position"
        ).fetchall()
        texts = [(secret, text, form) for secret, f in forms.items() for text, form in f.items()]
        for schema, table, column, data_type in columns:
            where = f"database {database} table {schema}.{table} column {column}"
            name = sql.Identifier(schema, table)
            if data_type == "bytea":  # fetched: a body may be compressed (Dagster's snapshots)
                query = sql.SQL("SELECT {} FROM {} WHERE {} IS NOT NULL").format(
                    sql.Identifier(column), name, sql.Identifier(column)
                )
                for (value,) in conn.execute(query):
                    hits += _search(forms, bytes(value), where)
                    unpacked = _inflated(bytes(value))
                    if unpacked is not None:
                        hits += _search(forms, unpacked, f"{where} (decompressed)")
                continue
            # Every other type compared as its text (json, jsonb and arrays as they print).
            counts = sql.SQL(", ").join(
                sql.SQL("count(*) FILTER (WHERE strpos({}::text, {}) > 0)").format(
                    sql.Identifier(column), sql.Literal(text.decode())
                )
                for _, text, _ in texts
            )
            row = conn.execute(sql.SQL("SELECT {} FROM {}").format(counts, name)).fetchone()
            assert row is not None
            found: dict[tuple[str, str], int] = {}
            for (secret, _, form), n in zip(texts, row, strict=True):
                if n:
                    found[secret, form] = max(n, found.get((secret, form), 0))
            hits += [Hit(s, form, f"{where} ({n} rows)") for (s, form), n in found.items()]
    return hits
