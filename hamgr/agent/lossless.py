"""Lossless mode (DESIGN.md I7) for remote roles: the mirror tag and the standby's input log.

A lossless unit's primary mirrors every input its NF port accepts to the data link
(``set_mirror``), tagged with `mirror_tag` of the unit and the primary's term. Its standby keeps
those frames in an input log on its own data link (``add_input_log``, named after the unit),
trims the log at every commit to the committed checkpoint's input cut, and after a takeover
replays what follows the restored image's cut into the restored unit, then removes the log.

The log also keeps a *shadow log* of the inputs for the NF's MAC that the bridge floods to the
standby (the NF's MAC is never a source on the fabric, since the standby releases the output
with its own). Each mirror frame drops its copy there and everything older; what is left at a
takeover are the inputs the primary never delivered (queued at its wire port, or sent during the
outage), replayed after the mirrored ones (``replay_shadow_log``).

The tag is a function of (unit, term) that both sides compute, so the standby never asks the
primary for it, and a new term's mirror (the unit taken over and re-protected) never feeds a log
kept for an older one: during a partition the deposed primary may still mirror at its own term.

Numbers: the log's sequence numbers are the primary's ingress sequence, the one its
``pause_ingress`` returns as the cut and the engine ships as ``meta["cut_seq"]``. A unit restored
elsewhere starts its ingress sequence again (the replay counts in it), which is one more reason
the tag changes with the term.
"""

from __future__ import annotations

import logging
import re
import threading
import zlib
from collections.abc import Callable

from dpdk_vhost.client import DataPlaneClient, DataPlaneError
from dpdk_vhost.protocol import InputLogStats
from shim.store import Checkpoint

__all__ = ["InputLogs", "ReplayError", "log_name", "mirror_tag", "replay_loss"]

log = logging.getLogger(__name__)

_AFTER = re.compile(r"after=(\d+)")


def mirror_tag(unit: str, term: int) -> int:
    """The mirror tag of `unit`'s inputs at `term`: crc32 of ``"<unit>/<term>"``, a u32."""
    if term < 1:
        raise ValueError(f"a term is at least 1, not {term}")
    return zlib.crc32(f"{unit}/{term}".encode())


def log_name(unit: str) -> str:
    """The standby's input log of `unit` (log and unit names share the 1-24 character rule)."""
    return unit


class ReplayError(RuntimeError):
    """A replay that did not deliver every input after the cut; the message says which are lost."""


def replay_loss(after: int, error: DataPlaneError, stats: InputLogStats | None) -> str:
    """What a failed ``replay_input_log`` after `after` lost, for the alarm and the record.

    ``log_incomplete`` delivered nothing; ``tx_timeout`` and ``no_mbuf`` delivered a prefix and
    name the seq they stopped after. Inputs the log holds beyond that are lost, and so is any
    input the old primary took that never reached the log (the mirror frames in flight when it
    died): no one can count those.
    """
    delivered_upto = after
    if error.code in ("tx_timeout", "no_mbuf"):
        m = _AFTER.search(error.message)
        if m is not None:
            delivered_upto = int(m.group(1))
    what = f"{error.code}: {error.message}"
    if stats is None:
        return f"{what}; lost: the inputs after seq {delivered_upto} (the log is gone)"
    newest = stats.last_seq
    if newest > delivered_upto:
        lost = (
            f"lost: inputs {delivered_upto + 1}..{newest}, {newest - delivered_upto} "
            f"seqs the log reaches ({stats.frames} frames held, gaps {stats.gaps} from seq "
            f"{stats.gap_seq}, overflow up to {stats.overflow_seq}, trimmed up to "
            f"{stats.trim_seq})"
        )
    else:
        lost = f"lost: the inputs after seq {delivered_upto} (the log holds none after it)"
    return f"{what}; {lost}"


class InputLogs:
    """The input logs this standby keeps, one per lossless unit, each for one term.

    Called from the replication server's thread (`on_term`, `on_commit`) and from the agent's
    (start, takeover): every call holds one lock and opens its own data-plane connection.
    """

    def __init__(self, client: Callable[[], DataPlaneClient], port: str) -> None:
        self._client = client
        self._port = port
        self._lock = threading.Lock()
        self._terms: dict[str, int] = {}
        self._macs: dict[str, str] = {}

    def shadow(self, unit: str, mac: str) -> None:
        """Logs made for `unit` from now on also keep a shadow log of the inputs for `mac` (the
        NF's) that reach the data link while no unit owns it: those the bridge floods here."""
        with self._lock:
            self._macs[unit] = mac

    def term(self, unit: str) -> int | None:
        """The term whose mirror the unit's log takes; None without a log."""
        with self._lock:
            return self._terms.get(unit)

    def ensure(self, unit: str, term: int) -> bool:
        """A log of `unit`'s mirror at `term`, replacing one of another term; True if made.

        The replaced log's inputs belong to an incarnation no one will restore here any more: a
        higher term was recorded, so this store refuses that incarnation's checkpoints.
        """
        tag = mirror_tag(unit, term)
        with self._lock, self._client() as dp:
            if self._terms.get(unit) == term:
                return False
            name = log_name(unit)
            if name in dp.stats().input_logs:
                dp.remove_input_log(name)
            self._terms.pop(unit, None)
            mac = self._macs.get(unit)
            dp.add_input_log(name, self._port, tag, shadow_mac=mac)
            self._terms[unit] = term
        log.info(
            "unit %s: input log for term %d (tag %#x) on %s%s",
            unit,
            term,
            tag,
            self._port,
            f", shadow log for {mac}" if mac else "",
        )
        return True

    def trim(self, unit: str, checkpoint: Checkpoint) -> int | None:
        """Drop what `checkpoint` covers (its ``cut_seq``); None if it is not for the log's term.

        A checkpoint without ``cut_seq`` trims nothing: its image's cut is unknown, and the
        replay after it (from 0) will say whether the log still covers it.
        """
        cut = checkpoint.meta.get("cut_seq")
        with self._lock:
            if self._terms.get(unit) != checkpoint.term or not isinstance(cut, int):
                return None
            with self._client() as dp:
                return dp.trim_input_log(log_name(unit), cut)

    def remove(self, unit: str) -> int:
        """Remove the unit's log (after a takeover: its inputs were replayed or are lost)."""
        with self._lock, self._client() as dp:
            self._terms.pop(unit, None)
            name = log_name(unit)
            if name not in dp.stats().input_logs:
                return 0
            return dp.remove_input_log(name)
