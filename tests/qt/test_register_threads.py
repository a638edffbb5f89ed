"""The Register widget's CPU threads control reaches the registration."""

from __future__ import annotations

from napari_lnmeta._qt.register_widget import RegisterWidget, default_threads


def test_threads_control(make_napari_viewer):
    reg = RegisterWidget(make_napari_viewer())
    assert reg.threads.value() == default_threads()
    reg.threads.setValue(1)
    assert reg.config().threads == 1
    reg.threads.setValue(0)  # "auto": torch's own setting
    assert reg.threads.text() == "auto" and reg.config().threads is None
