"""``python -m sglang_holes.launch_server [sglang serve arguments]`` = ``sglang-holes serve ...``.

SGLang's HTTP server with the plugin loaded and ``--radix-cache-backend holes`` by
default (see ``sglang_holes.patches.cli``). The import happens on run, so this core
module stays free of SGLang.
"""

from __future__ import annotations

import sys


def main() -> int:
    from sglang_holes.patches.cli import main as cli_main

    return cli_main(["serve", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
