"""A full disk under `edgernn serve` with the journal: it serves on, counts and says what it cannot write.

The disk is made "full" for real, by the kernel: the daemon runs with a file-size limit (RLIMIT_FSIZE, and
SIGXFSZ ignored), so every write past the limit fails with EFBIG as a full filesystem fails with ENOSPC.
Its log goes to a pipe, which the limit does not cover. Expected: every message still gets its
prediction, equal to the offline run; the batches that could not be journalled are counted
(``edgernn_journal_errors_total``) and said (``journal_failed``, rate-limited); the journal holds only whole
records (a failed append is cut off again), so the next start reads it without a complaint.
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import threading
import urllib.request

import numpy as np
import pytest

from broker import Client, free_port, mosquitto_binary
from daemon_harness import ROOT, offline, payload, wait_until, write_config, write_model
from edgernn.runtime.codecs import REJECT_REASONS
from edgernn.runtime.config import load_config
from edgernn.runtime.metrics import Metrics
from edgernn.runtime.pipeline import Pipeline

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (make test installs it)")]

FILE_SIZE_LIMIT = 6000  # bytes: the journal outgrows it after about a hundred one-message batches
STREAMS, SAMPLES = 2, 120


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death; stays ignored across exec
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


def _journal_errors(port: int) -> float:
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in page.splitlines():
        if line.startswith('edgernn_journal_errors_total{pipeline="imu"}'):
            return float(line.split()[-1])
    return 0.0


def test_a_full_disk_is_served_through_counted_and_said(tmp_path, broker):
    model = write_model(tmp_path / "model.ern")
    metrics_port = free_port()
    config = write_config(tmp_path, broker.port, state='durability = "journal"\nsnapshot_interval = 3600',
                          metrics=f'listen = "127.0.0.1:{metrics_port}"', log_level="info")
    process = subprocess.Popen([sys.executable, "-m", "edgernn", "serve", "--config", str(config)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_limit_file_size)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.decode() for line in process.stdout), daemon=True)
    reader.start()
    collector = sender = None
    try:
        assert wait_until(lambda: any('"event": "started"' in line for line in lines) or process.poll() is not None,
                          60), "the daemon did not start"
        assert process.poll() is None, "".join(lines)[-3000:]
        collector = Client(broker.port, subscribe="predictions/#")
        sender = Client(broker.port)
        for seq in range(SAMPLES):  # one message per micro-batch, so one journal record each
            for k in range(STREAMS):
                sender.publish(f"sensors/dev{k}/imu", payload(k, seq))
        assert collector.wait_for_distinct(STREAMS * SAMPLES, 60) == STREAMS * SAMPLES
        got = collector.predictions()
        for k in range(STREAMS):
            want = offline(model, k, range(SAMPLES))
            np.testing.assert_allclose([got[f"dev{k}"][s] for s in range(SAMPLES)], want, atol=1e-5)
        errors = _journal_errors(metrics_port)
        assert 0 < errors < STREAMS * SAMPLES, errors
        events = [json.loads(line) for line in list(lines) if line.startswith("{")]
        failed = [event for event in events if event.get("event") == "journal_failed"]
        assert failed and "File too large" in failed[0]["msg"], "no journal_failed line"
        # At most one line a minute however many batches failed (a loaded machine batches more messages per
        # write, so the number of failed writes varies: 1 was seen).
        assert len(failed) == 1, f"journal_failed is not rate-limited: {len(failed)} lines for {errors:.0f} errors"
    finally:
        for client in (sender, collector):
            if client is not None:
                client.close()
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        reader.join(10)
    journals = sorted((tmp_path / "state").glob("imu.journal.*"))
    assert journals and all(path.stat().st_size <= FILE_SIZE_LIMIT for path in journals)

    # The next start, with room on the disk, recovers as the daemon does: the journal is whole.
    loaded = load_config(config)
    pipeline = Pipeline(loaded.pipelines[0], loaded.state, Metrics(["imu"], REJECT_REASONS).pipeline("imu"))
    recovery = pipeline.store.recover(pipeline.table)
    assert recovery.problems == []
    pipeline.store.close()
