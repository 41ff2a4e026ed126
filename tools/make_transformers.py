#!/usr/bin/env python
"""Train two small transformers and export them (with their data) for the transformer tests and benchmark.

Why: head, FFN and hidden-width pruning and their recovery are only judged fairly on *trained* weights (random
weights have no redundancy to find and no accuracy to lose), and the ONNX-side difficulty is in how exporters write
attention, so the same encoder is exported three ways. Nothing is downloaded: the ViT trains on scikit-learn's
bundled 8x8 digits, the BERT-style encoder on a synthetic token language (below); both train in well under a minute
on two CPU cores.

Usage (from the repository root; torch (CPU), scikit-learn and onnxscript are tools-only dependencies)::

    python tools/make_transformers.py          # writes the files below and their MANIFEST.json / README.md entries

Writes (see models/README.md, "Trained transformers"):

* ``models/digits_vit.onnx``: pre-LN ViT over the digits (2x2 patches -> 16 tokens + a class token, width 48,
  2 layers, 4 heads, FFN 4x, GELU), TorchScript exporter, opset 17, input ``input`` [batch, 1, 8, 8], output
  ``logits``; data: the digits CNNs' ``digits_calib.npz`` / ``digits_val.npz`` (same split, tools/train_digits.py).
* ``models/bert_tiny.onnx`` (TorchScript exporter, opset 17), ``models/bert_tiny_dynamo.onnx`` (``dynamo=True``)
  and ``models/bert_tiny_fused.onnx`` (``onnxruntime.transformers.optimizer.optimize_model(model_type="bert",
  opt_level=0)`` of the TorchScript export): a post-LN BERT encoder (token + position + token-type embeddings,
  2 layers, hidden 64, 4 heads, FFN 256, GELU), inputs ``input_ids`` / ``attention_mask`` / ``token_type_ids``
  int64 [batch, seq], output ``last_hidden_state`` [batch, seq, 64].
* ``models/bert_calib.npz`` (128 sequences) and ``models/bert_val.npz`` (256 held-out sequences): the three inputs,
  sequence length 32, right-padded sentence pairs with real padding (``attention_mask`` 0 there).

Width 64 instead of BERT-base's 768 keeps all new files under 2 MB together (three copies of the encoder).

The synthetic language: two first-order Markov chains over 196 word ids (each word has four likely successors),
chain A for the first segment (token type 0) and chain B for the second (type 1), ``[CLS] A [SEP] B [SEP]``, padded
with 0. The encoder is trained by masked-language modelling (15% of the words, BERT's 80/10/10 rule); to predict a
masked word it has to read its neighbours and the segment, so its attention and FFN weights carry real structure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings

import numpy as np
import onnx
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_transformers import masked_cosine  # noqa: E402
from train_digits import accuracy, split, train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "models")
SEED = 0
OPSET = 17

# the BERT-style encoder and its synthetic language
VOCAB, PAD, CLS, SEP, MASK, FIRST_WORD = 200, 0, 1, 2, 3, 4
HIDDEN, HEADS, LAYERS, FFN, MAX_POS = 64, 4, 2, 256, 64
SEQ = 32
CALIB, VAL, TRAIN_SEQUENCES = 128, 256, 8192


class SelfAttention(nn.Module):
    """Multi-head self-attention as Hugging Face's BERT writes it: separate q/k/v Linear layers, a reshape to
    [batch, seq, heads, head_dim] built from the input's shape, an additive mask on the scores."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.output = nn.Linear(dim, dim)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size()[:-1] + (self.heads, self.head_dim)).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.split_heads(self.query(x)), self.split_heads(self.key(x)), self.split_heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask
        context = torch.matmul(torch.softmax(scores, dim=-1), v).permute(0, 2, 1, 3).contiguous()
        return self.output(context.view(context.size()[:-2] + (self.heads * self.head_dim,)))


class PreLNBlock(nn.Module):
    """ViT block: x + attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(dim), SelfAttention(dim, heads), nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class DigitsViT(nn.Module):
    """2x2 patches of the 8x8 digit (a stride-2 conv) -> 16 tokens, a class token, learned positions, pre-LN blocks,
    a final LayerNorm and a linear head on the class token."""

    def __init__(self, dim: int = 48, heads: int = 4, layers: int = 2, ffn: int = 192) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 2, 2)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(*[PreLNBlock(dim, heads, ffn) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.size(0), -1, -1), tokens], dim=1) + self.pos
        return self.head(self.ln(self.blocks(x))[:, 0])


class PostLNLayer(nn.Module):
    """BERT layer: LN(x + attn(x)), then LN(x + FFN(x)), GELU (erf)."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.attn, self.ln1 = SelfAttention(dim, heads), nn.LayerNorm(dim, eps=1e-12)
        self.fc1, self.fc2, self.ln2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim), nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x, mask))
        return self.ln2(x + self.fc2(nn.functional.gelu(self.fc1(x))))


class BertEncoder(nn.Module):
    """Hugging Face BERT's structure at toy width: embeddings (word + position + token type, LayerNorm), the
    extended attention mask (1 - mask) * -10000 added to the scores, post-LN layers; returns the last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.word = nn.Embedding(VOCAB, HIDDEN)
        self.position = nn.Embedding(MAX_POS, HIDDEN)
        self.token_type = nn.Embedding(2, HIDDEN)
        self.ln = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.register_buffer("position_ids", torch.arange(MAX_POS).unsqueeze(0), persistent=False)
        self.layers = nn.ModuleList(PostLNLayer(HIDDEN, HEADS, FFN) for _ in range(LAYERS))
        for module in self.modules():  # BERT's init: N(0, 0.02) weights, zero biases
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, : input_ids.size(1)]
        x = self.ln(self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids))
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, mask)
        return x


# --------------------------------------------------------------------------------------------------------------------
# the synthetic token language
# --------------------------------------------------------------------------------------------------------------------
def chains(rng: np.random.Generator) -> list[np.ndarray]:
    """Two transition matrices over the words: each word has four likely successors (Dirichlet weights)."""
    words = VOCAB - FIRST_WORD
    out = []
    for _ in range(2):
        table = np.full((words, words), 0.02 / words)
        for w in range(words):
            nxt = rng.choice(words, 4, replace=False)
            table[w, nxt] += 0.98 * rng.dirichlet(np.ones(4))
        out.append(table / table.sum(1, keepdims=True))
    return out


def sentences(count: int, rng: np.random.Generator, tables: list[np.ndarray]) -> dict[str, np.ndarray]:
    """``[CLS] A [SEP] B [SEP]`` right-padded to SEQ; 10% are single segments; lengths vary, so padding is real."""
    ids = np.zeros((count, SEQ), np.int64)
    types = np.zeros((count, SEQ), np.int64)
    mask = np.zeros((count, SEQ), np.int64)
    cum = [np.cumsum(t, 1) for t in tables]
    for i in range(count):
        total = int(rng.integers(10, SEQ + 1))
        single = rng.random() < 0.1
        len_a = total - 2 if single else int(rng.integers(3, total - 4))
        parts = [(0, len_a)] + ([] if single else [(1, total - 3 - len_a)])
        row, row_types = [CLS], [0]
        for seg, length in parts:
            w = int(rng.integers(VOCAB - FIRST_WORD))
            for _ in range(length):
                row.append(FIRST_WORD + w)
                w = int(np.searchsorted(cum[seg][w], rng.random()))
                w = min(w, VOCAB - FIRST_WORD - 1)
            row.append(SEP)
            row_types += [seg] * (length + 1)
        ids[i, : len(row)], types[i, : len(row)], mask[i, : len(row)] = row, row_types, 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def train_bert(steps: int) -> BertEncoder:
    """Masked-LM training on the synthetic language with a linear decoder (not exported).

    A deeper decoder (BERT's dense + GELU + LayerNorm prediction head) learned the successor tables itself and left
    the encoder's FFNs almost untrained (zeroing both FFNs kept the output at cosine 0.89)."""
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    tables = chains(rng)
    data = {k: torch.from_numpy(v) for k, v in sentences(TRAIN_SEQUENCES, rng, tables).items()}
    model = BertEncoder()
    decoder = nn.Linear(HIDDEN, VOCAB)  # linear: the word-to-successor maps must be learned by the encoder itself
    params = list(model.parameters()) + list(decoder.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, TRAIN_SEQUENCES, (64,), generator=gen)
        ids, mask, types = data["input_ids"][idx], data["attention_mask"][idx], data["token_type_ids"][idx]
        words = ids >= FIRST_WORD
        chosen = words & (torch.rand(ids.shape, generator=gen) < 0.15)
        roll = torch.rand(ids.shape, generator=gen)
        inputs = torch.where(chosen & (roll < 0.8), torch.full_like(ids, MASK), ids)
        random_words = torch.randint(FIRST_WORD, VOCAB, ids.shape, generator=gen)
        inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_words, inputs)
        logits = decoder(model(inputs, mask, types))
        loss = nn.functional.cross_entropy(logits[chosen], ids[chosen])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            acc = float((logits[chosen].argmax(-1) == ids[chosen]).float().mean())
            print(f"  bert step {step}: masked-LM loss {float(loss):.3f}, masked-word top-1 {acc:.3f}")
    return model.eval()


# --------------------------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------------------------
BERT_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def export_vit(model: nn.Module, path: str) -> None:
    torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), path, dynamo=False, opset_version=OPSET,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def bert_example(batch: int = 2) -> tuple[torch.Tensor, ...]:
    data = sentences(batch, np.random.default_rng(1), chains(np.random.default_rng(SEED)))
    return tuple(torch.from_numpy(data[k]) for k in BERT_INPUTS)


def export_bert_torchscript(model: nn.Module, path: str) -> None:
    axes = {name: {0: "batch", 1: "seq"} for name in BERT_INPUTS + ["last_hidden_state"]}
    torch.onnx.export(model, bert_example(), path, dynamo=False, opset_version=OPSET, input_names=BERT_INPUTS,
                      output_names=["last_hidden_state"], dynamic_axes=axes)


def export_bert_dynamo(model: nn.Module, path: str) -> None:
    batch, seq = torch.export.Dim("batch", max=1024), torch.export.Dim("seq", max=MAX_POS)
    shapes = {name: {0: batch, 1: seq} for name in BERT_INPUTS}
    program = torch.onnx.export(model, bert_example(), dynamo=True, input_names=BERT_INPUTS,
                                output_names=["last_hidden_state"], dynamic_shapes=shapes)
    program.save(path, external_data=False)


def fuse_bert(source: str, path: str) -> dict[str, int]:
    """onnxruntime's transformer optimizer at opt_level 0 (its Python fusions only); returns its fused-op counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(source, model_type="bert", num_heads=HEADS, hidden_size=HIDDEN, opt_level=0)
    optimized.save_model_to_file(path)
    return {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}


def bert_outputs(path: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


# --------------------------------------------------------------------------------------------------------------------
# MANIFEST.json and models/README.md
# --------------------------------------------------------------------------------------------------------------------
README_MARK = "## Trained transformers (tools/make_transformers.py)"


def describe(entries: dict[str, dict], notes: list[str]) -> None:
    """Put the entries under MANIFEST.json's ``transformers`` key and replace models/README.md's section.

    Why a key of their own: the ``models`` entries are the random zoo every structural test iterates over with
    float inputs; these are trained models with their own data and integer inputs, tested in
    tests/test_transformer_models.py.
    """
    from zoo_manifest import human, model_entry

    manifest_path = os.path.join(MODELS, "MANIFEST.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    described = {}
    for fname, (source, features, description) in entries.items():
        entry = model_entry(fname, onnx.load(os.path.join(MODELS, fname)), source, features, False, description)
        described[fname] = entry
    manifest["transformers"] = described
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    lines = [README_MARK, "", *notes, "",
             "| file | source | opset | inputs | op types (count) | parameters | file size |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for e in described.values():
        shp = "; ".join(f"`{i['name']}` [{', '.join(map(str, i['shape']))}]" for i in e["inputs"])
        ops = ", ".join(f"{k} {v}" for k, v in e["op_types"].items())
        lines.append(f"| `{e['file']}` | {e['source']} | {e['opset']} | {shp} | {ops} | {e['parameters']:,} | "
                     f"{human(e['file_size_bytes'] + e['external_data_size_bytes'])} |")
    readme_path = os.path.join(MODELS, "README.md")
    with open(readme_path) as f:
        text = f.read()
    text = text.split(README_MARK)[0].rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    with open(readme_path, "w") as f:
        f.write(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vit-epochs", type=int, default=60)
    parser.add_argument("--bert-steps", type=int, default=2500)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # two threads on a shared two-core machine were several times slower
    notes = []

    x_train, y_train, x_val, y_val = split()
    torch.manual_seed(SEED)
    vit = train(DigitsViT(), x_train, y_train, args.vit_epochs)
    vit_path = os.path.join(MODELS, "digits_vit.onnx")
    export_vit(vit, vit_path)
    line = (f"`digits_vit.onnx`: trained {args.vit_epochs} epochs (tools/train_digits.py's loop: Adam 3e-3, cosine), "
            f"train top-1 {accuracy(vit, x_train, y_train):.4f}, held-out top-1 {accuracy(vit, x_val, y_val):.4f} "
            f"on `digits_val.npz` ({len(y_val)} samples).")
    print(line)
    notes.append(f"* {line}")

    bert = train_bert(args.bert_steps)
    rng = np.random.default_rng(SEED + 1)  # not the training draw: held-out sequences of the same language
    tables = chains(np.random.default_rng(SEED))
    rng.random(1)
    calib, val = sentences(CALIB, rng, tables), sentences(VAL, rng, tables)
    np.savez_compressed(os.path.join(MODELS, "bert_calib.npz"), **calib)
    np.savez_compressed(os.path.join(MODELS, "bert_val.npz"), **val)
    paths = {name: os.path.join(MODELS, f"{name}.onnx") for name in ("bert_tiny", "bert_tiny_dynamo", "bert_tiny_fused")}
    export_bert_torchscript(bert, paths["bert_tiny"])
    export_bert_dynamo(bert, paths["bert_tiny_dynamo"])
    fused = fuse_bert(paths["bert_tiny"], paths["bert_tiny_fused"])
    with torch.no_grad():
        reference = bert(*(torch.from_numpy(val[k]) for k in BERT_INPUTS)).numpy()
    for name, path in paths.items():
        cos = masked_cosine(reference, bert_outputs(path, val), val["attention_mask"])
        print(f"{name}: cosine to torch on bert_val.npz {cos:.6f} ({os.path.getsize(path)} bytes)")
        assert cos > 0.9999, name
    fused_ops = ", ".join(f"{k} {v}" for k, v in sorted(fused.items()))
    print(f"bert_tiny_fused: onnxruntime fused {fused_ops}")
    pad = 1 - val["attention_mask"].mean()
    notes += [
        f"* `bert_tiny*.onnx`: one post-LN BERT encoder trained {args.bert_steps} steps of masked-LM (batch 64) on "
        "the synthetic language of tools/make_transformers.py; exported by both exporters and fused by "
        f"onnxruntime's optimizer, which fused: {fused_ops}. The three files agree with torch to cosine > 0.9999.",
        f"* `bert_calib.npz` ({CALIB}) / `bert_val.npz` ({VAL} held-out): `input_ids`, `attention_mask`, "
        f"`token_type_ids` int64 [N, {SEQ}], right-padded ({pad:.0%} of the held-out positions are padding).",
    ]
    describe({
        "digits_vit.onnx": (f"PyTorch {torch.__version__} torch.onnx.export(dynamo=False)",
                            ["attention", "layernorm", "gelu", "residual_add"],
                            "trained pre-LN ViT over the 8x8 digits: 2x2 patch conv, class token, 2 layers, width 48, "
                            "4 heads, FFN 192"),
        "bert_tiny.onnx": (f"PyTorch {torch.__version__} torch.onnx.export(dynamo=False)",
                           ["attention", "layernorm", "gelu", "residual_add", "embedding"],
                           "trained post-LN BERT encoder: 2 layers, hidden 64, 4 heads, FFN 256"),
        "bert_tiny_dynamo.onnx": (f"PyTorch {torch.__version__} torch.onnx.export(dynamo=True)",
                                  ["attention", "layernorm", "gelu", "residual_add", "embedding"],
                                  "bert_tiny exported by the torch.export-based exporter"),
        "bert_tiny_fused.onnx": ("bert_tiny.onnx through onnxruntime.transformers.optimizer.optimize_model"
                                 "(model_type='bert', opt_level=0)",
                                 ["attention", "fused", "embedding"],
                                 f"bert_tiny with onnxruntime's fused ops ({fused_ops})"),
    }, notes)
    total = sum(os.path.getsize(os.path.join(MODELS, f)) for f in
                ["digits_vit.onnx", "bert_calib.npz", "bert_val.npz"] + [os.path.basename(p) for p in paths.values()])
    print(f"new files: {total} bytes")


if __name__ == "__main__":
    main()
