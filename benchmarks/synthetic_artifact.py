"""Synthetic MEMOIR artifacts at scale (1,000 or 100,000 edits) for serving benchmarks.

The cost of serving depends on the shapes (stored masks, memory, top_k), not on what the
edits say, so an artifact of N random edits measures what N real ones would cost. It is
written through the core's own `save_artifact`, with the base-model fingerprint of the
served checkpoint, so the plugin loads and validates it like any artifact:

  * `--like REAL_ARTIFACT` keeps the real artifact's edits (their masks, memory, records),
    permutation, background mean and routing settings, and pads it with random edits up to
    N: the real edits still route exactly as before, matching now runs against N masks;
  * without it (e.g. a random-weight benchmark model) the permutation is drawn, the
    background mean is computed from `--background-texts`, and `--route-prompts` stores the
    TopHash masks of those prompts (computed with the core's functions on the transformers
    model) as the first edits, so those prompts route when served.

Random masks have exactly top_k bits each (drawn in chunks and bit-packed, so 100,000 edits
take seconds and a few hundred MB at most); the random memory is small (std 1e-3).

    python benchmarks/synthetic_artifact.py --model models/facts-llama --like runs/bench/facts-real \
        --edits 100000 --out runs/bench/facts-synthetic-100000
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from vllm_memoir.core import (
    ArtifactManifest,
    EditRecord,
    MemoirArtifact,
    base_fingerprint,
    load_artifact,
    pack_indices,
    packed_width,
    save_artifact,
    tophash_indices,
)
from vllm_memoir.validation import read_checkpoint_tensor

logger = logging.getLogger(__name__)
_CHUNK = 4096


def random_masks(count: int, dim: int, top_k: int, seed: int) -> torch.Tensor:
    """[count, packed_width(dim)] uint8 masks with exactly top_k distinct bits each.

    The first block of rows shuffles a row of top_k ones each (a uniformly random k-subset,
    O(dim) per row, but slow: ~13 min for 1,000,000 masks of Llama-3-8B width). Every later
    block is that block with its whole bytes (8 mask bits each) relabelled by a fresh random
    permutation, one gather of packed bytes per block: any fixed relabelling of a uniformly
    random k-subset is one too, so each row is still uniform (rows of different blocks are
    not independent, which neither the matching cost nor loading depends on).
    Packed in pack_indices' layout (bit j at byte j // 8, bit j % 8: little bit order).
    """
    rng = np.random.default_rng(seed)
    width = packed_width(dim)
    out = np.zeros((count, width), dtype=np.uint8)
    bits = np.zeros((min(_CHUNK, max(count, 1)), width * 8), dtype=bool)
    bits[:, :top_k] = True
    bits[:, :dim] = rng.permuted(bits[:, :dim], axis=1)
    base = np.packbits(bits, axis=1, bitorder="little")
    whole = dim // 8  # bytes wholly inside dim; a partial last byte and the padding stay put
    for start in range(0, count, _CHUNK):
        rows = min(_CHUNK, count - start)
        block = out[start:start + rows]
        block[:] = base[:rows]
        if start:
            block[:, :whole] = base[:rows, rng.permutation(whole)]
    return torch.from_numpy(out)


def _config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


@torch.no_grad()
def prompt_masks(model_dir: Path, module_path: str, prompts: list[str], top_k: int, aggregation: str,
                 permutation: torch.Tensor, background: torch.Tensor | None) -> torch.Tensor:
    """Packed TopHash masks of `prompts` on the transformers model (what serving computes)."""
    from edit_tools.hf_model import MemoirHFModel

    hf = MemoirHFModel.from_pretrained(model_dir, module_path=module_path)
    feature = hf.prompt_features(prompts, aggregation, background, batch_size=len(prompts))
    dim = permutation.shape[0]
    return pack_indices(tophash_indices(feature, top_k, permutation), dim)


@torch.no_grad()
def background_mean(model_dir: Path, module_path: str, texts: list[str]) -> torch.Tensor:
    from edit_tools.background import compute_background_mean
    from edit_tools.hf_model import MemoirHFModel

    return compute_background_mean(MemoirHFModel.from_pretrained(model_dir, module_path=module_path), texts)


def synthetic_artifact(
    model_dir: str | Path,
    out_dir: str | Path,
    num_edits: int,
    like: str | Path | None = None,
    layer: int | None = None,
    top_k: int | None = None,
    irr_threshold: float = 0.78,
    aggregation: str = "mean_decentered",
    route_prompts: list[str] = (),
    background_texts: list[str] = (),
    seed: int = 0,
) -> Path:
    """Write an artifact with `num_edits` edits for the model at `model_dir`; returns out_dir."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = _config(model_dir)
    generator = torch.Generator().manual_seed(seed)
    if like is not None:
        real = load_artifact(like)
        manifest = real.manifest
        module_path = manifest.module_path
        weight = read_checkpoint_tensor(model_dir, f"{module_path}.weight")
        if base_fingerprint(weight, config) != manifest.base_fingerprint:
            raise ValueError(f"{like}: made for another base model than {model_dir}")
        memory, permutation, background = real.memory, real.permutation, real.background_mean
        stored, records = real.masks, list(real.edits)
        top_k, dim = manifest.top_k, manifest.intermediate_size
    else:
        layer = config["num_hidden_layers"] // 2 if layer is None else layer
        module_path = f"model.layers.{layer}.mlp.down_proj"
        weight = read_checkpoint_tensor(model_dir, f"{module_path}.weight")
        hidden, dim = weight.shape
        top_k = top_k or (dim * 3) // 8
        permutation = torch.randperm(dim, generator=generator)
        background = None
        if aggregation == "mean_decentered":
            if not background_texts:
                raise ValueError("aggregation mean_decentered needs background_texts")
            background = background_mean(model_dir, module_path, list(background_texts))
        manifest = ArtifactManifest(
            base_model=str(model_dir), base_fingerprint=base_fingerprint(weight, config), module_path=module_path,
            layer_index=layer, hidden_size=hidden, intermediate_size=dim, dtype="float32", top_k=top_k,
            irr_threshold=irr_threshold, aggregation=aggregation,
            hparams={"synthetic": {"seed": seed, "route_prompts": len(route_prompts)}},
        )
        memory = torch.randn(hidden, dim, generator=generator) * 1e-3
        stored = torch.zeros(0, packed_width(dim), dtype=torch.uint8)
        if route_prompts:
            stored = prompt_masks(model_dir, module_path, list(route_prompts), top_k, aggregation, permutation, background)
        records = [EditRecord(edit_id=i, prompt=p, target="(synthetic)") for i, p in enumerate(route_prompts)]
    if num_edits < len(records):
        raise ValueError(f"--edits {num_edits} is fewer than the {len(records)} edits kept from --like/--route-prompts")
    filler = num_edits - len(records)
    first_id = max((r.edit_id for r in records), default=-1) + 1
    masks = torch.cat([stored, random_masks(filler, dim, top_k, seed + 1)])
    records += [EditRecord(edit_id=first_id + i, prompt=f"synthetic edit {first_id + i}", target="(synthetic)")
                for i in range(filler)]
    manifest.hparams = {**manifest.hparams, "synthetic_edits": filler}
    artifact = MemoirArtifact(manifest=manifest, memory=memory, masks=masks, permutation=permutation,
                              background_mean=background, edits=records)
    save_artifact(artifact, out_dir)
    logger.info("%s: %d edits (%d synthetic), masks %.1f MiB", out_dir, num_edits, filler, masks.numel() / 2**20)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the served checkpoint directory")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--edits", type=int, required=True)
    parser.add_argument("--like", type=Path, help="a real artifact to keep and pad with random edits")
    parser.add_argument("--layer", type=int)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--irr-threshold", type=float, default=0.78)
    parser.add_argument("--route-prompts", type=Path, help="text file, one prompt a line, whose masks are stored")
    parser.add_argument("--background-texts", type=Path, help="text file, one text a line (mean_decentered)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    def lines(path: Path | None) -> list[str]:
        return [line for line in path.read_text().splitlines() if line.strip()] if path else []

    synthetic_artifact(args.model, args.out, args.edits, like=args.like, layer=args.layer, top_k=args.top_k,
                       irr_threshold=args.irr_threshold, route_prompts=lines(args.route_prompts),
                       background_texts=lines(args.background_texts), seed=args.seed)


if __name__ == "__main__":
    main()
