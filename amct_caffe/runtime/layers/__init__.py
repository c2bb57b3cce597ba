"""Layer implementations; importing this package registers every layer type.

One module per layer family. Each module registers its classes with
``amct_caffe.ops.register``.
"""

import importlib
import pkgutil

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
