"""The edit job: apply a dataset's edits sequentially and write a MEMOIR artifact.

The job checkpoints the artifact (atomically) every `checkpoint_every` edits and records its
progress in the manifest, so a job killed at any point resumes from its last checkpoint and
ends with the same artifact as an uninterrupted run. `append=True` adds a new dataset's
edits to an existing artifact (lifelong editing). Each edit record keeps how its training
ended (`outcome`: final loss, steps, whether it took); an edit that did not take is named in a
warning, and the job logs how many took.

With update_projection "null_space" the job also keeps the covariance of the edits' keys
(edit_step.EarlierKeys): each checkpoint writes it to its own safetensors file, before the
manifest that names it (job["update_keys"]), so a resumed or appending job continues with the
keys of exactly the edits the artifact holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from vllm_memoir.core import (
    ArtifactManifest,
    EditRecord,
    MemoirArtifact,
    load_artifact,
    pack_indices,
    packed_width,
    read_manifest,
    save_artifact,
)
from vllm_memoir.core.artifact import MANIFEST_NAME, write_atomic
from vllm_memoir.core.edit_records import EditRecords

from .background import Background, check_enough_texts, compute_background, read_background
from .datasets import EditRequest, load_edit_dataset, load_text_pool, warn_if_mostly_unknown
from .edit_step import EarlierKeys, apply_edit, apply_prompt_format, build_edit_batch
from .hf_model import MemoirHFModel
from .hparams import MemoirHyperParams
from .preflight import preflight
from .templates import generate_context_templates

logger = logging.getLogger(__name__)

# Hyperparameters the manifest holds in fields of its own: hparams["memoir"] keeps the others,
# so that no setting is stored twice (and can disagree with itself).
_MANIFEST_FIELD_KEYS = ("inner_params", "top_k", "irr_threshold", "prompt_feature_agg", "routing_span",
                       "route_margin", "background_components")


class EditJobError(RuntimeError):
    pass


def requests_digest(requests: list[EditRequest]) -> str:
    payload = json.dumps([[r.prompt, r.target, r.loc] for r in requests])
    return hashlib.sha256(payload.encode()).hexdigest()


def new_artifact(hf: MemoirHFModel, hp: MemoirHyperParams, model_id: str, requests: list[EditRequest]) -> MemoirArtifact:
    weight = hf.layer.base.weight
    hidden, inter = weight.shape
    span = apply_prompt_format(hf, hp)  # before the background: it averages the same span
    generator = torch.Generator().manual_seed(hp.seed)
    # Drawn once and stored: the reference draws it from the global RNG and never saves it.
    permutation = torch.randperm(inter, generator=generator)
    background = Background(None)
    if hp.prompt_feature_agg == "mean_decentered":
        background = _background_for(hf, hp, requests, inter)
    templates = generate_context_templates(hf.model, hf.tokenizer)
    manifest = ArtifactManifest(
        base_model=model_id,
        base_fingerprint=hf.fingerprint(),
        module_path=hf.module_path,
        layer_index=hp.layer_index,
        hidden_size=hidden,
        intermediate_size=inter,
        dtype="float32",
        top_k=hp.top_k,
        irr_threshold=hp.irr_threshold,
        route_margin=hp.route_margin,
        background_components=hp.background_components,
        aggregation=hp.prompt_feature_agg,
        hparams={"memoir": {k: v for k, v in hp.to_dict().items() if k not in _MANIFEST_FIELD_KEYS},
                 "context_templates": templates},
        routing_span=span.kind,
        routing_span_markers=span.manifest_markers(),
    )
    return MemoirArtifact(
        manifest=manifest,
        memory=torch.zeros(hidden, inter),
        masks=torch.zeros(0, packed_width(inter), dtype=torch.uint8),
        permutation=permutation,
        background_mean=background.mean,
        edits=[],
        background_basis=background.basis,
    )


def _background_for(hf: MemoirHFModel, hp: MemoirHyperParams, requests: list[EditRequest], dim: int) -> Background:
    """The background mean (and principal directions) from dir_background_features, else computed
    over background_texts, else over the edit set's locality prompts."""
    if hp.dir_background_features:
        try:
            return read_background(hp.dir_background_features, dim, hp.background_components)
        except ValueError as exc:
            raise EditJobError(f"dir_background_features: {exc}") from None
    if hp.background_texts:
        texts, source = load_text_pool(hp.background_texts, limit=hp.num_background_texts), hp.background_texts
    else:
        texts, source = [r.loc for r in requests if r.loc][: hp.num_background_texts], "the edit set's locality prompts"
    if not texts:
        raise EditJobError("mean_decentered needs background features: set dir_background_features or "
                           "background_texts, or give locality prompts")
    try:
        check_enough_texts(hp.background_components, len(texts))
    except ValueError as exc:
        raise EditJobError(f"{exc} from {source}: set background_texts to a larger file "
                           f"(num_background_texts is {hp.num_background_texts})") from None
    logger.info("computing background features from %d texts (%s)%s", len(texts), source,
                f", {hp.background_components} principal directions" if hp.background_components else "")
    return compute_background(hf, texts, hp.background_components)


def _check_output_dir(out_dir: Path) -> bool:
    """Fail before any edit is computed when the artifact could not be written at all.

    Returns whether this call created the directory, so a refused job can remove it again.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise EditJobError(f"{out_dir}: the output path exists and is not a directory")
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        _remove_if_empty(out_dir, created)
        raise EditJobError(f"{out_dir}: cannot write the artifact there ({exc.strerror or exc})") from exc
    return created


def _remove_if_empty(out_dir: Path, created: bool) -> None:
    """A refused or failed job leaves no empty output directory behind (only one it made itself)."""
    if created:
        try:
            out_dir.rmdir()  # refuses a non-empty directory: a checkpoint, once written, stays
        except OSError:
            pass


def _save_checkpoint(artifact: MemoirArtifact, out_dir: Path) -> None:
    """save_artifact, with an OSError (full disk, read-only mount) turned into a job error that says
    what is left on disk and how to go on."""
    try:
        save_artifact(artifact, out_dir)
    except OSError as exc:
        kept = "no artifact was written yet"
        if (out_dir / MANIFEST_NAME).exists():
            previous = read_manifest(out_dir)
            kept = f"the previous version (v{previous.version}, {previous.num_edits} edits) is intact"
        raise EditJobError(
            f"{out_dir}: writing the artifact failed ({exc.strerror or exc}); {kept}; "
            "free the space (or fix the permissions) and run the same command again to resume"
        ) from exc


def _check_compatible(artifact: MemoirArtifact, hp: MemoirHyperParams, where: Path) -> None:
    """The settings that must agree between an artifact and a job that extends it."""
    m = artifact.manifest
    stored = {"routing_span": m.routing_span, "module_path": m.module_path, "top_k": m.top_k,
              "irr_threshold": m.irr_threshold, "route_margin": m.route_margin, "prompt_feature_agg": m.aggregation,
              "background_components": m.background_components,
              "use_chat_template": m.hparams.get("memoir", {}).get("use_chat_template", False)}
    for key, value in stored.items():
        if value != getattr(hp, key):
            raise EditJobError(f"{where}: artifact has {key}={value!r}, the hyperparameters say {getattr(hp, key)!r}")


def run_edit_job(
    model_dir: str | Path,
    data: str | Path | list[EditRequest],
    hp: MemoirHyperParams,
    out_dir: str | Path,
    append: bool = False,
    limit: int | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    skip_invalid: bool = False,
    device: str | None = None,
    data_label: str | None = None,
) -> MemoirArtifact:
    """Run (or resume, or extend) an edit job; returns the final artifact.

    stop_after: stop once this many edits of the job are done (for tests and staged runs);
    the artifact is checkpointed there and a later call resumes.
    device: where to load the model, as `preflight` returned it (the CLI checks first); when
    None, the same checks run here, before the data set is read or the weights load.
    """
    out_dir = Path(out_dir)
    if device is None:
        _, device = preflight(hp, model_dir)
    requests = data if isinstance(data, list) else load_edit_dataset(data, limit=limit, skip_invalid=skip_invalid)
    if limit is not None:
        requests = requests[:limit]
    if not requests:
        raise EditJobError("the dataset has no edits")
    created = _check_output_dir(out_dir)
    try:
        data_name = data_label or (str(data) if not isinstance(data, list) else "the edit requests")
        return _run_checked_job(model_dir, data_name, requests, hp, out_dir, append, progress, stop_after, device)
    except BaseException:
        _remove_if_empty(out_dir, created)
        raise


UPDATE_KEYS_GLOB = "update-keys-*.safetensors"


def _update_keys_name(num_edits: int) -> str:
    return f"update-keys-{num_edits}.safetensors"


def save_update_keys(keys: EarlierKeys, out_dir: Path, num_edits: int) -> str:
    """Write the keys' covariance for an artifact of num_edits edits (atomically); returns its file name."""
    name = _update_keys_name(num_edits)
    tensors = {"covariance": keys.covariance.contiguous()}
    metadata = {"num_edits": str(num_edits), "num_keys": str(keys.count)}
    try:  # on disk (fsynced) before the manifest that names it, as the artifact's own files
        write_atomic(out_dir / name, lambda path: save_file(tensors, str(path), metadata=metadata))
    except OSError as exc:
        raise EditJobError(f"{out_dir / name}: writing the update keys failed ({exc.strerror or exc}); the previous "
                           "checkpoint is intact; free the space and run the same command again to resume") from exc
    return name


def load_update_keys(out_dir: Path, job: dict, num_edits: int, dim: int) -> EarlierKeys:
    """The covariance the artifact's last checkpoint named; empty (with a warning) when the
    artifact was made without update_projection, so its edits are not protected."""
    name = job.get("update_keys")
    if name is None:
        if num_edits:
            logger.warning("%s: its %d edits were made without update_projection, so their keys were not kept; "
                           "the new edits are projected only away from each other's", out_dir, num_edits)
        return EarlierKeys(dim)
    path = out_dir / name
    try:
        with safe_open(str(path), "pt") as opened:
            meta = opened.metadata() or {}
            covariance = opened.get_tensor("covariance") if "covariance" in opened.keys() else None
    except (OSError, SafetensorError) as exc:
        raise EditJobError(f"{path}: the update keys the manifest names cannot be read ({exc}); "
                           "rerun the job without update_projection or from scratch") from exc
    if covariance is None or covariance.shape != (dim, dim) or meta.get("num_edits") != str(num_edits):
        raise EditJobError(f"{path}: holds keys for {meta.get('num_edits')} edits of width "
                           f"{None if covariance is None else tuple(covariance.shape)}, the artifact has {num_edits} "
                           f"edits of width {dim}")
    return EarlierKeys(dim, covariance.to(torch.float64), int(meta.get("num_keys", 0)))


def _remove_stale_update_keys(out_dir: Path, keep: str | None) -> None:
    """Older covariance files are garbage once a manifest naming a newer one is in place."""
    for stale in out_dir.glob(UPDATE_KEYS_GLOB):
        if stale.name != keep:
            stale.unlink(missing_ok=True)


def log_outcome(edit_id: int, request: EditRequest, result, hp: MemoirHyperParams) -> None:
    """One debug line per edit; a warning naming the edit when it did not take (a target token
    is not the top prediction on one of its rows after training), so that is never silent."""
    if result.took:
        logger.debug("edit %d took: loss %.4f after %d steps", edit_id, result.final_loss, result.steps)
        return
    hint = ("raise max_steps_per_edit or lower edit_loss_target" if hp.resolved_update_rule == "adaptive"
            else "leave edit_lr and n_iter unset (or set update_rule: adaptive) for steps sized to this model")
    rolled_back = " (rolled back: stored disabled)" if result.rolled_back else ""
    logger.warning("edit %d (%r -> %r) did not take%s: loss %.4f after %d steps (edit_loss_target %g); %s",
                   edit_id, request.prompt, request.target, rolled_back, result.final_loss, result.steps,
                   hp.edit_loss_target, hint)


def _run_checked_job(model_dir, data_name: str, requests: list[EditRequest], hp: MemoirHyperParams, out_dir: Path,
                     append: bool, progress: bool, stop_after: int | None, device: str) -> MemoirArtifact:
    digest = requests_digest(requests)
    hf = MemoirHFModel.from_pretrained(model_dir, module_path=hp.module_path, dtype=getattr(torch, hp.dtype), device=device)
    warn_if_mostly_unknown(hf.tokenizer, [r.prompt for r in requests], data_name, str(model_dir))

    if (out_dir / MANIFEST_NAME).exists():
        artifact = load_artifact(out_dir, expected_fingerprint=hf.fingerprint())
        _check_compatible(artifact, hp, out_dir)
        job = artifact.manifest.job
        keys_file = {"update_keys": job["update_keys"]} if "update_keys" in job else {}
        same_data = job.get("data_sha256") == digest
        if same_data and job.get("done", 0) < job.get("total", 0):
            logger.info("resuming %s at edit %d of %d", out_dir, job["done"], job["total"])
        elif same_data and not append:
            logger.info("%s already holds this job's %d edits; nothing to do", out_dir, job["total"])
            return artifact
        elif append:
            job = {"data_sha256": digest, "first_row": artifact.manifest.num_edits, "done": 0, "total": len(requests),
                   **keys_file}
            logger.info("appending %d edits to %s (%d stored)", len(requests), out_dir, job["first_row"])
        else:
            raise EditJobError(f"{out_dir} already holds an artifact from another job; pass --append to add these edits to it")
    else:
        artifact = new_artifact(hf, hp, str(model_dir), requests)
        job = {"data_sha256": digest, "first_row": 0, "done": 0, "total": len(requests)}

    hf.layer.memory.data = artifact.memory.to(hf.device, torch.float32).clone()
    hf.use_prompt_format(artifact.manifest)  # chat template and routing span, as the artifact records them
    templates = artifact.manifest.hparams["context_templates"]
    background = None if artifact.background_mean is None else artifact.background_mean.to(hf.device)
    basis = None if artifact.background_basis is None else artifact.background_basis.to(hf.device)
    permutation = artifact.permutation
    masks = [artifact.masks]
    # From the id column (no record parsed: a loaded artifact's edits are an EditRecords).
    next_id = int(EditRecords.of(artifact.edits).edit_ids.max(initial=-1)) + 1
    earlier_keys = None
    if hp.update_projection != "none":
        earlier_keys = load_update_keys(out_dir, job, len(artifact.edits), artifact.manifest.intermediate_size)

    def checkpoint() -> None:
        artifact.memory = hf.layer.memory.data.detach().cpu().clone()
        artifact.masks = torch.cat(masks)
        masks[:] = [artifact.masks]
        if earlier_keys is not None:
            job["update_keys"] = save_update_keys(earlier_keys, out_dir, len(artifact.edits))
        else:
            job.pop("update_keys", None)  # the edits made now have no keys kept: no file can stand for them
        artifact.manifest.job = dict(job)
        _save_checkpoint(artifact, out_dir)
        _remove_stale_update_keys(out_dir, job.get("update_keys"))

    end = len(requests) if stop_after is None else min(len(requests), job["done"] + stop_after)
    bar = tqdm(range(job["done"], end), total=len(requests), initial=job["done"], disable=not progress, desc="edits")
    since_checkpoint = 0
    missed, started_at = 0, job["done"]
    for i in bar:
        request = requests[i]
        started = time.perf_counter()
        batch = build_edit_batch(hf, request.prompt, request.target, templates, request.loc)
        result = apply_edit(hf, hp, batch, permutation, background, fast=hp.fast_loop, earlier_keys=earlier_keys,
                            background_basis=basis)
        if earlier_keys is not None and not result.rolled_back:  # a rolled-back edit left nothing to protect
            earlier_keys.add(result.mask_indices, result.keys)
        masks.append(pack_indices(result.mask_indices.unsqueeze(0), artifact.manifest.intermediate_size))
        artifact.edits.append(
            EditRecord(edit_id=next_id, prompt=request.prompt, target=request.target, rephrase=request.rephrase,
                       subject=request.subject, enabled=not result.rolled_back, outcome=result.outcome())
        )
        log_outcome(next_id, request, result, hp)
        missed += not result.took
        next_id += 1
        job["done"] = i + 1
        since_checkpoint += 1
        bar.set_postfix(loss=f"{result.final_loss:.4f}", steps=result.steps, sec=f"{time.perf_counter() - started:.2f}")
        if since_checkpoint >= hp.checkpoint_every:
            checkpoint()
            since_checkpoint = 0
    if since_checkpoint:
        checkpoint()
    if ran := end - started_at:
        log = logger.warning if missed else logger.info
        log("%d of the %d edits this run made took%s", ran - missed, ran,
            "; the warnings above name the others" if missed else "")
    artifact.masks = torch.cat(masks)
    return artifact
