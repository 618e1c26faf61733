"""Reading the CIFAR python pickles without letting a pickle run code.

`pickle.load` runs whatever a pickle names (any importable callable with any arguments), so a doctored
`cifar-100-python/train` could run a command when the app reads it. The CIFAR files hold a dict of bytes keys, lists of
ints and bytes, and numpy arrays; `load` allows exactly the globals those need (numpy's array reconstruction and
dtype, and `_codecs.encode`, which pickles of protocol 2 written by Python 3 use for bytes) and refuses any other.
"""
import pickle
from typing import IO, Any

ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5's arrays
    ("_codecs", "encode"),
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that names a global outside `ALLOWED`: refused before anything of it runs."""


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED:
            raise UnsafePickleError(f"it refers to {module}.{name}, which a CIFAR data file never holds; refusing to "
                                    f"load it (a pickle that names other code can run it)")
        return super().find_class(module, name)


def load(file: IO[bytes], encoding: str = "bytes") -> Any:
    """`pickle.load(file, encoding=encoding)` for data pickles: only the globals in `ALLOWED` may appear."""
    return _Restricted(file, encoding=encoding).load()
