"""Reader, writer, sample data and layer builders: imports napari, never Qt."""

from .._llvm_guard import install as _install_llvm_guard

# Anything reached from napari may import torch/torchvision after the OpenGL canvas exists;
# see _llvm_guard for why that needs care on Mesa OpenGL.
_install_llvm_guard()
