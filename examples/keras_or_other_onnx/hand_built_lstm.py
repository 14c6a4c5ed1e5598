"""The ONNX path without PyTorch: a hand-built ONNX LSTM graph, converted, verified and streamed.

Many models reach edgernn as an ONNX file from a framework other than PyTorch. This one is written node by
node with `onnx.helper`, using LSTM features PyTorch's nn.LSTM does not have:
  - peephole connections (the LSTM node's input P),
  - a coupled input-forget gate (input_forget=1: f = 1 - i),
  - HardSigmoid gates (the old Keras default recurrent_activation) instead of Sigmoid,
and around it an input normalisation (Sub, Div) and a dense Softmax head (MatMul, Add, Softmax).

The task: tell a machine's state from a 3-axis vibration sensor, sample by sample (idle / running /
bearing fault). The LSTM is a fixed random "reservoir" (seeded); only the head is fitted, by ridge
regression on the LSTM's hidden states, which onnxruntime computes from the same graph without its head.
No gradient, no training framework: numpy, onnx and onnxruntime.

Then the part every ONNX model goes through:
  1. `onnx.checker` validates the graph; `from_onnx` converts it (refusing anything it cannot express),
  2. `edgernn.save` writes the .ern file; `edgernn inspect` and `edgernn verify` (the CLI) check it,
  3. parity against onnxruntime over a whole sequence and one sample at a time (`model.step`),
  4. per-sample latency: edgernn's `model.step` against onnxruntime's `session.run` on a step graph.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import edgernn
from edgernn.cli import main as edgernn_cli
from edgernn.converters import from_onnx

CLASSES = ("idle", "running", "bearing fault")
INPUTS, HIDDEN = 3, 96
SETTLE = 30  # samples after a change of state that are not scored (the model needs a moment to notice)


# ---- the data: a simulated 3-axis vibration sensor ---------------------------------------------------
def vibration_stream(samples: int, seed: int):
    """A stream of segments (150-400 samples each) in a random machine state -> xs (T, 3), labels (T,),
    and a mask of the samples scored (all but the first SETTLE after each change)."""
    rng = np.random.default_rng(seed)
    xs, labels, scored = [], [], []
    while sum(map(len, labels)) < samples:
        state, length = rng.integers(3), rng.integers(150, 400)
        t = np.arange(length)[:, None]
        x = 0.15 * rng.standard_normal((length, INPUTS))  # sensor noise, always
        if state >= 1:  # running: the shaft's rotation, a different gain and phase per axis
            gain = rng.uniform(0.6, 1.4) * np.array([1.0, 0.6, 0.3])
            x += gain * np.sin(2 * np.pi * 0.03 * t + rng.uniform(0, 2 * np.pi, INPUTS))
        if state == 2:  # a bearing fault: a ringing impulse each time a ball passes the defect
            period, ring = rng.uniform(9, 12), np.exp(-0.4 * np.arange(8)) * np.sin(1.9 * np.arange(8))
            for start in np.arange(rng.uniform(0, period), length - 8, period).astype(int):
                x[start:start + 8] += rng.uniform(1.0, 1.5) * ring[:, None] * np.array([0.3, 1.0, 0.5])
        xs.append(x)
        labels.append(np.full(length, state))
        scored.append(np.arange(length) >= SETTLE)
    cut = slice(0, samples)
    return (np.concatenate(xs)[cut].astype(np.float32), np.concatenate(labels)[cut],
            np.concatenate(scored)[cut])


# ---- the model, written as an ONNX graph ------------------------------------------------------------
def reservoir_weights(seed: int = 7) -> dict:
    """Fixed random LSTM weights in ONNX's layout: W (1, 4H, I), R (1, 4H, H), B (1, 8H), P (1, 3H), gate
    blocks in ONNX's order i, o, f, c. With input_forget the f blocks are never read (they stay zero)."""
    rng = np.random.default_rng(seed)
    H = HIDDEN
    W = rng.normal(0, 0.2, (4 * H, INPUTS))  # small input weights: the units stay near their linear range
    R = rng.normal(0, 1.0 / np.sqrt(H), (4 * H, H))
    W[2 * H:3 * H] = R[2 * H:3 * H] = 0  # f: unused with input_forget
    Wb = np.zeros(4 * H)
    # i = HardSigmoid(0.2 b + 0.5) from 0.02 to 0.5, f = 1 - i: memories from ~2 to ~50 samples
    Wb[:H] = rng.uniform(-2.4, 0.0, H)
    Wb[H:2 * H] = rng.uniform(0.0, 1.0, H)  # o: mostly open
    P = np.concatenate([rng.normal(0, 0.3, H), rng.normal(0, 0.3, H), np.zeros(H)])  # peepholes i, o, (f)
    B = np.concatenate([Wb, np.zeros(4 * H)])  # [Wb, Rb]: one bias is enough
    return {name: array[None].astype(np.float32) for name, array in (("W", W), ("R", R), ("B", B), ("P", P))}


def build_graph(weights: dict, mean, std, head=None, streaming: bool = False) -> onnx.ModelProto:
    """x (time, batch, 3) -> normalise -> LSTM -> [MatMul + Add -> Softmax] -> (time, batch, classes).

    Without ``head`` the graph ends at the LSTM's hidden states (what the head is fitted on). With
    ``streaming`` the LSTM's state is a graph input and output (h_in, c_in -> h_out, c_out): the graph
    onnxruntime needs to advance a stream one sample per call (edgernn keeps that state itself)."""
    H = HIDDEN
    init = {"mean": mean, "std": std, **weights}
    if head is not None:
        init["W_head"], init["b_head"] = head
    init["axis1"] = np.array([1], np.int64)
    initializers = [numpy_helper.from_array(np.asarray(v, np.float32 if k != "axis1" else np.int64), k)
                    for k, v in init.items()]
    state_in = ["h_in", "c_in"] if streaming else ["", ""]
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["scaled"]),
        helper.make_node("LSTM", ["scaled", "W", "R", "B", "", *state_in, "P"],
                         ["Y", "h_out" if streaming else "", "c_out" if streaming else ""], hidden_size=H,
                         input_forget=1, activations=["HardSigmoid", "Tanh", "Tanh"],
                         activation_alpha=[0.2], activation_beta=[0.5]),
        helper.make_node("Squeeze", ["Y", "axis1"], ["hidden"]),  # (T, 1, B, H) -> (T, B, H): one direction
    ]
    output, width = "hidden", H
    if head is not None:
        nodes += [helper.make_node("MatMul", ["hidden", "W_head"], ["scores"]),
                  helper.make_node("Add", ["scores", "b_head"], ["logits"]),
                  helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1)]
        output, width = "probabilities", len(CLASSES)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["time", "batch", INPUTS])]
    outputs = [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["time", "batch", width])]
    if streaming:
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, "batch", H]) for n in state_in]
        outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, "batch", H]) for n in ("h_out", "c_out")]
    graph = helper.make_graph(nodes, "vibration_state_lstm", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnx.helper")


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1  # one stream, one core: as on the device
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def fit_head(weights, mean, std, xs, labels, scored, ridge=1.0):
    """Ridge regression from the hidden states to one-hot labels, then the softmax temperature that
    minimises the cross-entropy on the same data (a 1-D grid search) -> (W_head (H, C), b_head (C,))."""
    hidden = session(build_graph(weights, mean, std)).run(None, {"x": xs[:, None]})[0][:, 0][scored]
    features = np.hstack([hidden, np.ones((len(hidden), 1))])
    targets = np.eye(len(CLASSES))[labels[scored]]
    solution = np.linalg.solve(features.T @ features + ridge * np.eye(features.shape[1]), features.T @ targets)
    scores = features @ solution

    def cross_entropy(temperature):
        z = temperature * scores
        z -= z.max(1, keepdims=True)
        return -np.mean(np.sum(targets * (z - np.log(np.exp(z).sum(1, keepdims=True))), 1))
    solution *= min(np.geomspace(0.5, 50, 60), key=cross_entropy)
    return solution[:-1].astype(np.float32), solution[-1].astype(np.float32)


def accuracy(probabilities, labels, scored) -> float:
    return float(np.mean(probabilities.argmax(-1)[scored] == labels[scored]))


def per_sample_us(step, samples, repeats: int = 3) -> float:
    """The best of ``repeats`` passes over ``samples``, one ``step(x)`` call per sample, in µs per call."""
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for x in samples:
            step(x)
        best = min(best, time.perf_counter() - start)
    return best / len(samples) * 1e6


def shell(*argv):
    """Run an `edgernn` shell command in this process (the same code as the `edgernn` executable)."""
    print("\n$ edgernn " + " ".join(a.name if isinstance(a, Path) else a for a in argv))
    if edgernn_cli([str(a) for a in argv]) != 0:
        raise SystemExit(f"edgernn {argv[0]} failed")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer test samples and a shorter timing loop")
    args = parser.parse_args()
    test_samples, timed = (4000, 1000) if args.quick else (20000, 10000)

    # 1. Build the model in ONNX terms only: the fixed LSTM, then the head fitted on its hidden states.
    train_xs, train_labels, train_scored = vibration_stream(40000, seed=1)
    mean, std = train_xs.mean(0), train_xs.std(0)
    weights = reservoir_weights()
    head = fit_head(weights, mean, std, train_xs, train_labels, train_scored)
    graph = build_graph(weights, mean, std, head)
    onnx.checker.check_model(graph, full_check=True)
    print(f"ONNX graph: {' -> '.join(node.op_type for node in graph.graph.node)} "
          f"(LSTM with peepholes, input_forget=1, HardSigmoid gates), checked by onnx.checker")
    train_accuracy = accuracy(session(graph).run(None, {"x": train_xs[:, None]})[0][:, 0], train_labels, train_scored)

    with tempfile.TemporaryDirectory() as folder:
        onnx_path, ern_path = Path(folder) / "vibration.onnx", Path(folder) / "vibration.ern"
        onnx.save(graph, onnx_path)

        # 2. Convert (from_onnx refuses what it cannot express exactly), save, and check it with the CLI.
        model = from_onnx(onnx_path)
        edgernn.save(model, ern_path, dtype="float32")
        print(f"converted: {model}; {ern_path.name} {ern_path.stat().st_size:,} bytes "
              f"(the ONNX file {onnx_path.stat().st_size:,} bytes)")
        shell("inspect", ern_path)
        shell("verify", ern_path, "--reference", onnx_path, "--steps", "300")  # exit 1 beyond 1e-5
        model = edgernn.load(ern_path)

        # 3. Parity with onnxruntime on held-out data: the whole sequence, then one sample at a time.
        xs, labels, scored = vibration_stream(test_samples, seed=2)
        reference = session(graph).run(None, {"x": xs[:, None]})[0][:, 0]
        whole = model.run(xs, model.new_state())
        state = model.new_state()
        streamed = np.stack([model.step(x, state) for x in xs])
        print(f"\nparity over {len(xs):,} held-out samples: max |edgernn - onnxruntime| = "
              f"{np.abs(whole - reference).max():.2e} (model.run), {np.abs(streamed - reference).max():.2e} "
              f"(model.step, one sample at a time)")
        print(f"accuracy {accuracy(streamed, labels, scored):.1%} held out ({accuracy(streamed, labels, True):.1%} "
              f"counting the first {SETTLE} samples after each change of state), {train_accuracy:.1%} training")
        for dtype in ("float16", "int8"):  # smaller files: the same classes, probabilities a little off
            small_path = Path(folder) / f"vibration-{dtype}.ern"
            edgernn.save(model, small_path, dtype=dtype)
            small = edgernn.load(small_path)
            ys = small.run(xs, small.new_state())
            print(f"  {dtype}: {small_path.stat().st_size:,} bytes, accuracy "
                  f"{accuracy(ys, labels, scored):.1%}, max |difference| to float32 {np.abs(ys - whole).max():.3f}")

    # 4. Latency per sample, one stream: edgernn's step against onnxruntime running the same graph as a
    #    step graph (the LSTM's state goes in and comes out of every call).
    step_session = session(build_graph(weights, mean, std, head, streaming=True))
    zeros = np.zeros((1, 1, HIDDEN), np.float32)
    feeds = {"h_in": zeros, "c_in": zeros}

    def ort_step(x):
        y, feeds["h_in"], feeds["c_in"] = step_session.run(None, {"x": x.reshape(1, 1, INPUTS), **feeds})
        return y

    # First a checked pass: the step graph computes what the whole-sequence graph computes.
    ort_step_error = max(float(np.abs(ort_step(x)[0, 0] - expected).max()) for x, expected in zip(xs, reference))
    ort_us = per_sample_us(ort_step, xs[:timed])
    state, out = model.new_state(), np.empty(len(CLASSES), np.float32)
    edgernn_us = per_sample_us(lambda x: model.step(x, state, out=out), xs[:timed])
    print(f"\nonnxruntime's step graph, one sample per session.run: max |difference| to its whole-sequence "
          f"run {ort_step_error:.2e}")
    print(f"latency per sample (best of 3 x {timed:,} samples, Python loop included): edgernn model.step "
          f"{edgernn_us:.1f} µs, onnxruntime session.run {ort_us:.1f} µs ({ort_us / edgernn_us:.1f}x)")


if __name__ == "__main__":
    main()
