"""``edge-agent fleet serve``: the controller plus its web server, in the right order.

``FleetService`` starts the FleetController (broker, ingest, rollouts) and then uvicorn
with the web app; it stops them in reverse. ``serve_forever`` runs uvicorn in the calling
thread (the CLI; uvicorn handles SIGINT/SIGTERM); ``start`` runs it in a thread and
returns once the port is listening (tests, benchmarks). SIGTERM and SIGINT end
``serve_forever`` cleanly: the last ingest batch and every device's latest telemetry are
committed before the process exits. Nothing else lives here.
"""

from __future__ import annotations

import signal
import threading
import time

import uvicorn

from agent.config import FleetConfig
from agent.errors import ConfigError
from agent.fleet.controller import FleetController
from agent.fleet.web import FleetWeb
from agent.log import get_logger

log = get_logger(__name__)


class FleetService:
    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.controller = FleetController(config)
        self.web = FleetWeb(self.controller, config)
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.web.app,
                host=config.http_host,
                port=config.http_port,
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=3,
            )
        )
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.config.http_host}:{self.config.http_port}"

    def serve_forever(self) -> None:
        self.controller.start()
        log.info(
            "fleet_serving",
            url=self.url,
            broker=f"{self.config.mqtt.host}:{self.config.mqtt.port}",
            db=self.config.db_path,
            models=self.config.model_dir,
        )
        # uvicorn re-raises SIGINT/SIGTERM once it has shut down; with these no-op handlers in
        # place that re-raise returns here, so the controller still flushes its last batch.
        previous = {
            sig: signal.signal(sig, lambda signum, frame: None)
            for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            self.server.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.controller.stop()
            log.info("fleet_stopped")
        if not self.server.started:
            raise ConfigError(
                f"cannot listen on {self.config.http_host}:{self.config.http_port}", key="http_port"
            )

    def start(self, timeout_s: float = 10.0) -> "FleetService":
        self.controller.start()
        self._thread = threading.Thread(target=self.server.run, name="fleet-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.stop()
                raise ConfigError(f"the web server did not start on {self.url}", key="http_port")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread:
            self._thread.join(10)
        self.controller.stop()
