"""``lnmeta models list`` and ``lnmeta models pull NAME``: pretrained backbones.

``list`` shows every known backbone (pathology foundation models and ImageNet
baselines): its id, whether it is in the local cache and its size, its licence and
gating, and the µm/px it was trained at. ``pull`` fetches one into the cache (the only
command that downloads); afterwards it loads offline by name (``--init`` /
``--backbone``). See docs/models.md.
"""

from __future__ import annotations

import argparse

from ..io import jsonio
from . import command

_EPILOG = """\
names: imagenet (with --arch), torchvision:ARCH[.WEIGHTS], timm:MODEL[.TAG],
hf-hub:ORG/NAME[@REV], a short name from `lnmeta models list`, or a folder holding
config.json + model.safetensors (transformers encoders such as Phikon: also
preprocessor_config.json; they are feature extractors, --backbone only). Gated models (UNI, Virchow2, ...) need their terms
accepted on huggingface.co and a token (HF_TOKEN or `hf auth login`).
caches: $TORCH_HOME/hub/checkpoints (torchvision) and $HF_HOME/hub (Hugging Face).
"""


@command("models", help="List known pretrained backbones (cached or not, licence) or pull one")
def models(p: argparse.ArgumentParser):
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _EPILOG
    sub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="known backbones, cached or not, size, licence")
    ls.add_argument("--json", action="store_true", help="print JSON")
    pl = sub.add_parser("pull", help="fetch a backbone into the local cache (needs internet)")
    pl.add_argument("name", help="a known name, torchvision:..., timm:..., hf-hub:...")
    pl.add_argument("--arch", default=None, help="architecture for the name 'imagenet'")

    def run(args):
        from ..models.backbones import cached_sources, hf_cache_dir, pull, torch_checkpoints_dir

        if args.models_command == "list":
            rows = cached_sources()
            if args.json:
                print(jsonio.dumps(rows, indent=2))
                return 0
            print(f"{'name':18s} {'cached':>9s}  {'gated':5s} {'µm/px':5s}  id / licence")
            for r in rows:
                cached = f"{r['size_mb']:.0f} MB" if r["cached"] else "no"
                loadable = {"timm": "", "torchvision": "",
                            "transformers": "  [transformers: feature extraction only]"
                            }.get(r["loader"], f"  [not loadable here: needs the "
                                               f"'{r['loader']}' package, see docs/models.md]")
                mpp = f"{r['mpp']:.2f}" if r["mpp"] else "-"
                print(f"{r['name']:18s} {cached:>9s}  {'yes' if r['gated'] else 'no':5s} "
                      f"{mpp:5s}  {r['id']}  ({r['params']}; {r['licence']}){loadable}")
            print(f"caches: {torch_checkpoints_dir()} and {hf_cache_dir()}")
            return 0
        src = pull(args.name, args.arch)
        prov = src.provenance()
        print(f"{src.id}: {src.weights_file} (sha256 {prov['weights_sha256'][:16]}, "
              f"{src.architecture}, input {src.input_size} px"
              + (f", {src.mpp} µm/px" if src.mpp else "") + ")")
        return 0

    return run
