"""Models: the `VLM` interface, tiny random-init builders, the embedded default and hub loading."""

from sr_ray.models.loading import load_vlm
from sr_ray.models.vlm import VLM, Embedded, Prompt, PromptBatch

__all__ = ["VLM", "Embedded", "Prompt", "PromptBatch", "load_vlm"]
