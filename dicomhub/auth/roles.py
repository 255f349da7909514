"""Roles and data actions (Azure's model): a caller may do what the union of its roles' data actions allows.

A role's data actions are its ``dataActions`` minus its ``notDataActions`` (``*`` means every action). Beyond
Azure, a role may list the ``partitions`` it is limited to; elsewhere it grants nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA_ACTIONS = ("read", "write", "delete", "manageExtendedQueryTags", "export")
ALL_ACTIONS = "*"
_CANONICAL = {name.lower(): name for name in (*DATA_ACTIONS, ALL_ACTIONS)}


class RolesFileError(ValueError):
    """The roles file cannot be used; the server does not start with it."""


@dataclass(frozen=True)
class Role:
    name: str
    actions: frozenset[str]
    partitions: frozenset[str] | None = None  # None: every partition, and the routes that span partitions

    def grants(self, action: str, partition: str | None) -> bool:
        if action not in self.actions:
            return False
        return self.partitions is None or (partition is not None and partition in self.partitions)


def make_role(
    name: str,
    data_actions: Iterable[str],
    not_data_actions: Iterable[str] = (),
    partitions: Iterable[str] | None = None,
) -> Role:
    def expand(actions: Iterable[str]) -> set[str]:
        found = set()
        for action in actions:
            canonical = _CANONICAL.get(str(action).lower())
            if canonical is None:
                known = ", ".join((*DATA_ACTIONS, ALL_ACTIONS))
                raise RolesFileError(f"Role '{name}' has an unknown data action '{action}' (known: {known}).")
            found.update(DATA_ACTIONS if canonical == ALL_ACTIONS else (canonical,))
        return found

    limited = None if partitions is None else frozenset(partitions)
    return Role(name, frozenset(expand(data_actions) - expand(not_data_actions)), limited)


BUILT_IN_ROLES: dict[str, Role] = {
    role.name: role
    for role in (
        make_role("globalAdmin", ["*"]),
        make_role("globalReader", ["read"]),
        make_role("globalWriter", ["*"], ["delete"]),
        make_role("DICOM Data Owner", ["*"]),
        make_role("DICOM Data Reader", ["read"]),
    )
}


def load_roles(path: Path) -> dict[str, Role]:
    """Roles from a file shaped like Azure's ``roles.json``: ``{"roles": [{"name", "dataActions",
    "notDataActions", "scopes": ["/"], "partitions"?}]}``."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RolesFileError(f"The roles file '{path}' cannot be read: {exc}") from None
    entries = document.get("roles") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise RolesFileError(f"The roles file '{path}' must be an object with a 'roles' list.")
    roles: dict[str, Role] = {}
    for entry in entries:
        role = _role_entry(entry, path)
        if role.name in roles:
            raise RolesFileError(f"The roles file '{path}' defines role '{role.name}' twice.")
        roles[role.name] = role
    return roles


def _role_entry(entry: Any, path: Path) -> Role:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise RolesFileError(f"Every role in '{path}' must be an object with a 'name'.")
    name = entry["name"]
    lists = {}
    for key in ("dataActions", "notDataActions", "scopes", "partitions"):
        value = entry.get(key, [] if key != "partitions" else None)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise RolesFileError(f"'{key}' of role '{name}' must be a list of strings.")
        lists[key] = value
    if any(scope != "/" for scope in lists["scopes"]):
        raise RolesFileError(f"Role '{name}' has a scope other than '/' (the only scope there is).")
    return make_role(name, lists["dataActions"], lists["notDataActions"], lists["partitions"])


def role_names(claims: Mapping[str, Any], claim: str) -> list[str]:
    """The role names in ``claim``: a list or a single string. A claim name absent as such is read as a dotted
    path into nested objects (Keycloak's ``realm_access.roles``)."""
    value: Any = claims.get(claim)
    if value is None and "." in claim:
        value = claims
        for step in claim.split("."):
            value = value.get(step) if isinstance(value, Mapping) else None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [name for name in value if isinstance(name, str)]
    return []


def permitted(roles: Mapping[str, Role], names: Iterable[str], action: str, partition: str | None) -> bool:
    """Whether any of the caller's roles grants ``action`` in ``partition`` (None: a route spanning partitions)."""
    return any(role.grants(action, partition) for role in (roles.get(name) for name in names) if role is not None)
