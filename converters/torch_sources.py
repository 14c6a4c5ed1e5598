"""Loading a PyTorch source: a module, a checkpoint file, a TorchScript file or ``package.module:factory``.

Every form ends as a `TorchSource`: either an eager module to read (with what to run to verify it) or a
bare state dict. Loading is kept apart from conversion so that ``edgernn verify`` can run the very same
source as its reference. Safety: ``torch.load`` runs with ``weights_only=True`` unless the caller trusts
the file (unpickling runs code from it); TorchScript is not pickle, and ``torch.jit.load`` reads it as
data plus TorchScript code that runs only inside the TorchScript interpreter.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgernn.errors import ConversionError

from . import torch_eager

log = logging.getLogger(__name__)

NESTED_KEYS = ("state_dict", "model_state_dict", "model")
"""Where training scripts commonly nest the state dict inside a checkpoint dict."""
FACTORY = re.compile(r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<factory>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)$")


@dataclass
class TorchSource:
    """What a PyTorch source holds: ``module`` to read and ``runner`` to run, or only ``tensors``."""

    name: str
    kind: str  # "module", "pickled module", "TorchScript", "factory" or "state dict"
    module: nn.Module | None = None
    runner: nn.Module | None = None
    tensors: dict | None = None
    layouts: tuple = (False,)
    """``batch_first`` values to try when running: the recurrent layer's own, or both when TorchScript hid it."""


def load(source, *, weights=None, trust_pickle: bool = False, nonlinearity=None) -> TorchSource:
    """Any PyTorch source -> `TorchSource`. ``weights`` (a state dict file) goes with a factory only."""
    if isinstance(source, torch.jit.ScriptModule):
        return _script_source(source, type(source).__name__, nonlinearity)
    if isinstance(source, nn.Module):
        return _module_source(source, type(source).__name__, "module")
    if not isinstance(source, str | os.PathLike):
        raise ConversionError(f"from_torch takes an nn.Module, a checkpoint path or 'package.module:factory', "
                              f"got {type(source).__name__}")
    text = os.fspath(source)
    match = FACTORY.match(text) if isinstance(text, str) else None
    if match and not Path(text).exists():
        return _factory_source(text, match, weights, trust_pickle)
    if weights is not None:
        raise ConversionError(f"weights= (--weights) goes with a 'package.module:factory' source, not with {text}")
    path = Path(text)
    if _is_torchscript(path):
        try:
            script = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001 -- torch reports a broken archive with many exception types
            raise ConversionError(f"{path}: not a TorchScript file torch can read ({_first_line(exc)})") from None
        return _script_source(script, str(path), nonlinearity)
    loaded = unnest(load_checkpoint(path, trust_pickle))
    if isinstance(loaded, nn.Module):
        return _module_source(loaded, f"{path} (a pickled {type(loaded).__name__})", "pickled module")
    if not isinstance(loaded, Mapping) or not all(torch.is_tensor(value) for value in loaded.values()):
        keys = ", ".join(map(str, list(loaded)[:8])) if isinstance(loaded, Mapping) else type(loaded).__name__
        raise ConversionError(
            f"{path}: expected a state dict of tensors (bare or under {', '.join(map(repr, NESTED_KEYS))}), a module "
            f"or a TorchScript file, found {keys}"
        )
    return TorchSource(str(path), "state dict", tensors=dict(loaded))


def load_checkpoint(path: Path, trust_pickle: bool):
    """torch.load, turning every failure into a ConversionError that names the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except Exception as exc:  # noqa: BLE001 -- torch reports unreadable files with many exception types
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if refused and not trust_pickle:
            raise ConversionError(
                f"{path}: holds pickled Python objects ({refused.group(1)}), not only tensors; unpickling can run "
                f"arbitrary code, so pass trust_pickle=True (edgernn convert --trust-pickle) only if you trust this "
                f"file"
            ) from None
        if trust_pickle and isinstance(exc, AttributeError | ImportError):
            raise ConversionError(
                f"{path}: unpickling it needs the code that defined its classes ({_first_line(exc)}); put that "
                f"module on PYTHONPATH, or save a state dict instead"
            ) from None
        raise ConversionError(
            f"{path}: not a PyTorch checkpoint torch can read ({type(exc).__name__}: {_first_line(exc)})"
        ) from None


def _module_source(module: nn.Module, name: str, kind: str) -> TorchSource:
    recurrent = next((m for m in module.modules() if isinstance(m, nn.RNNBase)), None)
    layouts = (bool(recurrent.batch_first),) if recurrent is not None else (False,)
    return TorchSource(name, kind, module=module, runner=module, layouts=layouts)


def _script_source(script, name: str, nonlinearity) -> TorchSource:
    """A TorchScript module: its eager twin is read, the script itself is run."""
    batch_first = torch_eager.batch_first_of(script)
    layouts = (False, True) if batch_first is None else (batch_first,)
    if batch_first is None:
        log.info("%s: traced module, batch_first unknown: verification tries (T, 1, I) then (1, T, I)", name)
    return TorchSource(name, "TorchScript", module=torch_eager.twin(script, nonlinearity), runner=script,
                       layouts=layouts)


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip holding compiled code (``<name>/code/``) beside its constants."""
    try:
        if not path.is_file() or not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name or name.endswith("/constants.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _factory_source(text: str, match, weights, trust_pickle: bool) -> TorchSource:
    """``package.module:factory``: import, call the factory for a module, load ``weights`` into it."""
    module_name, attribute = match["module"], match["factory"]
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would, so a factory beside the checkpoint imports
    try:
        factory = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConversionError(f"{text}: cannot import {module_name} ({exc}); is it on PYTHONPATH?") from None
    for part in attribute.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ConversionError(f"{text}: {module_name} has no {attribute}")
    try:
        module = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    except Exception as exc:  # noqa: BLE001 -- user code: any failure is a conversion failure
        raise ConversionError(f"{text}: calling {attribute}() failed ({type(exc).__name__}: {exc})") from exc
    if not isinstance(module, nn.Module):
        raise ConversionError(f"{text}: {attribute}() returned {type(module).__name__}, not an nn.Module")
    if weights is None:
        log.warning("%s: no weights given: converting the module as the factory built it", text)
    else:
        state = unnest(load_checkpoint(Path(weights), trust_pickle))
        if isinstance(state, nn.Module):
            state = state.state_dict()
        if not isinstance(state, Mapping):
            raise ConversionError(f"{weights}: expected a state dict, found {type(state).__name__}")
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split()[5:])[:300]  # past "Error(s) in loading state_dict for X:"
            raise ConversionError(f"{weights}: does not fit {text}'s module ({detail})") from None
    return _module_source(module, text, "factory")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def unnest(loaded):
    """A training checkpoint's model: the state dict or module under one of `NESTED_KEYS`, else ``loaded``."""
    if isinstance(loaded, Mapping):
        for key in NESTED_KEYS:
            if isinstance(loaded.get(key), Mapping | nn.Module):
                return loaded[key]
    return loaded
