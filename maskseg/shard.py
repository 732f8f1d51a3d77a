"""Deterministic shards of a run's inputs, for job arrays (``--shard K/N``).

Shard K of N takes the images whose relative path hashes to K-1 modulo N. The hash is SHA-256 of the
UTF-8 relative path (not Python's ``hash``, which is salted per process), so every array task agrees
without talking to the others, and adding or removing files never moves the ones already assigned.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace

from .errors import UsageError
from .sources import SourceScan

log = logging.getLogger(__name__)


def shard_of(rel_path: str, n: int) -> int:
    """The 1-based shard (of ``n``) that ``rel_path`` belongs to: ``int(sha256(rel_path)[:8 bytes]) % n + 1``."""
    digest = hashlib.sha256(rel_path.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % n + 1


def check_shard(shard: tuple[int, int]) -> None:
    """Raise ``UsageError`` unless ``shard`` is (K, N) with 1 <= K <= N."""
    k, n = shard
    if not 1 <= k <= n:
        raise UsageError(f"--shard {k}/{n}: K must be between 1 and N")


def shard_scan(scan: SourceScan, k: int, n: int) -> SourceScan:
    """The part of ``scan`` (images and problem inputs alike) that shard ``k`` of ``n`` takes."""
    check_shard((k, n))
    refs = scan.refs.where(shard_of(r.rel_path, n) == k for r in scan.refs)
    problems = [p for p in scan.problems if shard_of(p.rel_path, n) == k]
    log.info("shard %d/%d: %d of %d images", k, n, len(refs), len(scan.refs))
    return replace(scan, refs=refs, problems=problems)
