"""API keys: `--api-keys FILE`, one `KEY ROLE [TENANT]` a line; role admin (everything) or user (generate,
list). A key with a tenant sees and uses only its tenant's adapters (`tenant/name`) and the public ones
(ids without a tenant). Without a keys file the server is open: every caller is an admin without tenant."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

from adapterd.server.common.errors import AdapterdError, Forbidden, Unauthorized

ROLES = ("admin", "user")


@dataclass(frozen=True)
class Principal:
    role: str
    tenant: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def can_see(self, adapter_id: str) -> bool:
        owner, _, _ = adapter_id.rpartition("/")
        return self.tenant is None or owner in ("", self.tenant)

    def require_admin(self) -> None:
        if not self.is_admin:
            raise Forbidden("this key may generate and list, not manage adapters")

    def require_owner(self, adapter_id: str) -> None:
        """Managing an adapter needs an admin key that owns it (a tenant key: only `tenant/...` ids)."""
        self.require_admin()
        if self.tenant is not None and not adapter_id.startswith(f"{self.tenant}/"):
            raise Forbidden(f"a key of tenant {self.tenant!r} may only manage '{self.tenant}/...' adapters")


OPEN = Principal("admin")


class KeyFileError(AdapterdError):
    pass


class ApiKeys:
    def __init__(self, keys: dict[str, Principal]) -> None:
        self._keys = keys

    @classmethod
    def open(cls) -> ApiKeys:
        return cls({})

    @classmethod
    def load(cls, path: Path) -> ApiKeys:
        keys: dict[str, Principal] = {}
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) not in (2, 3) or fields[1] not in ROLES:
                raise KeyFileError(f"{path}:{number}: expected 'KEY ROLE [TENANT]' with ROLE admin or user")
            keys[fields[0]] = Principal(fields[1], fields[2] if len(fields) == 3 else None)
        if not keys:
            raise KeyFileError(f"{path}: no keys")
        return cls(keys)

    @property
    def is_open(self) -> bool:
        return not self._keys

    def authenticate(self, authorization: str | None) -> Principal:
        """`Bearer KEY` (or the bare key, as gRPC metadata often carries it) -> its principal."""
        if self.is_open:
            return OPEN
        if not authorization:
            raise Unauthorized("missing API key: send 'Authorization: Bearer KEY'")
        scheme, _, credentials = authorization.strip().partition(" ")
        token = credentials.strip() if scheme.lower() == "bearer" else authorization.strip()  # RFC 7235
        for key, principal in self._keys.items():
            if hmac.compare_digest(key.encode(), token.encode()):
                return principal
        raise Unauthorized("invalid API key")
