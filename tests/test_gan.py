"""TapeGAN: equal to hand-written GAN loops, distribution, saving, input."""

import zipfile

import h5py
import keras
import numpy as np
import pytest
import task_harness
import tensorflow as tf
from gan_builders import LATENT
from gan_builders import FedGAN
from gan_builders import copies
from gan_builders import fed_gan
from gan_builders import make_discriminator
from gan_builders import make_generator
from gan_builders import real_images
from helpers import MODES
from helpers import assert_weights_close
from helpers import max_abs_diff
from helpers import update_size

import fitcustom
from fitcustom import architectures


@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
def test_simultaneous_step_equals_a_hand_written_dcgan_loop(mode):
    steps, batch = 4, 16
    images = real_images(steps * batch)
    table = (
        np.random.default_rng(1)
        .normal(size=(steps, 1, batch, LATENT))
        .astype("float32")
    )
    generator, discriminator = copies()
    gan = fed_gan(table, simultaneous=True)
    gan.generator.set_weights(generator.get_weights())
    gan.discriminator.set_weights(discriminator.get_weights())

    g_opt, d_opt = keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3)
    cross_entropy = keras.losses.BinaryCrossentropy(from_logits=True)

    def loop_step(batch_images, noise):
        with tf.GradientTape() as gen_tape, tf.GradientTape() as disc_tape:
            generated = generator(noise, training=True)
            real_output = discriminator(batch_images, training=True)
            fake_output = discriminator(generated, training=True)
            gen_loss = cross_entropy(tf.ones_like(fake_output), fake_output)
            disc_loss = cross_entropy(
                tf.ones_like(real_output), real_output
            ) + cross_entropy(tf.zeros_like(fake_output), fake_output)
        g_grads = gen_tape.gradient(gen_loss, generator.trainable_variables)
        d_grads = disc_tape.gradient(
            disc_loss, discriminator.trainable_variables
        )
        g_opt.apply_gradients(zip(g_grads, generator.trainable_variables))
        d_opt.apply_gradients(zip(d_grads, discriminator.trainable_variables))

    # The hand-written step runs under tf.function; it is compared in the same
    # execution mode (eager and graph kernels round differently, ~4e-6).
    if mode != "eager":
        loop_step = tf.function(loop_step, jit_compile=mode == "jit")
    for i in range(steps):
        loop_step(images[i * batch : (i + 1) * batch], table[i, 0])

    gan.compile(
        d_optimizer=keras.optimizers.Adam(1e-3),
        g_optimizer=keras.optimizers.Adam(1e-3),
        **MODES[mode],
    )
    gan.fit(images, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    g_diff = max_abs_diff(generator.get_weights(), gan.generator.get_weights())
    d_diff = max_abs_diff(
        discriminator.get_weights(), gan.discriminator.get_weights()
    )
    print(f"parity {mode}: generator {g_diff:.2g}, discriminator {d_diff:.2g}")
    # Measured (generator / discriminator, float32): eager 0 / 0, graph
    # 3.4e-6 / 1.5e-8, steps_per_execution 1.5e-6 / 1.5e-8, jit 5.6e-6 /
    # 1.5e-8. Graph programs are optimized differently from the loop's
    # (each update of TapeGAN's is applied before the next gradient, the
    # loop's two after both), and Adam's first steps turn a rounding
    # difference of a tiny gradient into one of the update size: with SGD
    # the same comparison gives 1.5e-8 / 1.5e-8 in graph mode, as before
    # that change. Where oneDNN is on (TensorFlow's default on CPUs with
    # AVX-512 VNNI/BF16) graph mode measured 8.3e-6 / 3.7e-9 and
    # steps_per_execution 1.9e-6 / 3.7e-9: its optimizer fuses Conv2D, bias
    # and LeakyReLU in one of the two programs and gives up on the other
    # (the "remapper failed" line TensorFlow prints); 3.2e-6 with
    # TF_ENABLE_ONEDNN_OPTS=0 on the same machine. A wrong step is off by
    # the size of an update (> 1e-3).
    atol = {"eager": 1e-6}.get(mode, 2e-5)
    assert g_diff <= atol and d_diff <= atol
    moved = max(
        np.abs(a - b).max()
        for a, b in zip(copies()[0].get_weights(), gan.generator.get_weights())
    )
    assert moved > 1e-3


def test_n_critic_step_equals_hand_written_alternating_loop():
    steps, batch, n_critic = 3, 16, 2
    m = batch // n_critic
    images = real_images(steps * batch)
    table = (
        np.random.default_rng(2)
        .normal(size=(steps, n_critic + 1, m, LATENT))
        .astype("float32")
    )
    generator, discriminator = copies()
    g_opt, d_opt = keras.optimizers.SGD(0.05), keras.optimizers.SGD(0.05)
    softplus = tf.nn.softplus

    @tf.function
    def hand_step(batch_images, noise):
        for k in range(n_critic):
            with tf.GradientTape() as tape:
                fake = generator(noise[k], training=True)
                real_logits = discriminator(
                    batch_images[k::n_critic], training=True
                )
                fake_logits = discriminator(fake, training=True)
                loss = tf.reduce_mean(softplus(-real_logits)) + (
                    tf.reduce_mean(softplus(fake_logits))
                )
            grads = tape.gradient(loss, discriminator.trainable_variables)
            d_opt.apply_gradients(zip(grads, discriminator.trainable_variables))
        with tf.GradientTape() as tape:
            fake_logits = discriminator(
                generator(noise[n_critic], training=True), training=True
            )
            loss = tf.reduce_mean(softplus(-fake_logits))
        grads = tape.gradient(loss, generator.trainable_variables)
        g_opt.apply_gradients(zip(grads, generator.trainable_variables))

    for i in range(steps):
        hand_step(images[i * batch : (i + 1) * batch], table[i])

    gan = fed_gan(table, n_critic=n_critic)
    gan.compile(
        d_optimizer=keras.optimizers.SGD(0.05),
        g_optimizer=keras.optimizers.SGD(0.05),
    )
    history = gan.fit(
        images, batch_size=batch, epochs=1, shuffle=False, verbose=0
    ).history
    assert gan.d_optimizer.iterations.numpy() == steps * n_critic
    assert_weights_close(generator.get_weights(), gan.generator.get_weights())
    assert_weights_close(
        discriminator.get_weights(), gan.discriminator.get_weights()
    )
    assert sorted(history) == ["d_loss", "g_loss", "loss"]


@pytest.mark.parametrize(
    "loss, options",
    [
        ("non_saturating", {}),
        ("wasserstein", {}),  # + gradient penalty
        ("hinge", dict(r1_gamma=1.0)),
        ("least_squares", dict(label_smoothing=0.1)),
    ],
    ids=["non_saturating", "wasserstein_gp", "hinge_r1", "least_squares"],
)
def test_two_replicas_match_one_device_with_fed_noise(
    two_replicas, loss, options
):
    """Every loss family and penalty is reduced like Keras' losses (mean
    over the replica's batch / replicas): the same global batch on 2
    replicas takes the step 1 device takes.

    SGD, not Adam: Adam divides each gradient by its own magnitude, so it
    would hide a loss scaled by the number of replicas as a whole, and it
    turns the last-bit rounding of a gradient near 0 (summed in another
    order on 2 replicas) into a visible update difference. Smooth
    activations for the same reason: at a kink a rounding difference
    switches the slope."""
    report = _check_replicas(two_replicas, FedGAN, loss, options)
    print(report)
    assert report.weight_diff <= 1e-6  # measured 1.5e-8 to 6e-8
    assert report.weight_change > 1e-3
    report.assert_ok()


class SumsOverReplicas(FedGAN):
    """The classic mistake: each replica's loss is not divided by the
    number of replicas, so the summed gradients are that many times too
    large."""

    def scale_loss(self, loss, optimizer=None):
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        return super().scale_loss(loss, optimizer) * replicas


def test_two_replica_comparison_catches_a_missing_division(two_replicas):
    report = _check_replicas(
        two_replicas,
        SumsOverReplicas,
        "hinge",
        dict(r1_gamma=1.0),
        expect_ok=False,
    )
    assert report.weight_diff > 1e-3


def _check_replicas(strategy, cls, loss, options, expect_ok=True):
    """The harness's two-replica check over 3 steps of `cls`, fed the
    same noise on one device and on 2 replicas."""
    steps, batch, n_critic = 3, 16, 2
    m = batch // n_critic
    rng = np.random.default_rng(3)
    table = rng.normal(size=(steps, n_critic + 1, m, LATENT)).astype("float32")
    eps = rng.uniform(size=(steps, n_critic, m)).astype("float32")

    def make(**compile_kwargs):
        # BatchNormalization normalises each replica's batch on its own
        # (synchronized=False): left out, as it differs by design.
        gan = fed_gan(
            table,
            eps,
            batch_norm=False,
            smooth=True,
            cls=cls,
            n_critic=n_critic,
        )
        gan.compile(
            d_optimizer=keras.optimizers.SGD(0.1),
            g_optimizer=keras.optimizers.SGD(0.1),
            loss=loss,
            **options,
            **compile_kwargs,
        )
        return gan

    task = task_harness.Task(
        make,
        lambda: (real_images(steps * batch), None),
        dict(batch_size=batch),
    )
    return task_harness.check_two_replicas(
        task,
        strategy,
        weight_tolerance=1e-6,
        expect_ok=expect_ok,
        log_tolerance=1e-5,
    )


def test_replicas_draw_different_noise(two_replicas):
    with two_replicas.scope():
        gan = fitcustom.TapeGAN(
            generator=make_generator(),
            discriminator=make_discriminator(),
            latent_dim=LATENT,
        )
        gan.compile()
    noise = two_replicas.run(lambda: gan.sample_latent(4, 0))
    first, second = two_replicas.experimental_local_results(noise)
    assert np.abs(first.numpy() - second.numpy()).max() > 0.1


def test_every_draw_of_a_run_has_its_own_seed():
    gan = _gan(n_critic=3)
    gan.compile(label_noise=0.05, label_smoothing=0.1, gp_weight=1.0)
    draws = [gan.sample_latent(4, k).numpy() for k in range(4)]
    np.testing.assert_array_equal(draws[0], gan.sample_latent(4, 0).numpy())
    for i in range(4):
        for j in range(i):
            assert np.abs(draws[i] - draws[j]).max() > 0.1, (i, j)
    # Interpolation weights: U[0, 1] (not normal), new for each update.
    eps = gan.interpolation_weights(4000, 0).numpy()
    assert eps.min() >= 0.0 and eps.max() <= 1.0
    assert abs(eps.mean() - 0.5) < 0.02 and abs(eps.var() - 1 / 12) < 0.01
    other = gan.interpolation_weights(4000, 1).numpy()
    assert np.abs(eps - other).max() > 0.1
    # Label noise moves targets towards the other class: real in
    # [0.85, 0.9], fake in [0, 0.05], new for each discriminator update.
    real0, fake0 = (t.numpy() for t in gan._targets(1000, 0))
    real1, _ = (t.numpy() for t in gan._targets(1000, 1))
    assert 0.85 <= real0.min() and real0.max() <= 0.9
    assert abs(real0.mean() - 0.875) < 0.002
    assert 0.0 <= fake0.min() and fake0.max() <= 0.05
    assert abs(fake0.mean() - 0.025) < 0.002
    assert np.abs(real0 - real1).max() > 0.01
    # The next step draws new noise.
    gan.fit(real_images(12), batch_size=12, epochs=1, verbose=0)
    assert np.abs(gan.sample_latent(4, 0).numpy() - draws[0]).max() > 0.1


def _gan(**kwargs):
    keras.utils.set_random_seed(0)
    return fitcustom.TapeGAN(
        generator=make_generator(),
        discriminator=make_discriminator(),
        latent_dim=LATENT,
        **kwargs,
    )


@pytest.mark.parametrize(
    "loss, options, extra",
    [
        ("non_saturating", dict(label_smoothing=0.1, label_noise=0.05), []),
        ("minimax", {}, []),
        ("wasserstein", {}, ["gradient_penalty"]),
        ("hinge", dict(r1_gamma=1.0), ["r1_penalty"]),
        ("least_squares", {}, []),
    ],
)
def test_every_loss_family_trains_and_logs(loss, options, extra):
    gan = _gan(n_critic=2 if loss == "wasserstein" else 1)
    gan.compile(loss=loss, **options)
    history = gan.fit(
        real_images(64), batch_size=16, epochs=2, verbose=0
    ).history
    assert sorted(history) == sorted(["d_loss", "g_loss", "loss"] + extra)
    assert all(np.isfinite(v).all() for v in history.values())
    # `loss` is what the two updates minimised: the penalties weighted.
    args = gan.compile_arguments
    weights = {
        "gradient_penalty": args.get("gp_weight"),
        "r1_penalty": 0.5 * (args.get("r1_gamma") or 0.0),
    }
    minimised = np.asarray(history["d_loss"]) + np.asarray(history["g_loss"])
    for name in extra:
        minimised = minimised + weights[name] * np.asarray(history[name])
        assert weights[name] > 0 and np.min(history[name]) > 0
    np.testing.assert_allclose(history["loss"], minimised, rtol=1e-4, atol=1e-4)


def test_evaluate_changes_nothing_and_generate_is_seeded():
    gan = _gan()
    gan.compile()
    gan.fit(real_images(32), batch_size=16, epochs=1, verbose=0)
    before = gan.get_weights()
    iterations = int(gan.g_optimizer.iterations.numpy())
    logs = gan.evaluate(
        real_images(32, seed=5), batch_size=16, verbose=0, return_dict=True
    )
    assert sorted(logs) == ["d_loss", "g_loss", "loss"]
    assert_weights_close(before, gan.get_weights(), atol=0)
    assert int(gan.g_optimizer.iterations.numpy()) == iterations
    a, b, c = (
        gan.generate(6, seed=3),
        gan.generate(6, seed=3),
        gan.generate(6, seed=4),
    )
    assert a.shape == (6, 8, 8, 1)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_evaluate_is_independent_of_the_batch_size():
    """Each image's latent vector is keyed to the image: the same numbers
    for any batch size (with the noise drawn per batch, d_loss was 1.2135
    at batch size 64 and 1.1886 at 32)."""
    gan = _gan()
    gan.compile()
    gan.fit(real_images(32), batch_size=16, epochs=1, verbose=0)
    images = real_images(40, seed=5)
    logs = [
        gan.evaluate(images, batch_size=b, verbose=0, return_dict=True)
        for b in (40, 16, 7)
    ]
    for other in logs[1:]:
        for key, value in logs[0].items():
            assert other[key] == pytest.approx(value, rel=1e-6), key
    z = gan.evaluation_latent(images).numpy()
    assert z.shape == (40, LATENT)
    # One vector per image: its own, whatever batch it comes in.
    np.testing.assert_array_equal(z[7:9], gan.evaluation_latent(images[7:9]))
    assert np.abs(z[0] - z[1]).max() > 0.1
    assert abs(z.std() - 1.0) < 0.1


def test_conditional_gan_and_ema_generator():
    keras.utils.set_random_seed(0)
    gan = fitcustom.TapeGAN(
        generator=make_generator(True),
        discriminator=make_discriminator(True),
        latent_dim=LATENT,
        ema_decay=0.9,
    )
    gan.compile()
    labels = np.arange(64) % 10
    gan.fit(real_images(64), labels, batch_size=16, epochs=2, verbose=0)
    assert gan.ema_generator is not None
    ema = gan.generate(10, seed=1, labels=np.arange(10))
    raw = gan.generate(10, seed=1, labels=np.arange(10), use_ema=False)
    assert ema.shape == (10, 8, 8, 1)
    assert np.abs(ema - raw).max() > 1e-4  # EMA lags the trained weights
    other = gan.generate(10, seed=1, labels=np.zeros(10, "int32"))
    assert np.abs(ema - other).max() > 1e-4  # labels reach the generator


class _Weights(keras.callbacks.Callback):
    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append([w.numpy() for w in self.net.weights])


@pytest.mark.parametrize("n_critic", [1, 2])
def test_ema_generator_follows_the_ema_formula(n_critic):
    keras.utils.set_random_seed(0)
    generator = make_generator()
    gan = fitcustom.TapeGAN(
        generator=generator,
        discriminator=make_discriminator(),
        latent_dim=LATENT,
        ema_decay=0.8,
        n_critic=n_critic,
    )
    # Untrained: the EMA copy is the generator, not a random re-draw.
    assert_weights_close(gan.ema_generator.weights, generator.weights, 0)
    # Weights set after construction are what the average starts from.
    generator.set_weights([w * 1.5 for w in generator.get_weights()])
    gan.compile()
    record = _Weights(generator)
    gan.fit(
        real_images(64),
        batch_size=16,
        epochs=2,
        verbose=0,
        callbacks=[record],
    )
    expected = record.seen[0]
    for weights in record.seen[1:]:
        expected = [0.8 * e + 0.2 * w for e, w in zip(expected, weights)]
    assert len(record.seen) == 8
    assert_weights_close(gan.ema_generator.weights, expected, 1e-6)
    # ...and it lags the trained generator.
    assert max_abs_diff(gan.ema_generator.weights, generator.weights) > 1e-3


def test_the_two_optimizers_are_named_optimizers(tmp_path):
    """TapeGAN's optimizers are the engine's named optimizers
    "discriminator" and "generator": `compile(optimizer={...})` trains
    what `d_optimizer=` / `g_optimizer=` train, and the saved file keeps
    them at `d_optimizer` / `g_optimizer` (files saved before load)."""
    runs = []
    for how in ("keywords", "dict", "swapped"):
        gan = _gan()
        d, g = keras.optimizers.Adam(1e-3), keras.optimizers.SGD(0.05)
        if how == "keywords":
            gan.compile(d_optimizer=d, g_optimizer=g)
        elif how == "dict":
            gan.compile(optimizer={"generator": g, "discriminator": d})
        else:  # the control: each network gets the other's optimizer
            d, g = g, d
            gan.compile(optimizer={"generator": g, "discriminator": d})
        assert dict(gan.optimizers) == {"discriminator": d, "generator": g}
        assert gan.get_optimizer("generator") is gan.g_optimizer is g
        assert gan.d_optimizer is d and gan.optimizer is None
        gan.fit(real_images(32), batch_size=16, epochs=1, verbose=0)
        runs.append(gan)
    assert_weights_close(runs[0].weights, runs[1].weights, 0)
    assert max_abs_diff(runs[0].weights, runs[2].weights) > 1e-3
    assert int(runs[1].d_optimizer.iterations.numpy()) == 2
    path = tmp_path / "gan.keras"
    runs[1].save(path)
    with zipfile.ZipFile(path) as z:
        z.extract("model.weights.h5", tmp_path)
    with h5py.File(tmp_path / "model.weights.h5") as f:
        # Where files saved before keep the optimizers' state.
        assert set(f["compile_arguments"]) == {"adam", "sgd"}
        assert not any(k.startswith("_named") for k in f)
    loaded = keras.saving.load_model(path)
    assert sorted(loaded.optimizers) == ["discriminator", "generator"]
    for name in ("d_optimizer", "g_optimizer"):
        assert_weights_close(
            getattr(runs[1], name).variables,
            getattr(loaded, name).variables,
            0,
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(optimizer={"discriminator": "adam"}),
            r"named 'discriminator' and 'generator'.*\['discriminator'\]",
        ),
        (
            dict(
                optimizer={"discriminator": "adam", "generator": "adam"},
                d_optimizer="sgd",
            ),
            "once.*Received: both",
        ),
    ],
    ids=["missing_name", "both_forms"],
)
def test_bad_optimizer_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _gan().compile(**kwargs)


class _FeatureMatchingGAN(fitcustom.TapeGAN):
    """A step of one's own on TapeGAN's pieces: the built-in
    discriminator update, then a generator update through `minimize`
    with two named terms."""

    def train_step(self, data):
        real, conditions, _ = self.unpack_data(data)
        batch = tf.shape(real)[0]
        with tf.GradientTape() as tape:
            fake = self._generate(self.sample_latent(batch, 0), None, True)
            real_logits, fake_logits = self._discriminate_both(real, fake, None)
            d_loss = self.gan_loss.discriminator(
                real_logits, fake_logits, tf.ones_like(real_logits), 0.0
            )
            self.minimize(tape, {"critic": d_loss}, optimizer="discriminator")
        with tf.GradientTape() as tape:
            fake = self._generate(self.sample_latent(batch, 1), None, True)
            fake_logits = self._discriminate(fake, None, True)
            self.minimize(
                tape,
                {
                    "adversarial": self.gan_loss.generator(fake_logits),
                    "matching": tf.square(fake - tf.reduce_mean(real, 0)),
                },
                optimizer="generator",
            )


def test_a_step_of_ones_own_on_tapegan_moves_its_ema_generator():
    keras.utils.set_random_seed(0)
    generator = make_generator()
    gan = _FeatureMatchingGAN(
        generator=generator,
        discriminator=make_discriminator(),
        latent_dim=LATENT,
        ema_decay=0.5,
    )
    gan.compile()
    images = real_images(48)
    history = gan.fit(images, batch_size=16, epochs=1, verbose=0).history
    assert {"critic", "adversarial", "matching", "loss"} <= set(history)
    # TapeGAN's own logs are not there as constants of a step not taken.
    assert not {"d_loss", "g_loss"} & set(history)
    terms = ("critic", "adversarial", "matching")
    np.testing.assert_allclose(
        history["loss"][0], sum(history[k][0] for k in terms), rtol=1e-5
    )
    assert int(gan.g_optimizer.iterations.numpy()) == 3
    # After each generator update: ema = 0.5 ema + 0.5 generator.
    expected = [w.numpy() for w in gan.ema_generator.weights]
    record = _Weights(generator)
    gan.fit(images, batch_size=16, epochs=1, verbose=0, callbacks=[record])
    for weights in record.seen:
        expected = [0.5 * e + 0.5 * w for e, w in zip(expected, weights)]
    assert len(record.seen) == 3
    assert_weights_close(gan.ema_generator.weights, expected, 1e-6)
    assert max_abs_diff(gan.ema_generator.weights, generator.weights) > 1e-4


class _PoisonedGAN(fitcustom.TapeGAN):
    """Adds `poison` (0 or NaN) to the generator update's latent draw."""

    poison = None

    def sample_latent(self, batch_size, stream):
        z = super().sample_latent(batch_size, stream)
        return z + self.poison if stream == self.n_critic else z


def test_ema_generator_ignores_skipped_steps():
    keras.utils.set_random_seed(0)
    gan = _PoisonedGAN(
        generator=make_generator(batch_norm=False),
        discriminator=make_discriminator(),
        latent_dim=LATENT,
        ema_decay=0.5,
    )
    gan.poison = tf.Variable(0.0, trainable=False)
    gan.compile(skip_nonfinite=True)
    images = real_images(64)
    gan.fit(images[:32], batch_size=16, epochs=1, verbose=0)
    g_before = [w.numpy() for w in gan.generator.weights]
    before = [w.numpy() for w in gan.ema_generator.weights]
    assert max_abs_diff(before, g_before) > 1e-4  # a skip would move it
    gan.poison.assign(float("nan"))
    history = gan.fit(images[:32], batch_size=16, epochs=1, verbose=0)
    assert history.history["nonfinite_steps"] == [2]
    assert_weights_close(gan.generator.weights, g_before, 0)
    assert_weights_close(gan.ema_generator.weights, before, 0)


def _update_sizes(policy, init):
    """Update size of each network after 2 SGD steps under `policy`."""
    keras.config.set_dtype_policy(policy)
    gan = _gan()
    gan.set_weights(init)
    gan.compile(
        d_optimizer=keras.optimizers.SGD(0.1),
        g_optimizer=keras.optimizers.SGD(0.1),
        r1_gamma=1.0,
    )
    history = gan.fit(
        real_images(32), batch_size=16, epochs=1, shuffle=False, verbose=0
    ).history
    assert np.isfinite(history["loss"]).all()
    sizes = [
        update_size(
            _trainable(init, gan, net),
            [w.numpy() for w in net.trainable_weights],
        )
        for net in (gan.generator, gan.discriminator)
    ]
    return gan, sizes


def _trainable(init, gan, net):
    """The initial values of `net`'s trainable weights, from `init`."""
    by_id = {id(w): v for w, v in zip(gan.weights, init)}
    return [by_id[id(w)] for w in net.trainable_weights]


def test_mixed_precision_scales_both_losses():
    """Under mixed_float16 both optimizers are LossScaleOptimizers and both
    losses are scaled: the updates have the float32 run's size (without
    loss scaling they would be ~32768 times smaller)."""
    init = _gan().get_weights()
    _, float32 = _update_sizes("float32", init)
    gan, mixed = _update_sizes("mixed_float16", init)
    for opt in (gan.d_optimizer, gan.g_optimizer):
        assert isinstance(opt, keras.optimizers.LossScaleOptimizer)
    assert gan.generator.compute_dtype == "float16"
    print(f"update sizes G, D: float32 {float32}, mixed {mixed}")
    for a, b in zip(float32, mixed):
        assert a > 1e-3
        assert 0.9 < b / a < 1.1


def test_early_stopping_and_checkpoint_read_the_gan_losses(tmp_path):
    """`loss` and `val_loss` work with the defaults (mode "auto");
    `d_loss` / `g_loss` need mode="min" (Keras infers the direction only
    for `loss` and compiled metrics)."""
    gan = _gan()
    gan.compile()
    stop = keras.callbacks.EarlyStopping(
        monitor="g_loss", mode="min", patience=1, min_delta=100.0
    )
    best = keras.callbacks.ModelCheckpoint(
        tmp_path / "best.keras", monitor="loss", save_best_only=True
    )
    history = gan.fit(
        real_images(32),
        batch_size=16,
        epochs=10,
        verbose=0,
        callbacks=[stop, best],
    ).history
    assert len(history["g_loss"]) == 2  # no improvement of 100 after epoch 1
    restored = keras.models.load_model(tmp_path / "best.keras")
    assert isinstance(restored, fitcustom.TapeGAN)
    assert restored.d_optimizer.built and restored.g_optimizer.built

    stop = keras.callbacks.EarlyStopping(patience=1, min_delta=100.0)
    history = gan.fit(
        real_images(32),
        batch_size=16,
        epochs=10,
        verbose=0,
        validation_data=(real_images(16, seed=9),),
        callbacks=[stop],
    ).history
    assert sorted(history) == [
        "d_loss",
        "g_loss",
        "loss",
        "val_d_loss",
        "val_g_loss",
        "val_loss",
    ]
    assert len(history["val_loss"]) == 2


def test_terminate_on_nan_stops_a_diverging_gan():
    gan = _gan()
    gan.compile(check_inputs=False)  # NaN images on purpose
    images = real_images(64)
    images[20] = np.nan
    history = gan.fit(
        images,
        batch_size=16,
        epochs=3,
        verbose=0,
        callbacks=[keras.callbacks.TerminateOnNaN()],
    ).history
    assert len(history["loss"]) == 1


def test_guard_skips_nan_batches_for_both_networks():
    gan = _gan()
    gan.compile(skip_nonfinite=True, check_inputs=False)
    images = real_images(64)
    images[20] = np.nan
    history = gan.fit(images, batch_size=16, epochs=2, verbose=0).history
    assert history["nonfinite_steps"] == [1.0, 1.0]  # the D step skipped
    assert all(np.isfinite(w).all() for w in gan.get_weights())


# ----------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------


def test_fit_before_compile():
    gan = _gan()
    with pytest.raises(ValueError, match=r"fit\(\) was called before"):
        gan.fit(real_images(16), verbose=0)


def test_images_of_wrong_shape():
    gan = _gan()
    gan.compile()
    with pytest.raises(
        ValueError,
        match=r"Received: images of shape "
        r"\(9, 9, 1\).*Expected: \(8, 8, 1\)",
    ):
        gan.fit(np.zeros((16, 9, 9, 1), "float32"), verbose=0)


def test_generator_that_does_not_fit_the_discriminator():
    z = keras.Input((LATENT,))
    bad = keras.Model(
        z, keras.layers.Reshape((4, 4, 1))(keras.layers.Dense(16)(z))
    )
    gan = fitcustom.TapeGAN(
        generator=bad, discriminator=make_discriminator(), latent_dim=LATENT
    )
    gan.compile()
    with pytest.raises(
        ValueError,
        match=r"generator's output does not fit"
        r".*\(4, 4, 1\).*\(8, 8, 1\)",
    ):
        gan.fit(real_images(16), verbose=0)


def test_discriminator_without_input_shape_that_rejects_the_output():
    class Picky(keras.Model):
        """Takes 8x8x1 images only; has no declared input shape."""

        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, images, training=None):
            return self.dense(keras.ops.reshape(images, (-1, 64)))

    z = keras.Input((LATENT,))
    small = keras.Model(
        z, keras.layers.Reshape((4, 4, 1))(keras.layers.Dense(16)(z))
    )
    gan = fitcustom.TapeGAN(
        generator=small, discriminator=Picky(), latent_dim=LATENT
    )
    gan.compile()
    with pytest.raises(
        ValueError,
        match=r"generator's output does not fit the discriminator\. "
        r"Received: generator output of shape \(1, 4, 4, 1\)",
    ):
        gan.fit(np.zeros((16, 4, 4, 1), "float32"), verbose=0)
    gan = fitcustom.TapeGAN(
        generator=make_generator(), discriminator=Picky(), latent_dim=LATENT
    )
    gan.compile()
    with pytest.raises(
        ValueError,
        match=r"Received: images of shape \(9, 9, 1\)\. Expected: \(8, 8, 1\)",
    ):
        gan.fit(np.zeros((16, 9, 9, 1), "float32"), verbose=0)


def test_labels_for_a_gan_that_takes_none():
    gan = _gan()
    gan.compile()
    with pytest.raises(ValueError, match=r"the GAN is unconditional"):
        gan.fit(real_images(16), np.zeros(16, "int32"), verbose=0)


def test_generate_checks_labels():
    keras.utils.set_random_seed(0)
    gan = fitcustom.TapeGAN(
        generator=make_generator(True),
        discriminator=make_discriminator(True),
        latent_dim=LATENT,
    )
    with pytest.raises(
        ValueError, match=r"pass `labels=`.*labels=None for n=4"
    ):
        gan.generate(4)
    with pytest.raises(ValueError, match=r"shape \(3,\) for n=4"):
        gan.generate(4, labels=np.arange(3))
    with pytest.raises(ValueError, match=r"Received: n=0"):
        gan.generate(0, labels=[])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss="wgan"), "Unknown GAN loss.*'wgan'"),
        (dict(optimizer="adam"), "two optimizers.*optimizer='adam'"),
        (dict(label_noise=1.5), "Received: label_noise=1.5"),
        (
            dict(loss="hinge", label_smoothing=0.1),
            r"'hinge' loss has no targets.*label_smoothing=0\.1",
        ),
        (
            dict(loss="wasserstein", label_noise=0.05),
            r"'wasserstein' loss has no targets.*label_noise=0\.05",
        ),
        (
            dict(label_smoothing=0.3, label_noise=0.3),
            r"at most 0\.5.*label_smoothing=0\.3, label_noise=0\.3",
        ),
        (dict(gp_weight=-1.0), r"Received: gp_weight=-1\.0"),
        (dict(r1_gamma=0), r"Received: r1_gamma=0"),
        (dict(metrics=["accuracy"]), r"no `metrics`.*\['accuracy'\]"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 12 else None,
)
def test_bad_compile_arguments(kwargs, match):
    gan = _gan()
    with pytest.raises(ValueError, match=match):
        gan.compile(**kwargs)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="latent_dim"):
        fitcustom.TapeGAN(
            generator=make_generator(),
            discriminator=make_discriminator(),
            latent_dim=0,
        )
    with pytest.raises(ValueError, match="n_critic=1"):
        fitcustom.TapeGAN(
            generator=make_generator(),
            discriminator=make_discriminator(),
            latent_dim=LATENT,
            n_critic=2,
            simultaneous=True,
        )


# ----------------------------------------------------------------------
# Save, load in a fresh process, continue exactly
# ----------------------------------------------------------------------


def resumable_gan(**compile_kwargs):
    """The GAN of the resume test: n_critic, EMA, label noise, GP, R1 and
    Dropout, all of which carry state across epochs."""
    keras.utils.set_random_seed(0)
    gan = fitcustom.TapeGAN(
        generator=make_generator(),
        discriminator=make_discriminator(dropout=True),
        latent_dim=LATENT,
        n_critic=2,
        ema_decay=0.9,
        seed=5,
    )
    gan.compile(
        d_optimizer=keras.optimizers.Adam(1e-3),
        g_optimizer=keras.optimizers.Adam(2e-3),
        label_noise=0.05,
        gp_weight=1.0,
        r1_gamma=0.5,
        **compile_kwargs,
    )
    return gan


RESUMABLE = task_harness.Task(
    resumable_gan,
    lambda: (real_images(64), None),
    dict(batch_size=16, shuffle=False),
)


@pytest.mark.slow
def test_save_load_in_fresh_process_continues_exactly(tmp_path):
    """Weights, EMA weights, both optimizers' states, the noise (step
    counter) and Dropout's RNG state survive `save` + `load_model` in
    another process: training continues exactly as it would have."""
    result = task_harness.check_continue_in_fresh_process(
        "test_gan", "RESUMABLE", tmp_path
    )
    assert result["steps"] == [16, 8]  # discriminator, generator
    assert sorted(result["logs"]) == [
        "d_loss",
        "g_loss",
        "gradient_penalty",
        "loss",
        "r1_penalty",
    ]


def _confident(classifier, samples):
    probabilities = classifier.predict((samples + 1) / 2, verbose=0)
    confident = probabilities.max(1) >= 0.9
    counts = np.bincount(probabilities.argmax(1)[confident], minlength=10)
    return confident.mean(), counts


@pytest.mark.slow
def test_dcgan_learns_digits():
    """A small DCGAN on the digits makes samples that a digits classifier
    (96.9% test accuracy, trained here) assigns with >= 0.9 probability to
    most classes, and KID and FID order real digits < the trained GAN's
    samples < the untrained generator's < uniform noise.

    Measured (2-core CPU, 40 epochs of 1347 images at Adam 3e-4, 41 s),
    500 samples: this test 39% confident, 9 classes with >= 5 confident
    samples (counts 25 19 28 32 19 11 31 9 2 17); with GAN seeds 1 and 2:
    41% and 35% confident, 9 classes each (the weakest, the 8: 9 and 2).
    (60 epochs at 2e-4 gave 38-42%, 9-10 classes, in twice the time; 30
    epochs at 4e-4 left one seed at KID 11.3, too close to noise.) The
    untrained generator: 29% confident, all of them one class (the 4).
    Thresholds: >= 30% confident, >= 8 classes with >= 5 confident
    samples, and at least 4 such classes more than untrained.

    KID / FID measured here: real digits -0.52 / 11.65, the trained GAN
    0.43 / 16.27 (seeds 1, 2: 1.86 / 20.26, 2.95 / 20.67), uniform noise
    21.1 / 135.6, the untrained generator 39.8 / 439.3. The untrained
    generator scores worse than noise on both: its near-constant grey
    images are further from digits (dark background, bright strokes) in
    the features than noise is; so the test asserts the trained GAN below
    both, not an order between them."""
    from fitcustom.datasets import load_digits

    (x, y), (xt, yt) = load_digits()
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Dense(128, activation="relu")(
        keras.layers.Flatten()(inputs)
    )
    classifier = fitcustom.TapeClassifier(inputs, keras.layers.Dense(10)(h))
    classifier.compile()
    classifier.fit(x, y, batch_size=32, epochs=30, verbose=0)
    accuracy = classifier.evaluate(xt, yt, verbose=0, return_dict=True)[
        "accuracy"
    ]
    assert accuracy > 0.95

    generator, discriminator = architectures.dcgan_8x8(32)
    gan = fitcustom.TapeGAN(
        generator=generator, discriminator=discriminator, latent_dim=32
    )
    gan.compile(
        d_optimizer=keras.optimizers.Adam(3e-4, beta_1=0.5),
        g_optimizer=keras.optimizers.Adam(3e-4, beta_1=0.5),
        label_noise=0.05,
    )
    before, counts_before = _confident(classifier, gan.generate(500, seed=1))
    # KID and FID against the test digits' halves, on GANQuality's digits
    # features (scored after epochs 1 and 40).
    real, held_out = xt[:225] * 2 - 1, xt[225:] * 2 - 1
    quality = fitcustom.GANQuality(real, held_out=held_out, every=40)
    quality.set_model(gan)
    untrained = quality.measure()
    history = gan.fit(
        x * 2 - 1, batch_size=64, epochs=40, verbose=0, callbacks=[quality]
    ).history
    after, counts = _confident(classifier, gan.generate(500, seed=1))
    print(
        f"confident: untrained {before:.3f} {counts_before.tolist()}, "
        f"trained {after:.3f} {counts.tolist()}"
    )
    assert after >= 0.30
    assert (counts >= 5).sum() >= 8
    # The classifier is confident on noise too, but on few classes.
    assert (counts >= 5).sum() >= (counts_before >= 5).sum() + 4

    noise = np.random.default_rng(0).uniform(-1, 1, held_out.shape)
    noise = quality.scores(
        fitcustom.evaluation.extract_features(quality.extractor, real),
        fitcustom.evaluation.extract_features(
            quality.extractor, noise.astype("float32")
        ),
    )
    scores = {
        key: [
            quality.baseline[key],  # real vs real: the floor
            history[key][-1],  # the trained GAN
            untrained[key],
            noise[key],  # uniform noise images
        ]
        for key in ("kid", "fid")
    }
    print(scores)
    for key, (floor, trained, start, random) in scores.items():
        assert floor < trained < min(start, random), (key, scores[key])
        # Training closes most of the gap to the floor.
        assert trained - floor < 0.25 * (start - floor), (key, scores[key])


@keras.saving.register_keras_serializable(package="fitcustom_tests")
class ScaledSoftplus(fitcustom.gan_losses.GANLoss):
    """A loss family of a user's own, with a constructor argument."""

    def __init__(self, scale=1.0):
        super().__init__("scaled_softplus")
        self.scale = scale

    def get_config(self):
        return {"scale": self.scale}

    def discriminator(self, real, fake, real_target=1.0, fake_target=0.0):
        real, fake = tf.reshape(real, [-1]), tf.reshape(fake, [-1])
        return self.scale * (tf.nn.softplus(-real) + tf.nn.softplus(fake))

    def generator(self, fake):
        return tf.nn.softplus(-tf.reshape(fake, [-1]))


def test_a_registered_loss_family_of_ones_own_is_saved(tmp_path):
    gan = _gan()
    gan.compile(loss=ScaledSoftplus(2.0))
    gan.fit(real_images(32), batch_size=16, epochs=1, verbose=0)
    gan.save(tmp_path / "gan.keras")
    restored = keras.models.load_model(tmp_path / "gan.keras")
    assert isinstance(restored.gan_loss, ScaledSoftplus)
    assert restored.gan_loss.scale == 2.0
    a = gan.evaluate(real_images(16, seed=3), batch_size=16, verbose=0)
    b = restored.evaluate(real_images(16, seed=3), batch_size=16, verbose=0)
    np.testing.assert_allclose(a, b, rtol=1e-6)
