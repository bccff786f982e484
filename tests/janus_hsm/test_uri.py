"""Key URIs: RFC 7512 examples, round-trips, and refusals of the grammar all schemes share
(none of which may repeat a value: a value may be a secret typed in the wrong place)."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from janus_hsm import uri_scheme
from janus_hsm.backends.piv.uri import GRAMMAR as PIV_GRAMMAR
from janus_hsm.backends.piv.uri import PivUri
from janus_hsm.backends.software.uri import GRAMMAR as SOFT_GRAMMAR
from janus_hsm.backends.software.uri import SoftwareUri
from janus_hsm.errors import UriError
from janus_hsm.uri import GRAMMAR as PKCS11_GRAMMAR
from janus_hsm.uri import OBJECT_TYPES, PATH_ATTRIBUTES, Pkcs11Uri, format_id
from janus_hsm.uri_grammar import Grammar


@pytest.mark.parametrize(
    "text",
    [
        # Examples from RFC 7512 section 3.
        "pkcs11:",
        "pkcs11:object=my-pubkey;type=public",
        "pkcs11:object=my-key;type=private?pin-source=file:/etc/token",
        "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;manufacturer=Snake%20Oil,%20Inc."
        ";model=1.0;object=my-certificate;type=cert;id=%69%95%3E%5C%F4%BD%EC%91",
        "pkcs11:object=my-sign-key;type=private?module-name=mypkcs11",
        "pkcs11:object=my-sign-key;type=private?module-path=/mnt/libmypkcs11.so.1",
        "pkcs11:token=Software%20PKCS%2311%20softtoken;manufacturer=Snake%20Oil,%20Inc.",
        "pkcs11:slot-description=Sun%20Metaslot",
        "pkcs11:library-manufacturer=Snake%20Oil,%20Inc.;library-description=Soft%20Token"
        "%20Library;library-version=1.23",
        "pkcs11:token=A%20name%20with%20a%20substring%20%25%3B;object=my-certificate;type=cert",
        "pkcs11:token=Name%20with%20a%20small%20A%20with%20acute:%20%C3%A1;object=my-certificate"
        ";type=cert",
        "pkcs11:token=my-token;object=my-certificate;type=cert;"
        "vendor-aaa=value-a?pin-source=file:/etc/token_pin",
        "pkcs11:slot-id=1;slot-manufacturer=Acme",
    ],
)
def test_rfc_examples_parse_and_round_trip(text: str) -> None:
    if "vendor-aaa" in text:
        with pytest.raises(UriError, match="vendor-aaa"):
            Pkcs11Uri.parse(text)
        return
    uri = Pkcs11Uri.parse(text)
    assert Pkcs11Uri.parse(str(uri)) == uri


def test_attributes_decode() -> None:
    uri = Pkcs11Uri.parse(
        "pkcs11:token=janus;object=edge%20root;type=private;id=%01%ff"
        "?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/pin"
    )
    assert uri.token == "janus"
    assert uri.object == "edge root"
    assert uri.type == "private"
    assert uri.id == b"\x01\xff"
    assert uri.module_path == "/usr/lib/softhsm/libsofthsm2.so"
    assert uri.pin_source == "file:/run/pin"
    assert str(uri) == (
        "pkcs11:token=janus;object=edge%20root;type=private;id=%01%FF"
        "?pin-source=file:/run/pin&module-path=/usr/lib/softhsm/libsofthsm2.so"
    )


def test_scheme_is_case_insensitive_and_printed_lowercase() -> None:
    assert str(Pkcs11Uri.parse("PKCS11:token=a")) == "pkcs11:token=a"


@pytest.mark.parametrize(
    ("text", "shows"),
    [
        ("http://example.com", "pkcs11:"),
        ("pkcs11:token=a;token=b", "'token' appears twice"),
        ("pkcs11:foo=bar", "'foo'"),  # the name only: a value may be a secret
        ("pkcs11:x-vendor=1", "'x-vendor'"),
        ("pkcs11:Token=a", "lower case"),
        ("pkcs11:token", "'token' without '='"),
        ("pkcs11:=x", "without a name"),
        ("pkcs11:token=a;;object=b", "empty"),
        ("pkcs11:token=a b", "character 2 of the value of 'token' must be percent-encoded"),
        ("pkcs11:token=a/b", "(write it as %2F)"),
        ("pkcs11:token=%zz", "bad percent-encoding in the value of 'token'"),
        ("pkcs11:token=%4", "bad percent-encoding"),
        ("pkcs11:type=secret", "type= must be one of"),
        ("pkcs11:slot-id=one", "slot-id= must be a decimal number"),
        ("pkcs11:library-version=1.2.3", "library-version="),
        ("pkcs11:token=a?module-path=relative/lib.so", "module-path= must be an absolute"),
        ("pkcs11:token=a?module-name=/abs/lib.so", "module-name= must be a bare"),
        ("pkcs11:token=a?foo=1", "'foo'"),
        ("pkcs11:token=a?pin-source=x&pin-source=y", "'pin-source' appears twice"),
        ("pkcs11:pin-source=file:/x", "'pin-source' is a query attribute"),
        ("pkcs11:token=a?object=b", "'object' is a path attribute"),
        ("pkcs11:token=%FF%FE", "the value of 'token' is not UTF-8"),
        ("pkcs11:token=a%00b", "NUL"),
        ("pkcs11:" + ";".join(["token=a"] * 65), "more than 64 attributes"),
    ],
)
def test_malformed_uris_are_refused_naming_the_attribute(text: str, shows: str) -> None:
    with pytest.raises(UriError) as info:
        Pkcs11Uri.parse(text)
    assert shows in str(info.value)
    assert info.value.code == "bad_uri"


@pytest.mark.parametrize(
    "text",
    [
        "pkcs11:token=x;PIN-VALUE=123456",
        "pkcs11:token=x?Pin-Value=123456",
        "pkcs11:token=x?pin%2Dvalue=123456",
        "pkcs11:token=x;pinvalue=123456",
        "pkcs11:token=x?pin_value=123456",
        "pkcs11:token=x?pin-valu=123456",  # misspelt: unknown, and not repeated either
        "pkcs11:token=x?%50IN%2dVALUE=123456",
        "pkcs11:token=x;pin-value",
    ],
)
def test_a_pin_in_any_spelling_is_refused_and_never_echoed(text: str) -> None:
    with pytest.raises(UriError) as info:
        Pkcs11Uri.parse(text)
    assert "123456" not in str(info.value)


@pytest.mark.parametrize("attribute", ["module-path=/tmp/a%00b", "module-name=a%00b"])
def test_a_nul_in_a_module_attribute_is_a_uri_error(attribute: str) -> None:
    with pytest.raises(UriError, match="NUL"):
        Pkcs11Uri.parse(f"pkcs11:token=x?{attribute}")


def test_pin_value_is_refused_with_advice() -> None:
    with pytest.raises(UriError, match="pin-source"):
        Pkcs11Uri.parse("pkcs11:token=a?pin-value=1234")


def test_overlong_uri_is_refused() -> None:
    with pytest.raises(UriError, match="4096"):
        Pkcs11Uri.parse("pkcs11:token=" + "a" * 5000)


_text_values = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\x00"),
    max_size=20,
)


@st.composite
def uris(draw: st.DrawFn) -> Pkcs11Uri:
    names = draw(st.sets(st.sampled_from(PATH_ATTRIBUTES)))
    path: dict[str, object] = {}
    for name in names:
        if name == "id":
            path[name] = draw(st.binary(max_size=20))
        elif name == "type":
            path[name] = draw(st.sampled_from(OBJECT_TYPES))
        elif name == "slot-id":
            path[name] = str(draw(st.integers(0, 2**32)))
        elif name == "library-version":
            path[name] = draw(st.sampled_from(["2", "2.6", "10.11"]))
        else:
            path[name] = draw(_text_values)
    query: dict[str, str] = {}
    if draw(st.booleans()):
        query["pin-source"] = "file:/" + draw(_text_values).replace("\x00", "")
    if draw(st.booleans()):
        query["module-path"] = "/" + draw(_text_values).replace("\x00", "")  # refused
    return Pkcs11Uri(path, query)


@given(uris())
def test_print_parse_round_trip(uri: Pkcs11Uri) -> None:
    text = str(uri)
    assert Pkcs11Uri.parse(text) == uri
    assert str(Pkcs11Uri.parse(text)) == text


@given(st.text(max_size=80))
def test_arbitrary_text_either_parses_or_raises_uri_error(text: str) -> None:
    try:
        uri = Pkcs11Uri.parse("pkcs11:" + text)
    except UriError:
        return
    assert Pkcs11Uri.parse(str(uri)) == uri


# ------------------------------------------------------------ the grammar of every scheme

# (grammar, parser, attributes whose values the scheme checks further)
_SCHEMES: list[tuple[Grammar, Callable[[str], object], tuple[str, ...]]] = [
    (PKCS11_GRAMMAR, Pkcs11Uri.parse, ("type", "slot-id", "library-version", "module-path")),
    (SOFT_GRAMMAR, SoftwareUri.parse, ("dir", "object", "pin-source")),
    (PIV_GRAMMAR, PivUri.parse, ("serial", "slot", "pin-source")),
]
# Looks like a password and like no word of any message.
_secrets = st.from_regex(r"[a-z]{3}[0-9]{2}[A-Za-z0-9]{3,10}", fullmatch=True)
_secret_names = st.sampled_from(
    ["pin-value", "PIN-VALUE", "Pin-Value", "pin%2Dvalue", "pin%2dvalue", "%70in-value",
     "pin_value", "pinvalue", "pin", "PIN", "puk", "management-key", "passphrase", "so-pin"]
)  # fmt: skip
_UNSAFE = [" ", "#", '"', "<", "é", "\\", "^"]
_unknown_names = st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True)


@st.composite
def malformed(draw: st.DrawFn) -> tuple[Callable[[str], object], str, str]:
    """A URI of some scheme with one fault and ``secret`` as the value of attributes."""
    grammar, parse, checked = draw(st.sampled_from(_SCHEMES))
    secret = draw(_secrets)
    encoded = "".join(f"%{b:02X}" if draw(st.booleans()) else chr(b) for b in secret.encode())
    known = grammar.path_attributes
    fine = [f"{name}={secret}" for name in draw(st.lists(st.sampled_from(known), unique=True))]
    fault = draw(st.integers(0, 8))
    where = draw(st.sampled_from(["path", "query"]))
    name = draw(st.sampled_from(known if where == "path" else grammar.query_attributes))
    if fault == 0:
        unknown = draw(_unknown_names.filter(lambda n: n not in known + grammar.query_attributes))
        bad = f"{unknown}={encoded}"
    elif fault == 1:
        bad = f"{draw(_secret_names)}={encoded}"
    elif fault == 2:
        bad = (
            f"{name}={encoded};{name}={secret}" if where == "path" else f"{name}=a&{name}={secret}"
        )
    elif fault == 3:
        bad = f"{name}={encoded}%{draw(st.sampled_from(['zz', '4', '', 'g0']))}"
    elif fault == 4:
        bad = f"{name}={encoded}{draw(st.sampled_from(_UNSAFE))}x"
    elif fault == 5:  # NUL or not UTF-8 (fine in id=, which is bytes)
        name = "object" if name == "id" else name
        bad = f"{name}={encoded}%{draw(st.sampled_from(['00', 'FF', 'C3']))}"
    elif fault == 6:  # misplaced: a path attribute after '?' or a query one before it
        name = draw(st.sampled_from(grammar.query_attributes if where == "path" else known))
        bad = f"{name}={encoded}"
    elif fault == 7:  # a value the scheme itself refuses
        name = draw(st.sampled_from(checked))
        where = "query" if name in grammar.query_attributes else "path"
        bad = f"{name}={'.' if name == 'object' else ''}{encoded}"
    else:
        bad = f"{secret}"  # no '='
    fine = [part for part in fine if not part.startswith(f"{name}=")]
    if where == "path":
        text = f"{grammar.scheme}:" + ";".join([*fine, bad])
    else:
        text = f"{grammar.scheme}:" + ";".join(fine) + "?" + bad
    return parse, text, secret


@settings(max_examples=3000, deadline=None)
@given(malformed())
def test_no_uri_error_repeats_a_value(case: tuple[Callable[[str], object], str, str]) -> None:
    parse, text, secret = case
    with pytest.raises(UriError) as info:
        parse(text)
    assert secret not in str(info.value)
    assert secret.lower() not in str(info.value).lower()


@given(st.sampled_from(_SCHEMES), st.text(max_size=60), _secrets)
def test_arbitrary_text_around_a_secret_never_echoes_it(
    scheme: tuple[Grammar, Callable[[str], object], tuple[str, ...]], noise: str, secret: str
) -> None:
    grammar, parse, _ = scheme
    for text in (f"{grammar.scheme}:{noise}={secret}", f"{grammar.scheme}:x{noise}={secret}"):
        try:
            parse(text)
        except UriError as exc:
            assert secret not in str(exc)


@pytest.mark.parametrize(
    "text",
    [
        "soft:object=x;PIN-VALUE=hunter2",
        "soft:object=x?pin%2Dvalue=hunter2",
        "soft:object=x;colour=hunter2",
        "soft:dir=hunter2",
        "soft:object=.hunter2",
        "soft:object=x?pin-source=hunter2",
        "piv:slot=9c;pin%2Dvalue=hunter2",
        "piv:slot=9c;PIN=hunter2",
        "piv:slot=hunter2",
        "piv:serial=hunter2",
        "piv:slot=9c;label=hunter2",
        "pkcs11:token=x;type=hunter2",
        "pkcs11:token=x?module-name=/hunter2",
        "pkcs11:token=hunter2;token=hunter2",
        "hunter2",
        "hunter2:x",
    ],
)
def test_reported_leaks_are_closed(text: str) -> None:
    for parse in (Pkcs11Uri.parse, SoftwareUri.parse, PivUri.parse, uri_scheme):
        try:
            parse(text)
        except UriError as exc:
            assert "hunter2" not in str(exc)


def test_every_scheme_refuses_alike() -> None:
    """One grammar: the same fault gets the same refusal in every scheme."""
    for grammar, parse, _ in _SCHEMES:
        first = grammar.path_attributes[0]
        for fault, message in [
            (f"{first}=a;{first}=b", f"attribute '{first}' appears twice"),
            (f"{first}=a%zz", "bad percent-encoding"),
            (f"{first}=a%00", "NUL"),
            (f"{first}=%FF", "not UTF-8"),
            ("x-vendor=1", "'x-vendor'"),
            ("Pin%2DValue=1", "Pin-Value is refused"),
            (f"{first}", "without '='"),
            ("=1", "without a name"),
        ]:
            with pytest.raises(UriError, match=re.escape(message)):
                parse(f"{grammar.scheme}:{fault}")


# ------------------------------------------------------------------ ids


@pytest.mark.parametrize(
    ("text", "bytes_form", "text_form", "meant"),
    [
        ("id=0a1b2c", "id=%0A%1B%2C", "id=%30%61%31%62%32%63", b"\x0a\x1b\x2c"),
        ("id=0x0a1b", "id=%0A%1B", "id=%30%78%30%61%31%62", b"\x0a\x1b"),
        ("id=0XABC", "id=%0A%BC", "id=%30%58%41%42%43", b"\x0a\xbc"),
        ("id=12", "id=%12", "id=%31%32", b"\x12"),
    ],
)
def test_an_id_in_hex_is_refused_with_its_percent_encoded_spellings(
    text: str, bytes_form: str, text_form: str, meant: bytes
) -> None:
    with pytest.raises(UriError) as info:
        Pkcs11Uri.parse(f"pkcs11:token=t;{text}")
    assert bytes_form in str(info.value)
    assert text_form in str(info.value)
    # Either spelling the hint offers parses, to the bytes it says.
    assert Pkcs11Uri.parse(f"pkcs11:{bytes_form}").id == meant
    assert Pkcs11Uri.parse(f"pkcs11:{text_form}").id == text.removeprefix("id=").encode()


@pytest.mark.parametrize("text", ["id=%0A%1B", "id=key-1", "id=%30%61", "id=", "id=0g"])
def test_ids_that_are_not_bare_hex_parse(text: str) -> None:
    Pkcs11Uri.parse(f"pkcs11:{text}")


@given(st.binary(max_size=32))
def test_ids_print_percent_encoded(key_id: bytes) -> None:
    printed = str(Pkcs11Uri({"object": "k", "id": key_id}))
    assert printed.endswith("id=" + "".join(f"%{b:02X}" for b in key_id))
    assert format_id(key_id) == printed.partition("id=")[2]
    assert Pkcs11Uri.parse(printed).id == key_id
