"""One spelling per option across ``lnmeta``'s subcommands, the old ones still accepted."""

from __future__ import annotations

import argparse

import pytest

from napari_lnmeta.cli import build_parser, main
from napari_lnmeta.core.tissue import TissueMask

# earlier spellings of -o/--out, kept (hidden) for one release
OLD_OUT = {
    "register": "--output", "warp-points": "--output", "transfer-mask": "--output",
    "tissue": "--output", "grid": "--output", "stain-fit": "--output",
    "mil": "--out-dir", "train-mil": "--out-dir",
}


@pytest.fixture(scope="module")
def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_output_is_o_out_everywhere(subparsers):
    with_out = set()
    for name, p in subparsers.items():
        actions = [a for a in p._actions if a.dest in ("out", "output", "out_dir")]
        if not actions:
            continue
        with_out.add(name)
        (action,) = actions
        assert action.dest == "out" and action.option_strings == ["-o", "--out"], name
        spellings = {s for s, a in p._option_string_actions.items() if a is action}
        assert spellings == {"-o", "--out"} | ({OLD_OUT[name]} if name in OLD_OUT else set())
        helptext = p.format_help()
        assert "-o OUT" in helptext or "-o " in helptext, name
        assert "--output" not in helptext and "--out-dir" not in helptext, name
    assert set(OLD_OUT) <= with_out
    assert {"predict", "batch", "train", "make-patches", "import-patches", "evaluate",
            "evaluate-slides", "separability", "extract-features", "train-spatial"} <= with_out


@pytest.mark.parametrize("name", sorted(OLD_OUT))
def test_old_output_spelling_parses_to_out(subparsers, name):
    p = subparsers[name]
    positionals = [a for a in p._actions if not a.option_strings and a.required]
    args = ["x"] * len(positionals)
    required = [a for a in p._actions if a.option_strings and a.required and a.dest != "out"]
    for a in required:
        args += [a.option_strings[-1], "x"]
    for spelling in ("-o", "--out", OLD_OUT[name]):
        ns = p.parse_args([*args, spelling, "target"])
        assert ns.out == "target"


def test_device_defaults_to_auto_everywhere(subparsers):
    seen = []
    for name, p in subparsers.items():
        for a in p._actions:
            if "--device" in a.option_strings:
                assert a.default == "auto", name
                seen.append(name)
    assert {"predict", "register", "separability", "train", "train-mil", "mil",
            "extract-features", "evaluate", "train-spatial"} <= set(seen)


def test_old_and_new_output_spelling_write_the_same(cmu1, tmp_path, capsys):
    old, new = tmp_path / "old.ome.zarr", tmp_path / "new.ome.zarr"
    assert main(["tissue", str(cmu1), "--output", str(old)]) == 0
    assert main(["tissue", str(cmu1), "--out", str(new)]) == 0
    assert (TissueMask.load(old).mask == TissueMask.load(new).mask).all()
    # a missing output option is named by its one spelling
    with pytest.raises(SystemExit) as exc:
        main(["tissue", str(cmu1)])
    assert exc.value.code == 2
    assert "-o/--out" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["info", "tissue", "predict"])
def test_missing_mpp_warned_once_in_one_line(verb, ihc_png, tmp_path, capsys):
    argv = {"info": ["info", str(ihc_png)],
            "tissue": ["tissue", str(ihc_png), "-o", str(tmp_path / "m.ome.zarr"),
                       "--target-mpp", "4"],
            "predict": ["predict", str(ihc_png), "-o", str(tmp_path / "pred"),
                        "--device", "cpu"]}[verb]
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "physical pixel size unknown" in ln]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lnmeta: warning: {ihc_png}: physical pixel size unknown")
    assert "MppWarning" not in err
    assert code == 0
