"""Signed model updates over MQTT (runtime/updates.py), through a real Mosquitto, checked against offline runs.

Every message here goes through one publisher connection, QoS 1, in order: Mosquitto delivers them to the
daemon in that order, so "the update message's place among the messages" is known, and the offline run
switches models at that same place.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import edgernn
from broker import Client, Mosquitto
from daemon_harness import DaemonProcess, payload, sample, start_daemon, wait_until, write_config
from edgernn.runtime.updates import ModelStore, encode_messages
from edgernn.signing import generate_keys, sign_file, signature_path
from helpers import random_model

pytest.importorskip("cryptography")

TOPIC = "edgernn/edgernn-test/update/imu"
EVENTS = "edgernn/edgernn-test/update/events"
DEVICES = 3


def _model(directory, name, version, seed=0, hidden=8, key="release", poison=False):
    """A signed GRU model file (3 inputs, a two-layer head, 2 outputs) with ``model_version``."""
    model = random_model("gru", seed=seed, input_size=3, hidden=hidden, head=(1, 2))
    weights = dict(model.weights)
    if poison:  # finite weights whose outputs overflow to inf for any state but exactly zero
        weights["head.0.W"] = np.zeros_like(weights["head.0.W"])
        weights["head.0.W"][0, 0] = 3e38
        weights["head.0.b"] = np.zeros_like(weights["head.0.b"])
        weights["head.1.W"] = np.full_like(weights["head.1.W"], 3e38)
        weights["head.1.b"] = np.zeros_like(weights["head.1.b"])
    model = edgernn.Model(dataclasses.replace(model.spec, model_version=version, name="gru-test"), weights)
    path = directory / name
    edgernn.save(model, path)
    sign_file(path, directory / "keys" / f"{key}.key")
    return edgernn.load(path), path


@pytest.fixture
def rig(tmp_path):
    (tmp_path / "keys").mkdir()
    for name in ("release", "other"):
        generate_keys(tmp_path / "keys" / f"{name}.key", tmp_path / "keys" / f"{name}.pub")
    (tmp_path / "incoming").mkdir()
    with Mosquitto(tmp_path / "broker").start() as broker:
        yield tmp_path, broker


class Rig:
    """The daemon (in-process, or a process of its own to kill), a publisher and a watcher of predictions,
    shadow predictions and update events."""

    def __init__(self, tmp_path, broker, updates="", state="", process=False):
        self.v1, _ = _model(tmp_path, "v1.ern", "1")
        self.config = write_config(tmp_path, broker.port, model="v1.ern", state=state,
                                   top=f'[signing]\ntrusted_keys = ["keys/release.pub"]\n[updates]\n'
                                       f'allow_paths = ["incoming"]\nchunk_timeout = 5\n{updates}\n')
        self.watcher = Client(broker.port, subscribe="#")
        self.daemon = (DaemonProcess(self.config, tmp_path / "daemon.log").start() if process
                       else start_daemon(self.config))
        self.publisher = Client(broker.port)

    def samples(self, seqs):
        for seq in seqs:
            for device in range(DEVICES):
                self.publisher.publish_in_order(f"sensors/dev{device}/imu", payload(device, seq))

    def send(self, path, chunk_size=1024, update_id="u"):
        data = path.read_bytes()
        signature = json.loads(signature_path(path).read_text())
        for message in encode_messages(data, signature, update_id, chunk_size):
            self.publisher.publish_in_order(TOPIC, message)

    def events(self):
        return [json.loads(body) for topic, body in list(self.watcher.messages) if topic == EVENTS]

    def wait_event(self, count=1):
        assert wait_until(lambda: len(self.events()) >= count, 20), self.events()
        return self.events()[count - 1]

    def predictions(self, prefix="predictions/"):
        """{device: {seq: y}} of what came on the prediction (or shadow) topics."""
        found: dict = {}
        for topic, body in list(self.watcher.messages):
            if topic.startswith(prefix):
                message = json.loads(body)
                found.setdefault(int(message["key"][3:]), {})[message["seq"]] = message["y"]
        return found

    def wait_predictions(self, count, prefix="predictions/"):
        assert wait_until(lambda: sum(map(len, self.predictions(prefix).values())) >= count, 30)
        return self.predictions(prefix)

    def close(self):
        if isinstance(self.daemon, DaemonProcess):
            if self.daemon.process.poll() is None:
                self.daemon.terminate()
        else:
            self.daemon.stop()
        self.publisher.close()
        self.watcher.close()


def _offline(segments, device):
    """Predictions of one device's samples run through (model, seqs, keep state) segments, in turn."""
    state, out = None, {}
    for model, seqs, keep in segments:
        if state is None or not keep:
            state = model.new_state()
        xs = np.stack([sample(device, s) for s in seqs])
        out.update(zip(seqs, model.run(xs, state)))
    return out


def _assert_equal(received, segments):
    for device in range(DEVICES):
        expected = _offline(segments, device)
        assert set(received[device]) == set(expected), f"dev{device}: predictions missing or extra"
        for seq, y in expected.items():
            np.testing.assert_allclose(received[device][seq], y, atol=1e-5, err_msg=f"dev{device} seq {seq}")


def test_a_chunked_update_swaps_in_at_its_place_with_states_kept_and_survives_a_restart(rig):
    tmp_path, broker = rig
    v2, v2_path = _model(tmp_path, "v2.ern", "2", seed=1)
    r = Rig(tmp_path, broker)
    try:
        r.samples(range(1, 11))
        assert len(encode_messages(v2_path.read_bytes(), {}, "u", 1024)) > 2  # several chunks
        r.send(v2_path)
        r.samples(range(11, 21))
        event = r.wait_event()
        assert event["event"] == "installed" and event["version"] == "2" and event["states"] == "kept"
        _assert_equal(r.wait_predictions(20 * DEVICES), [(r.v1, range(1, 11), True), (v2, range(11, 21), True)])
        assert r.daemon.pipelines[0].model.spec.model_version == "2"
        info = r.daemon.metrics.text().decode()
        assert 'edgernn_model_info{fingerprint=' in info and 'version="2"' in info and 'version="1"' not in info
        assert 'edgernn_model_updates_total{pipeline="imu",result="installed"} 1.0' in info
    finally:
        r.daemon.stop()
    # A restart serves the installed update, from the states its snapshot holds.
    manifest = ModelStore(tmp_path / "state" / "models", "imu").manifest()
    assert manifest["current"]["version"] == "2" and manifest["last_good"]["file"] is None
    assert manifest["current"]["proven"] is False and manifest["current"]["crashes"] == 0  # on probation (1000)
    r.daemon = start_daemon(r.config)
    # still on probation: watched again; a clean stop is not counted against it (a crash is: see the kill test)
    assert ModelStore(tmp_path / "state" / "models", "imu").manifest()["current"]["crashes"] == 0
    try:
        r.samples(range(21, 26))
        _assert_equal(r.wait_predictions(25 * DEVICES),
                      [(r.v1, range(1, 11), True), (v2, range(11, 26), True)])
    finally:
        r.close()


def test_refused_updates_are_counted_said_and_change_nothing(rig):
    tmp_path, broker = rig
    r = Rig(tmp_path, broker)
    try:
        wrong_key, wrong_key_path = _model(tmp_path, "wrong.ern", "2", key="other")
        _, old_path = _model(tmp_path, "old.ern", "1", seed=4)
        _, unversioned_path = _model(tmp_path, "unversioned.ern", "", seed=5)
        _, tampered_path = _model(tmp_path, "tampered.ern", "2", seed=6)
        data = bytearray(tampered_path.read_bytes())
        data[-1] ^= 1
        tampered_path.write_bytes(bytes(data))
        r.send(wrong_key_path, update_id="wrong-key")
        r.send(old_path, update_id="old")
        r.send(unversioned_path, update_id="unversioned")
        r.send(tampered_path, update_id="tampered")
        r.publisher.publish_in_order(TOPIC, b'{"id": "unsigned", "chunk": 0, "chunks": 1}\n' + old_path.read_bytes())
        r.publisher.publish_in_order(TOPIC, b"not an update")
        r.publisher.publish_in_order(TOPIC, json.dumps({"id": "far", "path": str(old_path)}).encode() + b"\n")
        (tmp_path / "incoming" / "link.ern").symlink_to(old_path)  # a link out of allow_paths
        r.publisher.publish_in_order(TOPIC, json.dumps({"id": "link", "path": str(tmp_path / "incoming" / "link.ern")})
                                     .encode() + b"\n")
        r.publisher.publish_in_order(TOPIC, json.dumps({"id": "dots", "path": f"{tmp_path}/incoming/../old.ern"})
                                     .encode() + b"\n")
        forged = json.dumps({"id": "forged", "chunk": 0, "chunks": 1, "signature": {"format": "edgernn-signature"}})
        r.publisher.publish_in_order(TOPIC, forged.encode() + b"\n" + old_path.read_bytes())
        r.publisher.publish_in_order(TOPIC, b'{"id": "stalled", "chunk": 0, "chunks": 2, "signature": {}}\nabc')
        r.samples([1])
        events = {}
        assert wait_until(lambda: len(r.events()) >= 11, 20), r.events()  # "stalled" after chunk_timeout = 5 s
        for event in r.events():
            events[event["id"]] = event["reason"]
        assert events == {"wrong-key": "untrusted", "old": "not_newer", "unversioned": "unversioned",
                          "tampered": "tampered", "unsigned": "unsigned", "?": "bad_header",
                          "far": "path_not_allowed", "link": "path_not_allowed", "dots": "path_not_allowed",
                          "forged": "bad_signature", "stalled": "incomplete"}
        assert not list((tmp_path / "state" / "models").rglob("*.ern"))  # nothing refused was kept
        assert all(e["event"] == "refused" and e["message"] for e in r.events())
        _assert_equal(r.wait_predictions(DEVICES), [(r.v1, [1], True)])
        assert r.daemon.pipelines[0].model.spec.model_version == "1"
        text = r.daemon.metrics.text().decode()
        for reason in ("untrusted", "not_newer", "unversioned", "tampered", "unsigned", "bad_header", "incomplete"):
            assert f'result="refused_{reason}"}} 1.0' in text
    finally:
        r.close()


def test_a_local_path_update_that_changes_the_state_shape_resets_the_streams(rig):
    tmp_path, broker = rig
    (tmp_path / "incoming" / "keys").symlink_to(tmp_path / "keys")
    v3, v3_path = _model(tmp_path / "incoming", "v3.ern", "3", seed=2, hidden=10)
    r = Rig(tmp_path, broker)
    try:
        r.samples(range(1, 6))
        r.publisher.publish_in_order(TOPIC, json.dumps({"id": "local", "path": str(v3_path)}).encode() + b"\n")
        r.samples(range(6, 11))
        event = r.wait_event()
        assert event["event"] == "installed" and event["states"] == "reset"
        _assert_equal(r.wait_predictions(10 * DEVICES), [(r.v1, range(1, 6), True), (v3, range(6, 11), False)])
        assert 'edgernn_resets_total{cause="reload",pipeline="imu"} 3.0' in r.daemon.metrics.text().decode()
    finally:
        r.close()


def test_shadow_promotes_a_candidate_that_stays_close_and_keeps_the_states_it_built(rig):
    tmp_path, broker = rig
    v2, v2_path = _model(tmp_path, "v2.ern", "2", seed=1)
    r = Rig(tmp_path, broker, updates="shadow_messages = 12\nmax_divergence = 100.0")
    try:
        r.samples(range(1, 6))
        r.send(v2_path)
        assert r.wait_event()["event"] == "shadow_started"
        r.samples(range(6, 10))  # 4 rounds of 3: the 12 predictions of the shadow run, then the promotion
        event = r.wait_event(2)
        assert event["event"] == "promoted" and event["version"] == "2"
        shadow = r.wait_predictions(4 * DEVICES, prefix="edgernn/shadow/imu/")
        # the candidate ran from the current model's states at the update, on the same samples
        expected_v2 = {d: _offline([(r.v1, range(1, 6), True), (v2, range(6, 13), True)], d) for d in range(DEVICES)}
        for device in range(DEVICES):
            assert sorted(shadow[device]) == [6, 7, 8, 9]
            for seq, y in shadow[device].items():
                np.testing.assert_allclose(y, expected_v2[device][seq], atol=1e-5)
        assert r.daemon.pipelines[0].model.spec.model_version == "2"
        r.samples(range(10, 13))
        received = r.wait_predictions(12 * DEVICES)
        # served: v1 during the shadow run, then v2 from the states the candidate built
        for device in range(DEVICES):
            expected_v1 = _offline([(r.v1, range(1, 10), True)], device)
            for seq in range(1, 10):
                np.testing.assert_allclose(received[device][seq], expected_v1[seq], atol=1e-5)
            for seq in range(10, 13):
                np.testing.assert_allclose(received[device][seq], expected_v2[device][seq], atol=1e-5)
    finally:
        r.close()


def test_shadow_drops_a_candidate_that_diverges(rig):
    tmp_path, broker = rig
    _, v2_path = _model(tmp_path, "v2.ern", "2", seed=1)
    r = Rig(tmp_path, broker, updates="shadow_messages = 30\nmax_divergence = 1e-6")
    try:
        r.send(v2_path)
        r.samples(range(1, 4))
        event = r.wait_event(2)
        assert event["event"] == "shadow_failed" and "diverged" in event["reason"]
        assert r.daemon.pipelines[0].model.spec.model_version == "1"
        _assert_equal(r.wait_predictions(3 * DEVICES), [(r.v1, range(1, 4), True)])
    finally:
        r.close()


def test_a_model_that_fails_on_probation_is_rolled_back_to_the_last_good_one_on_disk(rig):
    tmp_path, broker = rig
    v2, v2_path = _model(tmp_path, "v2.ern", "2", seed=1)
    _, bad_path = _model(tmp_path, "v5.ern", "5", seed=1, poison=True)  # v2's recurrent weights, a poisoned head
    r = Rig(tmp_path, broker, updates="probation_messages = 6")
    store = ModelStore(tmp_path / "state" / "models", "imu")
    try:
        r.send(v2_path, update_id="v2")
        assert r.wait_event()["event"] == "installed" and store.manifest()["current"]["proven"] is False
        r.samples(range(1, 4))  # 9 finite predictions: v2 passes its probation, the last good model from now on
        assert wait_until(lambda: store.manifest()["current"]["proven"], 10)
        r.send(bad_path, update_id="v5")
        r.samples([4])  # inf predictions: the rollback follows this micro-batch
        assert r.wait_event(2)["event"] == "installed"
        rollback = r.wait_event(3)
        assert rollback["event"] == "rolled_back" and rollback["version"] == "2"
        assert rollback["reason"] == "a non-finite prediction"
        r.samples(range(5, 8))
        received = r.wait_predictions(7 * DEVICES)
        # what v5 published (inf is null in JSON), up to the micro-batch after which it was rolled back
        assert None in received[0][4]
        expected = [(v2, range(1, 8), True)]  # v5 advanced the same recurrent state: v2 continues exactly
        for device in range(DEVICES):
            offline_v2 = _offline(expected, device)
            for seq in range(1, 8):
                if None not in received[device][seq]:
                    np.testing.assert_allclose(received[device][seq], offline_v2[seq], atol=1e-5)
        manifest = ModelStore(tmp_path / "state" / "models", "imu").manifest()
        assert manifest["current"]["version"] == "2" and manifest["highest_version"] == "5"
        assert r.daemon.pipelines[0].model.spec.model_version == "2"
    finally:
        r.close()


def test_edgernn_update_sends_a_model_and_says_what_became_of_it(rig):
    import subprocess
    import sys

    tmp_path, broker = rig
    _, v2_path = _model(tmp_path, "v2.ern", "2", seed=1)
    r = Rig(tmp_path, broker)
    try:
        def update(*extra):
            return subprocess.run([sys.executable, "-m", "edgernn", "update", str(v2_path), "--config", str(r.config),
                                   "--pipeline", "imu", "--chunk-size", "2048", "--wait", "30", *extra],
                                  capture_output=True, text=True, timeout=120)

        done = update()
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["event"] == "installed" and json.loads(done.stdout)["version"] == "2"
        again = update()  # the same version again: refused, exit 1, the reason printed
        assert again.returncode == 1 and json.loads(again.stdout)["reason"] == "not_newer"
        assert r.daemon.pipelines[0].model.spec.model_version == "2"
    finally:
        r.close()


def test_a_restart_serves_the_last_good_install_when_the_current_one_is_broken_and_the_config_when_it_changed(rig):
    tmp_path, broker = rig
    _, v2_path = _model(tmp_path, "v2.ern", "2", seed=1)
    _, v3_path = _model(tmp_path, "v3.ern", "3", seed=2)
    r = Rig(tmp_path, broker, updates="probation_messages = 0")  # every install is good at once
    try:
        r.send(v2_path, update_id="v2")
        assert r.wait_event()["event"] == "installed"
        r.send(v3_path, update_id="v3")
        assert r.wait_event(2)["event"] == "installed"
        r.daemon.stop()
        store = ModelStore(tmp_path / "state" / "models", "imu")
        manifest = store.manifest()
        assert (manifest["current"]["version"], manifest["last_good"]["version"]) == ("3", "2")
        assert sorted(p.name for p in store.directory.glob("*.ern")) == sorted(
            [manifest["current"]["file"], manifest["last_good"]["file"]])  # older installs are pruned
        broken = store.directory / manifest["current"]["file"]
        broken.write_bytes(broken.read_bytes()[:-1] + b"\0")  # its signature no longer matches
        r.daemon = start_daemon(r.config)
        assert r.daemon.pipelines[0].model.spec.model_version == "2"
        assert wait_until(lambda: any(e["event"] == "rolled_back" and "3 set aside: it did not load" in e["reason"]
                                      for e in r.events()), 10), r.events()
        r.daemon.stop()
        _model(tmp_path, "v1.ern", "7", seed=3)  # deployed by hand in the config's own file: that one serves
        r.daemon = start_daemon(r.config)
        assert r.daemon.pipelines[0].model.spec.model_version == "7"
    finally:
        r.close()


def test_an_update_inside_a_burst_splits_the_micro_batch_at_its_place_and_the_journal_follows(rig):
    """Samples and the update queued by the broker while the daemon is away arrive as one burst: the update
    sits inside micro-batches, which `Scheduler.process` splits. With durability = "journal"."""
    tmp_path, broker = rig
    v2, v2_path = _model(tmp_path, "v2.ern", "2", seed=1)
    r = Rig(tmp_path, broker, state='durability = "journal"')
    r.daemon.stop()
    r.samples(range(1, 16))
    r.send(v2_path, chunk_size=700)
    r.samples(range(16, 31))
    r.daemon = start_daemon(r.config)
    try:
        _assert_equal(r.wait_predictions(30 * DEVICES), [(r.v1, range(1, 16), True), (v2, range(16, 31), True)])
        sizes = {s.labels.get("le"): s.value for s in r.daemon.metrics.batch_size.collect()[0].samples
                 if s.name.endswith("_bucket")}
        assert sizes["1.0"] < sizes["+Inf"] / 2  # most micro-batches held several messages: bursts
        assert r.wait_event()["event"] == "installed"
    finally:
        r.daemon.stop()
    r.daemon = start_daemon(r.config)
    try:
        r.samples(range(31, 36))
        _assert_equal(r.wait_predictions(35 * DEVICES), [(r.v1, range(1, 16), True), (v2, range(16, 36), True)])
    finally:
        r.close()


def test_a_kill_after_a_swap_replays_the_journal_with_the_new_model(rig):
    tmp_path, broker = rig
    v2, v2_path = _model(tmp_path, "v2.ern", "2", seed=1)
    r = Rig(tmp_path, broker, state='durability = "journal"\nsnapshot_interval = 3600', process=True)
    try:
        r.samples(range(1, 6))
        r.send(v2_path)
        r.samples(range(6, 11))
        r.wait_predictions(10 * DEVICES)
        r.daemon.kill()  # the journal since the swap's snapshot holds seqs 6-10, stepped by v2
        r.daemon.start()
        # v2 was on probation when the daemon died: counted (at 3, the last good model would serve instead)
        assert ModelStore(tmp_path / "state" / "models", "imu").manifest()["current"]["crashes"] == 1
        r.samples(range(11, 16))
        received = r.wait_predictions(15 * DEVICES)
        _assert_equal(received, [(r.v1, range(1, 6), True), (v2, range(6, 16), True)])
        for topic, body in list(r.watcher.messages):  # a prediction published again after the kill is the same
            if topic.startswith("predictions/"):
                message = json.loads(body)
                np.testing.assert_allclose(message["y"], received[int(message["key"][3:])][message["seq"]], atol=1e-6)
    finally:
        r.close()


def test_shadow_refuses_a_candidate_whose_outputs_differ(rig):
    tmp_path, broker = rig
    three = random_model("gru", seed=1, input_size=3, hidden=8, head=(1, 3))
    edgernn.save(edgernn.Model(dataclasses.replace(three.spec, model_version="2"), three.weights), tmp_path / "v2.ern")
    sign_file(tmp_path / "v2.ern", tmp_path / "keys" / "release.key")
    r = Rig(tmp_path, broker, updates="shadow_messages = 5")
    try:
        r.send(tmp_path / "v2.ern")
        event = r.wait_event()
        assert event["reason"] == "bad_model" and "cannot run in shadow" in event["message"]
    finally:
        r.close()


def test_home_assistant_entities_follow_a_model_update(rig):
    tmp_path, broker = rig
    labelled = random_model("gru", seed=1, input_size=3, hidden=8, head=(1, 2))
    spec = dataclasses.replace(labelled.spec, model_version="2", labels=("calm", "busy"))
    edgernn.save(edgernn.Model(spec, labelled.weights), tmp_path / "v2.ern")
    sign_file(tmp_path / "v2.ern", tmp_path / "keys" / "release.key")
    r = Rig(tmp_path, broker, updates="[homeassistant]")
    try:
        def configs():
            found = {}
            for topic, body in list(r.watcher.messages):
                if topic.startswith("homeassistant/") and topic.endswith("/config"):
                    found[topic.split("/")[-2].rsplit("_", 1)[1] + "@" + topic.split("/")[-2][:9]] = body
            return found

        r.samples([1])
        assert wait_until(lambda: len([k for k, v in configs().items() if v]) == 2 * DEVICES, 20)
        assert {k.split("@")[0] for k in configs()} == {"y0", "y1"}
        r.send(tmp_path / "v2.ern")
        assert r.wait_event()["event"] == "installed"
        assert wait_until(lambda: sum(1 for k, v in configs().items() if v and k.split("@")[0] in ("class", "confidence"))
                          == 2 * DEVICES and all(not v for k, v in configs().items() if k.split("@")[0] in ("y0", "y1")), 20)
        announced = [json.loads(v) for k, v in configs().items() if v]
        assert {c["device"]["sw_version"] for c in announced} == {"2"}
    finally:
        r.close()


def test_a_model_on_probation_at_three_crashes_is_set_aside_for_the_last_good_one(tmp_path):
    from edgernn.runtime.config import UpdatesConfig, load_config
    from edgernn.runtime.updates import MAX_PROBATION_CRASHES, serving_configs, sha256_of

    (tmp_path / "keys").mkdir()
    generate_keys(tmp_path / "keys" / "release.key", tmp_path / "keys" / "release.pub")
    _model(tmp_path, "v1.ern", "1")
    config = write_config(tmp_path, 1, model="v1.ern")
    pipeline = load_config(config).pipelines[0]
    updates = UpdatesConfig(topic="t", events_topic="e", dir=tmp_path / "models")
    store = ModelStore(updates.dir, "imu")
    store.directory.mkdir(parents=True)
    manifest = {"source_sha256": sha256_of(pipeline.model), "highest_version": "3",
                "current": {"file": "c.ern", "version": "3", "proven": False, "crashes": MAX_PROBATION_CRASHES - 1},
                "last_good": {"file": "g.ern", "version": "2", "proven": True}}
    store.write_manifest(manifest)
    assert [c.model.name for c in serving_configs(updates, pipeline)] == ["c.ern", "g.ern", "v1.ern"]
    manifest["current"]["crashes"] = MAX_PROBATION_CRASHES
    store.write_manifest(manifest)
    assert [c.model.name for c in serving_configs(updates, pipeline)] == ["g.ern", "v1.ern"]


def test_a_shadow_follows_the_streams_resets_and_a_reload_ends_it(rig):
    tmp_path, broker = rig
    v2, v2_path = _model(tmp_path, "v2.ern", "2", seed=1)
    r = Rig(tmp_path, broker, updates="shadow_messages = 1000\nmax_divergence = 100.0")
    r.daemon.stop()
    r.config.write_text(r.config.read_text().replace('qos = 1\n', 'qos = 1\nseq_gap = "reset"\n', 1))
    r.daemon = start_daemon(r.config)
    try:
        r.samples(range(1, 4))
        r.send(v2_path)
        assert r.wait_event()["event"] == "shadow_started"
        r.samples([4, 5, 8, 9])  # 6 and 7 lost: every stream restarts from the rest state at 8
        shadow = r.wait_predictions(4 * DEVICES, prefix="edgernn/shadow/imu/")
        served = r.wait_predictions(7 * DEVICES)
        for device in range(DEVICES):
            candidate = _offline([(r.v1, range(1, 4), True), (v2, [4, 5], True), (v2, [8, 9], False)], device)
            current = _offline([(r.v1, [1, 2, 3, 4, 5], True), (r.v1, [8, 9], False)], device)
            for seq in (4, 5, 8, 9):
                np.testing.assert_allclose(shadow[device][seq], candidate[seq], atol=1e-5)
                np.testing.assert_allclose(served[device][seq], current[seq], atol=1e-5)
        r.daemon.reload()  # SIGHUP: the config's own model again; the shadow run is moot
        event = r.wait_event(2)
        assert event["event"] == "shadow_failed" and "reload" in event["reason"]
        assert r.daemon.pipelines[0].observer is None
    finally:
        r.close()
