"""`bamboo ...` command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_demo(args) -> int:
    from bamboo.demo import run_demo

    run_demo(config=args.config, new_tokens=args.new_tokens, batches=args.batches)
    return 0


def _cmd_inspect(args) -> int:
    import torch

    import bamboo
    from bamboo.models import BambooConfig, BambooForCausalLM
    from bamboo.models.checkpoint import CONFIG_NAME

    target = Path(args.model)
    if target.is_dir():
        config = BambooConfig.from_json_file(target / CONFIG_NAME)
    else:
        config = BambooConfig.named(args.model)
    dtype = getattr(torch, config.torch_dtype or "float32")
    with torch.device("meta"):  # shapes are all inspect needs: no weights are read or allocated
        model = BambooForCausalLM(config).to(dtype)
    example = torch.zeros(args.batch, args.seq_len, dtype=torch.long, device="meta")
    sites = bamboo.inspect(model, (example,))
    print(f"{args.model}: {len(sites)} FFN site(s)")
    print(sites)
    return 0


def main(argv=None) -> int:
    from bamboo import __version__
    from bamboo.errors import BambooError

    parser = argparse.ArgumentParser(prog="bamboo", description="Compile ReLU-sparse LLMs.")
    parser.add_argument("--version", action="version", version=f"bamboo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate, profile sparsity and compile the tiny built-in model")
    demo.add_argument("--config", default="tiny", help="built-in config name (default: tiny)")
    demo.add_argument("--new-tokens", type=int, default=16)
    demo.add_argument("--batches", type=int, default=8, help="batches for the sparsity profile")
    demo.set_defaults(func=_cmd_demo)

    inspect = sub.add_parser("inspect", help="list the FFN sites of a checkpoint directory or built-in config")
    inspect.add_argument("model", help="checkpoint directory, or a built-in config name (tiny, bamboo-7b)")
    inspect.add_argument("--batch", type=int, default=2)
    inspect.add_argument("--seq-len", type=int, default=8)
    inspect.set_defaults(func=_cmd_inspect)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BambooError as exc:
        print(f"bamboo: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
