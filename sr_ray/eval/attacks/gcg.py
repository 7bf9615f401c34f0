"""GCG adversarial suffixes (Zou et al. 2023) through the `nanogcg` package, on the VLM's language path.

Official settings (`script/GCG/gcg.py`, vendored nanoGCG): no image, num_steps 500, search_width 64,
topk 64, seed 42, nanoGCG defaults otherwise (20-token "x x ... x" init, n_replace 1, buffer 0); one suffix
per AdvBench goal, optimised towards that goal's target, crafted on the undefended model.

Compatibility with transformers 5: nanogcg 0.3.0 (which declares transformers<=4.47) indexes the
prefix KV cache as legacy tuples (`prefix_cache[i]`), which v5's `DynamicCache` no longer supports
(TypeError: 'DynamicCache' object is not subscriptable). Its own `use_prefix_cache=False` switch avoids
that path entirely: the fixed prompt prefix is re-run with each candidate batch instead of being cached,
which costs compute but changes no result. No patch or shim is needed.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from sr_ray.models import VLM


@dataclass
class GCGConfig:
    steps: int = 500
    search_width: int = 64
    topk: int = 64
    seed: int = 42
    optim_str_init: str = "x x x x x x x x x x x x x x x x x x x x"


def _text_tokenizer(vlm: VLM):
    """The VLM's tokenizer carrying the chat template its prompts are rendered with (nanogcg renders itself)."""
    tok = copy.copy(vlm.tokenizer)
    tok.chat_template = getattr(vlm.processor, "chat_template", None) or tok.chat_template
    return tok


def run_gcg(vlm: VLM, pairs: list[tuple[str, str]], cfg: GCGConfig, progress: bool = True) -> tuple[list[dict], dict]:
    """One suffix per (goal, target), placed after the goal and a space (the evaluated prompt is
    `f"{goal} {suffix}"`, exactly what was optimised). Returns per-goal results and a record of the run."""
    import nanogcg

    tok = _text_tokenizer(vlm)
    gcg_cfg = nanogcg.GCGConfig(
        num_steps=cfg.steps, search_width=cfg.search_width, topk=cfg.topk, seed=cfg.seed,
        optim_str_init=cfg.optim_str_init, use_prefix_cache=False, verbosity="WARNING",
    )
    started, results = time.perf_counter(), []
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        for goal, target in tqdm(pairs, desc="gcg", disable=not progress):
            out = nanogcg.run(vlm.model, tok, f"{goal} {{optim_str}}", target, gcg_cfg)
            results.append(dict(goal=goal, target=target, suffix=out.best_string, best_loss=out.best_loss,
                                first_loss=out.losses[0], losses=out.losses))
    finally:  # nanogcg switches on deterministic algorithms process-wide when seeded
        torch.use_deterministic_algorithms(deterministic)
    return results, dict(config=asdict(cfg), seconds=time.perf_counter() - started,
                         nanogcg_note="use_prefix_cache=False (transformers 5 DynamicCache)")
