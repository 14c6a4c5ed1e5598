"""Scale-out (docs/scale-out.md): this daemon as one worker of several behind a NATS cluster. The only
module that talks NATS itself (nats-py); the devices' MQTT still goes through `runtime.mqtt`.

NATS maps each device's topic into one of P partitions (`runtime.nats_config`). A worker serves a
partition only while it holds the partition's **lease**, a key in a replicated JetStream key-value bucket
whose entries expire ``lease_ttl`` after their last renewal: claimed with ``create`` (which fails while
another worker holds it), renewed with ``update(last=revision)`` (which fails once another has claimed
it), deleted at a clean stop so a standby takes over at once.

For each partition it holds, the worker runs a `Daemon` (runtime/daemon.py) of its own: a persistent QoS 1
MQTT session with the client id ``<client_id>-part-<p>`` subscribed to ``part/<p>/<filter>``, state files
in ``<state dir>/part-<p>``. Its snapshots are **checkpoints**: every ``checkpoint_interval`` the daemon
snapshots its stream table once every prediction so far is confirmed, the snapshot goes to a replicated
JetStream object store, and only then are the messages it covers acked (`Scheduler.withhold_acks`):
the "commit the offsets after the checkpoint" rule of Kafka and Flink consumers. Whoever serves the
partition next (after a clean stop, a kill -9, a lost node) restores the last checkpoint, and the broker
delivers again exactly the messages it does not hold; ``seq`` drops the ones it does.

Fencing: a worker stops serving a partition (`Daemon.abort`: no snapshot, no ack) once its last
successful renewal is older than ``lease_ttl - renew_interval``, before the lease can expire and another
worker claim it, and never connects with a partition's client id without the lease (two live sessions
with one client id steal it from each other). Measured reasons for the defaults are in docs/scale-out.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import re
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field

from .daemon import Daemon
from .nats_config import partition_filter
from .sdnotify import Notifier, watchdog_interval

log = logging.getLogger(__name__)

CLAIM_INTERVAL = 1.0
"""Seconds between two looks for free partitions (NATS 2.9 says nothing when a key expires: poll)."""
NATS_TIMEOUT = 5.0
"""Seconds one request to NATS may take (a stream leader's election took up to 11 s: renewals retry)."""
LAG_SUBJECT = "$MQTT.msgs.part.{}."
"""The subject prefix of a partition's messages in NATS's MQTT message stream (for `cluster_status`)."""
MQTT_MESSAGES_STREAM = "$MQTT_msgs"
FENCE_INTERVAL = 0.2
"""Seconds between two checks of the leases by the fencer thread."""
HANDOVER_MARGIN = 1.0
"""Seconds a successor waits beyond ack_wait after a clean handover."""
CONNECT_WAIT = 10.0
"""Seconds a partition's start waits for its MQTT connection before it says it serves (it goes on trying)."""


def lease_key(partition: int) -> str:
    return f"part-{partition}"


def handover_key(partition: int) -> str:
    return f"handover-{partition}"


def leases_bucket(cluster) -> str:
    return f"{cluster.bucket}_leases"


def checkpoint_name(partition: int, pipeline: str) -> str:
    return f"part-{partition}.{pipeline}.snapshot"


def partition_config(config, partition: int):
    """The config of the `Daemon` that serves ``partition``: its own MQTT session, topics, state files."""
    cluster = config.cluster
    broker = dataclasses.replace(config.broker, client_id=f"{config.broker.client_id}-part-{partition}",
                                 status_topic=f"{config.broker.status_topic}/part-{partition}")
    pipelines = tuple(dataclasses.replace(
        pipeline, subscribe=tuple(partition_filter(pattern, partition) for pattern in pipeline.subscribe),
        key_level=None if pipeline.key_level is None else pipeline.key_level + 2)  # part/<p>/ comes first
        for pipeline in config.pipelines)
    state = dataclasses.replace(config.state, dir=config.state.dir / f"part-{partition}",
                                snapshot_interval=cluster.checkpoint_interval)
    metrics = dataclasses.replace(config.metrics, listen=None, stats_topic=None)
    return dataclasses.replace(config, broker=broker, pipelines=pipelines, state=state, metrics=metrics,
                               cluster=None)


# ---- NATS ------------------------------------------------------------------------------------------------
class Nats:
    """nats-py's asyncio client on a thread of its own, called synchronously (``call``) from the others."""

    def __init__(self, servers, name: str):
        import nats  # lazily: only a cluster worker needs nats-py (edgernn[cluster])

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="edgernn-nats", daemon=True)
        self._thread.start()
        try:
            self.client = self.call(nats.connect(servers=list(servers), name=name, connect_timeout=2,
                                                 max_reconnect_attempts=-1, reconnect_time_wait=0.5), 30)
        except Exception as error:
            self._stop_loop()
            raise ConnectionError(f"cannot connect to NATS at {', '.join(servers)}: {error!r}") from None
        self.js = self.client.jetstream(timeout=NATS_TIMEOUT)

    def call(self, coroutine, timeout: float = NATS_TIMEOUT):
        """Run ``coroutine`` on the NATS thread; on timeout it is cancelled, not left to finish later."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def close(self) -> None:
        try:
            self.call(self.client.close())
        except Exception as error:  # noqa: BLE001 -- closing: nothing left to protect
            log.debug("closing NATS: %r", error)
        self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()


async def _bucket(js, cluster):
    """The lease bucket, created on first use with the TTL that makes an unrenewed lease expire."""
    from nats.js.api import KeyValueConfig
    from nats.js.errors import BadRequestError, BucketNotFoundError

    name = leases_bucket(cluster)
    try:
        kv = await js.key_value(name)
    except BucketNotFoundError:
        pass
    else:
        ttl = (await kv.status()).ttl
        if ttl is None or abs(ttl - cluster.lease_ttl) > 0.01:
            # The server expires leases at the bucket's TTL: a longer lease_ttl here would let two workers
            # serve one partition.
            raise ValueError(f"the lease bucket {name} expires entries after {ttl} s, but [cluster] lease_ttl "
                             f"is {cluster.lease_ttl:g} s: give every worker the same lease_ttl, or delete the "
                             "bucket (nats kv del) while no worker runs")
        return kv
    try:
        return await js.create_key_value(KeyValueConfig(bucket=name, history=1, ttl=cluster.lease_ttl,
                                                        replicas=cluster.replicas))
    except BadRequestError:  # another worker created it meanwhile
        return await js.key_value(name)


async def _store(js, cluster):
    from nats.js.api import ObjectStoreConfig
    from nats.js.errors import BadRequestError, NotFoundError

    name = f"{cluster.bucket}_checkpoints"
    try:
        return await js.object_store(name)
    except NotFoundError:
        try:
            return await js.create_object_store(name, ObjectStoreConfig(replicas=cluster.replicas))
        except BadRequestError:
            return await js.object_store(name)


@dataclass
class Lease:
    """A partition held by this worker: the revision of our last write, and when the last write that succeeded
    was sent (its TTL ran from then at the latest)."""
    partition: int
    revision: int
    token: str
    since: float  # wall time of the claim
    renewed: float  # time.monotonic() when the last successful write was sent
    lost: bool = False  # another worker holds it now (our update was refused)
    stats: dict = field(default_factory=dict)  # shown by `edgernn cluster status`


class Leases:
    """Claim, renew (on the NATS thread, so a slow partition start cannot let them lapse), release."""

    def __init__(self, nats: Nats, cluster, worker: str):
        self.nats = nats
        self.cluster = cluster
        self.worker = worker
        self.kv = nats.call(_bucket(nats.js, cluster), 30)
        self.held: dict[int, Lease] = {}
        self._lock = threading.Lock()
        self._renewing = asyncio.run_coroutine_threadsafe(self._renew_forever(), nats.loop)

    def _value(self, lease: Lease) -> bytes:
        return json.dumps({"worker": self.worker, "token": lease.token, "since": lease.since,
                           "renewed": time.time(), **lease.stats}).encode()

    def claim(self, partition: int) -> Lease | None:
        """The lease of ``partition`` if it was free (None if another worker holds it or NATS is away)."""
        from nats.js.errors import KeyWrongLastSequenceError

        lease = Lease(partition, 0, uuid.uuid4().hex, time.time(), time.monotonic())  # valid from the request on
        try:
            lease.revision = self.nats.call(self.kv.create(lease_key(partition), self._value(lease)))
        except KeyWrongLastSequenceError:
            return None
        except Exception as error:  # noqa: BLE001 -- NATS away or electing a leader; or stored, answer lost
            revision = self._ours(lease)
            if revision is None:
                log.debug("claim of partition %d failed: %r", partition, error)
                return None
            lease.revision = revision
        with self._lock:
            self.held[partition] = lease
        return lease

    def _ours(self, lease: Lease) -> int | None:
        """The revision of the lease's key if it holds our token: a write whose answer was lost may have been
        stored (elections lose answers), and then the lease is ours, not lost."""
        try:
            value = self.nats.call(_get_entry(self.kv, lease_key(lease.partition)))
        except Exception:  # noqa: BLE001 -- unknown: not ours
            return None
        if value is not None and json.loads(value[0]).get("token") == lease.token:
            return value[1]
        return None

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cluster.renew_interval)
            with self._lock:
                leases = list(self.held.values())
            await asyncio.gather(*(self._renew(lease) for lease in leases))

    async def _renew(self, lease: Lease) -> None:
        from nats.js.errors import KeyWrongLastSequenceError

        sent = time.monotonic()  # the new TTL runs from the request, not from the answer
        try:
            revision = await asyncio.wait_for(
                self.kv.update(lease_key(lease.partition), self._value(lease), last=lease.revision), NATS_TIMEOUT)
        except KeyWrongLastSequenceError:
            try:
                entry = await asyncio.wait_for(_get_entry(self.kv, lease_key(lease.partition)), NATS_TIMEOUT)
            except Exception:  # noqa: BLE001 -- tried again at the next renewal
                return
            if entry is not None and json.loads(entry[0]).get("token") == lease.token:
                lease.revision = entry[1]  # our earlier renewal was stored, its answer lost: still ours
                return
            lease.lost = True  # it expired and another worker claimed it
            log.error("partition %d: lease taken by another worker", lease.partition,
                      extra={"event": "lease_lost", "partition": lease.partition})
        except Exception as error:  # noqa: BLE001 -- counted against the TTL by `valid`
            log.warning("partition %d: lease renewal failed: %r", lease.partition, error,
                        extra={"event": "lease_renewal_failed", "partition": lease.partition})
        else:
            lease.revision, lease.renewed = revision, sent

    def valid(self, lease: Lease) -> bool:
        """Still ours for sure: renewed recently enough that it cannot have expired and been claimed."""
        return not lease.lost and time.monotonic() - lease.renewed < self.cluster.lease_ttl - self.cluster.renew_interval

    def release(self, lease: Lease) -> None:
        """Give the partition up (after its final checkpoint): the next claim need not wait for the TTL."""
        with self._lock:
            self.held.pop(lease.partition, None)
        if lease.lost:
            return
        try:
            self.nats.call(self.kv.delete(lease_key(lease.partition), last=lease.revision))
        except Exception as error:  # noqa: BLE001 -- it expires by itself after lease_ttl
            log.warning("partition %d: lease not released (%r): it expires in %g s", lease.partition, error,
                        self.cluster.lease_ttl, extra={"event": "lease_release_failed", "partition": lease.partition})

    def record_handover(self, lease: Lease, closed_at: float) -> None:
        """Say when the partition's inputs were closed at a clean stop (the successor waits from then on); the
        record expires with the bucket's TTL. Raises if NATS does not take it."""
        self.nats.call(self.kv.put(handover_key(lease.partition), json.dumps({"closed_at": closed_at}).encode()))

    def handover_closed_at(self, partition: int) -> float | None:
        """When the last owner closed ``partition``'s inputs at a clean stop, if it said so within the TTL."""
        entry = self.nats.call(_get_entry(self.kv, handover_key(partition)))
        return None if entry is None else json.loads(entry[0])["closed_at"]

    def forget(self, lease: Lease) -> None:
        with self._lock:
            self.held.pop(lease.partition, None)

    def stop(self) -> None:
        self._renewing.cancel()


class Checkpoints:
    """Each partition's snapshot files in a replicated JetStream object store (KV values stop at 1 MiB)."""

    def __init__(self, nats: Nats, cluster):
        self.nats = nats
        self.store = nats.call(_store(nats.js, cluster), 30)

    def put(self, partition: int, pipeline: str, data: bytes) -> None:
        self.nats.call(self.store.put(checkpoint_name(partition, pipeline), data), 30)

    def get(self, partition: int, pipeline: str) -> bytes | None:
        from nats.js.errors import NotFoundError, ObjectDeletedError, ObjectNotFoundError

        try:
            return self.nats.call(self.store.get(checkpoint_name(partition, pipeline)), 60).data
        except (NotFoundError, ObjectNotFoundError, ObjectDeletedError):
            return None


# ---- one partition ---------------------------------------------------------------------------------------
class Partition:
    """A `Daemon` serving one partition while its lease holds; its snapshots become the cluster's checkpoints."""

    FORCED_CHECKPOINT = 30.0
    """Seconds after which a checkpoint is stored even if no message was acked since the last one (idle resets
    change states too)."""

    def __init__(self, worker: "ClusterWorker", lease: Lease):
        self.worker = worker
        self.lease = lease
        self.number = lease.partition
        self.config = partition_config(worker.config, self.number)
        self.daemon: Daemon | None = None
        self.checkpoints_stored = 0
        self.aborted = False
        self._last_stored = 0.0

    def start(self) -> None:
        self._wait_for_handover()
        restored = self._restore()
        if self.worker.stopping.is_set() or not self.worker.leases.valid(self.lease):
            raise RuntimeError("the lease lapsed (or the worker stops) before the partition could start")
        # The daemon's systemd messages would speak for the whole unit: the worker sends its own.
        self.daemon = Daemon(self.config, checkpoint=self._checkpoint, notifier=Notifier({}))
        try:
            self.daemon.start()
        except BaseException:
            self.daemon.abort()  # its state files' locks go, so a later claim here can open them again
            raise
        if not self.daemon.link.connected.wait(CONNECT_WAIT):  # it keeps trying in the background
            log.warning("partition %d: not connected to the broker after %g s", self.number, CONNECT_WAIT,
                        extra={"event": "partition_not_connected", "partition": self.number})
        log.info("partition %d: serving (%s)", self.number, "from its checkpoint" if restored else "no checkpoint yet",
                 extra={"event": "partition_started", "partition": self.number, "restored": restored})

    def _wait_for_handover(self) -> None:
        """After a clean handover, connect only ``ack_wait`` after the predecessor closed its inputs: what NATS
        had sent it and it never read comes back only then, and must come before newer messages (after a
        kill -9 the lease's TTL, longer than ack_wait, has waited already)."""
        try:
            closed_at = self.worker.leases.handover_closed_at(self.number)
        except Exception as error:  # noqa: BLE001 -- unknown: wait the full ack_wait to be safe
            log.warning("partition %d: handover record unreadable (%r): waiting ack_wait", self.number, error)
            closed_at = time.time()
        if closed_at is None:
            return
        delay = closed_at + self.worker.cluster.ack_wait + HANDOVER_MARGIN - time.time()
        if delay > 0:
            log.info("partition %d: waiting %.1f s for what the last owner left unread", self.number, delay,
                     extra={"event": "handover_wait", "partition": self.number})
            self.worker.stopping.wait(min(delay, self.worker.cluster.ack_wait + HANDOVER_MARGIN))

    def _restore(self) -> bool:
        """Replace the local state files with the cluster's last checkpoint: only what it holds was acked."""
        directory = self.config.state.dir
        directory.mkdir(parents=True, exist_ok=True)
        restored = False
        for pipeline in self.config.pipelines:
            files = re.compile(rf"{re.escape(pipeline.name)}\.(snapshot|running|journal\.[0-9]+)")
            for path in directory.iterdir():
                if files.fullmatch(path.name):
                    path.unlink()
            data = self.worker.checkpoints.get(self.number, pipeline.name)
            if data is not None:
                (directory / f"{pipeline.name}.snapshot").write_bytes(data)
                restored = True
        return restored

    def _checkpoint(self, pipelines) -> bool:
        """Store the snapshots the daemon just wrote (its worker thread, between two micro-batches); False
        keeps the acks withheld until the next one succeeds."""
        leases = self.worker.leases
        if not leases.valid(self.lease):
            return False  # the successor may be serving from the last checkpoint: never overwrite it
        scheduler = self.daemon.scheduler
        if not scheduler.withheld() and time.monotonic() - self._last_stored < self.FORCED_CHECKPOINT:
            return True
        started = time.monotonic()
        try:
            for pipeline in pipelines:
                self.worker.checkpoints.put(self.number, pipeline.name, pipeline.store.snapshot_path.read_bytes())
        except Exception as error:  # noqa: BLE001 -- NATS away: the acks wait, the next checkpoint tries again
            log.warning("partition %d: checkpoint not stored: %r", self.number, error,
                        extra={"event": "checkpoint_failed", "partition": self.number})
            return False
        if not leases.valid(self.lease):  # the put outlived the lease: the successor may not have this state
            return False
        self._last_stored = time.monotonic()
        self.checkpoints_stored += 1
        totals = self.daemon.metrics.stats()["pipelines"].values()
        self.lease.stats = {"checkpoints": self.checkpoints_stored,
                            "checkpoint_ms": round((self._last_stored - started) * 1000, 2),
                            "streams": sum(len(p.table) for p in pipelines),
                            "messages_in": sum(t["in"] for t in totals), "predictions": sum(t["out"] for t in totals)}
        return True

    def stop(self) -> bool:
        """A clean stop (`Daemon.hand_over`): inputs closed, what arrived stepped, a final checkpoint. The lease
        goes back at once only if that checkpoint was stored; else it lapses after lease_ttl, and the successor
        gets every unacked message again (after ack_wait, before newer ones)."""
        clean = self.daemon.hand_over()
        leases = self.worker.leases
        if clean and self.daemon.final_snapshot and leases.valid(self.lease):
            try:
                leases.record_handover(self.lease, self.daemon.inputs_closed_at)
            except Exception as error:  # noqa: BLE001 -- without it the successor might not wait: let the TTL run
                log.warning("partition %d: handover record not stored (%r): the lease lapses instead", self.number,
                            error, extra={"event": "handover_unrecorded", "partition": self.number})
                leases.forget(self.lease)
            else:
                leases.release(self.lease)
        else:
            leases.forget(self.lease)
        log.info("partition %d: handed back", self.number, extra={"event": "partition_stopped", "partition": self.number})
        return clean

    def abort(self, why: str) -> None:
        if self.aborted:
            return
        self.aborted = True
        log.error("partition %d: stopping at once: %s", self.number, why,
                  extra={"event": "partition_aborted", "partition": self.number})
        if self.daemon is not None:
            self.daemon.abort()
        self.worker.leases.forget(self.lease)


# ---- the worker ------------------------------------------------------------------------------------------
class ClusterWorker:
    """`edgernn serve` with ``[cluster]``: claims partitions, serves each with a `Daemon`, checkpoints and
    fences them (a thread of its own, so a slow claim or start never delays it), hands them back at SIGTERM."""

    def __init__(self, config):
        self.config = config
        self.cluster = config.cluster
        self.stopping = threading.Event()
        self.partitions: dict[int, Partition] = {}
        self.nats: Nats | None = None
        self.leases: Leases | None = None
        self.checkpoints: Checkpoints | None = None
        self.notifier = Notifier()
        self._lock = threading.Lock()  # guards `partitions` between the main thread and the fencer
        self._next_claim = 0.0
        self._fencer: threading.Thread | None = None

    def start(self) -> None:
        self.nats = Nats(self.cluster.nats, f"edgernn {self.cluster.worker}")
        try:
            self.leases = Leases(self.nats, self.cluster, self.cluster.worker)
            self.checkpoints = Checkpoints(self.nats, self.cluster)
        except BaseException:
            self.nats.close()
            raise
        self._fencer = threading.Thread(target=self._fence_forever, name="edgernn-fencer", daemon=True)
        self._fencer.start()
        log.info("cluster worker %s: %d partitions, %s", self.cluster.worker, self.cluster.partitions,
                 f"owning {list(self.cluster.own)}" if self.cluster.own else "taking free ones",
                 extra={"event": "cluster_started", "worker": self.cluster.worker})

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (main thread only); SIGHUP reloads every partition's models."""
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        signal.signal(signal.SIGHUP, lambda *_: [p.daemon.reload() for p in list(self.partitions.values())])
        try:
            self.start()
        except Exception as error:  # noqa: BLE001 -- NATS unreachable, JetStream not ready, a bucket at odds
            log.error("cluster worker cannot start: %s", error, extra={"event": "cluster_start_failed"})
            return 1
        self.notifier.ready()
        watchdog_every, next_watchdog = watchdog_interval(), 0.0
        try:
            while not self.stopping.wait(0.2):
                self.tick()
                if watchdog_every and time.monotonic() >= next_watchdog:  # a standby serves nothing, yet lives
                    self.notifier.watchdog()
                    next_watchdog = time.monotonic() + watchdog_every
        finally:
            self.notifier.stopping()
            clean = self.stop()
        return 0 if clean else 1

    def tick(self) -> None:
        """Claim what is free (at most every `CLAIM_INTERVAL`)."""
        now = time.monotonic()
        if now >= self._next_claim:
            self._next_claim = now + CLAIM_INTERVAL
            self._claim_free()

    def _fence_forever(self) -> None:
        while not self.stopping.wait(FENCE_INTERVAL):
            self.fence()

    def fence(self) -> None:
        """Stop at once every partition no longer surely ours, or whose daemon's worker thread died."""
        with self._lock:
            partitions = list(self.partitions.values())
        for partition in partitions:
            died = not partition.daemon.worker_alive()
            if died or not self.leases.valid(partition.lease):
                partition.abort("its worker thread died" if died else "lease lost or not renewed in time")
                with self._lock:
                    self.partitions.pop(partition.number, None)

    def _wanted(self) -> list[int]:
        if self.cluster.own is not None:
            return [p for p in self.cluster.own if p not in self.partitions]
        room = (self.cluster.max_partitions if self.cluster.max_partitions is not None
                else self.cluster.partitions) - len(self.partitions)
        if room <= 0:
            return []
        free = [p for p in range(self.cluster.partitions) if p not in self.partitions]
        random.shuffle(free)  # workers starting together do not all race for partition 0
        return free

    def _claim_free(self) -> None:
        limit = self.cluster.max_partitions if self.cluster.own is None else None
        for number in self._wanted():
            if self.stopping.is_set() or (limit is not None and len(self.partitions) >= limit):
                return
            lease = self.leases.claim(number)
            if lease is None:
                continue
            partition = Partition(self, lease)
            try:
                partition.start()
            except Exception:  # noqa: BLE001 -- a partition that cannot start is given up, not served half
                log.exception("partition %d: failed to start", number,
                              extra={"event": "partition_failed", "partition": number})
                self.leases.forget(lease)  # it lapses: whatever it did meanwhile, no one takes it too early
                continue
            with self._lock:
                self.partitions[number] = partition

    def stop(self) -> bool:
        self.stopping.set()
        if self._fencer is not None:
            self._fencer.join(5)
        clean = True
        for partition in list(self.partitions.values()):
            if not self.leases.valid(partition.lease):
                partition.abort("lease lost or not renewed in time")
                continue
            clean = partition.stop() and clean
        self.partitions.clear()
        if self.leases is not None:
            self.leases.stop()
        if self.nats is not None:
            self.nats.close()
        log.info("cluster worker %s stopped", self.cluster.worker, extra={"event": "cluster_stopped"})
        return clean


# ---- `edgernn cluster status` ----------------------------------------------------------------------------
def cluster_status(config) -> list[dict]:
    """Per partition: its lease (worker, since, last renewal, checkpoint figures) and its lag, the messages
    NATS holds for it that are not yet acked (pending delivery plus delivered and unacked)."""
    from nats.js.errors import BucketNotFoundError

    nats = Nats(config.cluster.nats, "edgernn cluster status")
    try:
        try:
            kv = nats.call(nats.js.key_value(leases_bucket(config.cluster)), 30)
        except BucketNotFoundError:
            kv = None  # no worker has started yet
        lag = nats.call(_lag_by_partition(nats.js, config.cluster.partitions), 30)
        rows = []
        for number in range(config.cluster.partitions):
            row = {"partition": number, "worker": None, "lag": lag.get(number)}
            entry = None if kv is None else nats.call(_get_entry(kv, lease_key(number)))
            if entry is not None:
                row.update(json.loads(entry[0]))
                row.pop("token", None)
                row["renewed_ago"] = round(time.time() - row.pop("renewed"), 1)
            rows.append(row)
        return rows
    finally:
        nats.close()


async def _get_entry(kv, key: str) -> tuple[bytes, int] | None:
    """(value, revision) of ``key``, None when it is absent or deleted."""
    from nats.js.errors import KeyNotFoundError

    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None
    return (entry.value, entry.revision) if entry.value else None


async def _lag_by_partition(js, partitions: int) -> dict[int, int]:
    """Messages each partition's MQTT sessions have not acked yet, from the consumers of NATS's MQTT stream."""
    from nats.js.errors import NotFoundError

    try:
        consumers = await js.consumers_info(MQTT_MESSAGES_STREAM)
    except NotFoundError:
        return {}
    lag: dict[int, int] = {}
    for consumer in consumers:
        subject = consumer.config.filter_subject or ""
        for number in range(partitions):
            if subject.startswith(LAG_SUBJECT.format(number)):
                lag[number] = lag.get(number, 0) + (consumer.num_pending or 0) + (consumer.num_ack_pending or 0)
    return lag
