"""Secrets out of texts that are printed, logged or stored (operations.md: the key and the
database password are never shown). A secret is taken out in every spelling it takes on its way
through URLs, headers, JSON and logs; texts from elsewhere (a server, an exception) become one
printable line."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

MASK = "***"
# A base64 fragment shorter than this could stand for anything: it is not taken out alone.
_MIN_FRAGMENT = 8
_PERCENT_ESCAPE = re.compile(r"%[0-9A-F]{2}")
_SPACES = re.compile(r"\s+")


def spellings(secret: str) -> set[str]:
    """How `secret` shows in a text: as it is; %-encoded (either case of hex, `+` for a space);
    escaped in JSON or a Python repr; base64 (standard or URL-safe), alone or inside a longer
    encoded text at any byte alignment (there, the characters that encode it alone)."""
    if not secret:
        return set()
    forms = {secret, quote(secret, safe=""), quote_plus(secret, safe="")}
    forms |= {_PERCENT_ESCAPE.sub(lambda m: m.group().lower(), form) for form in forms}
    forms |= {json.dumps(secret)[1:-1], repr(secret)[1:-1]}
    raw = secret.encode()
    encoded = [base64.b64encode(raw).decode().rstrip("=")]
    for shift in range(3):
        # After `shift` bytes of something else: the first group of four characters holds those
        # bytes; a last group cut short holds bytes of whatever follows. The groups between
        # encode the secret alone.
        groups = (shift + len(raw)) // 3
        fragment = base64.b64encode(b"\0" * shift + raw).decode()[4 if shift else 0 : 4 * groups]
        if len(fragment) >= _MIN_FRAGMENT:
            encoded.append(fragment)
    forms |= set(encoded) | {form.replace("+", "-").replace("/", "_") for form in encoded}
    return {form for form in forms if form}


class Redactor:
    """Takes the given secrets out of texts (every spelling, longest first)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        forms = {form for secret in secrets for form in spellings(secret)}
        self._forms = sorted(forms, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for form in self._forms:
            text = text.replace(form, MASK)
        return text


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret, in any spelling, replaced by ***."""
    return Redactor(secrets)(text)


def one_line(text: str) -> str:
    """A text from elsewhere as one printable line: line breaks, tabs and control characters
    (a terminal's escape sequences among them) become single spaces."""
    printable = "".join(char if char.isprintable() else " " for char in text)
    return _SPACES.sub(" ", printable).strip()
