"""The embedded toy world: prompts, renderer, exact reward, tiny text-to-image model and its checkpoint.

A fresh machine has no model weights and cannot download any, so the project ships this small world
(32×32 RGB images of coloured circles/squares/triangles) on which every code path runs for real.
"""

from pathlib import Path

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"


def toy_recipe(path) -> dict | None:
    """The ``b2diffurl_toy`` block (layout and pretraining recipe) of the model named by ``model.path``:
    ``"toy"`` (the embedded checkpoint) or a folder (e.g. one written by ``python -m b2diffurl.toy.pretrain
    --out DIR``). None when the folder is not a toy checkpoint. Reads one small JSON file; anything unreadable
    is not a toy checkpoint."""
    import json

    folder = CHECKPOINT_DIR if str(path) == "toy" else Path(str(path)).expanduser()
    try:
        block = json.loads((folder / "model_index.json").read_text()).get("b2diffurl_toy")
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return block if isinstance(block, dict) else None


def is_toy_checkpoint(path) -> bool:
    """Whether ``model.path`` names a toy-world model (:func:`toy_recipe` finds its block)."""
    return str(path) == "toy" or toy_recipe(path) is not None
