#!/usr/bin/env python3
"""Convert a PyTorch .pth state dict (e.g. PSPNet's resnet50_v2.pth) to safetensors.

The Rust side reads only safetensors; names are kept as they are (the loader maps PSPNet,
torchvision VGG and PFENet names itself), except DataParallel's `module.` prefix, which is
stripped, and a tensor held under two names is written under each (the loader drops BAM's
`encoder.*` aliases). A training checkpoint that holds its state dict under one key (`state_dict`,
`model`, ...) is unwrapped; a pickled `nn.Module` is refused, not run. Run it with the set-up venv's python:

    ~/.cache/svf/torch-2.11.0/bin/python scripts/convert_weights.py IN.pth OUT.safetensors

(`$SVF_CACHE_DIR/torch-2.11.0/bin/python` when the cache folder was moved).
"""

import argparse
import pickle
import sys

import torch
from safetensors.torch import save_file


def is_tensor_dict(obj):
    return isinstance(obj, dict) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def state_dict_of(obj, path):
    """The tensor mapping inside a checkpoint: a bare state dict, or the one dict of tensors that
    a training checkpoint holds under a key (`state_dict`, `model`, ...) beside other entries."""
    if not isinstance(obj, dict):
        sys.exit(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        return obj["state_dict"]
    if all(torch.is_tensor(v) for v in obj.values()):
        return obj
    nested = [key for key, value in obj.items() if is_tensor_dict(value)]
    if len(nested) == 1:
        return obj[nested[0]]
    if nested:
        sys.exit(
            f"{path}: the entries {', '.join(map(repr, nested))} each hold a state dict; "
            f"save the one to convert on its own: torch.save(checkpoint[{nested[0]!r}], PATH)"
        )
    return obj


def load(path):
    """The checkpoint at `path`, loaded without running pickled code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # weights_only refuses pickled classes (a whole nn.Module saved with torch.save(model));
        # loading those would run the file's code, so they are not loaded at all.
        sys.exit(
            f"{path} holds pickled Python objects (a whole model saved with torch.save(model)?), "
            "which are not loaded since that would run code from the file; save the weights "
            "instead: torch.save(model.state_dict(), PATH)"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="PyTorch checkpoint (.pth) holding a state dict")
    parser.add_argument("output", help="safetensors file to write")
    args = parser.parse_args()

    checkpoint = load(args.input)
    tensors = {}
    for name, value in state_dict_of(checkpoint, args.input).items():
        if not torch.is_tensor(value):
            sys.exit(f"{args.input}: entry {name!r} is not a tensor ({type(value).__name__})")
        name = name.removeprefix("module.")
        if name in tensors:
            sys.exit(f"{args.input}: {name!r} appears twice once `module.` is stripped")
        # A copy each: checkpoints may hold one tensor under two names (BAM's PSPNet registers its
        # backbone as `layer{i}` and `encoder.{i}`), which safetensors refuses to write as shared.
        tensors[name] = value.detach().clone().contiguous()
    save_file(tensors, args.output)
    print(f"wrote {len(tensors)} tensors to {args.output}")


if __name__ == "__main__":
    main()
