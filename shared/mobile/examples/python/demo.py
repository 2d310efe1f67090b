"""A driver and a rider through the hexfleet SDK's Python bindings, against
the demo node: the rider watches the street the driver drives down, and
prints each vehicle added, moved and removed.

    cargo run --release -p hexfleet-sim -- demo &     # the demo node (QUIC on 127.0.0.1:4433)
    scripts/mobile-bindings.sh                         # the SDK, and its Kotlin, Swift and Python sources
    PYTHONPATH=target/bindings/python python3 shared/mobile/examples/python/demo.py

HEXFLEET_QUIC, HEXFLEET_CERT and HEXFLEET_TOKEN_SECRET point it elsewhere.
Exits 0 when the rider saw the driver arrive, move and leave.
"""

import os
import sys
import tempfile
import threading
import time

import hexfleet_mobile as hx
from hexfleet_tokens import mint

QUIC = os.environ.get("HEXFLEET_QUIC", "127.0.0.1:4433")
DEV_DIR = os.environ.get("HEXFLEET_DEV_DIR", os.path.join(tempfile.gettempdir(), "hexfleet-dev"))
CERT = os.environ.get("HEXFLEET_CERT", os.path.join(DEV_DIR, "cert.der"))
ME = "py-demo-driver"


class Tokens:
    """The app's backend, asked for a fresh token when one expires."""

    def __init__(self, role, subject):
        self.role, self.subject = role, subject

    def fresh_token(self):
        return mint(self.role, self.subject)


class States:
    def on_state(self, state):
        print(f"driver: {state}")


class View:
    def __init__(self):
        self.seen = {"added": threading.Event(), "moved": threading.Event(), "removed": threading.Event()}

    def on_added(self, v):
        self._saw("added", v, f"added   {v.id:>16} at {v.lat:.5f},{v.lon:.5f}")

    def on_moved(self, v):
        self._saw("moved", v, f"moved   {v.id:>16} to {v.lat:.5f},{v.lon:.5f}")

    def on_removed(self, v, reason):
        self._saw("removed", v, f"removed {v.id:>16} ({reason.name.lower()})")

    def _saw(self, what, vehicle, line):
        if vehicle.id == ME:
            print(f"rider: {line}")
            self.seen[what].set()

    def on_state(self, state):
        print(f"rider: {state}")

    def on_watch_refused(self, error):
        print(f"rider: watch refused: {error}")


def main():
    config = hx.node_config(QUIC, CERT)
    lat, lon = 52.5200, 13.4050  # Berlin, where the demo's fleet drives
    view = View()
    rider = hx.Rider.connect(config, mint("rider", "py-demo-rider"), Tokens("rider", "py-demo-rider"), view)
    rider.watch(hx.watch_around(lat, lon, 800.0))
    driver = hx.Driver.connect(
        config,
        mint("driver", ME),
        Tokens("driver", ME),
        hx.VehicleClass.ECONOMY,
        hx.VehicleStatus.AVAILABLE,
        hx.reporting_policy(),
        States(),
    )
    # A second a location, as the OS gives them: east along the street at 10 m/s.
    for step in range(8):
        driver.report_location(hx.Location(lat=lat, lon=lon + step * 0.00015, heading_deg=90.0,
                                           speed_mps=10.0, accuracy_m=5.0, time_ms=0))
        time.sleep(1.0)
    print(f"driver: {driver.stats()}")
    driver.close()
    ok = all(e.wait(10) for e in view.seen.values())
    print(f"rider sees {len(rider.vehicles())} vehicles around")
    rider.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
