"""Checkpoint key layouts of Mask2Former for ``load_pretrained``:

- ``transformers``: ``Mask2FormerForUniversalSegmentation`` state dicts (with a ResNet
  backbone, transformers' ``ResNetBackbone`` names); the decoder's self-attention q/k/v
  projections are packed into one ``in_proj``.
- ``mask2former_official``: facebookresearch/Mask2Former and MaskFormer (detectron2)
  checkpoints: the ResNet ``stem``/``res2..res5`` names, ``sem_seg_head.pixel_decoder.*`` and
  ``sem_seg_head.predictor.*``.

Mask2Former's renames follow models.md section 3.9 (the HF conversion script's table).
``MaskFormerForInstanceSegmentation`` state dicts load into ``MaskFormer`` models under the
same two layout names (HF's FPN ``layers.i`` is the official ``adapter/layer_{3-i}``, its
``stem`` is ``layer_4``; q/k/v projections are packed).
"""
import re
from typing import Dict, List, Mapping, Tuple

import torch
from torch import Tensor, nn

from ..weights import register_layout

Rules = List[Tuple[str, str]]

_HF_RESNET: Rules = [
    (r"^embedder\.embedder\.convolution\.", "conv1."),
    (r"^embedder\.embedder\.normalization\.", "bn1."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}."),
]

_HF: Rules = [
    (r"^model\.pixel_level_module\.decoder\.input_projections\.", "pixel_decoder.input_proj."),
    (r"^model\.pixel_level_module\.decoder\.level_embed$", "pixel_decoder.level_embed"),
    (r"^model\.pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.self_attn_layer_norm\.",
     lambda m: f"pixel_decoder.encoder.{m[1]}.norm1."),
    (r"^model\.pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.final_layer_norm\.",
     lambda m: f"pixel_decoder.encoder.{m[1]}.norm2."),
    (r"^model\.pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.fc(\d)\.",
     lambda m: f"pixel_decoder.encoder.{m[1]}.linear{m[2]}."),
    (r"^model\.pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.self_attn\.",
     lambda m: f"pixel_decoder.encoder.{m[1]}.self_attn."),
    (r"^model\.pixel_level_module\.decoder\.mask_projection\.", "pixel_decoder.mask_features."),
    (r"^model\.pixel_level_module\.decoder\.(adapter|layer)_(\d+)\.", lambda m: f"pixel_decoder.{m[1]}_{m[2]}."),
    (r"^model\.transformer_module\.queries_features\.", "predictor.query_feat."),
    (r"^model\.transformer_module\.queries_embedder\.", "predictor.query_embed."),
    (r"^model\.transformer_module\.level_embed\.", "predictor.level_embed."),
    (r"^model\.transformer_module\.input_projections\.", "predictor.input_proj."),
    (r"^model\.transformer_module\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.",
     lambda m: f"predictor.layers.{m[1]}.self_norm."),
    (r"^model\.transformer_module\.decoder\.layers\.(\d+)\.cross_attn_layer_norm\.",
     lambda m: f"predictor.layers.{m[1]}.cross_norm."),
    (r"^model\.transformer_module\.decoder\.layers\.(\d+)\.final_layer_norm\.",
     lambda m: f"predictor.layers.{m[1]}.ffn_norm."),
    (r"^model\.transformer_module\.decoder\.layers\.(\d+)\.fc(\d)\.",
     lambda m: f"predictor.layers.{m[1]}.linear{m[2]}."),
    (r"^model\.transformer_module\.decoder\.layers\.(\d+)\.(self_attn|cross_attn)\.",
     lambda m: f"predictor.layers.{m[1]}.{m[2]}."),
    (r"^model\.transformer_module\.decoder\.layernorm\.", "predictor.decoder_norm."),
    (r"^model\.transformer_module\.decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.",
     lambda m: f"predictor.mask_embed.layers.{m[1]}."),
    (r"^class_predictor\.", "predictor.class_embed."),
]

_OFFICIAL_RESNET: Rules = [
    (r"^stem\.conv1\.norm\.", "bn1."),
    (r"^stem\.conv1\.", "conv1."),
    (r"^res(\d)\.(\d+)\.shortcut\.norm\.", lambda m: f"layer{int(m[1]) - 1}.{m[2]}.downsample.1."),
    (r"^res(\d)\.(\d+)\.shortcut\.", lambda m: f"layer{int(m[1]) - 1}.{m[2]}.downsample.0."),
    (r"^res(\d)\.(\d+)\.conv(\d)\.norm\.", lambda m: f"layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}."),
    (r"^res(\d)\.(\d+)\.conv(\d)\.", lambda m: f"layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}."),
]

_OFFICIAL: Rules = [
    (r"^sem_seg_head\.pixel_decoder\.input_proj\.", "pixel_decoder.input_proj."),
    (r"^sem_seg_head\.pixel_decoder\.transformer\.level_embed$", "pixel_decoder.level_embed"),
    (r"^sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.", lambda m: f"pixel_decoder.encoder.{m[1]}."),
    (r"^sem_seg_head\.pixel_decoder\.mask_features\.", "pixel_decoder.mask_features."),
    (r"^sem_seg_head\.pixel_decoder\.(adapter|layer)_(\d+)\.norm\.", lambda m: f"pixel_decoder.{m[1]}_{m[2]}.1."),
    (r"^sem_seg_head\.pixel_decoder\.(adapter|layer)_(\d+)\.weight$", lambda m: f"pixel_decoder.{m[1]}_{m[2]}.0.weight"),
    (r"^sem_seg_head\.predictor\.transformer_self_attention_layers\.(\d+)\.self_attn\.",
     lambda m: f"predictor.layers.{m[1]}.self_attn."),
    (r"^sem_seg_head\.predictor\.transformer_self_attention_layers\.(\d+)\.norm\.",
     lambda m: f"predictor.layers.{m[1]}.self_norm."),
    (r"^sem_seg_head\.predictor\.transformer_cross_attention_layers\.(\d+)\.multihead_attn\.",
     lambda m: f"predictor.layers.{m[1]}.cross_attn."),
    (r"^sem_seg_head\.predictor\.transformer_cross_attention_layers\.(\d+)\.norm\.",
     lambda m: f"predictor.layers.{m[1]}.cross_norm."),
    (r"^sem_seg_head\.predictor\.transformer_ffn_layers\.(\d+)\.norm\.", lambda m: f"predictor.layers.{m[1]}.ffn_norm."),
    (r"^sem_seg_head\.predictor\.transformer_ffn_layers\.(\d+)\.(linear\d)\.",
     lambda m: f"predictor.layers.{m[1]}.{m[2]}."),
    (r"^sem_seg_head\.predictor\.", "predictor."),
]


# MaskFormer (HF ``MaskFormerForInstanceSegmentation`` with a ResNet backbone: 4 levels).
_HF_MF: Rules = [
    (r"^model\.pixel_level_module\.decoder\.fpn\.stem\.", "pixel_decoder.layer_4."),
    (r"^model\.pixel_level_module\.decoder\.fpn\.layers\.(\d+)\.proj\.", lambda m: f"pixel_decoder.adapter_{3 - int(m[1])}."),
    (r"^model\.pixel_level_module\.decoder\.fpn\.layers\.(\d+)\.block\.", lambda m: f"pixel_decoder.layer_{3 - int(m[1])}."),
    (r"^model\.pixel_level_module\.decoder\.mask_projection\.", "pixel_decoder.mask_features."),
    (r"^model\.transformer_module\.queries_embedder\.", "predictor.query_embed."),
    (r"^model\.transformer_module\.input_projection\.", "predictor.input_proj."),
    (r"^model\.transformer_module\.decoder\.layers\.(\d+)\.self_attn\.o_proj\.",
     lambda m: f"predictor.layers.{m[1]}.self_attn.out_proj."),
    (r"^model\.transformer_module\.decoder\.layers\.(\d+)\.encoder_attn\.o_proj\.",
     lambda m: f"predictor.layers.{m[1]}.multihead_attn.out_proj."),
    (r"^model\.transformer_module\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.",
     lambda m: f"predictor.layers.{m[1]}.norm1."),
    (r"^model\.transformer_module\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.",
     lambda m: f"predictor.layers.{m[1]}.norm2."),
    (r"^model\.transformer_module\.decoder\.layers\.(\d+)\.final_layer_norm\.",
     lambda m: f"predictor.layers.{m[1]}.norm3."),
    (r"^model\.transformer_module\.decoder\.layers\.(\d+)\.mlp\.fc(\d)\.",
     lambda m: f"predictor.layers.{m[1]}.linear{m[2]}."),
    (r"^model\.transformer_module\.decoder\.layernorm\.", "predictor.decoder_norm."),
    (r"^class_predictor\.", "predictor.class_embed."),
    (r"^mask_embedder\.(\d+)\.0\.", lambda m: f"predictor.mask_embed.layers.{m[1]}."),
]

_OFFICIAL_MF: Rules = [
    (r"^sem_seg_head\.pixel_decoder\.(adapter|layer)_(\d+)\.norm\.", lambda m: f"pixel_decoder.{m[1]}_{m[2]}.1."),
    (r"^sem_seg_head\.pixel_decoder\.(adapter|layer)_(\d+)\.weight$", lambda m: f"pixel_decoder.{m[1]}_{m[2]}.0.weight"),
    (r"^sem_seg_head\.pixel_decoder\.mask_features\.", "pixel_decoder.mask_features."),
    (r"^sem_seg_head\.predictor\.transformer\.decoder\.layers\.", "predictor.layers."),
    (r"^sem_seg_head\.predictor\.transformer\.decoder\.norm\.", "predictor.decoder_norm."),
    (r"^sem_seg_head\.predictor\.", "predictor."),
]


def _apply(rules: Rules, key: str):
    for pattern, repl in rules:
        m = re.match(pattern, key)
        if m:
            new = repl(m) if callable(repl) else repl
            return new + key[m.end():]
    return None


def _model_keys(model: nn.Module):
    return set(model.state_dict().keys())


def _drop_bn_counters(out: Dict[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
    own = _model_keys(model)
    return {k: v for k, v in out.items() if not (k.endswith("num_batches_tracked") and k not in own)}


def _is_mask2former(model) -> bool:
    from .model import Mask2Former
    return isinstance(model, Mask2Former)


def _is_maskformer(model) -> bool:
    from .maskformer import MaskFormer
    return isinstance(model, MaskFormer)


def is_transformers(sd: Mapping[str, Tensor], model) -> bool:
    return _is_mask2former(model) and any(k.startswith("model.pixel_level_module.") for k in sd)


def from_transformers(sd: Mapping[str, Tensor], model) -> Dict[str, Tensor]:
    """transformers' names to ours (Mask2Former or MaskFormer, by the model's type)."""
    maskformer = _is_maskformer(model)
    rules = _HF_MF if maskformer else _HF
    out: Dict[str, Tensor] = {}
    qkv: Dict[Tuple[str, str, str], Dict[str, Tensor]] = {}
    backbone = "model.pixel_level_module.encoder."
    for k, v in sd.items():
        if k.startswith("criterion."):
            continue
        if k.startswith(backbone):
            new = _apply(_HF_RESNET, k[len(backbone):])
            out["backbone." + new if new is not None else k] = v
            continue
        m = re.match(r"^model\.transformer_module\.decoder\.layers\.(\d+)\.(self_attn|encoder_attn)\.([qkv])_proj\."
                     r"(weight|bias)$", k)
        if m and (maskformer or m[2] == "self_attn"):
            attn = "multihead_attn" if m[2] == "encoder_attn" else "self_attn"
            qkv.setdefault((m[1], attn, m[4]), {})[m[3]] = v
            continue
        new = _apply(rules, k)
        out[new if new is not None else k] = v
    for (layer, attn, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"transformers layout: decoder layer {layer} lacks some of its {attn} q/k/v {kind}")
        out[f"predictor.layers.{layer}.{attn}.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return _drop_bn_counters(out, model)


def is_official(sd: Mapping[str, Tensor], model) -> bool:
    return _is_mask2former(model) and any(k.startswith("sem_seg_head.") for k in sd)


def from_official(sd: Mapping[str, Tensor], model) -> Dict[str, Tensor]:
    """The official repositories' names to ours (Mask2Former or MaskFormer, by the model's type)."""
    rules = _OFFICIAL_MF if _is_maskformer(model) else _OFFICIAL
    out: Dict[str, Tensor] = {}
    for k, v in sd.items():
        if k in ("pixel_mean", "pixel_std") or k.startswith("criterion."):
            continue
        if not isinstance(v, Tensor):
            v = torch.as_tensor(v)
        if k.startswith("backbone."):
            new = _apply(_OFFICIAL_RESNET, k[len("backbone."):])
            out["backbone." + new if new is not None else k] = v
            continue
        new = _apply(rules, k)
        out[new if new is not None else k] = v
    return _drop_bn_counters(out, model)


def to_official(model: nn.Module) -> Dict[str, Tensor]:
    """The model's state dict under the official key names (the inverse of ``from_official``;
    for tests and for exporting to the official code)."""
    name = _official_name_maskformer if _is_maskformer(model) else _official_name
    return {name(k): v for k, v in model.state_dict().items()}


def _official_name_maskformer(k: str) -> str:
    if k.startswith("backbone."):
        return _official_name(k)
    rules = [
        (r"^pixel_decoder\.(adapter|layer)_(\d+)\.0\.weight$", lambda m: f"sem_seg_head.pixel_decoder.{m[1]}_{m[2]}.weight"),
        (r"^pixel_decoder\.(adapter|layer)_(\d+)\.1\.", lambda m: f"sem_seg_head.pixel_decoder.{m[1]}_{m[2]}.norm."),
        (r"^pixel_decoder\.", "sem_seg_head.pixel_decoder."),
        (r"^predictor\.layers\.", "sem_seg_head.predictor.transformer.decoder.layers."),
        (r"^predictor\.decoder_norm\.", "sem_seg_head.predictor.transformer.decoder.norm."),
        (r"^predictor\.", "sem_seg_head.predictor."),
    ]
    return _apply(rules, k) or k


def _official_name(k: str) -> str:
    if k.startswith("backbone."):
        rest = k[len("backbone."):]
        rules = [
            (r"^conv1\.", "stem.conv1."), (r"^bn1\.", "stem.conv1.norm."),
            (r"^layer(\d)\.(\d+)\.downsample\.0\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut."),
            (r"^layer(\d)\.(\d+)\.downsample\.1\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm."),
            (r"^layer(\d)\.(\d+)\.conv(\d)\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}."),
            (r"^layer(\d)\.(\d+)\.bn(\d)\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm."),
        ]
        return "backbone." + (_apply(rules, rest) or rest)
    rules = [
        (r"^pixel_decoder\.level_embed$", "sem_seg_head.pixel_decoder.transformer.level_embed"),
        (r"^pixel_decoder\.encoder\.(\d+)\.", lambda m: f"sem_seg_head.pixel_decoder.transformer.encoder.layers.{m[1]}."),
        (r"^pixel_decoder\.(adapter|layer)_(\d+)\.0\.weight$", lambda m: f"sem_seg_head.pixel_decoder.{m[1]}_{m[2]}.weight"),
        (r"^pixel_decoder\.(adapter|layer)_(\d+)\.1\.", lambda m: f"sem_seg_head.pixel_decoder.{m[1]}_{m[2]}.norm."),
        (r"^pixel_decoder\.", "sem_seg_head.pixel_decoder."),
        (r"^predictor\.layers\.(\d+)\.self_attn\.",
         lambda m: f"sem_seg_head.predictor.transformer_self_attention_layers.{m[1]}.self_attn."),
        (r"^predictor\.layers\.(\d+)\.self_norm\.",
         lambda m: f"sem_seg_head.predictor.transformer_self_attention_layers.{m[1]}.norm."),
        (r"^predictor\.layers\.(\d+)\.cross_attn\.",
         lambda m: f"sem_seg_head.predictor.transformer_cross_attention_layers.{m[1]}.multihead_attn."),
        (r"^predictor\.layers\.(\d+)\.cross_norm\.",
         lambda m: f"sem_seg_head.predictor.transformer_cross_attention_layers.{m[1]}.norm."),
        (r"^predictor\.layers\.(\d+)\.ffn_norm\.", lambda m: f"sem_seg_head.predictor.transformer_ffn_layers.{m[1]}.norm."),
        (r"^predictor\.layers\.(\d+)\.(linear\d)\.",
         lambda m: f"sem_seg_head.predictor.transformer_ffn_layers.{m[1]}.{m[2]}."),
        (r"^predictor\.", "sem_seg_head.predictor."),
    ]
    return _apply(rules, k) or k


register_layout("transformers", is_transformers, from_transformers, first=True)
register_layout("mask2former_official", is_official, from_official, first=True)
