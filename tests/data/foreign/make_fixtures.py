"""Generate the Keras -> tf2onnx fixtures in this folder (tests/test_onnx_foreign.py reads them).

Runs only in a throwaway TensorFlow environment, never in the project's venv (edgernn does not depend on
TensorFlow, and CI reads the committed fixtures without it). The fixtures here were made with exactly:

    python3.11 -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install "tensorflow-cpu==2.15.1" "tf2onnx==1.16.1" "numpy<2" "protobuf==3.20.3" \
        "onnx==1.16.2" "onnxruntime==1.18.1"
    /tmp/tfenv/bin/python tests/data/foreign/make_fixtures.py        # from the repository root

(TensorFlow 2.15 ships Keras 2.15, the Keras tf2onnx 1.16 converts; Keras 3 models it does not.)

For every model in `MODELS` it writes ``<name>.onnx`` (``tf2onnx.convert.from_keras`` at the opset in the
name) and ``<name>.npz`` holding a seeded input batch ``x`` (B=2, T, F) and Keras's own output ``y`` for it
(``model.predict``). Weights are drawn from a seeded normal distribution (biases too, so a misread bias
shows), at a scale that keeps the networks out of saturation. The graph input is named ``x`` with dynamic
batch and time axes unless the model says otherwise (a fixed length where it does). ``make_fixtures.py
NAME ...`` remakes only those models. Re-running gives the same numbers; tf2onnx numbers the nodes it adds
with a counter that runs over one process, so their names depend on which models one run makes (the tests
look names up in the graph, never hard-code them).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402

HERE = Path(__file__).resolve().parent
L = tf.keras.layers


def lstm_dense(F):
    return [L.LSTM(8, return_sequences=True), L.Dense(3)]


def gru_reset_after(F):
    return [L.GRU(6, return_sequences=True, reset_after=True), L.Dense(2)]


def gru_reset_before(F):
    return [L.GRU(6, return_sequences=True, reset_after=False), L.Dense(2)]


def rnn_tanh(F):
    return [L.SimpleRNN(5, return_sequences=True), L.Dense(3)]


def rnn_last(F):
    return [L.SimpleRNN(6), L.Dense(3, activation="softmax")]


def bi_rnn(F):
    return [L.Bidirectional(L.SimpleRNN(4, return_sequences=True)), L.Dense(2)]


def rnn_relu(F):
    return [L.SimpleRNN(5, activation="relu", return_sequences=True), L.Dense(3)]


def lstm_stacked(F):
    return [L.LSTM(8, return_sequences=True), L.LSTM(6, return_sequences=True), L.Dense(3)]


def bilstm(F):
    return [L.Bidirectional(L.LSTM(5, return_sequences=True)), L.Dense(3)]


def bilstm_last(F):
    return [L.Bidirectional(L.LSTM(4)), L.Dense(3, activation="softmax")]


def lstm_last_softmax(F):
    return [L.LSTM(8), L.Dense(4, activation="softmax")]


def lstm_no_bias(F):
    return [L.LSTM(6, use_bias=False, return_sequences=True), L.Dense(3, use_bias=False)]


def gru_time_distributed(F):
    return [L.GRU(7, return_sequences=True), L.TimeDistributed(L.Dense(4, activation="tanh"))]


def normalized_lstm(F):
    rng = np.random.default_rng(99)
    mean, variance = rng.normal(0, 2, F), rng.uniform(0.3, 4.0, F)
    return [L.Normalization(mean=mean, variance=variance), L.LSTM(6, return_sequences=True),
            L.Dense(5, activation="relu"), L.Dense(2)]


def masked_lstm(F):
    return [L.Masking(mask_value=0.0), L.LSTM(5, return_sequences=True), L.Dense(2)]


# name: (layers, features, time steps, opset, fixed input length (None: dynamic))
MODELS = {
    "lstm_dense_op13": (lstm_dense, 4, 9, 13, None),
    "lstm_dense_op17": (lstm_dense, 4, 9, 17, None),
    "gru_reset_after_op13": (gru_reset_after, 3, 8, 13, None),
    "gru_reset_after_op17": (gru_reset_after, 3, 8, 17, None),
    "gru_reset_before_op13": (gru_reset_before, 5, 10, 13, None),
    "rnn_tanh_op13": (rnn_tanh, 4, 7, 13, None),
    "rnn_relu_op15": (rnn_relu, 3, 11, 15, None),
    "rnn_last_op13": (rnn_last, 4, 9, 13, None),
    "bi_rnn_op13": (bi_rnn, 3, 8, 13, None),
    "lstm_stacked_op13": (lstm_stacked, 5, 12, 13, None),
    "bilstm_op13": (bilstm, 4, 8, 13, None),
    "bilstm_op17": (bilstm, 4, 8, 17, None),
    "lstm_last_softmax_op13": (lstm_last_softmax, 3, 10, 13, 10),
    "bilstm_last_op13": (bilstm_last, 3, 7, 13, None),
    "lstm_no_bias_op13": (lstm_no_bias, 4, 7, 13, None),
    "gru_time_distributed_op13": (gru_time_distributed, 5, 9, 13, None),
    "normalized_lstm_op13": (normalized_lstm, 4, 11, 13, None),
    "masked_lstm_op13": (masked_lstm, 3, 8, 13, None),
}
BATCH = 2
WEIGHT_SCALE = 0.4


def build(name, make, F, T, fixed):
    seed = sum(map(ord, name))
    tf.keras.backend.clear_session()  # layer names restart for each model, whichever models one run makes
    tf.keras.utils.set_random_seed(seed)
    inputs = tf.keras.Input((fixed, F), name="x")
    y = inputs
    for layer in make(F):
        y = layer(y)
    model = tf.keras.Model(inputs, y, name=name)
    rng = np.random.default_rng(seed)
    trainable = {id(w) for w in model.trainable_weights}
    model.set_weights([(rng.standard_normal(w.shape) * WEIGHT_SCALE).astype(np.float32)
                       if id(w) in trainable else w.numpy() for w in model.weights])
    x = rng.standard_normal((BATCH, T, F)).astype(np.float32)
    if name.startswith("masked"):
        x[1, -3:] = 0.0  # a padded tail: Keras skips these steps for the second sequence
    return model, x


def main(names):
    print(f"tensorflow {tf.__version__}, keras {__import__('keras').__version__}, tf2onnx {tf2onnx.__version__}, "
          f"onnx {onnx.__version__}")
    for name, (make, F, T, opset, fixed) in MODELS.items():
        if names and name not in names:
            continue
        model, x = build(name, make, F, T, fixed)
        y = model.predict(x, verbose=0)
        signature = (tf.TensorSpec((None, fixed, F), tf.float32, name="x"),)
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=opset)
        proto.producer_version = tf2onnx.__version__
        onnx.save(proto, str(HERE / f"{name}.onnx"))
        np.savez(HERE / f"{name}.npz", x=x, y=y.astype(np.float32))
        ops = sorted({n.op_type for n in proto.graph.node})
        size = (HERE / f"{name}.onnx").stat().st_size
        print(f"{name}: {size} bytes, y {y.shape}, ops {' '.join(ops)}")


if __name__ == "__main__":
    main(sys.argv[1:])
