"""genfoundry: curated images to a trained, sampled and scored image generator, on any accelerator.

Each CLI command is a function here with the same name: `curate`, `train`, `sample`, `evaluate` (CLI
`eval`), `build_report` (CLI `report`), `tune`, `demo`. Rooms of the flow live in subpackages: sources,
curation, shards, data, models, diffusion, trainer, eval, report, tuning.
"""

__version__ = "0.1.0"
__all__ = ["build_report", "curate", "demo", "evaluate", "sample", "train", "tune", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so that `genfoundry --help` does not pay for importing torch.
    if name == "curate":
        from genfoundry.curation import curate

        return curate
    if name == "tune":
        from genfoundry.tuning import tune

        return tune
    if name in ("build_report", "demo", "evaluate", "sample", "train"):
        from genfoundry import api

        return getattr(api, name)
    raise AttributeError(f"module 'genfoundry' has no attribute '{name}'")
