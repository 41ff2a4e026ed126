"""Model I/O: the one place that reads and writes ONNX files.

Why it is more than ``onnx.load``/``onnx.save``:
- external data is never pulled into memory at load time; tensors are read on demand, so models over 2 GB load in a
  fraction of their size;
- replaced tensors of an external-data model are streamed straight into the output's data file, so pruning never
  holds every tensor twice;
- nothing is ever lost: the input is never touched, and an output appears complete and checked or not at all.

The commit protocol (why this one: a model and its data file are two files, and no file system renames two files at
once, so exactly one rename must decide which pair is current, and every other file must be either unreferenced or
already complete when it happens):
1. The run writes its data to a fresh name, ``<out>.onnxprune-<hex>.data``, and the model to
   ``.<out>.onnxprune-<hex>.tmp``, both in the output's folder, both fsync'ed; the model is checked there
   (onnx's full check and an onnxruntime session) while the previous ``<out>`` and its data are untouched.
2. Renaming the temporary model over ``<out>`` is the commit: before it the previous output is current and intact,
   after it the new one is, complete (its data file already has the name it refers to). The folder is fsync'ed.
3. Only then is the previous output's data file replaced: the run's data file is hard-linked to ``<out>.data``, a
   model referring to that name is committed the same way, and the run's name is dropped. A kill between these
   renames leaves the new output referring to the run's name, which is just as valid (where hard links are not
   supported it stays that way); until the link replaces it, ``<out>.data`` may still hold the previous output's
   data, which no model refers to any more and the next run replaces. (The folder is fsync'ed between the commit
   and that replacement, so a power loss can never pair the previous model with the new data.)
A run killed before the commit (SIGKILL, power loss) leaves only files of the two run patterns, which nobody refers
to; every run that writes into a folder first sweeps such files whose writer is gone (each run holds an advisory
lock on its files while it lives). Errors, Ctrl-C and SIGTERM remove the run's files on the spot.
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so leftovers are never swept there
    fcntl = None

from onnxprune.errors import InputModelError, OutputError

# Protobuf refuses to serialise a message over 2 GiB; stay well under it.
INLINE_LIMIT_BYTES = 1_800_000_000
_COPY_CHUNK = 64 * 1024 * 1024
_STREAM_MIN_BYTES = 1024  # smaller tensors of an external-data output stay inline


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
    _output: Path | None = field(default=None, repr=False)  # the output opened by open_output

    @property
    def fits_in_memory(self) -> bool:
        """Whether the whole model can be one protobuf message, so onnxruntime can run it from memory (recovery,
        --verify); larger external-data models stream their changes out instead."""
        return self.file_size <= INLINE_LIMIT_BYTES

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
        if self._writer is not None and self.external and not self.hold_changes and values.nbytes >= _STREAM_MIN_BYTES:
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
        """Fix the output path early: check it is writable, sweep what killed runs left there and, for external data,
        start streaming to this run's data file."""
        out_path = Path(out_path)
        if self._output == out_path:
            return
        protected = _check_output_path(self, out_path)
        sweep_leftovers(out_path.parent, protected)
        if self.external and self._writer is None:
            self._writer = _DataWriter(out_path)
        self._output = out_path

    def discard_output(self) -> None:
        """Remove the data file an unsaved output was streaming to (any failure or interrupt before the commit).

        Tensors already streamed there cannot be read back, so the model is not usable for another save."""
        if self._writer is not None:
            self._writer.discard()
            self._writer = None
        self._output = None


_MARK = "onnxprune-"
_TEMP_MODEL = re.compile(r"^\.(?P<out>.+)\.onnxprune-[0-9a-f]{8}\.tmp$")
_RUN_DATA = re.compile(r"^(?P<out>.+)\.onnxprune-[0-9a-f]{8}\.data$")
# what the code before the commit protocol left: .<out>.XXXXXXXX.tmp and .<out>.data.XXXXXXXX.tmp (mkstemp names)
_LEGACY_TEMP = re.compile(r"^\..+\.onnx(\.data)?\.[A-Za-z0-9_]{8}\.tmp$")
_PENDING: "weakref.WeakSet[_RunFile]" = weakref.WeakSet()


def _run_token() -> str:
    return _MARK + secrets.token_hex(4)


def _try_lock(fd: int) -> bool:
    """Take an exclusive advisory lock without waiting. The lock lives as long as the process, so a file that cannot
    be locked belongs to a run still going, and one that can was left by a run that died (even by SIGKILL)."""
    if fcntl is None:  # no flock (Windows): every run file is treated as in use and never swept
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


class _RunFile:
    """A file this run creates under a recognisable name, locked while the run lives, removed unless kept."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)  # umask applies
        _try_lock(fd)
        self._file: BinaryIO = os.fdopen(fd, "wb")
        self._size = 0
        self.kept = False
        _PENDING.add(self)

    def append(self, data: bytes | memoryview | np.ndarray, align: bool = True) -> int:
        pad = (-self._size) % 64 if align else 0  # 64-byte aligned tensors map aligned too
        if pad:
            self._file.write(b"\0" * pad)
            self._size += pad
        offset = self._size
        try:
            self._file.write(data)
        except OSError as exc:  # disk full while streaming: the run ends, cleaned up, with an output error
            raise OutputError(f"{self.path.parent}: could not write output ({exc.strerror or exc}); nothing was "
                              "written") from None
        self._size += len(memoryview(data).cast("B"))
        return offset

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        """Flush to disk (fsync) and release the handle (and with it the lock)."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def keep(self) -> None:
        """The file is now part of a committed output: nothing removes it any more."""
        self.kept = True
        _PENDING.discard(self)

    def discard(self) -> None:
        if self.kept:
            return
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)
        _PENDING.discard(self)


class _DataWriter(_RunFile):
    """Appends tensor bytes to the output's data file for this run, ``<out>.onnxprune-<hex>.data``.

    Tensors point at that name from the first byte written, so the file never needs renaming before the commit;
    :func:`save_model` gives it the conventional ``<out>.data`` name afterwards (see the module docstring)."""

    def __init__(self, out_path: Path) -> None:
        self.location = out_path.name + ".data"  # the name it ends with
        self.tmp_location = f"{out_path.name}.{_run_token()}.data"  # the name it is written under
        super().__init__(out_path.parent / self.tmp_location)


@atexit.register
def _discard_pending() -> None:
    """Library callers that open an output and never save it (or a run ended by an exception nobody caught) leave
    nothing behind either."""
    for run_file in list(_PENDING):
        run_file.discard()


def _referenced_locations(model_path: Path) -> set[str] | None:
    """External-data file names a saved model refers to; None when it cannot be read (then nothing is assumed)."""
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # any unreadable file: the caller keeps what it might refer to
        return None
    return {_external_info(t).get("location", "") for t in iter_tensors(proto) if uses_external_data(t)}


def sweep_leftovers(folder: Path, protected: set[Path] = frozenset()) -> list[Path]:
    """Remove what killed runs left in ``folder``: temporary models and data files of this tool's own patterns that no
    running process holds and no committed model refers to. Returns the removed paths.

    Only names this module makes are candidates (``.<out>.onnxprune-<hex>.tmp``, ``<out>.onnxprune-<hex>.data`` and
    the older ``.<out>[.data].XXXXXXXX.tmp``); a run data file survives while ``<out>`` refers to it (a kill between
    the two renames of :func:`save_model` leaves such a valid pair), and ``protected`` files (the input) always do.
    """
    removed = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return removed
    references: dict[str, set[str] | None] = {}
    for name in names:
        path = folder / name
        data = _RUN_DATA.match(name)
        if not (data or _TEMP_MODEL.match(name) or _LEGACY_TEMP.match(name)) or path.resolve() in protected:
            continue
        if data:
            owner = folder / data["out"]
            if owner.is_file():
                if data["out"] not in references:
                    references[data["out"]] = _referenced_locations(owner)
                refs = references[data["out"]]
                if refs is None or name in refs:
                    continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            if _try_lock(fd) and path.is_file():
                path.unlink()
                removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


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


def _protected_paths(model: LoadedModel) -> set[Path]:
    """The input model and its data files: nothing this module does may write over or remove them."""
    protected = set()
    if model.path is not None:
        protected.add(model.path.resolve())
        for tensor in iter_tensors(model.proto):
            if uses_external_data(tensor):
                protected.add((model.base_dir / _external_info(tensor)["location"]).resolve())
    return protected


def _check_output_path(model: LoadedModel, out_path: Path) -> set[Path]:
    """Refuse an output that cannot be written or would replace the input; returns the protected paths."""
    folder = out_path.parent if str(out_path.parent) else Path(".")
    if out_path.is_dir():
        raise OutputError(f"{out_path}: is a directory; give a file name for the output")
    if not folder.is_dir():
        raise OutputError(f"{folder}: output folder does not exist")
    effective = os.access in os.supports_effective_ids
    if not os.access(folder, os.W_OK | os.X_OK, effective_ids=effective):
        raise OutputError(f"{folder}: output folder is not writable")
    protected = _protected_paths(model)
    targets = {out_path.resolve(), (folder / (out_path.name + ".data")).resolve()}
    if targets & protected:
        raise OutputError(f"{out_path}: refusing to write over the input model or its data; choose another output")
    return protected


def save_model(model: LoadedModel, out_path: str | os.PathLike, check: bool = True) -> int:
    """Write ``model`` to ``out_path`` with one commit point and return the bytes written (model plus data file).

    The model goes to a temporary file in the target folder and is checked there; its rename over ``out_path`` is
    the commit. External-data models get ``<out>.data`` beside the output (unchanged tensors are copied from the
    input's data in chunks); the previous output's data file is replaced only after the commit (module docstring).
    With ``check`` the result must pass ``onnx.checker.check_model(full_check=True)`` and load in onnxruntime before
    it takes the final name; callers that changed only weight values (same names, shapes and types) may skip that.
    On any failure or interrupt before the commit, every file this run created is removed and the previous output,
    if any, is untouched.

    Raises:
        OutputError: the folder is unwritable, the path is the input, writing failed, or the result is invalid.
    """
    out_path = Path(out_path)
    model.open_output(out_path)
    writer = model._writer
    folder = out_path.parent
    temp: _RunFile | None = None
    committed = False
    try:
        if writer is not None:
            _stream_remaining_external(model, writer)
            writer.close()
        temp = _write_temp_model(model.proto, out_path)
        if check:
            _check_saved(model, temp.path)
        previous = _previous_data_files(model, out_path)
        os.replace(temp.path, out_path)  # the commit
        committed = True
        temp.keep()
        if writer is not None:
            writer.keep()
        _fsync_folder(folder)
        if writer is not None:
            _settle_data_name(model, writer, out_path)
        for stale in previous - _data_files(model.proto, folder):
            stale.unlink(missing_ok=True)
    except BaseException as exc:
        if not committed:
            if temp is not None:
                temp.discard()
            model.discard_output()
        if isinstance(exc, OSError) and not committed:
            raise OutputError(f"{out_path}: could not write output ({exc.strerror or exc}); nothing was written"
                              ) from None
        if not isinstance(exc, OSError):
            raise
    size = out_path.stat().st_size + sum(p.stat().st_size for p in _data_files(model.proto, folder))
    if writer is not None:
        model.base_dir = folder
        model._writer = None
    model._output = None
    model.path = out_path
    return size


def _write_temp_model(proto: onnx.ModelProto, out_path: Path) -> _RunFile:
    temp = _RunFile(out_path.parent / f".{out_path.name}.{_run_token()}.tmp")
    try:
        temp.append(proto.SerializeToString(), align=False)
        temp.close()
    except BaseException:
        temp.discard()
        raise
    return temp


def _data_files(proto: onnx.ModelProto, folder: Path) -> set[Path]:
    return {folder / _external_info(t)["location"] for t in iter_tensors(proto) if uses_external_data(t)}


def _previous_data_files(model: LoadedModel, out_path: Path) -> set[Path]:
    """The data files of the output being replaced that are this tool's to remove once the new one is committed:
    only the names it gives (``<out>.data``, ``<out>.onnxprune-<hex>.data``), never another model's shared file,
    never the input's."""
    if not out_path.is_file():
        return set()
    ours = {out_path.name + ".data"}
    refs = _referenced_locations(out_path) or set()
    protected = _protected_paths(model)
    return {out_path.parent / name for name in refs
            if (name in ours or (_RUN_DATA.match(name) and _RUN_DATA.match(name)["out"] == out_path.name))
            and (out_path.parent / name).resolve() not in protected}


def _settle_data_name(model: LoadedModel, writer: _DataWriter, out_path: Path) -> None:
    """After the commit, give the data file its conventional name ``<out>.data`` without a moment in which the
    committed model's data is missing: hard-link the run's file to the final name (replacing the previous output's,
    which nothing refers to any more), commit a model that refers to the final name, then drop the run's name.
    Where hard links are not supported the output keeps the run's name, which is just as valid."""
    folder = out_path.parent
    final = folder / writer.location
    link = folder / f".{writer.location}.{_run_token()}.tmp"
    try:
        os.link(writer.path, link)
    except OSError:
        return
    try:
        os.replace(link, final)
        for tensor in iter_tensors(model.proto):
            if uses_external_data(tensor) and _external_info(tensor)["location"] == writer.tmp_location:
                info = _external_info(tensor)
                _set_location(tensor, writer.location, int(info["offset"]), int(info["length"]))
        temp = _write_temp_model(model.proto, out_path)
        os.replace(temp.path, out_path)
        temp.keep()
    except BaseException:
        link.unlink(missing_ok=True)
        for tensor in iter_tensors(model.proto):  # the committed model still refers to the run's name
            if uses_external_data(tensor) and _external_info(tensor)["location"] == writer.location:
                info = _external_info(tensor)
                _set_location(tensor, writer.tmp_location, int(info["offset"]), int(info["length"]))
        raise
    writer.path.unlink(missing_ok=True)
    writer.path = final
    _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    """Make the renames durable: a power loss after this keeps the committed output."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _stream_remaining_external(model: LoadedModel, writer: _DataWriter) -> None:
    """Copy tensors still pointing at the input's data, and inline ones that :meth:`LoadedModel.replace` would have
    streamed (weights re-fitted in memory by recovery), into this run's data file: an external-data input gives an
    external-data output whichever way its weights were changed."""
    initializers = {t.name for t in model.proto.graph.initializer}
    for tensor in iter_tensors(model.proto):
        if uses_external_data(tensor):
            if _external_info(tensor)["location"] != writer.tmp_location:
                raw = model.array(tensor).reshape(-1).view(np.uint8)
                offset = writer.append(raw[:_COPY_CHUNK])
                for start in range(_COPY_CHUNK, raw.size, _COPY_CHUNK):
                    writer.append(raw[start : start + _COPY_CHUNK], align=False)
                _set_location(tensor, writer.tmp_location, offset, raw.size)
        elif tensor.HasField("raw_data") and len(tensor.raw_data) >= (
                _STREAM_MIN_BYTES if tensor.name in initializers else 1024 * 1024):
            raw = tensor.raw_data
            offset = writer.append(raw)
            tensor.ClearField("raw_data")
            _set_location(tensor, writer.tmp_location, offset, len(raw))


def _set_location(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _check_saved(model: LoadedModel, tmp: Path) -> None:
    """Refuse to put a model in place that the two judges of an input refuse (graph/check.py: onnx's full check and
    an onnxruntime session, read from the file so that they find its data file)."""
    from onnxprune.graph.check import model_problem  # check.py builds on this module

    problem = model_problem(model.proto, str(tmp))
    if problem is not None:
        raise OutputError(f"internal error: the result failed its check ({problem}); nothing was written. "
                          "Please report this with the model.")
