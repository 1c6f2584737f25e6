"""genkern.eval.likelihood and genkern.eval.speed: bits/dim per family, samples/s and steps/s."""

import math

import pytest
import torch

from genkern.data.digits import BOS, digits, pixels_to_tokens
from genkern.eval.likelihood import GAN_NOTE, log_likelihood
from genkern.eval.speed import sampling_speed, timed_samples, training_speed
from genkern.models.gan import GAN, GANConfig
from genkern.models.rnn import RNNLM, RNNConfig
from genkern.models.transformer import ModelArgs, TransformerLM
from genkern.models.vae import VAE, VAEConfig

LN2 = math.log(2.0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models: more intra-op threads buy nothing, and on shared cores they stall.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def test_digits():
    return digits("test")


def _transformer(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(vocab_size=18, dim=32, n_layers=2, n_heads=2, max_seq_len=65)
    args.update(kw)
    return TransformerLM(ModelArgs(**args)).eval()


def _vae(seed=0):
    torch.manual_seed(seed)
    return VAE(VAEConfig(hidden=64, latent_dim=8))


def test_transformer_with_equal_logits_gives_log2_18_exactly(test_digits):
    # An untied head of zeros makes every logit 0: each of the 64 pixels costs ln 18 nats.
    model = _transformer(tie_embeddings=False)
    with torch.no_grad():
        model.head.weight.zero_()
    res = log_likelihood(model, test_digits)
    assert res.kind == "exact"
    assert res.dims == 64 and res.examples == len(test_digits.x)
    assert res.nats == pytest.approx(64 * math.log(18), rel=1e-12)
    assert res.bits_per_dim == pytest.approx(math.log2(18), rel=1e-12)
    assert res.elbo_bits_per_dim is None and res.num_samples is None


def test_exact_nll_equals_a_pixel_by_pixel_hand_computation(test_digits):
    # Score pixel t from a forward pass over the prefix only: the chain rule, done slowly.
    model = _transformer(seed=3)
    x = test_digits.x[:3]
    tokens = pixels_to_tokens(x)  # (3, 65)
    nats = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for t in range(64):
            logits = model(tokens[:, : t + 1])[:, -1].double()  # (3, 18)
            nats -= logits.log_softmax(-1).gather(1, tokens[:, t + 1 : t + 2]).squeeze(1)
    res = log_likelihood(model, x)
    assert res.nats == pytest.approx(nats.mean().item(), rel=1e-5)
    assert res.bits_per_dim == pytest.approx(nats.mean().item() / (64 * LN2), rel=1e-5)
    # Tokens in, the same answer; and the result does not depend on the batch size.
    assert log_likelihood(model, tokens).nats == pytest.approx(res.nats, rel=1e-12)
    assert log_likelihood(model, x, batch_size=1).nats == pytest.approx(res.nats, rel=1e-5)


def test_rnn_is_exact_too(test_digits):
    torch.manual_seed(0)
    model = RNNLM(RNNConfig(vocab_size=18, kind="gru", dim=16, hidden=32, bos_token=BOS))
    res = log_likelihood(model, test_digits.x[:20])
    assert res.kind == "exact"
    assert res.bits_per_dim == pytest.approx(res.nats / (64 * LN2), rel=1e-12)
    assert 0 < res.bits_per_dim < 10


def test_vae_with_prior_posterior_and_uniform_decoder_gives_log2_17(test_digits):
    # Encoder output 0 makes q(z|x) = p(z) (every importance weight is 1), decoder output 0
    # makes p(x|z) uniform over the 17 levels: both bounds are then exactly log p(x) = -64 ln 17.
    model = _vae()
    with torch.no_grad():
        for layer in (model.encoder[-1], model.decoder[-1]):
            layer.weight.zero_()
            layer.bias.zero_()
    res = log_likelihood(model, test_digits, num_samples=8)
    assert res.kind == "bound" and res.num_samples == 8
    assert res.elbo_bits_per_dim == pytest.approx(math.log2(17), rel=1e-6)
    assert res.iw_bits_per_dim == pytest.approx(math.log2(17), rel=1e-6)
    assert res.bits_per_dim == res.iw_bits_per_dim


def test_vae_iw_bound_is_tighter_than_the_elbo(test_digits):
    from genkern.train.trainer import train

    model = train(
        "vae",
        data="digits",
        steps=40,
        batch_size=64,
        model={"hidden": 64, "latent_dim": 8},
        progress=False,
        eval_every=10**6,
    ).model
    res = log_likelihood(model, test_digits, num_samples=50)
    assert res.kind == "bound"
    assert res.iw_bits_per_dim < res.elbo_bits_per_dim
    assert res.bits_per_dim == pytest.approx(res.nats / (64 * LN2), rel=1e-12)
    assert 0 < res.iw_bits_per_dim < math.log2(17)  # 40 steps already beat the uniform model
    # Seeded by default, so the numbers repeat; K=1 gives a (noisier) ELBO estimate.
    assert log_likelihood(model, test_digits, num_samples=50).to_dict() == res.to_dict()
    k1 = log_likelihood(model, test_digits, num_samples=1)
    assert k1.iw_bits_per_dim == pytest.approx(res.elbo_bits_per_dim, abs=0.05)
    assert model.training  # the model's mode is restored


def test_untrained_vae_is_no_better_than_uniform(test_digits):
    # With near-zero decoder logits and a KL term >= 0 the ELBO cannot beat log2(17) by much.
    res = log_likelihood(_vae(seed=1), test_digits, num_samples=10)
    assert res.elbo_bits_per_dim > math.log2(17) - 0.1
    assert res.iw_bits_per_dim <= res.elbo_bits_per_dim


def test_gan_has_no_likelihood(test_digits):
    torch.manual_seed(0)
    res = log_likelihood(GAN(GANConfig(hidden=32)), test_digits)
    assert res.kind is None and res.bits_per_dim is None and res.nats is None
    assert res.note == GAN_NOTE and "implicit" in res.note
    assert res.to_dict()["bits_per_dim"] is None


def test_bad_input_names_the_argument(test_digits):
    with pytest.raises(ValueError, match="num_samples"):
        log_likelihood(_vae(), test_digits, num_samples=0)
    with pytest.raises(ValueError, match="batch_size"):
        log_likelihood(_vae(), test_digits, batch_size=0)
    with pytest.raises(TypeError, match="model"):
        log_likelihood(torch.nn.Linear(2, 2), test_digits)
    with pytest.raises(ValueError, match="vocab_size"):
        log_likelihood(_transformer(vocab_size=256), test_digits)
    with pytest.raises(ValueError, match="data"):
        log_likelihood(_transformer(), torch.rand(4, 1, 8, 8))  # not the 17 levels
    with pytest.raises(ValueError, match="data"):
        log_likelihood(_vae(), torch.zeros(4, 64))
    with pytest.raises(ValueError, match="at least one"):
        log_likelihood(_vae(), torch.zeros(0, 1, 8, 8))


# --- speed --------------------------------------------------------------------------------------


def test_sampling_speed_is_positive_for_every_family():
    torch.manual_seed(0)
    models = {"vae": _vae(), "gan": GAN(GANConfig(hidden=32)), "transformer": _transformer()}
    for name, model in models.items():
        speed = sampling_speed(name, model, n=8, repeats=2)
        assert speed > 0 and math.isfinite(speed), name
    samples, secs = timed_samples("transformer", models["transformer"], 5, seed=1)
    assert samples.shape == (5, 1, 8, 8) and secs > 0
    again, _ = timed_samples("transformer", models["transformer"], 5, seed=1)
    assert torch.equal(samples, again)  # seeded
    with pytest.raises(ValueError, match="repeats"):
        sampling_speed("vae", models["vae"], n=8, repeats=0)
    with pytest.raises(ValueError, match="n must"):
        sampling_speed("vae", models["vae"], n=0)
    with pytest.raises(ValueError, match="family"):
        sampling_speed("flow", models["vae"], n=8)


def test_training_speed_from_summary_history_or_result():
    from genkern.train.trainer import train

    res = train(
        "gan",
        data="digits",
        steps=12,
        batch_size=16,
        model={"hidden": 32},
        progress=False,
        eval_every=10**6,
        log_every=4,
    )
    steps_per_s = training_speed(res.summary)
    assert steps_per_s == pytest.approx(1e3 / res.summary["median_step_ms"])
    assert training_speed(res) == steps_per_s
    assert training_speed(res.history) == steps_per_s  # 3 windows: the same median
    assert training_speed([{"step": 1, "step_ms": 4.0}, {"step": 2, "step_ms": 2.0}, {"step": 3}]) == 250.0
    with pytest.raises(ValueError, match="step_ms"):
        training_speed([{"step": 1}])
    with pytest.raises(TypeError, match="run"):
        training_speed(3.0)
