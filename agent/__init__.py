"""edge-agent: run the best-fitting quantized LLM on an edge device, driven over MQTT.

Who owns what on a device (``edge-agent run``; agent.daemon is the composition root that
builds these, starts them in order and stops them in reverse):

- the model: agent.supervisor.ModelSupervisor, on its ``model`` thread: the probe, profile,
  plan, fetch, load, last good Selection, pins and manifest overrides, and every slow
  command op. agent.runtime.engine.Engine runs what it is given: queue and state machine
  (agent.runtime.model_state), generations on its ``engine`` thread (agent.runtime.runner),
  crash restarts on its ``engine-supervisor`` thread (agent.runtime.restarts).
- in-flight requests: agent.ledger.RequestLedger: every admitted prompt and command id,
  in flight (with its reply route) or answered (its final, for duplicates).
- the worker process: agent.runtime.process.WorkerProcess, spawned by the engine; the
  worker (agent.runtime.worker) is the only place llama_cpp is imported.
- MQTT I/O: agent.mqtt.client.MQTTClient (paho) under agent.presence.DeviceLink, which
  makes the device's connections; each connection's socket is read by its own thread
  (agent.mqtt.network) and written by whichever thread publishes, under one I/O lock.
  agent.dispatcher handles what arrives, agent.replies publishes prompt replies,
  agent.presence status, meta and events.
- telemetry: agent.telemetry.Telemetry, on the hardware readers (cgroup-aware).

Threads in the daemon process: main (signals, watchdog), an ``mqtt-<client id>`` I/O thread
per connection, ``dispatcher``, ``model``, ``replies``, ``telemetry``, ``upgrades`` (ends once a
trial is settled), the engine's ``engine`` and ``engine-supervisor``, and two reader threads
per worker process. The worker has its main thread and a frame reader.

One prompt's path, with its hand-offs (threads → queues):

1. the connection's ``mqtt-<client id>`` thread decodes the PUBLISH → ``inbox``
2. ``dispatcher``: parses and validates once (agent.mqtt.payloads.decode_prompt), checks the
   reply route, admits the id in the ledger, ``Engine.submit`` → the engine's queue
3. ``engine`` thread: starts it → pipe → the worker's frame reader → its ``_ops`` queue
4. the worker's main thread tokenizes once (``too_long`` is answered there) and generates;
   chunk and final frames → pipe
5. the worker's frame-reader thread in the daemon hands every record of the request, in
   order, to ``Replies.recorder``, which publishes it there (chunks QoS 0, the final QoS 1,
   finishing the ledger entry): that thread writes the packet to the socket itself (a chunk
   as one PUBLISH built by agent.mqtt.packets, without paho's per-message bookkeeping). Only
   while the line is busy does a chunk wait, for the ``replies`` thread to publish it
   coalesced with the next ones (agent.replies); only a short write leaves bytes for the
   ``mqtt-<client id>`` thread to finish.

So: 6 threads in two processes and 3 queues (inbox, the engine's, the worker's ``_ops``);
one hand-off each way between the daemon's MQTT side and the model, no round trip to the
worker before the queue, and no thread between a reply and the socket.
"""

__version__ = "0.1.0"
