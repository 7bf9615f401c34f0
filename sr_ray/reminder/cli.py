"""`sr-ray generate` (guarded generation with its trace), `sr-ray bench guard` and `sr-ray bench batch`."""

from __future__ import annotations

import json


def add_commands(sub, bench) -> None:
    g = sub.add_parser("generate", help="guarded generation on one prompt; prints the answer and the trace")
    g.add_argument("--model", default="smol-llava")
    g.add_argument("--prompt", required=True)
    g.add_argument("--image", help="image file (PNG/JPEG)")
    g.add_argument("--system", help="system prompt")
    g.add_argument("--bundle", help="reminder bundle directory or models:/NAME/VERSION (default: the model's shipped one)")
    g.add_argument("--soft-prompt", help="soft prompt artifact directory (with --probe)")
    g.add_argument("--probe", help="probe artifact directory (with --soft-prompt)")
    g.add_argument("--no-guard", action="store_true", help="plain decoding")
    g.add_argument("--mode", choices=["inplace", "official"], default="inplace")
    g.add_argument("--interval", type=int)
    g.add_argument("--threshold", type=float)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=generate)

    b = bench.add_parser("guard", help="cost of the guard: plain vs fused checks vs official-style checks")
    b.add_argument("--model", default="smol-llava")
    b.add_argument("--new-tokens", type=int, default=256)
    b.add_argument("--interval", type=int, help="answer tokens between checks (default: the paper's 16)")
    b.add_argument("--image-tokens", type=int, default=576)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    b.add_argument("--out", help="write the JSON result here")
    b.set_defaults(func=bench_guard)

    bb = bench.add_parser("batch", help="offline batch inference: fixed batches vs the continuous scheduler")
    bb.add_argument("--model", default="smol-llava")
    bb.add_argument("--bundle", help="reminder bundle directory (default: the model's shipped one)")
    bb.add_argument("--rows", type=int, default=32)
    bb.add_argument("--batch-size", type=int, default=8)
    bb.add_argument("--max-new-tokens", type=int, default=128)
    bb.add_argument("--repeats", type=int, default=2)
    bb.add_argument("--out", help="write the JSON result here")
    bb.set_defaults(func=bench_batch)


def _load_parts(args, vlm):
    from sr_ray.reminder import HarmProbe, ReminderBundle, SoftPrompt
    from sr_ray.reminder.shipped import default_bundle
    from sr_ray.tracking import resolve_bundle

    if not args.bundle and not (args.soft_prompt and args.probe):
        args.bundle = default_bundle(args.model)
    if args.bundle:
        bundle = ReminderBundle.load(resolve_bundle(args.bundle), vlm)
        return bundle.soft_prompt, bundle.probe, bundle.guard_config()
    if args.soft_prompt and args.probe:
        from sr_ray.reminder import GuardConfig

        return SoftPrompt.load(args.soft_prompt, vlm), HarmProbe.load(args.probe, vlm), GuardConfig()
    raise SystemExit("guarded generation needs --bundle, or --soft-prompt and --probe (or pass --no-guard)")


def generate(args) -> int:
    from PIL import Image

    from sr_ray.models import Prompt, load_vlm
    from sr_ray.reminder import GuardedGenerator, SamplingConfig

    vlm = load_vlm(args.model)
    soft, probe, guard = (None, None, None) if args.no_guard else _load_parts(args, vlm)
    if guard is not None:
        guard = guard.override(mode=args.mode, interval=args.interval, threshold=args.threshold)
        if args.mode == "official":
            guard = guard.override(schedule="official", check_at_end=False)
    image = Image.open(args.image).convert("RGB") if args.image else None
    out = GuardedGenerator(vlm, soft, probe, guard).generate(
        [Prompt(args.prompt, image, args.system)], SamplingConfig(max_new_tokens=args.max_new_tokens),
        guard=not args.no_guard,
    )[0]
    if args.json:
        print(json.dumps({"text": out.text, "prefix_text": out.prefix_text,
                          "continuation_text": out.continuation_text, "trace": out.trace()}))
        return 0
    print(out.text)
    print("--- trace ---")
    for c in out.checks:
        print(f"check after {c.position:4d} tokens  P(safe)={c.p_safe:.3f}{'  FLAGGED' if c.flagged else ''}")
    if out.flagged:
        print(f"flagged at {out.flagged_at} tokens; reminder continuation: {out.continuation_text!r}")
    print(f"finish: {out.finish_reason}")
    return 0


def bench_guard(args) -> int:
    from sr_ray.reminder.bench import GuardBenchConfig, format_table, run_guard_bench, save_result
    from sr_ray.reminder.guard import PAPER_INTERVAL

    interval = PAPER_INTERVAL if args.interval is None else args.interval
    cfg = GuardBenchConfig(model=args.model, new_tokens=args.new_tokens, interval=interval,
                           image_tokens=args.image_tokens, repeats=args.repeats, dtype=args.dtype)
    result = run_guard_bench(cfg)
    print(format_table(result))
    save_result(result, args.out)
    return 0


def bench_batch(args) -> int:
    from sr_ray.reminder.bench import save_result
    from sr_ray.reminder.bench_batch import BatchBenchConfig, format_table, run_batch_bench

    result = run_batch_bench(BatchBenchConfig(model=args.model, bundle=args.bundle, rows=args.rows, batch_size=args.batch_size,
                                              max_new_tokens=args.max_new_tokens, repeats=args.repeats))
    print(format_table(result))
    save_result(result, args.out)
    return 0
