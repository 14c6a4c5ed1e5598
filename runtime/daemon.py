"""`edgernn serve`: wires config, pipelines, MQTT, the worker, persistence, metrics and systemd together.

Life of the daemon:

- start: load every model (a bad file stops the start with its name and problem), restore each
  pipeline's snapshot and replay its journal, re-publish the predictions a crash may have lost, start
  the metrics endpoint, connect (subscriptions follow in ``on_connect``), tell systemd READY=1;
- run: the worker thread drains the inbox in micro-batches; between batches it writes snapshots every
  ``snapshot_interval`` seconds (at a point where every published output is confirmed, so a snapshot
  holds exactly the acked messages), resets idle streams, publishes stats and pings systemd's watchdog;
- SIGHUP: reload the models between two micro-batches (states kept when the state shapes are unchanged,
  reset otherwise);
- SIGTERM/SIGINT: stop taking messages, finish the micro-batch in hand, wait (``shutdown_timeout``) for
  the broker to confirm the outputs, snapshot, publish ``offline``, disconnect. Messages received but not
  processed are not acked, so the broker delivers them again after the restart.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time

import numpy as np

from .backends import load_backend
from .codecs import REJECT_REASONS
from .logs import RateLimitedLog
from .metrics import Metrics
from .mqtt import MqttLink
from .pipeline import NO_SEQ, Pipeline, make_codecs, make_timing
from .scheduler import INTERNAL_ERROR, Inbox, Scheduler
from .sdnotify import Notifier, watchdog_interval

log = logging.getLogger(__name__)

TICK = 0.05
"""Longest the worker waits for a message before looking at its timers (seconds)."""


PERIODIC_SNAPSHOT_WAIT = 2.0
"""Seconds a periodic snapshot waits for the outputs in flight to be confirmed before it is skipped (and
tried again at the next interval): under a flood the worker must not stall for the full shutdown_timeout."""


class Daemon:
    def __init__(self, config, checkpoint=None, notifier: Notifier | None = None):
        """``checkpoint(pipelines) -> bool``: a cluster partition's (runtime/cluster.py): stores the snapshots
        just written in the cluster. With it, a message is acked only once a stored checkpoint holds it."""
        self.config = config
        self._checkpoint = checkpoint
        self.metrics = Metrics([p.name for p in config.pipelines], REJECT_REASONS + (INTERNAL_ERROR,))
        self.pipelines = [Pipeline(p, config.state, self.metrics.pipeline(p.name), loaded)
                          for p, loaded in (self._load_serving(p) for p in config.pipelines)]
        for pipeline in self.pipelines:
            self.metrics.set_model(pipeline.name, pipeline.model)
        self._drop_log = RateLimitedLog(log, config.log.bad_input_interval)
        self._reload_log = RateLimitedLog(log, 30.0)
        self.inbox = Inbox(config.daemon.max_undelivered_messages, on_drop=self._dropped)
        subscriptions = [(pattern, p.config.qos) for p in self.pipelines for pattern in p.config.subscribe]
        if config.homeassistant is not None:
            subscriptions.append((config.homeassistant.birth_topic, 1))
        if config.updates is not None:
            subscriptions += [(f"{config.updates.topic}/{p.name}", 1) for p in self.pipelines]
        self.link = MqttLink(config.broker, subscriptions, self.inbox.put, self._connection_changed,
                             receive_maximum=config.daemon.max_undelivered_messages,
                             on_publish_failed=self.metrics.publish_failures.inc)
        self.scheduler = Scheduler(self.pipelines, self.link, self.inbox, self.metrics, config.daemon.max_batch,
                                   RateLimitedLog(log, config.log.bad_input_interval))
        self.scheduler.withhold_acks = checkpoint is not None
        self.discovery = self.updates = None
        if config.homeassistant is not None:
            from .homeassistant import Discovery

            self.discovery = Discovery(config.homeassistant, config.broker, self.pipelines, self.link.publish)
            self.scheduler.control[config.homeassistant.birth_topic] = lambda inbound: self.discovery.handle_birth(
                inbound.payload)
        if config.updates is not None:
            from .updates import RESULTS, Updates

            for pipeline in self.pipelines:  # zeros rather than missing series (runtime/metrics.py)
                for result in RESULTS:
                    self.metrics.model_updates.labels(pipeline.name, result)
            self.updates = Updates(config, self.pipelines, self.swap_model,
                                   lambda pipeline, data=None: load_checked(config, pipeline, data), self.link.publish,
                                   lambda pipeline, result: self.metrics.model_updates.labels(pipeline, result).inc())
            self.scheduler.control.update(self.updates.handlers())
        self.notifier = notifier or Notifier()
        self.stopping = threading.Event()
        self._aborted = False
        self.inputs_closed_at: float | None = None  # wall time `hand_over` closed the inputs' connection
        self._reload = threading.Event()
        self._worker = None
        self.metrics_address = None
        self._republish: list = []
        self._final_snapshot = False  # whether the worker's last snapshot, at the stop, was written

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        for pipeline in self.pipelines:
            pipeline.warm_up()  # compile or load the kernels now, not on the first message (nor under the watchdog)
            self._recover(pipeline)
        try:
            if self.config.metrics.listen:
                self.metrics_address = self.metrics.serve(self.config.metrics.listen)
                log.info("metrics on http://%s:%d/metrics", *self.metrics_address, extra={"event": "metrics"})
            self.link.start()
        except BaseException:
            for pipeline in self.pipelines:  # nothing was served: the next start has no unclean stop to report
                pipeline.store.close()
            raise
        for pipeline, batch_no, outputs in self._republish:
            self.scheduler.republish(pipeline, batch_no, outputs)
        self._republish.clear()
        self._worker = threading.Thread(target=self._work, name="edgernn-worker", daemon=True)
        self._worker.start()
        self.notifier.ready()
        self.notifier.status(f"serving {len(self.pipelines)} pipeline(s)")
        log.info("serving %d pipeline(s): %s", len(self.pipelines), ", ".join(p.name for p in self.pipelines),
                 extra={"event": "started"})

    def run(self) -> int:
        """Start, then serve until SIGTERM/SIGINT (main thread only: it installs the signal handlers)."""
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())
        self.start()
        while not self.stopping.wait(0.5):
            if not self.worker_alive():
                log.error("the worker thread died; stopping", extra={"event": "worker_died"})
                self.stop()
                return 1
        return 0 if self.stop() else 1

    def stop(self) -> bool:
        """Drain, snapshot, go offline. Returns False when the worker did not finish in time.

        Bounded by ``shutdown_timeout`` for the final snapshot's wait, plus the micro-batch (or the
        snapshot) in hand, plus 5 s to say ``offline``.
        """
        self.stopping.set()
        self.notifier.stopping()
        self.inbox.close()  # nothing more is taken: what still arrives stays unacked, for after the restart
        self.link.stopping = True  # except copies of messages already acked (see Scheduler.ack_leftover_copies)
        clean = True
        if self._worker is not None:
            self._worker.join(self.config.daemon.shutdown_timeout + 5)
            if self._worker.is_alive():
                clean = False
                self.scheduler.acking = False  # its last snapshot is not written: the broker keeps the rest
                log.error("the worker did not finish within shutdown_timeout + 5 s: stopping without its final "
                          "snapshot", extra={"event": "stop_timeout"})
        if clean:
            self.scheduler.ack_leftover_copies()
        self.link.stop()
        self.metrics.stop()
        if clean:
            for pipeline in self.pipelines:
                # Without its final snapshot the state files lack what was acked since the last one: the
                # store keeps its "running" marker, and the next start says so (unclean_stop).
                pipeline.store.close(clean=self._final_snapshot)
        log.info("stopped", extra={"event": "stopped", "clean": clean})
        self.notifier.close()
        return clean

    @property
    def final_snapshot(self) -> bool:
        """Whether the stop's final snapshot (and, for a cluster partition, its checkpoint) was written."""
        return self._final_snapshot

    def worker_alive(self) -> bool:
        """Whether the worker thread runs (True before `start`)."""
        return self._worker is None or self._worker.is_alive()

    def hand_over(self) -> bool:
        """A cluster partition's clean stop (runtime/cluster.py): stop receiving first, then process what was
        received, then `stop`: the final checkpoint holds every message this session read. What NATS had
        sent it but it never read comes back only ``ack_wait`` later, so the successor waits that long after
        ``inputs_closed_at`` before it connects (`Partition._wait_for_handover`)."""
        self.link.stop_inputs()
        self.inputs_closed_at = time.time()
        deadline = time.monotonic() + self.config.daemon.shutdown_timeout
        while len(self.inbox) and time.monotonic() < deadline and self._worker.is_alive():
            time.sleep(0.01)
        return self.stop()

    def abort(self) -> None:
        """Stop at once: no final snapshot, no checkpoint, no ack, no ``offline`` (a cluster partition whose
        lease is lost: its successor may be serving it already, from the last checkpoint)."""
        self._aborted = True
        self.scheduler.acking = False
        self.stopping.set()
        self.inbox.close()
        self.link.stop(publish_offline=False)  # first: the successor's session must not meet this one
        if self._worker is not None:
            self._worker.join(PERIODIC_SNAPSHOT_WAIT + 5)
        self.metrics.stop()
        for pipeline in self.pipelines:
            pipeline.store.close(clean=False)
        log.warning("stopped without a final snapshot (aborted)", extra={"event": "aborted"})

    def reload(self) -> None:
        """Ask the worker to reload the models between two micro-batches (what SIGHUP does)."""
        self._reload.set()

    # ---- the worker thread -----------------------------------------------------------------------
    def _work(self) -> None:
        snapshot_every = self.config.state.snapshot_interval
        idle_every = min([p.config.idle_reset / 4 for p in self.pipelines if p.config.idle_reset > 0] + [1.0])
        stats_every = self.config.metrics.stats_interval if self.config.metrics.stats_topic else None
        watchdog_every = watchdog_interval()
        now = time.monotonic()
        next_snapshot, next_idle, next_stats, next_watchdog = (now + snapshot_every, now + idle_every,
                                                               now + (stats_every or 0), now)
        scheduler = self.scheduler
        while not self.stopping.is_set():
            deadline = scheduler.next_deadline()  # a held sample's reorder timeout (runtime/timing.py)
            scheduler.take_and_process(TICK if deadline is None else min(TICK, max(0.0, deadline - time.monotonic())))
            scheduler.release_due(time.monotonic())
            if self.updates is not None:
                self.updates.tick()  # swaps decided during the micro-batch (a promotion, a rollback)
            if self.discovery is not None:
                self.discovery.announce_pending()
            self._write_done_records()
            now = time.monotonic()
            self.metrics.queue_depth.set(len(self.inbox))
            if watchdog_every and now >= next_watchdog:
                self.notifier.watchdog()
                next_watchdog = now + watchdog_every
            if self._reload.is_set() and self._reload_models():
                self._reload.clear()
            if now >= next_snapshot:
                self._snapshot(PERIODIC_SNAPSHOT_WAIT)
                next_snapshot = time.monotonic() + snapshot_every
            if now >= next_idle:
                expired = sum(pipeline.expire_idle() for pipeline in self.pipelines)
                for pipeline in self.pipelines:
                    pipeline.metrics.streams_live.set(len(pipeline.table))
                if expired and self.config.state.durability == "journal":
                    self._snapshot()  # the journal does not record idle resets: a replay must start after them
                    next_snapshot = time.monotonic() + snapshot_every
                next_idle = now + idle_every
            if stats_every and now >= next_stats:
                self._publish_stats()
                next_stats = now + stats_every
        if self._aborted:
            return
        # Held samples are stepped (and their messages acked) before the final snapshot: left unacked, they
        # would hold back the acks of every message received after them, whose effects the snapshot holds.
        scheduler.release_all()
        self._final_snapshot = self._snapshot(self.config.daemon.shutdown_timeout)
        if not self._final_snapshot and self.config.state.durability == "snapshot":
            # Outputs confirmed from now on must not ack their inputs: the state on disk lacks them, so the
            # broker has to deliver them again after the restart.
            self.scheduler.acking = False

    def _write_done_records(self) -> None:
        for pipeline, batch_no in self.scheduler.finished_batches():
            pipeline.store.mark_done(batch_no)

    def _snapshot(self, timeout: float | None = None) -> bool:
        """Snapshot every pipeline once every output in flight is confirmed (skipped, and said, if not)."""
        timeout = self.config.daemon.shutdown_timeout if timeout is None else timeout
        if not self.scheduler.wait_idle(timeout, tick=self.notifier.watchdog):
            log.warning("snapshot skipped: outputs still unconfirmed after %g s (broker unreachable?)", timeout,
                        extra={"event": "snapshot_skipped"})
            return False
        self._write_done_records()
        written = True
        covered = self.scheduler.withheld()  # the acks this snapshot's checkpoint may release
        for pipeline in self.pipelines:
            try:
                pipeline.store.snapshot(pipeline.table)
                if pipeline.store.durability == "journal":
                    self.scheduler.journal_unacked_effects(pipeline)
            except OSError as error:
                written = False
                log.error("pipeline %s: snapshot failed: %s", pipeline.name, error,
                          extra={"event": "snapshot_failed", "pipeline": pipeline.name})
        if written and self._checkpoint is not None and not self._aborted:
            written = self._checkpoint(self.pipelines)
            if written:
                self.scheduler.release_withheld(covered)
        return written

    def _reload_models(self) -> bool:
        """Reload every pipeline's model between two snapshots; False (retried later) when the snapshot
        before it cannot be taken: the journal since then belongs to the current model."""
        if not self._snapshot(timeout=1.0):
            self._reload_log.warning("reload", "model reload postponed: outputs unconfirmed (broker unreachable?)",
                                     event="reload_postponed")
            return False
        self.notifier.reloading()
        for pipeline, source in zip(self.pipelines, self.config.pipelines):
            try:
                config = self._serving_configs(source)[0]
                kept = pipeline.reload(config, load_checked(self.config, config))
                self.metrics.set_model(pipeline.name, pipeline.model)
            except Exception as error:  # noqa: BLE001 -- a bad new file keeps the old model serving
                log.error("pipeline %s: reload failed, keeping the current model: %s", pipeline.name, error,
                          extra={"event": "reload_failed", "pipeline": pipeline.name})
                continue
            if not kept:
                pipeline.metrics.resets("reload").inc(len(pipeline.table))
            log.info("pipeline %s: model reloaded (%s)", pipeline.name, "states kept" if kept else "states reset",
                     extra={"event": "reloaded", "pipeline": pipeline.name, "states_kept": kept})
        self._snapshot()
        self.notifier.ready()
        if self.discovery is not None:
            self.discovery.pending = True  # the model's name or version shown may have changed
        if self.updates is not None:
            self.updates.reloaded()
        return True

    def swap_model(self, pipeline, config, loaded, keep_states: bool = True, after=None) -> bool | None:
        """Serve ``loaded`` (model, backend) of ``config`` for ``pipeline`` from the next message on, between two
        snapshots (a model update: runtime/updates.py); ``after(kept)`` runs between the swap and the second
        snapshot (what it changes is in that snapshot). Returns whether the states were kept, or None when the
        snapshot before it could not be taken (outputs unconfirmed): nothing changed, try again later."""
        if not self._snapshot(timeout=1.0):
            return None
        self.notifier.reloading()
        try:
            kept = pipeline.reload(config, loaded, keep_states)
            if not kept:
                pipeline.metrics.resets("reload").inc(len(pipeline.table))
            self.metrics.set_model(pipeline.name, pipeline.model)
            if after is not None:
                after(kept)
        finally:  # whatever failed (a full disk under `after`), the states served now are snapshotted
            self._snapshot()
            self.notifier.ready()
            if self.discovery is not None:
                self.discovery.pending = True
        return kept

    def _serving_configs(self, source) -> list:
        """The pipeline configs to serve, best first: with ``[updates]``, the installed update and the last good
        model before it (runtime/updates.py), then the config's own."""
        if self.config.updates is None:
            return [source]
        from .updates import serving_configs

        return serving_configs(self.config.updates, source)

    def _load_serving(self, source):
        """(config, (model, backend)) to start ``source``'s pipeline with: the first of `_serving_configs` that
        loads (a broken install is said, and the next one serves), its signature checked before it is loaded."""
        *installed, source = self._serving_configs(source)
        for config in installed:
            try:
                return config, load_checked(self.config, config)
            except Exception as error:  # noqa: BLE001 -- the next one serves: a start must not fail on an install
                log.error("pipeline %s: the installed model %s does not load (%s): trying the one before it",
                          source.name, config.model, error, extra={"event": "update_unloadable"})
        return source, load_checked(self.config, source)

    def _publish_stats(self) -> None:
        topic = self.config.metrics.stats_topic
        self.link.publish(topic, json.dumps(self.metrics.stats()).encode(), qos=0, retain=True)

    def _dropped(self) -> None:
        """A QoS 0 message found the inbox full (``max_undelivered_messages``): dropped, counted, said."""
        self.metrics.queue_dropped.inc()
        self._drop_log.warning("inbox_full", "inbox full (%d messages): QoS 0 messages are being dropped",
                               self.inbox.capacity, event="queue_dropped")

    def _connection_changed(self, connected: bool) -> None:
        self.metrics.connected.set(1 if connected else 0)
        if not connected:
            self.metrics.reconnects.inc()

    # ---- start-up recovery -----------------------------------------------------------------------
    def _recover(self, pipeline) -> None:
        """Restore the snapshot, replay the journal; keep the predictions that may not have gone out."""
        recovery = pipeline.store.recover(pipeline.table)  # it logs each problem it found itself
        republished = 0
        for batch in recovery.replayed:
            for delivery in batch.deliveries.tolist():
                if delivery:
                    self.link.expect_redelivery(delivery)
            counts = np.empty(len(batch.keys), np.int64)
            Y, stepped = pipeline.advance(batch.keys, batch.seqs, batch.X, counts=counts)
            if batch.batch_no not in recovery.undone:
                continue
            outputs = []
            for index in np.flatnonzero(stepped):
                key = batch.keys[index]
                seq = None if batch.seqs[index] == NO_SEQ else int(batch.seqs[index])
                ts = None if np.isnan(batch.ts[index]) else float(batch.ts[index])
                payload = pipeline.prediction(key, Y[index], seq, ts, counts[index])
                if payload is not None:  # None: withheld during warm-up
                    outputs.append((pipeline.output_topic(key), payload))
            self._republish.append((pipeline, batch.batch_no, outputs))
            republished += len(outputs)
        pipeline.next_batch_no = recovery.next_batch_no
        pipeline.metrics.streams_live.set(len(pipeline.table))
        log.info("pipeline %s: %d streams restored, %d journalled batches replayed, %d predictions to re-publish",
                 pipeline.name, recovery.restored_streams, len(recovery.replayed), republished,
                 extra={"event": "recovered", "pipeline": pipeline.name})


def check(config) -> list[str]:
    """What ``serve --check`` verifies without the broker or the state dir (a running daemon holds its
    lock): every model file loads with its backend, and every pipeline's codecs fit its model."""
    lines = []
    for pipeline in config.pipelines:
        model, backend = load_checked(config, pipeline)
        lines.append(f"pipeline {pipeline.name}: {pipeline.model} {model!r} on {backend.name} ({backend.device})")
    return lines


def load_checked(config, pipeline, data: bytes | None = None):
    """The (model, backend) of ``pipeline`` (a `PipelineConfig` of ``config``), its file's signature checked first
    (or ``data``: its bytes, checked already), and the model checked against the pipeline: payload sizes, time
    options (gap_policy and input_rate need a sample rate), Home Assistant sensors. What `serve --check`, a
    start, a reload and a model update each do before a model serves; raises naming the file and the problem."""
    model, backend = load_backend(pipeline, check_signatures(config, pipeline) if data is None else data)
    make_codecs(pipeline, model)
    make_timing(pipeline, model)
    if config.homeassistant is not None and pipeline.homeassistant.enabled:
        from .homeassistant import check_pipeline

        check_pipeline(config.source, pipeline, model)
    return model, backend


def check_signatures(config, pipeline) -> bytes | None:
    """With ``[signing] trusted_keys``: every file ``pipeline`` loads as a model carries a valid signature by
    one of them (`edgernn.signing`); raises `SignatureError` naming the file otherwise. Returns the model
    file's bytes as checked (load those, not the file again), or None without trusted keys."""
    if not config.signing.trusted_keys:
        return None
    from edgernn.signing import load_public_key, read_verified, verify_file

    keys = [load_public_key(path) for path in config.signing.trusted_keys]
    if pipeline.onnx_model is not None:
        verify_file(pipeline.onnx_model, keys)
    return read_verified(pipeline.model, keys)[0]
