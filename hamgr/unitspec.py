"""The unit spec: the TOML file `hamgr protect SPEC.toml` reads.

One file describes one protected unit::

    name = "seq0"                       # 1-24 characters from [A-Za-z0-9_-]

    [nf]
    image = "sequencer"                 # a built-in test NF, an OCI archive, or a rootfs dir
    args = ["/usr/local/bin/sequencer", "--listen", "7000", "--dest", "198.18.0.1:9000"]
    env = ["SEQ_MEM_MB=4"]              # optional
    address = "198.18.0.2/24"           # the NF's address and prefix, inside its netns
    mac = "02:00:c6:12:00:02"           # the NF's MAC (fixed, so failover needs no ARP)

    [nf.neighbors]                      # optional static neighbours inside the NF's netns:
    "198.18.0.1" = "02:00:c6:12:00:03"  # its output is held, so its ARP replies would be too

    [[chain]]                           # optional, at most 2: the NFs that follow [nf] in a
    image = "sequencer"                 # chain; each runs in the same netns as [nf] and gets
    args = ["/usr/local/bin/sequencer", "--listen", "7001", "--dest", "198.18.0.1:9000"]
    env = []                            # what the one before it sends (e.g. to 127.0.0.1:7001)

    [ports]
    wire = ["eth1"]                     # host interfaces whose input goes to the NF (1-4)
    egress = "eth2"                     # host interface its released output leaves by

    [standby]
    host = "auto"                       # "auto" or a host name
    spares = []                         # with a remote standby: up to 8 more peers, where a
                                        # takeover claims its term (docs/failover.md, Partitions)
    on_fenced = "stop"                  # a deposed primary stops the unit, or with "standby"
                                        # then becomes a spare of the new primary

    [epoch]
    policy = "fixed"                    # "fixed" (length_ms) or "adaptive"
    length_ms = 50
    # adaptive: target_added_latency_ms = 20, min_ms = 5, max_ms = 500

    [protection]
    max_inflight = 4                    # K: epochs in flight before ingress back-pressure
    memory_budget_mb = 64               # output held for the unit before back-pressure
    lossless = false                    # mirror and replay inputs after the last commit
    on_standby_loss = "stall"           # or "run-unprotected"

Every problem is reported, each as ``FILE:LINE: FIELD: MESSAGE``; for example
``spec.toml:7: epoch.length_ms: must be a positive integer, got "fast"``. Syntax errors carry
tomllib's line; for semantic errors the line of the offending key is found by `key_lines`.
`UnitSpec.to_json` / `UnitSpec.from_json` carry a validated spec over the control channel, where
`from_json` validates again (the agent trusts nothing it receives).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

import attrs

__all__ = [
    "BUILTIN_NFS",
    "ChainMemberSpec",
    "EpochSpec",
    "NfSpec",
    "PortsSpec",
    "ProtectionSpec",
    "SpecError",
    "SpecProblem",
    "StandbySpec",
    "UnitSpec",
    "key_lines",
    "load",
    "loads",
]

# The test and demo NFs `hamgr.nfs.images` builds offline; named here so parsing a spec does not
# import the image builder.
BUILTIN_NFS: Final = ("sequencer", "tcpnf", "socat")
UNIT_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,23}$")
_IFNAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
_HOSTNAME: Final = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_MAC: Final = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
MAX_WIRE_PORTS: Final = 4
MAX_SPARES: Final = 8  # as many as a standby_add carries (hamgr.control)
MAX_CHAIN_MEMBERS: Final = 3  # [nf] and at most two [[chain]] tables
MAX_INFLIGHT: Final = 64  # the data plane's limit
MAX_EPOCH_MS: Final = 60_000
MAX_BUDGET_MB: Final = 1 << 20
DEFAULT_LENGTH_MS: Final = 50
DEFAULT_MIN_MS: Final = 5
DEFAULT_MAX_MS: Final = 500

T = TypeVar("T")


# --- problems ---------------------------------------------------------------------------------


@attrs.frozen
class SpecProblem:
    """One thing wrong with a spec: the dotted field, what is wrong, and the line if known."""

    field: str
    message: str
    line: int | None = None

    def render(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line is not None else source
        return f"{where}: {self.field}: {self.message}"


class SpecError(Exception):
    """A spec that cannot be used; `problems` lists every problem found, in file order."""

    def __init__(self, source: str, problems: Iterable[SpecProblem]) -> None:
        self.source = source
        self.problems = tuple(sorted(problems, key=lambda p: (p.line or 0, p.field)))
        super().__init__("\n".join(p.render(source) for p in self.problems))


class _InvalidError(ValueError):
    """Raised by a validator; the message reads after the field name."""


def _show(value: object) -> str:
    """A value as the spec's author wrote it (TOML and JSON agree on scalars and arrays)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


# --- validators: attrs validators that raise _InvalidError with a message for the author ---


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_range(low: int, high: int) -> Callable[[object, attrs.Attribute[Any], Any], None]:
    def check(_inst: object, _attr: attrs.Attribute[Any], value: Any) -> None:
        if not _is_int(value) or value < low:
            kind = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise _InvalidError(f"must be {kind}, got {_show(value)}")
        if value > high:
            raise _InvalidError(f"must be at most {high}, got {_show(value)}")

    return check


def _optional(
    check: Callable[[object, attrs.Attribute[Any], Any], None],
) -> Callable[[object, attrs.Attribute[Any], Any], None]:
    def maybe(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            check(inst, attr, value)

    return maybe


def _bool(_inst: object, _attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        raise _InvalidError(f"must be true or false, got {_show(value)}")


def _one_of(*choices: str) -> Callable[[object, attrs.Attribute[Any], Any], None]:
    def check(_inst: object, _attr: attrs.Attribute[Any], value: Any) -> None:
        if value not in choices:
            listed = " or ".join(f'"{c}"' for c in choices)
            raise _InvalidError(f"must be {listed}, got {_show(value)}")

    return check


def _nonempty_str(_inst: object, _attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise _InvalidError(f"must be a non-empty string, got {_show(value)}")


def _unit_name(_inst: object, _attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not UNIT_NAME.match(value):
        raise _InvalidError(
            f"must be 1-24 characters from [A-Za-z0-9_-], starting with a letter or digit, "
            f"got {_show(value)}"
        )


def _ifname(value: Any) -> None:
    if not isinstance(value, str) or not _IFNAME.match(value):
        raise _InvalidError(
            f"must be an interface name (1-15 characters from [A-Za-z0-9_.-]), got {_show(value)}"
        )


def _ifname_field(_inst: object, _attr: attrs.Attribute[Any], value: Any) -> None:
    _ifname(value)


def _wire(_inst: object, _attr: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, str):
        raise _InvalidError(f'must be an array of interface names, like ["{value}"]')
    if not isinstance(value, list | tuple) or not 1 <= len(value) <= MAX_WIRE_PORTS:
        raise _InvalidError(
            f"must be an array of 1-{MAX_WIRE_PORTS} interface names, got {_show(value)}"
        )
    for item in value:
        _ifname(item)
    if len(set(value)) != len(value):
        raise _InvalidError(f"names an interface twice: {_show(list(value))}")


def _str_list(_inst: object, _attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise _InvalidError(f"must be an array of strings, got {_show(value)}")


def _args(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    _str_list(inst, attr, value)
    if not value or not value[0]:
        raise _InvalidError('must name the program to run first, e.g. ["/usr/local/bin/nf"]')


def _env(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    _str_list(inst, attr, value)
    for item in value:
        if "=" not in item or item.startswith("="):
            raise _InvalidError(f"entry {_show(item)} must look like KEY=VALUE")


def _address(_inst: object, _attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or "/" not in value:
        raise _InvalidError(
            f'must be an IPv4 address with its prefix, like "198.18.0.2/24", got {_show(value)}'
        )
    try:
        iface = ipaddress.IPv4Interface(value)
    except ValueError as exc:
        raise _InvalidError(f"{exc}, got {_show(value)}") from None
    if iface.ip in (iface.network.network_address, iface.network.broadcast_address) and (
        iface.network.prefixlen < 31
    ):
        raise _InvalidError(f"is the network or broadcast address of {iface.network}")


def _mac(value: Any) -> None:
    if not isinstance(value, str) or not _MAC.match(value.lower()):
        raise _InvalidError(f'must be a MAC address like "02:00:c6:12:00:02", got {_show(value)}')
    if int(value[:2], 16) & 1:
        raise _InvalidError(f"must be a unicast MAC (the first octet is odd), got {_show(value)}")


def _mac_field(_inst: object, _attr: attrs.Attribute[Any], value: Any) -> None:
    _mac(value)


def _neighbors(_inst: object, _attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, Mapping):
        raise _InvalidError(f'must be a table of "IP" = "MAC", got {_show(value)}')
    for ip, mac in value.items():
        try:
            ipaddress.IPv4Address(ip)
        except ValueError:
            raise _InvalidError(f"key {_show(ip)} is not an IPv4 address") from None
        try:
            _mac(mac)
        except _InvalidError as exc:
            raise _InvalidError(f"{_show(ip)}: {exc}") from None


def _standby_host(_inst: object, _attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not (value == "auto" or _HOSTNAME.match(value)):
        raise _InvalidError(f'must be "auto" or a host name, got {_show(value)}')


def _spares(_inst: object, _attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, list | tuple) or len(value) > MAX_SPARES:
        raise _InvalidError(
            f"must be an array of at most {MAX_SPARES} host names, got {_show(value)}"
        )
    for item in value:
        if not isinstance(item, str) or not _HOSTNAME.match(item):
            raise _InvalidError(f"{_show(item)} is not a host name")
    if len(set(value)) != len(value):
        raise _InvalidError(f"names a host twice: {_show(list(value))}; name each spare once")


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _frozen_map(value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) else value


# --- the spec ---------------------------------------------------------------------------------


class _ImageSource:
    """What [nf] and a [[chain]] table share: an image, built-in or a path."""

    __slots__ = ()
    image: str
    image_ref: str | None

    @property
    def builtin(self) -> bool:
        """The image names one of hamgr's own test NFs rather than a path."""
        return self.image in BUILTIN_NFS

    def _problems(self) -> list[tuple[str, str]]:
        if self.builtin and self.image_ref is not None:
            return [("image_ref", f'applies to OCI archives, not the built-in "{self.image}"')]
        return []


@attrs.frozen
class NfSpec(_ImageSource):
    """What to run and how it is addressed."""

    image: str = attrs.field(validator=_nonempty_str)
    args: tuple[str, ...] = attrs.field(validator=_args)
    address: str = attrs.field(validator=_address)
    mac: str = attrs.field(validator=_mac_field)
    env: tuple[str, ...] = attrs.field(default=(), validator=_env)
    image_ref: str | None = attrs.field(default=None, validator=_optional(_nonempty_str))
    neighbors: Mapping[str, str] = attrs.field(factory=dict, validator=_neighbors)


@attrs.frozen
class ChainMemberSpec(_ImageSource):
    """An NF that follows [nf] in a chain: same netns, its own image, args and env."""

    image: str = attrs.field(validator=_nonempty_str)
    args: tuple[str, ...] = attrs.field(validator=_args)
    env: tuple[str, ...] = attrs.field(default=(), validator=_env)
    image_ref: str | None = attrs.field(default=None, validator=_optional(_nonempty_str))


@attrs.frozen
class PortsSpec:
    """The host side: which interfaces feed the NF and which one its released output leaves by."""

    wire: tuple[str, ...] = attrs.field(validator=_wire)
    egress: str = attrs.field(validator=_ifname_field)

    def _problems(self) -> list[tuple[str, str]]:
        if self.egress in self.wire:
            return [("egress", f"{_show(self.egress)} is also a wire port; use another interface")]
        return []


@attrs.frozen
class StandbySpec:
    """Where the standby runs; with a remote one, the spares a takeover claims its term at.

    Whether each spare is a peer of the primary (and not the primary itself) only the primary's
    agent knows: it checks that at protect time."""

    host: str = attrs.field(default="auto", validator=_standby_host)
    spares: tuple[str, ...] = attrs.field(default=(), validator=_spares)
    # What a primary does once a higher term deposed it (a remote standby took the unit over):
    # "stop" the unit, or stop it and then offer itself to the new primary as a spare
    # ("standby"; docs/failover.md, "A deposed primary rejoins").
    on_fenced: str = attrs.field(default="stop", validator=_one_of("stop", "standby"))

    def _problems(self) -> list[tuple[str, str]]:
        if not self.spares:
            return []
        if self.host == "auto":
            return [
                (
                    "spares",
                    "spares need a remote standby: set host to a peer's name, or remove spares",
                )
            ]
        if self.host in self.spares:
            return [("spares", f"{_show(self.host)} is the standby; a spare is another host")]
        return []


@attrs.frozen
class EpochSpec:
    """Fixed epochs of `length_ms`, or adaptive ones steered to `target_added_latency_ms`."""

    policy: str = attrs.field(default="fixed", validator=_one_of("fixed", "adaptive"))
    length_ms: int | None = attrs.field(
        default=None, validator=_optional(_int_range(1, MAX_EPOCH_MS))
    )
    target_added_latency_ms: int | None = attrs.field(
        default=None, validator=_optional(_int_range(1, MAX_EPOCH_MS))
    )
    min_ms: int | None = attrs.field(default=None, validator=_optional(_int_range(1, MAX_EPOCH_MS)))
    max_ms: int | None = attrs.field(default=None, validator=_optional(_int_range(1, MAX_EPOCH_MS)))

    def _problems(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        adaptive_keys = ("target_added_latency_ms", "min_ms", "max_ms")
        if self.policy == "fixed":
            for key in adaptive_keys:
                if getattr(self, key) is not None:
                    out.append((key, 'applies only to policy = "adaptive"'))
        else:
            if self.length_ms is not None:
                out.append(
                    (
                        "length_ms",
                        'applies only to policy = "fixed"; adaptive epochs '
                        "move between min_ms and max_ms",
                    )
                )
            if self.target_added_latency_ms is None:
                out.append(("target_added_latency_ms", 'is required with policy = "adaptive"'))
            if self.min_ms_or_default > self.max_ms_or_default:
                out.append(
                    ("min_ms", f"{self.min_ms_or_default} is above max_ms {self.max_ms_or_default}")
                )
        return out

    @property
    def length_ms_or_default(self) -> int:
        return DEFAULT_LENGTH_MS if self.length_ms is None else self.length_ms

    @property
    def min_ms_or_default(self) -> int:
        return DEFAULT_MIN_MS if self.min_ms is None else self.min_ms

    @property
    def max_ms_or_default(self) -> int:
        return DEFAULT_MAX_MS if self.max_ms is None else self.max_ms


@attrs.frozen
class ProtectionSpec:
    max_inflight: int = attrs.field(default=4, validator=_int_range(1, MAX_INFLIGHT))
    memory_budget_mb: int = attrs.field(default=64, validator=_int_range(1, MAX_BUDGET_MB))
    lossless: bool = attrs.field(default=False, validator=_bool)
    on_standby_loss: str = attrs.field(
        default="stall", validator=_one_of("stall", "run-unprotected")
    )
    # Remote standby: restore the committed checkpoint while a silent primary is being
    # confirmed (`shim.failover.Prestore`); false saves one restore per suspicion.
    prestore: bool = attrs.field(default=True, validator=_bool)

    @property
    def memory_budget_bytes(self) -> int:
        return self.memory_budget_mb << 20


_SECTIONS: Final[Mapping[str, type[Any]]] = {
    "nf": NfSpec,
    "ports": PortsSpec,
    "standby": StandbySpec,
    "epoch": EpochSpec,
    "protection": ProtectionSpec,
}
_REQUIRED_SECTIONS: Final = ("nf", "ports")
_CONVERT: Final[Mapping[str, Callable[[Any], Any]]] = {
    "args": _tuple,
    "env": _tuple,
    "wire": _tuple,
    "spares": _tuple,
    "neighbors": _frozen_map,
}


@attrs.frozen
class UnitSpec:
    name: str = attrs.field(validator=_unit_name)
    nf: NfSpec
    ports: PortsSpec
    standby: StandbySpec = attrs.field(factory=StandbySpec)
    epoch: EpochSpec = attrs.field(factory=EpochSpec)
    protection: ProtectionSpec = attrs.field(factory=ProtectionSpec)
    # The NFs after [nf] in a chain, in order; empty for a single NF.
    chain: tuple[ChainMemberSpec, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types only; `from_json(to_json())` gives an equal spec."""

        def section(value: Any) -> dict[str, Any]:
            out = {}
            for f in attrs.fields(type(value)):
                v = getattr(value, f.name)
                if v is None:
                    continue
                out[f.name] = (
                    list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, Mapping) else v
                )
            return out

        data: dict[str, Any] = {"name": self.name}
        for key in _SECTIONS:
            data[key] = section(getattr(self, key))
        if self.chain:
            data["chain"] = [section(m) for m in self.chain]
        return data

    @staticmethod
    def from_json(data: Any, *, source: str = "<spec>") -> UnitSpec:
        """Validate `data` (as parsed from TOML or JSON); raises `SpecError`."""
        return _build(data, source, {})


# --- line numbers -----------------------------------------------------------------------------

_HEADER: Final = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY: Final = re.compile(
    r"""^\s*((?:"[^"]*"|'[^']*'|[A-Za-z0-9_-]+)(?:\s*\.\s*(?:"[^"]*"|'[^']*'|[A-Za-z0-9_-]+))*)\s*="""
)
_PART: Final = re.compile(r"""\s*("([^"]*)"|'([^']*)'|([A-Za-z0-9_-]+))\s*(?:\.|$)""")


def _split_key(text: str) -> tuple[str, ...]:
    parts: list[str] = []
    pos = 0
    while pos < len(text):
        m = _PART.match(text, pos)
        if m is None or m.end() == pos:
            break
        parts.append(next(g for g in m.groups()[1:] if g is not None))
        pos = m.end()
    return tuple(parts)


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """The line (1-based) on which each key or table of a TOML document is defined.

    A line scanner, enough for the shapes a spec uses: table headers, dotted keys and key/value
    lines; it skips the inside of multi-line strings and arrays, whose lines define no keys.
    """
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    arrays: dict[tuple[str, ...], int] = {}  # [[name]] -> how many seen so far
    in_string: str | None = None
    depth = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if in_string is not None:
            if in_string in line:
                in_string = None
            continue
        if depth > 0:
            depth += line.count("[") - line.count("]")
            continue
        header = _HEADER.match(line)
        if header is not None and not _KEY.match(line):
            table = _split_key(header.group(1))
            lines.setdefault(table, number)
            if line.lstrip().startswith("[["):
                # An array of tables: the n-th one is (name, "n"), as problems name it.
                n = arrays.get(table, 0)
                arrays[table] = n + 1
                table = (*table, str(n))
                lines.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if key is None:
            continue
        path = table + _split_key(key.group(1))
        for n in range(len(table) + 1, len(path) + 1):
            lines.setdefault(path[:n], number)
        rest = line[key.end() :]
        for quote in ('"""', "'''"):
            if rest.count(quote) % 2 == 1:
                in_string = quote
        if in_string is None:
            stripped = re.sub(r"\"(?:[^\"\\]|\\.)*\"|'[^']*'", "", rest).split("#", 1)[0]
            depth = max(0, stripped.count("[") - stripped.count("]"))
    return lines


def _line(lines: Mapping[tuple[str, ...], int], path: tuple[str, ...]) -> int | None:
    # The key itself, else the nearest enclosing table that was written down.
    for n in range(len(path), 0, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return None


def _dotted(path: tuple[str, ...]) -> str:
    out = ""
    for p in path:
        if p.isdigit() and out:
            out += f"[{p}]"  # the n-th table of an array of tables: chain[1]
        else:
            out += ("." if out else "") + (p if re.fullmatch(r"[A-Za-z0-9_-]+", p) else _show(p))
    return out


# --- building ---------------------------------------------------------------------------------


class _Collector:
    def __init__(self, lines: Mapping[tuple[str, ...], int]) -> None:
        self.lines = lines
        self.problems: list[SpecProblem] = []

    def add(self, path: tuple[str, ...], message: str) -> None:
        self.problems.append(SpecProblem(_dotted(path), message, _line(self.lines, path)))


def _unknown(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known))}"
    return f"unknown key{hint}"


def _section(cls: type[T], path: tuple[str, ...], table: Any, out: _Collector) -> T | None:
    if not isinstance(table, Mapping):
        out.add(path, f"must be a table ([{_dotted(path)}]), got {_show(table)}")
        return None
    fields = {f.name: f for f in attrs.fields(cls)}  # type: ignore[arg-type]
    before = len(out.problems)
    values: dict[str, Any] = {}
    for key, raw in table.items():
        if key not in fields:
            out.add((*path, key), _unknown(key, fields))
            continue
        value = _CONVERT.get(key, lambda v: v)(raw)
        field = fields[key]
        if field.validator is not None:
            try:
                field.validator(None, field, value)
            except _InvalidError as exc:
                out.add((*path, key), str(exc))
                continue
        values[key] = value
    for name, field in fields.items():
        if field.default is attrs.NOTHING and name not in table:
            out.add((*path, name), f"is required in [{_dotted(path)}]" if path else "is required")
    if len(out.problems) != before:
        return None
    built = cls(**values)
    check = getattr(built, "_problems", None)
    if check is not None:
        for key, message in check():
            out.add((*path, key), message)
    return built if len(out.problems) == before else None


def _build(data: Any, source: str, lines: Mapping[tuple[str, ...], int]) -> UnitSpec:
    out = _Collector(lines)
    if not isinstance(data, Mapping):
        raise SpecError(source, [SpecProblem("spec", f"must be a table, got {_show(data)}")])
    known = {"name", "chain", *_SECTIONS}
    for key in data:
        if key not in known:
            out.add((key,), _unknown(key, known))
    name = data.get("name")
    if name is None:
        out.add(("name",), 'is required, e.g. name = "seq0" at the top of the file')
    else:
        try:
            _unit_name(None, None, name)  # type: ignore[arg-type]
        except _InvalidError as exc:
            out.add(("name",), str(exc))
    sections: dict[str, Any] = {}
    for key, cls in _SECTIONS.items():
        if key not in data:
            if key in _REQUIRED_SECTIONS:
                out.add((key,), f"the [{key}] table is required")
            continue
        sections[key] = _section(cls, (key,), data[key], out)
    chain = _chain(data.get("chain", []), out)
    if out.problems:
        raise SpecError(source, out.problems)
    assert isinstance(name, str)
    return UnitSpec(name=name, chain=chain, **{k: v for k, v in sections.items() if v is not None})


def _chain(tables: Any, out: _Collector) -> tuple[ChainMemberSpec, ...]:
    if not isinstance(tables, list) or not all(isinstance(t, Mapping) for t in tables):
        out.add(("chain",), "must be [[chain]] tables, one per NF after [nf]")
        return ()
    if len(tables) > MAX_CHAIN_MEMBERS - 1:
        out.add(
            ("chain", str(MAX_CHAIN_MEMBERS - 1)),
            f"a chain has at most {MAX_CHAIN_MEMBERS} NFs ([nf] and "
            f"{MAX_CHAIN_MEMBERS - 1} [[chain]] tables), got {len(tables) + 1}; protect the "
            "rest as another unit",
        )
        return ()
    members = [_section(ChainMemberSpec, ("chain", str(i)), t, out) for i, t in enumerate(tables)]
    return tuple(m for m in members if m is not None)


_TOML_POSITION: Final = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")


def loads(text: str, *, source: str = "<spec>", base_dir: Path | None = None) -> UnitSpec:
    """Parse and validate a spec; raises `SpecError` naming every problem with its line.

    With `base_dir`, a relative image path is taken relative to it and must exist.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        m = _TOML_POSITION.search(message)
        line = int(m.group(1)) if m else None
        if m:
            message = f"{message[: m.start()]} (column {m.group(2)})"
        raise SpecError(source, [SpecProblem("toml", f"not valid TOML: {message}", line)]) from None
    lines = key_lines(text)
    spec = _build(data, source, lines)
    if base_dir is None:
        return spec
    out = _Collector(lines)
    nf = _resolve_image(spec.nf, ("nf",), base_dir, out)
    chain = tuple(
        _resolve_image(m, ("chain", str(i)), base_dir, out) for i, m in enumerate(spec.chain)
    )
    if out.problems:
        raise SpecError(source, out.problems)
    return attrs.evolve(spec, nf=nf, chain=chain)


_Imaged = TypeVar("_Imaged", NfSpec, ChainMemberSpec)


def _resolve_image(
    section: _Imaged, path: tuple[str, ...], base_dir: Path, out: _Collector
) -> _Imaged:
    """`section` with its image path made absolute (relative to `base_dir`); it must exist."""
    if section.builtin:
        return section
    image = Path(section.image)
    if not image.is_absolute():
        image = (base_dir / image).resolve()
    if not image.exists():
        out.add(
            (*path, "image"),
            f"{_show(section.image)} is neither a built-in NF ({', '.join(BUILTIN_NFS)}) "
            f"nor an existing OCI archive or rootfs directory (looked at {image})",
        )
        return section
    return attrs.evolve(section, image=str(image))


def load(path: Path) -> UnitSpec:
    """Read, parse and validate the spec file at `path` (image paths relative to its folder)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(str(path), [SpecProblem("file", f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise SpecError(str(path), [SpecProblem("file", "is not UTF-8 text")]) from None
    return loads(text, source=str(path), base_dir=path.parent)
