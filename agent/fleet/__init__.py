"""The fleet controller: sees every device over MQTT, keeps a registry, serves a dashboard and API.

Modules, in the direction they import:

- ``registry``  SQLite (WAL) registry and the in-memory latest state of every device
- ``ingest``    batched writes: the MQTT thread enqueues, one writer thread commits
- ``view``      what a device row shows (effective state with ``stale``), pure
- ``rollout``   paced rollouts gated on each device's health, aborted on evidence, rolled back
- ``controller`` broker connection, dispatch, commands and prompts (the core's composition root)
- ``hosting``   the manifest/model directory served at /files
- ``auth``      hashed secrets, sessions, CSRF tokens
- ``metrics``   Prometheus text
- ``web``       Starlette app: pages, JSON API, SSE, /metrics, /files
- ``service``   ``edge-agent fleet serve``: controller + uvicorn, started and stopped in order
- ``client``    the HTTP client behind ``edge-agent fleet devices|prompt|cmd|rollout``

The controller never runs inference and never imports paho directly (agent.mqtt.client does);
the API is documented in API.md next to this file.
"""
