"""Payload and topic conventions shared by the daemon (`edgernn.runtime`) and the sensor simulator.

Layer 1: stdlib only, so the simulator can speak the protocol without importing any model code.

- The default JSON field names of a sample (in) and a prediction (out).
- `TopicFilter`: an MQTT 3.1.1 subscription filter, validated once and matched per message.
- `TopicTemplate`: a publish topic with ``{key}`` / ``{pipeline}`` placeholders, formatted per message.
- `key_level`: which topic level of a subscription holds the stream key.
"""

from __future__ import annotations

import re

X_FIELD = "x"
"""Input vector of a sample: a list of numbers."""
SEQ_FIELD = "seq"
"""Optional per-stream sequence number (non-negative int): drops redeliveries, counts gaps."""
TS_FIELD = "ts"
"""Optional timestamp (number), echoed in the prediction."""
KEY_FIELD = "key"
"""Stream key in a prediction (and in a sample when the key comes from the payload)."""
Y_FIELD = "y"
"""Output vector of a prediction."""
LABEL_FIELD = "label"
"""Ground truth a simulated device may add to its samples (`edgernn simulate --labels`), for scoring
predictions live; the daemon ignores it."""

MAX_TOPIC_BYTES = 65535
"""MQTT strings carry a 16-bit length: a topic or filter is at most this many UTF-8 bytes."""

_REFUSED_IN_TOPICS = re.compile("[\\x00-\\x1f\\x7f-\\x9f\\ufdd0-\\ufdef"
                                + "".join(f"\\U{plane:04x}fffe\\U{plane:04x}ffff" for plane in range(17)) + "]")
"""Control characters (C0, DEL, C1) and Unicode noncharacters: MQTT 3.1.1 section 1.5.3 says a topic should
not contain them and lets the receiver close the connection, which Mosquitto 2.0 does."""


def refused_in_topics(text: str) -> str | None:
    """The first character of ``text`` that MQTT brokers may refuse in a topic (`_REFUSED_IN_TOPICS`), or None.

    A stream key from a payload field holding one made the daemon's prediction topic fail: Mosquitto closed the
    connection, paho sent the prediction again after the reconnect, and so on for ever (reliability/fuzz_live.py).
    Printable ASCII, the common case, costs one test."""
    if text.isascii() and text.isprintable():
        return None
    found = _REFUSED_IN_TOPICS.search(text)
    return None if found is None else found.group()


def _check_topic_text(text: str, what: str) -> None:
    """The rules every MQTT topic string obeys: non-empty, valid UTF-8, no NUL, at most 65535 bytes."""
    if not isinstance(text, str):
        raise TypeError(f"{what}: must be a string, got {type(text).__name__}")
    if not text:
        raise ValueError(f"{what}: must not be empty")
    if "\0" in text:
        raise ValueError(f"{what} {text!r}: contains a NUL character")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as error:
        raise ValueError(f"{what} {text!r}: not valid UTF-8 ({error.reason})") from None
    if size > MAX_TOPIC_BYTES:
        raise ValueError(f"{what}: {size} bytes long, MQTT allows at most {MAX_TOPIC_BYTES}")


class TopicFilter:
    """An MQTT subscription filter (``sensors/+/imu``, ``plant/#``), validated per MQTT 3.1.1 §4.7.

    `match` runs per message, so everything it needs is computed here: the fixed levels to compare,
    the level count, and whether ``$``-topics must be refused. An exact filter is one string compare.
    """

    __slots__ = ("pattern", "wildcard_levels", "_depth", "_multi_level", "_literals", "_exact_levels",
                 "_dollar_guard")

    def __init__(self, pattern: str):
        _check_topic_text(pattern, "subscription")
        levels = pattern.split("/")
        last = len(levels) - 1
        for index, level in enumerate(levels):
            if "#" in level:
                if level != "#":
                    raise ValueError(f"subscription {pattern!r}: '#' must be a whole level, not {level!r}")
                if index != last:
                    raise ValueError(f"subscription {pattern!r}: '#' must be the last level")
            elif "+" in level and level != "+":
                raise ValueError(f"subscription {pattern!r}: '+' must be a whole level, not {level!r}")
        self.pattern = pattern
        self.wildcard_levels = tuple(index for index, level in enumerate(levels) if level == "+")
        self._multi_level = levels[-1] == "#"
        self._depth = len(levels) - 1 if self._multi_level else len(levels)  # levels before any '#'
        self._literals = tuple((index, level) for index, level in enumerate(levels[:self._depth])
                               if level != "+")
        exact = not self._multi_level and not self.wildcard_levels
        self._exact_levels = tuple(levels) if exact else None
        self._dollar_guard = levels[0] in ("+", "#")  # MQTT 4.7.2: '$' topics never match these

    @property
    def levels(self) -> int:
        """Number of levels in the filter, '#' included."""
        return self._depth + self._multi_level

    @property
    def multi_level(self) -> bool:
        """Whether the filter ends in '#'."""
        return self._multi_level

    def match(self, topic: str) -> tuple[str, ...] | None:
        """``topic``'s levels (``topic.split('/')``) if the filter matches it, else None."""
        if self._exact_levels is not None:
            return self._exact_levels if topic == self.pattern else None
        levels = topic.split("/")
        if self._multi_level:
            if len(levels) < self._depth:  # 'a/#' also matches the parent 'a'
                return None
        elif len(levels) != self._depth:
            return None
        if self._dollar_guard and topic[:1] == "$":
            return None
        for index, literal in self._literals:
            if levels[index] != literal:
                return None
        return tuple(levels)

    def __repr__(self) -> str:
        return f"TopicFilter({self.pattern!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, TopicFilter) and other.pattern == self.pattern

    def __hash__(self) -> int:
        return hash(self.pattern)


_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


class TopicTemplate:
    """A publish topic with placeholders: ``predictions/{key}/imu``, ``edgernn/{pipeline}/dead``.

    The template is parsed once into a %-format string, so `format` costs a dict lookup per placeholder
    plus one C-level string build. There is no escape for braces: MQTT topics have no use for them.
    """

    __slots__ = ("template", "placeholders", "_format")

    def __init__(self, template: str, allowed: tuple[str, ...] = ("key", "pipeline")):
        _check_topic_text(template, "publish topic")
        for wildcard in "+#":
            if wildcard in template:
                raise ValueError(f"publish topic {template!r}: contains the wildcard {wildcard!r}")
        parts = []
        names = []
        position = 0
        for found in _PLACEHOLDER.finditer(template):
            parts.append(self._literal(template, template[position:found.start()]))
            name = found.group(1)
            if name not in allowed:
                choices = ", ".join("{" + a + "}" for a in allowed) or "none"
                raise ValueError(f"publish topic {template!r}: unknown placeholder {{{name}}} (allowed: {choices})")
            if name not in names:
                names.append(name)
            parts.append(f"%({name})s")
            position = found.end()
        parts.append(self._literal(template, template[position:]))
        self.template = template
        self.placeholders = tuple(names)
        self._format = "".join(parts)

    @staticmethod
    def _literal(template: str, text: str) -> str:
        if "{" in text or "}" in text:
            raise ValueError(f"publish topic {template!r}: unbalanced '{{' or '}}'")
        return text.replace("%", "%%")

    def format(self, **values: str) -> str:
        """The topic with each placeholder replaced by ``values[name]``; extra values are ignored.

        A value must be a non-empty string without '+', '#' or NUL ('/' is fine: a stream key may span
        levels), else ValueError: publishing to a wildcard topic is a protocol error.
        """
        for name in self.placeholders:
            value = values.get(name)
            if type(value) is not str:
                if value is None:
                    raise ValueError(f"publish topic {self.template!r}: no value for {{{name}}}")
                raise TypeError(f"{{{name}}}: must be a string, got {type(value).__name__}")
            if not value or "+" in value or "#" in value or "\0" in value:
                raise ValueError(f"{{{name}}} = {value!r}: must be non-empty, without '+', '#' or NUL")
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"{{{name}}} = {value!r}: not valid UTF-8") from None
        topic = self._format % values
        if len(topic) > MAX_TOPIC_BYTES // 4 and len(topic.encode("utf-8")) > MAX_TOPIC_BYTES:
            raise ValueError(f"publish topic {topic[:80]!r}...: longer than {MAX_TOPIC_BYTES} bytes")
        return topic

    def __repr__(self) -> str:
        return f"TopicTemplate({self.template!r})"


def key_level(filter: TopicFilter, level: int | None) -> int:
    """The 0-based topic level that holds the stream key: ``level`` if given, else the first '+'.

    ``level`` must name a level of the filter before any '#': a topic matching ``a/#`` may have only
    the level ``a``, so a key below '#' would not always exist.
    """
    if level is None:
        if not filter.wildcard_levels:
            raise ValueError(f"subscription {filter.pattern!r} has no '+' level: set key_level or key_field")
        return filter.wildcard_levels[0]
    if isinstance(level, bool) or not isinstance(level, int):
        raise ValueError(f"key_level: must be an integer, got {level!r}")
    usable = filter.levels - filter.multi_level
    if not 0 <= level < usable:
        where = "before its '#'" if filter.multi_level else "in it"
        raise ValueError(f"key_level {level}: subscription {filter.pattern!r} has {usable} level(s) {where} "
                         f"(0-based)")
    return level
