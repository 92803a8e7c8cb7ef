"""Let PyPI's torchvision 0.28.0 (a CUDA build) import beside the CPU build of torch 2.13.0.

timm imports torchvision. The wheel's _C.so links libtorch_cuda.so, which the CPU torch lacks,
so its C++ ops do not load (torchvision handles that: extension._has_ops() is False). But
torchvision/_meta_registrations.py registers fake kernels for torchvision::nms and ::qnms
without asking _has_ops(), and `import torchvision` raises "operator torchvision::nms does not
exist". This guards those two decorators with _has_ops(), as the file's other registrations
are. timm's classifiers use none of those ops. Used by .ci/timm only, on its own venv.
"""

import importlib.util
import pathlib
import sys

spec = importlib.util.find_spec("torchvision")
if spec is None:
    sys.exit("torchvision is not installed in this environment")
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
source = path.read_text()
if "_register_fake_if_ops" in source:
    print(f"already patched: {path}")
    sys.exit(0)
helper = '''

def _register_fake_if_ops(name):  # hf_finetune .ci/patch_torchvision.py: guarded like register_meta()
    if torchvision.extension._has_ops():
        return torch.library.register_fake(name)
    return lambda fn: fn
'''
anchor = "import torchvision.extension  # noqa: F401\n"
if anchor not in source:
    sys.exit(f"{path}: unexpected content (not torchvision 0.28?); cannot apply the guard")
source = source.replace(anchor, anchor + helper, 1)
for op in ("nms", "qnms"):
    old = f'@torch.library.register_fake("torchvision::{op}")'
    if source.count(old) != 1:
        sys.exit(f"{path}: expected one {old}")
    source = source.replace(old, f'@_register_fake_if_ops("torchvision::{op}")')
path.write_text(source)
print(f"patched: {path}")
