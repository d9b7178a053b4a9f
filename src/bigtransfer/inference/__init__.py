"""Running a trained model: `speed` (`optimize()`, `prepare_for_training()`), `predict` (a model from any source,
image files -> top-k), `evaluate` (data sets -> reports and features), and `selection` (`DataSelection`, which
images and how they are read). The CLI, the trainer's evaluation and the Python API all run these."""

from .evaluate import evaluate, evaluate_dataset, extract_features, write_features
from .predict import Predictions, load_for_inference, predict, predict_images
from .selection import DataSelection
from .speed import OptimizedModel, fold_weight_standardization, optimize, prepare_for_training

__all__ = [
    "DataSelection",
    "OptimizedModel",
    "Predictions",
    "evaluate",
    "evaluate_dataset",
    "extract_features",
    "fold_weight_standardization",
    "load_for_inference",
    "optimize",
    "predict",
    "predict_images",
    "prepare_for_training",
    "write_features",
]
