"""FID with a pluggable feature extractor, and the other sample metrics every comparison reports.

What lives where:

* `extractors` — the feature extractors (`InceptionExtractor`, `DigitsClassifierExtractor`,
  `FashionClassifierExtractor`), training and loading of the two classifiers, `feature_extractor` /
  `default_extractor_for` (which extractor a data set uses);
* `classifier_cache` — how the classifiers are cached (file, format, stale-cache rebuilds);
* `distances` — pure float64 functions: Fréchet distance maths, KID, pixel-space features, copy rate;
* `fid` — `FIDEvaluator` with its reference-statistics cache, and `fid_evaluator_for` / `search_evaluator_for`;
* `sample_metrics` — `SampleMetrics` (`METRICS`: FID, held-out KID, pixel FD, copy rate) and `sample_metrics_for`.

The names other modules use are re-exported here (`from oms_lightning.metrics import Name`). Tests that stand in
for a function (e.g. `train_digits_classifier`) patch the module that looks it up, `extractors`.
"""

from oms_lightning.metrics.distances import (copy_rate, copy_threshold, frechet_distance, gaussian_stats,
                                             kernel_distance, pixel_features)
from oms_lightning.metrics.extractors import (CLASSIFIER_FORMAT, EXTRACTORS, FASHION_FORMAT, INCEPTION_WEIGHTS_FILE,
                                              INCEPTION_WEIGHTS_URL, DigitsClassifierExtractor,
                                              FashionClassifierExtractor, InceptionExtractor, default_extractor_for,
                                              feature_extractor, inception_weights_file,
                                              load_or_train_digits_classifier, load_or_train_fashion_classifier)
from oms_lightning.metrics.fid import (REFERENCE_FORMAT, FIDEvaluator, FIDResult, fid_evaluator_for,
                                       search_evaluator_for)
from oms_lightning.metrics.sample_metrics import LOWER_IS_BETTER, METRICS, SampleMetrics, sample_metrics_for

__all__ = ["CLASSIFIER_FORMAT", "EXTRACTORS", "FASHION_FORMAT", "INCEPTION_WEIGHTS_FILE", "INCEPTION_WEIGHTS_URL",
           "LOWER_IS_BETTER", "METRICS", "REFERENCE_FORMAT", "DigitsClassifierExtractor", "FIDEvaluator",
           "FIDResult", "FashionClassifierExtractor", "InceptionExtractor", "SampleMetrics", "copy_rate",
           "copy_threshold", "default_extractor_for", "feature_extractor", "fid_evaluator_for", "frechet_distance",
           "gaussian_stats", "inception_weights_file", "kernel_distance", "load_or_train_digits_classifier",
           "load_or_train_fashion_classifier", "pixel_features", "sample_metrics_for", "search_evaluator_for"]
