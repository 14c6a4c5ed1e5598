"""The worker: drains the inbox in micro-batches, advances streams, publishes predictions, acks inputs.

One pass over a micro-batch (every message in arrival order):

1. route each message to the pipelines whose subscriptions match its topic, decode it there; a payload
   that fails is rejected (counted by reason, logged rate-limited, published to the dead-letter topic
   when one is configured) before any state is touched;
2. per pipeline, journal the valid samples (``durability = "journal"``), then advance all those streams
   with one ``step_batch`` call per round (a stream with several messages in the batch gets one round
   per message, so its order is kept);
3. publish each prediction; when the broker has every output of a message (and its dead letter), the
   message is done. Duplicates and rejected messages without a dead-letter topic are done at once.

Acks go out in the order the messages were received, each once it and every message before it are done
(MQTT 3.1.1 section 4.6: PUBACKs in the order of the PUBLISHes). Acking each message as soon as it is done
put a rejected or duplicate message's ack before those of valid messages received earlier, and Mosquitto,
seeing acks out of order, then delivered later messages of a topic before earlier ones (its in-flight
window is 20 unless ``max_inflight_messages 1``): a stream's later sample arrived first, so the earlier one
counted as a duplicate by seq and was dropped -- samples lost (reliability/fuzz_live.py found it).

Nothing here blocks on the network: completions arrive on paho's thread and only count down.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from types import SimpleNamespace

import numpy as np

from .codecs import DecodeError, dead_letter
from .logs import RateLimitedLog
from .mqtt import delivery_id
from .pipeline import ACK_SEQ, NO_SEQ, QUIET_SEQ, RESET_SEQ

log = logging.getLogger(__name__)

LATENCY_SAMPLES = 32
INTERNAL_ERROR = "internal"
"""The reject reason of messages a failed micro-batch dropped (a bug or a failing disk, not the payload)."""


class Inbox:
    """The bounded queue between paho's network thread and the worker.

    Policy when full (``max_undelivered_messages``): a QoS 1 message waits on the network thread for
    room -- backpressure: the broker holds the rest, nothing is lost; a QoS 0 message is dropped and
    counted (``edgernn_queue_dropped_total``), as QoS 0 allows. The broker's in-flight window (MQTT 5:
    the Receive Maximum the daemon sends; Mosquitto on 3.1.1: ``max_inflight_messages``, 20 by default)
    should keep unacked QoS 1 messages below the capacity, but Mosquitto 2.0.11 was measured pushing
    thousands past a window of 20 under a flood (reliability/flood.py): this bound is what holds. Once `close` is
    called nothing waits: what arrives is left unacked for the broker to deliver again after the restart.
    While `stretched` (the worker waits for the outputs in flight to be confirmed, before a snapshot), the
    inbox takes up to twice its capacity: with ``separate_output_connection = false`` the confirmations
    come in the same connection as the inputs, so the network thread must keep reading, or a full inbox
    under a flood would hold the snapshot until its timeout. Past twice the capacity it waits again: memory stays bounded, and the snapshot is then
    skipped (said) and tried again later (measured: a flood had pushed 18,000 messages into the
    connection's receive buffer, more than any bound worth its memory).
    """

    def __init__(self, capacity: int, on_drop=None):
        self.capacity = capacity
        self._items: deque = deque()
        self._ready = threading.Condition()
        self._on_drop = on_drop or (lambda: None)
        self.closed = False
        self._stretched = False

    @contextlib.contextmanager
    def stretched(self):
        """QoS 1 messages do not wait for room meanwhile (class docstring)."""
        with self._ready:
            self._stretched = True
            self._ready.notify_all()
        try:
            yield
        finally:
            self._stretched = False

    def close(self) -> None:
        with self._ready:
            self.closed = True
            self._ready.notify_all()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item) -> None:
        items = self._items
        if len(items) < self.capacity and not self.closed:  # the fast path takes no lock: deque is thread-safe
            items.append(item)
            if len(items) == 1:  # the worker waits only on an empty inbox
                with self._ready:
                    self._ready.notify()
            return
        with self._ready:
            while len(items) >= self.capacity and not self.closed:
                if item.qos == 0:
                    self._on_drop()
                    return
                if self._stretched and len(items) < 2 * self.capacity:
                    break
                self._ready.wait(0.1)
            if not self.closed:
                items.append(item)

    def leftovers(self) -> list:
        """Whatever is still queued (after `close`, once the worker has stopped taking)."""
        items = list(self._items)
        self._items.clear()
        return items

    def take(self, limit: int, timeout: float) -> list:
        """Up to ``limit`` items, waiting at most ``timeout`` seconds for the first one (one consumer only)."""
        items = self._items
        if not items:
            with self._ready:
                if not items:
                    self._ready.wait(timeout)
        full = len(items) >= self.capacity
        batch = [items.popleft() for _ in range(min(limit, len(items)))]
        if full and batch:  # the network thread may be waiting for room
            with self._ready:
                self._ready.notify_all()
        return batch


class _Completion:
    """Counts down the outputs a message (or a journalled batch) waits for; runs ``then`` at zero."""

    __slots__ = ("remaining", "then", "held")

    def __init__(self, remaining: int, then):
        self.remaining = remaining
        self.then = then
        self.held = 0  # rows of this message the time stage holds (runtime/timing.py)


class Scheduler:
    """Owns the pipelines' state. Driven by one thread (the daemon's worker), one `take_and_process` at a time."""

    def __init__(self, pipelines, link, inbox: Inbox, metrics, max_batch: int, bad_input_log):
        self.pipelines = pipelines
        self.link = link
        self.inbox = inbox
        self.metrics = metrics
        self.max_batch = max_batch
        self.bad_input_log = bad_input_log
        self.journal_log = RateLimitedLog(log, 60.0)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0  # messages whose outputs the broker has not all confirmed yet
        self._done_batches: deque = deque()  # (pipeline, batch_no) whose outputs are all confirmed
        self._unacked: deque = deque()  # [inbound, done] of each QoS 1/2 message taken, in the order received
        self._ack_lock = threading.Lock()  # held while acking: acks leave in that order, from any thread
        self._routes: dict[str, list] = {}  # topic -> [(pipeline, topic key)], a cache of routing
        self.acking = True  # cleared when a final snapshot failed: what it lacks must come back from the broker
        # A cluster partition (runtime/cluster.py) acks a message only once a checkpoint stored in the cluster
        # holds its effects: until then its ack waits here, in order (`release_withheld`).
        self.withhold_acks = False
        self._withheld: list = []
        # Control topics (Home Assistant's birth message, model updates): topic -> handler(inbound), run on
        # this thread between the messages received before and after it (`process`).
        self.control: dict = {}

    # ---- completion bookkeeping (any thread) -----------------------------------------------------
    def _complete(self, *completions: _Completion) -> None:
        """One output (or rejection) of each completion is done; run the ``then`` of those at zero."""
        finished = []
        with self._lock:
            for completion in completions:
                completion.remaining -= 1
                if not completion.remaining:
                    finished.append(completion)
        for completion in finished:
            completion.then()

    def _message_done(self, entry: list) -> None:
        """``entry`` ([inbound, done]) is done: ack it and the done messages after it, once every message
        received before it is done too (module docstring)."""
        with self._ack_lock:
            entry[1] = True
            unacked = self._unacked
            while unacked and unacked[0][1]:
                inbound = unacked.popleft()[0]
                if self.withhold_acks:
                    self._withheld.append(inbound)
                elif self.acking:
                    self.link.ack(inbound)
        self._settled()

    def withheld(self) -> int:
        """How many acks wait for a checkpoint (`withhold_acks`)."""
        return len(self._withheld)

    def release_withheld(self, count: int) -> None:
        """Send the first ``count`` withheld acks, in order: a checkpoint now holds their messages' effects."""
        with self._ack_lock:
            released, self._withheld = self._withheld[:count], self._withheld[count:]
            if self.acking:
                for inbound in released:
                    self.link.ack(inbound)

    def _settled(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.notify_all()

    def republish(self, pipeline, batch_no: int, outputs: list) -> None:
        """Publish a replayed journal batch's predictions [(topic, payload)]; its 'done' record follows."""
        def finished():
            self._done_batches.append((pipeline, batch_no))
            self._settled()

        with self._lock:
            self._in_flight += 1
        batch = _Completion(len(outputs), finished)
        for topic, payload in outputs:
            self.link.publish(topic, payload, pipeline.publish_qos, pipeline.config.retain,
                              on_done=lambda: self._complete(batch))
        if not outputs:
            finished()

    def ack_leftover_copies(self) -> int:
        """At a stop: ack the redelivered copies still in the inbox (their originals are in the states the
        final snapshot holds; left unacked, the broker would deliver them again to the next process, which
        no longer expects them: a stream without seq would be stepped twice). Other messages stay unacked,
        for after the restart. Returns how many were acked."""
        copies = [inbound for inbound in self.inbox.leftovers() if inbound.copy]
        if self.acking:
            with self._ack_lock:
                for inbound in copies:
                    self.link.ack(inbound)
        return len(copies)

    def wait_idle(self, timeout: float, tick=None) -> bool:
        """Wait until every published output is confirmed (a consistent point for a snapshot).

        ``tick()`` runs about once a second meanwhile (the daemon pings systemd's watchdog there)."""
        deadline = time.monotonic() + timeout
        with self.inbox.stretched(), self._lock:
            while self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 1.0))
                if tick is not None:
                    tick()
        return True

    def finished_batches(self) -> list:
        """(pipeline, batch_no) pairs confirmed since the last call (journal 'done' records to write)."""
        done = []
        while self._done_batches:
            done.append(self._done_batches.popleft())
        return done

    # ---- one micro-batch -------------------------------------------------------------------------
    def take_and_process(self, timeout: float) -> int:
        items = self.inbox.take(self.max_batch, timeout)
        if items:
            self.process(items)
        return len(items)

    def process(self, items: list) -> None:
        """One micro-batch. A message on a control topic splits it: what came before it is processed first,
        then its handler runs (a model update swaps the model here), then what came after."""
        control = self.control
        if control:
            start = 0
            for index, inbound in enumerate(items):
                handler = control.get(inbound.topic)
                if handler is not None:
                    if index > start:
                        self._process(items[start:index])
                    self._run_control(handler, inbound)
                    start = index + 1
            items = items[start:]
            if not items:
                return
        self._process(items)

    def _run_control(self, handler, inbound) -> None:
        if not inbound.copy:  # a redelivered copy of one handled already is only acked, in its turn
            try:
                handler(inbound)
            except Exception:  # noqa: BLE001 -- a bug in a handler must not stop the worker
                log.exception("failed to handle the message on %r", inbound.topic,
                              extra={"event": "control_failed", "topic": inbound.topic})
        entry = [inbound, False]
        with self._lock:  # counted from now only: the handler may wait for the outputs in flight (a snapshot)
            self._in_flight += 1
        if inbound.qos:
            with self._ack_lock:
                self._unacked.append(entry)
        self._message_done(entry)

    def _process(self, items: list) -> None:
        self.metrics.batches.inc()
        self.metrics.batch_size.observe(len(items))
        with self._lock:
            self._in_flight += len(items)
        per_pipeline: dict = {}
        arrived: dict = {}
        entries = [[inbound, False] for inbound in items]
        with self._ack_lock:
            self._unacked.extend(entry for entry in entries if entry[0].qos)
        for inbound, entry in zip(items, entries):
            if inbound.copy:  # handled before a reconnect or a crash (runtime/mqtt.py): only acked, in its turn
                self._message_done(entry)
                continue
            routes = self._route(inbound.topic)
            message = _Completion(len(routes), lambda entry=entry: self._message_done(entry))
            if not routes:  # a retained or stray message outside every pipeline's subscription
                message.remaining = 1
                self._complete(message)
                continue
            for pipeline, topic_key in routes:
                arrived[pipeline] = arrived.get(pipeline, 0) + 1
                try:
                    key, topic, decoded = pipeline.decode(inbound.payload, topic_key)
                except DecodeError as error:
                    self._reject(pipeline, inbound, error, message)
                    continue
                per_pipeline.setdefault(pipeline, []).append((message, inbound, key, decoded, topic))
        for pipeline, count in arrived.items():
            pipeline.metrics.messages_in.inc(count)
        for pipeline, rows in per_pipeline.items():
            handled = [False] * len(rows)
            try:
                self._advance(pipeline, rows, handled)
            except Exception:  # noqa: BLE001 -- a bug or a full disk must not stop every other stream
                dropped = handled.count(False)
                log.exception("pipeline %s: failed on a micro-batch; %d of its %d messages are dropped",
                              pipeline.name, dropped, len(rows),
                              extra={"event": "batch_failed", "pipeline": pipeline.name})
                pipeline.metrics.rejected(INTERNAL_ERROR).inc(dropped)
                pipeline.batch_failures += 1
                for done, (message, *_) in zip(handled, rows):
                    if not done:
                        self._complete(message)

    def _route(self, topic: str) -> list:
        routes = self._routes.get(topic)
        if routes is None:
            routes = [(p, k) for p in self.pipelines if (k := p.topic_key(topic)) is not None]
            if len(self._routes) >= 100_000:  # bounded: a flood of distinct topics cannot grow it
                self._routes.clear()
            self._routes[topic] = routes
        return routes

    def _reject(self, pipeline, inbound, error: DecodeError, message: _Completion) -> None:
        pipeline.metrics.rejected(error.reason).inc()
        self.bad_input_log.warning((pipeline.name, error.reason), "pipeline %s: rejected a payload on %r: %s",
                                   pipeline.name, inbound.topic, error, pipeline=pipeline.name,
                                   reason=error.reason, event="rejected")
        if pipeline.dead_letter_topic is None:
            self._complete(message)
            return
        topic = pipeline.dead_letter_topic.format(pipeline=pipeline.name, key="")
        body = dead_letter(pipeline.name, inbound.topic, inbound.payload, error.reason, str(error))
        pipeline.metrics.dead_letters.inc()
        self.link.publish(topic, body, qos=inbound.qos, on_done=lambda: self._complete(message))

    def _advance(self, pipeline, rows: list, handled: list) -> None:
        if pipeline.timing is not None:
            self._advance_timed(pipeline, rows, handled)
            return
        keys = [row[2] for row in rows]
        seqs = np.fromiter((NO_SEQ if row[3].seq is None else row[3].seq for row in rows), np.int64, len(rows))
        X = np.stack([row[3].x for row in rows])
        self._step(pipeline, rows, keys, seqs, X, _timestamps(rows), _deliveries(rows), handled)
        self._observe_latency(rows)

    def _step(self, pipeline, rows: list, keys: list, seqs: np.ndarray, X: np.ndarray, ts: np.ndarray,
              deliveries: np.ndarray, handled: list, journal_extra=None) -> None:
        """Journal, step and publish ``rows`` ((completion, inbound, key, sample with .seq/.ts, topic)); a row's
        completion is completed once its prediction is confirmed, or at once when it has none to publish.
        ``journal_extra``: (keys, seqs, X, ts, deliveries) of rows journalled after them but not stepped."""
        batch_no = pipeline.new_batch_no()
        if pipeline.store.durability == "journal":
            journalled = (keys, seqs, X, ts, deliveries)
            if journal_extra is not None:
                journalled = (keys + journal_extra[0],) + tuple(
                    np.concatenate([ours, extra]) for ours, extra in zip(journalled[1:], journal_extra[1:]))
            try:
                pipeline.store.append_batch(batch_no, *journalled)
            except OSError as error:  # a full or failing disk: serve on (acks still follow the outputs)
                pipeline.metrics.journal_errors.inc()
                self.journal_log.warning(pipeline.name, "pipeline %s: cannot write the journal (%s): this batch "
                                         "is served without it and would not survive kill -9", pipeline.name,
                                         error, event="journal_failed", pipeline=pipeline.name)
        counts = np.empty(len(rows), np.int64)
        Y, stepped = pipeline.advance(keys, seqs, X, counts=counts)
        prediction, numbers = pipeline.prediction, counts.tolist()
        payloads = [prediction(key, Y[index], sample.seq, sample.ts, numbers[index]) if stepped[index] else None
                    for index, (_, _, key, sample, _) in enumerate(rows)]  # None: a duplicate, withheld or quiet
        published = len(payloads) - payloads.count(None)
        batch = _Completion(published, lambda: self._done_batches.append((pipeline, batch_no)))
        if not published:
            self._done_batches.append((pipeline, batch_no))
        qos, retain, publish = pipeline.publish_qos, pipeline.config.retain, self.link.publish
        for index, (message, inbound, key, sample, topic) in enumerate(rows):
            if payloads[index] is not None:
                publish(topic, payloads[index], qos, retain, on_done=lambda m=message: self._complete(m, batch))
            else:
                self._complete(message)
            handled[index] = True  # only now: a row that failed above is completed by its caller
        pipeline.metrics.messages_out.inc(published)

    # ---- the time stage (runtime/timing.py) ------------------------------------------------------
    # Each row is offered with itself as the token. A row neither stepped nor dropped by its own offer is
    # held: its message leaves `_in_flight` until it is released, so that `wait_idle` (every snapshot) is
    # not held up by a stream that waits for its next sample. Held rows are not journalled and not acked:
    # after a crash the broker delivers them again.
    def _advance_timed(self, pipeline, rows: list, handled: list) -> None:
        timing, now = pipeline.timing, time.monotonic()
        released = []
        for index, row in enumerate(rows):
            decoded = row[3]
            try:
                out = timing.offer(row[2], decoded.x, decoded.seq, decoded.ts, row, now)
            except Exception:  # noqa: BLE001 -- a bug: this stream's held messages are finished, the rest go on
                log.exception("pipeline %s: the time stage failed on stream %r; its held samples are dropped",
                              pipeline.name, row[2], extra={"event": "batch_failed", "pipeline": pipeline.name})
                pipeline.metrics.rejected(INTERNAL_ERROR).inc()
                lost = timing.forget(row[2])
                self._hold(row[0])  # finished below like the stream's held messages
                pipeline.forgotten.extend(lost if any(token is row for token in lost) else lost + [row])
                handled[index] = True
                continue
            self._returned(out, row)
            released.append((row[2], row[4], out))
            handled[index] = True  # from here on the time stage or the steps below finish it
        self._step_released(pipeline, released)
        self._observe_latency(rows)

    def release_due(self, now: float) -> None:
        """Step what the time stages release by ``now`` (reorder timeouts), and finish what they forgot
        (streams evicted or idle). The worker calls this every pass."""
        for pipeline in self.pipelines:
            if pipeline.forgotten:  # also after a reload that left the pipeline without a time stage
                self._finish_forgotten(pipeline)
            timing = pipeline.timing
            if timing is None:
                continue
            deadline = timing.next_deadline()
            if deadline is not None and deadline <= now:
                self._release(pipeline, self._guarded(pipeline, timing.due, now))

    def release_all(self) -> None:
        """At a stop: step everything held (held samples in seq order, open cells emitted), so the final
        snapshot holds every message acked (`runtime.timing.Timing.drain`)."""
        for pipeline in self.pipelines:
            if pipeline.timing is not None:
                self._release(pipeline, self._guarded(pipeline, pipeline.timing.drain))
            self._finish_forgotten(pipeline)

    def _guarded(self, pipeline, call, *args) -> list:
        """``call(*args)`` of the time stage; if it fails (a bug), every stream it holds is forgotten and its
        messages finished: one failure must neither stop the worker nor keep messages unacked for ever."""
        try:
            return call(*args)
        except Exception:  # noqa: BLE001
            log.exception("pipeline %s: the time stage failed; its held samples are dropped", pipeline.name,
                          extra={"event": "batch_failed", "pipeline": pipeline.name})
            pipeline.forgotten.extend(pipeline.timing.forget_all())
            self._finish_forgotten(pipeline)
            return []

    def journal_unacked_effects(self, pipeline) -> None:
        """Right after a snapshot: journal (as `ACK_SEQ` rows, done at once) the delivery ids of messages whose
        effects the snapshot holds but whose acks wait behind a message the time stage holds (acks leave in
        receive order). After a crash the broker sends them again; the replay then expects them as copies
        instead of stepping them a second time."""
        with self._ack_lock:
            waiting = [entry[0] for entry in self._unacked if entry[1]]
        if not waiting:
            return
        batch_no = pipeline.new_batch_no()
        pipeline.store.append_batch(batch_no, *_ack_rows([("", inbound) for inbound in waiting],
                                                         pipeline.model.input_size))
        pipeline.store.mark_done(batch_no)

    def next_deadline(self) -> float | None:
        """The earliest reorder timeout of every pipeline (monotonic seconds), or None."""
        deadlines = [d for p in self.pipelines if p.timing is not None and (d := p.timing.next_deadline()) is not None]
        return min(deadlines, default=None)

    def _release(self, pipeline, by_key: list) -> None:
        released = []
        for key, out in by_key:
            self._returned(out, None)
            released.append((key, pipeline.output_topic(key), out))
        if released:
            try:
                self._step_released(pipeline, released)
            except Exception:  # noqa: BLE001 -- as in `process`: one failure must not stop the worker
                log.exception("pipeline %s: failed on released samples", pipeline.name,
                              extra={"event": "batch_failed", "pipeline": pipeline.name})
                pipeline.batch_failures += 1

    def _finish_forgotten(self, pipeline) -> None:
        tokens, pipeline.forgotten = pipeline.forgotten, []
        for token in tokens:
            self._unhold(token[0])
        self._complete(*(token[0] for token in tokens))
        pipeline.count_timing()

    def _returned(self, out, offered) -> None:
        """Bookkeeping of the tokens one offer (``offered``: its row) or one release handed back."""
        offered_back = False
        for token in itertools.chain(*(step.tokens for step in out.steps), out.dropped):
            if token is offered:
                offered_back = True
            else:
                self._unhold(token[0])
        if out.dropped:
            self._complete(*(token[0] for token in out.dropped))
        if offered is not None and not offered_back:
            self._hold(offered[0])

    def _hold(self, message: _Completion) -> None:
        with self._lock:
            message.held += 1
            if message.held == 1:
                self._in_flight -= 1
                if not self._in_flight:
                    self._idle.notify_all()

    def _unhold(self, message: _Completion) -> None:
        with self._lock:
            message.held -= 1
            if not message.held:
                self._in_flight += 1

    def _step_released(self, pipeline, released: list) -> None:
        """Step the time stage's steps [(key, output topic, `Released`)]: each step is a row whose completion
        finishes its tokens' messages; a reset is a `RESET_SEQ` row before it; a message a step took in
        beyond its first is an `ACK_SEQ` row in the journal only (so a replay expects its redelivery)."""
        publish_filled = pipeline.config.publish_filled
        step_rows, seqs, extra = [], [], []
        filled, reset = 0, None
        for key, topic, out in released:
            for step in out.steps:
                if step.reset_before:
                    reset = reset or SimpleNamespace(seq=None, ts=None, x=np.zeros(pipeline.model.input_size, np.float32))
                    step_rows.append((_Completion(1, _nothing), None, key, reset, topic))
                    seqs.append(RESET_SEQ)
                tokens = step.tokens
                messages = tuple(token[0] for token in tokens)
                done = _Completion(1, (lambda m=messages: self._complete(*m)) if messages else _nothing)
                step_rows.append((done, tokens[0][1] if tokens else None, key, step, topic))
                if step.filled:
                    filled += 1
                    seqs.append(NO_SEQ if publish_filled else QUIET_SEQ)
                else:
                    seqs.append(NO_SEQ if step.seq is None else step.seq)
                extra.extend((key, token[1]) for token in tokens[1:] if token[1].qos)
        pipeline.count_timing()
        if not step_rows:
            return
        handled = [False] * len(step_rows)
        try:
            keys = [row[2] for row in step_rows]
            X = np.stack([row[3].x for row in step_rows])
            journal_extra = None
            if extra and pipeline.store.durability == "journal":
                journal_extra = _ack_rows(extra, X.shape[1])
            self._step(pipeline, step_rows, keys, np.array(seqs, np.int64), X, _timestamps(step_rows),
                       _deliveries(step_rows), handled, journal_extra)
        except Exception:
            lost = [row[0] for done, row in zip(handled, step_rows) if not done]
            pipeline.metrics.rejected(INTERNAL_ERROR).inc(sum(1 for done, row in zip(handled, step_rows)
                                                              if not done and row[1] is not None))
            self._complete(*lost)
            raise
        if pipeline.forgotten:  # streams evicted by the steps above
            self._finish_forgotten(pipeline)
        if filled and publish_filled:
            pipeline.metrics.filled_published.inc(filled)

    def _observe_latency(self, rows: list) -> None:
        """Arrival -> prediction handed to MQTT, for at most `LATENCY_SAMPLES` messages of the batch spread evenly over it
        (a histogram observation costs ~1 µs: every message would be a tenth of the per-message budget)."""
        now = time.monotonic()
        stride = max(1, len(rows) // LATENCY_SAMPLES)
        for row in rows[::stride]:
            self.metrics.latency_seconds.observe(now - row[1].received)


def _deliveries(rows) -> np.ndarray:
    return np.fromiter((delivery_id(i.mid, i.topic, i.payload) if i is not None and i.qos else 0
                        for _, i, *_ in rows), np.uint64, len(rows))


def _ack_rows(messages: list, input_size: int) -> tuple:
    """Journal columns (keys, seqs, X, ts, deliveries) of `ACK_SEQ` rows for [(key, inbound)]: rows a replay
    does not step, only expects the broker's copies of."""
    n = len(messages)
    return ([key for key, _ in messages], np.full(n, ACK_SEQ, np.int64), np.zeros((n, input_size), np.float32),
            np.full(n, np.nan), _deliveries([(None, inbound) for _, inbound in messages]))


def _nothing() -> None:
    pass


def _timestamps(rows) -> np.ndarray:
    return np.fromiter((np.nan if row[3].ts is None else row[3].ts for row in rows), np.float64, len(rows))
