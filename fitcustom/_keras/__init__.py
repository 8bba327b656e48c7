"""The only place that touches Keras internals: `compat` (private
attributes, each checked against the tested Keras versions) and
`step_functions` (the compiled functions that run a model's steps, as
Keras keeps its own in `keras/src/backend/tensorflow/trainer.py`).

May import: nothing else of fitcustom's (`compat.unpickle_model` imports
the package itself, to find its classes when a pickled model loads).
"""
