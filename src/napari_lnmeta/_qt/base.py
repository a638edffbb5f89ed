"""What every dock widget shares: viewer connections that are released when it closes.

A widget that listens to the viewer (``viewer.layers.events.inserted`` ...) keeps being
called after its dock is closed unless it disconnects; :class:`DockWidget` records each
connection made through :meth:`DockWidget.listen` and releases them all, and cancels any
running job, in ``closeEvent`` and when napari's dock close button takes it out of its dock.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from qtpy.QtWidgets import QLabel, QWidget

#: the widest size hint a dock widget may ask for (the canvas keeps the rest)
MAX_DOCK_WIDTH = 420


class DockWidget(QWidget):
    """A ``QWidget`` that disconnects from the viewer and stops its jobs when closed."""

    def listen(self, emitter: Any, callback: Callable[..., Any]) -> None:
        """``emitter.connect(callback)``, undone by :meth:`release_viewer`."""
        emitter.connect(callback)
        if not hasattr(self, "_viewer_links"):
            self._viewer_links: list[tuple[Any, Callable[..., Any]]] = []
        self._viewer_links.append((emitter, callback))

    def release_viewer(self) -> None:
        """Disconnect everything connected with :meth:`listen` and cancel running jobs."""
        links, self._viewer_links = getattr(self, "_viewer_links", []), []
        for emitter, callback in links:
            # an emitter already gone with its viewer has nothing left to release
            with contextlib.suppress(TypeError, ValueError, RuntimeError):
                emitter.disconnect(callback)
        from .worker import JobPanel

        for panel in self.findChildren(JobPanel):
            if panel.running:
                panel.cancel()

    def sizeHint(self):  # noqa: N802 (Qt name)
        """The layout's wish, never wider than :data:`MAX_DOCK_WIDTH`: the canvas comes first."""
        hint = super().sizeHint()
        hint.setWidth(min(hint.width(), MAX_DOCK_WIDTH))
        return hint

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        self.release_viewer()
        super().closeEvent(event)

    def event(self, ev) -> bool:
        # napari's dock close button (✕) does not close the inner widget: it takes it out of
        # its dock (parent -> None). Treat that as closing.
        from qtpy.QtCore import QEvent

        if ev.type() == QEvent.ParentChange:
            if self.parent() is not None:
                self._docked = True
            elif getattr(self, "_docked", False):
                self.release_viewer()
        return super().event(ev)


#: a token longer than this (file paths, long names) gets break opportunities
LONG_TOKEN = 24
_ZWSP = "\u200b"


def breakable(text: str) -> str:
    """``text`` with zero-width spaces after ``/ \\ _ . -`` inside long tokens.

    Qt wraps only at spaces; a long file path in a message would otherwise widen the dock
    or be cut off at its edge.
    """
    import re

    def split(m: re.Match) -> str:
        return re.sub(r"([/\\_.\-])", r"\1" + _ZWSP, m.group(0))

    return re.sub(r"\S{" + str(LONG_TOKEN + 1) + ",}", split, text)


class WrapLabel(QLabel):
    """A word-wrapping ``QLabel`` that also wraps long paths; ``text()`` is what was set."""

    def __init__(self, text: str = "", parent: QWidget | None = None):
        super().__init__(parent)
        self.setWordWrap(True)
        self.setText(text)

    def text(self) -> str:
        return getattr(self, "_plain", super().text())

    def setText(self, text: str) -> None:  # noqa: N802 (Qt name)
        self._plain = str(text)
        QLabel.setText(self, breakable(self._plain))
        self._fit()

    def resizeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        super().resizeEvent(event)
        self._fit()

    def _fit(self) -> None:
        """Never shorter than the wrapped text: a crowded dock scrolls instead of clipping."""
        if self.width() > 0:
            need = self.heightForWidth(self.width())
            if need > 0 and need != self.minimumHeight():
                self.setMinimumHeight(need)
