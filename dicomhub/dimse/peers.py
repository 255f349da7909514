"""Known DIMSE peers (``DICOMHUB_DIMSE_PEERS``) and who a calling AE title is: its partition and allowed operations."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dicomhub.config import DEFAULT_PARTITION, Settings

OPERATIONS = frozenset({"echo", "store", "find", "move", "get", "commit"})
# Callers accepted without being known have no address to send to: no move destination, no commitment report
ANY_CALLER_OPERATIONS = frozenset({"echo", "store", "find", "move", "get"})


class PeerConfigurationError(ValueError):
    """The peers file cannot be used; the listener must not start."""


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int
    partition: str = DEFAULT_PARTITION
    operations: frozenset[str] = OPERATIONS


@dataclass(frozen=True)
class Caller:
    """The calling side of an association: a known peer, or an accepted unknown AE title."""

    ae_title: str
    partition: str
    operations: frozenset[str]
    peer: Peer | None = None


def load_peers(settings: Settings) -> dict[str, Peer]:
    """Reads and checks the peers file (none configured: no known peers)."""
    if settings.dimse_peers is None:
        return {}
    try:
        raw = json.loads(Path(settings.dimse_peers).read_text())
    except (OSError, ValueError) as exc:
        raise PeerConfigurationError(f"DICOMHUB_DIMSE_PEERS cannot be read: {exc}") from None
    if not isinstance(raw, dict):
        raise PeerConfigurationError("DICOMHUB_DIMSE_PEERS must hold one JSON object keyed by AE title.")
    return {title.strip(): _peer(title.strip(), entry, settings) for title, entry in raw.items()}


def _peer(title: str, entry: object, settings: Settings) -> Peer:
    def fail(detail: str) -> PeerConfigurationError:
        return PeerConfigurationError(f"DIMSE peer '{title}': {detail}")

    if not 1 <= len(title) <= 16 or not title.isascii() or "\\" in title:
        raise fail("an AE title has 1 to 16 ASCII characters and no backslash.")
    if not isinstance(entry, dict):
        raise fail("the entry must be an object with host, port, partition and operations.")
    unknown = set(entry) - {"host", "port", "partition", "operations"}
    if unknown:
        raise fail(f"unknown keys {sorted(unknown)}.")
    host, port = entry.get("host"), entry.get("port")
    if not isinstance(host, str) or not host:
        raise fail("'host' must be a host name or address.")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise fail("'port' must be a TCP port number.")
    partition = entry.get("partition", DEFAULT_PARTITION)
    if not isinstance(partition, str) or not partition:
        raise fail("'partition' must be a partition name.")
    if partition != DEFAULT_PARTITION and not settings.enable_partitions:
        raise fail(f"partition '{partition}' needs DICOMHUB_ENABLE_PARTITIONS=true.")
    operations = entry.get("operations", sorted(OPERATIONS))
    if not isinstance(operations, list) or not set(operations) <= OPERATIONS:
        raise fail(f"'operations' must be a list drawn from {sorted(OPERATIONS)}.")
    return Peer(title, host, port, partition, frozenset(operations))


class PeerDirectory:
    """Answers who a calling AE title is, under the association policy of the settings."""

    def __init__(self, settings: Settings) -> None:
        self.peers = load_peers(settings)
        self.accept_any = settings.dimse_accepts_any_caller

    def caller(self, ae_title: str) -> Caller | None:
        """``None``: the caller is not accepted (A-ASSOCIATE-RJ, source 1, reason 3)."""
        title = ae_title.strip()
        peer = self.peers.get(title)
        if peer is not None:
            return Caller(title, peer.partition, peer.operations, peer)
        if self.accept_any:
            return Caller(title, DEFAULT_PARTITION, ANY_CALLER_OPERATIONS)
        return None

    def destination(self, ae_title: str) -> Peer | None:
        """A C-MOVE destination: only known peers have an address."""
        return self.peers.get(ae_title.strip())
