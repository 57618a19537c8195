#!/usr/bin/env python3
"""Convert a PyTorch .pth state dict (e.g. PSPNet's resnet50_v2.pth) to safetensors.

The Rust side reads only safetensors; names are kept as they are (the loader maps PSPNet,
torchvision VGG and PFENet names itself), except DataParallel's `module.` prefix, which is
stripped, and a tensor held under two names is written under each (the loader drops BAM's
`encoder.*` aliases). Run it with the set-up venv's python:

    ~/.cache/svf/torch-2.11.0/bin/python scripts/convert_weights.py IN.pth OUT.safetensors

(`$SVF_CACHE_DIR/torch-2.11.0/bin/python` when the cache folder was moved).
"""

import argparse
import sys

import torch
from safetensors.torch import save_file


def state_dict_of(obj):
    """The tensor mapping inside a checkpoint: a bare state dict or one under `state_dict`."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        sys.exit(f"expected a state dict (name -> tensor), got {type(obj).__name__}")
    return obj


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="PyTorch checkpoint (.pth) holding a state dict")
    parser.add_argument("output", help="safetensors file to write")
    args = parser.parse_args()

    checkpoint = torch.load(args.input, map_location="cpu", weights_only=True)
    tensors = {}
    for name, value in state_dict_of(checkpoint).items():
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
