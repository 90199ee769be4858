"""Node-compatible decryption (and the inverse) of EnableX webhook payloads.

EnableX encrypts each event with Node's legacy ``crypto.createCipher(algorithm, APP_ID)``:
key and IV come from the app id through OpenSSL's ``EVP_BytesToKey`` (MD5, one iteration,
no salt). Nothing but the ciphertext travels, so everything derived from the app id is
computed once and cached; this module sits on the hot path of every webhook.

Error details never contain an app id, a key or decrypted bytes: they end up in the
``rejections`` table and in logs. ``app_id_label`` is the only form of an app id to store.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers import modes as _modes

try:  # cryptography >= 47 moves the legacy feedback modes to "decrepit".
    from cryptography.hazmat.decrepit.ciphers import modes as _decrepit_modes  # type: ignore
except ImportError:  # pragma: no cover - depends on the installed cryptography
    _decrepit_modes = None

__all__ = [
    "SUPPORTED_ALGORITHMS",
    "CipherSpec",
    "CryptoError",
    "Decrypted",
    "app_id_label",
    "decode_ciphertext",
    "decode_plaintext",
    "decrypt_bytes",
    "decrypt_event",
    "derive_key_iv",
    "encrypt_event",
    "normalise_encoding",
    "normalise_format",
    "parse_strict_json",
    "resolve_algorithm",
]

_BLOCK = 16  # AES block size in bytes; also the largest PKCS#7 pad.


class CryptoError(Exception):
    """A decrypt-stage failure carrying the exact error code of WIRE.md §3."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class CipherSpec:
    """What the scheme needs to know about a cipher: sizes for key derivation, mode, padding."""

    name: str
    key_len: int
    iv_len: int
    mode: str
    padded: bool


@dataclass(frozen=True)
class Decrypted:
    """A decrypted event: parsed JSON value, the exact text, and which app id opened it."""

    value: object
    text: str
    app_id: str


# --------------------------------------------------------------------------- cipher names

ModeFactory = Callable[[bytes], _modes.Mode]


def _feedback_mode(name: str) -> ModeFactory | None:
    """The CFB/CFB8/OFB class wherever this cryptography keeps it, or None if gone."""
    for module in (_decrepit_modes, _modes):
        cls = getattr(module, name, None) if module is not None else None
        if cls is not None:
            return cls  # type: ignore[no-any-return]
    return None


_MODE_FACTORIES: dict[str, ModeFactory] = {
    "cbc": _modes.CBC,
    "ecb": lambda _iv: _modes.ECB(),
    "ctr": _modes.CTR,
}
for _mode_name, _cls_name in (("cfb", "CFB"), ("cfb8", "CFB8"), ("ofb", "OFB")):
    _factory = _feedback_mode(_cls_name)
    if _factory is not None:
        _MODE_FACTORIES[_mode_name] = _factory

_SIZES = (128, 192, 256)
# mode -> (iv_len, padded), as OpenSSL's EVP_CIPHER reports them.
_AES_MODES: dict[str, tuple[int, bool]] = {
    "cbc": (16, True),
    "ecb": (0, True),
    "ctr": (16, False),
    "cfb": (16, False),
    "cfb8": (16, False),
    "ofb": (16, False),
}


def _build_specs() -> dict[str, CipherSpec]:
    """Every supported lower-case name (aliases included) mapped to its one spec object."""
    specs: dict[str, CipherSpec] = {}
    for bits in _SIZES:
        for mode, (iv_len, padded) in _AES_MODES.items():
            if mode not in _MODE_FACTORIES:
                continue
            name = f"aes-{bits}-{mode}"
            specs[name] = CipherSpec(name, bits // 8, iv_len, mode, padded)
        specs[f"aes{bits}"] = specs[f"aes-{bits}-cbc"]
    return specs


_SPECS = _build_specs()
SUPPORTED_ALGORITHMS: tuple[str, ...] = tuple(n for n, s in _SPECS.items() if n == s.name)


def _known_unsupported() -> frozenset[str]:
    """Real OpenSSL/Node cipher names that this scheme cannot carry or that we do not decrypt.

    AEAD modes need a tag that never travels, wrap modes and XTS are not for messages, and
    the non-AES families are never sent by EnableX. They answer unsupported_algorithm so an
    operator can tell "wrong cipher" from "typo" (unknown_algorithm).
    """
    names: set[str] = {"chacha20", "chacha20-poly1305", "id-smime-alg-cms3deswrap"}
    for bits in _SIZES:
        for suffix in (
            "gcm", "ccm", "ocb", "siv", "gcm-siv", "cfb1", "cfb", "cfb8", "ofb",
            "wrap", "wrap-pad", "wrap-inv", "wrap-pad-inv",
            "cbc-hmac-sha1", "cbc-hmac-sha256", "cbc-cts",
        ):
            names.add(f"aes-{bits}-{suffix}")
        names.update({f"aes{bits}-wrap", f"aes{bits}-wrap-pad"})
        names.update(f"id-aes{bits}-{s}" for s in ("wrap", "wrap-pad", "gcm", "ccm"))
        for family in ("aria", "camellia"):
            names.add(f"{family}{bits}")
            names.update(
                f"{family}-{bits}-{m}"
                for m in ("cbc", "cfb", "cfb1", "cfb8", "ctr", "ecb", "ofb", "gcm", "ccm")
            )
    names.update({"aes-128-xts", "aes-256-xts"})
    feedback = ("cbc", "cfb", "ecb", "ofb")
    for family in ("bf", "cast5", "idea", "rc2", "seed", "sm4"):
        names.add(family)
        names.update(f"{family}-{m}" for m in feedback)
    names.update({"blowfish", "cast", "cast-cbc", "sm4-ctr", "rc2-40-cbc", "rc2-64-cbc",
                  "rc2-128", "rc4", "rc4-40", "rc4-hmac-md5", "desx", "desx-cbc", "des3",
                  "des3-wrap", "des-ede3-cfb1", "des-ede3-cfb8", "des-cfb1", "des-cfb8"})
    for family in ("des", "des-ede", "des-ede3"):
        names.add(family)
        names.update(f"{family}-{m}" for m in feedback)
    return frozenset(names - set(_SPECS))


_UNSUPPORTED = _known_unsupported()


def resolve_algorithm(name: str) -> CipherSpec:
    """The spec for a header's cipher name; specs are prebuilt so this is a dict lookup."""
    spec = _SPECS.get(name)
    if spec is not None:
        return spec
    lowered = name.strip().lower() if isinstance(name, str) else ""
    spec = _SPECS.get(lowered)
    if spec is not None:
        return spec
    if lowered in _UNSUPPORTED:
        raise CryptoError("unsupported_algorithm", f"{lowered} cannot be used with this scheme")
    # The name is not echoed: it is caller-controlled and the request is kept anyway.
    raise CryptoError("unknown_algorithm", "not a known cipher name")


# --------------------------------------------------------------------------- encodings

_FORMATS = {
    "hex": "hex",
    "base64": "base64",
    "base64url": "base64url",
    "latin1": "latin1",
    "binary": "latin1",
}
_ENCODINGS = {
    "utf8": "utf8",
    "utf-8": "utf8",
    "utf16le": "utf16le",
    "utf-16le": "utf16le",
    "ucs2": "utf16le",
    "ucs-2": "utf16le",
    "ascii": "ascii",
    "latin1": "latin1",
    "binary": "latin1",
}
_PY_CODECS = {"utf8": "utf-8", "utf16le": "utf-16-le", "ascii": "ascii", "latin1": "latin-1"}


def _lookup(table: dict[str, str], value: str, what: str) -> str:
    """Case-insensitive table lookup raising bad_encoding for anything unknown."""
    found = table.get(value)
    if found is None and isinstance(value, str):
        found = table.get(value.strip().lower())
    if found is None:
        raise CryptoError("bad_encoding", f"unknown {what}")
    return found


def normalise_format(fmt: str) -> str:
    """Canonical name of an x-format value (how the ciphertext string is written)."""
    return _lookup(_FORMATS, fmt, "ciphertext format")


def normalise_encoding(enc: str) -> str:
    """Canonical name of an x-encoding value (how the plaintext bytes are written)."""
    return _lookup(_ENCODINGS, enc, "plaintext encoding")


# --------------------------------------------------------------------------- key derivation


@functools.lru_cache(maxsize=1024)
def derive_key_iv(app_id: str, key_len: int, iv_len: int) -> tuple[bytes, bytes]:
    """OpenSSL EVP_BytesToKey(MD5, no salt, 1 round): what createCipher derives from a password."""
    password = app_id.encode("utf-8")
    material = b""
    block = b""
    while len(material) < key_len + iv_len:
        block = hashlib.md5(block + password).digest()
        material += block
    return material[:key_len], material[key_len : key_len + iv_len]


@functools.lru_cache(maxsize=1024)
def _cipher(app_id: str, spec: CipherSpec) -> Cipher[_modes.Mode]:
    """A reusable Cipher per (app id, spec): building AES and the mode costs more than using it."""
    factory = _MODE_FACTORIES.get(spec.mode)
    if factory is None:
        raise CryptoError("unsupported_algorithm", f"mode {spec.mode!r} is not available")
    key, iv = derive_key_iv(app_id, spec.key_len, spec.iv_len)
    return Cipher(algorithms.AES(key), factory(iv))


# --------------------------------------------------------------------------- ciphertext

# Like Node: whitespace is dropped and either alphabet is read under either format name.
_B64_OK = re.compile(r"[A-Za-z0-9+/_-]*")
_WHITESPACE = re.compile(r"[ \t\n\r\f\v]+")
_URL_TO_STD = bytes.maketrans(b"-_", b"+/")


def _decode_ciphertext(text: str, fmt: str) -> bytes:
    """decode_ciphertext for an already normalised format (the hot path skips the lookup)."""
    if fmt == "hex":
        if len(text) % 2:
            raise CryptoError("bad_ciphertext", "hex ciphertext has an odd length")
        try:
            data = bytes.fromhex(text)
        except ValueError:
            raise CryptoError("bad_ciphertext", "ciphertext is not hex") from None
        # fromhex skips whitespace between pairs; the length check refuses that too.
        if len(data) * 2 != len(text):
            raise CryptoError("bad_ciphertext", "ciphertext is not hex")
    elif fmt in ("base64", "base64url"):
        data = _decode_base64(text)
    elif fmt == "latin1":
        try:
            data = text.encode("latin-1")
        except UnicodeEncodeError:
            raise CryptoError("bad_ciphertext", "ciphertext has characters above U+00FF") from None
    else:
        raise CryptoError("bad_encoding", "unknown ciphertext format")
    if not data:
        raise CryptoError("bad_ciphertext", "ciphertext is empty")
    return data


def _decode_base64(text: str) -> bytes:
    """Tolerant base64/base64url decoding that still refuses characters outside both alphabets.

    The common case (no whitespace, canonical padding or none) is one strict C-level decode;
    Python's non-strict decoder would silently skip invalid characters instead of refusing.
    """
    if text.isascii():
        raw = text.encode("ascii").translate(_URL_TO_STD)
        try:
            return binascii.a2b_base64(raw + b"=" * (-len(raw) % 4), strict_mode=True)
        except binascii.Error:
            pass  # whitespace, odd padding or garbage: sorted out below
    body = text.rstrip("=")
    if not _B64_OK.fullmatch(body):
        body = _WHITESPACE.sub("", text).rstrip("=")
        if not _B64_OK.fullmatch(body):
            raise CryptoError("bad_ciphertext", "ciphertext is not base64")
    if len(body) % 4 == 1:
        raise CryptoError("bad_ciphertext", "ciphertext is not base64 (truncated)")
    raw = body.encode("ascii")
    if b"-" in raw or b"_" in raw:
        raw = raw.translate(_URL_TO_STD)
    try:
        return binascii.a2b_base64(raw + b"=" * (-len(raw) % 4))
    except binascii.Error:
        raise CryptoError("bad_ciphertext", "ciphertext is not base64") from None


def decode_ciphertext(text: str, fmt: str) -> bytes:
    """The raw ciphertext bytes of the encrypted_data string, written in x-format `fmt`."""
    if not isinstance(text, str):
        raise CryptoError("bad_ciphertext", "ciphertext is not a string")
    return _decode_ciphertext(text, normalise_format(fmt))


def _encode_ciphertext(data: bytes, fmt: str) -> str:
    """Write ciphertext bytes the way Node's cipher.update(..., fmt) + final(fmt) does."""
    if fmt == "hex":
        return data.hex()
    if fmt == "base64":
        return base64.b64encode(data).decode("ascii")
    if fmt == "base64url":
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
    return data.decode("latin-1")


# --------------------------------------------------------------------------- decrypt / encrypt

_PADS = tuple(bytes((n,)) * n for n in range(_BLOCK + 1))


def decrypt_bytes(data: bytes, spec: CipherSpec, app_id: str) -> bytes:
    """Decrypt (and unpad, for CBC/ECB) like Node's createDecipher(spec.name, app_id)."""
    if spec.padded and (not data or len(data) % _BLOCK):
        raise CryptoError("bad_decrypt", "ciphertext length is not a whole number of blocks")
    decryptor = _cipher(app_id, spec).decryptor()
    plain = decryptor.update(data) + decryptor.finalize()
    if not spec.padded:
        return plain
    pad = plain[-1]
    # compare_digest: the pad check should not leak where it failed.
    if not 0 < pad <= _BLOCK or not hmac.compare_digest(plain[-pad:], _PADS[pad]):
        raise CryptoError("bad_decrypt", "bad padding (wrong app id or damaged ciphertext)")
    return plain[:-pad]


def _encrypt_bytes(plain: bytes, spec: CipherSpec, app_id: str) -> bytes:
    """Encrypt (PKCS#7-padding CBC/ECB) like Node's createCipher(spec.name, app_id)."""
    if spec.padded:
        pad = _BLOCK - len(plain) % _BLOCK
        plain += _PADS[pad]
    encryptor = _cipher(app_id, spec).encryptor()
    return encryptor.update(plain) + encryptor.finalize()


def _decode_plaintext(data: bytes, encoding: str) -> str:
    """decode_plaintext for an already normalised encoding."""
    try:
        return data.decode(_PY_CODECS[encoding])
    except UnicodeDecodeError:
        raise CryptoError("bad_plaintext", f"plaintext is not valid {encoding}") from None


def decode_plaintext(data: bytes, encoding: str) -> str:
    """Decrypted bytes as text; strict, so garbage from a wrong key is refused, not replaced."""
    return _decode_plaintext(data, normalise_encoding(encoding))


# --------------------------------------------------------------------------- strict JSON


# Deeper than this is no EnableX event (theirs nest three levels), and orjson, which
# stores and re-reads every event, refuses to write more than 255 levels.
MAX_JSON_DEPTH = 64
INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # what SQLite (and orjson) can store


class _Unstorable(ValueError):
    """Valid JSON that the log could not store back as it came (its message is ours)."""


def _reject_constant(name: str) -> object:
    """parse_constant hook: JavaScript's JSON.parse has no NaN/Infinity literals."""
    raise _Unstorable(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    """parse_float hook: refuse numbers that overflow to infinity (they could not be stored
    back as valid JSON)."""
    value = float(text)
    if not math.isfinite(value):
        raise _Unstorable("number out of range")
    return value


def _int64(text: str) -> int:
    """parse_int hook: refuse integers beyond a signed 64-bit one: orjson cannot write those
    past 64 bits and SQLite none past 63, so the event would be accepted, then fail to be
    sealed or projected."""
    value = int(text)
    if not INT_MIN <= value <= INT_MAX:
        raise _Unstorable("integer beyond 64 bits")
    return value


def _deeper_than(value: object, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` levels."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


_DECODER = json.JSONDecoder(
    parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_int64
)


def _has_lone_surrogate(value: object) -> bool:
    """True if any string in the value holds an unpaired surrogate (from a \\udXXX escape)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def parse_strict_json(text: str) -> object:
    """Parse like JavaScript's JSON.parse: no BOM, NaN, Infinity or trailing data.

    Also refused: what could not be stored back as valid UTF-8 JSON: numbers overflowing
    to infinity, integers beyond signed 64 bits, escaped lone surrogates, nesting deeper than
    MAX_JSON_DEPTH.
    """
    try:
        # JSONDecoder.decode (not json.loads) keeps one prebuilt decoder and treats a BOM
        # as an unexpected character.
        value = _DECODER.decode(text)
    except (ValueError, RecursionError, TypeError) as exc:
        if isinstance(exc, json.JSONDecodeError):
            reason = exc.msg
        else:
            reason = str(exc) if isinstance(exc, _Unstorable) else type(exc).__name__
        raise CryptoError("bad_plaintext", f"plaintext is not strict JSON ({reason})") from None
    if "\\u" in text and _has_lone_surrogate(value):
        raise CryptoError("bad_plaintext", "plaintext JSON has an unpaired surrogate escape")
    # Counting brackets is cheap and spares every ordinary event the walk.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _deeper_than(value, MAX_JSON_DEPTH):
        raise CryptoError(
            "bad_plaintext", f"plaintext JSON nests deeper than {MAX_JSON_DEPTH} levels"
        )
    return value


# --------------------------------------------------------------------------- events


def _open(data: bytes, spec: CipherSpec, encoding: str, app_id: str) -> Decrypted:
    """One app id's attempt: decrypt, decode and parse, or raise the stage's CryptoError."""
    text = _decode_plaintext(decrypt_bytes(data, spec, app_id), encoding)
    return Decrypted(parse_strict_json(text), text, app_id)


def decrypt_event(
    encrypted_data: str,
    algorithm: str,
    fmt: str,
    encoding: str,
    app_ids: Sequence[str],
) -> Decrypted:
    """Decrypt one webhook body's encrypted_data with the first app id that yields strict JSON.

    A wrong key can "decrypt" without error in CTR/CFB/OFB (and now and then pass a CBC
    padding check), so an app id only wins when the whole pipeline succeeds. When none
    does, the first app id's error is reported: it is the primary, configured one.
    """
    spec = resolve_algorithm(algorithm)
    fmt_n = normalise_format(fmt)
    enc_n = normalise_encoding(encoding)
    if not isinstance(encrypted_data, str):
        raise CryptoError("bad_ciphertext", "ciphertext is not a string")
    data = _decode_ciphertext(encrypted_data, fmt_n)
    first: CryptoError | None = None
    for app_id in app_ids:
        try:
            return _open(data, spec, enc_n, app_id)
        except CryptoError as exc:
            if first is None:
                first = exc
    if first is None:
        raise CryptoError("bad_decrypt", "no app id configured")
    raise first


def encrypt_event(plaintext: str, algorithm: str, fmt: str, encoding: str, app_id: str) -> str:
    """What Node's createCipher(algorithm, app_id) + update(text, encoding, fmt) + final(fmt)
    returns; used by the simulator and tests to produce genuine wire traffic."""
    spec = resolve_algorithm(algorithm)
    fmt_n = normalise_format(fmt)
    enc_n = normalise_encoding(encoding)
    try:
        plain = plaintext.encode(_PY_CODECS[enc_n])
    except UnicodeEncodeError:
        raise CryptoError("bad_plaintext", f"text cannot be written as {enc_n}") from None
    return _encode_ciphertext(_encrypt_bytes(plain, spec, app_id), fmt_n)


@functools.lru_cache(maxsize=256)
def app_id_label(app_id: str) -> str:
    """'app-' + 8 hex of sha256(app id): names an app id in storage and logs, unrevealed."""
    return "app-" + hashlib.sha256(app_id.encode("utf-8")).hexdigest()[:8]
