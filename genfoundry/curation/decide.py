"""The decisions that need every slice: semantic thresholds, semantic dedup, the quality Gaussian."""

from __future__ import annotations

import numpy as np

from genfoundry.curation.config import CurateConfig
from genfoundry.curation import quality
from genfoundry.curation.basic import drop
from genfoundry.curation.inputs import Item, display, list_sources


def _reference_features(cfg: CurateConfig, device: str, ex, progress: bool) -> tuple[np.ndarray, str]:
    """TF-Inception features of the quality reference folder, computed once and kept under work/."""
    from genfoundry.curation import manifest
    from genfoundry.curation.deep import Job, Models, score_slice
    from genfoundry.curation.run import _identity, recipe
    from genfoundry.progress import bar

    items = list_sources([cfg.quality.reference]).items
    key = recipe("reference", 1, [_identity(i) for i in items])
    cached = manifest.read_reference(ex.work, key)
    if cached is not None:
        return cached, cfg.quality.reference
    with bar(len(items), "curate: quality reference", enabled=progress) as shown:
        scores = score_slice(items, Job([], True), Models([], True, device), ex.pool, cfg.quality.batch_size,
                             progress=shown.update)
    features = scores.get("features", np.empty((0, 1)))
    features = features[np.isfinite(features[:, 0])]
    if len(features) < 2:
        from genfoundry.curation.inputs import CurateError

        raise CurateError(f"the quality reference '{cfg.quality.reference}' has {len(features)} readable images; "
                          f"it needs at least 2")
    manifest.write_reference(ex.work, key, features)
    return features, cfg.quality.reference


def finish(flat: list[dict], unlisted: list[tuple[str, str, str]], scores: list[dict] | None,
           slices: list[list[Item]], filters: list, cfg: CurateConfig, device: str, ex, progress: bool) -> dict:
    """Every row with its final decision, and what the quality stage measured."""
    stages = [s.strip() for s in cfg.run.stages.split(",")]
    report: dict = {}
    features = embeddings = None
    semantic = 0
    if scores is not None:
        offsets = np.cumsum([0] + [len(s) for s in slices])
        dims = {}  # a slice without survivors has no arrays, so the shapes come from any that has
        for part in scores:
            for key, value in part.items():
                if key.startswith(("score_", "embed_", "features")):
                    dims[key] = value.shape[1:]
        arrays = {key: np.full((len(flat), *dims.get(key, ())), np.nan, np.float32) for key in dims}
        for k, part in enumerate(scores):
            at = offsets[k] + part["index"]
            for key in arrays:
                if key in part:
                    arrays[key][at] = part[key]
            for j, reason in part["failures"].items():
                row = flat[offsets[k] + part["index"][j]]
                kind, _, message = reason.partition(": ")
                drop(row, kind, message or "gone since stage 1")
                row["stage"] = "semantic" if "semantic" in stages else "quality"
        for f in [f for f in filters if f"score_{f.name}" in arrays]:  # none: no image reached stage 2
            column = arrays[f"score_{f.name}"]
            for i, row in enumerate(flat):
                if np.isfinite(column[i]):
                    row[f"score_{f.name}"] = float(column[i])
                if row["decision"] == "keep" and f.drops(np.float32(column[i])):
                    drop(row, f.reason, f.message(float(column[i])))
                    row["stage"] = "semantic"
        embed_key = f"embed_{cfg.semantic.dedup_embedder}"
        if "semantic" in stages and cfg.semantic.dedup and embed_key in arrays:  # embedder checked before any work
            embeddings = arrays[embed_key]
            alive = [i for i, r in enumerate(flat) if r["decision"] == "keep"]
            dup = quality.semantic_duplicates(embeddings[alive], cfg.semantic.dedup_similarity,
                                              cfg.semantic.dedup_clusters, cfg.run.seed, device)
            for a, d in enumerate(dup):
                if d >= 0:
                    row, original = flat[alive[a]], flat[alive[d]]
                    x, y = embeddings[alive[a]].astype(np.float64), embeddings[alive[d]].astype(np.float64)
                    similarity = float(x @ y / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-12))
                    drop(row, "semantic-duplicate", f"cosine similarity {similarity:.3f} to {original['source']} "
                                                    f"(semantic.dedup_similarity {cfg.semantic.dedup_similarity:g})")
                    row["duplicate_of"] = original["source"]
                    row["stage"] = "semantic"
            semantic = int((dup >= 0).sum())
        features = arrays.get("features")
    if "quality" in stages and features is not None:
        alive = np.array([i for i, r in enumerate(flat) if r["decision"] == "keep"], dtype=np.int64)
        if len(alive) >= 2:
            candidates = features[alive].astype(np.float64)
            if cfg.quality.reference:
                ref, where = _reference_features(cfg, device, ex, progress)
            else:
                ref, where = candidates, "the collection itself"
            mu, sigma, chol, shrinkage = quality.fit(ref, cfg.quality.shrinkage)
            distances = quality.mahalanobis(candidates, mu, chol)
            keep, cut = quality.select(distances, cfg.quality.keep_quantile, cfg.quality.max_distance)
            for a, i in enumerate(alive):
                flat[i]["mahalanobis"] = float(distances[a])
                if not keep[a]:
                    drop(flat[i], "low-density", f"Mahalanobis distance {distances[a]:.4g} to the reference is above "
                                                 f"the cut {cut:.4g}")
                    flat[i]["stage"] = "quality"
            report.update(quality.compare(candidates, keep, mu, sigma, cfg.run.seed),  # the unshrunk Gaussian
                          reference=where, num_reference=len(ref), cut=cut, num_candidates=len(alive),
                          shrinkage=shrinkage)
    last = stages[-1]
    for row in flat:
        if row["decision"] == "keep":
            row["stage"] = last
    rows = [{"source": display(s), "stage": "list", "decision": "drop", "reason": reason, "message": message}
            for s, reason, message in unlisted] + flat
    # How each score column was cut, for the report's histograms: drop above (or below) the threshold.
    thresholds = {f"score_{f.name}": {"threshold": f.threshold, "drop_above": f.drop_above, "reason": f.reason}
                  for f in filters}
    if report.get("cut") is not None:
        thresholds["mahalanobis"] = {"threshold": report["cut"], "drop_above": True, "reason": "low-density"}
    return {"rows": rows, "quality": report, "filters": [f.name for f in filters], "semantic_duplicates": semantic,
            "quality_run": "quality" in stages, "thresholds": thresholds}
