"""Segment-anything in the calling process: boxes in, pixel masks out (transformers `SamModel`).

Not a chat model, so not behind the chat `Engine` interface: the segment step (object masks from boxes)
and the `parts` stage (part masks from a box and points inside the object) are its users.
Production: a SAM checkpoint from a local path on GPU workers; CPU runs use the tiny random one.
"""

from __future__ import annotations

import time

import numpy as np
from PIL import Image

from annotate.engines.model_path import resolve_model_path


class SamEngine:
    def __init__(self, path: str, device: str = "auto"):
        import torch
        from transformers import SamModel, SamProcessor

        started = time.perf_counter()
        self.model_id = path
        local = resolve_model_path(path)
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.processor = SamProcessor.from_pretrained(local)
        self.model = SamModel.from_pretrained(local).to(self.device).eval()
        self.startup_s = time.perf_counter() - started

    def segment(self, image: Image.Image, boxes_xyxy: list[list[float]],
                points: list[list[tuple[float, float]]] | None = None) -> list[tuple[np.ndarray, float]]:
        """One (bool HxW mask, predicted IoU) per box, for boxes in `image`'s pixel coordinates. `points`:
        positive points per box, the same number for every box (SAM's prompt encoder embeds a box's points
        beside its box), or None for boxes alone."""
        import torch

        if not boxes_xyxy:
            return []
        prompts: dict = {"input_boxes": [boxes_xyxy]}
        if points is not None:
            if len(points) != len(boxes_xyxy) or len({len(p) for p in points}) != 1 or not points[0]:
                raise ValueError("points: one non-empty list per box, all of the same length")
            prompts |= {"input_points": [[[list(xy) for xy in box_points] for box_points in points]],
                        "input_labels": [[[1] * len(box_points) for box_points in points]]}
        inputs = self.processor(images=[image], return_tensors="pt", **prompts).to(self.device)
        with torch.inference_mode():
            out = self.model(**inputs, multimask_output=False)
        masks = self.processor.image_processor.post_process_masks(
            out.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu()
        )[0]  # (boxes, 1, H, W) bool
        scores = out.iou_scores.cpu()[0, :, 0].tolist()
        return [(masks[i, 0].numpy().astype(bool), float(scores[i])) for i in range(len(boxes_xyxy))]
