"""The per-stream warm-up count (column ``steps``, runtime/pipeline.py) without a broker: what resets it,
what snapshots keep of it, and snapshots written before it existed."""

from __future__ import annotations

import numpy as np
import pytest

from daemon_harness import sample, write_config, write_model
from edgernn.runtime.codecs import REJECT_REASONS
from edgernn.runtime.config import load_config
from edgernn.runtime.metrics import Metrics
from edgernn.runtime.pipeline import STEPS_UNKNOWN, STREAM_COLUMNS, Pipeline
from edgernn.streams import StreamTable

UNUSED_PORT = 1  # nothing connects


def _pipeline(tmp_path, options: str = "warmup_steps = 2") -> Pipeline:
    config = load_config(write_config(tmp_path, UNUSED_PORT, pipeline=options))
    p = Pipeline(config.pipelines[0], config.state, Metrics(["imu"], REJECT_REASONS).pipeline("imu"))
    p.store.recover(p.table)
    return p


def _step(p: Pipeline, key: str, seq: int) -> tuple[int, bytes | None]:
    counts = np.empty(1, np.int64)
    Y, stepped = p.advance([key], np.array([seq]), sample(0, seq)[None], counts=counts)
    assert stepped[0]
    return int(counts[0]), p.prediction(key, Y[0], seq, None, int(counts[0]))


def test_counts_restart_after_a_gap_reset_and_survive_a_snapshot(tmp_path):
    write_model(tmp_path / "model.ern")
    p = _pipeline(tmp_path, 'warmup_steps = 2\nseq_gap = "reset"')
    steps = [_step(p, "a", seq) for seq in (0, 1, 2, 9, 10, 11)]  # 9: a gap, the stream back at rest
    assert [count for count, _ in steps] == [1, 2, 3, 1, 2, 3]
    assert [b'"warm":false' in payload for _, payload in steps] == [True, True, False, True, True, False]
    p.store.snapshot(p.table)
    p.store.close()
    again = _pipeline(tmp_path, 'warmup_steps = 2\nseq_gap = "reset"')
    assert _step(again, "a", 12)[0] == 4
    again.store.close()


def test_streams_of_a_snapshot_without_the_count_are_taken_as_warm(tmp_path):
    model = write_model(tmp_path / "model.ern")
    old_columns = {name: column for name, column in STREAM_COLUMNS.items() if name != "steps"}
    old = StreamTable(model, columns=old_columns)  # what the daemon wrote before warmup_steps existed
    old.step(["a"], sample(0, 0)[None])
    (tmp_path / "state").mkdir()
    old.snapshot(tmp_path / "state" / "imu.snapshot", {"journal_generation": "0", "next_batch_no": "0"})
    p = _pipeline(tmp_path, 'warmup_steps = 2\nwarmup_policy = "withhold"')
    count, payload = _step(p, "a", 1)
    assert count == STEPS_UNKNOWN + 1 and payload is not None
    assert _step(p, "b", 0) == (1, None)  # a new stream still warms up
    assert p.metrics.warmup_withheld._value.get() == 1
    p.store.close()


def test_no_warmup_leaves_every_prediction_as_it_was(tmp_path):
    write_model(tmp_path / "model.ern")
    p = _pipeline(tmp_path, "")
    count, payload = _step(p, "a", 0)
    assert count == 1 and b"warm" not in payload
    p.store.close()


def test_the_encoder_marks_only_with_a_warm_field_and_only_json():
    from edgernn.runtime.codecs import Encoder
    y = np.array([1.5, -2.0], np.float32)
    marking = Encoder("json", warm_field="warm")
    assert marking.encode("a", y, 3, None, warm=False) == b'{"y":[1.5,-2],"warm":false,"seq":3,"key":"a"}'
    assert marking.encode("a", y, 3, None) == Encoder("json").encode("a", y, 3, None)
    with pytest.raises(ValueError, match="warm=False needs an Encoder made with a warm_field"):
        Encoder("json").encode("a", y, 3, None, warm=False)
    with pytest.raises(ValueError, match="warm_field: only for output_format 'json', not 'raw'"):
        Encoder("raw", warm_field="warm")
    with pytest.raises(ValueError, match="field names must differ"):
        Encoder("json", y_field="warm", warm_field="warm")
