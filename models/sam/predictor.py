"""``SamPredictor``: segment-anything's predictor API (embed an image once, then prompt it
any number of times)."""
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .model import Sam
from .transforms import ResizeLongestSide


class SamPredictor:
    def __init__(self, sam_model: Sam) -> None:
        self.model = sam_model
        self.transform = ResizeLongestSide(sam_model.image_encoder.img_size)
        self.reset_image()

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embeds ``image``: (H, W, 3) uint8 in ``image_format`` ("RGB" or "BGR")."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"set_image: expected an (H, W, 3) image, got shape {image.shape} "
                             "(channels last; for a (3, H, W) tensor use set_torch_image after resizing)")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"set_image: empty image of shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"set_image: expected uint8 pixels in [0, 255], got {image.dtype}")
        if image_format != self.model.image_format:
            image = image[..., ::-1]
        resized = self.transform.apply_image(image)
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        self.set_torch_image(x, image.shape[:2])

    @torch.no_grad()
    def set_torch_image(self, transformed_image: Tensor, original_image_size: Tuple[int, ...]) -> None:
        """Embeds an already resized (1, 3, h, w) image with max(h, w) == img_size."""
        if (transformed_image.dim() != 4 or transformed_image.shape[1] != 3
                or max(*transformed_image.shape[2:]) != self.model.image_encoder.img_size):
            raise ValueError(f"set_torch_image input must be BCHW with long side "
                             f"{self.model.image_encoder.img_size}, got {tuple(transformed_image.shape)}")
        self.reset_image()
        self.original_size = tuple(int(s) for s in original_image_size)
        self.input_size = tuple(transformed_image.shape[-2:])
        self.features = self.model.image_encoder(self.model.preprocess(transformed_image))
        self.is_image_set = True

    def predict(self, point_coords: Optional[np.ndarray] = None, point_labels: Optional[np.ndarray] = None,
                box: Optional[np.ndarray] = None, mask_input: Optional[np.ndarray] = None,
                multimask_output: bool = True, return_logits: bool = False
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one prompt set, in original-image pixel coordinates: ``point_coords``
        (N, 2) XY with ``point_labels`` (N,) 1 foreground / 0 background, ``box`` (4,) XYXY,
        ``mask_input`` (1, 256, 256) low-resolution logits from an earlier call. Returns masks
        (C, H, W) (logits with ``return_logits``), IoU predictions (C,) and low-resolution
        logits (C, 256, 256), C = 3 with ``multimask_output`` else 1."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        coords_t = labels_t = box_t = mask_t = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be supplied if point_coords is supplied.")
            point_coords = np.asarray(point_coords)
            point_labels = np.asarray(point_labels)
            if point_coords.ndim != 2 or point_coords.shape[1] != 2 or point_labels.shape != point_coords.shape[:1]:
                raise ValueError(f"point_coords must be (N, 2) and point_labels (N,), got "
                                 f"{point_coords.shape} and {point_labels.shape}")
            self._check_inside(point_coords, "point_coords")
            coords = self.transform.apply_coords(point_coords, self.original_size)
            coords_t = torch.as_tensor(coords, dtype=torch.float, device=self.device)[None]
            labels_t = torch.as_tensor(point_labels, dtype=torch.int, device=self.device)[None]
        if box is not None:
            box = np.asarray(box)
            if box.size != 4:
                raise ValueError(f"box must be 4 numbers XYXY, got shape {box.shape}")
            self._check_inside(box.reshape(2, 2), "box")
            if box.reshape(-1)[2] < box.reshape(-1)[0] or box.reshape(-1)[3] < box.reshape(-1)[1]:
                raise ValueError(f"box must be XYXY with x1 <= x2 and y1 <= y2, got {box.reshape(-1).tolist()}")
            box_t = torch.as_tensor(self.transform.apply_boxes(box, self.original_size), dtype=torch.float,
                                    device=self.device)[None]
        if mask_input is not None:
            want = (1,) + tuple(self.model.prompt_encoder.mask_input_size)
            if np.shape(mask_input) != want:
                raise ValueError(f"mask_input must be {want} low-resolution logits (a previous call's third "
                                 f"output), got shape {np.shape(mask_input)}")
            mask_t = torch.as_tensor(mask_input, dtype=torch.float, device=self.device)[None]
        masks, iou, low_res = self.predict_torch(coords_t, labels_t, box_t, mask_t, multimask_output,
                                                 return_logits=return_logits)
        return masks[0].cpu().numpy(), iou[0].cpu().numpy(), low_res[0].cpu().numpy()

    def _check_inside(self, xy: np.ndarray, what: str) -> None:
        """Prompts are pixel coordinates of the original image: [0, W] x [0, H]."""
        h, w = self.original_size
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        bad = ~np.isfinite(xy).all(1) | (xy[:, 0] < 0) | (xy[:, 0] > w) | (xy[:, 1] < 0) | (xy[:, 1] > h)
        if bad.any():
            raise ValueError(f"{what}: {xy[bad].tolist()} outside the {w}x{h} (W x H) image; prompts are XY "
                             "pixel coordinates of the image given to set_image")

    @torch.no_grad()
    def predict_torch(self, point_coords: Optional[Tensor], point_labels: Optional[Tensor],
                      boxes: Optional[Tensor] = None, mask_input: Optional[Tensor] = None,
                      multimask_output: bool = True, return_logits: bool = False
                      ) -> Tuple[Tensor, Tensor, Tensor]:
        """Batched prompts already in the resized image's coordinates (``transform``):
        ``point_coords`` (B, N, 2), ``point_labels`` (B, N), ``boxes`` (B, 4),
        ``mask_input`` (B, 1, 256, 256). Returns masks (B, C, H, W), IoU (B, C), low-res
        logits (B, C, 256, 256)."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        low_res, iou = self._decode(point_coords, point_labels, boxes, mask_input, multimask_output)
        masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou, low_res

    def _decode(self, point_coords, point_labels, boxes, mask_input, multimask_output) -> Tuple[Tensor, Tensor]:
        points = (point_coords, point_labels) if point_coords is not None else None
        if points is None and boxes is None and mask_input is None:
            raise ValueError("no prompt: give points, a box or a mask input")
        sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        return self.model.mask_decoder(image_embeddings=self.features,
                                       image_pe=self.model.prompt_encoder.get_dense_pe(),
                                       sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                       multimask_output=multimask_output)

    def get_image_embedding(self) -> Tensor:
        """The (1, C, h, w) embedding of the set image."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) to generate an embedding.")
        return self.features

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features = None
        self.orig_h = self.orig_w = self.input_h = self.input_w = None
        self.original_size = self.input_size = None
