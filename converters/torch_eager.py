"""Eager PyTorch modules rebuilt from other forms, so one converter reads them all.

- `twin` of a TorchScript module: the same children (by their ``original_name``) as plain ``nn.LSTM``,
  ``nn.Linear``, ``nn.ReLU`` ... with the same weights. The converter reads the twin's structure; the
  TorchScript module itself is what verification runs, so the twin cannot hide a difference.
- `reference_module` of an edgernn spec built from a state dict: PyTorch's own kernels computing what
  the tensors and flags say, which ``edgernn verify`` uses when the reference has no forward pass.
"""

from __future__ import annotations

import torch
from torch import nn

from edgernn.errors import ConversionError
from edgernn.spec import REST_STATE

from .torch_state_dict import INITIAL_STATE_NAMES, initial_state_tensors, recurrent_keys, recurrent_layers

_RECURRENT = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}
_PLAIN = ("ReLU", "Tanh", "Sigmoid", "Identity", "Dropout")  # modules rebuilt with no arguments
_MODE_CELL = {"RNN": "rnn", "GRU": "gru", "LSTM": "lstm"}


def recurrent_module(layers, weights: dict, batch_first: bool = False) -> nn.RNNBase:
    """One ``nn.RNN``/``GRU``/``LSTM`` computing a PyTorch-expressible stack of spec layers."""
    first = layers[0]
    for index, layer in enumerate(layers):
        same = (layer.cell, layer.hidden_size, layer.bias, layer.direction, layer.proj_size, layer.activations) == (
            first.cell, first.hidden_size, first.bias, first.direction, first.proj_size, first.activations)
        odd = (layer.cell not in _RECURRENT or layer.direction == "reverse" or layer.peepholes or layer.clip is not None
               or layer.coupled_input_forget or not layer.linear_before_reset
               or any(a.name != "relu" for a in layer.activations))
        if odd or not same:
            raise ConversionError(f"layers[{index}]: not one PyTorch recurrent module's layer; edgernn cannot rebuild "
                                  f"it in PyTorch")
    options = {"nonlinearity": first.activations[0].name} if first.activations else {}
    if first.proj_size:
        options["proj_size"] = first.proj_size
    module = _RECURRENT[first.cell](first.input_size, first.hidden_size, num_layers=len(layers), bias=first.bias,
                                    batch_first=batch_first, bidirectional=first.direction == "bidirectional",
                                    **options)
    names = {"W": "weight_ih", "R": "weight_hh", "Wb": "bias_ih", "Rb": "bias_hh", "proj": "weight_hr"}
    state = {}
    for k, layer in enumerate(layers):
        for prefix, suffix in zip(layer.prefixes(k), ("", "_reverse")):
            for short, kind in names.items():
                if prefix + short in weights:
                    state[f"{kind}_l{k}{suffix}"] = torch.as_tensor(weights[prefix + short])
    module.load_state_dict(state)
    return module.eval()


class _Activation(nn.Module):
    """A spec activation (`edgernn.spec.Activation`) in torch ops, with ONNX's alpha and beta."""

    def __init__(self, activation):
        super().__init__()
        self.name, self.alpha, self.beta = activation.name, activation.alpha, activation.beta

    def forward(self, x):
        a, b = self.alpha, self.beta
        functions = {
            "identity": lambda: x, "sigmoid": lambda: torch.sigmoid(x), "tanh": lambda: torch.tanh(x),
            "relu": lambda: torch.relu(x), "affine": lambda: a * x + b,
            "leaky_relu": lambda: torch.where(x >= 0, x, a * x), "thresholded_relu": lambda: torch.where(x > a, x, 0.0),
            "scaled_tanh": lambda: a * torch.tanh(b * x), "hard_sigmoid": lambda: torch.clamp(a * x + b, 0.0, 1.0),
            "elu": lambda: torch.where(x >= 0, x, a * torch.expm1(x)), "softsign": lambda: x / (1 + x.abs()),
            "softplus": lambda: torch.nn.functional.softplus(x), "softmax": lambda: torch.softmax(x, dim=-1),
        }
        return functions[self.name]()


class Rebuilt(nn.Module):
    """Normalisation, one recurrent module, then Linear + activation layers; input (T, 1, I), seq first."""

    def __init__(self, spec, weights: dict):
        super().__init__()
        self.rnn = recurrent_module(spec.layers, weights)
        self.head = nn.Sequential()
        for j, dense in enumerate(spec.head):
            linear = nn.Linear(dense.in_features, dense.out_features, bias=dense.bias)
            linear.load_state_dict({"weight": torch.as_tensor(weights[f"head.{j}.W"]),
                                    **({"bias": torch.as_tensor(weights[f"head.{j}.b"])} if dense.bias else {})})
            self.head.append(linear)
            self.head.append(_Activation(dense.activation))
        self.normalize = spec.normalize
        if spec.normalize:
            self.register_buffer("mean", torch.as_tensor(weights["input.mean"]))
            self.register_buffer("std", torch.as_tensor(weights["input.std"]))
        self.hx = None  # a trained initial state (h0, or (h0, c0)) is the source's own start; zeros otherwise
        if spec.rest_state == "trained":
            h0, c0 = initial_state_tensors(spec.layers, weights[REST_STATE])
            self.hx = torch.as_tensor(h0) if c0 is None else (torch.as_tensor(h0), torch.as_tensor(c0))

    def forward(self, x):
        if self.normalize:
            x = (x - self.mean) / self.std
        return self.head(self.rnn(x, self.hx)[0])


def reference_module(spec, weights: dict) -> Rebuilt:
    """The model ``spec`` and ``weights`` describe, in PyTorch: a (T, 1, I) input gives (T, 1, O)."""
    return Rebuilt(spec, weights).eval()


# ---- TorchScript ----------------------------------------------------------------------------------


class _Opaque(nn.Module):
    """Stands in for a TorchScript child the converter does not model, under the child's own type name."""


def twin(script, nonlinearity=None) -> nn.Module:
    """An eager module whose children mirror ``script``'s (registration order kept) with the same weights.

    A child the converter does not model becomes an empty module of the same type name, so the
    converter refuses it by name. ``nonlinearity`` is an RNN's when the script does not keep it (traced).
    """
    mirror = type(_name(script), (nn.Module,), {})()
    for name, parameter in script.named_parameters(recurse=False):
        mirror.register_parameter(name, nn.Parameter(parameter.detach().clone()))
    for name, buffer in script.named_buffers(recurse=False):
        if name in INITIAL_STATE_NAMES:  # a trained initial state kept as a buffer (see `torch.from_torch`)
            mirror.register_buffer(name, buffer.detach().clone())
    for name, child in script.named_children():
        mirror.add_module(name, _twin_child(child, nonlinearity))
    return mirror


def batch_first_of(script):
    """The recurrent child's ``batch_first`` where TorchScript kept it (scripted, not traced), else None."""
    for child in script.modules():
        if _name(child) in _MODE_CELL:
            try:
                return bool(child.batch_first)
            except AttributeError:
                return None
    return None


def _twin_child(child, nonlinearity) -> nn.Module:
    kind = _name(child)
    if kind in _MODE_CELL:
        tensors = dict(child.state_dict())
        where = f"TorchScript {kind}"
        try:
            nonlinearity = child.nonlinearity  # scripted modules keep their attributes; traced ones do not
        except AttributeError:
            pass
        layers, weights = recurrent_layers(tensors, recurrent_keys(tensors, where), where,
                                           nonlinearity if kind == "RNN" else None)
        if layers[0].cell != _MODE_CELL[kind]:
            raise ConversionError(f"{where}: its tensors describe a {layers[0].cell}, not a {kind}")
        return recurrent_module(layers, weights, bool(batch_first_of(child)))
    if kind == "Linear":
        W = child.weight
        bias = getattr(child, "bias", None)
        linear = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None)
        linear.load_state_dict(child.state_dict())
        return linear
    if kind == "Sequential":
        return nn.Sequential(*(_twin_child(grandchild, nonlinearity) for grandchild in child.children()))
    if kind in _PLAIN:
        return getattr(nn, kind)()
    if kind == "Softmax":
        return nn.Softmax(dim=-1)  # TorchScript hides dim; verification runs the script and catches another
    return twin(child, nonlinearity) if list(child.children()) else type(kind, (_Opaque,), {})()


def _name(script) -> str:
    return getattr(script, "original_name", type(script).__name__)
