"""background_components (issue 13 part 2): the routing key is the decentered prompt feature with
the background's top principal directions removed. Its math, the background file and artifact
that carry the directions, the router on one device and split over two tensor-parallel ranks,
the hyperparameter's errors, the facts worlds' background texts, and a T=10 job on the facts
model that stores, uses and serves the key."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import TwoRankGroup, synthetic_artifact
from transformers import AutoTokenizer

from edit_tools.background import compute_background, read_background, save_background
from edit_tools.cli import main as memoir_main
from edit_tools.datasets import load_edit_dataset
from edit_tools.editor import EditJobError, run_edit_job
from edit_tools.facts.background_texts import background_prompts
from edit_tools.facts.designs import world_of
from edit_tools.hf_model import MemoirHFModel
from edit_tools.hparams import HParamsError
from vllm_memoir.core import load_artifact, remove_background_components, save_artifact, tophash_indices
from vllm_memoir.core.artifact import ArtifactError, ArtifactManifest
from vllm_memoir.core.routing import EditRouter
from vllm_memoir.routing.decisions import ShardedPromptRouter

from benchmarks import quality

REPO_BACKGROUND = quality.REPO / "data" / "facts" / "background.txt"
T10 = quality.DEFAULT_DATA.parent / "zsre-facts-T10.json"


def _orthonormal(rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, rows, generator=gen))
    return q.T.contiguous()


# ---------------------------------------------------------------- the math

def test_the_key_has_no_part_along_the_basis_and_keeps_the_rest():
    basis = _orthonormal(5, 40)
    gen = torch.Generator().manual_seed(1)
    feature = torch.randn(3, 40, generator=gen)
    key = remove_background_components(feature, basis)
    assert torch.allclose(key @ basis.T, torch.zeros(3, 5), atol=1e-5)
    assert torch.allclose(remove_background_components(key, basis), key, atol=1e-5)  # a projection
    outside = remove_background_components(torch.randn(2, 40, generator=gen), basis)  # already orthogonal
    assert torch.allclose(remove_background_components(outside, basis), outside, atol=1e-5)
    assert remove_background_components(feature, None) is feature  # the reference's key


def test_removing_shared_directions_changes_which_columns_the_mask_takes():
    # Two prompts that share a large common direction and differ elsewhere: their masks are
    # mostly the shared direction's columns until the direction is removed.
    gen = torch.Generator().manual_seed(2)
    shared = torch.zeros(64)
    shared[:16] = 10.0
    own = torch.randn(2, 64, generator=gen)
    features = shared + own
    basis = (shared / shared.norm()).unsqueeze(0)
    identity = torch.arange(64)
    before = [set(row.tolist()) for row in tophash_indices(features, 16, identity)]
    after = [set(row.tolist()) for row in tophash_indices(remove_background_components(features, basis), 16, identity)]
    assert len(before[0] & before[1]) == 16
    assert len(after[0] & after[1]) < 12


# ---------------------------------------------------------------- the background file

@pytest.fixture(scope="module")
def facts_hf():
    return MemoirHFModel.from_pretrained(quality.DEFAULT_MODEL, module_path="model.layers.5.mlp.down_proj")


def test_compute_background_gives_orthonormal_principal_directions(facts_hf):
    texts = REPO_BACKGROUND.read_text().splitlines()[:60]
    background = compute_background(facts_hf, texts, components=8)
    assert background.basis.shape == (8, 1024)
    assert torch.allclose(background.basis @ background.basis.T, torch.eye(8), atol=1e-4)
    features = facts_hf.prompt_features(texts, "mean")
    assert torch.allclose(background.mean, features.mean(0), atol=1e-5)
    # The first direction carries more of the texts' spread than any later one.
    spread = ((features - background.mean) @ background.basis.T).pow(2).sum(0)
    assert bool((spread[:-1] >= spread[1:] - 1e-3).all())
    with pytest.raises(ValueError, match="more background texts than components"):
        compute_background(facts_hf, texts[:8], components=8)


def test_background_file_round_trip_and_errors(tmp_path):
    mean, basis = torch.randn(32), _orthonormal(6, 32)
    path = tmp_path / "bg.safetensors"
    save_background(mean, path, basis)
    read = read_background(path, 32, components=4)
    assert torch.equal(read.mean, mean) and torch.equal(read.basis, basis[:4])
    assert read_background(path, 32).basis is None  # components 0: the mean alone
    with pytest.raises(ValueError, match="--components 7"):
        read_background(path, 32, components=7)
    save_background(mean, tmp_path / "mean-only.safetensors")
    with pytest.raises(ValueError, match="background_components 2 needs a 'background_basis'"):
        read_background(tmp_path / "mean-only.safetensors", 32, components=2)


# ---------------------------------------------------------------- the artifact

def _with_basis(rows: int = 6, dim: int = 64):
    artifact, features = synthetic_artifact(edits=4, dim=dim, top_k=12)
    artifact.manifest.background_components = rows
    artifact.background_basis = _orthonormal(rows, dim, seed=3)
    keys = remove_background_components(features - artifact.background_mean, artifact.background_basis)
    artifact.masks = EditRouter(artifact).query_masks(keys)  # the masks an edit job would store
    return artifact, features


def test_artifact_round_trip_keeps_the_basis(tmp_path):
    artifact, _ = _with_basis()
    save_artifact(artifact, tmp_path / "a")
    loaded = load_artifact(tmp_path / "a")
    assert loaded.manifest.background_components == 6
    assert torch.equal(loaded.background_basis, artifact.background_basis)


@pytest.mark.parametrize("change, message", [
    (lambda a: setattr(a.manifest, "background_components", 0), "present but background_components is 0"),
    (lambda a: setattr(a, "background_basis", None), "needs tensor 'background_basis'"),
    (lambda a: setattr(a, "background_basis", torch.zeros(5, 64)), r"has shape \(5, 64\), expected \(6, 64\)"),
    (lambda a: setattr(a, "background_basis", torch.full((6, 64), float("nan"))), "must be finite float32"),
])
def test_a_bad_basis_is_refused_on_load(tmp_path, change, message):
    artifact, _ = _with_basis()
    change(artifact)
    save_artifact(artifact, tmp_path / "a")
    with pytest.raises(ArtifactError, match=message):
        load_artifact(tmp_path / "a")


def test_older_manifests_read_as_no_components():
    artifact, _ = synthetic_artifact()
    obj = {k: v for k, v in vars(artifact.manifest).items() if k != "background_components"}
    assert ArtifactManifest.from_json(obj, "manifest.json").background_components == 0


# ---------------------------------------------------------------- routing

def test_router_routes_on_the_key_and_differs_from_the_plain_feature():
    artifact, features = _with_basis()
    queries = features + 0.01
    router = EditRouter(artifact)
    keys = remove_background_components(queries - artifact.background_mean, artifact.background_basis)
    assert torch.equal(router.query_masks(router.route_key(queries - artifact.background_mean)),
                       router.query_masks(keys))
    assert [d.route for d in router.route_features(queries - artifact.background_mean)] == [0, 1, 2, 3]
    plain = EditRouter(artifact)
    plain.background_basis = None
    assert not torch.equal(plain.query_masks(queries), router.query_masks(router.route_key(queries)))


def test_two_tensor_parallel_ranks_route_as_one_device():
    artifact, features = _with_basis()
    gen = torch.Generator().manual_seed(4)
    queries = torch.cat([features + 0.05 * torch.randn(features.shape, generator=gen), torch.randn(3, 64, generator=gen)])
    decentered = queries - artifact.background_mean
    expected = EditRouter(artifact).route_features(decentered)
    group, results = TwoRankGroup(), {}

    def run(rank):
        router = ShardedPromptRouter(artifact, rank, 2, torch.device("cpu"), group.all_gather_for(rank))
        results[rank] = router.decide(decentered[:, rank * 32:(rank + 1) * 32])

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[0] == results[1] == expected
    assert [d.route for d in expected[:4]] == [0, 1, 2, 3]


# ---------------------------------------------------------------- hyperparameters

@pytest.mark.parametrize("overrides, message", [
    (["background_components=-1"], "background_components: -1 is below 0"),
    (["background_components=8", "prompt_feature_agg=mean"], "needs prompt_feature_agg mean_decentered"),
    (["background_components=100"], "needs more background texts than components"),
])
def test_bad_settings_are_one_line_errors(overrides, message):
    with pytest.raises(HParamsError, match=message) as caught:
        quality.load_hparams(quality.DEFAULT_HPARAMS, overrides)
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------- the facts worlds' background texts

@pytest.mark.parametrize("seed, design, model", [(20506, "classic", "facts-llama"), (11, "broad", "facts-broad")])
def test_background_texts_name_no_world_subject_and_use_known_words(seed, design, model):
    world = world_of(seed, design)
    prompts = background_prompts(world, 300, seed=seed + 2)
    assert len(set(prompts)) == 300 and prompts == background_prompts(world, 300, seed=seed + 2)
    subjects = set(world.subjects)
    tokenizer = AutoTokenizer.from_pretrained(quality.REPO / "models" / model)
    for prompt in prompts:
        assert not any(subject in prompt for subject in subjects)
        assert tokenizer.unk_token_id not in tokenizer(prompt).input_ids, prompt


def test_shipped_background_texts_are_the_generators_output():
    world = world_of(20506, "classic")
    assert REPO_BACKGROUND.read_text().splitlines() == background_prompts(world, 4000, seed=20506 + 2)


# ---------------------------------------------------------------- T=10 on the facts model

def _hparams(*extra):
    return quality.load_hparams(quality.DEFAULT_HPARAMS, ["update_projection=none", "n_iter=30", *extra])


@pytest.fixture(scope="module")
def keyed_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("keyed")
    hp = _hparams("background_components=64", f"background_texts={REPO_BACKGROUND}", "num_background_texts=400",
                  "irr_threshold=0.5")
    artifact = run_edit_job(quality.DEFAULT_MODEL, T10, hp, out / "keyed", progress=False)
    plain = run_edit_job(quality.DEFAULT_MODEL, T10, _hparams("irr_threshold=0.5"), out / "plain", progress=False)
    return out, artifact, plain


def test_t10_job_stores_the_key_and_trains_other_columns(keyed_job):
    out, artifact, plain = keyed_job
    loaded = load_artifact(out / "keyed")
    assert loaded.manifest.background_components == 64 and loaded.background_basis.shape == (64, 1024)
    assert not torch.equal(artifact.masks, plain.masks)
    # Every stored mask is TopHash of the edit prompt's key (the router's key, as served), and
    # the benchmark's diagnostics rank the same keys.
    hf = MemoirHFModel.from_pretrained(quality.DEFAULT_MODEL, artifact=loaded)
    prompts = [r.prompt for r in load_edit_dataset(T10)]
    features = hf.prompt_features(prompts, "mean_decentered", loaded.background_mean)
    router = EditRouter(loaded)
    assert torch.equal(router.query_masks(router.route_key(features)), loaded.masks)
    assert torch.equal(router.query_masks(quality.routing_keys(hf, loaded, prompts)), loaded.masks)


def test_t10_served_with_the_key_routes_each_edit_prompt_to_its_edit(keyed_job):
    out, _, _ = keyed_job
    hf = MemoirHFModel.from_pretrained(quality.DEFAULT_MODEL, artifact=load_artifact(out / "keyed"))
    requests = load_edit_dataset(T10)
    assert [d.route for d in hf.route([r.prompt for r in requests])] == list(range(len(requests)))
    # The key matters: served with the plain feature, the same masks route fewer of them.
    plain = load_artifact(out / "keyed")
    plain.manifest.background_components, plain.background_basis = 0, None
    hf.load(plain)
    assert [d.route for d in hf.route([r.prompt for r in requests])] != list(range(len(requests)))


def test_append_with_other_components_is_refused_and_changes_nothing(keyed_job, tmp_path):
    out, _, _ = keyed_job
    before = (out / "keyed" / "manifest.json").read_bytes()
    hp = _hparams("background_components=32", f"background_texts={REPO_BACKGROUND}", "num_background_texts=400",
                  "irr_threshold=0.5")
    with pytest.raises(EditJobError, match="background_components=64, the hyperparameters say 32"):
        run_edit_job(quality.DEFAULT_MODEL, T10, hp, out / "keyed", append=True, progress=False)
    assert (out / "keyed" / "manifest.json").read_bytes() == before


def test_too_few_locality_prompts_name_background_texts(tmp_path):
    with pytest.raises(EditJobError, match="set background_texts to a larger file"):
        run_edit_job(quality.DEFAULT_MODEL, T10, _hparams("background_components=16"), tmp_path / "a", progress=False)
    assert not (tmp_path / "a" / "manifest.json").exists()


def test_memoir_background_components_writes_the_basis(tmp_path, capsys):
    out = tmp_path / "bg.safetensors"
    code = memoir_main(["background", "--model", str(quality.DEFAULT_MODEL), "--texts", str(REPO_BACKGROUND),
                        "--hparams", str(quality.DEFAULT_HPARAMS), "--num", "50", "--components", "10", "--out", str(out)])
    assert code == 0 and "10 principal directions" in capsys.readouterr().out
    assert read_background(out, 1024, components=10).basis.shape == (10, 1024)
    code = memoir_main(["background", "--model", str(quality.DEFAULT_MODEL), "--texts", str(REPO_BACKGROUND),
                        "--hparams", str(quality.DEFAULT_HPARAMS), "--num", "10", "--components", "10",
                        "--out", str(tmp_path / "x.safetensors")])
    assert code == 2 and "--components 10 needs more texts than components" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_memoir_inspect_shows_the_components(keyed_job, capsys):
    out, _, _ = keyed_job
    assert memoir_main(["inspect", str(out / "keyed")]) == 0
    assert "background_components=64" in capsys.readouterr().out
