"""Small helpers for code that runs inside a `tf.distribute` replica.

They follow the conventions of Keras' built-in `fit()`: a per-replica loss is
the mean over the replica's batch divided by the number of replicas, so that
the optimizer's SUM all-reduce of the gradients yields the gradient of the
global mean.

May import: nothing of fitcustom's (the ground floor).
"""

import weakref

import keras
import numpy as np
import tensorflow as tf


def num_replicas():
    """Number of replicas in sync in the current strategy (1 without one)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def scale_loss_for_replicas(loss):
    """Divides a per-replica mean loss by the number of replicas.

    This is what Keras' `compute_loss` does to the compiled loss, and what a
    hand-written loss (a GAN's) must do so that the summed gradients equal
    the gradient of the global mean.

    Args:
        loss: A scalar tensor, the mean over this replica's batch.

    Returns:
        The loss divided by `num_replicas()`, unchanged on one replica.
    """
    n = num_replicas()
    if n > 1:
        loss = loss * tf.cast(1.0 / n, loss.dtype)
    return loss


def unscale_loss_for_replicas(loss):
    """Inverse of `scale_loss_for_replicas`: the value to log."""
    n = num_replicas()
    if n > 1:
        loss = loss * tf.cast(n, loss.dtype)
    return loss


def mean_loss(per_example, sample_weight=None):
    """Reduces per-example losses as Keras' compiled losses do.

    The weighted sum over this replica's batch divided by its batch size
    ("sum_over_batch_size"), then divided by the number of replicas.

    Args:
        per_example: Tensor of shape `(batch, ...)`. Extra axes are averaged.
        sample_weight: Optional tensor of shape `(batch,)`.

    Returns:
        A scalar tensor ready for `tape.gradient`.
    """
    per_example = tf.convert_to_tensor(per_example)
    if per_example.shape.rank and per_example.shape.rank > 1:
        per_example = tf.reduce_mean(
            per_example, axis=list(range(1, per_example.shape.rank))
        )
    if sample_weight is not None:
        per_example = per_example * tf.cast(sample_weight, per_example.dtype)
    count = tf.cast(tf.size(per_example), per_example.dtype)
    loss = tf.math.divide_no_nan(tf.reduce_sum(per_example), count)
    return scale_loss_for_replicas(loss)


def _dense(g):
    if isinstance(g, tf.IndexedSlices):
        return tf.convert_to_tensor(g)
    return g


def all_reduce_sum(values):
    """Sums a list of tensors over replicas (identity outside a strategy).

    `None` entries stay `None`. Must be called in a replica context, not
    inside a `tf.cond`.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return list(values)
    present = [i for i, v in enumerate(values) if v is not None]
    reduced = ctx.all_reduce(
        tf.distribute.ReduceOp.SUM, [_dense(values[i]) for i in present]
    )
    out = list(values)
    for i, r in zip(present, reduced):
        out[i] = r
    return out


def global_norm_of(tensors):
    """Global L2 norm (float32) of tensors, without any all-reduce."""
    present = [t for t in tensors if t is not None]
    if not present:
        return tf.constant(0.0)
    squares = [
        tf.reduce_sum(tf.square(tf.cast(_dense(t), tf.float32)))
        for t in present
    ]
    return tf.sqrt(tf.add_n(squares))


def global_norm(grads):
    """Global L2 norm (float32) of the gradients summed over replicas.

    On N replicas the optimizer applies the sum of the per-replica gradients;
    this is the norm of that sum, the same number a single device computes
    for the same global batch.
    """
    return global_norm_of(all_reduce_sum(grads))


def all_finite(tensors):
    """True (on every replica alike) when every tensor is finite everywhere.

    Each replica checks its own tensors, then the verdicts are summed over
    replicas, so a NaN on one replica stops the step on all of them.
    """
    checks = []
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, tf.IndexedSlices):
            t = t.values
        checks.append(tf.reduce_all(tf.math.is_finite(t)))
    ok = tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)
    return all_true(ok)


def all_true(flag):
    """True (on every replica alike) when `flag` is True on every replica.

    Args:
        flag: A scalar boolean tensor, this replica's verdict.
    """
    bad = tf.cast(tf.logical_not(flag), tf.float32)
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
        bad = ctx.all_reduce(tf.distribute.ReduceOp.SUM, bad)
    return tf.equal(bad, 0.0)


def replica_id():
    """This replica's index as an int32 tensor (0 outside a strategy)."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None:
        return tf.constant(0, tf.int32)
    return tf.cast(ctx.replica_id_in_sync_group, tf.int32)


def assign_add_everywhere(variables, deltas):
    """`variable += delta` for each pair, identically on every replica.

    Mirrored variables cannot be assigned in a replica context, so the
    update runs in the cross-replica context (`merge_call`), as the
    optimizer's own updates do. `deltas` must be equal on all replicas.
    `None` deltas are skipped.
    """
    _update_everywhere(variables, deltas, lambda var, d: var.assign_add(d))


def assign_everywhere(variables, values):
    """`variable.assign(value)` for each pair, on every replica, as
    `assign_add_everywhere` does: an exact restore where adding back a
    difference is not (`(w + e) - e` is not `w` in floating point).
    `None` values are skipped."""
    _update_everywhere(variables, values, lambda var, v: var.assign(v))


def _update_everywhere(variables, values, assign):
    pairs = []
    for v, value in zip(variables, values):
        if value is not None:
            target = v.value if hasattr(v, "value") else v
            pairs.append((target, tf.cast(value, target.dtype)))

    def update(strategy, pairs_):
        for target, value in pairs_:
            strategy.extended.update(target, assign, args=(value,), group=False)

    tf.distribute.get_replica_context().merge_call(update, args=(pairs,))


def loss_scale(optimizer):
    """The dynamic loss scale of a `LossScaleOptimizer`, else `None`."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        if optimizer.built:
            return optimizer.dynamic_scale
        return tf.constant(optimizer.initial_scale, tf.float32)
    return None


def needs_merge_call():
    """Whether the current strategy runs cross-replica work via merge_call.

    True for `MirroredStrategy` on CPUs; a `tf.cond` around
    `apply_gradients` is then only allowed in the cross-replica context.
    Uses `tf.__internal__.distribute.strategy_supports_no_merge_call`, the
    check Keras' `LossScaleOptimizer` uses too.
    """
    return not tf.__internal__.distribute.strategy_supports_no_merge_call()


def apply_if(finite, optimizer, grads, variables):
    """`optimizer.apply_gradients` only where `finite` is True.

    `finite` must be equal on all replicas
    (`fitcustom.distribute.all_finite` ensures it).
    """

    def apply(grads_, variables_):
        optimizer.apply_gradients(zip(grads_, variables_))

    run_if(finite, apply, list(grads), list(variables))


def run_if(condition, fn, *args):
    """Calls `fn(*args)` in the replica context only where `condition`.

    Under a strategy that needs `merge_call` (MirroredStrategy on CPUs), a
    `tf.cond` around cross-replica work (`apply_gradients`) is not allowed
    in a replica context; the condition is then evaluated in the
    cross-replica context and `fn` runs on every replica from there, as
    Keras' `LossScaleOptimizer` does. `condition` must be equal on all
    replicas; `fn` returns nothing.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or not needs_merge_call():
        tf.cond(condition, lambda: fn(*args), lambda: None)
        return

    def merged(strategy, condition_, *args_):
        first = strategy.experimental_local_results(condition_)[0]

        def run():
            strategy.extended.call_for_each_replica(fn, args=args_)

        tf.cond(first, run, lambda: None)

    ctx.merge_call(merged, args=(condition,) + tuple(args))


def all_gather(value, axis=0):
    """`value` of every replica, concatenated along `axis` in replica
    order (this replica's own rows are `local_rows(its size)`).

    For losses over the whole batch, such as a contrastive loss whose
    negatives are every other sample of the global batch: each replica
    computes the loss of its own samples (anchors) against the gathered
    ones, and the engine's division by the number of replicas then gives
    the global batch's mean. It is differentiable: the gradient a replica
    receives for its rows sums what every replica's loss sent to them, so
    2 replicas train what one device trains on the same global batch.
    Outside a strategy (or on one replica) it returns `value`.

    Args:
        value: A tensor whose `axis` is the local batch.
        axis: The batch axis. Defaults to 0.

    Returns:
        The gathered tensor: the global batch's rows along `axis` (a last
        batch that the replicas do not divide evenly, e.g. 67 samples as
        34 and 33, is gathered whole).
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return value
    return ctx.all_gather(value, axis=axis)


def _global_rows(local_batch_size):
    """`(rows, total)`: this replica's positions in the global batch and
    the global batch's size, from every replica's size (a collective)."""
    size = tf.cast(local_batch_size, tf.int32)
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return tf.range(size), size
    sizes = ctx.all_gather(tf.reshape(size, [1]), axis=0)
    offset = tf.reduce_sum(sizes[: replica_id()])
    return offset + tf.range(size), tf.reduce_sum(sizes)


def local_rows(local_batch_size):
    """The positions of this replica's samples in the global batch, that
    is in `all_gather`'s output (int32): the sizes of the replicas before
    this one, plus `range(local_batch_size)`. Right for a batch that the
    replicas do not divide evenly too (every replica must call it: it
    gathers their sizes).
    """
    return _global_rows(local_batch_size)[0]


def normal_per_sample(shape, seed):
    """Standard normal noise with one row per sample of this replica's
    batch, the same rows that sample gets on any number of replicas.

    Draws the global batch's noise from the stateless `seed` and keeps
    this replica's rows (see `local_rows`), so 2 replicas draw what one
    device draws for the same global batch (where `SeedGenerator` draws
    give every replica the same noise, and folding in the replica id gives
    noise that no single device would draw).

    Args:
        shape: `(local_batch_size, ...)`.
        seed: A stateless seed, shape `(2,)` integers.

    Returns:
        float32 tensor of `shape`.
    """
    shape = tf.convert_to_tensor(shape, tf.int32)
    if num_replicas() == 1:
        return tf.random.stateless_normal(shape, seed)
    rows, total = _global_rows(shape[0])
    global_shape = tf.concat([tf.reshape(total, [1]), shape[1:]], axis=0)
    noise = tf.random.stateless_normal(global_shape, seed)
    return tf.gather(noise, rows)


def num_workers(strategy=None) -> int:
    """The number of worker processes of `strategy` (the current one by
    default): more than 1 under a `MultiWorkerMirroredStrategy` cluster,
    else 1."""
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return 1
    spec = resolver.cluster_spec().as_dict()
    return max(1, sum(len(spec.get(t, ())) for t in ("chief", "worker")))


def first_flag_of_any_worker(value: int, strategy=None, size: int = 65) -> int:
    """The smallest nonzero `value` (in [0, size)) given by any worker, or
    0 when every worker gives 0: e.g. a signal number received by one
    worker, agreed by all. A collective under a multi-worker strategy:
    every worker must call it, in the same order; on one process it
    returns `value` without communicating."""
    strategy = strategy or tf.distribute.get_strategy()
    if num_workers(strategy) <= 1:
        return int(value)
    total = _summed_over_workers(strategy)(
        tf.one_hot(int(value), size, dtype=tf.float32)
    )
    nonzero = np.flatnonzero(np.asarray(total)[1:] > 0)
    return int(nonzero[0]) + 1 if nonzero.size else 0


_SUMS = weakref.WeakKeyDictionary()


def _summed_over_workers(strategy):
    """A function (traced once per strategy) that sums a tensor given by
    every replica of every worker."""
    if strategy not in _SUMS:

        @tf.function
        def summed(value):
            per_replica = strategy.run(tf.identity, args=(value,))
            return strategy.reduce(
                tf.distribute.ReduceOp.SUM, per_replica, axis=None
            )

        _SUMS[strategy] = summed
    return _SUMS[strategy]
