"""The SAM model (image encoder, prompt encoder, mask decoder, pre- and post-processing)
and its builders: ``sam_vit_b``, ``sam_vit_l``, ``sam_vit_h`` (the official
configurations) and ``sam_vit_tiny`` (a small configuration that trains on a CPU).
``sam_model_registry`` mirrors segment-anything's."""
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import register_model
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .transformer import TwoWayTransformer

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class Sam(nn.Module):
    """Segment Anything: ``image_encoder`` embeds a padded, normalised image once;
    ``prompt_encoder`` and ``mask_decoder`` turn prompts into mask logits at 4x the
    embedding's resolution and IoU predictions. Attribute and parameter names are the
    official ones (``SamPredictor`` and ``SamAutomaticMaskGenerator`` use them)."""

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(self, image_encoder: ImageEncoderViT, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder,
                 pixel_mean: Sequence[float] = PIXEL_MEAN, pixel_std: Sequence[float] = PIXEL_STD):
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def img_size(self) -> int:
        return self.image_encoder.img_size

    def preprocess(self, x: Tensor) -> Tensor:
        """Normalises (…, 3, h, w) pixel values and pads bottom-right to img_size."""
        h, w = x.shape[-2:]
        if max(h, w) > self.img_size:
            raise ValueError(f"preprocess: image of {h}x{w} is larger than the model's input size "
                             f"{self.img_size}; resize it first (ResizeLongestSide)")
        x = (x - self.pixel_mean) / self.pixel_std
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))

    def postprocess_masks(self, masks: Tensor, input_size: Tuple[int, ...], original_size: Tuple[int, ...]) -> Tensor:
        """Low-resolution logits (B, M, 4h, 4w) -> (B, M, H, W) logits of the original image:
        upsampled to img_size, cropped to the resized image's ``input_size``, resized to
        ``original_size`` (bilinear, as the official)."""
        masks = F.interpolate(masks, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
        masks = masks[..., :input_size[0], :input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)

    def forward(self, batched_input, multimask_output: bool = True, targets=None):
        """In training mode with images and targets (``model(images, targets)``, as the
        trainer calls it): the training losses of ``training.sam_losses``. Otherwise the
        official batched interface (``_forward_official``)."""
        if isinstance(multimask_output, (list, tuple)):   # model(images, targets)
            targets, multimask_output = multimask_output, True
        if targets is not None:
            from .training import sam_losses
            return sam_losses(self, batched_input, targets)
        return self._forward_official(batched_input, multimask_output)

    def _forward_official(self, batched_input: List[Dict[str, Any]], multimask_output: bool
                          ) -> List[Dict[str, Tensor]]:
        """The official batched interface: each dict has ``image`` (3, h, w, already
        resized), ``original_size`` (H, W) and optional ``point_coords`` (B, N, 2),
        ``point_labels`` (B, N), ``boxes`` (B, 4), ``mask_inputs`` (B, 1, 4h', 4w'). Returns
        per image ``masks`` (thresholded, original size), ``iou_predictions`` and
        ``low_res_logits``. Gradients flow when called under grad."""
        images = torch.stack([self.preprocess(x["image"]) for x in batched_input])
        embeddings = self.image_encoder(images)
        outputs = []
        for record, emb in zip(batched_input, embeddings):
            points = (record["point_coords"], record["point_labels"]) if "point_coords" in record else None
            sparse, dense = self.prompt_encoder(points=points, boxes=record.get("boxes"),
                                                masks=record.get("mask_inputs"))
            low_res, iou = self.mask_decoder(emb.unsqueeze(0), self.prompt_encoder.get_dense_pe(), sparse, dense,
                                             multimask_output)
            masks = self.postprocess_masks(low_res, record["image"].shape[-2:], record["original_size"])
            outputs.append({"masks": masks > self.mask_threshold, "iou_predictions": iou, "low_res_logits": low_res})
        return outputs


def build_sam(*, encoder_embed_dim: int, encoder_depth: int, encoder_num_heads: int,
              encoder_global_attn_indexes: Sequence[int], img_size: int = 1024, patch_size: int = 16,
              window_size: int = 14, prompt_embed_dim: int = 256, decoder_depth: int = 2,
              decoder_mlp_dim: int = 2048, decoder_num_heads: int = 8, mask_in_chans: int = 16,
              iou_head_hidden_dim: int = 256, checkpoint: Optional[str] = None) -> Sam:
    """A SAM of any size (the official builders' ``_build_sam`` with its constants as
    arguments); ``checkpoint``: a state dict or path for ``load_pretrained``."""
    grid = img_size // patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size, patch_size=patch_size, embed_dim=encoder_embed_dim, depth=encoder_depth,
            num_heads=encoder_num_heads, mlp_ratio=4, out_chans=prompt_embed_dim, qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, rel_pos_zero_init=True,
            window_size=window_size, global_attn_indexes=tuple(encoder_global_attn_indexes)),
        prompt_encoder=PromptEncoder(embed_dim=prompt_embed_dim, image_embedding_size=(grid, grid),
                                     input_image_size=(img_size, img_size), mask_in_chans=mask_in_chans),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=decoder_depth, embedding_dim=prompt_embed_dim,
                                          mlp_dim=decoder_mlp_dim, num_heads=decoder_num_heads),
            transformer_dim=prompt_embed_dim, iou_head_depth=3, iou_head_hidden_dim=iou_head_hidden_dim))
    sam.eval()
    if checkpoint is not None:
        from ..weights import load_pretrained
        load_pretrained(sam, checkpoint)
    return sam


@register_model()
def sam_vit_h(**overrides) -> Sam:
    """SAM ViT-H (the official default): 1280 wide, 32 blocks, 16 heads."""
    cfg = dict(encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
               encoder_global_attn_indexes=(7, 15, 23, 31))
    return build_sam(**{**cfg, **overrides})


@register_model()
def sam_vit_l(**overrides) -> Sam:
    """SAM ViT-L: 1024 wide, 24 blocks, 16 heads."""
    cfg = dict(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
               encoder_global_attn_indexes=(5, 11, 17, 23))
    return build_sam(**{**cfg, **overrides})


@register_model()
def sam_vit_b(**overrides) -> Sam:
    """SAM ViT-B: 768 wide, 12 blocks, 12 heads."""
    cfg = dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
               encoder_global_attn_indexes=(2, 5, 8, 11))
    return build_sam(**{**cfg, **overrides})


TINY_CONFIG = dict(encoder_embed_dim=96, encoder_depth=4, encoder_num_heads=3, encoder_global_attn_indexes=(1, 3),
                   img_size=256, patch_size=16, window_size=7, prompt_embed_dim=64, decoder_depth=2,
                   decoder_mlp_dim=256, decoder_num_heads=4, mask_in_chans=16, iou_head_hidden_dim=64)


@register_model()
def sam_vit_tiny(**overrides) -> Sam:
    """A small SAM that trains on a CPU: input 256 px (16x16 embedding, 64x64 mask logits),
    a 96-wide 4-block encoder (global attention in blocks 1 and 3, 7x7 windows elsewhere),
    a 64-wide decoder. Same classes as the official sizes."""
    return build_sam(**{**TINY_CONFIG, **overrides})


def _official_builder(fn):
    def build(checkpoint: Optional[str] = None) -> Sam:
        return fn(checkpoint=checkpoint)
    return build


# segment-anything's ``sam_model_registry[name](checkpoint=...)``
sam_model_registry = {"default": _official_builder(sam_vit_h), "vit_h": _official_builder(sam_vit_h),
                      "vit_l": _official_builder(sam_vit_l), "vit_b": _official_builder(sam_vit_b)}
build_sam_vit_h = sam_model_registry["vit_h"]
build_sam_vit_l = sam_model_registry["vit_l"]
build_sam_vit_b = sam_model_registry["vit_b"]


# --- checkpoint layouts -------------------------------------------------------------------
# The official layout is this model's own (same names; pixel_mean/pixel_std are not saved).
# transformers' SamModel renames (its convert_sam_to_hf.py, reversed here).

def _is_official(sd, model) -> bool:
    return isinstance(model, Sam) and any(k.startswith("image_encoder.") for k in sd) \
        and any(k.startswith("mask_decoder.") for k in sd)


def _official(sd, model) -> Dict[str, Tensor]:
    return {k: v for k, v in sd.items() if k not in ("pixel_mean", "pixel_std")}


def _is_transformers(sd, model) -> bool:
    return isinstance(model, Sam) and any(k.startswith("vision_encoder.") for k in sd)


_HF_RENAMES = [  # (pattern, replacement) applied in order to each transformers key
    (r"^vision_encoder\.", "image_encoder."),
    (r"^image_encoder\.layers\.", "image_encoder.blocks."),
    (r"\.patch_embed\.projection\.", ".patch_embed.proj."),
    (r"^image_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
    (r"^image_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
    (r"^image_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
    (r"^image_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
    (r"\.layer_norm([1-4])\.", r".norm\1."),
    (r"\.layer_norm_final_attn\.", ".norm_final_attn."),
    (r"^prompt_encoder\.shared_embedding\.positional_embedding$",
     "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (r"^prompt_encoder\.point_embed\.", "prompt_encoder.point_embeddings."),
    (r"^prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
    (r"^prompt_encoder\.mask_embed\.norm1\.", "prompt_encoder.mask_downscaling.1."),
    (r"^prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
    (r"^prompt_encoder\.mask_embed\.norm2\.", "prompt_encoder.mask_downscaling.4."),
    (r"^prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
    (r"^mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
    (r"^mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
    (r"^mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
]


def _hf_mlp_key(key: str, model: nn.Module) -> str:
    """transformers' MLP ``proj_in`` / ``layers.i`` / ``proj_out`` -> ``layers.0`` / ``layers.i+1`` /
    ``layers.last``."""
    import re
    m = re.match(r"^(mask_decoder\.(?:iou_prediction_head|output_hypernetworks_mlps\.\d+))\."
                 r"(proj_in|proj_out|layers\.(\d+))\.(weight|bias)$", key)
    if m is None:
        return key
    prefix, part, hidden, param = m.groups()
    if part == "proj_in":
        index = 0
    elif part == "proj_out":
        index = len(model.get_submodule(prefix).layers) - 1
    else:
        index = int(hidden) + 1
    return f"{prefix}.layers.{index}.{param}"


def _transformers(sd, model) -> Dict[str, Tensor]:
    import re
    out = {}
    shared = sd.get("shared_image_embedding.positional_embedding")
    for key, value in sd.items():
        if key == "shared_image_embedding.positional_embedding":
            continue   # a copy of the prompt encoder's (checked below)
        for pattern, repl in _HF_RENAMES:
            key = re.sub(pattern, repl, key)
        out[_hf_mlp_key(key, model)] = value
    pe = out.get("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix")
    if shared is not None and pe is not None and not torch.equal(shared, pe):
        raise ValueError("transformers checkpoint: shared_image_embedding.positional_embedding differs from "
                         "prompt_encoder.shared_embedding.positional_embedding; SAM uses one encoding for both")
    if pe is None and shared is not None:
        out["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = shared
    return out


def sam_state_dict_to_transformers(sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """This model's (= the official) state dict renamed for transformers' ``SamModel``."""
    import re
    reverse = [
        (r"^image_encoder\.blocks\.(\d+)\.norm([12])\.", r"vision_encoder.layers.\1.layer_norm\2."),
        (r"^image_encoder\.blocks\.", "vision_encoder.layers."),
        (r"^image_encoder\.patch_embed\.proj\.", "vision_encoder.patch_embed.projection."),
        (r"^image_encoder\.neck\.0\.", "vision_encoder.neck.conv1."),
        (r"^image_encoder\.neck\.1\.", "vision_encoder.neck.layer_norm1."),
        (r"^image_encoder\.neck\.2\.", "vision_encoder.neck.conv2."),
        (r"^image_encoder\.neck\.3\.", "vision_encoder.neck.layer_norm2."),
        (r"^image_encoder\.", "vision_encoder."),
        (r"^prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$",
         "prompt_encoder.shared_embedding.positional_embedding"),
        (r"^prompt_encoder\.point_embeddings\.", "prompt_encoder.point_embed."),
        (r"^prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
        (r"^prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
        (r"^prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
        (r"^prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
        (r"^prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
        (r"^(mask_decoder\.transformer\.layers\.\d+)\.norm([1-4])\.", r"\1.layer_norm\2."),
        (r"^mask_decoder\.transformer\.norm_final_attn\.", "mask_decoder.transformer.layer_norm_final_attn."),
        (r"^mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
        (r"^mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
        (r"^mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
    ]
    mlp_depth: Dict[str, int] = {}
    for key in sd:
        m = re.match(r"^(mask_decoder\.(?:iou_prediction_head|output_hypernetworks_mlps\.\d+))\.layers\.(\d+)\.", key)
        if m:
            mlp_depth[m.group(1)] = max(mlp_depth.get(m.group(1), 0), int(m.group(2)) + 1)
    out = {}
    for key, value in sd.items():
        if key in ("pixel_mean", "pixel_std"):
            continue
        m = re.match(r"^(mask_decoder\.(?:iou_prediction_head|output_hypernetworks_mlps\.\d+))\.layers\.(\d+)\.(.*)$",
                     key)
        if m:
            prefix, i, rest = m.group(1), int(m.group(2)), m.group(3)
            part = "proj_in" if i == 0 else "proj_out" if i == mlp_depth[prefix] - 1 else f"layers.{i - 1}"
            key = f"{prefix}.{part}.{rest}"
        else:
            for pattern, repl in reverse:
                new = re.sub(pattern, repl, key)
                if new != key:
                    key = new
                    break
        out[key] = value
    out["shared_image_embedding.positional_embedding"] = out["prompt_encoder.shared_embedding.positional_embedding"]
    return out


def _register_layouts() -> None:
    from ..weights import register_layout
    register_layout("transformers_sam", _is_transformers, _transformers, first=True)
    register_layout("segment_anything", _is_official, _official, first=True)


_register_layouts()
