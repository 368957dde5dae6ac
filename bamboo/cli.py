"""`bamboo ...` command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_demo(args) -> int:
    from bamboo.demo import run_demo

    run_demo(config=args.config, new_tokens=args.new_tokens, batches=args.batches, trained_model=not args.no_trained)
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


def _load_model(name_or_dir: str, dtype: str = "float32"):
    import torch

    from bamboo.models import BambooForCausalLM, pretrained_path

    target = Path(name_or_dir)
    if not target.is_dir():
        target = pretrained_path(name_or_dir)
    return BambooForCausalLM.from_pretrained(target, dtype=getattr(torch, dtype))


def _cmd_calibrate(args) -> int:
    import json

    import bamboo
    from bamboo.calibrate.corpus import load_processed, random_batches

    model = _load_model(args.model)
    train, _, provenance = load_processed()
    batches = random_batches(train, args.batch_size, args.seq_len, seed=args.seed)
    data = [next(batches) for _ in range(args.batches)]
    print(f"calibrating {args.model} on {args.batches} batches of {args.batch_size}x{args.seq_len} tokens of "
          f"{provenance['source'].split('(')[0].strip()}")
    predictors = bamboo.calibrate(model, data, rank=args.rank, target_recall=args.target_recall, epochs=args.epochs,
                                  seed=args.seed)
    predictors.save(args.out)
    print(predictors)
    print(f"saved {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps(predictors.to_json(), indent=2) + "\n")
    return 0


def _example_ids(batch: int, seq: int):
    import torch

    return torch.randint(3, 100, (batch, seq))


def _cmd_generate(args) -> int:
    import time

    import torch

    import bamboo
    from bamboo.models.tokenizer import BambooTokenizer, TextStreamer

    model = _load_model(args.model, args.dtype).to(args.device)
    tokenizer = BambooTokenizer()
    text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    prompt = tokenizer([text])["input_ids"].to(args.device)
    if args.sparsity != "dense" or args.backend != "eager":
        model = bamboo.compile(model, backend=args.backend, sparsity=args.sparsity, predictors=args.predictors)
    streamer = TextStreamer(tokenizer)
    times = []

    def stream(tokens):
        times.append(time.perf_counter())
        streamer(tokens)

    print(args.prompt, end="", flush=True)
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                       temperature=args.temperature, top_p=args.top_p, streamer=stream)
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    print(f"\n\n{len(times)} tokens; decode {decode:.1f} tok/s (first token excluded; {args.backend}, "
          f"{args.sparsity}, {args.device})")
    return 0


def _cmd_export_onnx(args) -> int:
    import bamboo

    model = _load_model(args.model)
    if args.decode_step:
        from bamboo.models.decode_step import BambooDecodeStep

        target = BambooDecodeStep(model)
        examples = target.example_inputs(args.max_seq_len)
    else:
        examples, target = (_example_ids(2, 8),), model
    path = bamboo.export_onnx(target, examples, args.out, sparsity=args.sparsity, predictors=args.predictors)
    print(f"wrote {path} ({args.sparsity}{', decode step with KV cache' if args.decode_step else ''})")
    return 0


def _cmd_export_tensorrt(args) -> int:
    from bamboo.errors import MissingDependencyError
    from bamboo.onnx.tensorrt_profile import build_tensorrt_engine, export_tensorrt_onnx

    model = _load_model(args.model)
    path = export_tensorrt_onnx(model, (_example_ids(2, 8),), args.out, sparsity=args.sparsity,
                                predictors=args.predictors, max_batch=args.max_batch, max_seq=args.max_seq_len)
    print(f"wrote {path}: ONNX in bamboo's TensorRT profile (checked; optimization profiles in its metadata)")
    if args.engine:
        try:
            engine = build_tensorrt_engine(path, args.engine, fp16=args.fp16)
        except MissingDependencyError as exc:
            print(f"no engine built: {exc}\nbuild it where TensorRT is installed: "
                  f"bamboo export-tensorrt ... --engine {args.engine} (or trtexec --onnx={path})")
            return 0
        print(f"wrote {engine}: TensorRT engine")
    return 0


def _cmd_onnx_optimize(args) -> int:
    from bamboo.onnx import optimize

    report = optimize(args.input, args.output, mode=args.mode)
    print(f"{args.input} -> {args.output}: {report['rewritten']} FFN(s) rewritten {report['rules']}")
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
    demo.add_argument("--no-trained", action="store_true", help="skip the section on the bundled trained model")
    demo.set_defaults(func=_cmd_demo)

    inspect = sub.add_parser("inspect", help="list the FFN sites of a checkpoint directory or built-in config")
    inspect.add_argument("model", help="checkpoint directory, or a built-in config name (tiny, bamboo-7b)")
    inspect.add_argument("--batch", type=int, default=2)
    inspect.add_argument("--seq-len", type=int, default=8)
    inspect.set_defaults(func=_cmd_inspect)

    cal = sub.add_parser("calibrate", help="train per-layer activation predictors for predictor mode")
    cal.add_argument("--model", default="austen-small", help="checkpoint directory or bundled model name")
    cal.add_argument("--out", default="predictors.safetensors")
    cal.add_argument("--json", default=None, help="also write the per-layer report as JSON")
    cal.add_argument("--rank", type=int, default=64)
    cal.add_argument("--target-recall", type=float, default=0.99)
    cal.add_argument("--epochs", type=int, default=3)
    cal.add_argument("--batches", type=int, default=64, help="batches of Austen training text")
    cal.add_argument("--batch-size", type=int, default=8)
    cal.add_argument("--seq-len", type=int, default=256)
    cal.add_argument("--seed", type=int, default=0)
    cal.set_defaults(func=_cmd_calibrate)

    gen = sub.add_parser("generate", help="generate text, printing tokens as they come and the decode speed")
    gen.add_argument("prompt")
    gen.add_argument("--model", default="austen-small", help="checkpoint directory or bundled model name")
    gen.add_argument("--max-new-tokens", type=int, default=48)
    gen.add_argument("--sparsity", default="exact", choices=["exact", "predictor", "dense"])
    gen.add_argument("--predictors", default=None)
    gen.add_argument("--backend", default="eager", choices=["eager", "inductor"])
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--do-sample", action="store_true")
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the ChatML template")
    gen.set_defaults(func=_cmd_generate)

    exp = sub.add_parser("export-onnx", help="export a model to ONNX with the sparse FFN in standard ops")
    exp.add_argument("--model", default="austen-small", help="checkpoint directory or bundled model name")
    exp.add_argument("--out", default="model.onnx")
    exp.add_argument("--sparsity", default="exact", choices=["exact", "predictor", "dense"])
    exp.add_argument("--predictors", default=None, help="predictor file (for --sparsity predictor)")
    exp.add_argument("--decode-step", action="store_true", help="export the cached step (KV cache in and out)")
    exp.add_argument("--max-seq-len", type=int, default=256, help="KV cache length of the decode step")
    exp.set_defaults(func=_cmd_export_onnx)

    trt = sub.add_parser("export-tensorrt", help="export ONNX in the TensorRT profile and build an engine")
    trt.add_argument("--model", default="austen-small", help="checkpoint directory or bundled model name")
    trt.add_argument("--out", default="model.trt.onnx")
    trt.add_argument("--engine", default=None, help="also build a TensorRT engine here (needs tensorrt and a GPU)")
    trt.add_argument("--sparsity", default="exact", choices=["exact", "predictor", "dense"])
    trt.add_argument("--predictors", default=None)
    trt.add_argument("--fp16", action="store_true")
    trt.add_argument("--max-batch", type=int, default=16)
    trt.add_argument("--max-seq-len", type=int, default=2048)
    trt.set_defaults(func=_cmd_export_tensorrt)

    opt = sub.add_parser("onnx-optimize", help="rewrite the dReLU/ReGLU FFNs of any ONNX model into the sparse form")
    opt.add_argument("input")
    opt.add_argument("output")
    opt.add_argument("--mode", default="exact", choices=["exact", "dense"])
    opt.set_defaults(func=_cmd_onnx_optimize)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BambooError as exc:
        print(f"bamboo: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
