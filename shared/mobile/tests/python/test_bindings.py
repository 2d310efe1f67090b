"""The Python bindings against a real node (started by tests/bindings.rs):
a driver's fixes reach a rider's callbacks, errors come back typed, and an
expired token is replaced through the app's TokenProvider."""

import os
import sys
import threading
import time
import unittest

import hexfleet_mobile as hx
from hexfleet_tokens import mint

QUIC = os.environ["HEXFLEET_QUIC"]
CERT = os.environ["HEXFLEET_CERT"]
WAIT = 10.0
ORIGIN = (59.3300, 18.0600)


def config():
    return hx.node_config(QUIC, CERT)


def at(lat, lon, speed=10.0):
    return hx.Location(lat=lat, lon=lon, heading_deg=90.0, speed_mps=speed, accuracy_m=5.0, time_ms=0)


def fast_policy():
    p = hx.reporting_policy()
    p.min_interval_ms = 100
    p.max_interval_ms = 500
    return p


class Tokens:
    def __init__(self, role, subject, ttl_s=3600):
        self.role, self.subject, self.ttl_s = role, subject, ttl_s
        self.calls = 0

    def fresh_token(self):
        self.calls += 1
        return mint(self.role, self.subject, self.ttl_s)


class NoTokens:
    def fresh_token(self):
        return None


class States:
    def __init__(self):
        self.states = []
        self.changed = threading.Condition()

    def on_state(self, state):
        with self.changed:
            self.states.append(state)
            self.changed.notify_all()

    def wait_for(self, check, what):
        with self.changed:
            if not self.changed.wait_for(lambda: any(check(s) for s in self.states), WAIT):
                raise AssertionError(f"no {what} in {[str(s) for s in self.states]}")


class View(States):
    def __init__(self):
        super().__init__()
        self.events = []

    def _event(self, kind, vehicle, reason=None):
        with self.changed:
            self.events.append((kind, vehicle, reason))
            self.changed.notify_all()

    def on_added(self, v):
        self._event("added", v)

    def on_moved(self, v):
        self._event("moved", v)

    def on_removed(self, v, reason):
        self._event("removed", v, reason)

    def on_watch_refused(self, error):
        self._event("refused", None, error)

    def wait_event(self, check, what):
        with self.changed:
            if not self.changed.wait_for(lambda: any(check(*e) for e in self.events), WAIT):
                raise AssertionError(f"no {what} in {[(k, v and v.id, r) for k, v, r in self.events]}")


def driver(name, tokens=None, listener=None, token=None, policy=None):
    return hx.Driver.connect(
        config(),
        token or mint("driver", name),
        tokens or Tokens("driver", name),
        hx.VehicleClass.ECONOMY,
        hx.VehicleStatus.AVAILABLE,
        policy or fast_policy(),
        listener or States(),
    )


def rider(name, view):
    r = hx.Rider.connect(config(), mint("rider", name), Tokens("rider", name), view)
    r.watch(hx.watch_around(ORIGIN[0], ORIGIN[1], 1000.0))
    return r


class Bindings(unittest.TestCase):
    def test_a_drivers_fixes_reach_a_riders_callbacks(self):
        view = View()
        r = rider("py-rider-1", view)
        view.wait_for(lambda s: s.is_CONNECTED(), "connected rider")
        d = driver("py-driver-1")
        d.report_location(at(*ORIGIN))
        view.wait_event(lambda k, v, _: k == "added" and v.id == "py-driver-1", "added")
        moved_to = ORIGIN[1] + 0.0005
        for step in range(1, 6):
            d.report_location(at(ORIGIN[0], ORIGIN[1] + step * 0.0001))
            time.sleep(0.15)
        view.wait_event(lambda k, v, _: k == "moved" and abs(v.lon - moved_to) < 1e-6, "moved")
        self.assertIn("py-driver-1", [v.id for v in r.vehicles()])
        # A new class: the rider hears the vehicle anew, with it.
        d.set_vehicle_class(hx.VehicleClass.XL)
        d.report_location(at(ORIGIN[0], moved_to + 0.0001))
        view.wait_event(lambda k, v, _: k == "added" and v.id == "py-driver-1"
                        and v.vehicle_class == hx.VehicleClass.XL, "the new class")
        stats = d.stats()
        self.assertGreaterEqual(stats.fixes_sent, 2)
        self.assertEqual(stats.transport, hx.Transport.QUIC)
        d.close()
        view.wait_event(
            lambda k, v, reason: k == "removed" and v.id == "py-driver-1"
            and reason == hx.RemovalReason.OFFLINE, "removed (offline)")
        r.close()

    def test_errors_come_back_typed(self):
        # A rider's token for a driver: refused, after asking for a fresh one.
        with self.assertRaises(hx.MobileError.Unauthorized):
            driver("py-wrong", tokens=NoTokens(), token=mint("rider", "py-wrong"))
        with self.assertRaises(hx.MobileError.InvalidArgument):
            hx.Driver.connect(hx.node_config("not an address", CERT), mint("driver", "x"), NoTokens(),
                              hx.VehicleClass.ECONOMY, hx.VehicleStatus.AVAILABLE,
                              hx.reporting_policy(), States())
        with self.assertRaises(hx.MobileError.Certificate):
            hx.Driver.connect(hx.node_config(QUIC, "/nonexistent/cert.der"), mint("driver", "x"),
                              NoTokens(), hx.VehicleClass.ECONOMY, hx.VehicleStatus.AVAILABLE,
                              hx.reporting_policy(), States())
        silent = hx.node_config("127.0.0.1:9", CERT)  # nothing answers there, UDP or TCP
        silent.quic_timeout_ms = 300
        with self.assertRaises(hx.MobileError.Unreachable):
            hx.Rider.connect(silent, mint("rider", "py-lonely"), NoTokens(), View())
        d = driver("py-typed")
        with self.assertRaises(hx.MobileError.InvalidArgument):
            d.report_location(at(200.0, 0.0))
        view = View()
        r = rider("py-typed-rider", view)
        with self.assertRaises(hx.MobileError.InvalidArgument):
            r.watch(hx.watch_around(0.0, 0.0, -5.0))
        # One the node refuses: wider than its limit.
        r.watch(hx.watch_around(ORIGIN[0], ORIGIN[1], 1e6))
        view.wait_event(lambda k, _v, e: k == "refused" and isinstance(e, hx.MobileError.Refused)
                        and e.code == "bad_request", "a refused watch")
        d.close()
        r.close()
        with self.assertRaises(hx.MobileError.Closed):
            d.report_location(at(*ORIGIN))

    def test_an_expired_token_is_replaced_through_the_token_provider(self):
        view = View()
        r = rider("py-rider-2", view)
        tokens = Tokens("driver", "py-expiring")
        states = States()
        d = driver("py-expiring", tokens=tokens, listener=states, token=mint("driver", "py-expiring", ttl_s=2))
        d.report_location(at(*ORIGIN))
        view.wait_event(lambda k, v, _: v is not None and v.id == "py-expiring", "the driver")
        # The node closes the session when the token expires; the SDK asks
        # the app for a fresh one and connects again.
        states.wait_for(lambda s: s.is_RECONNECTING() and "expired" in s.reason, "token expiry")
        deadline = time.time() + WAIT
        while tokens.calls == 0 and time.time() < deadline:
            time.sleep(0.05)
        self.assertGreaterEqual(tokens.calls, 1)
        states.wait_for(lambda s: s.is_CONNECTED(), "connected again")
        after = ORIGIN[1] + 0.002
        d.report_location(at(ORIGIN[0], after))
        view.wait_event(lambda k, v, _: v is not None and v.id == "py-expiring"
                        and abs(v.lon - after) < 1e-6, "a fix sent with the fresh token")
        d.close()
        r.close()


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    sys.exit(0 if result.wasSuccessful() else 1)
