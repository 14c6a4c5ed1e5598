"""One configured pipeline: topics in, samples decoded, streams advanced in order, predictions out.

The pipeline owns its model, backend, state table (one row per stream key, with each stream's last
``seq`` and last-seen time beside it) and state store. It is used by exactly one thread, the scheduler's.

Sequence numbers (when payloads carry ``seq``), per stream:

- ``seq <= last`` is a duplicate (a redelivery or a device resending): dropped, the state untouched;
- ``seq > last + 1`` is a gap: counted (``edgernn_seq_gaps_total``, and its ``seq - last - 1`` missing
  samples in ``edgernn_samples_missed_total``: lost on the way, or acked since the snapshot a crash went
  back to, see `runtime.persistence`), and with ``seq_gap = "reset"`` the stream restarts from the
  model's rest state before this sample;
- ``seq`` at least `SEQ_RESTART_DISTANCE` below the last is a device that restarted its counter: counted
  with the gaps (and reset like a gap with ``"reset"``), not mistaken for thousands of duplicates. A
  device that restarts sooner than that has its first samples taken for duplicates until its counter
  passes the old one: a late redelivery (seq 0 arriving after seq 2) must not step the state again.

Warm-up (``warmup_steps = K``): a stream's first K predictions since it started from the rest state (new,
reset by a gap or idle policy, evicted and back, or restarted by a reload that changed the state layout)
are still a start-up transient. Each stream counts its predictions (column ``steps``); `prediction`
marks the first K ``"warm": false`` or withholds them (``warmup_policy``). A withheld prediction's sample
still advances the state, and its message is acked like any other.

Time, order and gaps (``reorder_window``, ``gap_policy``, ``input_rate``): when the policy is `active`, the
pipeline has a `runtime.timing.Timing` (``self.timing``, else None) that the scheduler offers each sample
to and steps what it releases. Those steps reach `advance` as rows like any other, with `seq` codes below
`NO_SEQ` for what a row cannot say otherwise -- `QUIET_SEQ` (a filled step whose prediction is not
published), `RESET_SEQ` (the stream back to its rest state before its next row, not stepped) and `ACK_SEQ`
(not stepped: only the journal's record of one more message a step took in) -- so that a journal replay
steps exactly what was stepped live.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from edgernn.protocol import TopicFilter, TopicTemplate, key_level
from edgernn.streams import StreamTable

from .backends import load_backend
from .codecs import DecodeError, Decoder, Encoder
from .config import WARM_FIELD, ConfigError
from .persistence import StateStore
from .timing import Timing, TimingPolicy

log = logging.getLogger(__name__)

SEQ_RESTART_DISTANCE = 1000
CLOCK_JUMP = 2.0
"""Seconds the wall clock may drift from the monotonic clock between two idle sweeps before it counts as
a jump (the sweeps run every second or so)."""
MAX_KEY_LENGTH = 1024
"""Longest stream key accepted (characters): keys live in snapshots, journals and topics."""
NO_SEQ = -1
QUIET_SEQ = -2
"""A row stepped without a seq whose prediction is not published (a filled step without ``publish_filled``)."""
RESET_SEQ = -3
"""A row that puts its stream back to the rest state (a gap the time policy resets on); not stepped."""
ACK_SEQ = -4
"""A row that only carries the delivery id of another message a step took in (journal replay); not stepped."""
STREAM_COLUMNS = {"seq": (np.int64, NO_SEQ), "seen": (np.float64, 0.0), "steps": (np.int64, 0)}
"""Per-stream bookkeeping kept beside each state and saved in snapshots: last seq, last-seen wall time,
predictions made since the stream (re)started from the rest state."""
STEPS_UNKNOWN = 2**62
"""``steps`` of a stream restored from a snapshot written before that column existed: it has run for an
unknown time, so it is taken as warm (far past any ``warmup_steps``, far below int64 overflow)."""


class Pipeline:
    """Everything one ``[[pipelines]]`` entry does, minus MQTT (the scheduler publishes and acks)."""

    def __init__(self, config, state_config, metrics, loaded=None):
        """``loaded``: the (model, backend) of ``config`` when the caller loaded it already (checked bytes)."""
        self.config = config
        self.name = config.name
        self.metrics = metrics  # this pipeline's pre-bound metric children
        self.model, self.backend = loaded or load_backend(config)
        self.filters = [TopicFilter(pattern) for pattern in config.subscribe]
        self._key_levels = [None if config.key_field else key_level(f, config.key_level) for f in self.filters]
        self.decoder, self.encoder = make_codecs(config, self.model)
        self.publish_topic = TopicTemplate(config.publish)
        self.dead_letter_topic = TopicTemplate(config.dead_letter) if config.dead_letter else None
        self.publish_qos = config.effective_publish_qos
        self.table = StreamTable(self.model, max_streams=config.max_streams, columns=STREAM_COLUMNS,
                                 on_evict=self._evicted)
        self.store = StateStore(state_config.dir, self.name, state_config.durability, state_config.journal_fsync,
                                missing_columns={"steps": STEPS_UNKNOWN})
        self.next_batch_no = 0
        self._last_sweep = None  # (wall, monotonic) at the last idle sweep
        self.timing = make_timing(config, self.model)
        self._timing_counted = dict.fromkeys(self.timing.counters, 0) if self.timing is not None else {}
        self.forgotten: list = []  # tokens `Timing.forget` handed back, for the scheduler to finish
        # Hooks, None when unused: Home Assistant discovery (runtime/homeassistant.py) hears of streams that
        # start and of streams evicted or forgotten; a model update on probation or in shadow
        # (runtime/updates.py) sees every round stepped: observer(keys, seqs, X, Y, published, counts), counts
        # each stream's steps since its rest state (1: it started, or restarted, at this row).
        self.on_streams_added = None
        self.on_stream_removed = None
        self.observer = None
        self.batch_failures = 0  # micro-batches the scheduler dropped on an exception (a model update watches it)

    def reload(self, config=None, loaded=None, keep_states: bool = True) -> bool:
        """Load the model file again (or serve ``config``'s, or the ``loaded`` (model, backend) of it); keep
        every stream's state when ``keep_states`` and the state shapes are unchanged.

        Returns whether the states were kept (otherwise every stream restarts from the new rest state).
        A file that fails to load raises and leaves the current model serving.
        """
        config = config or self.config
        model, backend = loaded or load_backend(config)
        # a stream's held samples and grid belong to the old period and input size: finished, unstepped
        period_changed = (model.sample_period, model.input_size) != (self.model.sample_period, self.model.input_size)
        timing = make_timing(config, model) if period_changed else self.timing  # raises before any change
        if model.input_size != self.model.input_size:
            self.decoder, _ = make_codecs(config, model)
        self.config = config
        if period_changed:
            if self.timing is not None:
                self.forgotten.extend(self.timing.forget_all())  # counted as "forgotten"
                self.count_timing()
            self.timing = timing
            self._timing_counted = dict.fromkeys(timing.counters, 0) if timing is not None else {}
        kept = keep_states and model.spec.state_shapes == self.model.spec.state_shapes
        self.table.replace_model(model, keep_states=kept)
        if not kept:  # every stream is back at the (new) rest state: its warm-up starts again
            self.table.columns["steps"][:] = 0
        self.model, self.backend = model, backend
        return kept

    def warm_up(self) -> None:
        """Step a scratch stream once: the backend compiles (or loads from its cache) before serving."""
        states = self.model.new_state(batch=1)
        self.backend.step_batch(states, np.zeros(1, np.int64), np.zeros((1, self.model.input_size), np.float32))

    # ---- routing and decoding --------------------------------------------------------------------
    def topic_key(self, topic: str):
        """The stream key a topic names (``""`` when the key comes from the payload), or None: not ours."""
        for topic_filter, level in zip(self.filters, self._key_levels):
            levels = topic_filter.match(topic)
            if levels is not None:
                return "" if level is None else levels[level]
        return None

    def decode(self, payload: bytes, topic_key: str):
        """(stream key, output topic, `Decoded`); raises `DecodeError` for anything a payload can get wrong.

        The output topic is built here, before any state is touched, so a key that cannot make a topic
        (empty, too long, or with a wildcard) is a rejected payload, not a failure after stepping.
        """
        decoded = self.decoder.decode(payload)
        key = decoded.key if self.config.key_field else topic_key
        if not key:
            raise DecodeError("bad_key", "empty stream key")
        if len(key) > MAX_KEY_LENGTH:
            raise DecodeError("bad_key", f"stream key of {len(key)} characters (at most {MAX_KEY_LENGTH})")
        try:
            topic = self.output_topic(key)
        except ValueError as error:
            raise DecodeError("bad_key", f"stream key {key[:80]!r} makes no valid topic: {error}") from None
        return key, topic, decoded

    def output_topic(self, key: str) -> str:
        return self.publish_topic.format(key=key, pipeline=self.name)

    # ---- advancing streams -----------------------------------------------------------------------
    def advance(self, keys: list[str], seqs: np.ndarray, X: np.ndarray, now: float | None = None,
                counts: np.ndarray | None = None):
        """Step each row's stream by its sample, in row order per stream.

        ``seqs`` (n,) int64 with `NO_SEQ` where a payload had none. Returns (Y (n, O), stepped (n,) bool):
        rows that were duplicates are not stepped and their Y rows are undefined. ``counts``, an (n,) int64
        array, receives each stepped row's prediction number in its stream (1 = the first since the stream
        started from the rest state), what `prediction` takes.
        """
        now = time.time() if now is None else now
        Y = np.empty((len(keys), self.model.output_size), np.float32)
        stepped = np.zeros(len(keys), bool)
        if counts is None:
            counts = np.empty(len(keys), np.int64)
        acks_only = seqs == ACK_SEQ  # journal-only rows: they must not touch the table (not even its LRU order)
        if acks_only.any():
            kept = np.flatnonzero(~acks_only)
            keys, seqs, X = [keys[i] for i in kept], seqs[kept], X[kept]
            counts_kept = np.empty(len(kept), np.int64)
            Y[kept], stepped[kept] = self.advance(keys, seqs, X, now, counts=counts_kept)
            counts[kept] = counts_kept
            return Y, stepped
        for rows in _rounds(keys, self.table.max_streams):
            self._advance_round(rows, [keys[i] for i in rows], seqs[rows], X[rows], now, Y, stepped, counts)
        return Y, stepped

    def prediction(self, key: str, y: np.ndarray, seq, ts, count: int) -> bytes | None:
        """The payload of a stream's ``count``-th prediction, or None: withheld during warm-up (counted)."""
        if count > self.config.warmup_steps:
            return self.encoder.encode(key, y, seq, ts)
        if self.config.warmup_policy == "withhold":
            self.metrics.warmup_withheld.inc()
            return None
        return self.encoder.encode(key, y, seq, ts, warm=False)

    def _advance_round(self, rows, keys, seqs, X, now, Y, stepped, counts) -> None:
        table = self.table
        added = [key for key in keys if key not in table] if self.on_streams_added is not None else None
        slots = table.slots_for(keys)  # an eviction it makes is said (on_stream_removed) before the announcement
        columns = table.columns  # after slots_for: it may grow
        if added:
            self.on_streams_added(added)
        seq_column, seen_column, steps_column = columns["seq"], columns["seen"], columns["steps"]
        last = seq_column[slots]
        special = seqs < NO_SEQ  # rows from the time stage (module docstring)
        quiet = None
        if special.any():
            self._reset_for_timing(slots[seqs == RESET_SEQ])
            quiet = seqs == QUIET_SEQ
            special &= ~quiet  # quiet rows are stepped, without a seq
            seqs = np.where(quiet, NO_SEQ, seqs)
        known = (seqs != NO_SEQ) & (last != NO_SEQ) & ~special
        restart = known & (last - seqs >= SEQ_RESTART_DISTANCE)
        duplicate = known & (seqs <= last) & ~restart
        gap = known & (seqs - 1 > last)  # not last + 1: a seq of 2**63 - 1 would overflow
        if duplicate.any():
            self.metrics.duplicates.inc(int(duplicate.sum()))
        if gap.any() or restart.any():
            self.metrics.seq_gaps.inc(int(gap.sum() + restart.sum()))
            if gap.any():  # a counter restart tells nothing of how many samples went missing
                self.metrics.samples_missed.inc(sum((seqs[gap] - last[gap] - 1).tolist()))  # seqs <= 2**63-1, last >= 0 here: no overflow
            if self.config.seq_gap == "reset":
                reset = gap | restart
                self.model.reset(table.states, slots[reset])
                steps_column[slots[reset]] = 0
                self.metrics.resets("gap").inc(int(reset.sum()))
        go = ~(duplicate | special)
        if not go.any():
            return
        go_slots = slots[go]
        started = time.perf_counter()
        Y[rows[go]] = self.backend.step_batch(table.states, go_slots, np.ascontiguousarray(X[go]))
        self.metrics.step_seconds.observe(time.perf_counter() - started)
        with_seq = go & (seqs != NO_SEQ)
        seq_column[slots[with_seq]] = seqs[with_seq]
        seen_column[go_slots] = now
        steps_column[go_slots] += 1  # the slots of one round are distinct
        counts[rows[go]] = steps_column[go_slots]
        stepped[rows[go if quiet is None else go & ~quiet]] = True
        if self.observer is not None:
            self.observer([keys[i] for i in np.flatnonzero(go)], seqs[go], X[go], Y[rows[go]],
                          np.ones(int(go.sum()), bool) if quiet is None else ~quiet[go], steps_column[go_slots])

    def _reset_for_timing(self, slots: np.ndarray) -> None:
        """The time stage's resets (`RESET_SEQ`), as a seq gap reset does them."""
        if len(slots):
            self.model.reset(self.table.states, slots)
            self.table.columns["steps"][slots] = 0
            self.metrics.resets("gap").inc(len(slots))

    def count_timing(self) -> None:
        """Bring ``edgernn_timing_total`` up to the time stage's counters (it counts by itself)."""
        if self.timing is None:
            return
        counted = self._timing_counted
        for reason, value in self.timing.counters.items():
            if value != counted[reason]:
                self.metrics.timing(reason).inc(value - counted[reason])
                counted[reason] = value

    def expire_idle(self, now: float | None = None, monotonic: float | None = None) -> int:
        """Forget streams silent for ``idle_reset`` seconds: they restart from the rest state. Returns how many.

        Last-seen times are wall-clock (they outlive the process in snapshots), so a wall clock that jumps
        while the daemon runs -- a Raspberry Pi without a real-time clock setting its time by NTP after
        boot -- would make every stream look idle at once. A jump (wall time moving more than 2 s apart
        from the monotonic clock between two sweeps) shifts every last-seen time by it instead.
        """
        if self.config.idle_reset <= 0:
            return 0
        now = time.time() if now is None else now
        monotonic = time.monotonic() if monotonic is None else monotonic
        if self._last_sweep is not None:
            jump = (now - self._last_sweep[0]) - (monotonic - self._last_sweep[1])
            if abs(jump) > CLOCK_JUMP:
                self.table.columns["seen"] += jump
                log.warning("pipeline %s: the wall clock jumped by %+.1f s; last-seen times shifted with it",
                            self.name, jump, extra={"event": "clock_jump", "pipeline": self.name, "jump": jump})
        self._last_sweep = (now, monotonic)
        stale = self.table.stale("seen", now - self.config.idle_reset)
        for key in stale:
            self.table.drop(key)
            if self.on_stream_removed is not None:
                self.on_stream_removed(key)
            if self.timing is not None:
                self.forgotten.extend(self.timing.forget(key))
        if stale:
            self.metrics.resets("idle").inc(len(stale))
            log.info("pipeline %s: %d idle streams reset", self.name, len(stale),
                     extra={"event": "idle_reset", "pipeline": self.name, "streams": len(stale)})
        return len(stale)

    def _evicted(self, key) -> None:
        self.metrics.evictions.inc()
        if self.on_stream_removed is not None:
            self.on_stream_removed(key)
        if self.timing is not None:
            self.forgotten.extend(self.timing.forget(key))

    def new_batch_no(self) -> int:
        self.next_batch_no += 1
        return self.next_batch_no - 1


def make_timing(config, model) -> Timing | None:
    """The pipeline's time stage, or None when its options leave every sample as it is (today's path)."""
    needs_period = [option for option, used in (("gap_policy", config.gap_policy != "ignore"),
                                                ("input_rate", config.input_rate is not None)) if used]
    if needs_period and model.sample_period is None:
        option = needs_period[0]
        raise ConfigError(config.model, None, f"pipeline {config.name!r}: {option} = {getattr(config, option)!r} "
                          "needs the model's sample rate, and this model file has none (give it one: "
                          "edgernn convert --sample-rate HZ)")
    policy = TimingPolicy(reorder_window=config.reorder_window, reorder_timeout=config.reorder_timeout_ms / 1000.0,
                          gap_policy=config.gap_policy, max_fill=config.max_fill,
                          sample_period=model.sample_period, input_rate=config.input_rate)
    return Timing(policy) if policy.active else None


def make_codecs(config, model) -> tuple[Decoder, Encoder]:
    """A pipeline's payload decoder (for ``model``'s input size) and prediction encoder."""
    decoder = Decoder(config.data_format, model.input_size, x_field=config.x_field, seq_field=config.seq_field,
                      ts_field=config.ts_field, key_field=config.key_field,
                      fields=list(config.fields) if config.fields else None,
                      csv_columns=list(config.csv_columns) if config.csv_columns else None,
                      max_payload_bytes=config.max_payload_bytes)
    marks = config.warmup_steps > 0 and config.warmup_policy == "mark"
    encoder = Encoder(config.output_format, y_field=config.y_field, seq_field=config.seq_field,
                      ts_field=config.ts_field, warm_field=WARM_FIELD if marks else None)
    return decoder, encoder


def _rounds(keys: list[str], max_keys: int) -> list[np.ndarray]:
    """Row indexes split so that each round holds a key at most once, keeping each key's rows in order,
    and at most ``max_keys`` keys (a table of ``max_streams`` cannot hold more at once).

    One round when the keys are distinct (the common case: one message per stream per micro-batch).
    """
    if len(set(keys)) == len(keys):
        return [np.arange(start, min(start + max_keys, len(keys))) for start in range(0, len(keys), max_keys)]
    seen: dict[str, int] = {}
    rounds: list[list[int]] = []
    for index, key in enumerate(keys):
        r = seen.get(key, 0)
        seen[key] = r + 1
        if r == len(rounds):
            rounds.append([])
        rounds[r].append(index)
    return [np.array(r[start:start + max_keys], dtype=np.int64) for r in rounds for start in range(0, len(r), max_keys)]
