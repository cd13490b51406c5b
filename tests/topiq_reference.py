"""Independent TOPIQ-NR reference for tests/test_topiq.py: the released files' key layout, a fabricated checkpoint in
that layout, and a functional forward over the raw state dict.

Written from pyiqa's ``CFANet`` (pyiqa/archs/topiq_arch.py, ``use_ref=False``) and timm's ``resnet50``
(timm/models/resnet.py, ``features_only=True``), not from facereward.measures.topiq: the key names and shapes below
are spelled out from those sources, and the forward uses only ``torch.nn.functional`` ops on the tensors looked up by
name. Attention follows ``torch.nn.functional.multi_head_attention_forward`` (heads folded into the batch,
``(B * heads, L, d)``) rather than the module's ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}  # fmt: skip


def _mha(prefix: str, d: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.in_proj_weight": (3 * d, d), f"{prefix}.in_proj_bias": (3 * d,),
            f"{prefix}.out_proj.weight": (d, d), f"{prefix}.out_proj.bias": (d,)}  # fmt: skip


def _linear(prefix: str, cout: int, cin: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (cout, cin), f"{prefix}.bias": (cout,)}


def _ln(prefix: str, d: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (d,), f"{prefix}.bias": (d,)}


def released_layout(stem=64, planes=(64, 128, 256, 512), blocks=(3, 4, 6, 3), inter=256, gate=64, grid=32):
    """Key -> shape of ``CFANet(semantic_model_name='resnet50', use_ref=False).state_dict()`` (defaults: real dims)."""
    L: dict[str, tuple[int, ...]] = {}
    sm = "semantic_model"
    L[f"{sm}.conv1.weight"] = (stem, 3, 7, 7)
    L.update(_bn(f"{sm}.bn1", stem))
    cin = stem
    for s, (p, n) in enumerate(zip(planes, blocks)):
        for j in range(n):
            b = f"{sm}.layer{s + 1}.{j}"
            L[f"{b}.conv1.weight"] = (p, cin, 1, 1)
            L.update(_bn(f"{b}.bn1", p))
            L[f"{b}.conv2.weight"] = (p, p, 3, 3)
            L.update(_bn(f"{b}.bn2", p))
            L[f"{b}.conv3.weight"] = (4 * p, p, 1, 1)
            L.update(_bn(f"{b}.bn3", 4 * p))
            if j == 0:
                L[f"{b}.downsample.0.weight"] = (4 * p, cin, 1, 1)
                L.update(_bn(f"{b}.downsample.1", 4 * p))
            cin = 4 * p
    dims = [stem] + [4 * p for p in planes]
    ffn = min(4 * inter, 2048)
    for i, c in enumerate(dims):
        L[f"weight_pool.{i}.splitconv.weight"] = (2 * c, c, 1, 1)
        L[f"weight_pool.{i}.splitconv.bias"] = (2 * c,)
        L[f"weight_pool.{i}.weight_blk.0.weight"] = (gate, c, 1, 1)
        L[f"weight_pool.{i}.weight_blk.0.bias"] = (gate,)
        L[f"weight_pool.{i}.weight_blk.2.weight"] = (gate, gate, 3, 3)
        L[f"weight_pool.{i}.weight_blk.2.bias"] = (gate,)
        L[f"weight_pool.{i}.weight_blk.4.weight"] = (1, gate, 3, 3)
        L[f"weight_pool.{i}.weight_blk.4.bias"] = (1,)
        L[f"dim_reduce.{i}.0.weight"] = (inter, c, 1, 1)
        L[f"dim_reduce.{i}.0.bias"] = (inter,)

    def encoder(prefix: str) -> None:
        L.update(_mha(f"{prefix}.self_attn", inter))
        L.update(_linear(f"{prefix}.linear1", ffn, inter))
        L.update(_linear(f"{prefix}.linear2", inter, ffn))
        L.update(_ln(f"{prefix}.norm1", inter))
        L.update(_ln(f"{prefix}.norm2", inter))

    for i in range(len(dims)):
        encoder(f"sa_attn_blks.{i}.layers.0")
    for i in range(len(dims) - 1):
        pre = f"attn_blks.{i}.layers.0"
        encoder(pre)
        L.update(_mha(f"{pre}.multihead_attn", inter))
        L.update(_ln(f"{pre}.norm3", inter))
    encoder("attn_pool")
    for k in (0, 3):
        L.update(_ln(f"score_linear.{k}", inter))
    L.update(_linear("score_linear.1", inter, inter))
    L.update(_linear("score_linear.4", inter, inter))
    L.update(_linear("score_linear.6", 1, inter))
    L["h_emb"] = (1, inter // 2, grid, 1)
    L["w_emb"] = (1, inter // 2, 1, grid)
    return L


def fabricate(layout: dict[str, tuple[int, ...]], seed: int) -> dict[str, Tensor]:
    """Random tensors in ``layout`` from a fixed seed, scaled so a deep random ResNet stays finite and non-trivial."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Tensor] = {}
    for key, shape in layout.items():
        name = key.rsplit(".", 1)[-1]
        if name == "num_batches_tracked":
            sd[key] = torch.tensor(1000, dtype=torch.long)
        elif name == "running_var":
            sd[key] = 0.5 + torch.rand(shape, generator=g)
        elif name == "running_mean":
            sd[key] = 0.1 * torch.randn(shape, generator=g)
        elif key.startswith("semantic_model") and name == "weight" and len(shape) == 1:  # BN gamma
            small = ".bn3." in key  # keep the residual branches from growing the activations block after block
            sd[key] = (0.1 if small else 1.0) * (0.5 + 0.5 * torch.rand(shape, generator=g))
        elif len(shape) >= 2 and key not in ("h_emb", "w_emb"):  # conv / linear / in_proj weights
            fan_in = math.prod(shape[1:])
            sd[key] = torch.randn(shape, generator=g) * math.sqrt(2.0 / fan_in)
        elif ".norm" in key or key.startswith(("score_linear.0", "score_linear.3")):
            base = 1.0 if name == "weight" else 0.0
            sd[key] = base + 0.1 * torch.randn(shape, generator=g)
        else:  # biases, position embeddings
            sd[key] = 0.1 * torch.randn(shape, generator=g) if len(shape) < 2 else 0.5 * torch.randn(shape, generator=g)
    return sd


# ------------------------------------------------------------------------------------------------------------------
# functional forward
# ------------------------------------------------------------------------------------------------------------------


def _pyiqa_resize(x: Tensor, size) -> Tensor:
    """TF.resize(x, size, antialias=True) for tensors: int -> shorter side, (h, w) -> as given; same size -> as is."""
    if size is None:
        return x
    h, w = x.shape[-2:]
    if isinstance(size, int):
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        new_h, new_w = (new_long, size) if w <= h else (size, new_long)
    else:
        new_h, new_w = size
    if (new_h, new_w) == (h, w):
        return x
    return F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)


def _bn_apply(sd, p, x):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                        training=False, eps=1e-5)  # fmt: skip


def _resnet_taps(sd, x):
    sm = "semantic_model"
    x = F.relu(_bn_apply(sd, f"{sm}.bn1", F.conv2d(x, sd[f"{sm}.conv1.weight"], stride=2, padding=3)))
    taps = [x]
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    for s in range(1, 5):
        j = 0
        while f"{sm}.layer{s}.{j}.conv1.weight" in sd:
            b = f"{sm}.layer{s}.{j}"
            stride = 2 if (s > 1 and j == 0) else 1
            y = F.relu(_bn_apply(sd, f"{b}.bn1", F.conv2d(x, sd[f"{b}.conv1.weight"])))
            y = F.relu(_bn_apply(sd, f"{b}.bn2", F.conv2d(y, sd[f"{b}.conv2.weight"], stride=stride, padding=1)))
            y = _bn_apply(sd, f"{b}.bn3", F.conv2d(y, sd[f"{b}.conv3.weight"]))
            if f"{b}.downsample.0.weight" in sd:
                sc = _bn_apply(sd, f"{b}.downsample.1", F.conv2d(x, sd[f"{b}.downsample.0.weight"], stride=stride))
            else:
                sc = x
            x = F.relu(y + sc)
            j += 1
        taps.append(x)
    return taps


def _mha_apply(sd, p, q_in, kv_in, heads):
    """torch's multi_head_attention_forward (no masks, no dropout): (L, B, E) sequence-first."""
    tgt_len, bsz, e = q_in.shape
    src_len = kv_in.shape[0]
    hd = e // heads
    w, b = sd[f"{p}.in_proj_weight"], sd[f"{p}.in_proj_bias"]
    q = q_in @ w[:e].T + b[:e]
    k = kv_in @ w[e : 2 * e].T + b[e : 2 * e]
    v = kv_in @ w[2 * e :].T + b[2 * e :]
    q = q.reshape(tgt_len, bsz * heads, hd).transpose(0, 1)
    k = k.reshape(src_len, bsz * heads, hd).transpose(0, 1)
    v = v.reshape(src_len, bsz * heads, hd).transpose(0, 1)
    attn = torch.softmax((q / math.sqrt(hd)) @ k.transpose(1, 2), dim=-1)
    out = (attn @ v).transpose(0, 1).reshape(tgt_len * bsz, e)
    out = out @ sd[f"{p}.out_proj.weight"].T + sd[f"{p}.out_proj.bias"]
    return out.view(tgt_len, bsz, e)


def _ln_apply(sd, p, x):
    return F.layer_norm(x, (x.shape[-1],), sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-5)


def _lin_apply(sd, p, x):
    return x @ sd[f"{p}.weight"].T + sd[f"{p}.bias"]


def _ffn(sd, p, x):
    return _lin_apply(sd, f"{p}.linear2", F.gelu(_lin_apply(sd, f"{p}.linear1", x)))


def _encoder(sd, p, src, heads):
    s2 = _ln_apply(sd, f"{p}.norm1", src)
    src = src + _mha_apply(sd, f"{p}.self_attn", s2, s2, heads)
    return src + _ffn(sd, p, _ln_apply(sd, f"{p}.norm2", src))


def _decoder(sd, p, tgt, memory, heads):
    memory = _ln_apply(sd, f"{p}.norm2", memory)
    t2 = _ln_apply(sd, f"{p}.norm1", tgt)
    tgt = tgt + _mha_apply(sd, f"{p}.multihead_attn", t2, memory, heads)
    return tgt + _ffn(sd, p, _ln_apply(sd, f"{p}.norm3", tgt))


def reference_forward(raw: dict, images: Tensor, test_img_size=None, heads: int = 4,
                      dtype: torch.dtype = torch.float64) -> Tensor:  # fmt: skip
    """pyiqa CFANet NR forward (eval, one crop) on a raw released-layout dict -> (B,) scores."""
    sd = raw.get("params", raw)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    x = _pyiqa_resize(images.to(dtype), test_img_size)
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=dtype).view(1, 3, 1, 1)
    feats = _resnet_taps(sd, (x - mean) / std)

    th, tw = feats[-1].shape[-2:]
    h_emb, w_emb = sd["h_emb"], sd["w_emb"]
    pos = torch.cat((h_emb.repeat(1, 1, 1, w_emb.shape[3]), w_emb.repeat(1, 1, h_emb.shape[2], 1)), dim=1)
    tokens = []
    for i in reversed(range(len(feats))):
        f = feats[i]
        wp = f"weight_pool.{i}"
        x1, x2 = F.conv2d(f, sd[f"{wp}.splitconv.weight"], sd[f"{wp}.splitconv.bias"]).chunk(2, dim=1)
        g = F.gelu(F.conv2d(x2, sd[f"{wp}.weight_blk.0.weight"], sd[f"{wp}.weight_blk.0.bias"]))
        g = F.gelu(F.conv2d(g, sd[f"{wp}.weight_blk.2.weight"], sd[f"{wp}.weight_blk.2.bias"], padding=1))
        g = torch.sigmoid(F.conv2d(g, sd[f"{wp}.weight_blk.4.weight"], sd[f"{wp}.weight_blk.4.bias"], padding=1))
        f = F.gelu(x1) * g
        if f.shape[2] > th and f.shape[3] > tw:
            f = F.adaptive_avg_pool2d(f, (th, tw))
        p = F.interpolate(pos, size=f.shape[2:], mode="bicubic", align_corners=False).flatten(2).permute(2, 0, 1)
        f = F.gelu(F.conv2d(f, sd[f"dim_reduce.{i}.0.weight"], sd[f"dim_reduce.{i}.0.bias"]))
        f = f.flatten(2).permute(2, 0, 1) + p
        tokens.append(_encoder(sd, f"sa_attn_blks.{i}.layers.0", f, heads))

    query = tokens[0]
    for j in range(len(tokens) - 1):
        query = _decoder(sd, f"attn_blks.{j}.layers.0", query, tokens[j + 1], heads)
    z = _encoder(sd, "attn_pool", query, heads).mean(dim=0)
    z = F.gelu(_lin_apply(sd, "score_linear.1", _ln_apply(sd, "score_linear.0", z)))
    z = F.gelu(_lin_apply(sd, "score_linear.4", _ln_apply(sd, "score_linear.3", z)))
    score = _lin_apply(sd, "score_linear.6", z)  # (B, 1)
    return (score * torch.arange(1, score.shape[-1] + 1, dtype=dtype)).sum(dim=-1)  # dist_to_mos
