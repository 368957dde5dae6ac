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


def _model_dir(name_or_dir: str) -> Path:
    from bamboo.models import pretrained_path

    target = Path(name_or_dir)
    return target if target.is_dir() else pretrained_path(name_or_dir)


def _load_model(name_or_dir: str, dtype: str = "float32", device: str = "cpu"):
    from bamboo.models import BambooForCausalLM

    return BambooForCausalLM.from_pretrained(_model_dir(name_or_dir), dtype=dtype, device=device)


def _cmd_calibrate(args) -> int:
    import json

    import bamboo
    from bamboo.calibrate.corpus import load_processed, random_batches
    from bamboo.outputs import prepare_output

    # checked before the calibration, which runs for minutes (23 were reported with the defaults)
    prepare_output(args.out, "predictor file")
    if args.json:
        prepare_output(args.json, "JSON report")
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


def _decode_speed(model, prompt, args, streamer=None) -> tuple[int, float]:
    """(tokens generated, decode tok/s). The first two tokens are not timed: the first comes from the prefill and
    the second from the first decode step, which compiles the decode graph."""
    import time

    import torch

    times = []

    def stream(tokens):
        times.append(time.perf_counter())
        if streamer is not None:
            streamer(tokens)

    with torch.no_grad():
        model.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                       temperature=args.temperature, top_p=args.top_p, streamer=stream)
    speed = (len(times) - 2) / (times[-1] - times[1]) if len(times) > 2 else float("nan")
    return len(times), speed


def _cmd_generate(args) -> int:
    import bamboo
    from bamboo.errors import InputError
    from bamboo.models.tokenizer import BambooTokenizer, TextStreamer, chat_template, trained_on_plain_text

    model_dir = _model_dir(args.model)
    if args.chat and chat_template(model_dir) is None:
        raise InputError(f"{args.model} has no chat template (no chat_template in its tokenizer_config.json: it was "
                         "trained on plain text), so --chat would wrap the prompt in ChatML markers it never saw and "
                         "the output would look broken; drop --chat")
    if args.chat and trained_on_plain_text(model_dir):
        raise InputError(f"{args.model} was trained on plain text (its training.json says \"chat\": false): the "
                         "ChatML template in its tokenizer_config.json is the family's, for transformers' "
                         "apply_chat_template, but the model never saw those markers, so --chat would make the output "
                         "look broken; drop --chat")
    dense = _load_model(args.model, args.dtype, args.device)
    tokenizer = BambooTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    prompt = tokenizer([text])["input_ids"].to(args.device)
    compiled = args.sparsity != "dense" or args.backend != "eager"
    model = bamboo.compile(dense, backend=args.backend, sparsity=args.sparsity, predictors=args.predictors) \
        if compiled else dense
    print(args.prompt, end="", flush=True)
    count, speed = _decode_speed(model, prompt, args, TextStreamer(tokenizer))
    print(f"\n\n{count} tokens; decode {speed:.1f} tok/s (the first decode step, which compiles, not timed; "
          f"{args.backend}, {args.sparsity}, {args.device})")
    if compiled and args.compare_dense:
        _, dense_speed = _decode_speed(dense, prompt, args)
        print(f"dense (eager, uncompiled) on {args.device}: {dense_speed:.1f} tok/s")
        if speed < dense_speed:
            print(f"{args.sparsity} mode with the {args.backend} backend is slower than dense on this device "
                  f"({speed / dense_speed:.2f}x): bamboo's speedup comes from its GPU kernels; on the CPU the op "
                  "copies the rows it reads")
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
    from bamboo.api import export_tensorrt_onnx
    from bamboo.errors import BambooError
    from bamboo.onnx.tensorrt_profile import _tensorrt, build_tensorrt_engine

    if args.engine:  # checked first: exiting 0 without the engine that was asked for would hide the failure
        try:
            _tensorrt()
        except BambooError as exc:
            raise type(exc)(f"--engine needs TensorRT and an NVIDIA GPU: {exc}. Drop --engine to write only the ONNX "
                            f"file, and build the engine where TensorRT runs (trtexec --onnx={args.out})") from None
    model = _load_model(args.model)
    path = export_tensorrt_onnx(model, (_example_ids(2, 8),), args.out, sparsity=args.sparsity,
                                predictors=args.predictors, max_batch=args.max_batch, max_seq=args.max_seq_len)
    print(f"wrote {path}: ONNX in bamboo's TensorRT profile (checked; optimization profiles in its metadata)")
    if args.engine:
        engine = build_tensorrt_engine(path, args.engine, fp16=args.fp16)
        print(f"wrote {engine}: TensorRT engine")
    return 0


def _cmd_onnx_optimize(args) -> int:
    from bamboo.onnx import optimize

    report = optimize(args.input, args.output, mode=args.mode)
    print(f"{args.input} -> {args.output}: {report['rewritten']} FFN(s) rewritten {report['rules']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from bamboo import __version__

    parser = argparse.ArgumentParser(prog="bamboo", description="Compile ReLU-sparse LLMs.")
    parser.add_argument("--version", action="version", version=f"bamboo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, help):
        # every option's help shows its default
        return sub.add_parser(name, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    model_help = "checkpoint directory or bundled model name"
    demo = command("demo", "generate, profile sparsity and compile the tiny built-in model")
    demo.add_argument("--config", default="tiny", help="built-in config name")
    demo.add_argument("--new-tokens", type=int, default=16, help="tokens to generate")
    demo.add_argument("--batches", type=int, default=8, help="batches for the sparsity profile")
    demo.add_argument("--no-trained", action="store_true", help="skip the section on the bundled trained model")
    demo.set_defaults(func=_cmd_demo)

    inspect = command("inspect", "list the FFN sites of a checkpoint directory or built-in config")
    inspect.add_argument("model", help="checkpoint directory, or a built-in config name (tiny, bamboo-7b)")
    inspect.add_argument("--batch", type=int, default=2, help="batch size of the example input")
    inspect.add_argument("--seq-len", type=int, default=8, help="sequence length of the example input")
    inspect.set_defaults(func=_cmd_inspect)

    cal = command("calibrate", "train per-layer activation predictors for predictor mode")
    cal.add_argument("--model", default="austen-small", help=model_help)
    cal.add_argument("--out", default="predictors.safetensors", help="predictor file to write")
    cal.add_argument("--json", default=None, help="also write the per-layer report as JSON")
    cal.add_argument("--rank", type=int, default=64, help="rank of each low-rank predictor")
    cal.add_argument("--target-recall", type=float, default=0.99,
                     help="share of truly active neurons each layer's threshold keeps")
    cal.add_argument("--epochs", type=int, default=3, help="passes over the training batches")
    cal.add_argument("--batches", type=int, default=64, help="batches of Austen training text")
    cal.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    cal.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    cal.add_argument("--seed", type=int, default=0, help="seed of the batch sampling and predictor init")
    cal.set_defaults(func=_cmd_calibrate)

    gen = command("generate", "generate text, printing tokens as they come and the decode speed")
    gen.add_argument("prompt", help="text to continue")
    gen.add_argument("--model", default="austen-small", help=model_help)
    gen.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate")
    gen.add_argument("--sparsity", default="exact", choices=["exact", "predictor", "dense"], help="FFN mode")
    gen.add_argument("--predictors", default=None, help="predictor file (for --sparsity predictor)")
    gen.add_argument("--backend", default="eager", choices=["eager", "inductor"], help="compiler backend")
    gen.add_argument("--device", default="cpu", help="device to run on (cpu, cuda, cuda:1)")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                     help="dtype the weights are loaded in")
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (with --do-sample)")
    gen.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (with --do-sample)")
    gen.add_argument("--chat", action="store_true",
                     help="wrap the prompt in the model's ChatML chat template (models that ship one)")
    gen.add_argument("--compare-dense", action=argparse.BooleanOptionalAction, default=True,
                     help="also time the dense model and say when the compiled mode is slower on this device")
    gen.set_defaults(func=_cmd_generate)

    exp = command("export-onnx", "export a model to ONNX with the sparse FFN in standard ops")
    exp.add_argument("--model", default="austen-small", help=model_help)
    exp.add_argument("--out", default="model.onnx", help="ONNX file to write")
    exp.add_argument("--sparsity", default="exact", choices=["exact", "predictor", "dense"], help="FFN mode")
    exp.add_argument("--predictors", default=None, help="predictor file (for --sparsity predictor)")
    exp.add_argument("--decode-step", action="store_true", help="export the cached step (KV cache in and out)")
    exp.add_argument("--max-seq-len", type=int, default=256, help="KV cache length of the decode step")
    exp.set_defaults(func=_cmd_export_onnx)

    trt = command("export-tensorrt", "export ONNX in the TensorRT profile and build an engine")
    trt.add_argument("--model", default="austen-small", help=model_help)
    trt.add_argument("--out", default="model.trt.onnx", help="ONNX file to write")
    trt.add_argument("--engine", default=None, help="also build a TensorRT engine here (needs tensorrt and a GPU)")
    trt.add_argument("--sparsity", default="exact", choices=["exact", "predictor", "dense"], help="FFN mode")
    trt.add_argument("--predictors", default=None, help="predictor file (for --sparsity predictor)")
    trt.add_argument("--fp16", action="store_true", help="let the engine use fp16 kernels")
    trt.add_argument("--max-batch", type=int, default=16, help="largest batch of the optimization profile")
    trt.add_argument("--max-seq-len", type=int, default=2048, help="longest sequence of the optimization profile")
    trt.set_defaults(func=_cmd_export_tensorrt)

    opt = command("onnx-optimize", "rewrite the dReLU/ReGLU FFNs of any ONNX model into the sparse form")
    opt.add_argument("input", help="ONNX file to read")
    opt.add_argument("output", help="ONNX file to write")
    opt.add_argument("--mode", default="exact", choices=["exact", "dense"], help="FFN mode of the rewrite")
    opt.set_defaults(func=_cmd_onnx_optimize)
    return parser


def main(argv=None) -> int:
    from bamboo.errors import BambooError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BambooError as exc:  # the one place errors become a message: problem and fix, no traceback
        print(f"bamboo: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
