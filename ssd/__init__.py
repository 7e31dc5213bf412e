"""ssd: SSD object detectors for PyTorch."""

__version__ = "0.1.0"

__all__ = ["Detector", "__version__"]


def __getattr__(name: str):
    # lazy: ``import ssd`` (the CLI's version flag, config tools) stays free of torch and OpenCV
    if name == "Detector":
        from ssd.inference import Detector

        return Detector
    raise AttributeError(f"module 'ssd' has no attribute {name!r}")
