"""The simulator stands apart from the model code (DESIGN.md, layer 3): it speaks only the protocol, so a
runtime bug cannot hide behind code the simulator shares with the daemon."""

import subprocess
import sys

ALLOWED = {"edgernn", "edgernn.protocol", "edgernn.errors", "edgernn.spec"}  # the last two: `import edgernn` (layer 1)
FORBIDDEN_PACKAGES = ("numba", "torch", "onnx", "onnxruntime", "safetensors", "prometheus_client")


def test_firmware_sim_imports_only_the_protocol_and_paho():
    code = ("import sys, edgernn.firmware_sim.fleet, edgernn.firmware_sim.replay, edgernn.firmware_sim.signals; "
            "print('\\n'.join(sorted(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    ours = {name for name in loaded if name.startswith("edgernn") and not name.startswith("edgernn.firmware_sim")}
    assert ours <= ALLOWED, f"firmware_sim pulls in {sorted(ours - ALLOWED)}"
    assert not [name for name in loaded if name.split(".")[0] in FORBIDDEN_PACKAGES]
    assert "paho.mqtt.client" in loaded
