"""What one running step has collected (a context per traced step, one
stack per replica thread): the values its updates minimised, for its
`loss` log, and the loss terms of its forward pass on their way to their
metrics. Kept per replica thread, never on the model: replicas trace
their steps in threads that take turns at every all-reduce, so a value
left on the model by one replica would be read by another.

May import: nothing of fitcustom.
"""

import threading

import tensorflow as tf

_CONTEXTS = threading.local()  # one stack per replica thread


class StepContext:
    """What one (traced) step minimised, for its `loss` log: the values
    of each term (per replica, divided by the replica count) over the
    step's updates, and the guard's verdicts. A term minimised by several
    updates of one step counts once in the loss, with its mean over them
    (a discriminator updated twice per step, one loss updating two
    networks). `terms`: the reduced loss terms of the step's forward pass
    (`forward_and_loss`), until `track_loss` logs them."""

    def __init__(self, data):
        self._data = data
        self._batch_size = None
        self.parts = {}
        self.verdicts = []
        self.logged = set()
        self.used = False
        self.terms = {}
        self.minimizing = False  # in `minimize`, which records its terms

    @property
    def batch_size(self):
        """The replica's batch size (read from the data when needed)."""
        if self._batch_size is None:
            self._batch_size = tf.shape(first_tensor(self._data))[0]
        return self._batch_size

    def add(self, key, value):
        self.parts.setdefault(key, []).append(value)

    def loss(self):
        """The sum over terms of each term's mean over the updates."""
        means = [tf.add_n(v) / float(len(v)) for v in self.parts.values()]
        return tf.add_n(means) if means else None


def stack():
    """This thread's stack of running steps."""
    return _CONTEXTS.__dict__.setdefault("stack", [])


def current():
    """The innermost running step of this thread, or `None` (outside
    `fit()` / `evaluate()`)."""
    found = getattr(_CONTEXTS, "stack", None)
    return found[-1] if found else None


def scratch():
    """The running step, or (for a piece called outside `fit()`) one
    per thread that stands in for it."""
    found = current()
    if found is None:
        found = _CONTEXTS.__dict__.get("outside")
        if found is None:
            found = _CONTEXTS.outside = StepContext(None)
    return found


def first_tensor(data):
    """The first tensor of a (nested) batch."""
    for t in tf.nest.flatten(data):
        if t is not None:
            return t
    raise ValueError(
        "The batch has no tensor. Received: a batch with only None "
        "entries. Expected at least one array or tensor."
    )
