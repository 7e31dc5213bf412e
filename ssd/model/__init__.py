from ssd.model.ssd import SSD, build_ssd

__all__ = ["SSD", "build_ssd"]
