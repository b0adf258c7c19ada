"""The embedded toy world: prompts, renderer, exact reward, tiny text-to-image model and its checkpoint.

A fresh machine has no model weights and cannot download any, so the project ships this small world
(32×32 RGB images of coloured circles/squares/triangles) on which every code path runs for real.
"""

from pathlib import Path

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"


def is_toy_checkpoint(path) -> bool:
    """Whether ``model.path`` names a toy-world model: ``"toy"`` (the embedded checkpoint) or a folder whose
    ``model_index.json`` has a ``b2diffurl_toy`` entry (e.g. one written by ``python -m b2diffurl.toy.pretrain
    --out DIR``). Reads one small JSON file; anything unreadable is not a toy checkpoint."""
    import json

    if str(path) == "toy":
        return True
    index = Path(str(path)).expanduser() / "model_index.json"
    try:
        return "b2diffurl_toy" in json.loads(index.read_text())
    except (OSError, ValueError, TypeError):
        return False
