"""A bridged pair of real mosquitto brokers, the common IoT topology: a site broker bridged to a central one
with `topic lepton/# both 1` (retained messages travel both ways, also those published before the bridge)."""

from __future__ import annotations

from pathlib import Path

from broker import Broker, Watcher, free_port


class BridgePair:
    def __init__(self, folder: Path) -> None:
        self.central = Broker(folder / "central")
        self.site = Broker(folder / "site", port=free_port(), extra="\n".join([
            "connection central",
            f"address 127.0.0.1:{self.central.port}",
            "topic lepton/# both 1",
            "cleansession false",
            "restart_timeout 1",
            "bridge_protocol_version mqttv311",
        ]))

    def start(self) -> BridgePair:
        self.central.start()
        self.site.start()
        self.wait_bridged()
        return self

    def wait_bridged(self, timeout: float = 30.0) -> None:
        """Until a message published on the site arrives at the central broker."""
        import paho.mqtt.publish as publish

        with Watcher(self.central.port, ["lepton/bridge-check"]) as w:
            def crossed(messages: list[tuple[str, bytes, bool]]) -> bool:
                return bool(messages)

            for _ in range(int(timeout * 4)):
                publish.single("lepton/bridge-check", b"1", qos=1, hostname="127.0.0.1", port=self.site.port)
                if w.wait_for(crossed, 0.25):
                    return
        raise RuntimeError("the site broker's bridge to the central one did not come up: " + " | ".join(
            self.site.log[-5:]))

    def stop(self) -> None:
        self.site.stop()
        self.central.stop()

    def __enter__(self) -> BridgePair:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
