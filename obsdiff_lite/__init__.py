"""obsdiff_lite: an executable companion to OBS-Diff (arXiv 2510.06751).

    import obsdiff_lite
    from obsdiff_lite.prune import PruneConfig, prune

    pipe = obsdiff_lite.load_pipeline("data/tiny-sd3")
    report = prune(pipe, PruneConfig(sparsity=0.5))
"""

__version__ = "0.1.0"

__all__ = ["load_pipeline", "__version__"]


def __getattr__(name: str):
    # Lazy, so that `import obsdiff_lite` stays cheap (no diffusers/transformers import until used).
    if name == "load_pipeline":
        from importlib import import_module

        return import_module(".pipelines", __name__).load_pipeline
    raise AttributeError(f"module 'obsdiff_lite' has no attribute {name!r}")
