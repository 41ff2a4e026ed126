"""One way in for data: ``--calib`` and ``validate --data`` both load through :func:`load_data`.

Why one loader: calibration and validation must see the same tensors from the same files. With two call sites each
building its own preprocessing, ``--mean/--std/--layout`` reached validation only, and an image-folder calibration
silently got the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxprune.data import sources, tokens
from onnxprune.data.sources import Dataset, Preprocess
from onnxprune.errors import ConfigError
from onnxprune.graph.io import LoadedModel

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class DataOptions:
    """Where samples come from and how they are prepared.

    Attributes:
        path: an ``.npz`` (one array per model input name, first axis = samples) or a folder with one subfolder of
            images per class; None generates random inputs from the model's input specs.
        labels: the labels array's name in an ``.npz``.
        limit: at most this many samples (generated data: exactly this many).
        batch_size: samples per batch; generated data has at least one batch. None: 1.
        seed: seed for generated inputs.
        preprocess: how image-folder files become tensors (ignored for ``.npz`` and generated data).
    """

    path: str | None = None
    labels: str = "labels"
    limit: int | None = None
    batch_size: int | None = None
    seed: int = 0
    preprocess: Preprocess = field(default_factory=Preprocess)


def load_data(model: LoadedModel, options: DataOptions, input_shapes: dict[str, list[int]] | None) -> Dataset:
    """The samples for ``model`` (npz, image folder or generated), checked against its inputs.

    Args:
        input_shapes: ``--input-shape`` values fixing dynamic dims (checked against the model).

    Raises:
        ConfigError: a path that is neither an ``.npz`` nor a folder; unusable preprocessing options.
        DataError: data that does not match the model's inputs or is not finite.
    """
    specs = sources.resolve_specs(sources.input_specs(model.proto), input_shapes)
    if not options.path:
        data = sources.generate(specs, options.batch_size or 1, options.limit, options.seed)
        rules = tokens.token_rules(model.proto)
        if rules:  # integers in [0, 10) are not valid ids for every table, nor a mask
            data.inputs = tokens.valid_tokens(rules, data.inputs, options.seed)
            data.notes.append(f"token inputs: {', '.join(sorted(rules))} (ids within their embedding, masks all ones)")
        return data
    path = Path(options.path)
    if path.is_dir():
        return sources.load_image_folder(path, specs, options.preprocess, options.limit)
    if path.suffix.lower() == ".npz":
        data = sources.load_npz(path, specs, options.labels, options.limit)
        tokens.check_tokens(data.inputs, model.proto, str(path))  # integer inputs are used as given: check them
        return data
    raise ConfigError(f"{path}: expected an .npz file or a folder of class subfolders with images")


def load_feeds(model: LoadedModel, options: DataOptions, input_shapes: dict[str, list[int]] | None) -> list[Feed]:
    """The inputs of :func:`load_data` cut into batches of ``options.batch_size`` (labels dropped): calibration."""
    data = load_data(model, options, input_shapes)
    return [feed for feed, _ in data.batches(options.batch_size or 1)]
