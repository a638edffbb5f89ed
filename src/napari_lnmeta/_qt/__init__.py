"""Widgets and workers: the only place that imports qtpy and magicgui widgets."""

from .._llvm_guard import install as _install_llvm_guard

# Jobs started from these widgets import torch/torchvision after napari's OpenGL canvas
# exists; see _llvm_guard for why that needs care on Mesa OpenGL.
_install_llvm_guard()
