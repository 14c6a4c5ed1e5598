"""What goes wrong between a sensor and the broker, injected on purpose and reproducibly.

`Faults` says how often: each message-level fault has a probability per sample, drawn independently;
disconnect storms are fleet-wide events in time. `FaultInjector` applies them to one device's stream of
samples with its own ``random.Random(seed)``: its decisions depend only on the seed and the samples it
is given, never on timing, so the same seed gives the same faulted stream on every run (storms happen at
seeded times too, but which messages are in flight when one hits depends on the machine).

Per sample, in this order:

- stuck: a sensor (one channel) freezes at its last value for a random run of samples (mean ``stuck_run``);
- nan: one channel reads NaN (JSON ``NaN``: Python's json writes it, strict parsers refuse it);
- malformed: the payload is replaced by garbage of one of `MALFORMED_KINDS`;
- drop: the message is never published (its ``seq`` is used up, so the receiver sees a gap);
- duplicate: it is published twice in a row;
- reorder: it is held back and published right after the next published message.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from typing import Callable, NamedTuple

from edgernn.protocol import LABEL_FIELD, SEQ_FIELD, TS_FIELD, X_FIELD

MESSAGE_FAULTS = ("drop", "duplicate", "reorder", "nan", "stuck", "malformed")
"""Per-message faults, each a probability per sample."""
MALFORMED_KINDS = ("invalid_json", "wrong_types", "missing_x", "wrong_length", "truncated", "binary")
"""The garbage a malformed message carries: a syntax error, strings for numbers, no "x", one value too
many, a valid payload cut short, random bytes (mostly not UTF-8)."""


@dataclass(frozen=True)
class Faults:
    """How often each fault happens. All zero (the default) means a clean fleet.

    Probabilities are per sample (0..1). Storms: every ``storm_every`` seconds on average (0 = never),
    ``storm_fraction`` of the fleet loses its connection abruptly (socket closed without DISCONNECT, so
    the broker publishes each device's last will) and stays away ``storm_downtime`` seconds.
    """

    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    nan: float = 0.0
    stuck: float = 0.0
    malformed: float = 0.0
    stuck_run: int = 20
    storm_every: float = 0.0
    storm_fraction: float = 0.2
    storm_downtime: float = 2.0

    def __post_init__(self):
        for name in MESSAGE_FAULTS:
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"faults: {name} is a probability per message, 0 to 1; got {value!r}")
        if isinstance(self.stuck_run, bool) or not isinstance(self.stuck_run, int) or self.stuck_run < 1:
            raise ValueError(f"faults: stuck_run is a mean run length in samples, at least 1; got {self.stuck_run!r}")
        if not _is_number(self.storm_every) or self.storm_every < 0:
            raise ValueError(f"faults: storm_every is seconds between storms (0: none); got {self.storm_every!r}")
        if not _is_number(self.storm_fraction) or not 0.0 < self.storm_fraction <= 1.0:
            raise ValueError(f"faults: storm_fraction is the share of devices a storm drops, above 0 up to 1; "
                             f"got {self.storm_fraction!r}")
        if not _is_number(self.storm_downtime) or self.storm_downtime < 0:
            raise ValueError(f"faults: storm_downtime is seconds, 0 or more; got {self.storm_downtime!r}")

    @classmethod
    def parse(cls, spec: str | None) -> "Faults":
        """``"drop=0.01,duplicate=0.01,storm_every=20"`` -> Faults. Empty or ``"none"`` means no faults."""
        if spec is None or spec.strip() in ("", "none"):
            return cls()
        fields = {field.name: field.type for field in dataclasses.fields(cls)}
        values: dict = {}
        for item in spec.split(","):
            item = item.strip()
            if not item:
                continue
            name, equals, text = (part.strip() for part in item.partition("="))
            if not equals:
                raise ValueError(f"faults: {item!r} is not NAME=VALUE (e.g. drop=0.01)")
            if name not in fields:
                raise ValueError(f"faults: unknown setting {name!r} (known: {', '.join(fields)})")
            if name in values:
                raise ValueError(f"faults: {name} is given twice")
            try:
                values[name] = int(text) if fields[name] in (int, "int") else float(text)
            except ValueError:
                kind = "a whole number" if fields[name] in (int, "int") else "a number"
                raise ValueError(f"faults: {name}={text!r} is not {kind}") from None
        return cls(**values)

    @property
    def any_message_faults(self) -> bool:
        return any(getattr(self, name) for name in MESSAGE_FAULTS)

    def spec(self) -> str:
        """The settings that differ from the defaults, in `parse`'s syntax ("none" for a clean fleet)."""
        default = Faults()
        changed = [f"{field.name}={getattr(self, field.name):g}" for field in dataclasses.fields(self)
                   if getattr(self, field.name) != getattr(default, field.name)]
        return ",".join(changed) or "none"


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class Message(NamedTuple):
    """One message as the device publishes it. ``kind`` is "ok" or the faults it carries joined by '+'
    (e.g. "nan", "malformed", "stuck+reordered"); a duplicate's second copy is "duplicate"."""

    seq: int
    kind: str
    payload: bytes


_ENCODER = json.JSONEncoder(separators=(",", ":"))
_float_repr = float.__repr__


def encode_sample(values: list[float], seq: int, ts: float, label: str | None = None) -> bytes:
    """The device's payload: ``{"x": [...], "seq": n, "ts": t}`` as compact JSON, plus ``"label"`` (the
    ground truth, `edgernn.protocol.LABEL_FIELD`) when given, for scoring predictions live.

    Formatted directly (half json.dumps's cost, and it runs per sample); values that are not plain
    floats, NaN and infinities go through json, which spells them ``NaN`` / ``Infinity``.
    """
    try:
        body = ",".join(map(_float_repr, values))
    except TypeError:
        body = "n"
    if "n" in body:  # "nan", "inf", or not floats
        sample = {X_FIELD: list(values), SEQ_FIELD: seq, TS_FIELD: ts}
        if label is not None:
            sample[LABEL_FIELD] = label
        return _ENCODER.encode(sample).encode()
    tail = "" if label is None else ',"%s":%s' % (LABEL_FIELD, _ENCODER.encode(label))
    return ('{"%s":[%s],"%s":%d,"%s":%r%s}' % (X_FIELD, body, SEQ_FIELD, seq, TS_FIELD, ts, tail)).encode()


class FaultInjector:
    """Applies `Faults` to one device's samples: ``inject(seq, values, ts)`` -> the messages to publish now.

    ``counts`` holds what was injected per fault ("stuck" counts runs; the messages of a run carry the
    kind "stuck"). ``release()`` hands back a message still held for a reorder (at the end of a run).
    """

    def __init__(self, faults: Faults, seed: int | str = 0, encode: Callable = encode_sample):
        self.faults = faults
        self.random = random.Random(seed)
        self.encode = encode
        self.counts = {name: 0 for name in MESSAGE_FAULTS}
        self.malformed_counts = {kind: 0 for kind in MALFORMED_KINDS}
        self._held: list[Message] = []
        self._last: list[float] | None = None
        self._stuck_left = 0
        self._stuck_channel = 0
        self._stuck_value = 0.0

    def inject(self, seq: int, values: list[float], ts: float, label: str | None = None) -> list[Message]:
        faults, rnd = self.faults, self.random
        kinds = []
        values = list(values)
        if self._stuck_left == 0 and faults.stuck and rnd.random() < faults.stuck:
            self._stuck_left = rnd.randint(1, 2 * faults.stuck_run - 1)  # mean stuck_run
            self._stuck_channel = rnd.randrange(len(values))
            last = self._last if self._last is not None else values
            self._stuck_value = last[self._stuck_channel]
            self.counts["stuck"] += 1
        if self._stuck_left:
            self._stuck_left -= 1
            values[self._stuck_channel] = self._stuck_value
            kinds.append("stuck")
        self._last = values
        if faults.nan and rnd.random() < faults.nan:
            values = list(values)
            values[rnd.randrange(len(values))] = math.nan
            kinds.append("nan")
            self.counts["nan"] += 1
        payload = self.encode(values, seq, ts, label)
        if faults.malformed and rnd.random() < faults.malformed:
            kind = rnd.choice(MALFORMED_KINDS)
            payload = self._garbage(kind, values, seq, ts, payload)
            kinds.append("malformed")
            self.counts["malformed"] += 1
            self.malformed_counts[kind] += 1
        if faults.drop and rnd.random() < faults.drop:
            self.counts["drop"] += 1
            return []
        message = Message(seq, "+".join(kinds) or "ok", payload)
        out = [message]
        if faults.duplicate and rnd.random() < faults.duplicate:
            out.append(Message(seq, "duplicate", payload))
            self.counts["duplicate"] += 1
        wants_reorder = bool(faults.reorder) and rnd.random() < faults.reorder
        if self._held:  # the held message goes out right after this one
            out += self._held
            self._held = []
        elif wants_reorder:
            self._held = [m._replace(kind="reordered" if m.kind == "ok" else m.kind + "+reordered") for m in out]
            self.counts["reorder"] += 1
            return []
        return out

    def release(self) -> list[Message]:
        """The message held back for a reorder, if any (there is no next message to swap with)."""
        held, self._held = self._held, []
        return held

    def _garbage(self, kind: str, values: list[float], seq: int, ts: float, good: bytes) -> bytes:
        rnd = self.random
        if kind == "invalid_json":
            return good.replace(b'"x":', b"x:", 1)  # an unquoted key
        if kind == "wrong_types":
            return _ENCODER.encode({"x": [str(v) for v in values], "seq": str(seq), "ts": ts}).encode()
        if kind == "missing_x":
            return _ENCODER.encode({"seq": seq, "ts": ts}).encode()
        if kind == "wrong_length":
            return self.encode(list(values) + [0.0], seq, ts)
        if kind == "truncated":
            return good[:rnd.randrange(1, len(good))]
        return bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 48)))
