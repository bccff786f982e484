"""RFC 4514 subject names for certificate requests of custody keys, with errors that say
which part is wrong.

``cryptography`` parses RFC 4514 strings but mostly answers a bad one with an empty
``ValueError``; an operator typing ``--subject`` needs to know which RDN, and what form
was expected.  So a name cryptography refuses is walked again here, by the RFC's
grammar, only to find and describe the fault; cryptography stays the parser.
"""

from __future__ import annotations

import re

from cryptography import x509

from janus_hsm.errors import SubjectError

#: The attribute types RFC 4514 section 3 names (any other type is a dotted OID).
KEYWORDS = ("CN", "L", "ST", "O", "OU", "C", "STREET", "DC", "UID")
EXPECTED = "expected TYPE=value pairs joined by ',' (e.g. 'CN=edge-root,O=Example')"
_OID = re.compile(r"[0-9]+(\.[0-9]+)+")
_HEX = "0123456789abcdefABCDEF"
# Characters RFC 4514 requires escaped anywhere in a value ('+' and ',' split the name).
_ESCAPE_ALWAYS = '"+,;<>\\'


def parse_subject(text: str) -> x509.Name:
    """``text`` as an X.509 name, or :class:`SubjectError` naming the faulty part."""
    if not text.strip():
        raise SubjectError(f"the subject is empty: {EXPECTED}")
    if "\x00" in text:
        raise SubjectError("the subject contains a NUL character")
    problem = _diagnose(text)
    if problem is not None:
        raise SubjectError(f"the subject is not an RFC 4514 name: {problem}; {EXPECTED}")
    try:
        return x509.Name.from_rfc4514_string(text)
    except ValueError as exc:
        reason = str(exc) or "refused by the parser"
        where = "the subject"
        for number, rdn in enumerate(_split(text, ","), 1):
            try:
                x509.Name.from_rfc4514_string(rdn)
            except ValueError as part_exc:  # e.g. C=USA: "length must be >= 2 and <= 2"
                where, reason = f"RDN {number} ({rdn!r})", str(part_exc) or reason
                break
        raise SubjectError(f"{where} is not valid: {reason}; {EXPECTED}") from None


def _split(text: str, separator: str) -> list[str]:
    """Split at unescaped ``separator`` (a backslash escapes the next character)."""
    parts, current, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            current.append(text[i : i + 2])
            i += 2
            continue
        if ch == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def _diagnose(text: str) -> str | None:
    """The first fault in ``text`` by RFC 4514's grammar, described, or None."""
    for number, rdn in enumerate(_split(text, ","), 1):
        where = f"RDN {number} ({rdn!r})"
        if not rdn:
            return f"RDN {number} is empty (two ',' in a row, or one at an end)"
        for pair in _split(rdn, "+"):
            if not pair:
                return f"{where} has an empty part around '+'"
            attribute_type, eq, value = pair.partition("=")
            if not eq:
                return f"{where} has no '=' in {pair!r}"
            problem = _type_problem(attribute_type) or _value_problem(attribute_type, value)
            if problem is not None:
                return f"{where}: {problem}"
    return None


def _type_problem(attribute_type: str) -> str | None:
    if attribute_type != attribute_type.strip():
        return (
            f"attribute type {attribute_type!r} has spaces: RFC 4514 allows none around ',' '+' '='"
        )
    if attribute_type.upper() in KEYWORDS or _OID.fullmatch(attribute_type):
        return None
    if not attribute_type:
        return "an attribute type is missing before '='"
    return (
        f"unknown attribute type {attribute_type!r}: use one of {', '.join(KEYWORDS)} or a "
        "dotted OID such as 2.5.4.5"
    )


def _value_problem(attribute_type: str, value: str) -> str | None:
    name = attribute_type.upper()
    if not value:
        return f"{name}= has an empty value"
    if value.startswith("#"):
        return f"{name}= starts with '#' (a BER hex encoding); give text, or write '\\#'"
    if value.startswith(" ") or (value.endswith(" ") and not value.endswith("\\ ")):
        return f"{name}= starts or ends with a space; escape it as '\\ ' or leave it out"
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\":
            following = value[i + 1 : i + 3]
            if following[:1] and following[:1] in _ESCAPE_ALWAYS + " #=":
                i += 2
                continue
            if len(following) == 2 and all(c in _HEX for c in following):
                i += 3
                continue
            return (
                f"{name}= has a '\\' at character {i + 1} that escapes nothing: follow it "
                'with one of " + , ; < > \\ # = space, or two hex digits'
            )
        if ch == ";":
            return f"{name}= contains ';', which does not separate RDNs in RFC 4514: use ','"
        if ch in _ESCAPE_ALWAYS:
            return f"{name}= has an unescaped {ch!r} at character {i + 1}; write '\\{ch}'"
        i += 1
    return None
