"""The exceptions minicnn raises, in one module that imports nothing of minicnn.

Any module can import them without creating a cycle. Each is also importable from the module
that raises it (``minicnn.module.ShapeError``, ``minicnn.cuda.KernelCompileError``, ...), and
the public ones from ``minicnn`` itself. Two stay where they are used: ``cifar``'s private
``_Refused``, which never leaves that module, and ``minicnn.testing.capture.CaptureViolation``,
which belongs to a stand-in for CuPy that sits above the fast path and is used by tests alone.
"""


class ShapeError(ValueError):
    """An input whose rank, size or channel count a layer cannot take."""


class DeviceError(RuntimeError):
    """Raised when a device is asked for that this machine cannot give, with the reason."""


class KernelCompileError(RuntimeError):
    """A kernel file that does not compile or load: the message names the file, the kernel when
    one was being loaded, and the options, with the compiler's log or what to install."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit what it is loaded into."""


class WeightsError(ValueError):
    """A weights file that cannot be read, or that does not fit the model; names the file."""


class IDXError(ValueError):
    """A file that is not a well-formed IDX file (or gzip-compressed IDX file)."""


class DatasetUnavailable(RuntimeError):
    """A dataset whose files are neither on this machine nor downloadable from any mirror."""


class CIFARFormatError(ValueError):
    """A CIFAR-10 batch file or archive that is not well-formed (or that a safe reader refuses)."""


class GradcheckError(AssertionError):
    """A backward pass disagrees with finite differences."""


class EmulatorError(RuntimeError):
    """A kernel run by the emulator misbehaved (wrote out of bounds, diverged at a barrier) or was
    called wrongly."""


class EmulatorUnavailable(RuntimeError):
    """No C++ compiler (or no emulator header): the emulator cannot build kernels here."""


class ExportError(ValueError):
    """A model that cannot be written as ONNX (``minicnn.onnx.export``): names the layer by its
    path in the model and its type, and says what is supported."""
