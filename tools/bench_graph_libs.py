#!/usr/bin/env python
"""Which graph library should hold the live graph (issue 13, point 3)? Time and peak memory of onnx (protobuf, as
this tool uses it), onnx-graphsurgeon and onnx-ir, measured side by side in one run.

For a ResNet-shaped model with random weights (built here with ``onnx.helper``, no torch; ResNet-50 is ~100 MB), in
an inline and an external-data variant:

* ``round trip``: load, no edits, save. ``onnx``: ``onnx.load`` + ``onnx.save``; ``onnxprune``: ``graph.io.load_model``
  + ``GraphIndex`` (with shape inference) + ``save_model(check=False)``, which fsyncs what it writes (the others do
  not; ``onnxprune, no fsync`` is the same with ``os.fsync`` a no-op); ``onnx-graphsurgeon``: ``onnx.load`` +
  ``gs.import_onnx`` + ``gs.export_onnx`` + ``onnx.save``; ``onnx-ir``: ``ir.load`` + ``ir.save``.
  ``+edit``: the same with every Conv weight read and written back scaled by 0.5 before the save (what pruning does;
  ``onnxprune`` streams the new weights of an external-data model to the output as it goes).
* the operations the tool needs, each timed on its own after the load: ``links`` (build producer/consumer links:
  ``GraphIndex(infer=False)``, ``gs.import_onnx``, ``ir.from_proto``), ``lookups`` (producer and consumers of every
  tensor), ``cleanup+sort`` (drop what nothing uses and sort the nodes: ``graph.check.sort_nodes`` plus a scan of
  initializers, ``graph.cleanup().toposort()``, ``RemoveUnusedNodesPass`` + ``TopologicalSortPass``) and
  ``sort shuffled`` (the same sort of a graph whose nodes were shuffled, proto in and proto out, as
  ``check_input_model`` needs it).

Every measurement runs in a fresh subprocess that imports its library first and reports the seconds of the measured
work and its own peak RSS (``VmHWM``); a subprocess that only imports the library gives the RSS subtracted from its
peaks. Libraries are interleaved across repeats; tables show medians and the ratio to ``onnx``.

Usage (from the repository root)::

    python tools/bench_graph_libs.py                     # resnet50, 5 repeats
    python tools/bench_graph_libs.py --repeats 3 --model resnet18
    python tools/bench_graph_libs.py --write-fullsize /tmp/onnxprune_fullsize   # models for bench_tool_speed.py
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve()
LIBS = ("onnx", "onnxprune", "onnxprune, no fsync", "onnx-graphsurgeon", "onnx-ir")
OPS = ("links", "lookups", "cleanup+sort", "sort shuffled")
VARIANTS = ("inline", "external", "inline+edit", "external+edit")
SHAPES = {"resnet18": ("basic", (2, 2, 2, 2), 1), "resnet50": ("bottleneck", (3, 4, 6, 3), 1),
          "resnet50w2": ("bottleneck", (3, 4, 6, 3), 2)}


# ------------------------------------------------------------------------------------------------------ the model
class _Builder:
    """Appends Conv/BatchNormalization/Relu nodes with seeded random weights, in torchvision's layer shapes."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.weights: list[onnx.TensorProto] = []
        self.count = 0

    def _name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}{self.count}"

    def _weight(self, name: str, values: np.ndarray) -> str:
        self.weights.append(numpy_helper.from_array(values.astype(np.float32), name))
        return name

    def conv_bn(self, x: str, cin: int, cout: int, k: int, stride: int, relu: bool = True) -> str:
        conv = self._name("conv")
        w = self.rng.standard_normal((cout, cin, k, k), dtype=np.float32) * np.float32((2.0 / (cin * k * k)) ** 0.5)
        self.nodes.append(helper.make_node("Conv", [x, self._weight(conv + ".weight", w)], [conv + "_out"], conv,
                                           kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4))
        bn = self._name("bn")
        stats = [self.rng.uniform(0.5, 1.5, cout), self.rng.normal(0, 0.1, cout), self.rng.normal(0, 0.1, cout),
                 self.rng.uniform(0.5, 1.5, cout)]
        names = [self._weight(f"{bn}.{p}", v) for p, v in zip(("weight", "bias", "mean", "var"), stats)]
        self.nodes.append(helper.make_node("BatchNormalization", [conv + "_out", *names], [bn + "_out"], bn))
        if not relu:
            return bn + "_out"
        return self.relu(bn + "_out")

    def relu(self, x: str) -> str:
        name = self._name("relu")
        self.nodes.append(helper.make_node("Relu", [x], [name + "_out"], name))
        return name + "_out"

    def add_relu(self, a: str, b: str) -> str:
        name = self._name("add")
        self.nodes.append(helper.make_node("Add", [a, b], [name + "_out"], name))
        return self.relu(name + "_out")


def build_resnet(kind: str = "resnet50", seed: int = 0) -> onnx.ModelProto:
    """A torchvision-shaped ResNet (opset 13, dynamic batch, input 3x224x224) with random weights, without torch."""
    block, layers, widen = SHAPES[kind]
    b = _Builder(seed)
    x = b.conv_bn("input", 3, 64, 7, 2)
    b.nodes.append(helper.make_node("MaxPool", [x], ["pool_out"], "maxpool", kernel_shape=[3, 3], strides=[2, 2],
                                    pads=[1, 1, 1, 1]))
    x, cin = "pool_out", 64
    for stage, repeat in enumerate(layers):
        planes = 64 * 2 ** stage
        for i in range(repeat):
            stride = 2 if stage > 0 and i == 0 else 1
            if block == "basic":
                cout = planes
                y = b.conv_bn(b.conv_bn(x, cin, planes, 3, stride), planes, planes, 3, 1, relu=False)
            else:
                width, cout = planes * widen, planes * 4
                y = b.conv_bn(b.conv_bn(x, cin, width, 1, 1), width, width, 3, stride)
                y = b.conv_bn(y, width, cout, 1, 1, relu=False)
            shortcut = b.conv_bn(x, cin, cout, 1, stride, relu=False) if stride != 1 or cin != cout else x
            x, cin = b.add_relu(y, shortcut), cout
    b.nodes += [helper.make_node("GlobalAveragePool", [x], ["gap_out"], "gap"),
                helper.make_node("Flatten", ["gap_out"], ["flat_out"], "flatten", axis=1),
                helper.make_node("Gemm", ["flat_out", b._weight("fc.weight", b.rng.standard_normal((1000, cin)) * 0.01),
                                          b._weight("fc.bias", np.zeros(1000))], ["output"], "fc", transB=1)]
    graph = helper.make_graph(b.nodes, kind, [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                           ["N", 3, 224, 224])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1000])], b.weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def write_models(folder: Path, kind: str) -> dict[str, Path]:
    """The inline and the external-data variant of ``kind`` in ``folder`` (built once)."""
    paths = {"inline": folder / f"{kind}.onnx", "external": folder / f"{kind}_ext.onnx"}
    if not paths["inline"].exists() or not paths["external"].exists():
        model = build_resnet(kind)
        onnx.save(model, paths["inline"])
        onnx.save(model, paths["external"], save_as_external_data=True, all_tensors_to_one_file=True,
                  location=paths["external"].name + ".data", size_threshold=1024)
    return paths


# ---------------------------------------------------------------------------------------------------- child side
def _peak_rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _save_onnx(model: onnx.ModelProto, src: str, out: str) -> None:
    """``onnx.save``, with the weights in ``<out>.data`` when the input kept them outside."""
    external = os.path.exists(src + ".data")
    onnx.save(model, out, save_as_external_data=external, location=Path(out).name + ".data" if external else None,
              size_threshold=1024)


def _halve(values: np.ndarray) -> np.ndarray:
    return values * np.asarray(0.5, dtype=values.dtype)


def _roundtrip(lib: str, src: str, out: str, edit: bool) -> None:
    if lib == "onnx":
        model = onnx.load(src)
        if edit:
            tensors = {t.name: t for t in model.graph.initializer}
            for node in model.graph.node:
                if node.op_type == "Conv":
                    tensor = tensors[node.input[1]]
                    tensor.CopyFrom(numpy_helper.from_array(_halve(numpy_helper.to_array(tensor)), tensor.name))
        _save_onnx(model, src, out)
    elif lib.startswith("onnxprune"):
        from onnxprune.graph.index import GraphIndex
        from onnxprune.graph.io import load_model, save_model

        if lib != "onnxprune":
            os.fsync = lambda fd: None
        model = load_model(src)
        index = GraphIndex(model)
        if edit:
            model.open_output(Path(out))
            for node in list(model.proto.graph.node):
                if node.op_type == "Conv":
                    index.set_constant(node.input[1], _halve(index.const_value(node.input[1])))
        save_model(model, out, check=False)
    elif lib == "onnx-graphsurgeon":
        import onnx_graphsurgeon as gs

        graph = gs.import_onnx(onnx.load(src))
        if edit:
            for node in graph.nodes:
                if node.op == "Conv":
                    node.inputs[1].values = _halve(node.inputs[1].values)
        _save_onnx(gs.export_onnx(graph), src, out)
    else:
        import onnx_ir as ir

        model = ir.load(src)
        if edit:
            for node in model.graph:
                if node.op_type == "Conv":
                    weight = node.inputs[1]
                    weight.const_value = ir.tensor(_halve(weight.const_value.numpy()), name=weight.name)
        ir.save(model, out, external_data=Path(out).name + ".data" if os.path.exists(src + ".data") else None,
                size_threshold_bytes=1024)


def _shuffled(proto: onnx.ModelProto) -> onnx.ModelProto:
    nodes = list(proto.graph.node)
    random.Random(0).shuffle(nodes)
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    del copy.graph.node[:]
    copy.graph.node.extend(nodes)
    return copy


def _time_steps(steps: list[tuple[str, Callable[[], object]]]) -> dict[str, float]:
    """Seconds of each step, run in order (steps share their state through the caller's dict)."""
    times = {}
    for name, step in steps:
        t = time.perf_counter()
        step()
        times[name] = time.perf_counter() - t
    return times


def _ops_onnx(src: str, with_index: bool) -> dict[str, float]:
    """onnx protobuf: plain dicts (``onnx``) or this tool's live GraphIndex (``onnxprune``); Kahn's sort for both."""
    from onnxprune.graph.check import sort_nodes
    from onnxprune.graph.index import GraphIndex
    from onnxprune.graph.io import load_model

    model = load_model(src)
    graph, shuffled = model.proto.graph, _shuffled(model.proto)
    state: dict = {}

    def links() -> None:
        if with_index:
            index = GraphIndex(model, infer=False)
            state.update(producer=index.producer, consumers=index.consumers, index=index)
            return
        consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        state.update(producer={o: n for n in graph.node for o in n.output}, consumers=consumers)

    def cleanup() -> None:
        if with_index:
            state["index"].drop_unused_initializers()
        else:
            used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
            keep = [w for w in graph.initializer if w.name in used]
            if len(keep) != len(graph.initializer):
                del graph.initializer[:]
                graph.initializer.extend(keep)
        sort_nodes(graph)

    return _time_steps([
        ("links", links),
        ("lookups", lambda: [(state["producer"].get(i), state["consumers"].get(i)) for n in graph.node
                             for i in n.input]),
        ("cleanup+sort", cleanup),
        ("sort shuffled", lambda: sort_nodes(shuffled.graph))])


def _ops_gs(src: str) -> dict[str, float]:
    import onnx_graphsurgeon as gs

    proto = onnx.load(src)
    shuffled = _shuffled(proto)
    state: dict = {}
    return _time_steps([
        ("links", lambda: state.update(graph=gs.import_onnx(proto))),
        ("lookups", lambda: [(v.inputs, v.outputs) for n in state["graph"].nodes for v in n.inputs]),
        ("cleanup+sort", lambda: state["graph"].cleanup().toposort()),
        ("sort shuffled", lambda: gs.export_onnx(gs.import_onnx(shuffled).toposort()))])


def _ops_ir(src: str) -> dict[str, float]:
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

    proto = onnx.load(src)
    shuffled = _shuffled(proto)
    state: dict = {}

    def sort_proto() -> None:
        model = ir.from_proto(shuffled)
        model.graph.sort()
        ir.to_proto(model)

    return _time_steps([
        ("links", lambda: state.update(model=ir.from_proto(proto))),
        ("lookups", lambda: [(v.producer(), v.uses()) for n in state["model"].graph for v in n.inputs if v]),
        ("cleanup+sort", lambda: TopologicalSortPass()(RemoveUnusedNodesPass()(state["model"]).model)),
        ("sort shuffled", sort_proto)])


OPS_OF = {"onnx": lambda src: _ops_onnx(src, False), "onnxprune": lambda src: _ops_onnx(src, True),
          "onnx-graphsurgeon": _ops_gs, "onnx-ir": _ops_ir}


def _import(lib: str) -> None:
    if lib.startswith("onnx-graphsurgeon"):
        import onnx_graphsurgeon  # noqa: F401
    elif lib == "onnx-ir":
        import onnx_ir  # noqa: F401
    else:
        import onnxprune.graph.check  # noqa: F401  (index, io and check: what the onnx rows use)


def child(mode: str, lib: str, args: list[str]) -> None:
    """In the fresh subprocess: ``baseline LIB`` | ``roundtrip LIB SRC OUT EDIT`` | ``ops LIB SRC``."""
    _import(lib)
    result: dict = {}
    t = time.perf_counter()
    if mode == "roundtrip":
        _roundtrip(lib, args[0], args[1], args[2] == "1")
    elif mode == "ops":
        result["ops"] = OPS_OF[lib](args[0])
    result["seconds"] = time.perf_counter() - t
    result["peak"] = _peak_rss()
    print("RESULT " + json.dumps(result))


# --------------------------------------------------------------------------------------------------- parent side
def run_child(mode: str, lib: str, args: list[str], timeout: float) -> dict:
    proc = subprocess.run([sys.executable, str(HERE), "--child", mode, lib, *args], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} {lib} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _table(title: str, rows: dict[str, dict[str, float]], columns: list[str], unit: str, scale: float) -> None:
    print(f"\n{title}\n")
    print("| library | " + " | ".join(f"{c} {unit} | x onnx" for c in columns) + " |")
    print("|---|" + "---|---|" * len(columns))
    for lib, row in rows.items():
        cells = []
        for c in columns:
            value, ref = row.get(c), rows["onnx"].get(c)
            cells += ["-", "-"] if value is None else [f"{value / scale:.{0 if unit == 'MB' else 2}f}",
                                                       f"{value / ref:.2f}" if ref else "-"]
        print(f"| {lib} | " + " | ".join(cells) + " |")


def _size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1], argv[2], argv[3:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet50", choices=sorted(SHAPES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "onnxprune_graph_libs"),
                    help="where the models are built (kept between runs)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per subprocess")
    ap.add_argument("--write-fullsize", metavar="DIR",
                    help="only write resnet18/50/50w2 as DIR/<name>_224.onnx (bench_tool_speed.py's --fullsize-dir)")
    args = ap.parse_args(argv)
    if args.write_fullsize:
        folder = Path(args.write_fullsize)
        folder.mkdir(parents=True, exist_ok=True)
        for kind in SHAPES:
            if not (folder / f"{kind}_224.onnx").exists():
                onnx.save(build_resnet(kind), folder / f"{kind}_224.onnx")
        return 0
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    models = write_models(folder, args.model)
    base = {lib: min(run_child("baseline", lib, [], args.timeout)["peak"] for _ in range(2)) for lib in LIBS}
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_graph_libs_", dir=folder) as td:
        for rep in range(args.repeats):  # libraries interleaved across repeats
            for lib in LIBS:
                for variant in VARIANTS:
                    src = models[variant.split("+")[0]]
                    runs.setdefault((lib, variant), []).append(run_child(
                        "roundtrip", lib, [str(src), str(Path(td) / "out.onnx"), str(int("edit" in variant))],
                        args.timeout))
                    for leftover in Path(td).iterdir():
                        leftover.unlink()
                if lib in OPS_OF:
                    runs.setdefault((lib, "ops"), []).append(run_child("ops", lib, [str(models["inline"])],
                                                                       args.timeout))
            print(f"repeat {rep + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    times = {lib: {v: statistics.median(r["seconds"] for r in runs[(lib, v)]) for v in VARIANTS} for lib in LIBS}
    peaks = {lib: {v: statistics.median(r["peak"] for r in runs[(lib, v)]) - base[lib] for v in VARIANTS}
             for lib in LIBS}
    ops = {lib: {op: statistics.median(r["ops"][op] for r in runs[(lib, "ops")]) * 1000 for op in OPS}
           for lib in OPS_OF}
    print(f"{args.model}: inline {_size(models['inline']) / 1e6:.1f} MB, external {_size(models['external']) / 1e6:.1f}"
          f" MB; {args.repeats} repeats, medians; python {sys.version.split()[0]}, onnx {onnx.__version__}, cpus "
          f"{os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; peak = VmHWM minus the library's import-only "
          f"process ({', '.join(f'{lib} {base[lib] / 1e6:.0f} MB' for lib in LIBS)})")
    _table("Load + round trip (+ edit) + save: seconds", times, list(VARIANTS), "s", 1.0)
    _table("Load + round trip (+ edit) + save: peak RSS - imports", peaks, list(VARIANTS), "MB", 1e6)
    _table("Operations the tool needs (inline model, after the load): milliseconds", ops, list(OPS), "ms", 1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
