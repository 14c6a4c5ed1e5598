"""Signed model updates over MQTT: received, checked, swapped in between two micro-batches, watched, rolled back.

An update for pipeline P arrives on ``<[updates] topic>/P`` (QoS 1), one message per chunk::

    {"id": "v4", "chunk": 0, "chunks": 3, "signature": {...the .sig JSON...}}\\n<the chunk's bytes>

a JSON header line, a newline, then bytes (the signature rides in chunk 0), or a file already on the device::

    {"id": "v4", "path": "/var/lib/edgernn/incoming/model.ern"}

(only under ``allow_paths``; the signature from the header or the ``.sig`` beside the file). ``edgernn update``
sends either. The checks, in order, each refusal counted (``edgernn_model_updates_total{result="refused_<reason>"}``)
and said on ``events_topic``: the header and chunks (bad_header, too_large, incomplete), the signature over
the bytes received (unsigned, bad_signature, tampered, untrusted), the model those same bytes hold (bad_model:
it does not load or does not fit the pipeline's payloads, sample rate or Home Assistant sensors), its signed
``model_version`` (unversioned, not_newer: newer than every version this pipeline has run, so an old signed
model cannot be sent back). A model that passes is written to ``[updates] dir`` and then

- swapped in at once, at the update message's place among the messages (`Scheduler.process`): every message
  received before it is stepped by the old model, every one after by the new; stream states kept when the
  state shapes are unchanged (``states = "keep"``), else reset to the new model's rest state;
- or first run in shadow (``shadow_messages = N``): beside the current model, on the same samples, from the
  same states, publishing to ``shadow_topic``; promoted (keeping the states it built) once N predictions were
  finite and within ``max_divergence`` of the current model's, dropped otherwise (shadow_failed).

For ``probation_messages`` predictions after a swap, a non-finite prediction or a failed micro-batch rolls
the pipeline back to the last good model (kept on disk); streams left with a non-finite state restart from
the rest state. The manifest in ``dir/P/`` remembers what is installed: a restart serves it again, until the
model file named in the config changes (the user deployed another by hand: that one wins).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgernn._files import atomic_write_bytes
from edgernn.errors import SignatureError
from edgernn.signing import signature_path
from edgernn.spec import version_key

log = logging.getLogger(__name__)

REFUSALS = ("bad_header", "too_large", "incomplete", "unsigned", "bad_signature", "tampered", "untrusted",
            "bad_model", "unversioned", "not_newer", "path_not_allowed", "busy", "error")
FINAL_EVENTS = ("installed", "promoted", "shadow_failed", "refused")
RESULTS = ("installed", "shadow_started", "promoted", "shadow_failed", "rolled_back", "rollback_failed",
           "failed") + tuple(
    f"refused_{reason}" for reason in REFUSALS)
MAX_HEADER_BYTES = 16384
MAX_CHUNKS = 65536
MAX_PROBATION_CRASHES = 3
"""A model on probation when the daemon stopped uncleanly this many times (it may be what crashes it) is set
aside for the last good one at the next start."""
RETRY_INTERVAL = 5.0
"""Seconds between two tries of a promotion or rollback whose snapshot could not be taken (outputs unconfirmed)."""


class Refused(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class _Transfer:
    chunks: int
    signature: dict | None = None
    parts: dict = field(default_factory=dict)
    size: int = 0
    last: float = 0.0


def parse_message(payload: bytes) -> tuple[dict, bytes]:
    """(header, body) of one update message; `Refused` ("bad_header") when it is not one."""
    head, newline, body = payload[:MAX_HEADER_BYTES + 1].partition(b"\n")
    if not newline:
        raise Refused("bad_header", "no header line (a JSON object, a newline, then the bytes)")
    try:
        header = json.loads(head)
    except ValueError as error:
        raise Refused("bad_header", f"the header is not JSON ({error})") from None
    if not isinstance(header, dict) or not isinstance(header.get("id"), str) or not 0 < len(header["id"]) <= 128:
        raise Refused("bad_header", 'the header needs an "id": a string of 1 to 128 characters')
    if "path" in header:
        if not isinstance(header["path"], str):
            raise Refused("bad_header", '"path" must be a string')
        return header, b""
    chunk, chunks = header.get("chunk", 0), header.get("chunks", 1)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (chunk, chunks)) or not (
            0 <= chunk < chunks <= MAX_CHUNKS):
        raise Refused("bad_header", f'"chunk" and "chunks" must be integers with 0 <= chunk < chunks <= {MAX_CHUNKS}')
    return header, payload[len(head) + 1:]


def encode_messages(data: bytes, signature: dict, update_id: str, chunk_size: int = 256 << 10) -> list[bytes]:
    """The messages that carry ``data`` (what `edgernn update` publishes)."""
    pieces = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]
    messages = []
    for index, piece in enumerate(pieces):
        header = {"id": update_id, "chunk": index, "chunks": len(pieces)}
        if index == 0:
            header["signature"] = signature
        messages.append(json.dumps(header, separators=(",", ":")).encode() + b"\n" + piece)
    return messages


def sha256_of(path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


class ModelStore:
    """``dir/<pipeline>/``: installed model files (named by content), their signatures, and ``manifest.json``:
    ``{"source_sha256", "current", "last_good", "highest_version"}`` (entries: file, sha256, version)."""

    def __init__(self, directory: Path, pipeline: str):
        self.directory = Path(directory) / pipeline

    def manifest(self) -> dict | None:
        try:
            manifest = json.loads((self.directory / "manifest.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            log.error("%s: unreadable (%s): serving the model the config names", self.directory / "manifest.json",
                      error, extra={"event": "update_manifest_unreadable"})
            return None
        return manifest if isinstance(manifest, dict) else None

    def write_manifest(self, manifest: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.directory / "manifest.json", json.dumps(manifest, indent=2).encode())
        self.prune(manifest)

    def prune(self, manifest: dict) -> None:
        """Only the current and the last good model files are kept."""
        keep = {entry["file"] for entry in (manifest.get("current"), manifest.get("last_good")) if entry and entry["file"]}
        for path in self.directory.glob("*.ern"):
            if path.name not in keep:
                path.unlink(missing_ok=True)
                signature_path(path).unlink(missing_ok=True)

    def path_for(self, sha256: str) -> Path:
        """Where a model file with this content is kept (named by its content)."""
        return self.directory / f"{sha256[:24]}.ern"

    def add(self, path: Path, data: bytes, signature: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(signature_path(path), json.dumps(signature).encode())
        atomic_write_bytes(path, data)


def serving_configs(updates_config, pipeline_config) -> list:
    """The pipeline configs to start with, best first: the installed update (unless the daemon crashed
    `MAX_PROBATION_CRASHES` times while it was on probation) and the last good model before it, while the
    config's own model file is the one they replaced; then the config as written."""
    store = ModelStore(updates_config.dir, pipeline_config.name)
    manifest = store.manifest() or {}
    current = manifest.get("current")
    if current and not current.get("proven", True) and current.get("crashes", 0) >= MAX_PROBATION_CRASHES:
        log.error("pipeline %s: the daemon stopped uncleanly %d times while model %s was on probation: serving the "
                  "last good one", pipeline_config.name, current["crashes"], current.get("version"),
                  extra={"event": "rolled_back"})
        current = None
    entries = [e for e in (current, manifest.get("last_good")) if e and e.get("file")]
    if not entries:
        return [pipeline_config]
    if manifest.get("source_sha256") != sha256_of(pipeline_config.model):
        log.info("pipeline %s: the config's model file changed since the update %s was installed: serving it",
                 pipeline_config.name, entries[0].get("version"), extra={"event": "update_superseded"})
        return [pipeline_config]
    return [dataclasses.replace(pipeline_config, model=store.directory / e["file"]) for e in entries] + [pipeline_config]


def _read_regular_file(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of the regular file ``path`` (not a link, FIFO or device); `Refused` otherwise."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise Refused("unsigned" if path.name.endswith(".sig") else "bad_model", f"{path}: no such file") from None
    except OSError as error:
        raise Refused("bad_model", f"{path}: cannot open it ({error.strerror or error})") from None
    with os.fdopen(descriptor, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise Refused("path_not_allowed", f"{path}: not a regular file")
        if info.st_size > limit:
            raise Refused("too_large", f"{path}: {info.st_size:,} bytes, more than {limit:,}")
        data = file.read(limit + 1)
    if len(data) > limit:
        raise Refused("too_large", f"{path}: more than {limit:,} bytes")
    return data


class Updates:
    """Receives updates for every pipeline and watches the models it swapped in. Runs on the worker thread.

    ``swap(pipeline, config, loaded, keep_states, after)`` is the daemon's: snapshot, serve ``loaded`` (model,
    backend), ``after(kept)``, snapshot; it returns whether states were kept, or None when it could not take
    the first snapshot (nothing changed). ``load(config, data=None)`` is `daemon.load_checked`: the (model,
    backend) of a pipeline config, its file's signature (or the bytes ``data``, checked already) and its fit to
    the pipeline checked. ``publish(topic, payload, qos, retain)`` and ``count(pipeline, result)`` say what
    happened."""

    def __init__(self, config, pipelines, swap, load, publish, count):
        from edgernn.signing import load_public_key

        self.config = config.updates
        self.keys = [load_public_key(path) for path in config.signing.trusted_keys]
        self.sources = {p.name: p for p in config.pipelines}  # as the config file writes them
        self.pipelines = {p.name: p for p in pipelines}
        self._swap, self._load, self._publish, self._count = swap, load, publish, count
        self._transfers: dict = {}  # pipeline -> (id, _Transfer): one at a time per pipeline, the latest wins
        self._refused_ids: dict = {}  # (pipeline, id) -> when: the rest of a refused update's chunks are ignored
        self._watches: dict = {}  # pipeline -> _Probation or _Shadow
        self._resumed: list = []  # events of the start-up (said once connected: at the first tick)
        for pipeline in pipelines:
            self._resume(pipeline)

    def handlers(self) -> dict:
        """{topic: handler(inbound)} for `Scheduler.control`."""
        return {f"{self.config.topic}/{name}": (lambda inbound, p=pipeline: self.on_message(p, inbound))
                for name, pipeline in self.pipelines.items()}

    def _store(self, pipeline) -> ModelStore:
        return ModelStore(self.config.dir, pipeline.name)

    def _resume(self, pipeline) -> None:
        """At start: a model still on probation is watched again (an unclean stop of the last run counted against
        it); an installed model that did not load (the daemon serves the one before it) is recorded as rolled back."""
        store = self._store(pipeline)
        manifest = store.manifest()
        if not manifest or manifest.get("source_sha256") != sha256_of(self.sources[pipeline.name].model):
            return
        current = manifest.get("current") or {}
        serving = self._serving_entry(pipeline, manifest)
        if current.get("file") and serving.get("file") == current["file"]:
            if not current.get("proven", True):
                if pipeline.store.running_path.exists():  # the last run did not stop cleanly
                    current["crashes"] = current.get("crashes", 0) + 1
                    store.write_manifest(manifest)
                self._watch(pipeline, _Probation(self.config.probation_messages, pipeline.batch_failures))
        elif current.get("file"):
            reason = (f"the daemon stopped uncleanly {MAX_PROBATION_CRASHES} times while it was on probation"
                      if not current.get("proven", True) and current.get("crashes", 0) >= MAX_PROBATION_CRASHES
                      else "it did not load at start")
            manifest.update(current=serving, last_good=None)
            store.write_manifest(manifest)
            self._resumed.append((pipeline.name, current.get("version"), reason))

    def _serving_entry(self, pipeline, manifest: dict) -> dict:
        """The manifest entry of the model ``pipeline`` serves now."""
        if pipeline.config.model.parent == self._store(pipeline).directory:
            for entry in (manifest.get("current"), manifest.get("last_good")):
                if entry and entry.get("file") == pipeline.config.model.name:
                    return entry
        return {"file": None, "sha256": sha256_of(self.sources[pipeline.name].model),
                "version": pipeline.model.spec.model_version, "proven": True}

    # ---- receiving -----------------------------------------------------------------------------------
    def on_message(self, pipeline, inbound) -> None:
        update_id = "?"
        try:
            header, body = parse_message(inbound.payload)
            update_id = header["id"]
            if (pipeline.name, update_id) in self._refused_ids:
                return  # a later chunk of an update refused already: said once
            if "path" in header:
                data, signature = self._read_path(header)
            else:
                received = self._add_chunk(pipeline.name, header, body)
                if received is None:
                    return
                data, signature = received
            self._candidate(pipeline, update_id, data, signature)
        except Refused as refusal:
            self._refused(pipeline.name, update_id, refusal)
        except Exception as error:  # noqa: BLE001 -- a failing disk or a bug: said, and the worker goes on
            log.exception("pipeline %s: update %r failed", pipeline.name, update_id,
                          extra={"event": "update_failed", "pipeline": pipeline.name})
            self._refused(pipeline.name, update_id, Refused("error", f"{type(error).__name__}: {error}"))

    def _add_chunk(self, name: str, header: dict, body: bytes):
        update_id = header["id"]
        current = self._transfers.get(name)
        if current is not None and current[0] != update_id:  # the sender moved on: the older one is dropped
            del self._transfers[name]
            self._refused(name, current[0], Refused("incomplete", f"replaced by update {update_id!r} before its "
                                                                  f"{current[1].chunks} chunks came"))
            current = None
        if current is None:
            current = self._transfers[name] = (update_id, _Transfer(chunks=header["chunks"]))
        transfer = current[1]
        if header["chunks"] != transfer.chunks:
            del self._transfers[name]
            raise Refused("bad_header", f"chunk {header['chunk']} says {header['chunks']} chunks, an earlier one said "
                                        f"{transfer.chunks}")
        if header["chunk"] == 0:
            transfer.signature = header.get("signature")
        transfer.size += len(body) - len(transfer.parts.get(header["chunk"], b""))
        transfer.parts[header["chunk"]] = body
        transfer.last = time.monotonic()
        if transfer.size > self.config.max_bytes:
            del self._transfers[name]
            raise Refused("too_large", f"more than max_bytes ({self.config.max_bytes:,} bytes)")
        if len(transfer.parts) < transfer.chunks:
            return None
        del self._transfers[name]
        if transfer.signature is None:
            raise Refused("unsigned", "no signature in chunk 0's header")
        return b"".join(transfer.parts[i] for i in range(transfer.chunks)), transfer.signature

    def _read_path(self, header: dict):
        path = Path(header["path"])
        real = path.resolve()
        allowed = [Path(p).resolve() for p in self.config.allow_paths]
        if not path.is_absolute() or not any(real.is_relative_to(directory) for directory in allowed):
            raise Refused("path_not_allowed", f"{path} is not under allow_paths "
                                              f"({', '.join(map(str, allowed)) or 'none set'})")
        data = _read_regular_file(real, self.config.max_bytes)
        signature = header.get("signature") or _read_regular_file(signature_path(real), 65536)
        return data, signature

    def _candidate(self, pipeline, update_id: str, data: bytes, signature) -> None:
        from edgernn.signing import verify_bytes

        self._act_on_verdicts()  # one the micro-batch before this message reached counts first
        watch = self._watches.get(pipeline.name)
        if isinstance(watch, _Shadow):
            raise Refused("busy", "a candidate model is in shadow already")
        if isinstance(watch, _Probation) and self.config.shadow_messages:
            raise Refused("busy", f"the model swapped in last is on probation ({watch.remaining} predictions to go): "
                                  "a shadow run beside it would hide its failures")
        try:
            key_id = verify_bytes(data, signature, self.keys, f"update {update_id!r}", "its signature")
        except SignatureError as error:
            raise Refused(error.reason, str(error)) from None
        store = self._store(pipeline)
        digest = hashlib.sha256(data).hexdigest()
        config = dataclasses.replace(pipeline.config, model=store.path_for(digest))
        try:
            loaded = self._load(config, data)
        except Exception as error:  # noqa: BLE001 -- whatever a model file gets wrong is a refusal, said
            raise Refused("bad_model", " ".join(str(error).split())) from None
        model = loaded[0]
        version = model.spec.model_version
        if not version:
            raise Refused("unversioned", "the model has no model_version (edgernn convert --model-version)")
        floor = self._highest_version(pipeline, store)
        if floor and version_key(version) <= version_key(floor):
            raise Refused("not_newer", f"version {version} is not newer than {floor}")
        shadow = self.config.shadow_messages > 0
        if shadow and (model.input_size, model.output_size) != (pipeline.model.input_size, pipeline.model.output_size):
            raise Refused("bad_model", f"a model with {model.input_size} inputs and {model.output_size} outputs cannot "
                                       f"run in shadow beside one with {pipeline.model.input_size} and "
                                       f"{pipeline.model.output_size} (shadow_messages = 0 installs it directly)")
        store.add(config.model, data, signature if isinstance(signature, dict) else json.loads(signature))
        entry = {"file": config.model.name, "sha256": digest, "version": version}
        update = _Update(update_id, config, loaded, entry, key_id)
        if shadow:
            self._start_shadow(pipeline, update)
        else:
            self._install(pipeline, update)

    def _highest_version(self, pipeline, store) -> str:
        versions = [pipeline.model.spec.model_version, (store.manifest() or {}).get("highest_version", "")]
        versions = [v for v in versions if v and version_key(v) is not None]
        return max(versions, key=version_key, default="")

    # ---- swapping ------------------------------------------------------------------------------------
    def _install(self, pipeline, update, shadow=None) -> bool:
        """Swap ``update`` in (a promotion when ``shadow`` ran it); False when it could not snapshot first."""
        store = self._store(pipeline)
        manifest = store.manifest() or {}
        serving = self._serving_entry(pipeline, manifest)
        previous = serving if serving.get("proven", True) else manifest.get("last_good") or serving
        on_probation = self.config.probation_messages > 0
        entry = dict(update.entry, proven=not on_probation, crashes=0)
        highest = max([v for v in (entry["version"], manifest.get("highest_version", "")) if v], key=version_key)

        def after(kept):  # between the swap and the snapshot after it: that snapshot holds all of it
            if shadow is not None:
                shadow.adopt(pipeline)
            _reset_non_finite(pipeline)
            store.write_manifest({"source_sha256": sha256_of(self.sources[pipeline.name].model), "current": entry,
                                  "last_good": previous, "highest_version": highest})

        kept = self._swap(pipeline, update.config, update.loaded, self.config.states == "keep", after)
        if kept is None:
            if shadow is None:
                store.prune(manifest)  # the candidate's file: nothing changed
                raise Refused("busy", "outputs still unconfirmed after 1 s (broker unreachable?): nothing changed, "
                                      "send it again")
            return False
        result = "installed" if shadow is None else "promoted"
        self._event(pipeline.name, update.id, result, version=entry["version"], sha256=entry["sha256"],
                    key_id=update.key_id, states="kept" if kept or shadow is not None else "reset")
        self._unwatch(pipeline)
        if on_probation:
            self._watch(pipeline, _Probation(self.config.probation_messages, pipeline.batch_failures))
        return True

    def _rollback(self, pipeline, reason: str) -> bool:
        """Back to the last good model; False when it could not snapshot first (tried again at the next tick)."""
        store = self._store(pipeline)
        manifest = store.manifest() or {}
        good = manifest.get("last_good") or {"file": None, "proven": True}
        source = self.sources[pipeline.name]
        config = source if not good.get("file") else dataclasses.replace(source, model=store.directory / good["file"])
        try:
            loaded = self._load(config)
        except Exception as error:  # noqa: BLE001 -- nothing to roll back to: the new model keeps serving
            log.error("pipeline %s: cannot roll back to %s: %s", pipeline.name, config.model, error,
                      extra={"event": "rollback_failed", "pipeline": pipeline.name})
            self._event(pipeline.name, "", "rollback_failed", reason=reason, message=" ".join(str(error).split()))
            return True
        broken_count = []

        def after(kept):
            broken_count.append(_reset_non_finite(pipeline))
            manifest.update(current=good if good.get("file") else None, last_good=None)
            store.write_manifest(manifest)

        if self._swap(pipeline, config, loaded, True, after) is None:
            return False
        self._event(pipeline.name, "", "rolled_back", reason=reason, version=loaded[0].spec.model_version,
                    streams_reset=broken_count[0])
        log.error("pipeline %s: rolled back to %s: %s", pipeline.name, config.model, reason,
                  extra={"event": "rolled_back", "pipeline": pipeline.name})
        return True

    def _mark_proven(self, pipeline) -> None:
        store = self._store(pipeline)
        manifest = store.manifest() or {}
        if manifest.get("current") and manifest["current"].get("file") == pipeline.config.model.name:
            manifest["current"]["proven"] = True
            store.write_manifest(manifest)

    def _start_shadow(self, pipeline, update) -> None:
        from edgernn.protocol import TopicTemplate

        topic = TopicTemplate(self.config.shadow_topic)

        def publish(key, y, seq):
            self._publish(topic.format(key=key, pipeline=pipeline.name), pipeline.encoder.encode(key, y, seq, None), 0,
                          False)

        self._watch(pipeline, _Shadow(pipeline, update, self.config.shadow_messages, self.config.max_divergence,
                                      publish))
        self._event(pipeline.name, update.id, "shadow_started", version=update.entry["version"],
                    messages=self.config.shadow_messages)

    def _watch(self, pipeline, watch) -> None:
        def observe(*arguments):  # an error in a candidate fails it; the pipeline serves on
            try:
                watch.observe(*arguments)
            except Exception as error:  # noqa: BLE001
                watch.verdict = ("fail", f"the model failed: {type(error).__name__}: {error}")

        self._watches[pipeline.name] = watch
        pipeline.observer = observe

    def _unwatch(self, pipeline) -> None:
        self._watches.pop(pipeline.name, None)
        pipeline.observer = None

    # ---- between micro-batches ------------------------------------------------------------------------
    def tick(self) -> None:
        """Expire stalled transfers; act on what the watches decided during the last micro-batch."""
        now = time.monotonic()
        for name, version, reason in self._resumed:
            self._event(name, "", "rolled_back", reason=f"model {version} set aside: {reason}",
                        version=self.pipelines[name].model.spec.model_version)
        self._resumed.clear()
        for name, (update_id, transfer) in list(self._transfers.items()):
            if now - transfer.last > self.config.chunk_timeout:
                del self._transfers[name]
                self._refused(name, update_id, Refused("incomplete", f"{len(transfer.parts)} of {transfer.chunks} "
                                                                     f"chunks in {self.config.chunk_timeout:g} s"))
        for key, when in list(self._refused_ids.items()):
            if now - when > self.config.chunk_timeout:
                del self._refused_ids[key]
        self._act_on_verdicts()

    def _act_on_verdicts(self) -> None:
        now = time.monotonic()
        for name, watch in list(self._watches.items()):
            pipeline = self.pipelines[name]
            if isinstance(watch, _Probation) and pipeline.batch_failures > watch.failures:
                watch.verdict = ("fail", "a micro-batch failed on the new model")
            if watch.verdict is None or now < watch.retry_at:
                continue
            try:
                self._act(pipeline, watch)
            except Exception as error:  # noqa: BLE001 -- a failing disk or a bug must not stop the worker
                log.exception("pipeline %s: acting on the %s verdict failed", name, type(watch).__name__,
                              extra={"event": "update_failed", "pipeline": name})
                self._unwatch(pipeline)
                self._event(name, getattr(getattr(watch, "update", None), "id", ""), "failed",
                            message=f"{type(error).__name__}: {error}")

    def _act(self, pipeline, watch) -> None:
        outcome, detail = watch.verdict
        done = True
        if isinstance(watch, _Probation):
            if outcome == "pass":
                self._mark_proven(pipeline)
            else:
                done = self._rollback(pipeline, detail)
        elif outcome == "pass":  # the shadow keeps its states in step while the promotion waits
            done = self._install(pipeline, watch.update, shadow=watch)
        else:
            self._event(pipeline.name, watch.update.id, "shadow_failed", reason=detail,
                        version=watch.update.entry["version"])
        if not done:  # the snapshot before the swap could not be taken: later, not at every pass
            watch.retry_at = time.monotonic() + RETRY_INTERVAL
        elif self._watches.get(pipeline.name) is watch:
            self._unwatch(pipeline)

    def reloaded(self) -> None:
        """A SIGHUP reload served the config's files again: what was being watched is moot (said)."""
        for name, watch in list(self._watches.items()):
            self._unwatch(self.pipelines[name])
            if isinstance(watch, _Shadow):
                self._event(name, watch.update.id, "shadow_failed", reason="a reload (SIGHUP) replaced the model",
                            version=watch.update.entry["version"])

    # ---- saying what happened ----------------------------------------------------------------------------
    def _refused(self, pipeline: str, update_id: str, refusal: Refused) -> None:
        if refusal.reason in ("too_large", "bad_header", "incomplete"):  # refused while its chunks still come
            self._refused_ids[(pipeline, update_id)] = time.monotonic()
        log.warning("pipeline %s: update %r refused (%s): %s", pipeline, update_id, refusal.reason, refusal,
                    extra={"event": "update_refused", "pipeline": pipeline, "reason": refusal.reason})
        self._event(pipeline, update_id, f"refused_{refusal.reason}", reason=refusal.reason, message=str(refusal))

    def _event(self, pipeline: str, update_id: str, result: str, **details) -> None:
        self._count(pipeline, result)
        event = {"pipeline": pipeline, "id": update_id, "event": "refused" if result.startswith("refused_")
                 else result, "time": round(time.time(), 3), **details}
        if result in ("installed", "promoted"):
            log.info("pipeline %s: model %s %s (states %s)", pipeline, details.get("version"), result,
                     details.get("states"), extra={"event": "update_" + result, "pipeline": pipeline})
        self._publish(self.config.events_topic, json.dumps(event).encode(), 1, False)


def _reset_non_finite(pipeline) -> int:
    """Put every stream whose state holds a non-finite value back at the rest state; returns how many."""
    table = pipeline.table
    keys = table.keys()
    if not keys:
        return 0
    broken = ~np.isfinite(table.states[table.peek_slots(keys)]).all(axis=1)
    for key in np.asarray(keys, dtype=object)[broken].tolist():
        table.reset(key)
    return int(np.count_nonzero(broken))


@dataclass
class _Update:
    id: str
    config: object
    loaded: tuple
    entry: dict
    key_id: str


class _Probation:
    """Watches the predictions of a model just swapped in: the first non-finite one fails it."""

    def __init__(self, messages: int, failures: int):
        self.remaining = messages
        self.failures = failures  # the pipeline's failed micro-batches before the swap
        self.verdict = None
        self.retry_at = 0.0

    def observe(self, keys, seqs, X, Y, published, counts) -> None:
        if self.verdict is not None:
            return
        if not np.isfinite(Y[published]).all():
            self.verdict = ("fail", "a non-finite prediction")
            return
        self.remaining -= int(np.count_nonzero(published))
        if self.remaining <= 0:
            self.verdict = ("pass", "")


class _Shadow:
    """Runs a candidate beside the current model on the same samples, from the same states."""

    def __init__(self, pipeline, update, messages: int, max_divergence: float, publish):
        from edgernn.streams import StreamTable

        model, self.backend = update.loaded
        self.update, self.remaining, self.max_divergence, self.publish = update, messages, max_divergence, publish
        self.divergence = 0.0
        self.verdict = None
        self.retry_at = 0.0
        self.table = StreamTable(model, max_streams=pipeline.config.max_streams)
        keys = pipeline.table.keys()
        if keys and model.spec.state_shapes == pipeline.model.spec.state_shapes:
            self.table.states[self.table.slots_for(keys)] = pipeline.table.states[pipeline.table.peek_slots(keys)]

    def observe(self, keys, seqs, X, Y, published, counts) -> None:
        if self.verdict is not None and self.verdict[0] == "fail":
            return
        slots = self.table.slots_for(keys)
        restarted = np.flatnonzero(counts == 1)  # the pipeline's stream started from its rest state (new or reset)
        if len(restarted):
            self.table.states[slots[restarted]] = self.table.model.new_state()
        candidate = self.backend.step_batch(self.table.states, slots, np.ascontiguousarray(X))
        if self.verdict is not None:  # passed: its states keep in step with every sample until the promotion
            return
        rows = np.flatnonzero(published)
        if not np.isfinite(candidate[rows]).all():
            self.verdict = ("fail", "a non-finite prediction")
            return
        difference = np.abs(candidate[rows] - Y[rows])
        difference[~np.isfinite(difference)] = 0.0  # the current model's own non-finite outputs say nothing
        if len(rows):
            self.divergence = max(self.divergence, float(difference.max()))
        for row in rows.tolist():
            self.publish(keys[row], candidate[row], None if seqs[row] < 0 else int(seqs[row]))
        self.remaining -= len(rows)
        if self.divergence > self.max_divergence:
            self.verdict = ("fail", f"diverged by {self.divergence:.3g} (max_divergence {self.max_divergence:g})")
        elif self.remaining <= 0:
            self.verdict = ("pass", "")

    def adopt(self, pipeline) -> None:
        """After promotion: every stream the shadow ran continues from the state the candidate built."""
        keys = [key for key in self.table.keys() if key in pipeline.table]
        if keys:
            pipeline.table.states[pipeline.table.peek_slots(keys)] = self.table.states[self.table.peek_slots(keys)]


def send_update(config, pipeline: str, model_path, *, update_id: str | None = None, local: bool = False,
                chunk_size: int = 256 << 10, wait: float = 60.0) -> tuple[dict | None, str | None]:
    """Publish ``model_path`` (signed: ``<model_path>.sig``) as an update of ``pipeline`` to the daemon of
    ``config``, or with ``local`` only its path (the file is on the daemon's machine, under ``allow_paths``),
    then wait for what became of it on the events topic: installed, refused, or after a shadow run promoted or
    shadow_failed (``shadow_started`` when the wait ends first). Returns (the event, None) or (None, why not)."""
    from .mqtt import exchange

    if config.updates is None:
        return None, f"{config.source}: no [updates] table: this daemon takes no model updates"
    if pipeline not in {p.name for p in config.pipelines}:
        return None, f"no pipeline {pipeline!r} in {config.source}"
    path = Path(model_path).resolve()
    signature = json.loads(signature_path(path).read_text())
    update_id = update_id or f"{path.name}-{signature['sha256'][:12]}-{int(time.time())}"
    if local:
        messages = [json.dumps({"id": update_id, "path": str(path), "signature": signature}).encode() + b"\n"]
    else:
        messages = encode_messages(path.read_bytes(), signature, update_id, chunk_size)
    topic = f"{config.updates.topic}/{pipeline}"
    events = []

    def heard(_topic, payload, _retained):
        try:
            event = json.loads(payload)
        except ValueError:
            return
        if event.get("id") == update_id and event.get("pipeline") == pipeline:
            events.append(event)

    broker = dataclasses.replace(config.broker, client_id=config.broker.client_id[:100] + "-update")
    failure = exchange(broker, [(topic, m) for m in messages], [config.updates.events_topic], heard,
                       until=lambda: any(e.get("event") in FINAL_EVENTS for e in events), timeout=wait)
    if events:  # the final one; or "shadow_started" when the shadow run outlasted the wait
        return events[-1], None
    return None, failure or "no event came back"
