"""Checks every zoo file (checker, onnxruntime, detected features) and writes models/MANIFEST.json and
models/README.md."""

from __future__ import annotations

import collections
import json
import os
import sys

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnx.shape_inference
import torch


from zoo_models import MODELS, SEED, TORCH_MODELS, TRANSFORMER

# Files produced by other scripts (checked and listed here if present).
EXTERNAL_MODELS = {
    "keras_cnn.onnx": {
        "source": "Keras 3.15.1 / tensorflow-cpu 2.21.0 -> tf2onnx 1.17.0 (tools/make_tf_zoo.py)",
        "features": ["nhwc_transpose", "residual_add", "depthwise", "global_pool", "linear_head", "bn_as_mul_add"],
        "description": "Keras CNN (Conv2D+BN+ReLU, residual Add, DepthwiseConv2D, GAP, Dense), NHWC input "
                       "Transposed to NCHW; tf2onnx folds BN into Conv except after the depthwise conv, where BN "
                       "remains as a per-channel Mul + Add; Dense is MatMul + Add",
    },
    "nhwc_cnn.onnx": {
        "source": "onnx.helper, unoptimised-TF-exporter style (tools/make_nhwc.py)",
        "features": ["nhwc_transpose", "residual_add", "depthwise", "bn_as_mul_add", "matmul"],
        "description": "NHWC CNN: Transposes around every Conv, residual Add and per-channel Mul/Add in NHWC, "
                       "depthwise Conv, ReduceMean over H,W, MatMul head",
    },
}


# --------------------------------------------------------------------------------------
# check + manifest
# --------------------------------------------------------------------------------------
def dims(vi):
    out = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(d.dim_value)
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append("?")
    return out


def count_params(m):
    n = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
    for node in m.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    n += int(np.prod(a.t.dims))
    return n


def detected_features(m):
    """Structural features found in the graph (used to cross-check the declared ones)."""
    g = m.graph
    const_names = {t.name for t in g.initializer}
    const_names |= {o for n in g.node if n.op_type == "Constant" for o in n.output}
    ops = collections.Counter(n.op_type for n in g.node)
    feats = set()
    for n in g.node:
        if n.op_type == "Conv":
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            if group > 1:
                # depthwise if group == in channels == out channels/multiplier; weight shape [O, I/g, kh, kw]
                w = next((t for t in g.initializer if t.name == n.input[1]), None)
                if w is None:
                    w = next((a.t for c in g.node if c.op_type == "Constant" and c.output[0] == n.input[1]
                              for a in c.attribute if a.name == "value"), None)
                if w is not None and w.dims[1] == 1:
                    feats.add("depthwise")
                else:
                    feats.add("grouped")
        if n.op_type == "Add" and len(n.input) == 2 and not any(i in const_names for i in n.input):
            feats.add("residual_add")
    # channel Concat of float feature maps (not the int64 shape Concats of Reshape targets)
    inferred = onnx.shape_inference.infer_shapes(m)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    if any(n.op_type == "Concat" and types.get(n.output[0]) == onnx.TensorProto.FLOAT for n in g.node):
        feats.add("concat")
    if ops["Split"]:
        feats.add("split")
    if ops["ConvTranspose"]:
        feats.add("conv_transpose")
    if ops["Transpose"] and ops["Conv"]:
        feats.add("nhwc_transpose")
    if ops["Constant"] and not g.initializer:
        feats.add("constant_nodes")
    return feats


def check_model(fname, rng):
    import onnxruntime as ort

    path = os.path.join(MODELS, fname)
    m = onnx.load(path)  # loads external data too
    onnx.checker.check_model(path, full_check=True)  # path form supports external data
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    outs_shapes = {}
    for batch in (1, 2):
        feeds = {}
        for i in sess.get_inputs():
            shp = [batch if not isinstance(d, int) else d for d in i.shape]
            feeds[i.name] = rng.standard_normal(shp).astype(np.float32)
        outs = sess.run(None, feeds)
        for o in outs:
            assert np.all(np.isfinite(o)), f"{fname}: non-finite output"
            assert o.shape[0] == batch, f"{fname}: batch dim not dynamic ({o.shape})"
        outs_shapes[batch] = [list(o.shape) for o in outs]
    return m, outs_shapes


def model_entry(fname, m, source, features, bn_kept, description):
    g = m.graph
    init_names = {t.name for t in g.initializer}
    ops = collections.Counter(n.op_type for n in g.node)
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    raw = onnx.load(os.path.join(MODELS, fname), load_external_data=False)
    ext = sorted({e.value for t in raw.graph.initializer for e in t.external_data if e.key == "location"})
    feats = set(features) | detected_features(m)
    if ext:
        feats.add("external_data")
    return {
        "file": fname,
        "source": source,
        "description": description,
        "producer": f"{m.producer_name} {m.producer_version}".strip(),
        "opset": opset,
        "ir_version": m.ir_version,
        "inputs": [{"name": i.name, "shape": dims(i)} for i in g.input if i.name not in init_names],
        "outputs": [{"name": o.name, "shape": dims(o)} for o in g.output],
        "bn_kept": bn_kept,
        "num_batchnorm": ops.get("BatchNormalization", 0),
        "features": sorted(feats),
        "op_types": dict(sorted(ops.items())),
        "num_nodes": len(g.node),
        "parameters": count_params(m),
        "external_data_files": ext,
        "file_size_bytes": os.path.getsize(os.path.join(MODELS, fname)),
        "external_data_size_bytes": sum(os.path.getsize(os.path.join(MODELS, e)) for e in ext),
    }


def check_and_describe():
    rng = np.random.default_rng(SEED)
    tv = torch.__version__
    entries = []

    def add(fname, source, features, bn_kept, description):
        if not os.path.exists(os.path.join(MODELS, fname)):
            print(f"MISSING {fname}", file=sys.stderr)
            return
        m, outs = check_model(fname, rng)
        e = model_entry(fname, m, source, features, bn_kept, description)
        missing = [f for f in features if f in _STRUCTURAL and f not in detected_features(m)]
        assert not missing, f"{fname}: declared features {missing} not found in graph"
        if bn_kept:
            assert e["num_batchnorm"] > 0, f"{fname}: expected BatchNormalization nodes"
        else:
            assert e["num_batchnorm"] == 0, f"{fname}: expected no BatchNormalization nodes"
        assert "Identity" not in e["op_types"], f"{fname}: unexpected Identity nodes"
        entries.append(e)
        print(f"OK {fname:28s} opset={e['opset']:2d} in={e['inputs'][0]['shape']} out(b=2)={outs[2]} "
              f"params={e['parameters']} size={e['file_size_bytes']}")
        print("    ops:", ", ".join(f"{k}x{v}" for k, v in e["op_types"].items()))

    for name, (_, _, feats, desc) in TORCH_MODELS.items():
        add(f"{name}_bn.onnx", f"PyTorch {tv} torch.onnx.export(dynamo=False, training=PRESERVE)", feats, True, desc)
        add(f"{name}_folded.onnx", f"PyTorch {tv} torch.onnx.export(dynamo=False, training=EVAL)", feats, False,
            desc + " (BN folded into Conv)")
    tname, _, _, tfeats, tdesc = TRANSFORMER
    add("transformer.onnx", f"PyTorch {tv} torch.onnx.export(dynamo=False)", tfeats, False, tdesc)
    try:
        import onnxscript

        osv = f", onnxscript {onnxscript.__version__}"
    except ImportError:
        osv = ", onnxscript"
    add("resnet_dynamo.onnx", f"PyTorch {tv} torch.onnx.export(dynamo=True){osv}",
        TORCH_MODELS["resnet"][2] + ["external_data"], False,
        TORCH_MODELS["resnet"][3] + "; torch.export-based exporter (its default optimizer folds BN into Conv, "
        "GAP becomes ReduceMean, flatten becomes Reshape); weights in resnet_dynamo.onnx.data")
    add("resnet_constants.onnx", "resnet_bn.onnx post-processed with onnx.helper (tools/make_zoo.py)",
        TORCH_MODELS["resnet"][2] + ["constant_nodes"], True,
        "resnet_bn with every initializer converted into a Constant node (Paddle/Caffe2 style)")
    for fname, info in EXTERNAL_MODELS.items():
        if os.path.exists(os.path.join(MODELS, fname)):
            add(fname, info["source"], info["features"], False, info["description"])
    check_equivalence(rng)
    return entries


def check_equivalence(rng):
    """The _bn / _folded / dynamo / constants variants of a model must compute the same function."""
    import onnxruntime as ort

    pairs = [(f"{n}_bn.onnx", f"{n}_folded.onnx") for n in TORCH_MODELS]
    pairs += [("resnet_bn.onnx", "resnet_dynamo.onnx"), ("resnet_bn.onnx", "resnet_constants.onnx")]
    for a, b in pairs:
        pa, pb = os.path.join(MODELS, a), os.path.join(MODELS, b)
        if not (os.path.exists(pa) and os.path.exists(pb)):
            continue
        sa = ort.InferenceSession(pa, providers=["CPUExecutionProvider"])
        sb = ort.InferenceSession(pb, providers=["CPUExecutionProvider"])
        i = sa.get_inputs()[0]
        x = rng.standard_normal([3] + list(i.shape[1:])).astype(np.float32)
        ya = sa.run(None, {i.name: x})[0]
        yb = sb.run(None, {sb.get_inputs()[0].name: x})[0]
        err = float(np.max(np.abs(ya - yb)))
        assert err < 1e-3 * max(1.0, float(np.max(np.abs(ya)))), f"{a} vs {b}: max abs diff {err}"
        print(f"equivalent: {a} == {b} (max abs diff {err:.2e})")


_STRUCTURAL = {"residual_add", "concat", "split", "depthwise", "grouped", "conv_transpose", "nhwc_transpose",
               "constant_nodes"}


def human(n):
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MiB"


def write_manifest_and_readme(entries):
    manifest = {
        "generated_by": "tools/make_zoo.py (+ tools/make_tf_zoo.py for keras_cnn.onnx)",
        "note": "Random seeded weights, not trained. Dynamic dimensions are strings (e.g. \"batch\").",
        "models": {e["file"]: e for e in entries},
    }
    with open(os.path.join(MODELS, "MANIFEST.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")

    total = sum(e["file_size_bytes"] + e["external_data_size_bytes"] for e in entries)
    lines = [
        "# onnxprune test-model zoo",
        "",
        "Small, randomly initialised (seeded, **untrained**) models exported from different frameworks/exporters,",
        "used as fixtures for onnxprune's tests. Every file passes `onnx.checker.check_model(full_check=True)` and",
        "runs in onnxruntime (CPU) with batch 1 and 2. A machine-readable description of every file (input/output",
        "names and shapes with the dynamic dimension as the string `\"batch\"`, opset, whether BatchNormalization is",
        "kept, feature tags, op counts, parameter count) is in [`MANIFEST.json`](MANIFEST.json).",
        "",
        "Conventions:",
        "",
        "* `<name>_bn.onnx`: BatchNormalization nodes kept (legacy exporter, `training=TrainingMode.PRESERVE` on an",
        "  `eval()` model, constant folding on). BN layers have random non-identity running_mean/var/weight/bias.",
        "* `<name>_folded.onnx`: the same weights exported with `training=TrainingMode.EVAL`, so BN is folded into Conv.",
        "  The two variants compute the same function (up to float rounding).",
        "* `transformer.onnx` has no BN and is exported once, at opset 17 (the first opset with `LayerNormalization`).",
        "* `resnet_dynamo.onnx` is the resnet model exported by the torch.export-based exporter (`dynamo=True`, opset 18);",
        "  its weights are in the external data file `resnet_dynamo.onnx.data` (keep the two files together).",
        "* `resnet_constants.onnx` is `resnet_bn.onnx` with every initializer turned into a `Constant` node",
        "  (as Paddle/Caffe2 exporters do): the graph has no initializers.",
        "* `keras_cnn.onnx` comes from Keras via tf2onnx (opset 13): NHWC input `[batch, 32, 32, 3]` with a Transpose",
        "  to NCHW; tf2onnx folds BN into the Conv weights except after the depthwise conv, where BN stays as a",
        "  per-channel `Mul` + `Add`; Dense is `MatMul` + `Add`; output is named `logits`.",
        "* Export details worth knowing: at opset 13 `Hardswish` is exported as `HardSigmoid` + `Mul`, `SiLU` as",
        "  `Sigmoid` + `Mul`, and `ReLU6` as `Clip` whose min/max are `Constant` nodes; the transformer's reshapes take",
        "  the batch size from `Shape` -> `Gather` -> `Unsqueeze` -> `Concat`; `densenet` uses conv-BN-ReLU ordering",
        "  so every BN follows a Conv; the `csp` split uses `torch.split` with explicit sizes (one `Split` node).",
        "* Weights are random: He-normal convs, BN running stats calibrated on seeded random inputs then perturbed,",
        "  random gamma in [0.1, 1.5) and beta (so BN is never an identity), random LayerNorm affine parameters.",
        "* Input names are `input` (torch models); the batch dimension is the symbolic `batch`.",
        "",
        "Feature tags: " + ", ".join(f"`{t}`" for t in sorted({f for e in entries for f in e["features"]})) + ".",
        "",
        "| file | source (exporter + version) | opset | input shape | output shape | op types (count) | parameters | file size |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in entries:
        shp = "; ".join(f"`{i['name']}` [{', '.join(map(str, i['shape']))}]" for i in e["inputs"])
        oshp = "; ".join(f"[{', '.join(map(str, o['shape']))}]" for o in e["outputs"])
        ops = ", ".join(f"{k} {v}" for k, v in e["op_types"].items())
        size = human(e["file_size_bytes"])
        if e["external_data_size_bytes"]:
            size += f" + {human(e['external_data_size_bytes'])} (.data)"
        lines.append(f"| `{e['file']}` | {e['source']} | {e['opset']} | {shp} | {oshp} | {ops} | "
                     f"{e['parameters']:,} | {size} |")
    lines += [
        "",
        f"Total size: {human(total)}.",
        "",
        "## Features per model",
        "",
        "| file | BN kept (count) | features | description |",
        "| --- | --- | --- | --- |",
    ]
    for e in entries:
        lines.append(f"| `{e['file']}` | {'yes' if e['bn_kept'] else 'no'} ({e['num_batchnorm']}) | "
                     f"{', '.join(e['features'])} | {e['description']} |")
    lines += [
        "",
        "## Regenerating",
        "",
        "From the repository root (main environment: torch CPU, onnx, onnxruntime, numpy, onnxscript):",
        "",
        "```sh",
        "# 1. Keras model (separate virtualenv, never the main environment):",
        "python -m venv /tmp/tfvenv",
        "/tmp/tfvenv/bin/pip install -r tools/requirements-tf.txt",
        "/tmp/tfvenv/bin/python tools/make_tf_zoo.py",
        "# 2. PyTorch models + checks + MANIFEST.json + this README:",
        "python tools/make_zoo.py",
        "# only re-check existing files and rewrite MANIFEST.json / README.md:",
        "python tools/make_zoo.py --check-only",
        "```",
        "",
        "Seeds are fixed, so the weights are reproducible for a given torch version.",
        "",
    ]
    with open(os.path.join(MODELS, "README.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"wrote MANIFEST.json and README.md ({len(entries)} models, total {human(total)})")
