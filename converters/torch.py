"""PyTorch -> edgernn: an ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (optionally with a dense head), or a checkpoint.

PyTorch's weight layout is edgernn's canonical one (see `edgernn.spec`), so conversion renames tensors
and never permutes gates:

=====================  ===============  ==========================================
PyTorch                edgernn          note
=====================  ===============  ==========================================
``weight_ih_l{k}``     ``layers.{k}.W``  (G*H, I) gate blocks i,f,g,o / r,z,n
``weight_hh_l{k}``     ``layers.{k}.R``  (G*H, H)
``bias_ih_l{k}``       ``layers.{k}.Wb`` (G*H,)
``bias_hh_l{k}``       ``layers.{k}.Rb`` (G*H,)
Linear ``weight``      ``head.{j}.W``    (out, in)
Linear ``bias``        ``head.{j}.b``    (out,)
=====================  ===============  ==========================================

A module's ``forward`` is Python the converter cannot read: it assumes the children run in registration
order, one time step at a time. ``verify=True`` runs the source and the converted model on the same
random sequence and refuses the conversion when they disagree, which is what catches a residual, a sum,
or a different order. Only this module imports torch.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgernn.errors import ConversionError
from edgernn.model import Model
from edgernn.spec import CELLS, DENSE_ACTIVATIONS, RNN_ACTIVATIONS, DenseLayer, ModelSpec, RecurrentLayer

log = logging.getLogger(__name__)

VERIFY_STEPS = 64
VERIFY_TOLERANCE = 1e-4
"""Max abs error allowed by verification, scaled up by the reference's magnitude when that exceeds 1."""

_ONNX = "export to ONNX instead"
_MODES = {"RNN_TANH": ("rnn", "tanh"), "RNN_RELU": ("rnn", "relu"), "GRU": ("gru", "tanh"), "LSTM": ("lstm", "tanh")}
_ACTIVATIONS = ((nn.ReLU, "relu"), (nn.Tanh, "tanh"), (nn.Sigmoid, "sigmoid"), (nn.Softmax, "softmax"))
_PASSTHROUGH = (nn.Identity, nn.Dropout)  # identity in eval mode
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
_CELL_OF_GATES = {gates: cell for cell, gates in CELLS.items()}
_RECURRENT_KEY = re.compile(
    r"^(?P<prefix>.*?)(?P<kind>weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(?P<layer>\d+)(?P<reverse>_reverse)?$"
)


def from_torch(source, *, nonlinearity=None, head_activations=None, trust_pickle=False, verify=True, seed=0):
    """A PyTorch recurrent model -> `edgernn.model.Model` computing the same outputs, one step at a time.

    ``source`` is one of:

    - an ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (unidirectional, no ``proj_size``): the model outputs the last
      layer's h at every step;
    - an ``nn.Module`` whose children (in registration order, ``nn.Sequential`` flattened) are one such
      layer, then ``nn.Linear`` layers and ``nn.ReLU`` / ``Tanh`` / ``Sigmoid`` / ``Softmax(dim=-1)``
      activations (``nn.Identity`` and ``nn.Dropout`` are skipped), applied at every step;
    - a path to a checkpoint, read with ``torch.load(weights_only=not trust_pickle)``. A pickled module
      (only with ``trust_pickle=True``: unpickling runs code from the file) is converted as above. A state
      dict, bare or nested under ``"state_dict"``, ``"model_state_dict"`` or ``"model"``, gives the
      architecture by tensor names and shapes: ``<prefix>weight_ih_l{k}`` ... for the recurrent layer, then
      ``<name>.weight`` / ``<name>.bias`` Linear layers in the dict's order. What shapes cannot tell comes
      from ``nonlinearity`` (rnn cells: ``"tanh"``, the default, or ``"relu"``) and ``head_activations``
      (one name per dense layer; default all ``"identity"``). **A state dict has no forward pass, so it
      cannot be verified**: wrong flags give a model that loads and runs but computes something else.

    ``verify`` (modules only) runs the source (eval mode, no grad) and the converted model on the same
    seeded normal sequence of `VERIFY_STEPS` steps and raises `ConversionError` when they differ by more
    than `VERIFY_TOLERANCE`: the forward pass did something the converter cannot see.
    """
    if isinstance(source, str | os.PathLike):
        return _from_file(Path(source), nonlinearity, head_activations, trust_pickle, verify, seed)
    if isinstance(source, nn.Module):
        _refuse_flags(nonlinearity, head_activations, type(source).__name__)
        return _from_module(source, verify, seed)
    raise ConversionError(f"from_torch takes an nn.Module or a checkpoint path, got {type(source).__name__}")


# ---- modules ------------------------------------------------------------------------------------


def _from_module(source: nn.Module, verify: bool, seed: int):
    """Convert a recurrent module or a wrapper of one, then (optionally) check it against the source."""
    if isinstance(source, nn.RNNBase):
        rnn, head = source, []
    else:
        rnn, head = _read_wrapper(source, verify)
    layers, weights = _recurrent(rnn)
    model = _assemble(rnn.input_size, layers, head, weights, type(source).__name__)
    if verify:
        _verify(source, model, rnn, seed)
    return model


def _read_wrapper(source: nn.Module, verify: bool):
    """The recurrent layer and head of a wrapper module, from its children in registration order."""
    own = [name for name, _ in source.named_parameters(recurse=False)]
    if own:
        raise ConversionError(
            f"{type(source).__name__} holds parameters of its own ({', '.join(own)}) that its forward pass uses "
            f"in a way edgernn cannot see; {_ONNX}"
        )
    children = list(_flatten(source))
    recurrent = [child for child in children if isinstance(child, nn.RNNBase)]
    if len(recurrent) != 1:
        raise ConversionError(
            f"{type(source).__name__} has {len(recurrent)} recurrent layers among its children "
            f"({', '.join(type(child).__name__ for child in children) or 'none'}); edgernn converts a module with "
            f"exactly one nn.RNN/nn.GRU/nn.LSTM (stack layers with num_layers) followed by a dense head; {_ONNX}"
        )
    at = children.index(recurrent[0])
    for child in children[:at]:
        if not isinstance(child, _PASSTHROUGH):
            raise ConversionError(
                f"{type(source).__name__}: {type(child).__name__} comes before the recurrent layer; edgernn's model "
                f"starts with the recurrent layer; {_ONNX}"
            )
    return recurrent[0], _head(children[at + 1:], recurrent[0].hidden_size, verify)


def _flatten(module: nn.Module):
    """Children in registration order, with nn.Sequential containers opened."""
    for child in module.children():
        if isinstance(child, nn.Sequential):
            yield from _flatten(child)
        else:
            yield child


def _head(children, width: int, verify: bool) -> list:
    """Dense layers ``[name, W, b, activation]`` from the modules after the recurrent layer."""
    head: list = []
    for child in children:
        if isinstance(child, _PASSTHROUGH):
            continue
        if isinstance(child, nn.Linear):
            head.append([f"Linear({child.in_features}, {child.out_features})", _array(child.weight),
                         None if child.bias is None else _array(child.bias), "identity"])
            continue
        activation = _activation_of(child, verify)
        if head and head[-1][3] == "identity":
            head[-1][3] = activation
        elif not head:
            # An activation straight on h: an identity dense layer carries it (exact: 1*x + 0*rest == x).
            head.append(["identity", np.eye(width, dtype=np.float32), None, activation])
        else:
            raise ConversionError(
                f"{type(child).__name__} follows {head[-1][0]}'s {head[-1][3]}: edgernn applies one activation per "
                f"dense layer; {_ONNX}"
            )
    return head


def _activation_of(child: nn.Module, verify: bool) -> str:
    """The spec name of an activation module, refusing anything else by its type name."""
    for kind, name in _ACTIVATIONS:
        if isinstance(child, kind):
            if name == "softmax":
                _check_softmax_dim(child.dim, verify)
            return name
    raise ConversionError(
        f"{type(child).__name__} is not something edgernn models (it takes nn.Linear, ReLU, Tanh, Sigmoid, "
        f"Softmax, Identity and Dropout after the recurrent layer); {_ONNX}"
    )


def _check_softmax_dim(dim, verify: bool) -> None:
    """Softmax must run over features: -1 or 2 on a (T, 1, F) / (1, T, F) output, 1 on a last-step (1, F) one."""
    if dim in (-1, 2):
        return
    if dim == 1 and verify:
        return  # the feature dim only when forward keeps just the last step: verification tells
    raise ConversionError(
        f"Softmax(dim={dim}) may not run over the features of each step; use dim=-1"
        + (" (dim=1 is accepted only with verify=True, which checks it)" if dim == 1 else "")
    )


def _recurrent(rnn: nn.RNNBase):
    """The spec layers and weights of one PyTorch recurrent module (all its stacked layers)."""
    name = type(rnn).__name__
    if rnn.bidirectional:
        raise ConversionError(
            f"{name} is bidirectional: its backward direction needs the whole sequence, and edgernn streams one "
            f"sample at a time; {_ONNX} (or wait for sliding-window support)"
        )
    if getattr(rnn, "proj_size", 0):
        raise ConversionError(f"{name} has proj_size={rnn.proj_size}: LSTM projections are not supported yet")
    if rnn.mode not in _MODES:
        raise ConversionError(f"{name} has mode {rnn.mode!r}, which edgernn does not know")
    cell, activation = _MODES[rnn.mode]
    layers, weights, width = [], {}, rnn.input_size
    for k in range(rnn.num_layers):
        layers.append(RecurrentLayer(cell, width, rnn.hidden_size, bias=rnn.bias, activation=activation))
        weights[f"layers.{k}.W"] = _array(getattr(rnn, f"weight_ih_l{k}"))
        weights[f"layers.{k}.R"] = _array(getattr(rnn, f"weight_hh_l{k}"))
        if rnn.bias:
            weights[f"layers.{k}.Wb"] = _array(getattr(rnn, f"bias_ih_l{k}"))
            weights[f"layers.{k}.Rb"] = _array(getattr(rnn, f"bias_hh_l{k}"))
        width = rnn.hidden_size
    return layers, weights


# ---- verification -------------------------------------------------------------------------------


def _verify(source: nn.Module, model, rnn: nn.RNNBase, seed: int) -> None:
    """Run source and model on one random sequence; refuse the conversion when they disagree."""
    name = type(source).__name__
    xs = np.random.default_rng(seed).standard_normal((VERIFY_STEPS, model.input_size), dtype=np.float32)
    ref = _run_source(source, xs, rnn)
    got = model.run(xs, model.new_state())
    ref, got = _aligned(ref, got, name)
    err = float(np.max(np.abs(ref - got)))
    tolerance = VERIFY_TOLERANCE * max(1.0, float(np.max(np.abs(ref))))
    if not err <= tolerance:  # also catches NaN
        raise ConversionError(
            f"{name}'s output does not match the converted model (max abs err {err:.3g} > {tolerance:.3g} over "
            f"{VERIFY_STEPS} steps): its forward pass does something edgernn cannot see; {_ONNX}"
        )


def _run_source(source: nn.Module, xs: np.ndarray, rnn: nn.RNNBase) -> np.ndarray:
    """The source's output on xs, fed as one sequence of batch 1; the module's train/eval mode is restored.

    The input takes the recurrent layer's device, dtype and layout (``batch_first``).
    """
    batch_first, parameter = rnn.batch_first, rnn.weight_ih_l0
    x = torch.from_numpy(xs).to(device=parameter.device, dtype=parameter.dtype)
    x = x.unsqueeze(0) if batch_first else x.unsqueeze(1)
    training = source.training
    try:
        source.eval()
        with torch.no_grad():
            out = source(x)
    except Exception as exc:  # any failure of user code is a conversion failure, with its cause
        raise ConversionError(
            f"running {type(source).__name__} on a {tuple(x.shape)} input failed ({type(exc).__name__}: {exc}); "
            f"edgernn calls it with one sequence, as the recurrent layer's batch_first={batch_first} expects"
        ) from exc
    finally:
        source.train(training)
    while isinstance(out, tuple | list) and out:
        out = out[0]
    if not torch.is_tensor(out):
        raise ConversionError(f"{type(source).__name__} returned {type(out).__name__}, not a tensor; {_ONNX}")
    return out.detach().to("cpu", torch.float64).numpy()


def _aligned(ref: np.ndarray, got: np.ndarray, name: str):
    """Pair the source's output with the model's: every step, or only the last when the source returns one."""
    steps, width = got.shape
    if ref.shape in ((1, steps, width), (steps, 1, width), (steps, width)):
        return ref.reshape(steps, width), got
    if ref.shape in ((1, width), (width,)):
        return ref.reshape(1, width), got[-1:]
    raise ConversionError(
        f"{name} returned shape {ref.shape} for {steps} steps; edgernn expects ({steps}, 1, {width}), "
        f"(1, {steps}, {width}), ({steps}, {width}) or a last-step (1, {width}); {_ONNX}"
    )


# ---- checkpoints --------------------------------------------------------------------------------


def _from_file(path: Path, nonlinearity, head_activations, trust_pickle: bool, verify: bool, seed: int):
    """Load a checkpoint and convert what it holds: a pickled module, or a state dict."""
    loaded = _load(path, trust_pickle)
    if isinstance(loaded, Mapping):
        for key in _NESTED_KEYS:
            if isinstance(loaded.get(key), Mapping | nn.Module):
                loaded = loaded[key]
                break
    if isinstance(loaded, nn.Module):
        _refuse_flags(nonlinearity, head_activations, f"{path} (a pickled {type(loaded).__name__})")
        return _from_module(loaded, verify, seed)
    if not isinstance(loaded, Mapping) or not all(torch.is_tensor(value) for value in loaded.values()):
        keys = ", ".join(map(str, list(loaded)[:8])) if isinstance(loaded, Mapping) else type(loaded).__name__
        raise ConversionError(
            f"{path}: expected a state dict of tensors (bare or under {', '.join(map(repr, _NESTED_KEYS))}) or a "
            f"module, found {keys}"
        )
    log.info("%s: a state dict has no forward pass to verify against; trusting names, shapes and flags", path)
    return _from_state_dict(dict(loaded), path, nonlinearity, head_activations)


def _load(path: Path, trust_pickle: bool):
    """torch.load, turning every failure into a ConversionError that names the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except Exception as exc:  # torch reports unreadable files with many exception types
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if refused and not trust_pickle:
            raise ConversionError(
                f"{path}: holds pickled Python objects ({refused.group(1)}), not only tensors; unpickling can run "
                f"arbitrary code, so pass trust_pickle=True (edgernn convert --trust-pickle) only if you trust this file"
            ) from None
        raise ConversionError(
            f"{path}: not a PyTorch checkpoint torch can read ({type(exc).__name__}: {_first_line(exc)})"
        ) from None


def _from_state_dict(tensors: dict, path: Path, nonlinearity, head_activations):
    """Infer the architecture from a state dict's names and shapes; the flags supply the rest."""
    keys = list(tensors)
    recurrent = {key: match for key in keys if (match := _RECURRENT_KEY.match(key))}
    _refuse_recurrent_keys(recurrent, path)
    first = keys.index(next(iter(recurrent)))
    if first:
        raise ConversionError(
            f"{path}: {keys[0]!r} comes before the recurrent weights; edgernn's model starts with the recurrent "
            f"layer (a state dict cannot say where it runs: convert the module, which is verified, or {_ONNX})"
        )
    layers, weights = _state_dict_layers(tensors, recurrent, path, nonlinearity)
    rest = [key for key in keys[first:] if key not in recurrent]
    head = _state_dict_head(tensors, rest, layers[-1].hidden_size, path)
    for entry, activation in zip(head, _head_activations(head_activations, len(head), path)):
        entry[3] = activation
    return _assemble(layers[0].input_size, layers, head, weights, path.stem)


def _refuse_recurrent_keys(recurrent: dict, path: Path) -> None:
    """Refuse what a one-direction, projection-free recurrent module does not have."""
    if not recurrent:
        raise ConversionError(f"{path}: no recurrent weights (<prefix>weight_ih_l0, weight_hh_l0, ...) found")
    for key, match in recurrent.items():
        if match["reverse"]:
            raise ConversionError(
                f"{path}: {key!r} belongs to a bidirectional layer: its backward direction needs the whole sequence "
                f"and edgernn streams one sample at a time; {_ONNX} (or wait for sliding-window support)"
            )
        if match["kind"] == "weight_hr":
            raise ConversionError(f"{path}: {key!r} is an LSTM projection (proj_size > 0): not supported yet")
    prefixes = sorted({match["prefix"] for match in recurrent.values()})
    if len(prefixes) > 1:
        raise ConversionError(
            f"{path}: recurrent weights under several prefixes ({', '.join(map(repr, prefixes))}); edgernn converts "
            f"one recurrent module (stack layers with num_layers); {_ONNX}"
        )


def _state_dict_layers(tensors: dict, recurrent: dict, path: Path, nonlinearity):
    """Recurrent layers from ``weight_ih_l{k}`` ... keys: cell from gate rows per unit, sizes from shapes."""
    prefix = next(iter(recurrent.values()))["prefix"]
    count = 1 + max(int(match["layer"]) for match in recurrent.values())
    layers, weights, width, cell = [], {}, None, None
    for k in range(count):
        kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        W, R, Wb, Rb = (tensors.get(f"{prefix}{kind}_l{k}") for kind in kinds)
        if W is None or R is None or (Wb is None) != (Rb is None):
            raise ConversionError(f"{path}: layer {k} of {prefix or 'the recurrent module'} misses some of "
                                  f"weight_ih_l{k}, weight_hh_l{k}, bias_ih_l{k}, bias_hh_l{k}")
        cell, hidden = _layer_shapes(W, R, (Wb, Rb), width, cell, f"{path}: {prefix}*_l{k}")
        bias = Wb is not None
        activation = _rnn_activation(cell, nonlinearity)
        layers.append(RecurrentLayer(cell, W.shape[1], hidden, bias=bias, activation=activation))
        weights[f"layers.{k}.W"], weights[f"layers.{k}.R"] = _array(W), _array(R)
        if bias:
            weights[f"layers.{k}.Wb"], weights[f"layers.{k}.Rb"] = _array(Wb), _array(Rb)
        width = hidden
    if len({layer.bias for layer in layers}) > 1:
        raise ConversionError(f"{path}: some recurrent layers have biases and some not; one module has one bias flag")
    return layers, weights


def _layer_shapes(W, R, biases, width, cell, where: str):
    """(cell, hidden) of one layer, checking every shape against the others and the layer below."""
    if R.dim() != 2 or R.shape[1] == 0 or R.shape[0] % R.shape[1]:
        raise ConversionError(f"{where}: weight_hh has shape {tuple(R.shape)}, not (G*H, H)")
    rows, hidden = R.shape
    found = _CELL_OF_GATES.get(rows // hidden)
    if found is None:
        raise ConversionError(f"{where}: weight_hh has {rows // hidden} gate blocks; rnn has 1, gru 3, lstm 4")
    if cell is not None and found != cell:
        raise ConversionError(f"{where}: a {found} layer on top of {cell} layers; one module has one cell type")
    if W.dim() != 2 or W.shape[0] != rows or (width is not None and W.shape[1] != width):
        raise ConversionError(f"{where}: weight_ih has shape {tuple(W.shape)}, expected ({rows}, "
                              f"{width if width is not None else 'input_size'})")
    for b in biases:
        if b is not None and tuple(b.shape) != (rows,):
            raise ConversionError(f"{where}: biases must have shape ({rows},), got {tuple(b.shape)}")
    return found, hidden


def _state_dict_head(tensors: dict, keys: list, width: int, path: Path) -> list:
    """Linear layers ``[name, W, b, activation]`` from the keys after the recurrent ones, in order."""
    head, index = [], 0
    while index < len(keys):
        key = keys[index]
        W = tensors[key]
        if not key.endswith("weight") or W.dim() != 2:
            raise ConversionError(
                f"{path}: {key!r} {tuple(W.shape)} is not a Linear layer's weight; edgernn reads a recurrent module "
                f"followed by nn.Linear layers; {_ONNX}"
            )
        name = key[: -len("weight")]
        if W.shape[1] != width:
            raise ConversionError(f"{path}: {key!r} takes {W.shape[1]} inputs, but the layer before gives {width}")
        b = None
        if index + 1 < len(keys) and keys[index + 1] == f"{name}bias":
            b = tensors[keys[index + 1]]
            if tuple(b.shape) != (W.shape[0],):
                raise ConversionError(f"{path}: {name}bias has shape {tuple(b.shape)}, expected ({W.shape[0]},)")
            index += 1
        head.append([name.rstrip(".") or "weight", _array(W), None if b is None else _array(b), "identity"])
        width, index = W.shape[0], index + 1
    return head


def _rnn_activation(cell: str, nonlinearity) -> str:
    """The rnn cell nonlinearity flag: tanh by default, refused for cells that have none."""
    if cell != "rnn":
        if nonlinearity is not None:
            raise ConversionError(f"nonlinearity={nonlinearity!r} applies to rnn cells only; this is a {cell}")
        return "tanh"
    if nonlinearity is None:
        return "tanh"
    if nonlinearity not in RNN_ACTIVATIONS:
        raise ConversionError(f"nonlinearity must be one of {', '.join(RNN_ACTIVATIONS)}, got {nonlinearity!r}")
    return nonlinearity


def _head_activations(names, count: int, path: Path) -> list:
    """One activation name per dense layer; all identity by default."""
    if names is None:
        return ["identity"] * count
    names = list(names)
    if len(names) != count:
        raise ConversionError(f"{path}: head_activations has {len(names)} names, but the head has {count} dense layers")
    for name in names:
        if name not in DENSE_ACTIVATIONS:
            raise ConversionError(f"head_activations: {name!r} is not one of {', '.join(DENSE_ACTIVATIONS)}")
    return names


# ---- shared -------------------------------------------------------------------------------------


def _assemble(input_size: int, layers: list, head: list, weights: dict, name: str):
    """The spec and weight dict -> Model; the head entries are ``[name, W, b, activation]``."""
    dense = []
    for j, (_, W, b, activation) in enumerate(head):
        dense.append(DenseLayer(W.shape[1], W.shape[0], bias=b is not None, activation=activation))
        weights[f"head.{j}.W"] = W
        if b is not None:
            weights[f"head.{j}.b"] = b
    spec = ModelSpec(input_size=input_size, layers=tuple(layers), head=tuple(dense), name=name)
    return Model(spec, weights)


def _refuse_flags(nonlinearity, head_activations, what: str) -> None:
    """The flags fill gaps in a state dict; a module states its own nonlinearity and activations."""
    if nonlinearity is not None or head_activations is not None:
        raise ConversionError(
            f"nonlinearity and head_activations describe a state dict; {what} is a module and states its own"
        )


def _array(tensor) -> np.ndarray:
    """A float32 NumPy copy of a (possibly CUDA, half or bfloat16) tensor."""
    return tensor.detach().to("cpu", torch.float32).numpy().copy()


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"
