"""Model files (safetensors + metadata, never pickles) and the backbone registry."""

from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_lnmeta.errors import ModelError  # noqa: E402
from napari_lnmeta.models.io import (  # noqa: E402
    ModelMeta,
    default_model_path,
    infer_batch,
    load_model,
    read_header,
    read_meta,
    save_model,
)
from napari_lnmeta.models.registry import (  # noqa: E402
    build_model,
    count_parameters,
    list_architectures,
    set_train_mode,
    stages,
)


def _meta(arch="lnmeta_cnn_small", **kw):
    return ModelMeta(architecture=arch, classes=["normal", "tumour"], patch_size=32, mpp=7.776,
                     mean=[0.8, 0.6, 0.7], std=[0.1, 0.15, 0.1], **kw)


def test_save_load_roundtrip_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_model("lnmeta_cnn_small", 2).eval()
    meta = _meta(extra={"metrics": {"AUC": 0.9}})
    path = save_model(tmp_path / "m.safetensors", model, meta)
    header = read_header(path)
    # metadata lives in the safetensors header as JSON
    stored = json.loads(header["__metadata__"]["lnmeta"])
    assert stored["architecture"] == "lnmeta_cnn_small"
    assert stored["classes"] == ["normal", "tumour"]
    loaded, meta2 = load_model(path)
    assert meta2 == meta
    x = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    a = infer_batch(model, x, device="cpu", meta=meta)
    b = infer_batch(loaded, x, device="cpu", meta=meta2)
    assert a.shape == (5, 2)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a.sum(1), 1, atol=1e-6)
    # torch uint8 NCHW input gives the same
    c = infer_batch(loaded, torch.from_numpy(x).permute(0, 3, 1, 2), device="cpu", meta=meta2)
    np.testing.assert_array_equal(b, c)


def test_overwrite_refused_and_fp16(tmp_path):
    model = build_model("lnmeta_cnn_small", 2).eval()
    p = save_model(tmp_path / "m.safetensors", model, _meta())
    with pytest.raises(Exception, match="already exists"):
        save_model(p, model, _meta())
    save_model(p, model, _meta(), overwrite=True, dtype="float16")
    loaded, _ = load_model(p)
    assert next(loaded.parameters()).dtype == torch.float32
    assert p.stat().st_size < 0.6 * sum(t.numel() * 4 for t in model.state_dict().values())


def test_pickles_and_torch_checkpoints_refused(tmp_path):
    model = build_model("lnmeta_cnn_small", 2)
    pt = tmp_path / "model.pt"
    torch.save(model.state_dict(), pt)
    with pytest.raises(ModelError, match=r"model\.pt.*(pickle|torch\.save)"):
        load_model(pt)
    pk = tmp_path / "model.safetensors"  # a pickle with a misleading name
    pk.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(ModelError, match=r"model\.safetensors: is a Python pickle"):
        load_model(pk)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello world, not a model")
    with pytest.raises(ModelError, match="not a safetensors file"):
        load_model(junk)
    with pytest.raises(ModelError, match="no such model file"):
        load_model(tmp_path / "missing.safetensors")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match="empty"):
        load_model(empty)


def test_bare_state_dict_is_not_a_model_but_can_init(tmp_path):
    from safetensors.torch import save_file

    src = build_model("resnet18", 2)
    p = tmp_path / "imagenet_like.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(p))
    with pytest.raises(ModelError, match="without napari-lnmeta metadata"):
        read_meta(p)
    # init: body loaded, a head of another size is skipped
    m = build_model("resnet18", 3, init=p)
    np.testing.assert_array_equal(m.conv1.weight.detach().numpy(), src.conv1.weight.detach().numpy())
    assert m.fc.out_features == 3
    with pytest.raises(ModelError, match="no tensor in this file matches"):
        build_model("lnmeta_cnn_small", 2, init=p)


def test_weights_that_do_not_fit_are_refused(tmp_path):
    model = build_model("lnmeta_cnn_small", 3)
    p = save_model(tmp_path / "m.safetensors", model, _meta())  # meta says 2 classes
    with pytest.raises(ModelError, match="do not fit"):
        load_model(p)


def test_sigmoid_head_gives_two_columns(tmp_path):
    meta = _meta(head="sigmoid")
    assert meta.num_outputs == 1
    model = build_model("lnmeta_cnn_small", meta.num_outputs).eval()
    p = infer_batch(model, np.zeros((3, 32, 32, 3), np.uint8), device="cpu", meta=meta)
    assert p.shape == (3, 2)
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-6)


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0", "mobilenet_v3_small"])
def test_registry_builds_with_new_head(arch):
    torch.manual_seed(0)
    m = build_model(arch, 3, freeze=1).eval()
    with torch.no_grad():
        out = m(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 3)
    frozen = [p for g in stages(m, arch)[:1] for mod in g for p in mod.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert count_parameters(m, trainable_only=True) < count_parameters(m)


def test_freeze_first_three_convs_seed000():
    m = build_model("resnet50", 2, freeze_convs=3)
    assert not m.conv1.weight.requires_grad
    assert not m.layer1[0].conv1.weight.requires_grad
    assert not m.layer1[0].conv2.weight.requires_grad
    assert m.layer1[0].conv3.weight.requires_grad
    set_train_mode(m)
    assert m.training and not m.bn1.training  # frozen batch norm keeps its statistics


def test_unknown_architecture_lists_choices():
    with pytest.raises(ModelError, match="resnet18"):
        build_model("resnet9000", 2)
    assert {"resnet18", "resnet34", "resnet50", "vgg13_bn", "vgg16_bn", "densenet121",
            "alexnet", "efficientnet_b0", "mobilenet_v3_small"} <= set(list_architectures())


def test_default_model_ships_with_metadata():
    p = default_model_path()
    assert p.is_file(), f"bundled default model missing at {p}"
    assert p.stat().st_size < 8_000_000
    meta = read_meta(p)
    assert meta.classes == ["normal", "tumour"]
    assert meta.patch_size > 0 and meta.mpp and 7 < meta.mpp < 9
    assert len(meta.mean) == 3 and len(meta.std) == 3
    model, meta2 = load_model(p)
    x = np.full((2, meta.patch_size, meta.patch_size, 3), 230, np.uint8)
    assert infer_batch(model, x, device="cpu", meta=meta2).shape == (2, 2)
    # the safetensors header is plain JSON after an 8-byte length
    raw = p.read_bytes()[:8]
    assert struct.unpack("<Q", raw)[0] < p.stat().st_size


@pytest.mark.parametrize("change, words", [
    ({"std": [0.0, 0.2, 0.2]}, "std"), ({"mean": [float("nan"), 0.5, 0.5]}, "mean"),
    ({"patch_size": "sixteen"}, "patch_size"), ({"patch_size": 0}, "patch_size"),
    ({"mpp": "abc"}, "mpp"), ({"mpp": 1e9}, "mpp"), ({"normalisation": "macenko"}, "normalisation"),
    ({"normalisation": {"method": "reinhard"}}, "stain normalisation"),
    ({"normalisation": {"method": "macenko", "target": {"stains": [[1, 2], [3, 4]]}}},
     "stain normalisation"),
    ({"classes": ["a", "a"]}, "classes"), ({"head": ["softmax"]}, "head"), ({"extra": 3}, "extra"),
])
def test_model_metadata_is_validated_on_load(tmp_path, change, words):
    """Broken metadata is refused by read_meta/load_model, naming the model file."""
    from safetensors.torch import save_file

    model = build_model("lnmeta_cnn_small", 2)
    meta = _meta().to_json()
    meta.update(change)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"format": "pt", "lnmeta": json.dumps(meta)})
    for load in (read_meta, load_model):
        with pytest.raises(ModelError) as e:
            load(path)
        assert str(path) in str(e.value) and words in str(e.value)


def test_resolve_device_refuses_devices_this_machine_lacks():
    import torch

    from napari_lnmeta.errors import InputError
    from napari_lnmeta.models.io import resolve_device

    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == resolve_device(None).type == want
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(InputError, match="unknown device 'gpu7'"):
        resolve_device("gpu7")
    with pytest.raises(InputError, match="cuda:99"):
        resolve_device("cuda:99")


def test_loaded_weights_are_the_files_and_nothing_is_left_unset(tmp_path):
    """Models are built without storage and given the file's tensors: every parameter
    and buffer is real and equal to the file, and training still works on them."""
    import torch
    from safetensors.torch import load_file

    from napari_lnmeta.models.io import ModelMeta, load_model, save_model
    from napari_lnmeta.models.registry import build_model

    torch.manual_seed(3)
    net = build_model("resnet18", 2).eval()
    meta = ModelMeta(architecture="resnet18", classes=["normal", "tumour"], patch_size=64,
                     mpp=1.0)
    path = save_model(tmp_path / "m.safetensors", net, meta)
    loaded, _ = load_model(path)
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    stored = load_file(path)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, stored[k].to(v.dtype)), k
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(loaded(x), net(x))
    loaded.train()
    loaded(x).sum().backward()
    assert loaded.fc.weight.grad is not None
