"""mtc: Matryoshka transcoders for language-model activations.

Attributes load lazily so that `import mtc` stays fast; torch is imported on first use.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "TranscoderConfig": "config",
    "MatryoshkaTranscoder": "transcoder",
    "TrainingOutput": "transcoder",
    "save": "checkpoint",
    "load": "checkpoint",
    "export_gemma_scope": "gemma_scope",
    "export_saelens": "interop",
    "export_circuit_tracer": "interop",
    "load_gemma_scope": "gemma_scope",
    "load_export": "interop",
    "load_wandb_artifact": "interop",
    "Trainer": "train",
    "evaluate": "evaluate",
    "load_samples": "samples",
    "load_language_model": "language_model",
    "build_store": "activations",
    "TranscoderSet": "sets",
    "load_set": "sets",
    "attribute_set": "attribution",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mtc' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
