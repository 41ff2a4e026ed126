"""Data sources for calibration and validation: an ``.npz``, a folder of class-labelled images, or generated inputs.

Why one module: every source ends as the same :class:`Dataset` (one array per model input, first axis = samples,
optional labels), checked against the model's input specs up front, so a mismatch is a clear :class:`DataError`
(exit 7) instead of an onnxruntime shape error in the middle of a run. The same check refuses data that cannot give a
meaningful result: no samples, a 0-d array, NaN or inf (which would turn every score and fit computed from the data
into NaN).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from onnxprune.errors import ConfigError, DataError
from onnxprune.finite import first_nonfinite, require_finite

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
GENERATED_SAMPLES = 32  # samples generated when no --data and no --limit is given


@dataclass(frozen=True)
class InputSpec:
    """One graph input that is not an initializer: name, numpy dtype, dims (int, or str/None when dynamic)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    def describe(self) -> str:
        dims = ["?" if d is None else str(d) for d in self.shape]
        return f"{self.name} [{', '.join(dims)}] {self.dtype}"


@dataclass
class Preprocess:
    """Image-folder preprocessing; ``None`` fields are derived from the model's input shape."""

    resize: int | None = None  # shorter side, before the center crop
    center_crop: int | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1 / 255
    layout: str | None = None  # "NCHW" / "NHWC"


@dataclass
class Dataset:
    """Model inputs (one array per input name, first axis = samples) and optional integer labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = "generated"
    class_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0

    def batches(self, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """Consecutive batches (the last may be smaller)."""
        for start in range(0, self.num_samples, batch_size):
            stop = start + batch_size
            feed = {name: arr[start:stop] for name, arr in self.inputs.items()}
            yield feed, None if self.labels is None else self.labels[start:stop]


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed (graph inputs that are not initializers)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        ttype = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise DataError(f"input '{value.name}' is not a tensor; only tensor inputs can be fed")
        dims: list[int | str | None] = []
        for dim in ttype.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value > 0:
                dims.append(int(dim.dim_value))
            else:
                dims.append(dim.dim_param or None)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        specs.append(InputSpec(value.name, dtype, tuple(dims)))
    return specs


def batch_dim(specs: list[InputSpec]) -> int | None:
    """The static leading dim shared by the inputs (e.g. 1 for a batch-1 export), or None when it is dynamic."""
    static = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int)}
    return static.pop() if len(static) == 1 else None


def _dim_name(dim: int | str | None) -> str:
    return f"'{dim}'" if isinstance(dim, str) else "?"


def _cast(name: str, arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast within a kind (float64 -> float32, int32 -> int64); refuse float <-> int surprises."""
    if arr.dtype == dtype:
        return arr
    kinds = {arr.dtype.kind, dtype.kind}
    if arr.dtype.kind == dtype.kind or kinds <= {"i", "u"} or (dtype.kind == "f" and arr.dtype.kind in "iub"):
        return arr.astype(dtype)
    raise DataError(f"input '{name}': data has dtype {arr.dtype}, the model expects {dtype}")


def check_against_specs(inputs: dict[str, np.ndarray], specs: list[InputSpec], source: str) -> dict[str, np.ndarray]:
    """Match arrays to model inputs by name, rank and static dims (the first axis is the sample axis); every array
    must have samples and, when it is float, only finite values."""
    missing = [s.name for s in specs if s.name not in inputs]
    if missing:
        raise DataError(f"{source}: no array for model input(s) {', '.join(missing)}; it has "
                        f"{', '.join(sorted(inputs)) or 'no arrays'} (model inputs: "
                        f"{'; '.join(s.describe() for s in specs)})")
    out: dict[str, np.ndarray] = {}
    counts = set()
    for spec in specs:
        arr = np.asarray(inputs[spec.name])
        if arr.ndim == 0:
            raise DataError(f"{source}: array '{spec.name}' is a 0-d scalar; it needs a first axis of samples "
                            f"(the model expects {spec.describe()})")
        if arr.ndim != len(spec.shape):
            raise DataError(f"{source}: array '{spec.name}' has shape {list(arr.shape)} (rank {arr.ndim}); the model "
                            f"expects rank {len(spec.shape)}: {spec.describe()} (first axis = samples)")
        for axis, (have, want) in enumerate(zip(arr.shape[1:], spec.shape[1:]), start=1):
            if isinstance(want, int) and have != want:
                raise DataError(f"{source}: array '{spec.name}' has shape {list(arr.shape)}; the model expects "
                                f"{spec.describe()} (axis {axis}: {have} != {want})")
        if arr.shape[0] == 0:
            raise DataError(f"{source}: array '{spec.name}' has no samples (shape {list(arr.shape)})")
        require_finite(arr, f"{source}: array '{spec.name}'", DataError, "sample")
        with np.errstate(over="ignore"):
            out[spec.name] = _cast(spec.name, arr, spec.dtype)
        if out[spec.name] is not arr:  # float64 values beyond float32's range become inf
            require_finite(out[spec.name], f"{source}: array '{spec.name}' cast to {spec.dtype}", DataError, "sample")
        counts.add(arr.shape[0])
    if len(counts) > 1:
        raise DataError(f"{source}: inputs have different sample counts {sorted(counts)}")
    return out


def _labels(arr: np.ndarray, n: int, source: str, key: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1 or len(arr) != n:
        raise DataError(f"{source}: labels '{key}' must be one class index per sample, shape [{n}]; "
                        f"got {list(arr.shape)}")
    require_finite(arr, f"{source}: labels '{key}'", DataError, "sample")
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise DataError(f"{source}: labels '{key}' must be integer class indices, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        first = int(np.argmax(arr < 0))
        raise DataError(f"{source}: labels '{key}' has {arr[first]} at sample {first}; class indices start at 0")
    return arr.astype(np.int64)


def load_npz(path: Path, specs: list[InputSpec], labels_key: str = "labels", limit: int | None = None) -> Dataset:
    """One array per model input name plus an optional labels array."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    if limit is not None:  # a 0-d array has no samples to limit: check_against_specs reports it
        arrays = {key: arr[:limit] if arr.ndim else arr for key, arr in arrays.items()}
    inputs = check_against_specs({k: v for k, v in arrays.items() if k != labels_key or k in {s.name for s in specs}},
                                 specs, str(path))
    n = len(next(iter(inputs.values())))
    labels = _labels(arrays[labels_key], n, str(path), labels_key) if labels_key in arrays else None
    extra = sorted(set(arrays) - set(inputs) - {labels_key})
    notes = [f"ignored arrays not named after a model input: {', '.join(extra)}"] if extra else []
    return Dataset(inputs, labels, source=str(path), notes=notes)


def _image_geometry(spec: InputSpec, pre: Preprocess) -> tuple[str, int, int | None, int | None]:
    """Layout, channels and target height/width of a 4-D image input."""
    if len(spec.shape) != 4:
        raise DataError(f"an image folder needs a 4-D image input; the model has {spec.describe()}")
    layout = pre.layout
    if layout is None:
        if spec.shape[1] in (1, 3):
            layout = "NCHW"
        elif spec.shape[3] in (1, 3):
            layout = "NHWC"
        else:
            raise ConfigError(f"cannot tell the image layout of {spec.describe()}; pass --layout NCHW or NHWC")
    if layout == "NCHW":
        c, h, w = spec.shape[1], spec.shape[2], spec.shape[3]
    else:
        h, w, c = spec.shape[1], spec.shape[2], spec.shape[3]
    if not isinstance(c, int) or c not in (1, 3):
        raise DataError(f"image input must have 1 or 3 channels in {layout} layout; the model has {spec.describe()}")
    return layout, c, h if isinstance(h, int) else None, w if isinstance(w, int) else None


def load_image_folder(path: Path, specs: list[InputSpec], pre: Preprocess, limit: int | None = None) -> Dataset:
    """``path/<class>/<image>``: classes are the sorted subfolder names (label = index)."""
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError("reading an image folder needs Pillow: pip install 'onnxprune[images]' "
                          "(or pip install pillow)") from None
    if len(specs) != 1:
        raise DataError(f"an image folder can feed a model with one input; this model has {len(specs)}: "
                        f"{'; '.join(s.describe() for s in specs)} (use an .npz)")
    spec = specs[0]
    layout, channels, height, width = _image_geometry(spec, pre)
    crop = pre.center_crop
    if height is None or width is None:
        if crop is None:
            raise ConfigError(f"input {spec.describe()} has dynamic height/width; pass --center-crop N "
                              "or --input-shape to fix the image size")
        height = width = crop
    elif crop is not None and (crop, crop) != (height, width):
        raise DataError(f"--center-crop {crop} does not match the model's image size {height}x{width}")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [(f, label) for label, cls in enumerate(classes)
             for f in sorted((path / cls).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"{path}: no images found; expected one subfolder per class with image files "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    if limit is not None:
        # keep classes balanced-ish under --limit: interleave classes instead of taking the first folder only
        rng = np.random.default_rng(0)
        files = [files[i] for i in sorted(rng.permutation(len(files))[:limit])]
    mean = np.asarray(pre.mean, dtype=np.float32)
    std = np.asarray(pre.std, dtype=np.float32)
    for name, vec in (("--mean", mean), ("--std", std)):
        if vec.size not in (1, channels):
            raise ConfigError(f"{name} has {vec.size} values; the model's images have {channels} channel(s)")
    if not np.all(std != 0) or first_nonfinite(np.concatenate([mean, std])) is not None:
        raise ConfigError(f"--mean and --std must be finite and --std non-zero (got --mean {list(pre.mean)}, "
                          f"--std {list(pre.std)})")
    images = np.empty((len(files), height, width, channels), dtype=np.float32)
    for i, (file, _) in enumerate(files):
        try:
            with Image.open(file) as img:
                img = img.convert("L" if channels == 1 else "RGB")
                img = _resize_crop(img, pre.resize, height, width)
                arr = np.asarray(img, dtype=np.float32)
        except OSError as exc:
            raise DataError(f"{file}: cannot decode image ({exc})") from None
        images[i] = arr.reshape(height, width, channels)
    images = (images * pre.scale - mean) / std
    if layout == "NCHW":
        images = images.transpose(0, 3, 1, 2)
    inputs = check_against_specs({spec.name: np.ascontiguousarray(images)}, specs, str(path))
    labels = np.asarray([label for _, label in files], dtype=np.int64)
    return Dataset(inputs, labels, source=str(path), class_names=classes,
                   notes=[f"{len(classes)} classes from subfolders, layout {layout}"])


def _resize_crop(img, resize: int | None, height: int, width: int):
    """Resize the shorter side to ``resize`` (or straight to the target when not given), then center-crop."""
    from PIL import Image

    if resize is None:
        return img.resize((width, height), Image.BILINEAR)
    w, h = img.size
    ratio = resize / min(w, h)
    img = img.resize((max(width, round(w * ratio)), max(height, round(h * ratio))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - width) // 2, (h - height) // 2
    return img.crop((left, top, left + width, top + height))


def resolve_specs(specs: list[InputSpec], input_shapes: dict[str, list[int]] | None) -> list[InputSpec]:
    """Apply ``--input-shape`` to the specs (checked against rank and static dims)."""
    input_shapes = input_shapes or {}
    unknown = sorted(set(input_shapes) - {s.name for s in specs})
    if unknown:
        raise ConfigError(f"--input-shape names unknown input(s) {', '.join(unknown)}; model inputs: "
                          f"{', '.join(s.name for s in specs)}")
    out = []
    for spec in specs:
        dims = input_shapes.get(spec.name)
        if dims is None:
            out.append(spec)
            continue
        given = f"--input-shape {spec.name}:{'x'.join(map(str, dims))}"
        if len(dims) != len(spec.shape):
            raise DataError(f"{given} has rank {len(dims)}; the model expects {spec.describe()}")
        for axis, (have, want) in enumerate(zip(dims, spec.shape)):
            if isinstance(want, int) and have != want:
                raise DataError(f"{given}: axis {axis} is {have}, the model fixes it to {want}")
        # the leading (sample) axis stays as the model has it: batches are cut by --batch-size
        out.append(InputSpec(spec.name, spec.dtype, (spec.shape[0], *dims[1:]) if dims else ()))
    return out


def generate(specs: list[InputSpec], batch_size: int, num_samples: int | None = None, seed: int = 0) -> Dataset:
    """Random dtype-correct inputs: latency, agreement and size need no labelled data.

    The first (sample) axis is ``num_samples``; every other dim must be static (after :func:`resolve_specs`).
    """
    n = num_samples if num_samples is not None else max(GENERATED_SAMPLES, batch_size)
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in specs:
        for axis, dim in enumerate(spec.shape[1:], start=1):
            if not isinstance(dim, int):
                example = "x".join(str(d) if isinstance(d, int) else "N" for d in spec.shape)
                raise ConfigError(f"input '{spec.name}' has dynamic dim {_dim_name(dim)} at axis {axis} "
                                  f"({spec.describe()}); pass --input-shape {spec.name}:{example} with each N "
                                  "replaced by the size you want, or give --data")
        shape = [n, *spec.shape[1:]] if spec.shape else []
        if spec.dtype.kind == "f":
            arr = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            arr = rng.integers(0, 2, shape).astype(bool)
        elif spec.dtype.kind in "iu":
            arr = rng.integers(0, 10, shape).astype(spec.dtype)
        else:
            raise DataError(f"cannot generate data for input {spec.describe()}; give --data")
        inputs[spec.name] = arr
    return Dataset(inputs, None, source="generated",
                   notes=[f"{n} random samples (seed {seed}; floats ~ N(0,1), integers in [0, 10))"])
