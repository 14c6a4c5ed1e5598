"""PyTorch -> edgernn: an ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (optionally with a dense head), in any form.

PyTorch's weight layout is edgernn's canonical one (see `edgernn.spec`), so conversion renames tensors
and never permutes gates (``{p}`` is ``layers.{k}.``, or ``layers.{k}.reverse.`` for ``_reverse`` tensors):

========================  ===============  ==========================================
PyTorch                   edgernn          note
========================  ===============  ==========================================
``weight_ih_l{k}``        ``{p}W``          (G*H, I) gate blocks i,f,g,o / r,z,n
``weight_hh_l{k}``        ``{p}R``          (G*H, H), or (G*H, proj_size) with a projection
``bias_ih_l{k}``          ``{p}Wb``         (G*H,)
``bias_hh_l{k}``          ``{p}Rb``         (G*H,)
``weight_hr_l{k}``        ``{p}proj``       (proj_size, H), LSTM(proj_size=...)
Linear ``weight``         ``head.{j}.W``    (out, in)
Linear ``bias``           ``head.{j}.b``    (out,)
``h0`` / ``c0``           ``rest_state``    trained initial state (`INITIAL_STATE_NAMES`)
========================  ===============  ==========================================

A module's ``forward`` is Python the converter cannot read: it assumes the children run in registration
order, at every time step. ``verify=True`` runs the source and the converted model on the same random
sequence (whole-sequence `Model.run`, which reverse and bidirectional layers need) and refuses the
conversion when they disagree, which is what catches a residual, a sum, or a different order. Loading
the source (files, TorchScript, factories) is `torch_sources`; reading tensor names is `torch_state_dict`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgernn.errors import ConversionError
from edgernn.model import Model
from edgernn.spec import ACTIVATION_DEFAULTS, REST_STATE, DenseLayer, ModelSpec

from . import torch_eager, torch_sources
from .torch_state_dict import ONNX_HINT as _ONNX
from .torch_state_dict import array as _array
from .torch_state_dict import INITIAL_STATE_NAMES, initial_state_row, linear_head, recurrent_keys, recurrent_layers

log = logging.getLogger(__name__)

VERIFY_STEPS = 64
VERIFY_TOLERANCE = 1e-4
"""Max abs error allowed by verification, scaled up by the reference's magnitude when that exceeds 1."""

_MODES = {"RNN_TANH": "tanh", "RNN_RELU": "relu", "GRU": None, "LSTM": None}
_ACTIVATIONS = ((nn.ReLU, "relu"), (nn.Tanh, "tanh"), (nn.Sigmoid, "sigmoid"), (nn.Softmax, "softmax"))
_PASSTHROUGH = (nn.Identity, nn.Dropout)  # identity in eval mode


class _Mismatch(ConversionError):
    """The source ran but computed something else than the converted model."""


def from_torch(source, *, nonlinearity=None, head_activations=None, trust_pickle=False, weights=None, verify=True,
               seed=0, initial_state=None, sample_rate=None):
    """A PyTorch recurrent model -> `edgernn.model.Model` computing the same outputs.

    ``source`` is one of:

    - an ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (any ``num_layers``, ``bidirectional``, ``proj_size``): the
      model outputs the last layer's h (both directions concatenated, forward first) at every step;
    - an ``nn.Module`` whose children (in registration order, ``nn.Sequential`` flattened) are one such
      layer, then ``nn.Linear`` layers and ``nn.ReLU`` / ``Tanh`` / ``Sigmoid`` / ``Softmax(dim=-1)``
      activations (``nn.Identity`` and ``nn.Dropout`` are skipped), applied at every step;
    - a TorchScript module or file (``torch.jit.save``; scripted or traced): its children are read by type
      name as above, and the script itself is run to verify;
    - ``"package.module:factory"``: the factory is imported and called to build the module, and
      ``weights`` (a state dict file) is loaded into it;
    - a path to a checkpoint, read with ``torch.load(weights_only=not trust_pickle)``. A pickled module
      (only with ``trust_pickle=True``: unpickling runs code from the file) is converted as above. A state
      dict, bare or nested under ``"state_dict"``, ``"model_state_dict"`` or ``"model"``, gives the
      architecture by tensor names and shapes: ``<prefix>weight_ih_l{k}`` ... for the recurrent layer, then
      ``<name>.weight`` / ``<name>.bias`` Linear layers in the dict's order. What shapes cannot tell comes
      from ``nonlinearity`` (rnn cells: ``"tanh"``, the default, or ``"relu"``) and ``head_activations``
      (one name per dense layer; default all ``"identity"``). **A state dict has no forward pass, so it
      cannot be verified**: wrong flags give a model that loads and runs but computes something else.

    ``verify`` (modules) runs the source (eval mode, no grad) and the converted model on the same seeded
    normal sequence of `VERIFY_STEPS` steps and raises `ConversionError` when they differ by more than
    `VERIFY_TOLERANCE`: the forward pass did something the converter cannot see. A TorchScript module
    whose forward does not take one (T, 1, I) or (1, T, I) tensor is converted unverified, with a warning.

    A trained initial state becomes the model's rest state (`Model.new_state`): ``initial_state`` (``h0``,
    or ``(h0, c0)`` for an LSTM, shaped as PyTorch's recurrent modules take them), else a parameter or buffer
    ``h0`` / ``c0`` of the module around the recurrent layer, or state dict entries ``h0`` / ``c0``
    (`INITIAL_STATE_NAMES`). Verification then runs the model from that state, so a forward pass that does
    not start from it is caught. ``sample_rate`` (Hz) is stored in the spec.
    """
    loaded = torch_sources.load(source, weights=weights, trust_pickle=trust_pickle, nonlinearity=nonlinearity)
    return convert(loaded, nonlinearity=nonlinearity, head_activations=head_activations, verify=verify, seed=seed,
                   extras=_Extras(initial_state, sample_rate))[0]


@dataclasses.dataclass(frozen=True)
class _Extras:
    """What the caller adds to the source: a trained initial state, the sample rate."""

    initial_state: object = None
    sample_rate: float | None = None


def convert(loaded, *, nonlinearity=None, head_activations=None, verify=True, seed=0, extras=_Extras()):
    """A loaded `torch_sources.TorchSource` -> (Model, the ``batch_first`` that verified, or None)."""
    if loaded.tensors is not None:
        log.info("%s: a state dict has no forward pass to verify against; trusting names, shapes and flags",
                 loaded.name)
        return _from_state_dict(loaded.tensors, loaded.name, nonlinearity, head_activations, extras), None
    if loaded.kind != "TorchScript" or head_activations is not None:
        _refuse_flags(nonlinearity, head_activations, loaded.name)
    try:
        return _from_module(loaded, verify, seed, extras)
    except _Mismatch:
        # A traced RNN keeps no nonlinearity: the twin assumed tanh; relu is the only other one PyTorch has.
        if loaded.kind != "TorchScript" or nonlinearity is not None or not _is_rnn(loaded.module):
            raise
        retry = dataclasses.replace(loaded, module=torch_eager.twin(loaded.runner, "relu"))
        return _from_module(retry, verify, seed, extras)


def torch_reference(source, *, weights=None, trust_pickle=False, nonlinearity=None, head_activations=None, seed=0):
    """(run, description): ``run(xs (T, I))`` runs the PyTorch source itself on one sequence, float64 out.

    A state dict has no forward pass: it runs as PyTorch modules rebuilt from its tensors and the flags.
    ``run`` returns (T, O), or (1, O) when the source's forward keeps only the last step.
    """
    loaded = torch_sources.load(source, weights=weights, trust_pickle=trust_pickle, nonlinearity=nonlinearity)
    if loaded.tensors is not None:
        model, _ = convert(loaded, nonlinearity=nonlinearity, head_activations=head_activations)
        runner = torch_eager.reference_module(model.spec, model.weights)
        return (lambda xs: run_source(runner, xs, False, loaded.name)), \
            f"{loaded.name} (a state dict, run as PyTorch modules rebuilt from its tensors and flags)"
    if len(loaded.layouts) == 1:
        if loaded.kind != "TorchScript" or head_activations is not None:
            _refuse_flags(nonlinearity, head_activations, loaded.name)
        batch_first = loaded.layouts[0]
    else:  # a traced module hides batch_first: the layout under which it matches its own conversion
        _, batch_first = convert(loaded, nonlinearity=nonlinearity, head_activations=head_activations, seed=seed)
        if batch_first is None:
            raise ConversionError(f"{loaded.name}: cannot run it as a reference: its forward takes no (T, 1, I) "
                                  f"or (1, T, I) tensor")
    return (lambda xs: run_source(loaded.runner, xs, batch_first, loaded.name)), f"{loaded.name} ({loaded.kind})"


# ---- modules ------------------------------------------------------------------------------------


def _from_module(loaded, verify: bool, seed: int, extras: _Extras):
    """Convert a recurrent module or a wrapper of one, then (optionally) check it against the source."""
    source = loaded.module
    if isinstance(source, nn.RNNBase):
        rnn, rest, found = source, [], {}
    else:
        rnn, rest = _read_wrapper(source)
        found = {name: tensor for name, tensor in [*source.named_parameters(recurse=False),
                                                   *source.named_buffers(recurse=False)]
                 if name in INITIAL_STATE_NAMES}
    layers, weights = _recurrent(rnn)
    head = _head(rest, layers[-1].output_size, verify)
    start = _start(layers, extras, found, type(source).__name__, "module")
    model = _assemble(layers[0].input_size, layers, head, weights, type(source).__name__, start, extras.sample_rate)
    return model, (_verify(loaded, model, seed) if verify else None)


def _start(layers, extras: _Extras, found: dict, where: str, holder: str):
    """(state row, note) of the trained initial state: the caller's ``initial_state``, else the h0/c0
    ``found`` in the source; None when there is neither."""
    if extras.initial_state is not None:
        given = extras.initial_state
        h0, c0 = tuple(given) if isinstance(given, tuple | list) else (given, None)
        note = "initial_state argument"
    elif found:
        h0, c0 = found.get("h0"), found.get("c0")
        note = f"{'/'.join(name for name in INITIAL_STATE_NAMES if name in found)} of the {holder}"
    else:
        return None
    return initial_state_row(layers, h0, c0, where), note


def _read_wrapper(source: nn.Module):
    """The recurrent layer of a wrapper module and the children after it, in registration order."""
    own = [name for name, _ in source.named_parameters(recurse=False) if name not in INITIAL_STATE_NAMES]
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
    return recurrent[0], children[at + 1:]


def _flatten(module: nn.Module):
    """Children in registration order, with nn.Sequential containers opened."""
    for child in module.children():
        if isinstance(child, nn.Sequential):
            yield from _flatten(child)
        else:
            yield child


def _is_rnn(module: nn.Module) -> bool:
    return any(isinstance(m, nn.RNN) for m in module.modules())


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
    """The spec layers and weights of one PyTorch recurrent module (all its stacked layers and directions)."""
    name = type(rnn).__name__
    if rnn.mode not in _MODES:
        raise ConversionError(f"{name} has mode {rnn.mode!r}, which edgernn does not know")
    tensors = dict(rnn.state_dict())
    return recurrent_layers(tensors, recurrent_keys(tensors, name), name, _MODES[rnn.mode])


# ---- verification -------------------------------------------------------------------------------


def _verify(loaded, model, seed: int):
    """Run source and model on one random sequence under each candidate layout; the ``batch_first`` that
    matched, None for a TorchScript forward that takes no such input, else ConversionError."""
    name = type(loaded.module).__name__
    xs = np.random.default_rng(seed).standard_normal((VERIFY_STEPS, model.input_size), dtype=np.float32)
    got = model.run(xs, model.new_state())
    mismatch = failure = None
    for batch_first in loaded.layouts:
        try:
            ref, ours = _aligned(run_source(loaded.runner, xs, batch_first, name), got, name)
        except ConversionError as exc:
            failure = failure or exc
            continue
        err = float(np.max(np.abs(ref - ours)))
        tolerance = VERIFY_TOLERANCE * max(1.0, float(np.max(np.abs(ref))))
        if err <= tolerance:  # also refuses NaN
            return batch_first
        start = (f" (edgernn starts from the trained initial state, {model.spec.rest_state_note}: does the forward "
                 f"pass hand it to the recurrent layer?)") if model.spec.rest_state == "trained" else ""
        mismatch = mismatch or _Mismatch(
            f"{name}'s output does not match the converted model (max abs err {err:.3g} > {tolerance:.3g} over "
            f"{VERIFY_STEPS} steps): its forward pass does something edgernn cannot see{start}; {_ONNX}"
        )
    if mismatch is None and loaded.kind == "TorchScript":
        log.warning("%s: converted WITHOUT verification: %s", loaded.name, failure)
        return None
    raise mismatch or failure


def run_source(source: nn.Module, xs: np.ndarray, batch_first: bool, name: str) -> np.ndarray:
    """The source's output on xs (T, I), fed as one sequence of batch 1 laid out as ``batch_first`` says;
    float64, batch dimension dropped when present. The module's train/eval mode is restored."""
    parameter = next(source.parameters(), None)
    x = torch.from_numpy(np.ascontiguousarray(xs, np.float32))
    if parameter is not None:
        x = x.to(device=parameter.device, dtype=parameter.dtype)
    x = x.unsqueeze(0) if batch_first else x.unsqueeze(1)
    training = source.training
    try:
        source.eval()
        with torch.no_grad():
            out = source(x)
    except Exception as exc:  # noqa: BLE001 -- any failure of user code is a conversion failure, with its cause
        raise ConversionError(
            f"running {name} on a {tuple(x.shape)} input failed ({type(exc).__name__}: {_first_line(exc)}); "
            f"edgernn calls it with one sequence, as the recurrent layer's batch_first={batch_first} expects"
        ) from exc
    finally:
        source.train(training)
    while isinstance(out, tuple | list) and out:
        out = out[0]
    if not torch.is_tensor(out):
        raise ConversionError(f"{name} returned {type(out).__name__}, not a tensor; {_ONNX}")
    out = out.detach().to("cpu", torch.float64).numpy()
    steps = len(xs)
    if out.ndim == 3 and out.shape[:2] in ((1, steps), (steps, 1)):
        return out.reshape(steps, -1)
    return out


def _aligned(ref: np.ndarray, got: np.ndarray, name: str):
    """Pair the source's output with the model's: every step, or only the last when the source returns one."""
    steps, width = got.shape
    if ref.shape == (steps, width):
        return ref, got
    if ref.shape in ((1, width), (width,)):
        return ref.reshape(1, width), got[-1:]
    raise ConversionError(
        f"{name} returned shape {ref.shape} for {steps} steps; edgernn expects ({steps}, 1, {width}), "
        f"(1, {steps}, {width}), ({steps}, {width}) or a last-step (1, {width}); {_ONNX}"
    )


# ---- state dicts ----------------------------------------------------------------------------------


def _from_state_dict(tensors: dict, where: str, nonlinearity, head_activations, extras: _Extras):
    """Infer the architecture from a state dict's names and shapes; the flags supply the rest."""
    found, named = {}, {}
    for key in tensors:
        short = key.rsplit(".", 1)[-1]
        if short in INITIAL_STATE_NAMES:
            if short in found:
                raise ConversionError(f"{where}: several {short} entries ({named[short]!r}, {key!r}); edgernn reads "
                                      f"one trained initial state")
            found[short], named[short] = tensors[key], key
    tensors = {key: value for key, value in tensors.items() if key not in named.values()}
    keys = list(tensors)
    recurrent = recurrent_keys(tensors, where)
    first = keys.index(next(iter(recurrent)))
    if first:
        raise ConversionError(
            f"{where}: {keys[0]!r} comes before the recurrent weights; edgernn's model starts with the recurrent "
            f"layer (a state dict cannot say where it runs: convert the module, which is verified, or {_ONNX})"
        )
    layers, weights = recurrent_layers(tensors, recurrent, where, nonlinearity)
    rest = [key for key in keys[first:] if key not in recurrent]
    head = linear_head(tensors, rest, layers[-1].output_size, where)
    for entry, activation in zip(head, _head_activations(head_activations, len(head), where)):
        entry[3] = activation
    start = _start(layers, extras, found, where, "state dict")
    return _assemble(layers[0].input_size, layers, head, weights, Path(where).stem, start, extras.sample_rate)


def _head_activations(names, count: int, where: str) -> list:
    """One activation name per dense layer; all identity by default."""
    if names is None:
        return ["identity"] * count
    names = list(names)
    if len(names) != count:
        raise ConversionError(f"{where}: head_activations has {len(names)} names, but the head has {count} dense "
                              f"layers")
    for name in names:
        if name not in ACTIVATION_DEFAULTS:
            raise ConversionError(f"head_activations: {name!r} is not one of {', '.join(ACTIVATION_DEFAULTS)}")
    return names


# ---- shared -------------------------------------------------------------------------------------


def _assemble(input_size: int, layers: list, head: list, weights: dict, name: str, start=None, sample_rate=None):
    """The spec and weight dict -> Model; the head entries are ``[name, W, b, activation]``; ``start`` is
    (state row, note) of a trained initial state, or None."""
    dense = []
    for j, (_, W, b, activation) in enumerate(head):
        dense.append(DenseLayer(W.shape[1], W.shape[0], bias=b is not None, activation=activation))
        weights[f"head.{j}.W"] = W
        if b is not None:
            weights[f"head.{j}.b"] = b
    rest = {}
    if start is not None:
        weights[REST_STATE], note = start
        rest = dict(rest_state="trained", rest_state_note=note)
    spec = ModelSpec(input_size=input_size, layers=tuple(layers), head=tuple(dense), name=name,
                     sample_rate=sample_rate, **rest)
    return Model(spec, weights)


def _refuse_flags(nonlinearity, head_activations, what: str) -> None:
    """The flags fill gaps in a state dict; a module states its own nonlinearity and activations."""
    if nonlinearity is not None or head_activations is not None:
        raise ConversionError(
            f"nonlinearity and head_activations describe a state dict; {what} is a module and states its own"
        )


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"
