"""User-space WAN emulation: link shapers and a TCP proxy that applies them (netem-like rate and
delay on a kernel without netem). See ``crowdtrain.wan.shaper`` and ``crowdtrain.wan.proxy``."""

from crowdtrain.wan.proxy import WanProxy
from crowdtrain.wan.shaper import LinkShaper

__all__ = ["LinkShaper", "WanProxy"]
