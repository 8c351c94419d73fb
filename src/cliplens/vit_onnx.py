"""open_clip's ViT image tower as an ONNX graph written from its weights, for the torch-free indexing path
(:mod:`cliplens.imageonly`).

Tracing the tower with ``torch.onnx.export`` took 6 s and peaked 1.5 GB above the loaded model for ViT-B/32; the
graph here is CLIP's (patch convolution, class token, positional embedding, pre-norm blocks of self-attention and
a two-layer MLP, ``ln_post`` on the class token, projection) written node by node with ``onnx.helper``, and each
weight goes straight to the external-data file, once: 3.4 s for ViT-B/32 including the parity check, 1.55 GB peak
(measured in docs/startup.md). Any other tower (:func:`supported` says which) is not written, and indexing keeps
torch. Whether the graph is right is not taken on trust: :func:`cliplens.imageonly.build_cache` compares it with
the torch tower before the cache is kept, and tests/unit/test_imageonly.py with open_clip's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn


def supported(visual) -> bool:
    """True for open_clip's own ViT image tower in the form CLIP uses (class token, pre-norm blocks of
    self-attention and a two-layer MLP with QuickGELU or erf GELU, no layer scale, class-token pooling after
    ``ln_post``, a projection): the towers :func:`write_graph` writes."""
    if type(visual).__name__ != "VisionTransformer" or getattr(visual, "attn_pool", None) is not None:
        return False
    if getattr(visual, "pool_type", None) != "tok" or getattr(visual, "final_ln_after_pool", True):
        return False
    if getattr(visual, "output_tokens", True) or getattr(visual, "conv1", None) is None or visual.conv1.bias is not None:
        return False
    conv = visual.conv1
    if conv.stride != conv.kernel_size or conv.padding not in ((0, 0), 0) or conv.groups != 1 or conv.dilation != (1, 1):
        return False
    for ln in (visual.ln_pre, visual.ln_post):
        if not isinstance(ln, nn.LayerNorm) or ln.weight is None:
            return False
    for block in visual.transformer.resblocks:
        if type(block).__name__ != "ResidualAttentionBlock" or hasattr(block, "ln_1_kv"):
            return False
        if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
            return False
        attn = block.attn
        if not (type(attn) is nn.MultiheadAttention and attn.batch_first and attn._qkv_same_embed_dim
                and attn.in_proj_bias is not None and attn.bias_k is None and not attn.add_zero_attn):
            return False
        mlp = block.mlp
        if [n for n, _ in mlp.named_children()] != ["c_fc", "gelu", "c_proj"] or _activation(mlp.gelu) is None:
            return False
    return True


def _activation(act) -> str | None:
    from cliplens.packed import _is_quick_gelu

    if _is_quick_gelu(act):
        return "quickgelu"
    if type(act) is nn.GELU and act.approximate == "none":
        return "gelu"
    return None


def tower_record(visual) -> dict:
    """What builds the tower again from its checkpoint (cliplens.vit_torch): layers, heads, activation, patch,
    layer-norm epsilon, width."""
    block = visual.transformer.resblocks[0]
    return {"layers": len(visual.transformer.resblocks), "heads": int(block.attn.num_heads),
            "activation": _activation(block.mlp.gelu), "patch": int(visual.conv1.kernel_size[0]),
            "eps": float(block.ln_1.eps), "width": int(visual.conv1.out_channels)}


def write_graph(visual, path: Path) -> None:
    """Write ``visual`` (:func:`supported`) as an ONNX graph ``path`` with its weights beside it
    (``path`` + ``.weights``, external data that ONNX Runtime reads at load): the weights go to the file tensor by
    tensor, so the process never holds a second copy of the tower (tracing it with ``torch.onnx.export`` peaked at
    1.5 GB above the loaded model for ViT-B/32, and took 6 s)."""
    import onnx
    from onnx import TensorProto, helper

    from cliplens.packed import file_maps, release_file_pages

    weights_path = path.with_name(path.name + ".weights")
    nodes, inits = [], []
    maps = file_maps()
    offset = 0

    def node(op, inputs, outputs=None, **attrs):
        outputs = outputs or [f"t{len(nodes)}"]
        nodes.append(helper.make_node(op, inputs, outputs, **attrs))
        return outputs[0]

    def const(name, values, dtype=np.int64):
        inits.append(helper.make_tensor(name, TensorProto.INT64 if dtype == np.int64 else TensorProto.FLOAT,
                                        list(np.shape(values)), np.asarray(values, dtype).reshape(-1).tolist()))
        return name

    with open(weights_path, "wb") as sink:
        def weight(name, tensor, *, transpose=False, shape=None):
            nonlocal offset
            array = tensor.detach().float().numpy()
            array = np.ascontiguousarray(array.T if transpose else array)
            if shape is not None:
                array = array.reshape(shape)
            t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(array.shape),
                            data_location=TensorProto.EXTERNAL)
            for key, value in (("location", weights_path.name), ("offset", str(offset)), ("length", str(array.nbytes))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            sink.write(memoryview(array).cast("B"))
            offset += array.nbytes
            inits.append(t)
            release_file_pages([tensor], maps=maps)  # read from the checkpoint's map once: its pages go again
            return name

        def layer_norm(x, ln, name):
            return node("LayerNormalization", [x, weight(f"{name}.w", ln.weight), weight(f"{name}.b", ln.bias)],
                        axis=-1, epsilon=float(ln.eps))

        def linear(x, lin_w, lin_b, name):  # x: (tokens, in); a Gemm adds the bias in its own pass over the output
            if lin_b is None:
                return node("MatMul", [x, weight(f"{name}.wT", lin_w, transpose=True)])
            return node("Gemm", [x, weight(f"{name}.wT", lin_w, transpose=True), weight(f"{name}.b", lin_b)])

        width = int(visual.conv1.out_channels)
        patch = visual.conv1.kernel_size
        x = node("Conv", ["input0", weight("conv1.w", visual.conv1.weight)], kernel_shape=list(patch),
                 strides=list(visual.conv1.stride))
        x = node("Reshape", [x, const("shape_nwl", [0, width, -1])])
        x = node("Transpose", [x], perm=[0, 2, 1])  # (N, grid^2, width)
        n = node("Shape", [x], start=0, end=1)
        cls_shape = node("Concat", [n, const("shape_1w", [1, width])], axis=0)
        cls = node("Expand", [weight("class_embedding", visual.class_embedding, shape=(1, 1, width)), cls_shape])
        x = node("Concat", [cls, x], axis=1)
        x = node("Add", [x, weight("positional_embedding", visual.positional_embedding)])
        x = layer_norm(x, visual.ln_pre, "ln_pre")
        length = int(visual.positional_embedding.shape[0])  # tokens per image: the class token and the patches
        x = node("Reshape", [x, const("shape_tokens", [-1, width])])  # (N * length, width): every linear one Gemm
        for i, block in enumerate(visual.transformer.resblocks):
            attn, heads = block.attn, int(block.attn.num_heads)
            h = layer_norm(x, block.ln_1, f"b{i}.ln_1")
            qkv = linear(h, attn.in_proj_weight, attn.in_proj_bias, f"b{i}.in_proj")
            qkv = node("Reshape", [qkv, const(f"b{i}.shape_qkv", [-1, length, 3, heads, width // heads])])
            qkv = node("Transpose", [qkv], perm=[2, 0, 3, 1, 4])  # (3, N, heads, L, head_dim)
            q, k, v = (node("Gather", [qkv, const(f"b{i}.i{j}", j)], axis=0) for j in range(3))
            scores = node("MatMul", [q, node("Transpose", [k], perm=[0, 1, 3, 2])])
            scores = node("Mul", [scores, const(f"b{i}.scale", 1.0 / float(np.sqrt(width // heads)), np.float32)])
            out = node("MatMul", [node("Softmax", [scores], axis=-1), v])
            out = node("Reshape", [node("Transpose", [out], perm=[0, 2, 1, 3]), const(f"b{i}.shape_tokens", [-1, width])])
            x = node("Add", [x, linear(out, attn.out_proj.weight, attn.out_proj.bias, f"b{i}.out_proj")])
            h = layer_norm(x, block.ln_2, f"b{i}.ln_2")
            h = linear(h, block.mlp.c_fc.weight, block.mlp.c_fc.bias, f"b{i}.c_fc")
            if _activation(block.mlp.gelu) == "quickgelu":  # x * sigmoid(1.702 x)
                h = node("Mul", [h, node("Sigmoid", [node("Mul", [h, const(f"b{i}.qg", 1.702, np.float32)])])])
            else:  # erf GELU: 0.5 x (1 + erf(x / sqrt 2))
                e = node("Erf", [node("Div", [h, const(f"b{i}.sqrt2", float(np.sqrt(2.0)), np.float32)])])
                h = node("Mul", [node("Mul", [h, const(f"b{i}.half", 0.5, np.float32)]),
                                 node("Add", [e, const(f"b{i}.one", 1.0, np.float32)])])
            x = node("Add", [x, linear(h, block.mlp.c_proj.weight, block.mlp.c_proj.bias, f"b{i}.c_proj")])
        x = node("Reshape", [x, const("shape_nlw", [-1, length, width])])
        x = node("Gather", [x, const("token0", 0)], axis=1)  # the class token: (N, width)
        x = layer_norm(x, visual.ln_post, "ln_post")  # per token, so on the class token alone it is the same
        if visual.proj is not None:
            node("MatMul", [x, weight("proj", visual.proj)], ["features"])
        else:
            node("Identity", [x], ["features"])
    size = visual.image_size if isinstance(visual.image_size, (tuple, list)) else (visual.image_size,) * 2
    dim = int(visual.proj.shape[1]) if visual.proj is not None else width
    graph = helper.make_graph(
        nodes, "cliplens_image_tower",
        [helper.make_tensor_value_info("input0", TensorProto.FLOAT, ["batch", 3, int(size[0]), int(size[1])])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", dim])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="cliplens",
                              doc_string="open_clip's VisionTransformer, written from its weights by cliplens")
    model.ir_version = 8
    onnx.save(model, str(path))


def unpacked_visual(encoder):
    """The encoder's image tower as open_clip built it: packing (cliplens.packed) replaces its blocks with oneDNN
    kernels ONNX cannot express, so a packed tower is built again from the same checkpoint (memory-mapped)."""
    visual = encoder.model.visual
    if not getattr(visual, "cliplens_packed", False):
        return visual
    from cliplens.encoder import _create_model

    info = encoder.info
    checkpoint = None if info.name.startswith(("hf-hub:", "local-dir:")) else info.weights_path
    clip, _ = _create_model(info.name, checkpoint, "cpu")
    return clip.eval().visual


def open_clip_tower(encoder):
    """``pixels -> unit embeddings`` by open_clip's own ``encode_image`` of ``encoder``'s (unpacked) model: what a
    graph written from it is checked against in the first-run helper (cliplens.imageonly_build). Each block's weights
    are given back to the checkpoint's file mapping once it has run, so the helper never holds all the tower's
    pages at once."""
    import torch

    from cliplens.encoder import _normalise
    from cliplens.packed import file_maps, release_file_pages

    clip = encoder.model

    def run(pixels: np.ndarray) -> np.ndarray:
        maps = file_maps()

        def release(module, *_) -> None:  # a forward hook that returns something replaces the block's output
            release_file_pages(list(module.parameters()), maps=maps)

        hooks = [block.register_forward_hook(release) for block in clip.visual.transformer.resblocks]
        try:
            with torch.inference_mode():
                feats = clip.encode_image(torch.from_numpy(np.ascontiguousarray(pixels, np.float32)))
        finally:
            for hook in hooks:
                hook.remove()
        return _normalise(feats)  # as the encoder's own towers hand out their rows

    return run
