"""Black-box interoperability: stock MQTT clients against a real `spool serve`.

mosquitto_pub/mosquitto_sub (Debian's mosquitto-clients) and paho-mqtt (PyPI) talk to spool over
plain MQTT and MQTTS with the generated CA. scripts/test.sh installs both and runs:

    SPOOL_BIN=target/debug/spool python3 -m unittest discover -s tests/interop -v
"""

import base64
import hashlib
import hmac
import os
import queue
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import unittest
import urllib.parse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

SPOOL_BIN = os.environ.get("SPOOL_BIN", "target/debug/spool")


class Spool:
    """A `spool serve` child on ephemeral ports (MQTTS on `tls_bind` if given), with its data in
    a temporary directory, and `extra_args` for `spool serve`."""

    def __init__(self, data_dir, tls_bind="127.0.0.1:0", extra_args=()):
        self.data_dir = data_dir
        self.process = subprocess.Popen(
            [SPOOL_BIN, "serve", "--data-dir", data_dir,
             "--mqtt-bind", "127.0.0.1:0", "--mqtts-bind", tls_bind,
             "--admin-bind", "127.0.0.1:0", *extra_args],
            stdout=subprocess.PIPE, env={**os.environ, "SPOOL_LOG": "warn"}, text=True)
        self.port = self.tls_port = self.ca = self.admin = None
        for line in self.process.stdout:
            if m := re.match(r"spool: MQTT listening on .*:(\d+)$", line.strip()):
                self.port = int(m.group(1))
            elif m := re.match(r"spool: admin API on (\S+)$", line.strip()):
                self.admin = m.group(1)
            elif m := re.match(r"spool: MQTTS listening on .*:(\d+)$", line.strip()):
                self.tls_port = int(m.group(1))
            elif line.startswith("spool: TLS CA certificate"):
                self.ca = line.strip().rsplit(" ", 1)[1]
            elif line.startswith("spool: data in"):
                break
        assert self.port and self.tls_port and self.ca, "spool did not start"
        # Keep draining stdout so spool never blocks on a full pipe.
        self.drain = threading.Thread(target=lambda: [None for _ in self.process.stdout],
                                      daemon=True)
        self.drain.start()

    def kill(self):
        self.process.kill()
        self.process.wait()
        self.drain.join(timeout=5)
        self.process.stdout.close()


def sas_token(key, host, device, module, expiry):
    """A SAS token as the Azure IoT SDKs make one (contract §2.1), independently of spool."""
    sr = urllib.parse.quote(f"{host}/devices/{device}/modules/{module}", safe="")
    digest = hmac.new(base64.b64decode(key), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()
    sig = urllib.parse.quote(base64.b64encode(digest).decode(), safe="")
    return f"SharedAccessSignature sr={sr}&sig={sig}&se={expiry}"


def mosquitto(tool, *args, timeout=20):
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=timeout, check=True)


class PahoClient:
    """A paho client whose received messages land in a queue."""

    def __init__(self, port, client_id, v5=False, clean=True, will=None, expiry=0):
        protocol = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=protocol, **({} if v5 else {"clean_session": clean}))
        self.messages = queue.Queue()
        self.connected = queue.Queue()
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_connect = lambda c, u, f, rc, p: self.connected.put((f, rc))
        if will:
            self.client.will_set(*will)
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = expiry
        kwargs = {"clean_start": clean, "properties": properties} if v5 else {}
        self.client.connect("127.0.0.1", port, keepalive=30, **kwargs)
        self.client.loop_start()
        self.flags, reason = self.connected.get(timeout=10)
        assert reason == 0, f"CONNACK {reason}"

    def subscribe(self, topic, qos=1):
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe(topic, qos)
        assert done.wait(10), "no SUBACK"

    def publish(self, topic, payload, qos=1, retain=False, properties=None):
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        info.wait_for_publish(timeout=10)
        assert info.is_published()

    def received(self, count, timeout=10):
        return [self.messages.get(timeout=timeout) for _ in range(count)]

    def stop(self):
        self.client.disconnect()
        self.client.loop_stop()


class Interop(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="spool-interop-")
        self.spool = Spool(self.dir)

    def tearDown(self):
        self.spool.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def test_mosquitto_clients_qos1_in_order(self):
        sub = subprocess.Popen(
            ["mosquitto_sub", "-p", str(self.spool.port), "-q", "1", "-t", "interop/#",
             "-C", "20", "-F", "%t %p", "-W", "20"],
            stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        for i in range(20):
            mosquitto("mosquitto_pub", "-p", str(self.spool.port), "-q", "1",
                      "-t", "interop/seq", "-m", f"m{i}")
        out, _ = sub.communicate(timeout=25)
        self.assertEqual(out.split("\n")[:20], [f"interop/seq m{i}" for i in range(20)])

    def test_mosquitto_clients_over_tls_12_and_13_as_an_identity_with_the_generated_ca(self):
        # The TLS port requires an identity: one is added with `spool identity add` (on a
        # stopped server), and its SAS token computed here as the Azure IoT SDKs compute it.
        self.spool.kill()
        added = subprocess.run([SPOOL_BIN, "identity", "add", "edge/mosquitto",
                                "--data-dir", self.dir],
                               capture_output=True, text=True, check=True).stdout
        connection_string = re.search(r"connection string: (\S+)", added).group(1)
        fields = dict(f.split("=", 1) for f in connection_string.split(";"))
        self.assertEqual((fields["DeviceId"], fields["ModuleId"]), ("edge", "mosquitto"))
        self.spool = Spool(self.dir)
        token = sas_token(fields["SharedAccessKey"], fields["HostName"], "edge", "mosquitto",
                          int(time.time()) + 3600)
        username = f"{fields['HostName']}/edge/mosquitto/?api-version=2019-10-01"
        # The module publishes its own telemetry (the only topics it may publish on), retained;
        # a plain client on the loopback listener reads it back.
        telemetry = "devices/edge/modules/mosquitto/messages/events"
        for version in ["tlsv1.2", "tlsv1.3"]:
            tls = ["-p", str(self.spool.tls_port), "--cafile", self.spool.ca,
                   "-h", "localhost", "--tls-version", version,
                   "-i", "edge/mosquitto", "-u", username, "-P", token]
            topic = f"{telemetry}/tls={version}"
            mosquitto("mosquitto_pub", *tls, "-q", "1", "-r", "-t", topic, "-m", version)
            got = mosquitto("mosquitto_sub", "-p", str(self.spool.port), "-q", "1", "-t", topic,
                            "-C", "1", "-F", "%r %t %p", "-W", "10")
            self.assertEqual(got.stdout.strip(), f"1 {topic} {version}")
        elsewhere = subprocess.run(["mosquitto_pub", *tls, "-q", "1", "-t", "tls/plain", "-m", "x"],
                                   capture_output=True, text=True, timeout=20)
        self.assertNotEqual(elsewhere.returncode, 0, "an identity keeps to its own topics")
        anonymous = ["-p", str(self.spool.tls_port), "--cafile", self.spool.ca, "-h", "localhost",
                     "-t", "x", "-m", "x"]
        refused = subprocess.run(["mosquitto_pub", *anonymous], capture_output=True, text=True,
                                 timeout=20)
        self.assertNotEqual(refused.returncode, 0, "anonymous clients are refused on TLS")
        self.assertIn("not authorised", refused.stderr.lower() + refused.stdout.lower())

    def test_mosquitto_sub_refuses_a_server_it_cannot_verify(self):
        with self.assertRaises(subprocess.CalledProcessError):
            mosquitto("mosquitto_sub", "-p", str(self.spool.tls_port), "-h", "localhost",
                      "--cafile", "/etc/ssl/certs/ca-certificates.crt", "-t", "x", "-C", "1",
                      "-W", "5")

    def test_paho_persistent_session_survives_a_crash(self):
        subscriber = PahoClient(self.spool.port, "paho-durable", clean=False)
        subscriber.subscribe("orders/#")
        subscriber.stop()
        publisher = PahoClient(self.spool.port, "paho-pub")
        for i in range(50):
            publisher.publish("orders/new", f"{i}")
        publisher.stop()
        self.spool.kill()
        self.spool = Spool(self.dir)
        subscriber = PahoClient(self.spool.port, "paho-durable", clean=False)
        self.assertTrue(subscriber.flags.session_present)
        got = [m.payload.decode() for m in subscriber.received(50)]
        self.assertEqual(got, [f"{i}" for i in range(50)])
        subscriber.stop()

    def test_paho_v5_properties_round_trip(self):
        subscriber = PahoClient(self.spool.port, "v5-sub", v5=True)
        subscriber.subscribe("v5/#")
        publisher = PahoClient(self.spool.port, "v5-pub", v5=True)
        properties = Properties(PacketTypes.PUBLISH)
        properties.UserProperty = [("module", "filter"), ("k", "v")]
        properties.ContentType = "application/json"
        properties.CorrelationData = b"\x01\x02"
        properties.ResponseTopic = "v5/replies"
        publisher.publish("v5/t", b'{"a":1}', properties=properties)
        message = subscriber.received(1)[0]
        self.assertEqual(message.payload, b'{"a":1}')
        self.assertEqual(message.properties.UserProperty, [("module", "filter"), ("k", "v")])
        self.assertEqual(message.properties.ContentType, "application/json")
        self.assertEqual(message.properties.CorrelationData, b"\x01\x02")
        self.assertEqual(message.properties.ResponseTopic, "v5/replies")
        publisher.stop()
        subscriber.stop()

    def test_paho_will_on_a_dropped_connection(self):
        watcher = PahoClient(self.spool.port, "watcher")
        watcher.subscribe("status/#")
        doomed = PahoClient(self.spool.port, "doomed", will=("status/doomed", "offline", 1, True))
        doomed.client.loop_stop()
        doomed.client.socket().shutdown(socket.SHUT_RDWR)
        doomed.client.socket().close()
        message = watcher.received(1)[0]
        self.assertEqual((message.topic, message.payload), ("status/doomed", b"offline"))
        # Retained: a later subscriber sees it too.
        late = PahoClient(self.spool.port, "late")
        late.subscribe("status/#")
        retained = late.received(1)[0]
        self.assertEqual((retained.payload, retained.retain), (b"offline", True))
        watcher.stop()
        late.stop()


if __name__ == "__main__":
    unittest.main()
