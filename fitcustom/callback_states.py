"""The state of the other callbacks of a `fit()` that a backup keeps, so
that they go on after a resume as in a run that never stopped: an
`EarlyStopping` that forgot its `wait` and `best` would stop later than
the uninterrupted run, or never. Used by `checkpoints.BackupAndRestore`,
which writes the states into its backup file (an h5py group) and sets
them again on resuming.

May import: Keras (the ground floor: nothing of fitcustom's).
"""

import keras

_CALLBACKS_GROUP = "callbacks"

#: What a callback needs to go on where it stopped, by class: attributes
#: saved in the backup and set again on resuming (an `EarlyStopping`
#: that forgot its `wait` and `best` would stop later than the
#: uninterrupted run, or never).
_CALLBACK_STATE = {
    keras.callbacks.EarlyStopping: (
        "wait",
        "stopped_epoch",
        "best",
        "best_epoch",
        "best_weights",
    ),
    keras.callbacks.ModelCheckpoint: (
        "best",
        "_batches_seen_since_last_saving",
        "_last_batch_seen",
    ),
    keras.callbacks.ReduceLROnPlateau: ("wait", "cooldown_counter", "best"),
}


def _state_names(callback):
    for cls, names in _CALLBACK_STATE.items():
        if isinstance(callback, cls):
            return names
    return ()


def _keys(callbacks):
    """`(key, callback, names)` of the callbacks whose state a backup
    keeps; the key is the class name and its occurrence in the list."""
    seen = {}
    for callback in callbacks:
        names = _state_names(callback)
        if names:
            cls = type(callback).__name__
            seen[cls] = seen.get(cls, -1) + 1
            yield f"{cls}_{seen[cls]}", callback, names


def write_states(f, callbacks):
    import numpy as np

    root = f.create_group(_CALLBACKS_GROUP)
    for key, callback, names in _keys(callbacks):
        group = root.create_group(key)
        for name in names:
            value = getattr(callback, name, None)
            if value is None:
                continue
            if name == "best_weights":
                weights = group.create_group(name)
                for i, array in enumerate(value):
                    weights[str(i)] = np.asarray(array)
            else:
                group.attrs[name] = np.asarray(value)


def read_states(f):
    """`{key: {name: value}}` from a backup (empty for one without)."""
    root = f.get(_CALLBACKS_GROUP)
    if root is None:
        return None
    states = {}
    for key, group in root.items():
        state = {n: v[()].item() for n, v in group.attrs.items()}
        if "best_weights" in group:
            weights = group["best_weights"]
            state["best_weights"] = [
                weights[str(i)][()] for i in range(len(weights))
            ]
        states[key] = state
    return (states,)


def set_states(callbacks, states):
    for key, callback, names in _keys(callbacks):
        state = states.get(key)
        if state is None:
            continue
        for name in names:
            if name in state:
                setattr(callback, name, state[name])
