"""Model I/O: the one place that reads and writes ONNX files.

Why it is more than ``onnx.load``/``onnx.save``:
- external data is never pulled into memory at load time; tensors are memory-mapped on demand, so models over 2 GB
  load in a fraction of their size;
- replaced tensors of an external-data model are streamed straight into the output's data file, so pruning never
  holds every tensor twice;
- the output is written atomically (temporary files in the target folder, then rename), the input is never touched,
  and the saved model is checked before it is put in place.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from onnxprune.errors import InputModelError, OutputError

# Protobuf refuses to serialise a message over 2 GiB; stay well under it.
INLINE_LIMIT_BYTES = 1_800_000_000
_COPY_CHUNK = 64 * 1024 * 1024


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def uses_external_data(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _iter_graph_tensors(graph: onnx.GraphProto):
    """Every TensorProto of a graph, subgraphs included (initializers, Constant values, sparse parts)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_graph_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _iter_graph_tensors(sub)


def iter_tensors(model: onnx.ModelProto):
    yield from _iter_graph_tensors(model.graph)


@dataclass
class LoadedModel:
    """A model proto whose external data stays on disk until a tensor is asked for.

    Attributes:
        proto: the ModelProto; tensors with external data keep their references to ``base_dir``.
        path: the file it came from (None for models built in memory).
        base_dir: folder that external-data locations are relative to.
        file_size: bytes of the model file plus its external data files.
    """

    proto: onnx.ModelProto
    path: Path | None = None
    base_dir: Path | None = None
    file_size: int = 0
    hold_changes: bool = False  # keep rewritten tensors in memory instead of streaming them (see replace)
    _writer: "_DataWriter | None" = field(default=None, repr=False)
    _external: bool | None = field(default=None, repr=False)

    @property
    def external(self) -> bool:
        """Whether the output keeps weights in a separate data file: the input did, or it would not fit inline."""
        if self._external is None:
            any_external = any(uses_external_data(t) for t in iter_tensors(self.proto))
            self._external = any_external or self.file_size > INLINE_LIMIT_BYTES  # file size: no re-serialising
        return self._external

    def array(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The tensor's values. External data is read with one positioned read into fresh memory, so a caller that
        drops the array gives the memory back (a memory map would keep every page it touched resident)."""
        if not uses_external_data(tensor):
            return numpy_helper.to_array(tensor)
        info = _external_info(tensor)
        location = info["location"]
        if self._writer is not None and location == self._writer.tmp_location:
            self._writer.flush()
            path = self._writer.path
        else:
            path = self.base_dir / location
        offset = int(info.get("offset", 0))
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        count = int(np.prod(tensor.dims, dtype=np.int64))
        values = np.empty(count, dtype=dtype)
        with open(path, "rb") as handle:
            handle.seek(offset)
            if handle.readinto(memoryview(values).cast("B")) != values.nbytes:
                raise InputModelError(f"{path}: external data ends before tensor '{tensor.name}' does")
        return values.reshape(tuple(tensor.dims))

    def replace(self, tensor: onnx.TensorProto, values: np.ndarray) -> None:
        """Give ``tensor`` new values (any shape), keeping its name.

        With an output opened (:meth:`open_output`) on an external-data model, the bytes go straight to the output's
        data file so that memory stays flat, unless ``hold_changes`` is set (recovery must run the model with its
        changes, and onnxruntime reads external data from one folder only); otherwise they are stored inline, and
        saving moves large ones to the data file.
        """
        values = np.ascontiguousarray(values, dtype=onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
        name = tensor.name
        if self._writer is not None and self.external and not self.hold_changes and values.nbytes >= 1024:
            offset = self._writer.append(values.reshape(-1).view(np.uint8))
            tensor.Clear()
            tensor.name = name
            tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
            tensor.dims.extend(values.shape)
            _set_location(tensor, self._writer.tmp_location, offset, values.nbytes)
            return
        tensor.CopyFrom(numpy_helper.from_array(values, name))

    def runnable(self) -> bool:
        """Whether onnxruntime can run the model as it is now: no tensor lives in the output's unfinished data file
        (other external data is read from ``base_dir``)."""
        if self._writer is None:
            return True
        return not any(uses_external_data(t) and _external_info(t)["location"] == self._writer.tmp_location
                       for t in iter_tensors(self.proto))

    def open_output(self, out_path: Path) -> None:
        """Fix the output path early: check it is writable and, for external data, start streaming to it."""
        out_path = Path(out_path)
        _check_output_path(self, out_path)
        if self.external and self._writer is None:
            self._writer = _DataWriter(out_path)


class _DataWriter:
    """Appends tensor bytes to a temporary data file beside the output; renamed into place on save."""

    def __init__(self, out_path: Path) -> None:
        self.location = out_path.name + ".data"
        self.final = out_path.parent / self.location
        fd, tmp = tempfile.mkstemp(prefix=f".{self.location}.", suffix=".tmp", dir=out_path.parent)
        os.chmod(tmp, _file_mode())
        self.path = Path(tmp)
        # While streaming, tensors point at the temporary file's own (unique) name, so they can never be confused
        # with an input data file of the same name; save() rewrites them to the final name.
        self.tmp_location = self.path.name
        self._file: BinaryIO = os.fdopen(fd, "wb")
        self._size = 0

    def append(self, data: bytes | memoryview | np.ndarray, align: bool = True) -> int:
        pad = (-self._size) % 64 if align else 0  # 64-byte aligned tensors map aligned too
        if pad:
            self._file.write(b"\0" * pad)
            self._size += pad
        offset = self._size
        self._file.write(data)
        self._size += len(memoryview(data).cast("B"))
        return offset

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Read an ONNX model without pulling its external data into memory.

    Raises:
        InputModelError: the path is missing, a folder, empty, not ONNX, truncated, or its external data is missing.
    """
    path = Path(path)
    if not path.exists():
        raise InputModelError(f"{path}: no such file")
    if path.is_dir():
        raise InputModelError(f"{path}: is a directory, expected an .onnx file")
    size = path.stat().st_size
    if size == 0:
        raise InputModelError(f"{path}: file is empty")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise InputModelError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    if proto.ir_version <= 0 or not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise InputModelError(f"{path}: not an ONNX model (no graph or no nodes; truncated or another format?)")
    model = LoadedModel(proto=proto, path=path, base_dir=path.parent, file_size=size)
    model.file_size += _check_external_files(model)
    return model


def _check_external_files(model: LoadedModel) -> int:
    """Verify every external-data reference points inside an existing file; return the data files' total size."""
    sizes: dict[str, int] = {}
    for tensor in iter_tensors(model.proto):
        if not uses_external_data(tensor):
            continue
        info = _external_info(tensor)
        location = info.get("location", "")
        target = (model.base_dir / location).resolve()
        if location not in sizes:
            if not location or not target.is_file():
                raise InputModelError(f"{model.path}: external data file '{location}' for tensor "
                                      f"'{tensor.name}' is missing (expected at {target})")
            sizes[location] = target.stat().st_size
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        need = int(info.get("offset", 0)) + int(info.get("length", np.prod(tensor.dims) * dtype.itemsize))
        if need > sizes[location]:
            raise InputModelError(f"{model.path}: external data file '{location}' is truncated: tensor "
                                  f"'{tensor.name}' needs {need} bytes, file has {sizes[location]}")
    return sum(sizes.values())


def from_proto(proto: onnx.ModelProto) -> LoadedModel:
    """Wrap an in-memory model (tests, library callers)."""
    return LoadedModel(proto=proto, file_size=proto.ByteSize())


def default_output_path(path: Path) -> Path:
    """``<stem>.pruned.onnx`` beside the input."""
    return path.with_name(path.stem + ".pruned.onnx")


def _check_output_path(model: LoadedModel, out_path: Path) -> None:
    folder = out_path.parent if str(out_path.parent) else Path(".")
    if out_path.is_dir():
        raise OutputError(f"{out_path}: is a directory; give a file name for the output")
    if not folder.is_dir():
        raise OutputError(f"{folder}: output folder does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{folder}: output folder is not writable")
    protected = set()
    if model.path is not None:
        protected.add(model.path.resolve())
        for tensor in iter_tensors(model.proto):
            if uses_external_data(tensor):
                protected.add((model.base_dir / _external_info(tensor)["location"]).resolve())
    targets = {out_path.resolve(), (folder / (out_path.name + ".data")).resolve()}
    if targets & protected:
        raise OutputError(f"{out_path}: refusing to write over the input model or its data; choose another output")


def save_model(model: LoadedModel, out_path: str | os.PathLike, check: bool = True) -> int:
    """Write ``model`` to ``out_path`` atomically and return the bytes written (model plus data file).

    External-data models get a ``<name>.data`` file beside the output; unchanged tensors are copied from the input's
    data in chunks. With ``check`` the result must pass ``onnx.checker.check_model(full_check=True)`` and load in
    onnxruntime before it replaces anything; callers that changed only weight values (same names, shapes and
    types) may skip that.

    Raises:
        OutputError: the folder is unwritable, the path is the input, writing failed, or the result is invalid.
    """
    out_path = Path(out_path)
    model.open_output(out_path)
    writer = model._writer
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.chmod(tmp_name, _file_mode())
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        proto = model.proto
        if writer is not None:
            _stream_remaining_external(model, writer)
            writer.close()
        data = proto.SerializeToString()
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if writer is not None:
            os.replace(writer.path, writer.final)
            writer.path = writer.final
        if check:
            _check_saved(model, tmp)
        os.replace(tmp, out_path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if writer is not None:
            writer.discard()
        raise OutputError(f"{out_path}: could not write output ({exc.strerror or exc})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        if writer is not None:
            writer.discard()
        raise
    size = out_path.stat().st_size
    if writer is not None:
        size += writer.final.stat().st_size
        model.base_dir = out_path.parent
        model._writer = None
    model.path = out_path
    return size


def _file_mode() -> int:
    """The mode a plainly created file gets (0666 minus the umask): temp files are 0600, outputs should not be."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _stream_remaining_external(model: LoadedModel, writer: _DataWriter) -> None:
    """Copy tensors still pointing at the input's data (and large inline ones) into the output data file, then point
    every streamed tensor at the final data file name."""
    for tensor in iter_tensors(model.proto):
        if uses_external_data(tensor):
            if _external_info(tensor)["location"] != writer.tmp_location:
                raw = model.array(tensor).reshape(-1).view(np.uint8)
                offset = writer.append(raw[:_COPY_CHUNK])
                for start in range(_COPY_CHUNK, raw.size, _COPY_CHUNK):
                    writer.append(raw[start : start + _COPY_CHUNK], align=False)
                _set_location(tensor, writer.tmp_location, offset, raw.size)
        elif tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024 * 1024:
            raw = tensor.raw_data
            offset = writer.append(raw)
            tensor.ClearField("raw_data")
            _set_location(tensor, writer.tmp_location, offset, len(raw))
    for tensor in iter_tensors(model.proto):
        if uses_external_data(tensor):
            info = _external_info(tensor)
            _set_location(tensor, writer.location, int(info["offset"]), int(info["length"]))


def _set_location(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _check_saved(model: LoadedModel, tmp: Path) -> None:
    """Refuse to put a model in place that fails onnx.checker or does not load in onnxruntime.

    onnx's full check cannot type sparse initializers (it reports a type-case mismatch), so models that use them get
    the basic check; every model must then load in onnxruntime.
    """
    import onnxruntime as ort

    full = len(model.proto.graph.sparse_initializer) == 0
    try:
        onnx.checker.check_model(str(tmp), full_check=full)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        ort.InferenceSession(str(tmp), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # checker, shape inference and onnxruntime each raise their own types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise OutputError(f"internal error: the result failed its check ({first}); nothing was written. "
                          "Please report this with the model.") from None
