"""FID: the digits classifier extractor, its cache, reference-statistics caching, FID sanity, offline Inception."""

import copy
import dataclasses

import pytest
import torch

from oms_lightning import metrics
from oms_lightning.errors import UserError
from oms_lightning.metrics import extractors
from oms_lightning.metrics import (CLASSIFIER_FORMAT, DigitsClassifierExtractor, FIDEvaluator, FIDResult,
                                   InceptionExtractor, default_extractor_for, feature_extractor,
                                   load_or_train_digits_classifier)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fid_cache")


@pytest.fixture(scope="module")
def classifier(cache_dir):
    """Trained once per session (~6 s on one CPU thread) and cached in the module's tmp cache dir."""
    return load_or_train_digits_classifier(cache_dir)


@pytest.fixture(scope="module")
def evaluator(classifier, digits, cache_dir):
    return FIDEvaluator("digits_classifier", digits, cache_dir, "cpu")


def test_classifier_reaches_held_out_accuracy(classifier, cache_dir):
    model, accuracy = classifier
    assert accuracy >= 0.95
    assert isinstance(model, DigitsClassifierExtractor) and not model.training
    saved = torch.load(cache_dir / "fid_classifier.pt", weights_only=True)
    assert saved["format"] == CLASSIFIER_FORMAT and saved["accuracy"] == pytest.approx(accuracy)
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    assert model(x).shape == (5, model.num_features) and model(x).dtype == torch.float64


def test_features_are_pre_relu_with_no_dead_dimension(classifier, digits):
    """forward taps the feature Linear before its ReLU: every one of the 128 dims varies on real digits,
    some take negative values, and the logits are the head applied to exactly these features."""
    model = classifier[0]
    train = digits.real_images("train")
    with torch.no_grad():
        features = model(train)
        logits = model.logits(train)
    assert features.shape == (train.shape[0], 128) == (1617, model.num_features)
    std = features.std(dim=0)
    assert (std > 0).all(), f"{int((std == 0).sum())} dead feature dimensions"
    assert (features < 0).any()
    assert torch.allclose(logits, model.head(features.float()), atol=1e-5)


def test_classifier_cache_is_reused_without_training(classifier, cache_dir, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been loaded, not retrained")

    monkeypatch.setattr(extractors, "train_digits_classifier", no_training)
    model, accuracy = load_or_train_digits_classifier(cache_dir)
    assert accuracy == pytest.approx(classifier[1])
    for key, value in classifier[0].state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    assert isinstance(feature_extractor("digits_classifier", cache_dir), DigitsClassifierExtractor)


@pytest.mark.parametrize("content", ["foreign", "wrong_weights"])
def test_someone_elses_classifier_file_is_a_user_error(tmp_path, monkeypatch, content):
    path = tmp_path / "fid_classifier.pt"
    if content == "foreign":
        torch.save({"state_dict": {}, "accuracy": 1.0}, path)
    else:
        torch.save({"format": CLASSIFIER_FORMAT, "state_dict": {"x": torch.zeros(1)}, "accuracy": 1.0}, path)
    monkeypatch.setattr(extractors, "train_digits_classifier",
                        lambda *a, **k: pytest.fail("a file that is not our cache must not be replaced"))
    with pytest.raises(UserError, match="delete"):
        load_or_train_digits_classifier(tmp_path)


@pytest.mark.parametrize("content", ["truncated", "old_v1"])
def test_our_own_stale_classifier_cache_is_rebuilt(tmp_path, monkeypatch, classifier, content):
    path = tmp_path / "fid_classifier.pt"
    if content == "truncated":                       # a kill while it was written (before atomic writes)
        path.write_bytes(b"PK\x03\x04 truncated zip")
    else:                                            # post-ReLU features: its numbers are not comparable
        state = {k: v.clone() for k, v in DigitsClassifierExtractor().state_dict().items()}
        torch.save({"format": "oms-lightning/fid-classifier-v1", "state_dict": state, "accuracy": 0.97}, path)
    monkeypatch.setattr(extractors, "train_digits_classifier", lambda *a, **k: classifier)
    with pytest.warns(UserWarning, match="training it again"):
        model, accuracy = load_or_train_digits_classifier(tmp_path)
    assert accuracy == classifier[1] and torch.load(path, weights_only=True)["format"] == CLASSIFIER_FORMAT


def test_fid_of_real_images_is_small_and_zero_against_itself(evaluator, digits):
    scale = float(evaluator.ref_cov.trace())            # total feature variance
    train, val = digits.real_images("train"), digits.real_images("val")
    self_fid = evaluator.fid(train, seed=0).value
    val_fid = evaluator.fid(val, seed=0).value
    noisy_fid = evaluator.fid(train + 0.3 * torch.randn(train.shape, generator=torch.Generator().manual_seed(0)),
                              seed=0).value
    assert abs(self_fid) < 1e-3 * scale
    assert 0 < val_fid < 0.1 * scale and val_fid < noisy_fid


def test_fid_grows_with_noise(evaluator, digits):
    train = digits.real_images("train")
    noise = torch.randn(train.shape, generator=torch.Generator().manual_seed(1))
    values = [evaluator.fid(train + std * noise, seed=0).value for std in (0.0, 0.1, 0.3, 0.6)]
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_fid_result_records_extractor_n_and_seed(evaluator, digits):
    val = digits.real_images("val")
    result = evaluator.fid(val[:50], seed=7)
    assert isinstance(result, FIDResult)
    assert (result.extractor, result.n, result.seed) == ("digits_classifier", 50, 7)
    assert result.to_dict() == {"value": result.value, "extractor": "digits_classifier", "n": 50, "seed": 7}
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.value = 0.0
    assert evaluator.fid(val[:50], seed=7).value == pytest.approx(result.value)   # fake state is reset


def test_too_few_or_malformed_images_are_user_errors(evaluator, digits, classifier, tmp_path):
    val = digits.real_images("val")
    with pytest.raises(UserError, match="at least 2"):
        evaluator.fid(val[:1], seed=0)
    with pytest.raises(UserError, match="NaN"):
        evaluator.fid(torch.full((4, 1, 8, 8), float("nan")), seed=0)
    with pytest.raises(UserError, match="inception"):
        evaluator.fid(torch.zeros(4, 3, 32, 32), seed=0)
    with pytest.raises(UserError, match="at least 2 real"):
        FIDEvaluator("digits_classifier", val[:1], tmp_path, extractor=classifier[0])
    with pytest.raises(UserError, match="unknown FID feature extractor"):
        FIDEvaluator("clip", val, tmp_path, extractor=classifier[0])


def test_reference_stats_are_cached_and_invalidated_by_fingerprint(classifier, digits, tmp_path, monkeypatch):
    model = classifier[0]
    train = digits.real_images("train")
    first = FIDEvaluator("digits_classifier", train, tmp_path, extractor=model)
    path = tmp_path / "fid_ref_digits_classifier_train.pt"
    assert path.is_file() and not first.reference_from_cache and first.ref_n == 1617

    compute = FIDEvaluator._compute_reference
    monkeypatch.setattr(FIDEvaluator, "_compute_reference",
                        lambda self, real: pytest.fail("matching fingerprint: stats should come from the cache"))
    again = FIDEvaluator("digits_classifier", train, tmp_path, extractor=model)
    assert again.reference_from_cache and torch.equal(again.ref_cov, first.ref_cov)
    assert again.fid(train, seed=0).value == pytest.approx(first.fid(train, seed=0).value, abs=1e-9)

    monkeypatch.setattr(FIDEvaluator, "_compute_reference", compute)
    fewer = FIDEvaluator("digits_classifier", train[:1000], tmp_path, extractor=model)   # other image count
    assert not fewer.reference_from_cache and fewer.ref_n == 1000
    assert torch.load(path, weights_only=True)["fingerprint"]["num_images"] == 1000

    other = copy.deepcopy(model)                                                        # other weights
    with torch.no_grad():
        other.body[-1].bias.add_(0.01)                   # the feature Linear layer
    changed = FIDEvaluator("digits_classifier", train[:1000], tmp_path, extractor=other)
    assert not changed.reference_from_cache
    assert not torch.equal(changed.ref_mean, fewer.ref_mean)

    assert first.fingerprint["features"] == "pre_relu_128"

    stale = torch.load(path, weights_only=True)                                          # a v1 cache
    torch.save({**stale, "format": "oms-lightning/fid-reference-v1"}, path)
    with pytest.warns(UserWarning, match="fid-reference-v1"):
        assert not FIDEvaluator("digits_classifier", train[:1000], tmp_path, extractor=other).reference_from_cache
    assert metrics.REFERENCE_FORMAT.endswith("-v2")
    stale["fingerprint"] = {**stale["fingerprint"], "features": "post_relu_128"}        # other feature layer
    torch.save(stale, path)
    assert not FIDEvaluator("digits_classifier", train[:1000], tmp_path, extractor=other).reference_from_cache

    path.write_bytes(b"corrupt")                                                          # unreadable cache
    with pytest.warns(UserWarning, match="recomputing"):
        redone = FIDEvaluator("digits_classifier", train[:1000], tmp_path, extractor=other)
    assert not redone.reference_from_cache and torch.allclose(redone.ref_cov, changed.ref_cov)


def test_inception_offline_is_a_user_error(tmp_path, monkeypatch):
    class MustNotBuild:
        def __init__(self, *args, **kwargs):
            raise AssertionError("the network must not be built (it would download) when weights are missing")

    monkeypatch.setattr(extractors, "_inception_network_class", lambda: MustNotBuild)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))
    with pytest.raises(UserError, match="not available offline") as err:
        InceptionExtractor()
    message = str(err.value)
    assert "torch hub cache" in message and "metrics.inception_weights=PATH" in message
    assert "python -c" in message and metrics.INCEPTION_WEIGHTS_URL in message
    with pytest.raises(UserError, match="not available offline"):
        feature_extractor("inception", tmp_path, weights_path=tmp_path / "missing.pth")
    with pytest.raises(UserError, match="not available offline"):
        FIDEvaluator("inception", torch.zeros(4, 3, 8, 8), tmp_path)


def test_inception_without_torch_fidelity_is_a_user_error(monkeypatch):
    import torchmetrics.utilities.imports as tm_imports

    monkeypatch.setattr(tm_imports, "_TORCH_FIDELITY_AVAILABLE", False)
    with pytest.raises(UserError, match="torch-fidelity"):
        InceptionExtractor()


def test_extractor_names():
    assert default_extractor_for("digits") == "digits_classifier"
    assert default_extractor_for("cifar10") == "inception"
    assert default_extractor_for("image_folder") == "inception"
    with pytest.raises(UserError, match="unknown FID feature extractor"):
        feature_extractor("vgg", "unused")


def test_inception_preprocessing_with_a_stand_in_network(tmp_path, monkeypatch):
    """Grey -> 3 channels, [-1, 1] -> uint8 [0, 255], antialias chosen explicitly; no real weights needed."""
    seen = {}

    class StandIn(torch.nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path, antialias):
            super().__init__()
            seen.update(features=features_list, path=feature_extractor_weights_path, antialias=antialias)

        def forward(self, x):
            seen["input"] = x
            return x.float().mean(dim=(1, 2, 3), keepdim=False)[:, None].expand(-1, 2048)

    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"")
    monkeypatch.setattr(extractors, "_inception_network_class", lambda: StandIn)
    extractor = feature_extractor("inception", tmp_path, weights_path=weights)
    features = extractor(torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1).expand(2, 1, 8, 8))
    assert seen["features"] == ["2048"] and seen["path"] == str(weights) and seen["antialias"] is False
    assert seen["input"].dtype == torch.uint8 and seen["input"].shape == (2, 3, 8, 8)
    assert seen["input"].amin().item() == 0 and seen["input"].amax().item() == 255
    assert features.shape == (2, 2048) and features.dtype == torch.float64
