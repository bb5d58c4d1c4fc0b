"""FP4 FFN quality on a real model: SmolLM2-135M-Instruct with its FFN weights in fp32 (as
shipped: the GGUF's Q4_1 dequantized), bf16, NVFP4 and MXFP4.

  python -m bench.fp4_quality [--new-tokens 32] [--ppl-characters 10000] [--no-helix] [--out PATH]

For each format, transformers runs the model with every MLP replaced by the runtime's FFN in
that format (helix_ext.parallel.ffn: FP4 weights quantized whole with quantize_fp4, run by
fp4_grouped_gemm with E = 1, bf16 activations):
  - greedy generation on the demo's prompt (~3,600 tokens of Python documentation with a fact
    in the middle, a question at the end): tokens agreeing with the bf16 FFN's and with the
    fp32 one's before the first divergence;
  - perplexity on a fixed stretch of documentation prose (pydoc_data.topics, ~2,500 tokens).
Then (unless --no-helix) the demo itself under Helix (kvp=2 x tpa=3) with each FP4 format:
its tokens against transformers with the same FFN. Writes a JSON (default
bench/results/fp4_quality_smollm2.json) and prints the README's markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

FORMATS = ("none", "bf16", "nvfp4", "mxfp4")
LABELS = {"none": "fp32 (as shipped)", "bf16": "bf16", "nvfp4": "NVFP4", "mxfp4": "MXFP4"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--ppl-characters", type=int, default=10000)
    parser.add_argument("--no-helix", action="store_true", help="skip the Helix runs of the FP4 formats")
    parser.add_argument("--out", default="bench/results/fp4_quality_smollm2.json")
    args = parser.parse_args(argv)

    from helix_ext.parallel import hf_model
    from helix_ext.parallel.model_demo import agreeing_prefix

    model, tokenizer = hf_model.load_model(verbose=True)
    prompt_ids = hf_model.chat_ids(tokenizer, hf_model.needle_prompt())
    text_ids = tokenizer(hf_model.documentation_text(args.ppl_characters))["input_ids"]
    print(f"prompt {len(prompt_ids)} tokens; perplexity text {len(text_ids)} tokens", flush=True)
    rows = {}
    for fmt in FORMATS:
        start = time.perf_counter()
        weights = hf_model.helix_weights(model, fmt)
        with hf_model.helix_ffn(model, weights, fmt):
            generated = hf_model.reference_generate(model, prompt_ids, args.new_tokens).tokens
            ppl = hf_model.perplexity(model, text_ids)
        rows[fmt] = {"tokens": generated, "text": tokenizer.decode(generated, skip_special_tokens=True),
                     "perplexity": ppl, "seconds": time.perf_counter() - start}
        print(f"{fmt}: perplexity {ppl:.3f}; {rows[fmt]['text']!r} ({rows[fmt]['seconds']:.0f} s)", flush=True)
    for fmt in FORMATS:
        rows[fmt]["agree_with_bf16"] = agreeing_prefix(rows[fmt]["tokens"], rows["bf16"]["tokens"])
        rows[fmt]["agree_with_fp32"] = agreeing_prefix(rows[fmt]["tokens"], rows["none"]["tokens"])

    helix_runs = {}
    if not args.no_helix:
        from helix_ext.parallel.config import HelixConfig
        from helix_ext.parallel.model_demo import run_model_demo

        for fmt in ("nvfp4", "mxfp4"):
            report = run_model_demo(None, args.new_tokens, fmt, HelixConfig(kvp=2, tpa=3, hopb_chunks=2))
            helix_runs[fmt] = {k: report[k] for k in ("generated_text", "tokens_agreeing", "tokens_match",
                                                      "max_abs_logit_diff", "matches_reference",
                                                      "tokens_agreeing_with_unquantized", "world_size", "kvp", "tpa")}
            print(f"Helix 2x3 {fmt}: {report['generated_text']!r}; agrees with transformers + same FFN for "
                  f"{report['tokens_agreeing']} of {len(report['generated_tokens'])} tokens", flush=True)

    result = {"model": hf_model.MODEL_NAME, "prompt_tokens": len(prompt_ids), "new_tokens": args.new_tokens,
              "perplexity_tokens": len(text_ids), "python": platform.python_version(),
              "torch": torch.__version__, "machine": platform.machine(), "formats": rows, "helix": helix_runs,
              "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}\n")
    print("| FFN weights | greedy tokens agreeing with bf16 FFN | with fp32 FFN | perplexity |")
    print("|---|---|---|---|")
    for fmt in FORMATS:
        r = rows[fmt]
        print(f"| {LABELS[fmt]} | {r['agree_with_bf16']} / {len(r['tokens'])} | {r['agree_with_fp32']} / "
              f"{len(r['tokens'])} | {r['perplexity']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
