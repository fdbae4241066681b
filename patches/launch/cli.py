"""The ``sglang-holes`` console script.

    sglang-holes prepare-model [--force] [--quiet]   # convert the embedded model once, print its folder
    sglang-holes serve [any `sglang serve` flags]     # SGLang's HTTP server with sglang-holes loaded
    sglang-holes version

``serve`` is SGLang's own HTTP server (``sglang.launch_server.run_server``) with:
the pinned-version check and the hook contract check (``patches/launch/hooks.py``); the
defaults table of ``patches/launch/server_args.py`` (``--radix-cache-backend holes`` unless another is given);
the embedded model when no ``--model-path`` is given (a
given local folder is validated first); the plain-CPU defaults when there is no
GPU; and a check that the port is free before anything heavy starts. Errors in
what the user passed print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence

from sglang_holes.model import ModelError, prepare_embedded_model, resolve_model_path

EXIT_USAGE = 2


class PortInUseError(RuntimeError):
    pass


class UnsupportedConfigError(RuntimeError):
    """A server setting the holes cache refuses (``patches/server_args.REFUSED``)."""


def check_port_free(host: str, port: int) -> None:
    """Raise ``PortInUseError`` if ``host:port`` cannot be bound (another server is there)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        # As uvicorn does: connections of a server that just stopped (TIME_WAIT) do not
        # block a new one, a server still listening does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise PortInUseError(
                f"cannot listen on {host}:{port}: {e.strerror or e}. Is another server running there? "
                "Stop it or choose another port (--port N, or PORT=N with make serve)"
            ) from None


def prepare_serve_argv(argv: Sequence[str]) -> list[str]:
    """Resolve the model, check the port and add the CPU defaults to ``sglang serve`` flags."""
    from sglang_holes.patches.launch.server_args import apply_cli_defaults, flag_value

    out = list(argv)
    # Cheap checks first: a busy port must not wait for a model conversion.
    host = (flag_value(out, "--host") or (0, "127.0.0.1"))[1]
    port_s = (flag_value(out, "--port") or (0, "30000"))[1]
    try:
        port = int(port_s)
    except ValueError:
        raise PortInUseError(f"--port must be an integer, got {port_s!r}") from None
    check_port_free(host, port)
    found = flag_value(out, "--model-path")
    if found is None:
        out += ["--model-path", resolve_model_path(None)]
    else:
        i, value = found
        resolved = resolve_model_path(value)
        out[i] = resolved if out[i] == value else f"--model-path={resolved}"
    return apply_cli_defaults(out)


def serve(argv: Sequence[str]) -> int:
    from sglang_holes.patches.launch.hooks import verify
    from sglang_holes.patches.launch.version import check_sglang_version

    check_sglang_version()
    argv = prepare_serve_argv(argv)
    verify()  # every SGLang target the plugin hooks still exists with the expected shape
    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    server_args = prepare_server_args(argv)
    from sglang_holes.patches.launch.server_args import refusal

    if (why := refusal(server_args)) is not None:
        raise UnsupportedConfigError(why)
    print(f"sglang-holes: serving {server_args.model_path} on http://{server_args.host}:{server_args.port}",
          file=sys.stderr, flush=True)
    try:
        run_server(server_args)
    finally:
        # SGLang's own launcher does this too: never leave the scheduler or detokenizer behind.
        kill_process_tree(os.getpid(), include_parent=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="sglang-holes", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare-model", help="convert the embedded SmolLM2-135M-Instruct once; print its folder")
    p.add_argument("--force", action="store_true", help="rebuild even if a cached folder exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.add_parser("serve", help="SGLang's HTTP server with sglang-holes (takes any `sglang serve` flags)",
                   add_help=False)
    sub.add_parser("version", help="print versions")
    if argv[:1] == ["serve"]:
        cmd, rest = "serve", argv[1:]
    else:
        args = parser.parse_args(argv)
        cmd, rest = args.cmd, []
    try:
        if cmd == "prepare-model":
            print(prepare_embedded_model(force=args.force, progress=not args.quiet))
            return 0
        if cmd == "version":
            from importlib import metadata

            from sglang_holes.patches.launch.version import SUPPORTED_SGLANG, installed_sglang_version

            print(f"sglang-holes {metadata.version('sglang-holes')} (supports sglang=={SUPPORTED_SGLANG}; "
                  f"installed: {installed_sglang_version()})")
            return 0
        return serve(rest)
    except (ModelError, PortInUseError, UnsupportedConfigError) as e:
        print(f"sglang-holes: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as e:
        from sglang_holes.patches.launch.hooks import ContractError
        from sglang_holes.patches.launch.version import UnsupportedSGLangError

        if isinstance(e, UnsupportedSGLangError | ContractError):
            print(f"sglang-holes: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
