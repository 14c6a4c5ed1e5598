"""Topic conventions (edgernn/protocol.py): subscription filters, publish templates, the key level."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgernn import protocol
from edgernn.protocol import TopicFilter, TopicTemplate, key_level

FAST = settings(max_examples=300, deadline=None)


def reference_match(pattern: str, topic: str) -> bool:
    """MQTT 3.1.1 §4.7 written out level by level: the oracle for `TopicFilter.match`."""
    filter_levels, topic_levels = pattern.split("/"), topic.split("/")
    if topic.startswith("$") and filter_levels[0] in ("+", "#"):
        return False
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True  # the rest, including no level at all ('sport/#' matches 'sport')
        if index >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(topic_levels) == len(filter_levels)


def test_default_field_names():
    assert (protocol.X_FIELD, protocol.SEQ_FIELD, protocol.TS_FIELD, protocol.KEY_FIELD, protocol.Y_FIELD) == \
        ("x", "seq", "ts", "key", "y")


# ---- TopicFilter: validation ---------------------------------------------------------------------
@pytest.mark.parametrize("pattern, wildcards", [
    ("a", ()), ("a/b/c", ()), ("+", (0,)), ("#", ()), ("sensors/+/imu", (1,)), ("a/#", ()), ("+/+", (0, 1)),
    ("/", ()), ("a//b", ()), ("/+", (1,)), ("$SYS/#", ()), ("+/b/+/#", (0, 2)), ("a b/ü/€", ()),
])
def test_valid_filters(pattern, wildcards):
    topic_filter = TopicFilter(pattern)
    assert topic_filter.pattern == pattern
    assert topic_filter.wildcard_levels == wildcards
    assert topic_filter == TopicFilter(pattern) and hash(topic_filter) == hash(TopicFilter(pattern))


@pytest.mark.parametrize("pattern, problem", [
    ("", "empty"), ("a/\0/b", "NUL"), ("a+", r"'\+' must be a whole level"), ("a/+b/c", r"'\+' must be a whole level"),
    ("++", r"'\+' must be a whole level"), ("a/b#", "'#' must be a whole level"), ("##", "'#' must be a whole level"),
    ("#/a", "'#' must be the last level"), ("a/#/b", "'#' must be the last level"), ("a/+#", "whole level"),
    ("\ud800", "UTF-8"), ("a" * 65536, "65535"),
])
def test_invalid_filters_name_the_problem(pattern, problem):
    with pytest.raises(ValueError, match=problem):
        TopicFilter(pattern)


def test_longest_filter_is_65535_bytes():
    TopicFilter("a" * 65535)
    with pytest.raises(ValueError):
        TopicFilter("é" * 32768)  # 65536 bytes in UTF-8


def test_filter_must_be_text():
    with pytest.raises(TypeError):
        TopicFilter(b"a/b")


# ---- TopicFilter: matching -----------------------------------------------------------------------
@pytest.mark.parametrize("pattern, topic, matches", [
    # the examples of MQTT 3.1.1 §4.7.1
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("#", "sport/tennis", True),
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("sport/+/player1", "sport/tennis/player1", True),
    # §4.7.2: '$' topics and wildcards in the first level
    ("#", "$SYS/broker", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("a/+", "a/$b", True),
    # exact filters: one string compare, case-sensitive
    ("sensors/dev1/imu", "sensors/dev1/imu", True),
    ("sensors/dev1/imu", "sensors/Dev1/imu", False),
    ("sensors/dev1/imu", "sensors/dev1/imu/", False),
    ("a/b/#", "a", False),
    ("sensors/+/imu", "sensors//imu", True),
    ("sensors/+/imu", "sensors/a/b/imu", False),
])
def test_match_follows_the_mqtt_examples(pattern, topic, matches):
    result = TopicFilter(pattern).match(topic)
    assert (result is not None) == matches == reference_match(pattern, topic)
    if matches:
        assert result == tuple(topic.split("/"))


def test_match_returns_the_levels_so_the_key_can_be_read():
    levels = TopicFilter("sensors/+/imu").match("sensors/dev-17/imu")
    assert levels == ("sensors", "dev-17", "imu")
    assert levels[key_level(TopicFilter("sensors/+/imu"), None)] == "dev-17"
    assert TopicFilter("a/b").match("a/b") == ("a", "b")


LEVELS = st.sampled_from(["a", "b", "", "$x", "ab", "+", "#"])
TOPIC_LEVELS = st.sampled_from(["a", "b", "", "$x", "ab", "$"])


@st.composite
def filters(draw):
    levels = draw(st.lists(LEVELS, min_size=1, max_size=5))
    levels = [level for level in levels[:-1] if level != "#"] + levels[-1:]  # '#' only last
    return "/".join(levels) or "a"


@FAST
@given(filters(), st.lists(TOPIC_LEVELS, min_size=1, max_size=6).map("/".join))
def test_match_agrees_with_the_reference(pattern, topic):
    result = TopicFilter(pattern).match(topic)
    assert (result is not None) == reference_match(pattern, topic)
    if result is not None:
        assert result == tuple(topic.split("/"))


@FAST
@given(st.text(alphabet=st.sampled_from("ab/+#$\0 é"), max_size=12) | st.text(max_size=20))
def test_arbitrary_filter_text_raises_only_value_error(pattern):
    try:
        topic_filter = TopicFilter(pattern)
    except ValueError:
        return
    assert topic_filter.match(pattern.replace("+", "x").replace("#", "x")) is not None or "$" in pattern[:1]


# ---- TopicTemplate ---------------------------------------------------------------------------------
def test_template_formats_each_placeholder():
    template = TopicTemplate("predictions/{key}/imu")
    assert template.placeholders == ("key",)
    assert template.format(key="dev1") == "predictions/dev1/imu"
    assert template.format(key="site/dev1", pipeline="imu") == "predictions/site/dev1/imu"  # '/' is fine
    dead = TopicTemplate("edgernn/{pipeline}/dead/{key}-{pipeline}")
    assert dead.placeholders == ("pipeline", "key")
    assert dead.format(pipeline="imu", key="k") == "edgernn/imu/dead/k-imu"
    assert TopicTemplate("fixed/topic").format() == "fixed/topic"
    assert TopicTemplate("a%s/{key}%d").format(key="%(x)s") == "a%s/%(x)s%d"  # no %-format leaks through


def test_template_with_custom_placeholders():
    assert TopicTemplate("x/{site}", allowed=("site",)).format(site="s1") == "x/s1"
    with pytest.raises(ValueError, match="unknown placeholder"):
        TopicTemplate("x/{key}", allowed=("site",))


@pytest.mark.parametrize("template, problem", [
    ("", "empty"), ("a/{sensor}", "unknown placeholder"), ("a/{}", "unknown placeholder"),
    ("a/{key", "unbalanced"), ("a/key}", "unbalanced"), ("a/{{key}}", "unbalanced"), ("a/{k{key}", "unbalanced"),
    ("a/+/{key}", "wildcard"), ("a/{key}/#", "wildcard"), ("a/\0", "NUL"), ("a/\udc80", "UTF-8"),
])
def test_invalid_templates_name_the_problem(template, problem):
    with pytest.raises(ValueError, match=problem):
        TopicTemplate(template)


@pytest.mark.parametrize("value", ["", "a+b", "#", "a\0b", "\ud800"])
def test_template_refuses_values_that_make_a_bad_topic(value):
    with pytest.raises(ValueError):
        TopicTemplate("p/{key}").format(key=value)


def test_template_needs_every_value_as_a_string():
    template = TopicTemplate("p/{key}/{pipeline}")
    with pytest.raises(ValueError, match="no value"):
        template.format(key="k")
    with pytest.raises(TypeError):
        template.format(key=3, pipeline="imu")


def test_template_refuses_a_topic_beyond_65535_bytes():
    template = TopicTemplate("p/{key}")
    assert len(template.format(key="k" * 65533)) == 65535
    with pytest.raises(ValueError, match="65535"):
        template.format(key="é" * 32767)


SAFE_VALUES = st.text(min_size=1, max_size=10).filter(
    lambda v: not any(c in v for c in "+#\0") and not any(0xD800 <= ord(c) <= 0xDFFF for c in v))


@FAST
@given(st.lists(st.sampled_from(["a", "/", "{key}", "{pipeline}", "%", "x%s"]), min_size=1, max_size=6).map("".join),
       SAFE_VALUES, SAFE_VALUES)
def test_format_agrees_with_a_substitution(template, key, pipeline):
    values = {"key": key, "pipeline": pipeline}
    expected = re.sub(r"\{(key|pipeline)\}", lambda found: values[found.group(1)], template)
    assert TopicTemplate(template).format(key=key, pipeline=pipeline) == expected


@FAST
@given(st.text(alphabet=st.sampled_from("ab/{}+#%\0key"), max_size=14) | st.text(max_size=20),
       st.text(max_size=8))
def test_arbitrary_template_text_raises_only_value_error(template, value):
    try:
        topic_template = TopicTemplate(template)
    except ValueError:
        return
    try:
        topic = topic_template.format(key=value, pipeline=value)
    except ValueError:
        return
    TopicFilter(topic)  # what format() returns is always a valid, wildcard-free topic
    assert "+" not in topic and "#" not in topic


# ---- key_level ---------------------------------------------------------------------------------------
def test_key_level_defaults_to_the_first_plus():
    assert key_level(TopicFilter("sensors/+/imu"), None) == 1
    assert key_level(TopicFilter("+/x/+"), None) == 0
    assert key_level(TopicFilter("a/+/#"), None) == 1


def test_key_level_given_explicitly():
    assert key_level(TopicFilter("sensors/+/imu"), 2) == 2
    assert key_level(TopicFilter("site/dev1/imu"), 1) == 1  # a fixed level: one stream
    assert key_level(TopicFilter("a/b/#"), 1) == 1


@pytest.mark.parametrize("pattern, level, problem", [
    ("a/b", None, "subscription 'a/b' has no '\\+' level: set key_level or key_field"),
    ("a/#", None, "no '\\+' level"),
    ("a/+", 2, "2 level"),
    ("a/+", -1, "level"),
    ("a/b/#", 2, "before its '#'"),
    ("#", 0, "before its '#'"),
    ("a/+", True, "integer"),
    ("a/+", "1", "integer"),
])
def test_key_level_refuses(pattern, level, problem):
    with pytest.raises(ValueError, match=problem):
        key_level(TopicFilter(pattern), level)
