"""Byte-level mutation of valid seeds, as Hypothesis strategies.

Hypothesis generates, shrinks and replays the cases; what it lacks is a mutator that
starts from a valid input (a signed bundle, an envelope) and damages it a little, which
is what reaches the code behind the first ``json.loads``.  The operators are the usual
ones of coverage-guided fuzzers (AFL's havoc stage): flip a bit, set a byte to an
interesting value, insert, delete, duplicate or truncate, splice in a token of the
format.  Atheris would add coverage feedback but needs a libFuzzer build that this
project does not otherwise depend on; Hypothesis is already a dev dependency.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

from hypothesis import strategies as st

# Bytes that change the meaning of JSON, URIs, TOML and compact JWS when planted.
INTERESTING_BYTES = b"\x00\x01\x7f\x80\xff\"\\/.{}[]:,;?&=%+-_ \n\t#'0e"
# Whole tokens worth splicing in: JSON edge values, separators, encodings.
TOKENS: tuple[bytes, ...] = (
    b"null",
    b"true",
    b"false",
    b"[]",
    b"{}",
    b'""',
    b"-1",
    b"0",
    b"1e999",
    b"-0",
    b"NaN",
    b"Infinity",
    b"9" * 40,
    b"\\u0000",
    b"\\ud800",
    b"\xef\xbb\xbf",
    b"\xc0\x80",
    b"%00",
    b"%ff",
    b"%2D",
    b"%",
    b"..",
    b"==",
    b'":"',
    b'","',
    b"[" * 64,
    b"{" * 64,
)


@st.composite
def mutated_bytes(draw: st.DrawFn, seed: bytes, max_steps: int = 6) -> bytes:
    """``seed`` with 1..max_steps havoc-style changes (it may come out unchanged)."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, max_steps))):
        op = draw(st.integers(0, 7))
        pos = draw(st.integers(0, len(data))) if data else 0
        if op == 0 and data:  # flip one bit
            at = min(pos, len(data) - 1)
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == 1 and data:  # set a byte to an interesting one
            at = min(pos, len(data) - 1)
            data[at] = draw(st.sampled_from(INTERESTING_BYTES))
        elif op == 2:  # insert random bytes
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == 3 and data:  # delete a range
            end = draw(st.integers(pos, min(len(data), pos + 16)))
            del data[pos:end]
        elif op == 4 and data:  # duplicate a range
            end = draw(st.integers(pos, min(len(data), pos + 32)))
            data[end:end] = data[pos:end]
        elif op == 5:  # truncate
            del data[pos:]
        elif op == 6:  # splice a token
            end = draw(st.integers(pos, min(len(data), pos + 4)))
            data[pos:end] = draw(st.sampled_from(TOKENS))
        else:  # replace a byte with any byte
            if data:
                data[min(pos, len(data) - 1)] = draw(st.integers(0, 255))
    return bytes(data)


def mutated_text(seed: str, max_steps: int = 6) -> st.SearchStrategy[str]:
    """Mutated UTF-8 text, decoded with replacement (parsers of ``str`` get a str)."""
    return mutated_bytes(seed.encode(), max_steps).map(lambda b: b.decode("utf-8", "replace"))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@st.composite
def changed_bytes(draw: st.DrawFn, seed: bytes) -> bytes:
    """``seed`` mutated so that it differs from the seed (for signed parts)."""
    out = draw(mutated_bytes(seed, max_steps=3))
    if out == seed:
        if not seed:
            return b"\x00"
        at = draw(st.integers(0, len(seed) - 1))
        out = seed[:at] + bytes([seed[at] ^ (1 << draw(st.integers(0, 7)))]) + seed[at + 1 :]
    return out


@st.composite
def tampered_compact(draw: st.DrawFn, compact: str) -> str:
    """A compact JWS whose header, payload or signature bytes differ from the signed ones.

    The changed segment is re-encoded as valid base64url, so the refusal has to come
    from the signature check (or a later semantic check), not from the decoder.
    """
    segments = compact.split(".")
    index = draw(st.integers(0, len(segments) - 1))
    segments[index] = b64url(draw(changed_bytes(unb64url(segments[index]))))
    return ".".join(segments)


def one_of_seeds(seeds: Sequence[bytes], max_steps: int = 6) -> st.SearchStrategy[bytes]:
    return st.sampled_from(list(seeds)).flatmap(lambda s: mutated_bytes(s, max_steps))
