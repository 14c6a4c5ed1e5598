"""The model description (edgernn/spec.py): validation by field path, JSON round trip, derived sizes."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from edgernn.errors import SpecError
import numpy as np

from edgernn.spec import SPEC_VERSION, Activation, DenseLayer, ModelSpec, RecurrentLayer


def refused(where: str, build, *words):
    """``build()`` raises a SpecError whose message starts with the field path ``where``."""
    with pytest.raises(SpecError) as caught:
        build()
    message = str(caught.value)
    assert message.startswith(f"{where}:"), message
    for word in words:
        assert word in message, message
    return message


def two_layer(**changes) -> dict:
    """Keyword arguments of a valid 3 -> lstm(5) -> gru(4) -> dense(2) spec, with ``changes`` applied."""
    options = dict(input_size=3,
                   layers=(RecurrentLayer("lstm", 3, 5), RecurrentLayer("gru", 5, 4)),
                   head=(DenseLayer(4, 2),))
    options.update(changes)
    return options


def test_a_valid_spec_is_accepted():
    spec = ModelSpec(**two_layer())
    assert spec.version == SPEC_VERSION and spec.name == "" and not spec.normalize
    assert isinstance(spec.layers, tuple) and isinstance(spec.head, tuple)


def test_lists_become_tuples_and_specs_are_hashable_values():
    a = ModelSpec(3, [RecurrentLayer("rnn", 3, 4)], [DenseLayer(4, 1)])
    b = ModelSpec(3, (RecurrentLayer("rnn", 3, 4),), (DenseLayer(4, 1),))
    assert a == b and hash(a) == hash(b)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.input_size = 5


# ---- validation: every invalid field is refused by its path -------------------------------------------
@pytest.mark.parametrize("bad", [0, -3, 2.0, "3", None, True, False])
def test_input_size_must_be_a_positive_integer(bad):
    refused("input_size", lambda: ModelSpec(**two_layer(input_size=bad)), "positive integer")


@pytest.mark.parametrize("field", ["input_size", "hidden_size"])
@pytest.mark.parametrize("bad", [0, -1, 4.0, True, None])
def test_recurrent_sizes_must_be_positive_integers(field, bad):
    layers = [RecurrentLayer("lstm", 3, 5), RecurrentLayer("gru", 5, 4)]
    layers[1] = dataclasses.replace(layers[1], **{field: bad})
    refused(f"layers[1].{field}", lambda: ModelSpec(**two_layer(layers=layers)), "positive integer", repr(bad))


@pytest.mark.parametrize("field", ["in_features", "out_features"])
@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4"])
def test_dense_sizes_must_be_positive_integers(field, bad):
    head = (DenseLayer(4, 3), DenseLayer(3, 2))
    head = (head[0], dataclasses.replace(head[1], **{field: bad}))
    refused(f"head[1].{field}", lambda: ModelSpec(**two_layer(head=head)), "positive integer")


@pytest.mark.parametrize("bad", ["LSTM", "peephole", "", None, 3])
def test_unknown_cell(bad):
    layers = (RecurrentLayer(bad, 3, 5),)
    refused("layers[0].cell", lambda: ModelSpec(3, layers), "rnn, leaky, mgu, gru, lstm")


@pytest.mark.parametrize("field", ["bias", "linear_before_reset"])
@pytest.mark.parametrize("bad", [1, 0, "true", None])
def test_recurrent_flags_must_be_bools(field, bad):
    layers = (RecurrentLayer("gru", 3, 5, **{field: bad}),)
    refused(f"layers[0].{field}", lambda: ModelSpec(3, layers), "true or false")


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_dense_bias_and_normalize_must_be_bools(bad):
    refused("head[0].bias", lambda: ModelSpec(**two_layer(head=(DenseLayer(4, 2, bias=bad),))), "true or false")
    refused("normalize", lambda: ModelSpec(**two_layer(normalize=bad)), "true or false")


@pytest.mark.parametrize("bad", ["softmax", "gelu", "Tanh", None, 3])
def test_recurrent_activations_must_be_known_elementwise_functions(bad):
    refused("layers[0].activations[0]", lambda: ModelSpec(3, (RecurrentLayer("rnn", 3, 5, activations=[bad]),)))


@pytest.mark.parametrize("cell, count", [("rnn", 2), ("gru", 1), ("gru", 4), ("lstm", 2), ("mgu", 3)])
def test_one_activation_per_slot(cell, count):
    refused("layers[0].activations", lambda: ModelSpec(3, (RecurrentLayer(cell, 3, 5, activations=["tanh"] * count),)),
            "takes")


def test_a_bidirectional_layer_takes_one_set_of_activations_per_direction():
    ModelSpec(3, (RecurrentLayer("gru", 3, 5, direction="bidirectional", activations=["sigmoid", "tanh"] * 2),))
    refused("layers[0].activations", lambda: ModelSpec(3, (RecurrentLayer("gru", 3, 5, activations=["tanh"] * 4),)))


@pytest.mark.parametrize("bad", [{"name": "leaky_relu", "alpha": "x"}, {"name": "elu", "beta": float("nan")}])
def test_activation_parameters_must_be_finite_numbers(bad):
    field = "alpha" if "alpha" in bad else "beta"
    refused(f"layers[0].activations[0].{field}", lambda: ModelSpec(3, (RecurrentLayer("rnn", 3, 5, activations=[bad]),)),
            "finite number")


@pytest.mark.parametrize("field, value, cell", [
    ("peepholes", True, "gru"), ("coupled_input_forget", True, "rnn"), ("proj_size", 2, "gru"),
    ("linear_before_reset", False, "lstm"),
])
def test_variant_options_belong_to_their_cell(field, value, cell):
    refused(f"layers[0].{field}", lambda: ModelSpec(3, (RecurrentLayer(cell, 3, 5, **{field: value}),)), "only")


@pytest.mark.parametrize("field, bad", [("clip", 0), ("clip", -1.0), ("clip", "1"), ("proj_size", -1),
                                        ("direction", "backward")])
def test_bad_clip_proj_size_and_direction(field, bad):
    refused(f"layers[0].{field}", lambda: ModelSpec(3, (RecurrentLayer("lstm", 3, 5, **{field: bad}),)))


@pytest.mark.parametrize("bad", ["gelu", "Softmax", "", None, 2])
def test_dense_activation(bad):
    head = (DenseLayer(4, 3), DenseLayer(3, 2, activation=bad))
    refused("head[1].activation", lambda: ModelSpec(**two_layer(head=head)), "identity, sigmoid, tanh")


def test_variant_sizes_and_tensors():
    layer = RecurrentLayer("lstm", 3, 8, direction="bidirectional", peepholes=True, coupled_input_forget=True,
                           proj_size=4)
    spec = ModelSpec(3, (layer, RecurrentLayer("mgu", 8, 5), RecurrentLayer("leaky", 5, 6)))
    assert layer.gates == 3 and layer.output_size == 8 and layer.state_size == 2 * (4 + 8)
    shapes = spec.tensor_shapes()
    assert shapes["layers.0.W"] == shapes["layers.0.reverse.W"] == (24, 3)
    assert shapes["layers.0.R"] == (24, 4) and shapes["layers.0.P"] == (16,) and shapes["layers.0.proj"] == (4, 8)
    assert shapes["layers.1.W"] == (10, 8) and shapes["layers.2.leak"] == (6,)
    assert spec.output_size == 6 and not spec.streamable
    assert ModelSpec(3, spec.layers[1:2] and (RecurrentLayer("mgu", 3, 5),)).streamable


def test_leak_rates_must_lie_in_0_1():
    from edgernn.spec import check_weights
    spec = ModelSpec(2, (RecurrentLayer("leaky", 2, 3),))
    weights = {name: np.full(shape, 0.5, np.float32) for name, shape in spec.tensor_shapes().items()}
    check_weights(spec, weights)
    weights["layers.0.leak"][1] = 0.0
    with pytest.raises(SpecError, match=re.escape("weights['layers.0.leak']: every leak rate")):
        check_weights(spec, weights)


def test_a_version_1_spec_is_upgraded():
    old = {"version": 1, "input_size": 2, "layers": [
        {"cell": "rnn", "input_size": 2, "hidden_size": 3, "bias": True, "activation": "relu",
         "linear_before_reset": True},
        {"cell": "gru", "input_size": 3, "hidden_size": 3, "bias": True, "activation": "tanh",
         "linear_before_reset": False}],
        "head": [{"in_features": 3, "out_features": 2, "bias": True, "activation": "softmax"}],
        "normalize": False, "name": "v1"}
    spec = ModelSpec.from_dict(old)
    assert spec.version == SPEC_VERSION and spec.layers[0].activations == (Activation("relu"),)
    assert spec.layers[1].activations == () and not spec.layers[1].linear_before_reset
    assert spec.head[0].activation == Activation("softmax")


def test_first_layer_must_take_the_model_input():
    refused("layers[0].input_size", lambda: ModelSpec(**two_layer(input_size=6)), "must equal input_size (6)", "got 3")


def test_layers_must_chain():
    layers = (RecurrentLayer("lstm", 3, 5), RecurrentLayer("gru", 6, 4))
    refused("layers[1].input_size", lambda: ModelSpec(**two_layer(layers=layers)),
            "must equal layers[0] output (5)", "got 6")


def test_head_must_chain():
    refused("head[0].in_features", lambda: ModelSpec(**two_layer(head=(DenseLayer(5, 2),))),
            "must equal layers[1] output (4)", "got 5")
    head = (DenseLayer(4, 3), DenseLayer(2, 1))
    refused("head[1].in_features", lambda: ModelSpec(**two_layer(head=head)),
            "must equal head[0].out_features (3)", "got 2")


def test_no_layers():
    refused("layers", lambda: ModelSpec(3, ()), "at least one recurrent layer")
    refused("layers", lambda: ModelSpec(3, []), "at least one recurrent layer")


def test_layers_of_the_wrong_type():
    refused("layers[1]", lambda: ModelSpec(**two_layer(layers=(RecurrentLayer("lstm", 3, 5), DenseLayer(5, 4)))),
            "must be a RecurrentLayer", "DenseLayer")
    refused("layers[0]", lambda: ModelSpec(3, ({"cell": "rnn", "input_size": 3, "hidden_size": 4},)),
            "must be a RecurrentLayer", "dict")
    refused("head[0]", lambda: ModelSpec(**two_layer(head=(RecurrentLayer("rnn", 4, 2),))),
            "must be a DenseLayer", "RecurrentLayer")


@pytest.mark.parametrize("bad", [0, 1, 3, "2", None])
def test_wrong_version(bad):
    """Version 1 is read (and upgraded) by from_dict/from_json only; a spec object is always the current one."""
    refused("version", lambda: ModelSpec(**two_layer(version=bad)), f"spec version {SPEC_VERSION}", repr(bad))


@pytest.mark.parametrize("bad", [True, 2.0, "2"])
def test_version_must_be_an_integer(bad):
    """True == 1 and 2.0 == 2 in Python: the version must still be refused unless it is the int 2."""
    refused("version", lambda: ModelSpec(**two_layer(version=bad)), repr(bad))


def test_name_must_be_a_string():
    refused("name", lambda: ModelSpec(**two_layer(name=3)), "must be a string")


def test_the_first_invalid_field_is_the_one_named():
    """Validation runs in order: the layer's own fields before the chaining check."""
    layers = (RecurrentLayer("lstm", 3, 5), RecurrentLayer("gru", 7, 0))
    refused("layers[1].hidden_size", lambda: ModelSpec(**two_layer(layers=layers)))


def test_layers_validate_on_their_own():
    with pytest.raises(SpecError, match=re.escape("here.cell")):
        RecurrentLayer("cnn", 3, 4).validate("here")
    with pytest.raises(SpecError, match=re.escape("there.out_features")):
        DenseLayer(3, 0).validate("there")
    RecurrentLayer("rnn", 3, 4, activations=("relu",)).validate("fine")
    DenseLayer(3, 2, activation="softmax").validate("fine")


# ---- JSON round trip ----------------------------------------------------------------------------------
ROUND_TRIP = {
    "rnn-tanh": ModelSpec(2, (RecurrentLayer("rnn", 2, 3),)),
    "rnn-relu-no-bias": ModelSpec(2, (RecurrentLayer("rnn", 2, 3, bias=False, activations=("relu",)),)),
    "variants": ModelSpec(3, (
        RecurrentLayer("lstm", 3, 6, direction="bidirectional", peepholes=True, coupled_input_forget=True,
                       proj_size=2, clip=3.0, activations=("hard_sigmoid", {"name": "leaky_relu", "alpha": 0.2},
                                                            "tanh", "sigmoid", "elu", "softsign")),
        RecurrentLayer("mgu", 4, 5, direction="reverse"), RecurrentLayer("leaky", 5, 5, bias=False)),
        (DenseLayer(5, 2, activation={"name": "hard_sigmoid", "alpha": 0.1, "beta": 0.6}),)),
    "gru-both-lbr": ModelSpec(4, (RecurrentLayer("gru", 4, 8, linear_before_reset=True),
                                  RecurrentLayer("gru", 8, 6, linear_before_reset=False)), name="grus"),
    "lstm-normalized-heads": ModelSpec(
        5, (RecurrentLayer("lstm", 5, 16), RecurrentLayer("lstm", 16, 7, bias=False)),
        tuple(DenseLayer(k, n, bias=b, activation=a) for k, n, b, a in [
            (7, 9, True, "identity"), (9, 9, False, "relu"), (9, 4, True, "tanh"), (4, 4, True, "sigmoid"),
            (4, 3, False, "softmax")]),
        normalize=True, name="ünïcode name ✓"),
    "mixed": ModelSpec(1, (RecurrentLayer("rnn", 1, 2), RecurrentLayer("gru", 2, 3),
                           RecurrentLayer("lstm", 3, 1)), (DenseLayer(1, 1),)),
}


@pytest.mark.parametrize("key", list(ROUND_TRIP))
def test_json_round_trip(key):
    spec = ROUND_TRIP[key]
    text = spec.to_json()
    again = ModelSpec.from_json(text)
    assert again == spec
    assert again.to_json() == text  # canonical: sorted keys, no whitespace
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert json.loads(text)["version"] == SPEC_VERSION


def test_json_uses_plain_types():
    data = json.loads(ROUND_TRIP["lstm-normalized-heads"].to_json())
    assert isinstance(data["layers"], list) and isinstance(data["head"], list)
    assert data["layers"][1] == {"cell": "lstm", "input_size": 16, "hidden_size": 7, "bias": False,
                                 "direction": "forward", "activations": [], "clip": None,
                                 "linear_before_reset": True, "peepholes": False, "coupled_input_forget": False,
                                 "proj_size": 0}
    assert data["head"][4] == {"in_features": 4, "out_features": 3, "bias": False, "activation": "softmax"}


def test_from_json_fills_defaults():
    spec = ModelSpec.from_json('{"input_size": 2, "layers": [{"cell": "gru", "input_size": 2, "hidden_size": 3}]}')
    assert spec == ModelSpec(2, (RecurrentLayer("gru", 2, 3),))
    assert spec.head == () and spec.layers[0].bias is True and spec.layers[0].linear_before_reset is True


def spec_dict(**changes) -> dict:
    data = json.loads(ROUND_TRIP["lstm-normalized-heads"].to_json())
    data.update(changes)
    return data


def test_from_json_refuses_unknown_fields():
    data = spec_dict()
    data["layers"][0]["peephole"] = True
    refused("layers[0].peephole", lambda: ModelSpec.from_json(json.dumps(data)), "unknown field", "hidden_size")
    data = spec_dict()
    data["head"][2]["dropout"] = 0.1
    refused("head[2].dropout", lambda: ModelSpec.from_json(json.dumps(data)), "unknown field")
    refused("spec.bidirectional", lambda: ModelSpec.from_json(json.dumps(spec_dict(bidirectional=True))),
            "unknown field")


@pytest.mark.parametrize("where, field", [("spec", "input_size"), ("spec", "layers"),
                                          ("layers[1]", "cell"), ("layers[0]", "hidden_size"),
                                          ("head[3]", "in_features"), ("head[0]", "out_features")])
def test_from_json_refuses_missing_required_fields(where, field):
    data = spec_dict()
    if where == "spec":
        del data[field]
    else:
        kind, index = where.rstrip("]").split("[")
        del data[kind][int(index)][field]
    refused(f"{where}.{field}", lambda: ModelSpec.from_json(json.dumps(data)), "missing required field")


@pytest.mark.parametrize("text", ["", "{", "not json", "{'input_size': 2}", b"\xff\xfe", None, 3])
def test_from_json_refuses_text_that_is_not_json(text):
    refused("spec", lambda: ModelSpec.from_json(text), "not valid JSON")


@pytest.mark.parametrize("text, where, words", [
    ("[]", "spec", ("must be an object", "list")),
    ("3", "spec", ("must be an object", "int")),
    ("null", "spec", ("must be an object",)),
    ('{"input_size": 2, "layers": {"cell": "rnn"}}', "layers", ("must be a list", "dict")),
    ('{"input_size": 2, "layers": "rnn"}', "layers", ("must be a list", "str")),
    ('{"input_size": 2, "layers": null}', "layers", ("must be a list",)),
    ('{"input_size": 2, "layers": [["rnn", 2, 3]]}', "layers[0]", ("must be an object", "list")),
    ('{"input_size": 2, "layers": [{"cell": "rnn", "input_size": 2, "hidden_size": 3}], "head": {}}',
     "head", ("must be a list",)),
    ('{"input_size": 2, "layers": [{"cell": "rnn", "input_size": 2, "hidden_size": 3}], "head": [3]}',
     "head[0]", ("must be an object", "int")),
])
def test_from_json_refuses_wrong_container_types(text, where, words):
    refused(where, lambda: ModelSpec.from_json(text), *words)


@pytest.mark.parametrize("change, where", [
    ({"input_size": "2"}, "input_size"),
    ({"input_size": 2.0}, "input_size"),
    ({"normalize": 1}, "normalize"),
    ({"version": 3}, "version"),
    ({"name": None}, "name"),
])
def test_from_json_validates_values(change, where):
    refused(where, lambda: ModelSpec.from_json(json.dumps(spec_dict(**change))))


def test_from_json_validates_nested_values():
    data = spec_dict()
    data["layers"][1]["hidden_size"] = True
    refused("layers[1].hidden_size", lambda: ModelSpec.from_json(json.dumps(data)), "positive integer")
    data = spec_dict()
    data["head"][1]["activation"] = "swish"
    refused("head[1].activation", lambda: ModelSpec.from_json(json.dumps(data)))
    data = spec_dict()
    data["layers"][0]["cell"] = "gru"
    data["layers"][0]["peepholes"] = True
    refused("layers[0].peepholes", lambda: ModelSpec.from_json(json.dumps(data)), "only an lstm")
    data = spec_dict()
    data["layers"][0]["activations"] = ["sigmoid", {"name": "tanh", "gain": 2}, "tanh"]
    refused("layers[0].activations[1].gain", lambda: ModelSpec.from_json(json.dumps(data)), "unknown field")


# ---- derived sizes ------------------------------------------------------------------------------------
KNOWN = ModelSpec(
    3,
    (RecurrentLayer("lstm", 3, 5), RecurrentLayer("gru", 5, 4, bias=False), RecurrentLayer("rnn", 4, 2)),
    (DenseLayer(2, 6), DenseLayer(6, 7, bias=False, activation="softmax")),
    normalize=True,
)


def test_tensor_shapes_of_a_known_spec():
    assert KNOWN.tensor_shapes() == {
        "input.mean": (3,), "input.std": (3,),
        "layers.0.W": (20, 3), "layers.0.R": (20, 5), "layers.0.Wb": (20,), "layers.0.Rb": (20,),
        "layers.1.W": (12, 5), "layers.1.R": (12, 4),
        "layers.2.W": (2, 4), "layers.2.R": (2, 2), "layers.2.Wb": (2,), "layers.2.Rb": (2,),
        "head.0.W": (6, 2), "head.0.b": (6,),
        "head.1.W": (7, 6),
    }


def test_sizes_of_a_known_spec():
    assert KNOWN.state_size == 2 * 5 + 4 + 2
    assert KNOWN.output_size == 7
    assert KNOWN.parameter_count() == (3 + 3) + (60 + 100 + 20 + 20) + (60 + 48) + (8 + 4 + 2 + 2) + (12 + 6) + 42
    assert [layer.gates for layer in KNOWN.layers] == [4, 3, 1]
    assert [layer.state_size for layer in KNOWN.layers] == [10, 4, 2]


def test_output_size_without_a_head():
    spec = ModelSpec(3, (RecurrentLayer("lstm", 3, 5), RecurrentLayer("gru", 5, 9)))
    assert spec.output_size == 9 and spec.state_size == 19
    assert "input.mean" not in spec.tensor_shapes()
    assert spec.parameter_count() == (60 + 100 + 40) + (27 * 5 + 27 * 9 + 54)


def test_labels_and_model_version_are_optional_fields_that_keep_old_fingerprints():
    import dataclasses

    from edgernn.format import model_fingerprint
    from edgernn.model import Model
    from edgernn.spec import version_key

    from helpers import random_model

    model = random_model("gru", hidden=8, head=(3,))
    labelled = dataclasses.replace(model.spec, labels=("a", "b", "c"), model_version="1.10")
    assert ModelSpec.from_json(labelled.to_json()) == labelled
    assert "labels" not in model.spec.to_dict() and "model_version" not in model.spec.to_dict()
    unset = dataclasses.replace(labelled, labels=(), model_version="")
    assert model_fingerprint(Model(unset, model.weights)) == model_fingerprint(model)
    for bad, problem in ((dict(labels=("a", "b")), "one per output"), (dict(labels=("a", "a", "b")), "distinct"),
                         (dict(model_version="v2"), "dotted numbers"), (dict(model_version="1..2"), "dotted numbers")):
        with pytest.raises(SpecError, match=problem):
            dataclasses.replace(model.spec, **bad)
    assert version_key("1.10") > version_key("1.9") > version_key("1") and version_key("x") is None
