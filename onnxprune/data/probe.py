"""Running a model on calibration data and reducing the activations it needs on the fly.

Why a module of its own: scoring and recovery both need intermediate tensors, but never all of them at once. A
:class:`Probe` asks onnxruntime for only the few tensors needed now, from a graph cut down to what they depend on,
batch by batch, and the caller folds each batch into small statistics (per-channel moments, Gram matrices) before
the next one. Every tensor it returns is finite: the data is checked when loaded, so a NaN or inf here is computed by
the model (a NaN weight, or an overflow), and it is an error naming the tensor and sample instead of a NaN statistic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from onnxprune.errors import ConfigError, DataError, InputModelError
from onnxprune.finite import first_nonfinite, require_finite


class Probe:
    """Runs ``proto`` on the calibration batches and returns any intermediate tensors asked for.

    onnxruntime executes every node of a graph whatever outputs are fetched, so each set of fetched tensors gets a
    session over a copy of the graph cut down to the nodes those tensors depend on (an early layer's input costs a
    fraction of a full pass), with the fetched tensors as its outputs (so graph optimisations cannot fuse them
    away). The last few sessions are cached.
    """

    CACHE = 2

    def __init__(self, proto: onnx.ModelProto, tensors: list[str], batches: list[dict[str, np.ndarray]],
                 base_dir: str | Path | None = None, label: str = "input model") -> None:
        self.proto = proto
        self.label = label  # names the model in errors ("pruned model" during recovery)
        self.base_dir = base_dir  # where external-data weights live (a model given as bytes has no folder)
        self.tensors = set(tensors)
        self.batches = batches
        self._sessions: dict[tuple[str, ...], ort.InferenceSession] = {}

    def _session(self, fetch: tuple[str, ...]) -> ort.InferenceSession:
        if fetch in self._sessions:
            self._sessions[fetch] = self._sessions.pop(fetch)  # most recently used last
            return self._sessions[fetch]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.base_dir is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(Path(self.base_dir).resolve()))
        try:
            session = ort.InferenceSession(cut_to(self.proto, list(fetch)).SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises several types
            raise ConfigError(f"cannot run the model for calibration: {str(exc).splitlines()[0]}") from None
        while len(self._sessions) >= self.CACHE:
            self._sessions.pop(next(iter(self._sessions)))
        self._sessions[fetch] = session
        return session

    def close(self) -> None:
        """Drop the cached sessions (each holds the weights and onnxruntime's activation memory)."""
        self._sessions.clear()

    def iterate(self, names: list[str]) -> Iterator[list[np.ndarray]]:
        """For each calibration batch, the values of ``names``."""
        fetch = tuple(dict.fromkeys(n for n in names if n not in self.batches[0])) if self.batches else tuple(names)
        session = self._session(fetch) if fetch else None
        start = 0
        for feed in self.batches:
            values = dict(zip(fetch, session.run(list(fetch), feed))) if session is not None else {}
            for name, value in values.items():
                found = first_nonfinite(value)
                if found is not None:
                    self._refuse(name, found[1], start + (found[0] or 0), feed, start)
            start += len(next(iter(feed.values()))) if feed else 0
            yield [feed[n] if n in feed else values[n] for n in names]

    def _refuse(self, tensor: str, kind: str, sample: int, feed: dict[str, np.ndarray], start: int) -> None:
        """Raise for a non-finite activation, blaming its cause: the batch itself (library callers may pass
        unchecked data), a NaN/inf weight it depends on (InputModelError), else an overflow (DataError). Runs only
        on this error path, so finite runs pay for nothing but the check in :meth:`iterate`."""
        for name, value in feed.items():
            found = first_nonfinite(value)
            if found is not None:
                raise DataError(f"calibration data: input '{name}' has {found[1]} at sample {start + (found[0] or 0)}")
        graph = cut_to(self.proto, [tensor]).graph
        constants = [a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
        for init in [*graph.initializer, *constants]:
            try:
                value = numpy_helper.to_array(init, str(self.base_dir or ""))
            except Exception:  # best effort on the error path: an unreadable weight is not the one to blame
                continue
            require_finite(value, f"{self.label}: weight '{init.name}'", InputModelError, "axis-0 index",
                           f"tensor '{tensor}' computed from it is {kind} at calibration sample {sample}")
        raise DataError(f"{self.label}: tensor '{tensor}' is {kind} at calibration sample {sample} although the data "
                        "and weights are finite (an overflow? check the data's scale)")


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Every name read inside ``node``'s subgraphs (If/Loop/Scan bodies may read outer tensors)."""
    names: set[str] = set()
    for attribute in node.attribute:
        graphs = ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs)
        for graph in graphs:
            for inner in graph.node:
                names.update(inner.input)
                names |= _subgraph_inputs(inner)
    return names


def cut_to(proto: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """A copy of ``proto`` computing only ``outputs`` (its graph outputs), with the nodes and initializers they
    need; every graph input is kept so that the same feeds work."""
    needed = set(outputs)
    nodes = []
    for node in reversed(proto.graph.node):
        if any(o in needed for o in node.output):
            nodes.append(node)
            needed.update(i for i in node.input if i)
            needed |= _subgraph_inputs(node)
    model = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(model, field, getattr(proto, field))
    model.opset_import.extend(proto.opset_import)
    model.functions.extend(proto.functions)
    graph = model.graph
    graph.name = proto.graph.name
    graph.node.extend(reversed(nodes))
    graph.initializer.extend(t for t in proto.graph.initializer if t.name in needed)
    graph.sparse_initializer.extend(t for t in proto.graph.sparse_initializer if t.values.name in needed)
    graph.input.extend(proto.graph.input)
    graph.value_info.extend(v for v in proto.graph.value_info if v.name in needed)
    known = {o.name: o for o in proto.graph.output}
    graph.output.extend(known.get(name, onnx.ValueInfoProto(name=name)) for name in outputs)
    return model


def to_batches(inputs: dict[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(inputs.values())))
    return [{k: v[s : s + batch_size] for k, v in inputs.items()} for s in range(0, n, batch_size)]


def channel_moments(values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Per-index sum, sum of squares and sum of |x| along ``axis`` over every other axis, and the count."""
    moved = np.moveaxis(values.astype(np.float64), axis, 0).reshape(values.shape[axis], -1)
    return moved.sum(1), (moved * moved).sum(1), np.abs(moved).sum(1), moved.shape[1]


class Moments:
    """Running per-channel mean, variance and mean |x| of one tensor axis."""

    def __init__(self) -> None:
        self.s = self.s2 = self.a = None
        self.n = 0

    def add(self, values: np.ndarray, axis: int) -> None:
        s, s2, a, n = channel_moments(values, axis)
        if self.s is None:
            self.s, self.s2, self.a = s, s2, a
        else:
            self.s, self.s2, self.a = self.s + s, self.s2 + s2, self.a + a
        self.n += n

    @property
    def mean(self) -> np.ndarray:
        return self.s / max(self.n, 1)

    @property
    def var(self) -> np.ndarray:
        return np.maximum(self.s2 / max(self.n, 1) - self.mean ** 2, 0.0)

    @property
    def mean_abs(self) -> np.ndarray:
        return self.a / max(self.n, 1)


def collect_moments(proto: onnx.ModelProto, dims: list, batches: list[dict[str, np.ndarray]],
                    chunk: int = 16, base_dir: str | Path | None = None) -> dict:
    """Per-channel :class:`Moments` of each (tensor, axis) in ``dims``, a few tensors per pass over the data."""
    tensors = list(dict.fromkeys(d.tensor for d in dims))
    if not tensors or not batches:
        return {}
    probe = Probe(proto, [t for t in tensors if t not in batches[0]], batches, base_dir)
    result = {d: Moments() for d in dims}
    by_tensor: dict[str, list] = {}
    for d in dims:
        by_tensor.setdefault(d.tensor, []).append(d)
    for start in range(0, len(tensors), chunk):
        names = tensors[start : start + chunk]
        for values in probe.iterate(names):
            for name, value in zip(names, values):
                for d in by_tensor[name]:
                    result[d].add(value, d.axis)
    return result
