"""Pretrained backbones by name from locally built caches (torch hub, Hugging Face Hub,
folders), the network guard, provenance and the ``lnmeta models`` command."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
from tests._backbone_helpers import REV, hf_cache_repo, local_folder, tiny_vit, torch_cache_file

from napari_lnmeta.cli import main
from napari_lnmeta.errors import ModelError
from napari_lnmeta.models import backbones as bb


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty torch / Hugging Face caches of this test only."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path


# --------------------------------------------------------------------------------------
def test_socket_guard_blocks_remote_and_allows_loopback(_no_network):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    with socket.create_connection(srv.getsockname(), timeout=5):
        pass
    srv.close()
    with pytest.raises(OSError, match="blocked"):
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(("203.0.113.7", 443))
    with pytest.raises(OSError):
        socket.getaddrinfo("download.pytorch.org", 443)
    assert len(_no_network) == 2 and "203.0.113.7" in _no_network[0]
    _no_network.clear()  # both were expected: do not fail this test


# --------------------------------------------------------------------------------------
def test_torchvision_imagenet_from_cache(caches):
    import torch

    from napari_lnmeta.models.registry import build_model

    with pytest.raises(ModelError) as e:
        build_model("resnet18", 2, init="imagenet")
    msg = str(e.value)
    assert "\n" not in msg and "resnet18-f37072fd.pth" in msg
    assert str(caches / "torch" / "hub" / "checkpoints") in msg
    assert "lnmeta models pull" in msg

    path = torch_cache_file(caches / "torch", "resnet18")
    ref = torch.load(path, weights_only=True)
    m = build_model("resnet18", 2, init="imagenet")
    assert torch.equal(m.state_dict()["layer3.0.conv1.weight"], ref["layer3.0.conv1.weight"])
    assert m.fc.out_features == 2  # the ImageNet head is not loaded
    prov = m._lnmeta_init
    assert prov["id"] == "torchvision:resnet18.IMAGENET1K_V1"
    assert len(prov["weights_sha256"]) == 64
    # the same weights by their explicit name
    m2 = build_model("resnet18", 2, init="torchvision:resnet18.IMAGENET1K_V1")
    assert torch.equal(m2.state_dict()["conv1.weight"], ref["conv1.weight"])


def test_torchvision_checkpoint_needing_full_unpickle_is_refused(caches):
    import torch

    from napari_lnmeta.models.registry import build_model

    path = torch_cache_file(caches / "torch", "resnet18")
    sd = torch.load(path, weights_only=True)
    sd["_evil"] = bb.Known  # an arbitrary Python object: needs a full unpickle
    torch.save(sd, path)
    with pytest.raises(ModelError, match="weights_only=True"):
        build_model("resnet18", 2, init="imagenet")


# --------------------------------------------------------------------------------------
def test_hub_foundation_model_by_name(caches):
    import torch

    from napari_lnmeta.models.extractor import Preprocessor, load_extractor

    with pytest.raises(ModelError) as e:
        load_extractor("uni")
    msg = str(e.value)
    assert "\n" not in msg and "MahmoodLab/UNI" in msg
    assert "models--MahmoodLab--UNI" in msg and "model.safetensors" in msg

    # UNI's model card passes init_values / dynamic_img_size: the cached net has them
    vit, args = tiny_vit(init_values=1e-5, dynamic_img_size=True)
    repo = hf_cache_repo(caches / "hf", "MahmoodLab/UNI", vit,
                         architecture="vit_base_patch16_224", model_args=args,
                         pretrained_cfg={"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.6, 0.7]})
    assert (repo / "refs" / "main").read_text() == REV
    model, info = load_extractor("uni")
    assert info.mean == pytest.approx([0.1, 0.2, 0.3]) and info.std == pytest.approx([0.5, 0.6, 0.7])
    assert info.mpp == 0.5 and info.patch_size == 224 and info.feature_dim == 64
    assert info.source == "hf-hub:MahmoodLab/UNI" and info.weights.startswith("sha256:")
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    with torch.inference_mode():
        got = model(Preprocessor(info, "cpu")(patches))
        vit.eval()
        x = torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255
        x = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
            [0.5, 0.6, 0.7]).view(1, 3, 1, 1)
        want = vit(x)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
    # the same repository by its Hub id gives the same backbone id
    _, info2 = load_extractor("hf-hub:MahmoodLab/UNI")
    assert info2.id == info.id


def test_listed_but_unloadable_models_say_why(caches):
    for name in ("conch", "hf-hub:MahmoodLab/CONCH"):
        with pytest.raises(ModelError, match="cannot be loaded here") as e:
            bb.resolve(name)
        msg = str(e.value)
        assert "\n" not in msg and "git+https://github.com/Mahmoodlab/CONCH.git" in msg
        assert "open_clip" in msg


def test_local_folder_for_air_gapped_sites(caches, tmp_path):
    import torch

    from napari_lnmeta.models.extractor import load_extractor
    from napari_lnmeta.models.registry import build_model

    vit, args = tiny_vit(seed=3)
    folder = local_folder(tmp_path / "my-encoder", vit, architecture="vit_base_patch16_224",
                          model_args=args)
    src = bb.resolve(str(folder))
    assert src.id == f"local:{folder.resolve()}"
    _, info = load_extractor(str(folder))
    assert info.source == src.id and info.feature_dim == 64
    # a timm classifier initialised from the folder, its first stages frozen
    m = build_model(src.architecture, 2, init=str(folder), freeze=2)
    assert torch.equal(m.state_dict()["blocks.0.attn.qkv.weight"],
                       vit.state_dict()["blocks.0.attn.qkv.weight"])
    assert not m.cls_token.requires_grad and not m.blocks[0].attn.qkv.weight.requires_grad
    assert m.blocks[1].attn.qkv.weight.requires_grad and m.head.weight.requires_grad
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no model.safetensors"):
        bb.resolve(str(folder))


def test_timm_model_file_roundtrip(tmp_path):
    import torch

    from napari_lnmeta.models.io import ModelMeta, load_model, save_model
    from napari_lnmeta.models.registry import build_model

    arch = 'timm:vit_base_patch16_224{"depth":1,"embed_dim":32,"num_heads":2}'
    torch.manual_seed(0)
    m = build_model(arch, 2)
    p = save_model(tmp_path / "vit.safetensors", m,
                   ModelMeta(architecture=arch, classes=["normal", "tumour"], patch_size=224))
    m2, meta = load_model(p)
    x = torch.rand(2, 3, 224, 224)
    m.eval()
    with torch.inference_mode():
        np.testing.assert_allclose(m(x).numpy(), m2(x).numpy(), rtol=1e-5, atol=1e-6)
    assert meta.architecture == arch


# --------------------------------------------------------------------------------------
def test_models_list_and_pull_cli(caches, capsys, _no_network):
    assert main(["models", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) >= {"uni", "uni2-h", "conch", "phikon", "phikon-v2", "h-optimus-0",
                         "virchow2", "prov-gigapath"}
    assert not rows["uni"]["cached"] and rows["uni"]["gated"]
    vit, args = tiny_vit(init_values=1e-5, dynamic_img_size=True)
    hf_cache_repo(caches / "hf", "MahmoodLab/UNI", vit, architecture="vit_base_patch16_224",
                  model_args=args)
    assert main(["models", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["uni"]["cached"] and rows["uni"]["size_mb"] is not None
    assert main(["models", "list"]) == 0
    assert "CC-BY-NC-ND" in capsys.readouterr().out
    # pulling what is cached does not touch the network
    assert main(["models", "pull", "uni"]) == 0
    assert "hf-hub:MahmoodLab/UNI" in capsys.readouterr().out
    # pulling without a network: one line, exit 2
    assert main(["models", "pull", "torchvision:resnet18.IMAGENET1K_V1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lnmeta: error:") and "\n" not in err and "download" in err
    assert _no_network  # the attempt was made and blocked
    _no_network.clear()


def test_seed_recipe_init_from_cache_or_says_so(caches, tmp_path, capsys, shared_data):
    import csv

    from napari_lnmeta.models.io import read_meta

    rows = list(csv.DictReader((shared_data / "lc25000_lung_224" / "labels.csv").read_text().splitlines()))
    pick = [r for g in ("lung_n_g071", "lung_aca_g108", "lung_n_g173", "lung_aca_g158")
            for r in [r for r in rows if r["group"] == g][:3]]
    table = tmp_path / "t.csv"
    with open(table, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group"])
        for r in pick:
            w.writerow([shared_data / "lc25000_lung_224" / r["path"], r["label"], r["group"]])
    ps = tmp_path / "p.npz"
    assert main(["import-patches", str(table), "--classes", "normal,tumour", "--mpp", "1",
                 "--patch-size", "32", "--out", str(ps)]) == 0
    common = [str(ps), "--recipe", "seed000", "--arch", "resnet18", "--epochs", "1",
              "--batch-size", "4", "--max-steps", "1", "--device", "cpu", "--workers", "1"]
    assert main(["train", *common, "--out", str(tmp_path / "r0")]) == 0
    err = capsys.readouterr().err
    assert "ImageNet weights are not cached" in err and "resnet18-f37072fd.pth" in err
    torch_cache_file(caches / "torch", "resnet18")
    assert main(["train", *common, "--out", str(tmp_path / "r1")]) == 0
    cap = capsys.readouterr()
    assert "init from torchvision:resnet18.IMAGENET1K_V1" in cap.err
    assert "init: torchvision:resnet18.IMAGENET1K_V1" in cap.out
    meta = read_meta(tmp_path / "r1" / "last.safetensors")
    assert meta.extra["init"]["id"] == "torchvision:resnet18.IMAGENET1K_V1"
    assert meta.extra["train"]["freeze_convs"] == 3 and meta.extra["train"]["optimizer"] == "sgd"
    assert meta.mean == pytest.approx([0.485, 0.456, 0.406])


def test_mil_recipes_pick_the_seed_backbones(caches, capsys):
    import argparse

    from napari_lnmeta.cli.mil import _apply_recipe

    def ns(**kw):
        base = {"recipe": "seed002", "backbone": None, "init": None, "patch_size": None}
        return argparse.Namespace(**{**base, **kw})

    a = ns()
    _apply_recipe(a)
    assert (a.backbone, a.patch_size, a.init) == ("vgg16_bn", 256, None)
    err = capsys.readouterr().err
    assert "ImageNet weights are not cached" in err and "vgg16_bn-6c64b313.pth" in err
    # cached (an empty file is enough to be found; it is not loaded here)
    ck = caches / "torch" / "hub" / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "vgg13_bn-abd245e5.pth").write_bytes(b"")
    b = ns(recipe="seed003")
    _apply_recipe(b)
    assert (b.backbone, b.init) == ("vgg13_bn", "imagenet")
    assert "init from torchvision:vgg13_bn.IMAGENET1K_V1" in capsys.readouterr().err
    c = ns(recipe="seed003", backbone="resnet18")  # explicit options win
    _apply_recipe(c)
    assert (c.backbone, c.init) == ("resnet18", None)
    d = ns(recipe=None)
    _apply_recipe(d)
    assert d.backbone == "resnet18"


def test_without_the_foundation_extra_names_say_what_to_install(caches, monkeypatch):
    import sys

    from napari_lnmeta.models.registry import build_model

    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    for name in ("uni", "timm:vit_base_patch16_224.augreg2_in21k_ft_in1k"):
        with pytest.raises(ModelError, match=r"napari-lnmeta\[foundation\]"):
            bb.resolve(name)
    with pytest.raises(ModelError, match=r"napari-lnmeta\[foundation\]"):
        build_model("timm:vit_base_patch16_224", 2)
    # torchvision names and the known list work without them
    torch_cache_file(caches / "torch", "resnet18")
    assert bb.resolve("imagenet-resnet18").id == "torchvision:resnet18.IMAGENET1K_V1"
    rows = {r["name"]: r for r in bb.cached_sources()}
    assert rows["imagenet-resnet18"]["cached"] and not rows["uni"]["cached"]
