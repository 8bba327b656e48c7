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


#: Layers that move values without changing them: a label passed
#: through them still holds class ids.
_RESHAPING = (
    keras.layers.Reshape,
    keras.layers.Flatten,
    keras.layers.Permute,
    keras.layers.RepeatVector,
    keras.layers.Identity,
)


def embedding_sizes(model):
    """`input_dim` of each Embedding that reads the model's label input
    (its second input), directly or through layers that only reshape it
    (`Reshape`, `Flatten`, `Permute`, `RepeatVector`, `Identity`)."""
    inputs = getattr(model, "inputs", None) or []
    if len(inputs) < 2:
        return []
    carrying = {id(inputs[1])}  # tensors holding the labels' values
    sizes = []
    # `operations` are in the graph's order: a layer after its inputs.
    for operation in getattr(model, "operations", []):
        embedding = isinstance(operation, keras.layers.Embedding)
        if not (embedding or isinstance(operation, _RESHAPING)):
            continue
        for tensors, outputs in _compat.call_links(operation):
            if not any(id(t) in carrying for t in tensors):
                continue
            if embedding:
                sizes.append(int(operation.input_dim))
            else:
                carrying.update(id(t) for t in outputs)
    return sizes


def final_activation(network) -> str:
    """The name of the activation that makes a functional network's
    output, looking through layers that only reshape (`Reshape`,
    `Flatten`, ...): `"tanh"` for `Dense(64, activation="tanh")` followed
    by `Reshape((8, 8, 1))`; `""` when it cannot tell."""
    operation = _compat.output_operation(network)
    for _ in range(100):  # a chain of reshapes, never a cycle
        if not isinstance(operation, _RESHAPING):
            break
        links = _compat.call_links(operation)
        if len(links) != 1 or len(links[0][0]) != 1:
            return ""
        operation = _compat.producer(links[0][0][0])
    activation = getattr(operation, "activation", None)
    return getattr(activation, "__name__", "") or ""


def input_shape(model):
    inputs = getattr(model, "inputs", None)
    if inputs:
        return tuple(inputs[0].shape)
    return None
