"""``HolesCpuPlatform``: SGLang's in-tree CPU platform, marked out-of-tree.

See ``sglang_holes.patches.launch.platform`` for why this exists and when it is active.
"""

from __future__ import annotations

from sglang.srt.platforms.cpu import CpuSRTPlatform
from sglang.srt.platforms.device_mixin import PlatformEnum


class HolesCpuPlatform(CpuSRTPlatform):
    """Identical to ``CpuSRTPlatform`` except ``is_out_of_tree()`` is true."""

    _enum = PlatformEnum.OOT
