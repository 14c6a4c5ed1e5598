"""Simulated sensor devices that publish over MQTT like real firmware: `edgernn simulate`.

Layer 3: imports only `edgernn.protocol`, the stdlib, NumPy and paho-mqtt -- never the model code, so the
simulator cannot hide a runtime bug. Modules, one job each:

- `signals`: what a device measures, with ground-truth labels (imu, vibration, temperature profiles);
- `faults`: drops, duplicates, reorders, NaN, stuck sensors, malformed payloads, disconnect storms --
  `Faults.parse("drop=0.01,...")`, applied per device with its own seeded RNG;
- `device`: one device: client id ``sim-<id>``, last will and retained status, ``seq`` and ``ts``, a
  bounded store-and-forward buffer;
- `schedule`: sample times on a fixed grid (phase, jitter, no drift) and the lag meter;
- `fleet`: hundreds of devices from one thread on paho's external-loop API; `Fleet.run`, `start`/`stop`,
  `stats`, `truth`;
- `replay`: a CSV recording replayed as one device.

Nothing is imported here, so ``import edgernn.firmware_sim.faults`` (the CLI parses --faults) does not load paho.
"""
