"""Models: a `ModelSpec` in, a frozen `(model, tokenizer)` out.

:mod:`uzr.models.loading` loads teacher and student (hub ids, the packaged GGUF models converted once into the
cache, tiny random models for tests); :mod:`uzr.models.damage` damages chosen attention layers at load (the
positive control's student); :mod:`uzr.models.tokenizers` builds the offline tokenizers of the tiny models.
"""

from uzr.models.loading import (
    PACKAGED_DEFAULT,
    TINY_IMAGE_SIZE,
    TINY_PATCH_SIZE,
    ModelSpec,
    as_spec,
    default_cache_dir,
    load_model,
    model_device,
    validate_spec,
)

__all__ = ["PACKAGED_DEFAULT", "TINY_IMAGE_SIZE", "TINY_PATCH_SIZE", "ModelSpec", "as_spec", "default_cache_dir",
           "load_model", "model_device", "validate_spec"]
