"""Optional dependencies: which extra of `pip install 'bigtransfer[...]'` brings each, and one way to import them
that names the extra and the pip command when one is missing (here and, for any module the table knows, in the
CLI's error line).

| extra   | brings                                   | needed by                                                        |
|---------|------------------------------------------|------------------------------------------------------------------|
| train   | tqdm, matplotlib, scikit-learn           | progress bars, plots (finetune, pretrain, evaluate --output,     |
|         |                                          | fewshot --output, demo), the `digits` data set                   |
| hub     | huggingface_hub, tqdm                    | Hub names (google/bit-50) for --model and from_pretrained        |
| onnx    | onnx, onnxruntime, onnxscript            | export --format onnx, export --int8, quantize(), bench's ONNX row |
| track   | tensorboard                              | --report-to tensorboard                                          |
| wds     | webdataset                               | shard, wds:PATTERN brace patterns                                |
| hf      | datasets                                 | hf:PATH data                                                     |
"""

from __future__ import annotations

import importlib
from types import ModuleType

# Top-level module -> the extra that installs it.
EXTRAS = {
    "tqdm": "train", "matplotlib": "train", "sklearn": "train",
    "huggingface_hub": "hub",
    "onnx": "onnx", "onnxruntime": "onnx", "onnxscript": "onnx",
    "tensorboard": "track",
    "webdataset": "wds",
    "datasets": "hf", "pyarrow": "hf",
}
# Import names whose package is called otherwise on PyPI.
PACKAGES = {"sklearn": "scikit-learn"}


def install_hint(module: str) -> str | None:
    """"pip install 'bigtransfer[onnx]'" for a module an extra brings (by its top-level name), else None."""
    extra = EXTRAS.get(module.split(".")[0])
    return None if extra is None else f"pip install 'bigtransfer[{extra}]'"


def require(module: str, purpose: str) -> ModuleType:
    """`importlib.import_module(module)`, or an ImportError saying that `purpose` needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        top = module.split(".")[0]
        package = PACKAGES.get(top, top)
        hint = install_hint(module) or f"pip install {package}"
        raise ImportError(f"{purpose} needs the {package} package: {hint}") from error


def missing_module_message(error: ImportError) -> str | None:
    """For a ModuleNotFoundError of a module an extra brings, a line naming the extra; else None."""
    name = getattr(error, "name", None)
    if not isinstance(error, ModuleNotFoundError) or not name or install_hint(name) is None:
        return None
    top = name.split(".")[0]
    return f"{PACKAGES.get(top, top)} is not installed: {install_hint(name)}"
