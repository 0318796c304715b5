"""Password hashing with argon2id (argon2-cffi).

Hashing is deliberately slow and memory-hungry (64 MiB per hash with the library's
RFC 9106 defaults), so it runs in a worker thread (the event loop keeps serving
MQTT and the live feed) and at most ``max_concurrent`` at a time: a burst of logins
must not take a Pi Zero 2 W (512 MB) out of memory.

``python -m gateway.auth.passwords`` prints a hash for the boot-partition config
(``[web] admin_password_hash``), so an installer never has to write a plaintext
password to the SD card.
"""

from __future__ import annotations

import asyncio
import getpass
import sys

from argon2 import PasswordHasher, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MIN_LENGTH = 8
MAX_LENGTH = 1024  # argon2 accepts anything; a cap stops megabyte "passwords" being hashed


class PasswordPolicyError(ValueError):
    pass


def check_policy(password: str, *, username: str | None = None) -> None:
    """Raise :class:`PasswordPolicyError` with a sentence a user can act on."""
    if len(password) < MIN_LENGTH:
        raise PasswordPolicyError(f"password must be at least {MIN_LENGTH} characters long")
    if len(password) > MAX_LENGTH:
        raise PasswordPolicyError(f"password must be at most {MAX_LENGTH} characters long")
    if username is not None and password.strip().lower() == username.strip().lower():
        raise PasswordPolicyError("password must not be the user name")


def is_argon2_hash(value: str) -> bool:
    try:
        extract_parameters(value)
    except (InvalidHashError, ValueError):
        return False
    return True


class Passwords:
    def __init__(self, hasher: PasswordHasher | None = None, *, max_concurrent: int = 2) -> None:
        self.hasher = hasher or PasswordHasher()
        self._slots = asyncio.Semaphore(max_concurrent)
        # verified against when a user does not exist, so that the answer takes as long
        # as for a real user and does not reveal which user names exist
        self._dummy_hash: str | None = None

    def hash_sync(self, password: str) -> str:
        return self.hasher.hash(password)

    async def hash(self, password: str) -> str:
        async with self._slots:
            return await asyncio.to_thread(self.hasher.hash, password)

    def _verify_sync(self, stored: str, password: str) -> tuple[bool, str | None]:
        try:
            self.hasher.verify(stored, password)
        except VerifyMismatchError:
            return False, None
        except (VerificationError, InvalidHashError):
            return False, None
        # parameters raised since the hash was made (or a cheap installer hash):
        # upgrade it now, while the plaintext is at hand
        if self.hasher.check_needs_rehash(stored):
            return True, self.hasher.hash(password)
        return True, None

    async def verify(self, stored: str | None, password: str) -> tuple[bool, str | None]:
        """Return ``(ok, new_hash)``; ``new_hash`` is set when the stored hash should be
        replaced. ``stored=None`` (unknown user) costs the same and returns False."""
        if len(password) > MAX_LENGTH:
            return False, None
        async with self._slots:
            if stored is None:
                if self._dummy_hash is None:
                    self._dummy_hash = await asyncio.to_thread(self.hasher.hash, "siteward-no-such-user")
                await asyncio.to_thread(self._verify_sync, self._dummy_hash, password)
                return False, None
            return await asyncio.to_thread(self._verify_sync, stored, password)


def main() -> int:
    first = getpass.getpass("password: ")
    try:
        check_policy(first)
    except PasswordPolicyError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    if getpass.getpass("again: ") != first:
        print("refused: the two entries differ", file=sys.stderr)
        return 1
    print(PasswordHasher().hash(first))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
