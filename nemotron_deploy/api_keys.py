"""The endpoint's API keys file: one `NAME <sha256 hex of the key>` per line, on the operator's machine.

`nemotron-deploy api-key new NAME --file KEYS` makes a key (printed once, stored nowhere) and appends
its hash; `endpoint_api_keys_file` names the file; the deploy installs the hashes as HAProxy's map,
which looks a request's key up by hashing its bearer token (haproxy.cfg.j2). The file holds no secret:
a key is 256 random bits, so its unsalted SHA-256 cannot be searched back to it (this is not a
password hash, and need not be one). Lines starting with `#` and blank lines are comments.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

PREFIX = "nmt-"
KEY_BYTES = 32  # 256 bits: secrets.token_urlsafe(32) is 43 characters
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HASH = re.compile(r"^[0-9a-f]{64}$")
# The hash HAProxy computes for a request without a bearer token (sha2(256) of nothing): never a key.
EMPTY_HASH = hashlib.sha256(b"").hexdigest()
HEADER = (
    "# nemotron-deploy API keys: NAME <sha256 hex of the key>, one per line. No secret is stored here.\n"
    "# Add one: nemotron-deploy api-key new NAME --file THIS_FILE; remove one: delete its line, re-deploy.\n"
)
NEW_KEY_HINT = "nemotron-deploy api-key new NAME --file FILE"


class KeysFileError(ValueError):
    """What is wrong with the file, where, and what to change."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return PREFIX + secrets.token_urlsafe(KEY_BYTES)


def check_name(name: str) -> None:
    if not NAME.match(name):
        raise KeysFileError(
            f"{name!r} is not a plain name: use 1 to 64 letters, digits, '.', '_' or '-', starting with "
            "a letter or digit (it names the key in the endpoint's logs and limits), e.g. team-a"
        )


def parse(text: str, where: str) -> list[ApiKey]:
    """Every key of a keys file's text; KeysFileError naming the line and the fix."""
    keys: list[ApiKey] = []
    seen: dict[str, int] = {}
    hashes: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        at = f"{where} line {number}"
        if len(fields) != 2:
            raise KeysFileError(
                f"{at}: expected `NAME <sha256 hex>` (two fields), got {len(fields)}; fix or delete the "
                f"line and add keys with `{NEW_KEY_HINT}`"
            )
        name, sha = fields
        try:
            check_name(name)
        except KeysFileError as exc:
            raise KeysFileError(f"{at}: {exc}") from None
        if not HASH.match(sha):
            raise KeysFileError(
                f"{at}: {name}'s hash is not 64 lowercase hex digits (a SHA-256): the file holds hashes, "
                f"never keys; delete the line and make the key again with `{NEW_KEY_HINT}`"
            )
        if sha == EMPTY_HASH:
            raise KeysFileError(f"{at}: {name}'s hash is the SHA-256 of an empty key; delete the line")
        if name in seen:
            raise KeysFileError(
                f"{at}: the name {name} is already on line {seen[name]}: names must be unique; rename "
                "or delete one"
            )
        if sha in hashes:
            raise KeysFileError(f"{at}: {name} has the same key as line {hashes[sha]}; delete one")
        seen[name], hashes[sha] = number, number
        keys.append(ApiKey(name, sha))
    return keys


def read(path: Path) -> list[ApiKey]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeysFileError(
            f"{path} does not exist: make it, with its first key, with `nemotron-deploy api-key new NAME "
            f"--file {path}`"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"{path} cannot be read ({exc}); fix its permissions or its contents") from None
    return parse(text, str(path))


def add(path: Path, name: str) -> str:
    """A new key for `name`, its hash appended to `path` (created 0600 if missing); the key itself is
    returned for the caller to print once."""
    check_name(name)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if any(k.name == name for k in (read(path) if text else [])):
        raise KeysFileError(
            f"{path} already has a key named {name}: pick another name, or delete its line first to "
            "replace it"
        )
    key = new_key()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as out:
        if not text:
            out.write(HEADER)
        elif not text.endswith("\n"):
            out.write("\n")
        out.write(f"{name} {digest(key)}\n")
    return key


def haproxy_map(keys: list[ApiKey]) -> str:
    """HAProxy's map: `<sha256 hex> <name>` (looked up by the hashed bearer token)."""
    lines = ["# Generated by nemotron-deploy from endpoint_api_keys_file: sha256(key) name."]
    lines += [f"{k.sha256} {k.name}" for k in keys]
    return "\n".join(lines) + "\n"
