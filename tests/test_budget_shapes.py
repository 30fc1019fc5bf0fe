"""The load-time token budget tries the image shapes where the models' own processors make the most image
tokens: InternVL2's dynamic tiling (vLLM's own code, through engines/image_tokens.py) reaches its largest
tile count over `budget.image_shapes` that any aspect ratio reaches (a sweep of 400 ratios from 1:8 to 8:1).
Before 4:3 and 3:4 were tried, the 'worst case' had 10 tiles where a 4:3 crop has 13."""

from __future__ import annotations

from annotate.engines.image_tokens import processing_for
from annotate.stages.budget import image_shapes

MAX_SIDE = 1024  # pipelines/longgrit.yaml crops.max_side


def test_the_budget_shapes_hold_internvls_largest_tiling():
    tiling = processing_for("internvl")
    tried = max(tiling.tiles(w, h) for w, h in image_shapes(MAX_SIDE))
    sweep = [8 ** ((i - 200) / 200) for i in range(401)]  # width / height from 1/8 to 8
    sizes = [(MAX_SIDE, max(16, round(MAX_SIDE / r))) if r >= 1 else (max(16, round(MAX_SIDE * r)), MAX_SIDE) for r in sweep]
    worst = max(tiling.tiles(w, h) for w, h in sizes)
    assert tried == worst == 13, (tried, worst)
    assert tiling.tiles(1024, 768) == 13 and tiling.tiles(1024, 1024) == 10  # 4:3 beats the square
