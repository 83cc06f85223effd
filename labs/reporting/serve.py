"""Serve a rendered report on 127.0.0.1: the full Allure report fetches its data files, which browsers
refuse from file://. Python's http.server in a thread, not `allure open`: that one always starts a browser."""

from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from labs.errors import ConfigError, InfraError


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class ReportServer:
    """Serves run_dir/html (both the full report and the single file) until stopped."""

    def __init__(self, run_dir: Path, port: int = 0) -> None:
        self.root = run_dir / "html"
        if not (self.root / "awesome" / "index.html").exists():
            raise ConfigError(f"{run_dir}: no rendered report (html/awesome/index.html); run `lab report {run_dir}`")
        handler = functools.partial(_QuietHandler, directory=str(self.root))
        try:
            self._server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        except OSError as exc:
            raise InfraError(f"cannot serve the report on 127.0.0.1:{port}: {exc.strerror}") from None
        self._thread = threading.Thread(target=self._server.serve_forever, name="report-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/awesome/index.html"

    def start(self) -> ReportServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> ReportServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
