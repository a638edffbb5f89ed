"""Whole-slide inference: geometry, outputs, bad input, cancel and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests._inference_helpers import (
    GLASS,
    MPP,
    PATCH,
    make_synthetic_slide,
    redness_model,
    small_model_file,
)

from napari_lnmeta.core.inference import (
    InferenceConfig,
    PartialHeatmap,
    dihedral,
    run_inference_job,
)
from napari_lnmeta.errors import InputError, ModelError, OutputExistsError
from napari_lnmeta.io.slide import open_slide
from napari_lnmeta.progress import run


@pytest.fixture(scope="module")
def synth(tmp_path_factory, camelyon):
    return make_synthetic_slide(tmp_path_factory.mktemp("synth"), camelyon)


@pytest.fixture(scope="module")
def tissue(synth):
    from napari_lnmeta.core.tissue import tissue_mask

    return tissue_mask(open_slide(synth.path))


@pytest.fixture(scope="module")
def small_tissue(tissue):
    """The tissue mask cut down to a 256 x 320 px window (a few dozen patches: fast tests)."""
    import dataclasses

    m = np.zeros_like(tissue.mask)
    d = tissue.downsample
    m[int(96 / d):int(352 / d), int(192 / d):int(512 / d)] = True
    return dataclasses.replace(tissue, mask=m & tissue.mask)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return small_model_file(tmp_path_factory.mktemp("model") / "small.safetensors")


# --------------------------------------------------------------------------------------
# Geometry: heatmap cells sit exactly under their patches
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("stride", [PATCH, PATCH // 2])
def test_heatmap_cells_sit_under_their_patches(synth, tissue, stride, tmp_path):
    from napari_lnmeta.core.predict import postprocess, write_prediction
    from napari_lnmeta.io.frame import layer_transform
    from napari_lnmeta.io.omezarr import read_ome_zarr

    slide = open_slide(synth.path)
    assert slide.shape[0] % PATCH and slide.shape[1] % PATCH  # not a multiple of the patch
    cfg = InferenceConfig(stride=stride, batch_size=64, workers=2, device="cpu",
                          lesion_radius_um=30.0)
    res = run(run_inference_job(slide, cfg, model=redness_model(synth), tissue=tissue))
    prob, frame = res.probability, res.frame
    assert res.grid.grid_shape == prob.shape
    planted = synth.tumour_64 + (synth.tumour_32 if stride == PATCH // 2 else [])
    expected = {(y // stride, x // stride) for y, x in planted}
    found = {tuple(c) for c in np.argwhere(prob > 0.5)}
    assert found == expected  # no neighbour, no half-patch shift, nothing missing
    # boxes aligned to 32 px only straddle two 64-px patches: half tumour, never positive
    if stride == PATCH:
        for y, x in synth.tumour_32:
            assert prob[y // 64, x // 64] < 0.5 and prob[y // 64, x // 64 + 1] < 0.5
    # each positive cell's frame box is the centre of its planted box, in level-0 pixels
    d = frame.downsample
    assert d == stride
    for y, x in planted:
        i, j = y // stride, x // stride
        cy0 = frame.origin[0] + i * d
        cx0 = frame.origin[1] + j * d
        assert (cy0, cx0) == (y + (PATCH - stride) / 2, x + (PATCH - stride) / 2)
        # napari: the cell centre lands on the centre of the planted box (slide scale = mpp)
        tr = layer_transform(frame)
        world = (tr["translate"][0] + i * tr["scale"][0], tr["translate"][1] + j * tr["scale"][1])
        assert world == pytest.approx(((y + (PATCH - 1) / 2) * MPP, (x + (PATCH - 1) / 2) * MPP))
    # glass is never analysed (the tissue mask may reach a little into it)
    assert res.grid.grid_shape[1] * stride > GLASS
    assert not (res.grid.coords[:, 1] + PATCH <= GLASS - 32).any()
    assert res.scored.sum() == len(res.grid)
    # the written heatmap keeps the frame and the values
    pred = postprocess(res, truth=(synth.truth, _frame1()))
    out = write_prediction(pred, tmp_path / "out", slide=slide)
    back = read_ome_zarr(out / "probability.ome.zarr")
    assert back.frame.origin == pytest.approx(frame.origin)
    assert back.frame.downsample == frame.downsample
    assert np.asarray(back.data).dtype == np.float16
    np.testing.assert_allclose(np.asarray(back.data), np.where(res.scored, prob, 0), atol=1e-3)
    # evaluation against the planted mask equals a brute-force count + scikit-learn
    _check_evaluation(pred.evaluation, res, synth.truth)
    # slide score and lesions: every planted box is a lesion at its centre
    assert pred.score["max"] > 0.99
    assert len(pred.lesions) == len(expected)
    centres = {(round(r, 1), round(c, 1)) for r, c in pred.lesions.coords}
    assert centres == {(y + (PATCH - 1) / 2, x + (PATCH - 1) / 2) for y, x in planted}


def _check_evaluation(ev, res, truth):
    from sklearn.metrics import accuracy_score, f1_score, recall_score, roc_auc_score

    frac = np.array([truth[y:y + PATCH, x:x + PATCH].mean() for y, x in res.grid.coords])
    keep = (frac > 0.2) | (frac == 0)
    y_true = frac[keep] > 0.2
    p = res.probability[res.grid.index[:, 0], res.grid.index[:, 1]][keep]
    y_pred = p > 0.5
    assert ev["n_positive"] == y_true.sum() and ev["n_ambiguous"] == (~keep).sum()
    assert ev["ACC"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert ev["SEN"] == pytest.approx(recall_score(y_true, y_pred))
    assert ev["SPE"] == pytest.approx(recall_score(~y_true, ~y_pred))
    assert ev["F1_weighted"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))
    assert ev["AUC"] == pytest.approx(roc_auc_score(y_true, p))


def _frame1():
    from napari_lnmeta.io.frame import SlideFrame

    return SlideFrame(downsample=1.0, slide_mpp=MPP)


def test_tta_views_are_the_eight_dihedral_transforms():
    import torch

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    views = [dihedral(x, k) for k in range(8)]
    keys = {tuple(v[0, 0].flatten().tolist()) for v in views}
    assert len(keys) == 8
    assert torch.equal(views[0], x)


def test_tta_of_a_rotation_invariant_model_changes_nothing(synth, small_tissue):
    slide = open_slide(synth.path)
    net, meta = redness_model(synth)
    a = run(run_inference_job(slide, InferenceConfig(device="cpu"), model=(net, meta),
                          tissue=small_tissue))
    b = run(run_inference_job(slide, InferenceConfig(device="cpu", tta=True), model=(net, meta),
                          tissue=small_tissue))
    assert a.probability.max() > 0.99  # a planted tumour lies in the window
    np.testing.assert_allclose(a.probability, b.probability, atol=1e-5)
    assert b.params["tta"] is True


def test_reads_that_share_tiles_reserve_the_tile_cache(synth, tissue, monkeypatch):
    """Overlapping patches read the same stored tiles: the engine sizes the decoded-tile
    cache for the batches in flight; patches far apart share nothing and reserve nothing."""
    from napari_lnmeta.core.inference import tile_working_set
    from napari_lnmeta.core.tiling import make_grid

    monkeypatch.setenv("LNMETA_TILE_CACHE_MB", "0.01")  # starts almost empty
    slide = open_slide(synth.path)
    assert slide.tile_shape(0) == (128, 128)
    tile_bytes = 128 * 128 * 3

    def batches(g, n=64):
        idx = np.arange(len(g))
        return [idx[i:i + n] for i in range(0, len(idx), n)]

    dense = make_grid(slide, patch_size=PATCH, stride=PATCH // 2, mpp=MPP, tissue=tissue)
    need = tile_working_set(slide, dense, batches(dense), 4)
    # 256 overlapping 64-px patches lie in far fewer 128-px tiles than patches
    assert tile_bytes < need < 256 * tile_bytes / 4
    sparse = make_grid(slide, patch_size=PATCH, stride=256, mpp=MPP, tissue=tissue)
    assert tile_working_set(slide, sparse, batches(sparse), 4) == 0

    net, meta = redness_model(synth)
    res = run(run_inference_job(slide, InferenceConfig(device="cpu", stride=PATCH // 2,
                                                   batch_size=64), model=(net, meta),
                            tissue=tissue))
    reserved = res.timing["tile_cache_reserved_mb"] * 2**20
    assert reserved > tile_bytes and slide._cache.capacity == int(reserved)
    # every stored tile of the tissue was decoded once, not once per overlapping patch
    assert slide._cache.loads <= len({(int(y) // 128, int(x) // 128)
                                      for y, x in res.grid.coords
                                      for y, x in [(y, x), (y + PATCH - 1, x + PATCH - 1),
                                                   (y, x + PATCH - 1), (y + PATCH - 1, x)]})


def test_pipeline_equals_infer_batch_on_a_saved_model(synth, tissue, model_file):
    """Reader + on-device preprocessing give exactly what the model API gives."""
    from napari_lnmeta.core.tiling import read_patches
    from napari_lnmeta.models.io import infer_batch, load_model

    slide = open_slide(synth.path)
    cfg = InferenceConfig(model=str(model_file), batch_size=16, workers=2, device="cpu")
    res = run(run_inference_job(slide, cfg, tissue=tissue))
    net, meta = load_model(model_file)
    idx = np.arange(0, len(res.grid), 7)
    ref = infer_batch(net, read_patches(slide, res.grid, idx), device="cpu", meta=meta)[:, 1]
    got = res.probability[res.grid.index[idx, 0], res.grid.index[idx, 1]]
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert res.timing["patches_run"] == len(res.grid)
    assert res.params["read_mpp"] == 2.0 and res.params["patch_size"] == 32


def test_second_run_reuses_the_loaded_model_until_the_file_changes(synth, small_tissue,
                                                                  tmp_path):
    """The model cache: same file and device -> same network, same result, no reload;
    a rewritten file is loaded again."""
    from napari_lnmeta.core import inference

    path = small_model_file(tmp_path / "c.safetensors")
    slide = open_slide(synth.path)
    cfg = InferenceConfig(model=str(path), workers=1, device="cpu")  # batch size probed
    inference.clear_model_cache()
    first = run(run_inference_job(slide, cfg, tissue=small_tissue))
    second = run(run_inference_job(slide, cfg, tissue=small_tissue))
    assert (first.timing["model_cached"], second.timing["model_cached"]) == (False, True)
    assert (first.timing["batch_probed"], second.timing["batch_probed"]) == (True, False)
    assert first.batch_size == second.batch_size
    np.testing.assert_array_equal(first.probability, second.probability)
    assert inference.model_cache_stats() == {"hits": 1, "misses": 1, "entries": 1}
    small_model_file(path, seed=1)  # rewritten in place: a new file identity
    third = run(run_inference_job(slide, cfg, tissue=small_tissue))
    assert third.timing["model_cached"] is False and third.timing["batch_probed"] is True
    assert not np.array_equal(third.probability, first.probability)
    inference.clear_model_cache()


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------
def test_patch_size_mismatch_is_refused(synth, tissue, model_file):
    slide = open_slide(synth.path)
    cfg = InferenceConfig(model=str(model_file), patch_size=96, device="cpu")
    with pytest.raises(ModelError, match="trained on 32 px patches"):
        run(run_inference_job(slide, cfg, tissue=tissue))


def test_classes_mismatch_is_refused(synth, tissue, tmp_path, model_file):
    slide = open_slide(synth.path)
    with pytest.raises(ModelError, match="has no class 'lymphoma'"):
        run(run_inference_job(slide, InferenceConfig(model=str(model_file), tumour_class="lymphoma",
                                                 device="cpu"), tissue=tissue))
    odd = small_model_file(tmp_path / "odd.safetensors", classes=("a", "b"))
    with pytest.raises(ModelError, match="cannot tell which"):
        run(run_inference_job(slide, InferenceConfig(model=str(odd), device="cpu"), tissue=tissue))
    # metadata lists 3 classes but the network gives 2 outputs
    net, meta = redness_model(synth)
    meta.classes = ["normal", "tumour", "lymphoma"]
    with pytest.raises(ModelError, match="3 outputs expected"):
        run(run_inference_job(slide, InferenceConfig(device="cpu", batch_size=8), model=(net, meta),
                          tissue=tissue))


def test_slide_without_tissue_is_refused(tmp_path, model_file):
    from tests._inference_helpers import write_pyramid_tiff

    path = write_pyramid_tiff(tmp_path / "blank.ome.tif", np.full((300, 400, 3), 246, np.uint8),
                              levels=1, mpp=MPP, compression="zlib")
    with pytest.raises(InputError, match="no tissue"):
        run(run_inference_job(open_slide(path), InferenceConfig(model=str(model_file),
                                                            device="cpu")))


def test_missing_model_and_cuda_are_clear_errors(synth, tissue, tmp_path):
    import torch

    slide = open_slide(synth.path)
    with pytest.raises(ModelError, match="no such model file"):
        run(run_inference_job(slide, InferenceConfig(model=str(tmp_path / "nope.safetensors"))))
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            run(run_inference_job(slide, InferenceConfig(device="cuda")))


def test_out_of_memory_backs_off(synth, tissue):
    """A forward that runs out of memory above 8 patches: the batch halves, results are equal."""
    import torch

    slide = open_slide(synth.path)
    net, meta = redness_model(synth)

    class Picky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = net
            self.calls = []

        def forward(self, x):
            self.calls.append(len(x))
            if len(x) > 8:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
            return self.inner(x)

    picky = Picky()
    ref = run(run_inference_job(slide, InferenceConfig(device="cpu", batch_size=32), model=(net, meta),
                            tissue=tissue))
    res = run(run_inference_job(slide, InferenceConfig(device="cpu", batch_size=32),
                            model=(picky, meta), tissue=tissue))
    assert res.timing["oom_backoffs"] == 2  # 32 -> 16 -> 8
    assert res.timing["forward_batch_size"] == 8
    assert max(picky.calls[-5:]) <= 8
    np.testing.assert_array_equal(res.probability, ref.probability)


# --------------------------------------------------------------------------------------
# Result folder: refuse, cancel, resume
# --------------------------------------------------------------------------------------
def test_existing_output_is_refused_unless_overwrite(synth, model_file, tmp_path):
    from napari_lnmeta.core.predict import predict_to_folder_job

    cfg = InferenceConfig(model=str(model_file), device="cpu", batch_size=64)
    out = tmp_path / "out"
    run(predict_to_folder_job(synth.path, out, cfg))
    s = json.loads((out / "summary.json").read_text())
    assert s["complete"] and s["counts"]["patches"] > 0 and s["timing"]["patches_per_s"] > 0
    for name in ("probability.ome.zarr", "lesions.geojson", "overview.png", "tiers.ome.zarr"):
        assert (out / name).exists()
    assert not (out / ".partial").exists()
    with pytest.raises(OutputExistsError):
        run(predict_to_folder_job(synth.path, out, cfg))
    run(predict_to_folder_job(synth.path, out, cfg, overwrite=True))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        run(predict_to_folder_job(synth.path, foreign, cfg))


def test_cancelled_run_is_incomplete_and_resumes(synth, tmp_path):
    from napari_lnmeta.core.predict import predict_to_folder_job

    model = redness_model(synth)
    cfg = InferenceConfig(device="cpu", batch_size=8, workers=2, partial_seconds=0.0)
    out = tmp_path / "out"
    job = predict_to_folder_job(synth.path, out, cfg, model=model)
    steps = []
    for p in job:
        steps.append(p)
        if p.message == "inference" and p.done >= 3 * 8:
            break
    job.close()  # what the GUI's Cancel does (GeneratorExit at the yield)
    assert any(isinstance(p.partial, PartialHeatmap) for p in steps)
    assert not (out / "summary.json").exists()
    assert not (out / "probability.ome.zarr").exists()
    assert (out / ".partial" / "params.json").exists()
    import zarr

    done = np.asarray(zarr.open_group(str(out / ".partial" / "state.zarr"), mode="r")["done"])
    saved = int(done.sum())
    assert saved >= 3 * 8
    # another run with other parameters neither reuses nor destroys the unfinished run
    other = InferenceConfig(device="cpu", stride=PATCH // 2)
    with pytest.raises(InputError, match="unfinished run with other parameters"):
        run(predict_to_folder_job(synth.path, out, other, model=model))
    assert (out / ".partial" / "params.json").exists()
    # resume: only the missing patches are read, and the result equals an uninterrupted run
    pred = run(predict_to_folder_job(synth.path, out, cfg, model=model))
    assert pred.result.resumed == saved
    assert pred.result.timing["patches_run"] == len(pred.result.grid) - saved
    full = run(predict_to_folder_job(synth.path, tmp_path / "full", cfg, model=model))
    np.testing.assert_allclose(pred.probability, full.probability, atol=1e-6)
    s = json.loads((out / "summary.json").read_text())
    assert s["resumed_patches"] == saved and s["complete"] is True
    assert not (out / ".partial").exists()


def test_stain_normalisation_asked_by_the_model_runs_on_the_device(synth, small_tissue):
    """A model whose metadata asks for Macenko gets the stain module's torch normaliser."""
    import torch

    from napari_lnmeta.core.stain import torch_normaliser
    from napari_lnmeta.core.tiling import read_patches

    slide = open_slide(synth.path)
    net, meta = redness_model(synth)
    meta.normalisation = {"method": "macenko"}
    res = run(run_inference_job(slide, InferenceConfig(device="cpu", batch_size=32),
                            model=(net, meta), tissue=small_tissue))
    assert res.params["normalisation"] == {"method": "macenko"}
    idx = np.arange(0, len(res.grid), 2)
    x = torch.from_numpy(read_patches(slide, res.grid, idx)).permute(0, 3, 1, 2).float() / 255
    with torch.inference_mode():
        ref = torch.softmax(net(torch_normaliser(meta.normalisation, device="cpu")(x)), 1)[:, 1]
    got = res.probability[res.grid.index[idx, 0], res.grid.index[idx, 1]]
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-4)


@pytest.mark.parametrize(("level", "stride"), [(0, PATCH // 2), (1, PATCH), (0, 24)])
def test_row_runs_read_the_same_pixels_as_read_patches(synth, small_tissue, level, stride):
    from napari_lnmeta.core.inference import read_patches_into
    from napari_lnmeta.core.tiling import make_grid, read_patches

    slide = open_slide(synth.path)
    grid = make_grid(slide, patch_size=PATCH, stride=stride, level=level, tissue=small_tissue)
    idx = np.arange(len(grid))[::2] if stride == 24 else np.arange(len(grid))
    out = np.zeros((len(idx), PATCH, PATCH, 3), np.uint8)
    read_patches_into(out, slide, grid, idx, max_width=300)
    np.testing.assert_array_equal(out, read_patches(slide, grid, idx))


@pytest.mark.gpu
def test_cuda_pipeline_matches_cpu(synth, tissue, model_file):
    """Pinned buffers, non-blocking copies, deferred result fetch and AMP on CUDA."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    slide = open_slide(synth.path)
    kw = {"model": str(model_file), "batch_size": 16, "stride": 16}
    cpu = run(run_inference_job(slide, InferenceConfig(device="cpu", **kw), tissue=tissue))
    gpu = run(run_inference_job(slide, InferenceConfig(device="auto", tta=False, **kw),
                            tissue=tissue))
    assert gpu.device.startswith("cuda")
    np.testing.assert_allclose(gpu.probability, cpu.probability, atol=1e-2)  # float16 AMP
    np.testing.assert_array_equal(gpu.scored, cpu.scored)
    auto = run(run_inference_job(slide, InferenceConfig(model=str(model_file), device="cuda"),
                             tissue=tissue))
    assert auto.batch_size >= 8  # chosen from free device memory


# --------------------------------------------------------------------------------------
# Whole JPEG tiles decoded by torchvision (nvJPEG on a GPU)
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def jpeg_slide(tmp_path_factory, camelyon):
    """A JPEG-tiled OME-TIFF (1000 x 1300 px, 256-px tiles, 2 levels) of real tissue."""
    from tests.conftest import write_pyramid_tiff

    from napari_lnmeta.io.slide import open_slide as open_

    src = open_(camelyon / "tumor_001_level5.ome.tif").read_region((2000, 500), (1000, 1300),
                                                                   level=0)
    path = write_pyramid_tiff(tmp_path_factory.mktemp("jpeg") / "jpeg.ome.tif", src,
                              levels=2, mpp=MPP, tile=256, compression="jpeg")
    return path


@pytest.mark.parametrize("level", [0, 1])
def test_whole_jpeg_tiles_give_the_threads_pixels(jpeg_slide, level):
    """DeviceTileReader (run here with torchvision's CPU decoder) cuts exactly the
    patches the reader threads read, at the edges and outside the slide too."""
    import torch

    from napari_lnmeta.core.inference import BatchReader, make_reader
    from napari_lnmeta.core.tiling import make_grid

    slide = open_slide(jpeg_slide)
    assert slide.jpeg_tiles(level) is not None
    grid = make_grid(slide, patch_size=100, stride=70, level=level, origin=(-60, -90))
    idx = np.arange(len(grid))
    batches = [idx[i:i + 40] for i in range(0, len(idx), 40)]
    reader, name = make_reader(slide, grid, batches, batch_size=40,
                               device=torch.device("cpu"), decode="device")
    assert name == "jpeg-cpu"
    ref = BatchReader(open_slide(jpeg_slide), grid, batches, batch_size=40, workers=2)
    n = 0
    for (i1, x1, _), (i2, x2, slot) in zip(reader, ref, strict=True):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(x1.numpy(), x2.numpy())
        ref.release(slot)
        n += len(i1)
    reader.close()
    ref.close()
    assert n == len(grid)
    assert (x1.numpy()[-1, -30:, -30:] == 255).all()  # the last patch hangs off the slide


def test_jpeg_decoding_falls_back_to_the_threads(jpeg_slide, synth, monkeypatch):
    import torch
    import torchvision.io

    from napari_lnmeta.core.inference import make_reader
    from napari_lnmeta.core.tiling import make_grid

    cpu = torch.device("cpu")
    synth_slide = open_slide(synth.path)  # zlib tiles: nothing to decode elsewhere
    g = make_grid(synth_slide, patch_size=PATCH, level=0)
    _, name = make_reader(synth_slide, g, [np.arange(4)], batch_size=4, device=cpu,
                          decode="device")
    assert name == "threads"
    slide = open_slide(jpeg_slide)
    g = make_grid(slide, patch_size=64, level=0)
    _, name = make_reader(slide, g, [np.arange(4)], batch_size=4, device=cpu)
    assert name == "threads"  # the default

    def broken(*a, **k):
        raise RuntimeError("nvJPEG is not available")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", broken)
    with pytest.warns(RuntimeWarning, match="decoding on the CPU"):
        reader, name = make_reader(slide, g, [np.arange(4)], batch_size=4, device=cpu,
                                   decode="device")
    assert name == "threads"
    reader.close()
    with pytest.raises(ValueError, match="decode must be"):
        make_reader(slide, g, [np.arange(4)], batch_size=4, device=cpu, decode="auto")


@pytest.mark.gpu
def test_jpeg_tiles_decoded_on_the_gpu_match_the_cpu_run(jpeg_slide, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    slide = open_slide(jpeg_slide)
    model = small_model_file(tmp_path / "m.safetensors", patch_size=32, mpp=MPP)
    kw = {"model": str(model), "batch_size": 64, "stride": 24, "min_tissue": 0.0}
    cpu = run(run_inference_job(slide, InferenceConfig(device="cpu", **kw)))
    gpu = run(run_inference_job(slide, InferenceConfig(device="cuda", decode="device", **kw)))
    assert gpu.timing["reader"] == "jpeg-cuda"
    assert cpu.timing["reader"] == "threads"
    np.testing.assert_allclose(gpu.probability, cpu.probability, atol=2e-2)
    default = run(run_inference_job(slide, InferenceConfig(device="cuda", **kw)))
    assert default.timing["reader"] == "threads"
