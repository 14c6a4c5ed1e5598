"""The link's filter of the broker's redelivered copies (`runtime.mqtt._Redeliveries`), connection by
connection: the sequences a broker restart produces, each of which a live test hit only now and then."""

from __future__ import annotations

from edgernn.runtime.mqtt import _Redeliveries, delivery_id

TOPIC, BODY = "sensors/dev0/imu", b'{"x": [1, 2, 3], "ts": 7}'


def _connected(filter_: _Redeliveries, times: int = 1) -> _Redeliveries:
    for _ in range(times):
        filter_.connected()
    return filter_


def test_a_copy_of_a_message_not_yet_acked_is_dropped_and_left_for_the_worker_to_ack():
    seen = _connected(_Redeliveries())
    assert seen.is_copy(5, TOPIC, BODY, dup=False) == (False, False)
    seen.connected()  # the broker restarted before our ack
    assert seen.is_copy(5, TOPIC, BODY, dup=True) == (True, False)


def test_a_copy_whose_ack_was_lost_is_dropped_and_acked_again():
    seen = _connected(_Redeliveries())
    seen.is_copy(5, TOPIC, BODY, dup=False)
    seen.acked(5)
    seen.connected()
    assert seen.is_copy(5, TOPIC, BODY, dup=True) == (True, True)


def test_an_ack_lost_twice_in_a_row_still_finds_the_copy():
    """The broker restarted twice within two seconds: our ack in connection 1 was lost, the ack we sent
    again for its copy in connection 2 was lost too; connection 3's copy must not be stepped as new."""
    seen = _connected(_Redeliveries())
    seen.is_copy(5, TOPIC, BODY, dup=False)
    seen.acked(5)
    seen.connected()
    assert seen.is_copy(5, TOPIC, BODY, dup=True) == (True, True)
    seen.connected()
    assert seen.is_copy(5, TOPIC, BODY, dup=True) == (True, True)


def test_a_new_message_reusing_the_packet_id_is_never_a_copy():
    seen = _connected(_Redeliveries())
    seen.is_copy(5, TOPIC, BODY, dup=False)
    seen.acked(5)
    assert seen.is_copy(5, TOPIC, BODY, dup=False) == (False, False)  # same bytes, not a resend: a new sample
    seen.acked(5)
    seen.connected()
    assert seen.is_copy(5, TOPIC, b'{"x": [4, 5, 6]}', dup=True) == (False, False)  # another payload


def test_an_acked_entry_expires_after_the_next_connection():
    """Packet ids come back: an id acked two connections ago belongs to a new message, even with DUP."""
    seen = _connected(_Redeliveries())
    seen.is_copy(5, TOPIC, BODY, dup=False)
    seen.acked(5)
    _connected(seen, 2)
    assert seen.is_copy(5, TOPIC, BODY, dup=True) == (False, False)


def test_a_message_journalled_before_a_crash_is_recognised_by_its_delivery_id():
    seen = _Redeliveries()
    seen.expect(5, delivery_id(5, TOPIC, BODY))
    seen.connected()
    assert seen.is_copy(5, TOPIC, BODY, dup=True) == (True, True)
    assert seen.is_copy(5, TOPIC, BODY + b" ", dup=True) == (False, False)
