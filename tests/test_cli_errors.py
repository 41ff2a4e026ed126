"""Every failure of the CLI is one line `onnxprune: error: ...` with its documented exit code and leaves the folder as
it was: invalid input models (3), click's usage errors and odd option values (2), bad `--json` targets (4), bad
`--input-shape` values (2), SIGTERM (143); on inline models and on the external-data model resnet_dynamo.onnx."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import InputModelError, OutputError, Terminated
from onnxprune.graph.check import check_input_model, short_message
from onnxprune.graph.io import load_model
from onnxprune.report import write_json

from cli_support import assert_one_error, run_main, snapshot

PRUNE_JOBS = [["--channels", "0.3"], ["--sparsity", "0.5"]]


def assert_fails(args: list, code: int, fragments: str | tuple[str, ...], folder: Path, capfd) -> None:
    """The run exits ``code`` with one error line holding the fragment(s) and adds, removes or changes no file."""
    before = snapshot(folder)
    exit_code, _, err = run_main(args, capfd)
    assert exit_code == code, err
    assert_one_error(err, *((fragments,) if isinstance(fragments, str) else fragments))
    assert snapshot(folder) == before


# ---------------------------------------------------------------------------------------------- invalid input models

def _matmul_model(nodes: list[onnx.NodeProto], opsets: dict[str, int] | None = None) -> onnx.ModelProto:
    """x[1, 4] -> y[1, 4] with a 4x4 weight W (so both --channels and --sparsity have something to do)."""
    w = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4) / 16, "W")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v)
                                                    for d, v in (opsets or {"": 13}).items()])
    model.ir_version = 8
    return model


INVALID = {  # name: (model, fragment of the message)
    "cycle": (lambda: _matmul_model([helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
                                     helper.make_node("MatMul", ["a", "W"], ["y"])]), "not acyclic"),
    "undefined_input": (lambda: _matmul_model([helper.make_node("MatMul", ["x", "W"], ["t"]),
                                               helper.make_node("Add", ["t", "nowhere"], ["y"])]), "'nowhere'"),
    "unknown_domain": (lambda: _matmul_model([helper.make_node("MatMul", ["x", "W"], ["t"]),
                                              helper.make_node("Baz", ["t"], ["y"], domain="foo.bar")],
                                             {"": 13, "foo.bar": 1}), "foo.bar:Baz"),
    "opset_40": (lambda: _matmul_model([helper.make_node("MatMul", ["x", "W"], ["t"]),
                                        helper.make_node("Relu", ["t"], ["y"])], {"": 40}), "Opset 40"),
    "output_never_produced": (lambda: _matmul_model([helper.make_node("MatMul", ["x", "W"], ["t"]),
                                                     helper.make_node("Relu", ["t"], ["u"])]), "(y) does not exist"),
}


@pytest.mark.parametrize("job", [*PRUNE_JOBS, ["inspect"], ["validate"]], ids=lambda j: j[-2] if len(j) > 1 else j[0])
@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_input_model_is_exit_3(tmp_path, capfd, case, job):
    build, fragment = INVALID[case]
    path = tmp_path / f"{case}.onnx"
    onnx.save(build(), path)
    if job == ["inspect"]:
        args = ["inspect", path]
    elif job == ["validate"]:
        args = ["validate", path, path, "--runs", "0", "--no-mobile"]
    else:
        args = [path, *job, "--json", tmp_path / "r.json"]
    assert_fails(args, 3, (f"{path}: not a valid ONNX model: ", fragment), tmp_path, capfd)


def _broken_dynamo(model_copy, case: str) -> Path:
    """resnet_dynamo.onnx made invalid, its tensors still in resnet_dynamo.onnx.data beside it."""
    original = model_copy("resnet_dynamo.onnx")
    proto = onnx.load(str(original), load_external_data=False)
    if case == "opset_40":
        proto.opset_import[0].version = 40
    elif case == "unknown_domain":
        proto.graph.node.append(helper.make_node("Baz", [proto.graph.output[0].name], ["extra"], domain="foo.bar"))
        proto.graph.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, None))
        proto.opset_import.append(helper.make_opsetid("foo.bar", 1))
    elif case == "cycle":  # the first node reads the last node's output
        first = proto.graph.node[0]
        first.input[0] = proto.graph.node[-1].output[0]
    path = original.with_name(f"broken_{case}.onnx")
    onnx.save(proto, str(path))
    return path


@pytest.mark.parametrize("job", [*PRUNE_JOBS, ["inspect"]], ids=lambda j: j[0])
@pytest.mark.parametrize("case, fragment", [("opset_40", "Opset 40"), ("unknown_domain", "foo.bar:Baz"),
                                            ("cycle", "not a valid ONNX model")])
def test_invalid_external_data_model_is_exit_3(model_copy, tmp_path, capfd, case, fragment, job):
    path = _broken_dynamo(model_copy, case)
    args = ["inspect", path] if job == ["inspect"] else [path, *job]
    assert_fails(args, 3, (f"{path}: not a valid ONNX model: ", fragment), tmp_path, capfd)


def test_the_valid_external_data_model_passes_the_check(model_copy):
    check_input_model(load_model(model_copy("resnet_dynamo.onnx")))  # the judges find its data beside it


def _contrib_models() -> dict[str, onnx.ModelProto]:
    """Fused-graph ops onnxruntime implements in com.microsoft and onnx's checker has no schema for."""
    rng = np.random.default_rng(0)

    def const(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    def model(node: onnx.NodeProto, inputs: dict[str, list[int]], out: list[int], inits) -> onnx.ModelProto:
        graph = helper.make_graph(
            [node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)], inits)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        proto.ir_version = 8
        return proto

    return {
        "FusedConv": model(helper.make_node("FusedConv", ["x", "W", "B"], ["y"], domain="com.microsoft",
                                            activation="Relu", pads=[1, 1, 1, 1]),
                           {"x": [1, 3, 8, 8]}, [1, 4, 8, 8], [const("W", 4, 3, 3, 3), const("B", 4)]),
        "Attention": model(helper.make_node("Attention", ["x", "W", "B"], ["y"], domain="com.microsoft",
                                            num_heads=2),
                           {"x": [1, 5, 8]}, [1, 5, 8], [const("W", 8, 24), const("B", 24)]),
        "SkipLayerNormalization": model(helper.make_node("SkipLayerNormalization", ["x", "s", "g", "b"], ["y"],
                                                         domain="com.microsoft"),
                                        {"x": [1, 5, 8], "s": [1, 5, 8]}, [1, 5, 8], [const("g", 8), const("b", 8)]),
    }


@pytest.mark.parametrize("op", ["FusedConv", "Attention", "SkipLayerNormalization"])
def test_contrib_ops_of_fused_graphs_stay_accepted(tmp_path, capfd, op):
    path = tmp_path / f"{op}.onnx"
    onnx.save(_contrib_models()[op], path)
    code, out, err = run_main(["inspect", path], capfd)
    assert code == 0, err
    assert err == ""


def test_checker_not_knowing_a_contrib_op_defers_to_onnxruntime(tmp_path, monkeypatch):
    """An onnx checker that has no schema for a com.microsoft op must not reject it (onnxruntime loads it); the same
    objection against a model of ONNX ops only is fatal."""

    def checker(model, full_check=False):
        raise onnx.checker.ValidationError("No Op registered for FusedConv with domain_version of 1")

    monkeypatch.setattr(onnx.checker, "check_model", checker)
    path = tmp_path / "fused.onnx"
    onnx.save(_contrib_models()["FusedConv"], path)
    check_input_model(load_model(path))
    plain = tmp_path / "plain.onnx"
    onnx.save(_matmul_model([helper.make_node("MatMul", ["x", "W"], ["y"])]), plain)
    with pytest.raises(InputModelError, match="No Op registered"):
        check_input_model(load_model(plain))


def test_an_unknown_op_in_a_contrib_domain_is_still_refused(tmp_path):
    proto = _contrib_models()["FusedConv"]
    proto.graph.node[0].op_type = "NoSuchFusedOp"
    path = tmp_path / "bad_contrib.onnx"
    onnx.save(proto, path)
    with pytest.raises(InputModelError, match="NoSuchFusedOp"):
        check_input_model(load_model(path))


def test_short_message_is_one_line_without_cpp_noise():
    raw = ("[ONNXRuntimeError] : 1 : FAIL : Load model from /a/b: c.onnx failed:/onnxruntime_src/core/graph/"
           "graph.cc:1617 void onnxruntime::Graph::Init(const std::string&, int) This is an invalid model. Graph "
           "output (y) does not exist in the graph.\n")
    assert short_message(RuntimeError(raw)) == "Graph output (y) does not exist in the graph."
    assert short_message(ValueError("x" * 1000)).endswith("...") and len(short_message(ValueError("x" * 1000))) == 240


# --------------------------------------------------------------------------------------- usage errors and odd values

@pytest.mark.parametrize("args, fragment", [
    (["{model}", "--chanels", "0.3"], "No such option '--chanels'"),
    (["{model}", "--chanels", "0.3"], "'--channels'"),
    (["{model}", "--chanels", "0.3"], "(try 'onnxprune prune --help')"),
    (["{model}", "--scope", "everywhere", "--channels", "0.3"], "'everywhere' is not one of 'layer', 'global'"),
    (["{model}", "--channels"], "'--channels' requires an argument"),
    (["inspect"], "Missing argument 'MODEL'"),
    (["inspect", "{model}", "--bogus"], "(try 'onnxprune inspect --help')"),
    (["validate", "{model}"], "Missing argument 'PRUNED'"),
    (["validate", "{model}", "{model}", "--layout", "NCWH"], "'NCWH' is not one of"),
    (["{model}", "--pattern", "²:4"], "'²:4' is not N:M"),
    (["{model}", "--pattern", "٣:4"], "'٣:4' is not N:M"),
    (["{model}", "--pattern", "2:4:8"], "is not N:M"),
    (["{model}", "--pattern", "4:2"], "0 < N < M"),
    (["{model}", "--pattern", "2:99999999999999999999"], "is not N:M"),
    (["{model}", "--channels", "0.3", "--input-shape", "input:1x٣x32x32"], "is not NAME:DIMS"),
    (["{model}", "--channels", "0.3", "--input-shape", "input:1x3x32x32", "--input-shape", "input:2x3x32x32"],
     "input input given more than once"),
])
@pytest.mark.parametrize("model", ["resnet_bn.onnx", "resnet_dynamo.onnx"])
def test_usage_errors_are_one_line_exit_2(model_copy, tmp_path, capfd, model, args, fragment):
    path = model_copy(model)
    assert_fails([a.format(model=path) for a in args], 2, fragment, tmp_path, capfd)


def test_unreadable_input_is_exit_3_not_a_usage_error(model_copy, tmp_path, capfd, monkeypatch):
    """Tests run as root, where chmod 000 changes nothing: deny reading the model through os.access (which click.Path
    consulted, making this exit 2) and onnx.load (what a real permission error does)."""
    path = model_copy("resnet_dynamo.onnx")
    real_access = os.access

    def access(target, mode, *args, **kwargs):
        if Path(target) == path and mode & os.R_OK:
            return False
        return real_access(target, mode, *args, **kwargs)

    def load(target, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(target))

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(onnx, "load", load)
    monkeypatch.setattr(onnx, "load_model", load)
    for args in ([path, "--sparsity", "0.5"], ["inspect", path], ["validate", path, path, "--runs", "0"]):
        assert_fails(args, 3, "Permission denied", tmp_path, capfd)


def test_a_multiline_message_is_printed_on_one_line(capfd, monkeypatch, tmp_path):
    import onnxprune.cli.prune_cmd as prune_cmd
    from onnxprune.errors import ConfigError

    def fail(*args, **kwargs):
        raise ConfigError("first part\nsecond part")

    monkeypatch.setattr(prune_cmd, "prune_file", fail)
    assert_fails([tmp_path / "m.onnx", "--sparsity", "0.5"], 2, "first part second part", tmp_path, capfd)


# ------------------------------------------------------------------------------------------------------- --json target

JSON_TARGETS = [("{dir}/missing/r.json", "does not exist"), ("{dir}", "is a directory"),
                ("{model}", "refusing to write the report over the model file"),
                ("{output}", "refusing to write the report over the model file"),
                ("{dir}/resnet_dynamo.onnx.data", "is not a JSON report")]


@pytest.mark.parametrize("command, target, fragment", [
    (command, target, fragment) for command in ("prune", "inspect", "validate") for target, fragment in JSON_TARGETS
    if not (command == "inspect" and target == "{output}")])  # inspect writes no model
@pytest.mark.parametrize("model", ["resnet_bn.onnx", "resnet_dynamo.onnx"])
def test_bad_json_target_fails_before_anything_is_written(model_copy, tmp_path, capfd, model, command, target,
                                                          fragment):
    path = model_copy(model)
    model_copy("resnet_dynamo.onnx")  # its data file is a target that must never be replaced
    output = tmp_path / "out.onnx"
    json_path = target.format(dir=tmp_path, model=path, output=output)
    if command == "prune":
        args = [path, "--sparsity", "0.5", "-o", output, "--json", json_path]
    elif command == "inspect":
        args = ["inspect", path, "--json", json_path]
    else:  # validate protects both models it reads; "output" plays the pruned one
        if target == "{output}":
            output.write_bytes(path.read_bytes())
        args = ["validate", path, output if target == "{output}" else path, "--runs", "0", "--no-mobile",
                "--json", json_path]
    assert_fails(args, 4, fragment, tmp_path, capfd)  # for prune: no out.onnx either


def test_json_is_written_atomically_with_ordinary_permissions(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    write_json({"a": 0}, target)
    write_json({"a": 1}, target)  # an earlier report is replaced
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600
    assert os.listdir(tmp_path) == ["r.json"]

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OutputError, match="No space left on device"):
        write_json({"a": 2}, target)
    assert os.listdir(tmp_path) == ["r.json"] and target.read_text() == '{\n  "a": 1\n}'

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_json({"a": 3}, target)
    assert os.listdir(tmp_path) == ["r.json"]


# ------------------------------------------------------------------------------------------------------ --input-shape

@pytest.mark.parametrize("shape, fragment", [
    ("image:1x3x32x32", "the model has no input 'image'; its inputs are input [batch, 3, 32, 32]"),
    ("input:1x3x32", "has rank 3; the model expects rank 4"),
    ("input:1x3x32x32x1", "has rank 5; the model expects rank 4"),
    ("input:0x3x32x32", "every dim must be between 1 and 2147483647 (got 0)"),
    ("input:1x3x32x99999999999999999999", "(got 99999999999999999999)"),
    ("input:1x3x2000000000x2000000000", "elements is more than any model input can hold"),
    ("input:1x3x64x64", "axis 2 is 64, but the model fixes it to 32"),
    ("input:1x4x32x32", "axis 1 is 4, but the model fixes it to 3"),
])
@pytest.mark.parametrize("model", ["resnet_bn.onnx", "resnet_dynamo.onnx"])
@pytest.mark.parametrize("job", [*PRUNE_JOBS, ["inspect"], ["validate"]], ids=lambda j: j[0])
def test_bad_input_shape_is_exit_2(model_copy, tmp_path, capfd, model, job, shape, fragment):
    path = model_copy(model)
    if job == ["inspect"]:
        args = ["inspect", path]
    elif job == ["validate"]:
        args = ["validate", path, path, "--runs", "0", "--no-mobile"]
    else:
        args = [path, *job]
    assert_fails([*args, "--input-shape", shape], 2, fragment, tmp_path, capfd)


@pytest.mark.parametrize("model", ["resnet_bn.onnx", "resnet_dynamo.onnx"])
def test_a_good_input_shape_is_used(model_copy, tmp_path, capfd, model):
    path = model_copy(model)
    macs = []
    for extra in ([], ["--input-shape", "input:4x3x32x32"]):
        code, _, err = run_main(["inspect", path, "--json", tmp_path / "i.json", *extra], capfd)
        assert code == 0, err
        macs.append(json.loads((tmp_path / "i.json").read_text())["macs"])
    assert macs[1] == 4 * macs[0] > 0  # batch 4 instead of the default 1


# ------------------------------------------------------------------------------------------------------------ SIGTERM

def test_sigterm_handler_unwinds_and_exits_143(tmp_path, capfd, monkeypatch, model_copy):
    """In-process: the run receives SIGTERM mid-prune; the handler raises Terminated (so cleanup runs) and main()
    prints one line and exits 143, leaving no file behind."""
    import onnxprune.pipeline as pipeline

    cleaned = []
    real = pipeline.prune_model

    def prune_then_signal(model, options, **job):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
            return real(model, options, **job)
        except BaseException as exc:
            cleaned.append(type(exc))
            raise

    monkeypatch.setattr(pipeline, "prune_model", prune_then_signal)
    previous = signal.getsignal(signal.SIGTERM)
    path = model_copy("resnet_dynamo.onnx")
    before = sorted(os.listdir(tmp_path))
    code, _, err = run_main([path, "--channels", "0.3"], capfd)
    assert code == 143
    assert err.splitlines() == ["onnxprune: terminated"]
    assert cleaned == [Terminated]
    assert sorted(os.listdir(tmp_path)) == before
    assert signal.getsignal(signal.SIGTERM) == previous  # main() restores the handler it replaced


def test_sigterm_to_a_real_process(tmp_path, model_copy):
    """A real `python -m onnxprune` process killed with SIGTERM while pruning an external-data model (its output
    data file is already open): exit 143, one line, no file left. The run is held at a known point (it prints
    'ready' and sleeps) so the signal never races the interpreter's start-up."""
    path = model_copy("resnet_dynamo.onnx")
    script = textwrap.dedent("""
        import sys, time
        import onnxprune.pipeline as pipeline
        from onnxprune.cli.main import main
        real = pipeline.prune_model
        def held(model, options, **job):
            print("ready", flush=True)
            time.sleep(60)
            return real(model, options, **job)
        pipeline.prune_model = held
        main(sys.argv[1:])
    """)
    before = sorted(os.listdir(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", script, str(path), "--channels", "0.3"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert err.splitlines() == ["onnxprune: terminated"]
    assert sorted(os.listdir(tmp_path)) == before
