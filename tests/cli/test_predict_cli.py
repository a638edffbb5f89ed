"""``lnmeta predict`` end to end on a synthetic slide with a real (small) model file."""

from __future__ import annotations

import json

import pytest
from tests._inference_helpers import make_synthetic_slide, small_model_file

from napari_lnmeta.cli import main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, camelyon):
    d = tmp_path_factory.mktemp("cli")
    synth = make_synthetic_slide(d, camelyon)
    return synth, small_model_file(d / "model.safetensors")


def test_predict_writes_the_folder_and_refuses_to_overwrite(inputs, tmp_path, capsys):
    synth, model = inputs
    out = tmp_path / "out"
    argv = ["predict", str(synth.path), "-o", str(out), "--model", str(model), "--stride", "24",
            "--device", "cpu", "--batch-size", "32", "--dtype", "uint8", "--decode", "device"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "score:" in text and "patches/s" in text
    for name in ("probability.ome.zarr", "summary.json", "lesions.geojson", "overview.png"):
        assert (out / name).exists(), name
    s = json.loads((out / "summary.json").read_text())
    assert s["parameters"]["stride"] == 24 and s["parameters"]["heatmap_dtype"] == "uint8"
    # zlib tiles cannot be decoded as JPEG elsewhere: the reader threads decode them
    assert s["parameters"]["decode"] == "device" and s["timing"]["reader"] == "threads"
    assert s["model"]["architecture"] == "lnmeta_cnn_small"
    # an existing result: refused in one line, exit 2
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    from PIL import Image

    truth = tmp_path / "truth.png"
    Image.fromarray(synth.truth.astype("uint8") * 255).save(truth)
    assert main(argv + ["--overwrite", "--json", "--truth", str(truth)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["complete"] is True
    ev = s["evaluation"]
    assert ev["n_positive"] > 0 and ev["n_negative"] > 0 and 0 <= ev["ACC"] <= 1
    # lesion candidates by NMS (default) and by connected components (CAMELYON16 winner)
    low = ["--overwrite", "--json", "--lesion-threshold", "0.05"]
    assert main(argv + low) == 0
    nms = json.loads(capsys.readouterr().out)["lesions"]
    assert nms and all("n_cells" not in d for d in nms)
    assert main(argv + low + ["--lesion-method", "components"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["parameters"]["lesion_method"] == "components"
    comp = s["lesions"]
    assert comp and all(d["n_cells"] >= 1 for d in comp)


def test_predict_bad_input_is_one_line(inputs, tmp_path, capsys):
    synth, model = inputs
    argv = ["predict", str(synth.path), "-o", str(tmp_path / "o"), "--model", str(model),
            "--patch-size", "48", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    # one error line, on its own line after the progress output
    errors = [ln for ln in err.splitlines() if "error" in ln]
    assert len(errors) == 1 and errors[0].startswith("lnmeta: error: ")
    assert "trained on 32 px patches" in errors[0] and err.strip().splitlines()[-1] == errors[0]
    assert main(["predict", str(tmp_path / "missing.svs"), "-o", str(tmp_path / "o2")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_predict_refuses_a_bad_truth_before_inference(inputs, tmp_path, capsys):
    """A malformed --truth fails at once: no checkpoint, no result folder, one line."""
    synth, model = inputs
    truth = tmp_path / "truth.geojson"
    truth.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", '
                     '"properties": {}, "geometry": {"type": "Polygon", "coordinates": "x"}}]}')
    out = tmp_path / "out"
    argv = ["predict", str(synth.path), "-o", str(out), "--model", str(model), "--device", "cpu",
            "--truth", str(truth)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"lnmeta: error: {truth}")
    assert "inference" not in err and not out.exists()
