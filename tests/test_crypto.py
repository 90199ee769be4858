"""Tests for gateway.wire.crypto: Node createCipher/createDecipher compatibility, strictness.

The corpus was produced by Node's real crypto.createCipher, and the openssl CLI is an
independent implementation of EVP_BytesToKey + the ciphers, so both pin byte compatibility.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.wire.crypto import (
    SUPPORTED_ALGORITHMS,
    CipherSpec,
    CryptoError,
    Decrypted,
    app_id_label,
    decode_ciphertext,
    decode_plaintext,
    decrypt_bytes,
    decrypt_event,
    derive_key_iv,
    encrypt_event,
    normalise_encoding,
    normalise_format,
    parse_strict_json,
    resolve_algorithm,
)

CORPUS = Path(__file__).parent / "fixtures" / "enablex" / "corpus"
TEST_APP_ID = "64b7f0c2a1d3e4f5a6b7c8d9"
OTHER_APP_ID = "64b7f0c2a1d3e4f5a6b7c8d0"
THIRD_APP_ID = "0123456789abcdef01234567"

# WIRE.md §2 test vector.
VECTOR_APP_ID = "5f1e99bf90ce3c3ccsc52e6462"
VECTOR_KEY = "e3cfa7affb2c9be33596802fccc06e495c2ebd70e77250c32774baa44ed54526"
VECTOR_IV = "7baed10b64cf40ec0a592aad344486a8"
VECTOR_PLAIN = '{"voice_id":"f1aa71c0","state":"connected"}'
VECTOR_CT = (
    "4d296446d9cd951fa0641db3e9051c27fd8ef9d860f546354630c2135ff81659"
    "7bca7f01745dacb5700d5414ae2bd8a4"
)

MUST_DECRYPT = [f"aes-{bits}-{mode}" for bits in (128, 192, 256) for mode in ("cbc", "ctr", "ecb")]
FORMATS = ["hex", "base64", "base64url", "latin1"]
ENCODINGS = ["utf8", "utf16le", "ascii", "latin1"]
CRYPTO_LEVEL_BAD = ["b01", "b02", "b03", "b04", "b08", "b20"]
EVENT = {"voice_id": "ce605e25-9333-4b4c-8820-80c565d64d0d", "state": "connected", "n": 1}


def headers_of(request: dict[str, Any]) -> dict[str, str]:
    """Header names are case-insensitive on the wire; fold them like an HTTP server would."""
    return {name.lower(): value for name, value in request["headers"].items()}


def crypto_args(request: dict[str, Any]) -> tuple[str, str, str, str]:
    """(encrypted_data, algorithm, format, encoding) of a recorded request, or skip it."""
    headers = headers_of(request)
    algorithm = headers.get("x-algoritm") or headers.get("x-algorithm")
    if algorithm is None:
        pytest.skip("unencrypted delivery")
    body = json.loads(request["body"])
    return body["encrypted_data"], algorithm, headers["x-format"], headers["x-encoding"]


def wire_requests() -> list[Any]:
    """Every recorded request of every wire/*.jsonl file, with the flow event it carries."""
    cases = []
    for path in sorted((CORPUS / "wire").glob("*.jsonl")):
        flow = json.loads((CORPUS / "flows" / f"{path.stem}.json").read_text())
        for line in path.read_text().splitlines():
            if line.strip():
                request = json.loads(line)
                expected = flow["events"][request["seq"]]
                cases.append(
                    pytest.param(request, expected, id=f"{path.stem}#{request['seq']}")
                )
    return cases


def error_of(func: Any, *args: Any) -> CryptoError:
    """Run func and return the CryptoError it must raise."""
    with pytest.raises(CryptoError) as info:
        func(*args)
    return info.value


# --------------------------------------------------------------------------- test vector


def test_vector_key_and_iv() -> None:
    key, iv = derive_key_iv(VECTOR_APP_ID, 32, 16)
    assert key.hex() == VECTOR_KEY
    assert iv.hex() == VECTOR_IV


def test_vector_decrypts() -> None:
    result = decrypt_event(VECTOR_CT, "aes-256-cbc", "hex", "utf8", [VECTOR_APP_ID])
    assert result == Decrypted(
        value={"voice_id": "f1aa71c0", "state": "connected"},
        text=VECTOR_PLAIN,
        app_id=VECTOR_APP_ID,
    )


def test_vector_encrypts() -> None:
    assert encrypt_event(VECTOR_PLAIN, "aes-256-cbc", "hex", "utf8", VECTOR_APP_ID) == VECTOR_CT


def test_derivation_prefixes_are_consistent() -> None:
    """EVP_BytesToKey output is one MD5 chain: shorter keys are prefixes of longer material."""
    key32, iv16 = derive_key_iv(VECTOR_APP_ID, 32, 16)
    key16, iv_after16 = derive_key_iv(VECTOR_APP_ID, 16, 16)
    assert key16 == key32[:16]
    assert iv_after16 == key32[16:]
    key_ecb, no_iv = derive_key_iv(VECTOR_APP_ID, 24, 0)
    assert key_ecb == key32[:24] and no_iv == b""


# --------------------------------------------------------------------------- corpus


@pytest.mark.parametrize(("request_", "expected"), wire_requests())
def test_corpus_wire_request_decrypts(request_: dict[str, Any], expected: dict[str, Any]) -> None:
    data, algorithm, fmt, encoding = crypto_args(request_)
    result = decrypt_event(data, algorithm, fmt, encoding, [TEST_APP_ID])
    assert isinstance(result.value, dict)
    assert result.value == expected
    assert json.loads(result.text) == expected
    assert result.app_id == TEST_APP_ID


def test_corpus_covers_every_wire_variant() -> None:
    """Guard that the corpus still exercises what the parametrised test claims to cover."""
    seen: set[tuple[str, str]] = set()
    for path in (CORPUS / "wire").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            headers = headers_of(json.loads(line))
            algorithm = headers.get("x-algoritm") or headers.get("x-algorithm")
            if algorithm:
                seen.add((algorithm, headers["x-format"]))
    algorithms = {a for a, _ in seen}
    assert {"aes-256-cbc", "aes-128-cbc", "aes256", "AES-256-CBC"} <= algorithms
    assert {"hex", "base64", "base64url"} <= {f for _, f in seen}


@pytest.mark.parametrize("prefix", CRYPTO_LEVEL_BAD)
def test_corpus_bad_request_gives_expected_code(prefix: str) -> None:
    (path,) = (CORPUS / "bad").glob(f"{prefix}_*.json")
    case = json.loads(path.read_text())
    data, algorithm, fmt, encoding = crypto_args(case["request"])
    err = error_of(decrypt_event, data, algorithm, fmt, encoding, [TEST_APP_ID])
    assert err.code == case["expect"]["error"]
    assert TEST_APP_ID not in err.detail


@pytest.mark.parametrize("path", sorted((CORPUS / "edge").glob("e*.json")), ids=lambda p: p.stem)
def test_corpus_edge_request_decrypts(path: Path) -> None:
    case = json.loads(path.read_text())
    data, algorithm, fmt, encoding = crypto_args(case["request"])
    result = decrypt_event(data, algorithm, fmt, encoding, [TEST_APP_ID])
    assert result.value == case["expect"]["event"]


# --------------------------------------------------------------------------- round trips


def test_supported_algorithms_cover_the_required_ones() -> None:
    assert set(MUST_DECRYPT) <= set(SUPPORTED_ALGORITHMS)
    for name in SUPPORTED_ALGORITHMS:
        assert resolve_algorithm(name).name == name


def text_for(encoding: str) -> st.SearchStrategy[str]:
    """Arbitrary text that the encoding can carry (no surrogates: they are not text)."""
    if encoding == "ascii":
        return st.text(st.characters(max_codepoint=0x7F))
    if encoding == "latin1":
        return st.text(st.characters(max_codepoint=0xFF))
    return st.text(st.characters(exclude_categories=("Cs",)))


@pytest.mark.parametrize("algorithm", SUPPORTED_ALGORITHMS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_round_trip_arbitrary_text(algorithm: str, data: st.DataObject) -> None:
    fmt = data.draw(st.sampled_from(FORMATS), label="format")
    encoding = data.draw(st.sampled_from(ENCODINGS), label="encoding")
    text = data.draw(text_for(encoding), label="text")
    spec = resolve_algorithm(algorithm)

    ciphertext = encrypt_event(text, algorithm, fmt, encoding, TEST_APP_ID)
    raw = decode_ciphertext(ciphertext, fmt) if ciphertext else b""  # "" only in stream modes
    if spec.padded:
        assert raw and len(raw) % 16 == 0
    if text:
        assert decode_plaintext(decrypt_bytes(raw, spec, TEST_APP_ID), encoding) == text

    wrapped = json.dumps({"t": text}, ensure_ascii=encoding == "ascii")
    result = decrypt_event(
        encrypt_event(wrapped, algorithm, fmt, encoding, TEST_APP_ID),
        algorithm, fmt, encoding, [OTHER_APP_ID, TEST_APP_ID],
    )
    assert result.value == {"t": text}
    assert result.text == wrapped
    assert result.app_id == TEST_APP_ID


@pytest.mark.parametrize("algorithm", SUPPORTED_ALGORITHMS)
def test_ciphertext_lengths_match_node(algorithm: str) -> None:
    """Stream modes keep the length; CBC/ECB always add 1..16 bytes of PKCS#7 padding."""
    spec = resolve_algorithm(algorithm)
    for size in (1, 15, 16, 17, 300):
        raw = bytes.fromhex(encrypt_event("x" * size, algorithm, "hex", "utf8", TEST_APP_ID))
        assert len(raw) == ((size // 16 + 1) * 16 if spec.padded else size)


def test_base64url_output_has_no_padding_and_base64_has() -> None:
    text = '{"a":1}'  # 7 bytes: padded to 16 → 16 % 3 == 1 → base64 needs "=="
    b64 = encrypt_event(text, "aes-128-cbc", "base64", "utf8", TEST_APP_ID)
    b64url = encrypt_event(text, "aes-128-cbc", "base64url", "utf8", TEST_APP_ID)
    assert b64.endswith("==")
    assert "=" not in b64url
    assert b64url == b64.rstrip("=").replace("+", "-").replace("/", "_")


# --------------------------------------------------------------------------- openssl


OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl binary not installed")
OPENSSL_CIPHERS = [
    name for name in SUPPORTED_ALGORITHMS
    if name.startswith("aes-256-") or name in ("aes-128-cbc", "aes-192-ctr", "aes-128-ecb")
]


def openssl_enc(direction: str, algorithm: str, app_id: str, data: bytes) -> bytes:
    """Run `openssl enc` with the legacy password derivation createCipher uses."""
    assert OPENSSL is not None
    completed = subprocess.run(
        [OPENSSL, "enc", direction, f"-{algorithm}", "-md", "md5", "-nosalt",
         "-pass", f"pass:{app_id}"],
        input=data, capture_output=True, check=True, timeout=30,
    )
    return completed.stdout


@needs_openssl
@pytest.mark.parametrize("algorithm", OPENSSL_CIPHERS)
def test_openssl_decrypts_what_we_encrypt(algorithm: str) -> None:
    text = json.dumps(EVENT | {"note": "héllo ✓ " * 7})
    raw = decode_ciphertext(encrypt_event(text, algorithm, "hex", "utf8", TEST_APP_ID), "hex")
    assert openssl_enc("-d", algorithm, TEST_APP_ID, raw).decode("utf-8") == text


@needs_openssl
@pytest.mark.parametrize("algorithm", OPENSSL_CIPHERS)
def test_we_decrypt_what_openssl_encrypts(algorithm: str) -> None:
    text = json.dumps(EVENT | {"note": "Ünïcode " * 5})
    raw = openssl_enc("-e", algorithm, OTHER_APP_ID, text.encode("utf-8"))
    result = decrypt_event(
        base64.b64encode(raw).decode(), algorithm, "base64", "utf8",
        [TEST_APP_ID, OTHER_APP_ID],
    )
    assert result.text == text
    assert result.app_id == OTHER_APP_ID


@needs_openssl
def test_openssl_decrypts_the_corpus() -> None:
    """The operator's manual check from WIRE.md works on a real captured request."""
    request = json.loads((CORPUS / "edge" / "e01_uppercase_hex.json").read_text())["request"]
    data, algorithm, fmt, _ = crypto_args(request)
    plain = openssl_enc("-d", algorithm.lower(), TEST_APP_ID, decode_ciphertext(data, fmt))
    assert json.loads(plain)["state"] == "connected"


# --------------------------------------------------------------------------- app id choice


def test_several_app_ids_are_tried_in_order() -> None:
    ciphertext = encrypt_event(json.dumps(EVENT), "aes-256-cbc", "hex", "utf8", TEST_APP_ID)
    result = decrypt_event(
        ciphertext, "aes-256-cbc", "hex", "utf8", [OTHER_APP_ID, THIRD_APP_ID, TEST_APP_ID]
    )
    assert result.app_id == TEST_APP_ID
    assert result.value == EVENT
    first = decrypt_event(ciphertext, "aes-256-cbc", "hex", "utf8", [TEST_APP_ID, OTHER_APP_ID])
    assert first.app_id == TEST_APP_ID


@pytest.mark.parametrize("algorithm", ["aes-256-ctr", "aes-128-ofb", "aes-192-cfb8", "aes-128-ecb"])
def test_wrong_first_app_id_that_decrypts_to_garbage_is_skipped(algorithm: str) -> None:
    """In stream modes a wrong key 'decrypts' without error; only strict parsing rejects it."""
    if algorithm not in SUPPORTED_ALGORITHMS:
        pytest.skip(f"{algorithm} not available in this cryptography")
    ciphertext = encrypt_event(json.dumps(EVENT), algorithm, "hex", "utf8", TEST_APP_ID)
    spec = resolve_algorithm(algorithm)
    if not spec.padded:  # the wrong key really does produce bytes, not an error
        assert decrypt_bytes(bytes.fromhex(ciphertext), spec, OTHER_APP_ID)
    result = decrypt_event(ciphertext, algorithm, "hex", "utf8", [OTHER_APP_ID, TEST_APP_ID])
    assert result.app_id == TEST_APP_ID
    assert result.value == EVENT


def test_when_no_app_id_works_the_first_ones_error_is_raised() -> None:
    # Valid under TEST_APP_ID but not JSON: bad_plaintext there, bad padding elsewhere.
    ciphertext = encrypt_event("not json", "aes-256-cbc", "hex", "utf8", TEST_APP_ID)
    assert error_of(
        decrypt_event, ciphertext, "aes-256-cbc", "hex", "utf8", [OTHER_APP_ID]
    ).code == "bad_decrypt"
    args = (ciphertext, "aes-256-cbc", "hex", "utf8")
    assert error_of(decrypt_event, *args, [TEST_APP_ID, OTHER_APP_ID]).code == "bad_plaintext"
    assert error_of(decrypt_event, *args, [OTHER_APP_ID, TEST_APP_ID]).code == "bad_decrypt"


def test_no_app_ids_is_bad_decrypt() -> None:
    err = error_of(decrypt_event, VECTOR_CT, "aes-256-cbc", "hex", "utf8", [])
    assert (err.code, err.detail) == ("bad_decrypt", "no app id configured")


def test_names_are_validated_before_the_ciphertext() -> None:
    assert error_of(decrypt_event, "zz", "md5", "nope", "nope", [TEST_APP_ID]).code == (
        "unknown_algorithm"
    )
    assert error_of(decrypt_event, "zz", "aes-256-gcm", "hex", "utf8", []).code == (
        "unsupported_algorithm"
    )
    assert error_of(decrypt_event, "zz", "aes256", "base32", "utf8", []).code == "bad_encoding"
    assert error_of(decrypt_event, "zz", "aes256", "hex", "utf32", []).code == "bad_encoding"
    assert error_of(decrypt_event, "zzz", "aes256", "hex", "utf8", []).code == "bad_ciphertext"


def test_error_details_never_reveal_app_id_or_key() -> None:
    secret = "s3cr3t-app-id-0123456789"
    key, iv = derive_key_iv(secret, 32, 16)
    good = encrypt_event(json.dumps(EVENT), "aes-256-ctr", "hex", "utf8", TEST_APP_ID)
    attempts = [
        (VECTOR_CT, "aes-256-cbc", "hex", "utf8"),  # bad padding
        (good, "aes-256-ctr", "hex", "utf8"),  # decrypts to garbage under the secret
        (VECTOR_CT[:-32], "aes-256-cbc", "hex", "utf8"),
        (encrypt_event("[1, NaN]", "aes-256-cbc", "hex", "utf8", secret),
         "aes-256-cbc", "hex", "utf8"),
        (encrypt_event("ÿ", "aes-256-cbc", "hex", "latin1", secret),
         "aes-256-cbc", "hex", "ascii"),
        ("abc", "aes-256-cbc", "hex", "utf8"),
        ("abc", secret, "hex", "utf8"),
    ]
    for args in attempts:
        err = error_of(decrypt_event, *args, [secret, OTHER_APP_ID])
        for text in (err.detail, str(err)):
            assert secret not in text
            assert key.hex() not in text.lower() and iv.hex() not in text.lower()


# --------------------------------------------------------------------------- strict JSON


@pytest.mark.parametrize(
    "text",
    [
        '\ufeff{"a":1}', '{"a":NaN}', '{"a":Infinity}', '{"a":-Infinity}', "NaN",
        '{"a":1} x', '{"a":1}{}', "{'a':1}", '{"a":1,}', "", " ", '{"a":1e999}',
        '{"a":"\\ud800"}', '{"a":"tab\there"}', "[01]", '{"a":.5}', "\x00",
    ],
)
def test_strict_json_rejects_what_javascript_rejects(text: str) -> None:
    assert error_of(parse_strict_json, text).code == "bad_plaintext"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('{"a":1}', {"a": 1}), (" \r\n\t[1, 2.5, null]\n", [1, 2.5, None]), ('"x"', "x"),
        ("-0", 0), ('{"e":"\\ud83d\\ude00"}', {"e": "\U0001f600"}), ('{"a":1,"a":2}', {"a": 2}),
    ],
)
def test_strict_json_accepts_valid_json(text: str, value: object) -> None:
    assert parse_strict_json(text) == value


def test_decrypt_event_rejects_bom_and_nan_plaintext() -> None:
    for plain in ('\ufeff{"a":1}', '{"a":NaN}', '{"a":Infinity}', "{}garbage"):
        ciphertext = encrypt_event(plain, "aes-256-cbc", "hex", "utf8", TEST_APP_ID)
        err = error_of(decrypt_event, ciphertext, "aes-256-cbc", "hex", "utf8", [TEST_APP_ID])
        assert err.code == "bad_plaintext"


def test_decrypt_event_returns_non_objects_for_the_caller_to_judge() -> None:
    ciphertext = encrypt_event("[1,2]", "aes-128-cbc", "hex", "utf8", TEST_APP_ID)
    assert decrypt_event(ciphertext, "aes-128-cbc", "hex", "utf8", [TEST_APP_ID]).value == [1, 2]


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("aes-256-cbc", "aes-256-cbc"), ("AES-256-CBC", "aes-256-cbc"), ("aes256", "aes-256-cbc"),
        ("AES192", "aes-192-cbc"), ("aes128", "aes-128-cbc"), ("Aes-128-Ctr", "aes-128-ctr"),
        ("aes-192-ecb", "aes-192-ecb"),
    ],
)
def test_resolve_algorithm_names_and_aliases(name: str, canonical: str) -> None:
    spec = resolve_algorithm(name)
    assert spec.name == canonical
    assert spec is resolve_algorithm(canonical)  # one cached spec per cipher


def test_cipher_specs() -> None:
    assert resolve_algorithm("aes-256-cbc") == CipherSpec("aes-256-cbc", 32, 16, "cbc", True)
    assert resolve_algorithm("aes-192-ecb") == CipherSpec("aes-192-ecb", 24, 0, "ecb", True)
    assert resolve_algorithm("aes-128-ctr") == CipherSpec("aes-128-ctr", 16, 16, "ctr", False)
    for name in ("aes-256-cfb", "aes-256-cfb8", "aes-256-ofb"):
        if name in SUPPORTED_ALGORITHMS:
            spec = resolve_algorithm(name)
            assert (spec.key_len, spec.iv_len, spec.padded) == (32, 16, False)


@pytest.mark.parametrize(
    "name",
    [
        "aes-256-gcm", "AES-128-GCM", "aes-192-ccm", "aes-128-ocb", "chacha20-poly1305",
        "id-aes256-wrap", "aes128-wrap", "aes-256-xts", "aes-128-cfb1", "camellia-256-cbc",
        "des-ede3-cbc", "bf-cbc",
    ],
)
def test_real_ciphers_this_scheme_cannot_carry_are_unsupported(name: str) -> None:
    assert error_of(resolve_algorithm, name).code == "unsupported_algorithm"


@pytest.mark.parametrize(
    "name", ["md5", "rot13", "aes-256-cbcx", "", "aes", "aes-512-cbc", "sha256", "aes-256-cbc\0"]
)
def test_non_ciphers_are_unknown(name: str) -> None:
    assert error_of(resolve_algorithm, name).code == "unknown_algorithm"


@pytest.mark.parametrize(
    ("value", "canonical"),
    [
        ("hex", "hex"), ("HEX", "hex"), ("base64", "base64"), ("Base64URL", "base64url"),
        ("latin1", "latin1"), ("binary", "latin1"), ("BINARY", "latin1"),
    ],
)
def test_normalise_format(value: str, canonical: str) -> None:
    assert normalise_format(value) == canonical


@pytest.mark.parametrize(
    ("value", "canonical"),
    [
        ("utf8", "utf8"), ("UTF-8", "utf8"), ("ucs2", "utf16le"), ("UCS-2", "utf16le"),
        ("utf16le", "utf16le"), ("utf-16le", "utf16le"), ("ascii", "ascii"),
        ("latin1", "latin1"), ("binary", "latin1"),
    ],
)
def test_normalise_encoding(value: str, canonical: str) -> None:
    assert normalise_encoding(value) == canonical


@pytest.mark.parametrize("value", ["", "utf8", "base32", "hex64", "utf-16", "base-64"])
def test_unknown_format_is_bad_encoding(value: str) -> None:
    assert error_of(normalise_format, value).code == "bad_encoding"


@pytest.mark.parametrize("value", ["", "hex", "base64", "utf16", "utf-32", "cp1252"])
def test_unknown_encoding_is_bad_encoding(value: str) -> None:
    assert error_of(normalise_encoding, value).code == "bad_encoding"


# --------------------------------------------------------------------------- ciphertext text


@pytest.mark.parametrize(
    ("text", "fmt", "raw"),
    [
        ("00ff10", "hex", b"\x00\xff\x10"),
        ("00FF10", "hex", b"\x00\xff\x10"),
        ("AP8Q", "base64", b"\x00\xff\x10"),
        ("AP8Q", "base64url", b"\x00\xff\x10"),
        ("+/8=", "base64", b"\xfb\xff"),
        ("-_8", "base64", b"\xfb\xff"),  # URL alphabet and missing padding under base64
        ("+/8", "base64url", b"\xfb\xff"),  # standard alphabet under base64url
        (" AP\n8Q\t", "base64", b"\x00\xff\x10"),
        ("AP8Q\r\n", "base64url", b"\x00\xff\x10"),
        ("QQ", "base64", b"A"),
        ("QQ==", "base64", b"A"),
        ("\x00\xff\x10", "latin1", b"\x00\xff\x10"),
        ("\xe9", "binary", b"\xe9"),
    ],
)
def test_decode_ciphertext(text: str, fmt: str, raw: bytes) -> None:
    assert decode_ciphertext(text, fmt) == raw


@pytest.mark.parametrize(
    ("text", "fmt"),
    [
        ("", "hex"), ("abc", "hex"), ("zz", "hex"), ("ab cd ", "hex"), ("ab  cd", "hex"),
        ("é0", "hex"), ("", "base64"), ("   ", "base64"), ("==", "base64"),
        ("not*base64!", "base64"), ("QQ=Q", "base64"), ("A", "base64"), ("QUJDR", "base64url"),
        ("Ā", "latin1"), ("ok€", "latin1"), ("", "latin1"),
    ],
)
def test_decode_ciphertext_rejects(text: str, fmt: str) -> None:
    assert error_of(decode_ciphertext, text, fmt).code == "bad_ciphertext"


def test_decrypt_bytes_rejects_bad_block_lengths_and_padding() -> None:
    spec = resolve_algorithm("aes-256-cbc")
    raw = bytes.fromhex(VECTOR_CT)
    assert decrypt_bytes(raw, spec, VECTOR_APP_ID) == VECTOR_PLAIN.encode()
    for broken in (raw[:-1], raw[:-16], raw + b"\x00", raw[:-1] + bytes([raw[-1] ^ 1])):
        assert error_of(decrypt_bytes, broken, spec, VECTOR_APP_ID).code == "bad_decrypt"
    assert error_of(decrypt_bytes, raw, spec, OTHER_APP_ID).code == "bad_decrypt"
    ecb = resolve_algorithm("aes-128-ecb")
    assert error_of(decrypt_bytes, b"\x00" * 15, ecb, VECTOR_APP_ID).code == "bad_decrypt"


def test_stream_modes_take_any_length() -> None:
    spec = resolve_algorithm("aes-128-ctr")
    full = bytes.fromhex(encrypt_event("0123456789", "aes-128-ctr", "hex", "utf8", TEST_APP_ID))
    assert decrypt_bytes(full[:3], spec, TEST_APP_ID) == b"012"


# --------------------------------------------------------------------------- plaintext text


@pytest.mark.parametrize(
    ("data", "encoding", "text"),
    [
        ("é✓".encode(), "utf8", "é✓"), ("é✓".encode("utf-16-le"), "ucs2", "é✓"),
        (b"abc", "ascii", "abc"), (b"\xe9\xff", "latin1", "\xe9\xff"),
        (b"\xef\xbb\xbf{}", "utf8", "\ufeff{}"),  # the BOM is kept for the JSON check to refuse
    ],
)
def test_decode_plaintext(data: bytes, encoding: str, text: str) -> None:
    assert decode_plaintext(data, encoding) == text


@pytest.mark.parametrize(
    ("data", "encoding"),
    [
        (b"\xff{}", "utf8"), (b"\xc3", "utf8"), (b"\xed\xa0\x80", "utf8"),
        (b"{\x00}", "utf16le"), (b"\x00\xd8", "utf16le"), (b"caf\xe9", "ascii"),
    ],
)
def test_decode_plaintext_rejects(data: bytes, encoding: str) -> None:
    assert error_of(decode_plaintext, data, encoding).code == "bad_plaintext"


def test_encrypt_refuses_text_the_encoding_cannot_carry() -> None:
    assert error_of(encrypt_event, "é", "aes256", "hex", "ascii", TEST_APP_ID).code == (
        "bad_plaintext"
    )
    assert error_of(encrypt_event, "€", "aes256", "hex", "latin1", TEST_APP_ID).code == (
        "bad_plaintext"
    )


# --------------------------------------------------------------------------- labels


def test_app_id_label() -> None:
    label = app_id_label(TEST_APP_ID)
    assert label.startswith("app-") and len(label) == 12
    int(label[4:], 16)
    assert TEST_APP_ID not in label
    assert label == app_id_label(TEST_APP_ID)
    assert label != app_id_label(OTHER_APP_ID)
    digest = hashlib.sha256(VECTOR_APP_ID.encode()).hexdigest()
    assert app_id_label(VECTOR_APP_ID) == "app-" + digest[:8]
