"""A fleet of simulated devices, hundreds of them, driven from ONE thread.

One paho client per device (each its own connection, client id, will and session), but no paho thread
per client: the loop here owns every socket through `selectors` and calls paho's external-loop API
(``loop_read``, ``loop_write``, ``loop_misc``; sockets come and go through ``on_socket_open`` /
``on_socket_close``). Each tick it

1. takes every sample that is due (a heap of per-device due times on a fixed grid with per-device phase
   and jitter: a loop that falls behind catches up on the same grid and counts the lag),
2. hands buffered messages to paho (`Device.pump`, a bounded number per device and tick, within the
   device's in-flight window),
3. now and then: storms, reconnects with exponential backoff, keepalive pings,
4. waits in ``select`` until the next sample is due, reading PUBACKs and CONNACKs meanwhile.

A publish is written to the socket inside ``client.publish`` (paho does that when no write callback is
registered); only when the socket is full does a device ask the selector for write readiness.

Connecting is a blocking TCP connect (`Device.connect`, paho's ``reconnect``): instant on a LAN or
loopback, but a broker that drops connection attempts stalls the loop for ``connect_timeout`` per attempt.
So one timed-out attempt backs off the whole host (the next attempt, by any device, waits out the host's
own exponential backoff), a pass of attempts starts none after `CONNECT_PASS_S` or once the fleet is told
to stop, and draining starts none that could outlast its deadline once the host has timed out: stopping
takes at most about ``max(connect_timeout, drain_timeout)`` (one more ``connect_timeout`` only if the broker
starts dropping attempts in the middle of the drain).
"""

from __future__ import annotations

import heapq
import logging
import random
import selectors
import socket
import threading
import time

from edgernn.protocol import TopicTemplate

from .device import Device
from .faults import MALFORMED_KINDS, MESSAGE_FAULTS, FaultInjector, Faults
from .schedule import FileTimes, LagMeter, Periodic

log = logging.getLogger(__name__)

DEFAULT_TOPIC = "sensors/{device}/{profile}"
CONNECT_PASS_S = 0.2  # one pass of connection attempts starts none after this long: sampling goes on meanwhile


def signal_seed(fleet_seed: int, index: int) -> int:
    """The signal seed of device ``index`` in a fleet seeded ``fleet_seed``: `signals.generate` with it
    gives exactly the samples that device measures (before faults)."""
    return fleet_seed * 1_000_000 + index


class Fleet:
    """Simulated devices ``<prefix>0000``... publishing ``profile`` samples at ``rate_hz`` to one broker.

    ``run(duration)`` blocks; ``start()`` / ``stop()`` run it in a background thread. ``stats()``,
    ``truth(device_id, seq)`` and ``devices`` may be read from any thread while it runs. ``sources``
    replaces the signal generators (one per device, e.g. a replayed file; see replay.py). ``labels`` puts
    each sample's true label in its payload, so any MQTT client can score predictions (`edgernn.scoreboard`).
    ``storm_victims`` lists the device ids each storm drew (those offline at the time were skipped): the same
    for the same seed, whatever the timing.
    """

    def __init__(self, profile: str = "imu", devices: int = 10, rate_hz: float | None = None,
                 host: str = "127.0.0.1", port: int = 1883, seed: int = 0, faults: Faults | None = None,
                 qos: int = 1, topic: str = DEFAULT_TOPIC, buffer: int = 1000, *, id_prefix: str = "dev",
                 jitter: float = 0.05, record: bool = False, sources: list | None = None, window: int = 20,
                 flush_per_tick: int | None = None, keepalive: int = 30, truth_window: int = 4096,
                 tick: float = 0.002, connect_wait: float = 5.0, connect_timeout: float = 5.0, drain_timeout: float = 10.0,
                 reconnect_delay: tuple[float, float] = (0.25, 8.0), labels: bool = False):
        if sources is not None:
            devices = len(sources)
        if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
            raise ValueError(f"devices must be a positive integer, got {devices!r}")
        if qos not in (0, 1):
            raise ValueError(f"qos must be 0 or 1, got {qos!r}")
        template = TopicTemplate(topic, allowed=("device", "profile"))
        if devices > 1 and "device" not in template.placeholders:
            raise ValueError(f"topic {topic!r}: a fleet of {devices} devices needs {{device}} in its topic")
        if not 0.0 <= jitter < 0.5:
            raise ValueError(f"jitter is a fraction of the sample period, 0 to below 0.5, got {jitter!r}")
        if not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be a positive number of seconds, got {connect_timeout!r}")
        if window < 1 or (flush_per_tick is not None and flush_per_tick < 1) or tick < 0:
            raise ValueError("window and flush_per_tick must be at least 1, tick at least 0")
        if not id_prefix or any(char in id_prefix for char in "/+#\0"):
            raise ValueError(f"id prefix {id_prefix!r}: must be non-empty, without '/', '+', '#' or NUL")
        if sources is None:
            from .signals import make_signal

            sources = [make_signal(profile, rate_hz, signal_seed(seed, i)) for i in range(devices)]
        self.profile = profile
        self.host, self.port = host, port
        self.seed = seed
        self.faults = faults or Faults()
        self.qos = qos
        self.topic = topic
        self.jitter = jitter
        self.flush_per_tick = flush_per_tick or window
        self.tick = tick
        self.connect_wait, self.connect_timeout, self.drain_timeout = connect_wait, connect_timeout, drain_timeout
        self.reconnect_delay = reconnect_delay
        width = max(4, len(str(devices - 1)))
        self.devices: list[Device] = []
        injecting = self.faults.any_message_faults
        for index, source in enumerate(sources):
            device_id = f"{id_prefix}{index:0{width}d}"
            injector = FaultInjector(self.faults, f"faults/{seed}/{index}") if injecting else None
            device = Device(device_id, source, template.format(device=device_id, profile=profile), self, qos=qos,
                            buffer=buffer, injector=injector, window=window, record=record,
                            truth_window=truth_window, keepalive=keepalive, labels=labels,
                            connect_timeout=connect_timeout)
            self.devices.append(device)
        self._by_id = {device.id: device for device in self.devices}
        self.rate_hz = getattr(sources[0], "rate_hz", None)
        self._selector: selectors.BaseSelector | None = None
        self._heap: list[tuple[float, int]] = []
        self._schedules: list = []
        self._pending: set[Device] = set()     # a non-empty buffer
        self._writers: set[Device] = set()     # registered for write readiness
        self._offline: dict[Device, float] = {}     # not connected: when to try again
        self._connecting: dict[Device, float] = {}  # socket open, no CONNACK yet: since when
        self._retry: dict[Device, float] = {}
        self._storm_until: dict[Device, float] = {}
        self._storms = random.Random(f"storms/{seed}")
        self._backoff_jitter = random.Random(f"backoff/{seed}")  # apart, so storms stay seeded
        self._next_storm: float | None = None
        self._next_misc = 0.0
        self._storm_count = self._storm_drops = self._storm_skips = 0
        self.storm_victims: list[tuple[str, ...]] = []
        self._host_retry_at = 0.0  # after a connect timed out: no attempt, by any device, before this
        self._host_delay = reconnect_delay[0]
        self._host_timed_out = False  # the last attempt that settled it: timed out, not connected
        self._last_connect_error: str | None = None
        self._lag = LagMeter()
        self._closing = False
        self._stop = threading.Event()
        self._started = threading.Event()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._t0 = self._t_end = None
        self._stop_requested: float | None = None
        self._wall0 = 0.0

    # ---- public API -----------------------------------------------------------------------------------

    def run(self, duration: float | None = None) -> dict:
        """Connect, sample for ``duration`` seconds (None: until `stop` or every source ran out), publish
        what is buffered (up to ``drain_timeout``), disconnect cleanly. Returns `stats`."""
        if self._selector is not None:
            raise RuntimeError("a fleet runs once: make a new one")
        try:
            self._connect_all()
            self._started.set()
            self._sample_loop(duration)
            self._drain()
        finally:
            self._started.set()
            try:
                self._close()
            finally:
                self._close_sources()
        return self.stats()

    def start(self, duration: float | None = None) -> "Fleet":
        """`run` in a background thread; returns once the devices are connected (or ``connect_wait``)."""
        if self._thread is not None:
            raise RuntimeError("this fleet was started already")

        def target():
            try:
                self.run(duration)
            except BaseException as error:  # noqa: BLE001 -- handed to the thread that calls stop()
                self._error = error
                log.exception("fleet stopped by an error")
            finally:
                self._finished.set()

        self._thread = threading.Thread(target=target, name="edgernn-fleet", daemon=True)
        self._thread.start()
        self._started.wait()
        return self

    def stop(self, timeout: float | None = None) -> dict:
        """Stop sampling, publish what is buffered (``drain_timeout`` from now at most), disconnect; returns
        `stats`."""
        if self._stop_requested is None:
            self._stop_requested = time.monotonic()
        self._stop.set()
        self.wait(timeout)
        if self._error is not None:
            raise self._error
        return self.stats()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a started fleet to finish (its duration, or `stop`); True when it has.

        An Event, not ``Thread.join``: a KeyboardInterrupt inside ``join`` can leave CPython believing the
        thread ended, and a later ``join`` then returns while the fleet is still draining.
        """
        return self._thread is None or self._finished.wait(timeout)

    def truth(self, device_id: str, seq: int):
        """The true label of ``device_id``'s sample ``seq``, or None (unknown device, or out of its window)."""
        device = self._by_id.get(device_id)
        return None if device is None else device.truth(seq)

    def device(self, device_id: str) -> Device:
        return self._by_id[device_id]

    def stats(self) -> dict:
        devices = self.devices
        faults = dict.fromkeys(MESSAGE_FAULTS, 0)
        malformed = dict.fromkeys(MALFORMED_KINDS, 0)
        for device in devices:
            if device.injector is not None:
                for name, count in device.injector.counts.items():
                    faults[name] += count
                for name, count in device.injector.malformed_counts.items():
                    malformed[name] += count
        faults["storm"] = self._storm_drops
        now = time.monotonic()
        end = self._t_end if self._t_end is not None else now
        elapsed = max(0.0, end - self._t0) if self._t0 is not None else 0.0
        samples = sum(device.seq for device in devices)
        expected = sum(schedule.due_by(end) for schedule in self._schedules)
        return {
            "devices": len(devices), "profile": self.profile, "rate_hz": self.rate_hz, "qos": self.qos,
            "faults_spec": self.faults.spec(), "elapsed_s": round(elapsed, 3),
            "samples": samples, "expected_samples": expected,
            "achieved_ratio": round(samples / expected, 5) if expected else None,
            "achieved_rate_hz": round(samples / elapsed / len(devices), 3) if elapsed else None,
            "published": sum(device.published for device in devices),
            "acked": sum(device.acked for device in devices),
            "in_flight": sum(device.in_flight for device in devices),
            "buffered": sum(len(device.buffer) for device in devices),
            "dropped_by_buffer": sum(device.buffer_dropped for device in devices),
            "connected": sum(device.connected for device in devices),
            "connects": sum(device.connects for device in devices),
            "disconnects": sum(device.disconnects for device in devices),
            "last_connect_error": self._last_connect_error,
            "storms": self._storm_count, "storm_victims_offline": self._storm_skips,
            "faults": faults, "malformed_kinds": malformed,
            "lag": self._lag.summary(),
        }

    # ---- what the devices report (called from inside paho, on the fleet's thread) ----------------------

    def socket_opened(self, device: Device, sock) -> None:
        self._selector.register(sock, selectors.EVENT_READ, device)

    def socket_closed(self, device: Device, sock) -> None:
        self._writers.discard(device)
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def device_connected(self, device: Device) -> None:
        self._connecting.pop(device, None)
        self._offline.pop(device, None)
        self._retry.pop(device, None)
        self._pending.add(device)  # the status message, and the buffer

    def device_lost(self, device: Device, reason) -> None:
        self._connecting.pop(device, None)
        if self._closing:
            return
        now = time.monotonic()
        delay = self._retry.get(device, self.reconnect_delay[0])
        self._retry[device] = min(delay * 2, self.reconnect_delay[1])
        when = now + delay * self._backoff_jitter.uniform(0.75, 1.25)  # spread a fleet's reconnects out
        self._offline[device] = max(when, self._storm_until.pop(device, 0.0))
        log.debug("%s: connection lost (%s), next attempt in %.2f s", device.id, reason, self._offline[device] - now)

    # ---- the loop -------------------------------------------------------------------------------------

    def _connect_all(self) -> None:
        self._selector = selectors.DefaultSelector()
        now = time.monotonic()
        for device in self.devices:
            self._offline[device] = now
        self._reconnect_due(now)
        deadline = now + self.connect_wait
        while time.monotonic() < deadline and not self._stop.is_set():
            if all(device.connected for device in self.devices):
                break
            self._housekeeping(time.monotonic(), storms=False)
            self._pump()
            self._poll(0.01)
        missing = [device.id for device in self.devices if not device.connected]
        if missing:
            log.warning("%d of %d devices not connected to %s:%d after %.1f s (first: %s%s); they keep trying",
                        len(missing), len(self.devices), self.host, self.port, time.monotonic() - now, missing[0],
                        f", {self._last_connect_error}" if self._last_connect_error else "")

    def _sample_loop(self, duration: float | None) -> None:
        start = time.monotonic() + 0.01
        self._t0, self._wall0 = start, time.time() + 0.01
        end = None if duration is None else start + duration
        heap = self._heap
        for index, device in enumerate(self.devices):
            rng = random.Random(f"clock/{self.seed}/{index}")
            rate = getattr(device.source, "rate_hz", None)
            if rate:
                period = 1.0 / rate
                schedule = Periodic(rate, start, rng.uniform(0.0, period), self.jitter, rng)
            else:
                schedule = FileTimes(device.source, start, getattr(device.source, "speed", 1.0))
            self._schedules.append(schedule)
            due = schedule.next()
            if due is not None:
                heap.append((due, index))
        heapq.heapify(heap)
        devices, schedules, lag = self.devices, self._schedules, self._lag
        per_tick = max(64, 2 * len(devices))  # samples per tick at most, so I/O is served when behind
        next_housekeeping = 0.0
        while heap and not self._stop.is_set():
            now = time.monotonic()
            if end is not None and now >= end:
                break
            taken = 0
            while heap and heap[0][0] <= now and taken < per_tick:
                due, index = heap[0]
                if end is not None and due >= end:
                    break
                device, schedule = devices[index], schedules[index]
                lag.add(now - due, schedule.period)
                if device.sample(self._wall0 + (due - start)):
                    self._pending.add(device)
                following = schedule.next()
                if following is None or device.done:
                    heapq.heappop(heap)
                else:
                    heapq.heapreplace(heap, (following, index))
                taken += 1
            self._pump()
            if now >= next_housekeeping:
                self._housekeeping(now, storms=True)
                next_housekeeping = now + 0.05
            # Sleep, not select: acknowledgements arriving meanwhile would wake the loop once each. At most
            # one tick per `tick` seconds, so sends and reads come in bursts (samples keep their own ts).
            wake = max(heap[0][0] if heap else now + 0.05, now + self.tick)
            if end is not None:
                wake = min(wake, end)
            delay = min(wake, now + 0.05) - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self._poll(0.0)
        self._t_end = min(time.monotonic(), end) if end is not None else time.monotonic()

    def _drain(self) -> None:
        """After sampling: publish everything buffered, wait for the acknowledgements (bounded)."""
        for device in self.devices:
            device.finish()
            if device.buffer:
                self._pending.add(device)
        deadline = (self._stop_requested or time.monotonic()) + self.drain_timeout  # from Ctrl-C, not later
        while time.monotonic() < deadline:
            if all(device.settled for device in self.devices):
                return
            self._housekeeping(time.monotonic(), storms=False, deadline=deadline)
            self._pump()
            self._poll(max(0.0, min(0.01, deadline - time.monotonic())))
        if all(device.settled for device in self.devices):
            return
        unsent = sum(len(device.buffer) + device.in_flight for device in self.devices)
        log.warning("%d messages not sent or not acknowledged within the drain timeout (%.1f s)", unsent,
                    self.drain_timeout)

    def _close(self) -> None:
        """A clean stop for every connected device, then the sockets are closed."""
        self._closing = True
        if self._selector is None:
            return
        for device in self.devices:
            try:
                device.shutdown()
            except OSError:
                pass
        deadline = time.monotonic() + 2.0
        while self._selector.get_map() and time.monotonic() < deadline:
            self._poll(0.01)
        for key in list(self._selector.get_map().values()):  # a socket that would not finish: close it
            self._selector.unregister(key.fileobj)
            key.fileobj.close()
        self._selector.close()

    def _close_sources(self) -> None:
        """A replayed file stays open while it is read: close it, also when the run stopped early."""
        for device in self.devices:
            close = getattr(device.source, "close", None)
            if close is not None:
                try:
                    close()
                except OSError as error:
                    log.debug("%s: closing its source: %s", device.id, error)

    def _pump(self) -> None:
        limit = self.flush_per_tick
        done = []
        for device in self._pending:
            if device.connected:
                device.pump(limit)
                if device.client.want_write():
                    self._want_write(device)
            if not device.buffer:
                done.append(device)
        for device in done:
            self._pending.discard(device)

    def _poll(self, timeout: float) -> None:
        for key, mask in self._selector.select(timeout):
            device = key.data
            client = device.client
            if mask & selectors.EVENT_READ:
                client.loop_read()
            if client.socket() is None:
                continue
            if mask & selectors.EVENT_WRITE:
                client.loop_write()
            if client.socket() is None:
                continue
            if client.want_write():
                client.loop_write()  # e.g. what on_connect queued: paho does not write from callbacks
                if client.socket() is not None and client.want_write():
                    self._want_write(device)
            elif device in self._writers:
                self._writers.discard(device)
                self._selector.modify(client.socket(), selectors.EVENT_READ, device)
            if device.buffer:
                self._pending.add(device)  # acknowledgements opened its window

    def _want_write(self, device: Device) -> None:
        if device not in self._writers and device.client.socket() is not None:
            self._writers.add(device)
            self._selector.modify(device.client.socket(), selectors.EVENT_READ | selectors.EVENT_WRITE, device)

    def _housekeeping(self, now: float, storms: bool, deadline: float | None = None) -> None:
        if storms and self.faults.storm_every:
            self._storm(now)
        self._reconnect_due(now, deadline)
        for device, since in list(self._connecting.items()):
            if now - since > self.connect_timeout:
                log.debug("%s: no CONNACK within %.1f s", device.id, self.connect_timeout)
                device.drop_connection()
        if now >= self._next_misc:
            self._next_misc = now + 1.0
            for device in self.devices:
                if device.client.socket() is not None:
                    device.client.loop_misc()  # keepalive pings

    def _reconnect_due(self, now: float, deadline: float | None = None) -> None:
        """Connect the devices whose next attempt is due, one blocking TCP connect each.

        Starts no attempt after `CONNECT_PASS_S`, once the fleet is told to stop (unless draining: then none
        that could outlast ``deadline``), or while the host is backed off. A connect that timed out says the
        host drops attempts, and trying each device in turn would stall the loop for ``connect_timeout`` per
        device: the whole host backs off instead.
        """
        if now < self._host_retry_at:
            return
        pass_end = time.monotonic() + CONNECT_PASS_S
        for device, when in list(self._offline.items()):
            if when > now:
                continue
            started = time.monotonic()
            if started >= pass_end:
                break
            if deadline is None:
                if self._stop.is_set():
                    break
            elif started >= deadline or (self._host_timed_out and started + self.connect_timeout > deadline):
                break
            del self._offline[device]
            try:
                device.connect(self.host, self.port)
            except (TimeoutError, socket.gaierror) as error:  # the host, not this device: back off the host
                self._connect_failed(device, error)
                self._host_timed_out = True
                delay = self._host_delay * self._backoff_jitter.uniform(0.75, 1.25)
                self._host_delay = min(self._host_delay * 2, self.reconnect_delay[1])
                self._host_retry_at = time.monotonic() + delay
                log.info("connecting to %s:%d: %s; the next attempt, by any device, in %.2f s",
                         self.host, self.port, self._last_connect_error, delay)
                return
            except OSError as error:
                self._connect_failed(device, error)
            else:
                self._host_delay, self._host_timed_out = self.reconnect_delay[0], False
                self._connecting[device] = time.monotonic()
                if device.client.want_write():
                    self._want_write(device)

    def _connect_failed(self, device: Device, error: OSError) -> None:
        self._last_connect_error = str(error) or type(error).__name__
        log.debug("%s: cannot connect to %s:%d: %s", device.id, self.host, self.port, self._last_connect_error)
        self.device_lost(device, error)

    def _storm(self, now: float) -> None:
        if self._next_storm is None:
            self._next_storm = now + self._storms.expovariate(1.0 / self.faults.storm_every)
        if now < self._next_storm:
            return
        self._next_storm = now + self._storms.expovariate(1.0 / self.faults.storm_every)
        # Drawn from every device, connected or not, so the seeded stream never depends on timing.
        count = min(len(self.devices), max(1, round(self.faults.storm_fraction * len(self.devices))))
        victims = [self.devices[index] for index in self._storms.sample(range(len(self.devices)), count)]
        self.storm_victims.append(tuple(device.id for device in victims))
        online = [device for device in victims if device.connected]
        self._storm_count += 1
        self._storm_drops += len(online)
        self._storm_skips += len(victims) - len(online)
        log.info("storm: dropping %d devices for %.1f s (%d drawn were offline)", len(online),
                 self.faults.storm_downtime, len(victims) - len(online))
        for device in online:
            self._storm_until[device] = now + self.faults.storm_downtime
            device.drop_connection()
