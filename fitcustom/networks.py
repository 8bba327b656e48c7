"""What a network's structure says: does it output logits, which shape
does it take, which Embedding reads its label input.

Ground floor: may import only `_keras` (to read a graph's operations).
"""

import keras

from fitcustom._keras import compat as _compat

_PROBABILITY_ACTIVATIONS = ("softmax", "sigmoid")


def outputs_logits(network) -> bool:
    """Whether a network outputs logits rather than probabilities.

    Looks at the operation that produces the (first) output: a
    `softmax` / `sigmoid` activation, a `Softmax` layer or a
    `keras.ops.softmax` / `keras.ops.sigmoid` means probabilities;
    anything else (including `log_softmax`, whose outputs are valid
    logits) means logits. For a network that is not functional, the last
    of its layers is used; a subclassed model's `call()` cannot be read,
    so declare `from_logits=False` for one that ends in a softmax.

    Args:
        network: A `keras.Model` or layer.

    Returns:
        `True` for logits.
    """
    found = _makes_probabilities(_compat.output_operation(network))
    if found is None:
        layers = getattr(network, "layers", None) or [network]
        found = _makes_probabilities(layers[-1])
    return not found


def _makes_probabilities(operation):
    """Whether a layer or op ends in softmax/sigmoid (None: cannot tell)."""
    if operation is None:
        return None
    if isinstance(operation, keras.Model):
        return not outputs_logits(operation)
    if isinstance(operation, keras.layers.Softmax):
        return True
    activation = getattr(operation, "activation", None)
    if activation is not None:
        name = getattr(activation, "__name__", str(activation))
        return name in _PROBABILITY_ACTIVATIONS
    # A `keras.ops.softmax(...)` / `keras.ops.sigmoid(...)` in the graph.
    return type(operation).__name__.lower() in _PROBABILITY_ACTIVATIONS



def fits(shape, expected):
    """Whether two shapes agree, `None` matching any size."""
    shape, expected = tuple(shape), tuple(expected)
    return len(shape) == len(expected) and all(
        a is None or b is None or a == b for a, b in zip(shape, expected)
    )


def prod(shape):
    result = 1
    for d in shape:
        result *= 1 if d is None else d
    return result


def embedding_sizes(model):
    """`input_dim` of each Embedding that takes the model's label input
    (its second input) directly."""
    inputs = getattr(model, "inputs", None) or []
    if len(inputs) < 2:
        return []
    labels = inputs[1]
    sizes = []
    for operation in getattr(model, "operations", []):
        if not isinstance(operation, keras.layers.Embedding):
            continue
        for tensors in _compat.call_inputs(operation):
            if any(t is labels for t in tensors):
                sizes.append(int(operation.input_dim))
    return sizes


def input_shape(model):
    inputs = getattr(model, "inputs", None)
    if inputs:
        return tuple(inputs[0].shape)
    return None
