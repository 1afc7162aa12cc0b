"""The benchmarks' shapes for the PyTorch peers, read from shapes.json beside this file (the one
place every language's benchmarks take them from; see its "about").

    from shapes import LAYER, DISPATCH, layer_names
"""
import json
import os

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes.json")) as f:
    _SHAPES = json.load(f)

# name -> (T, dim, inter, E, k)
LAYER = {s["name"]: (s["tokens"], s["dim"], s["inter"], s["experts"], s["topk"]) for s in _SHAPES["layer"]}
# name -> (T, hidden, E, k)
DISPATCH = {s["name"]: (s["tokens"], s["hidden"], s["experts"], s["topk"]) for s in _SHAPES["dispatch"]}
# the layer shapes run when no --shapes is given
DEFAULT_LAYER = ",".join(s["name"] for s in _SHAPES["layer"] if s["byDefault"])


def layer_names(arg):
    """The names of a --shapes argument (a comma list), each checked against LAYER."""
    names = arg.split(",")
    for n in names:
        if n not in LAYER:
            raise SystemExit(f"--shapes: unknown shape {n!r}; expected a comma list of {', '.join(LAYER)}")
    return names
