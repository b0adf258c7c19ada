"""The embedded toy world: prompts, renderer, exact reward, tiny text-to-image model and its checkpoint.

A fresh machine has no model weights and cannot download any, so the project ships this small world
(32×32 RGB images of coloured circles/squares/triangles) on which every code path runs for real.
"""

from pathlib import Path

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
