"""The Azure IoT Python SDK (azure-iot-device 2.14.0) against a real `spool serve`, unchanged.

The SDK pins paho-mqtt below 2, so scripts/test.sh runs this suite from its own virtual
environment:

    target/azure-python/bin/python -m unittest discover -s tests/interop/azure_python -v

The SDK always connects to port 8883 of its gateway host (and calls other modules' methods on
port 443), so spool listens there and these scenarios run one at a time.
"""

import json
import os
import queue
import re
import shutil
import subprocess
import tempfile
import sys
import threading
import time
import unittest

import paho.mqtt.client as mqtt

# `spool serve` as the other interop tests run it (tests/interop/test_interop.py).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_interop import SPOOL_BIN, Spool  # noqa: E402
from azure.iot.device import IoTHubModuleClient as ModuleClient, Message, MethodResponse
from azure.iot.device.exceptions import ClientError, CredentialError, ServiceError


def spool_identity(data_dir, *args):
    return subprocess.run([SPOOL_BIN, "identity", *args, "--data-dir", data_dir],
                          capture_output=True, text=True, check=True).stdout


class Watcher:
    """A plain MQTT client on spool's anonymous port that sees what the module publishes."""

    def __init__(self, port, topic):
        self.messages = queue.Queue()
        subscribed = threading.Event()
        self.client = mqtt.Client(client_id="watcher", clean_session=True)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        assert subscribed.wait(10), "no SUBACK"

    def next(self):
        return self.messages.get(timeout=10)

    def stop(self):
        self.client.disconnect()
        self.client.loop_stop()


class ModuleSdk(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="spool-sdk-")
        added = spool_identity(self.dir, "add", "edge/sender")
        self.connection_string = re.search(r"connection string: (\S+)", added).group(1)
        env = spool_identity(self.dir, "env", "edge/sender")
        self.env = dict(line.split("=", 1) for line in env.strip().splitlines())
        self.workload = os.path.join(self.dir, "workload")
        self.spool = Spool(self.dir, tls_bind="127.0.0.1:8883",
                           extra_args=["--workload-dir", self.workload])
        self.watcher = Watcher(self.spool.port, "devices/edge/modules/sender/#")

    def tearDown(self):
        self.watcher.stop()
        self.spool.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def connection_string_client(self):
        """The module, from its connection string, trusting spool's CA file."""
        with open(self.env["EdgeModuleCACertificateFile"]) as ca:
            return ModuleClient.create_from_connection_string(
                self.connection_string, server_verification_cert=ca.read())

    def send(self, client):
        client.connect()
        message = Message("hello from the SDK")
        message.custom_properties["kind"] = "a&b=c/d"
        client.send_message_to_output(message, "out1")
        client.shutdown()
        topic, payload = self.watcher.next()
        self.assertEqual(payload, b"hello from the SDK")
        self.assertTrue(topic.startswith("devices/edge/modules/sender/messages/events/"), topic)
        self.assertIn("%24.on=out1", topic)
        self.assertIn("kind=a%26b%3Dc%2Fd", topic)

    def test_a_module_connects_with_a_connection_string_and_the_ca_and_sends(self):
        client = self.connection_string_client()
        self.send(client)

    def test_a_module_reads_its_twin_and_its_reported_properties_survive_a_kill(self):
        client = self.connection_string_client()
        client.connect()
        twin = client.get_twin()
        self.assertEqual(twin["reported"], {"$version": 1})
        self.assertEqual(twin["desired"], {"$version": 1})
        client.patch_twin_reported_properties({"firmware": "1.2.3", "temp": {"max": 40}})
        client.shutdown()
        self.spool.kill()
        self.spool = Spool(self.dir, tls_bind="127.0.0.1:8883",
                           extra_args=["--workload-dir", self.workload])
        client = self.connection_string_client()
        client.connect()
        twin = client.get_twin()
        client.shutdown()
        self.assertEqual(twin["reported"],
                         {"firmware": "1.2.3", "temp": {"max": 40}, "$version": 2})

    def test_a_module_receives_desired_property_patches(self):
        client = self.connection_string_client()
        patches = queue.Queue()
        client.on_twin_desired_properties_patch_received = patches.put
        client.connect()
        time.sleep(1)  # the SDK subscribes to desired patches when the handler is set
        subprocess.run([SPOOL_BIN, "twin", "patch-desired", "edge/sender", '{"rate": 5}',
                        "--admin-bind", self.spool.admin], check=True, capture_output=True)
        # On connect the SDK reads the twin and hands over its desired properties as a first
        # patch (version 1 here); spool's patch follows.
        patch = patches.get(timeout=10)
        while patch.get("$version") == 1:
            patch = patches.get(timeout=10)
        twin = client.get_twin()
        client.shutdown()
        self.assertEqual(patch, {"rate": 5, "$version": 2})
        self.assertEqual(twin["desired"], {"rate": 5, "$version": 2})

    def test_desired_properties_come_from_the_manifest_and_its_reload(self):
        manifest = os.path.join(self.dir, "deployment.json")

        def deploy(rate):
            with open(manifest, "w") as f:
                json.dump({"modulesContent": {
                    "$edgeHub": {"properties.desired": {
                        "schemaVersion": "1.1", "routes": {},
                        "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}}},
                    "sender": {"properties.desired": {"rate": rate}}}}, f)
        deploy(5)
        self.spool.kill()
        self.spool = Spool(self.dir, tls_bind="127.0.0.1:8883",
                           extra_args=["--deployment", manifest])
        client = self.connection_string_client()
        patches = queue.Queue()
        client.on_twin_desired_properties_patch_received = patches.put
        client.connect()
        twin = client.get_twin()
        self.assertEqual(twin["desired"], {"rate": 5, "$version": 2})
        deploy(7)
        patch = patches.get(timeout=10)
        while patch.get("$version") != 3:
            patch = patches.get(timeout=10)
        client.shutdown()
        self.assertEqual(patch, {"rate": 7, "$version": 3})

    def test_a_module_started_with_the_edge_environment_sends(self):
        os.environ.update(self.env)
        try:
            client = ModuleClient.create_from_edge_environment()
        finally:
            for name in self.env:
                del os.environ[name]
        self.send(client)

    def test_a_module_started_with_the_iotedge_variables_signs_through_the_workload_api(self):
        # Goal: a module started as IoT Edge starts it (IOTEDGE_* variables, no key, no CA
        # file) gets the trust bundle and its token's signature from spool's workload API, on
        # its own socket, and connects and sends.
        environment = {
            "IOTEDGE_WORKLOADURI": "unix://" + os.path.join(self.workload, "sender", "workload.sock"),
            "IOTEDGE_IOTHUBHOSTNAME": "localhost",
            "IOTEDGE_GATEWAYHOSTNAME": "localhost",
            "IOTEDGE_DEVICEID": "edge",
            "IOTEDGE_MODULEID": "sender",
            "IOTEDGE_MODULEGENERATIONID": "637661921011556752",
            "IOTEDGE_APIVERSION": "2019-01-30",
            "IOTEDGE_AUTHSCHEME": "sasToken",
        }
        os.environ.update(environment)
        try:
            client = ModuleClient.create_from_edge_environment()
        finally:
            for name in environment:
                del os.environ[name]
        self.send(client)

    def test_a_wrong_key_is_refused(self):
        wrong = re.sub(r"SharedAccessKey=[^;]+", "SharedAccessKey=" + "A" * 43 + "=",
                       self.connection_string)
        with open(self.env["EdgeModuleCACertificateFile"]) as ca:
            client = ModuleClient.create_from_connection_string(
                wrong, server_verification_cert=ca.read(), connection_retry=False)
        with self.assertRaises(CredentialError):
            client.connect()
        client.shutdown()


class DirectMethods(unittest.TestCase):
    """Module-to-module direct methods (contract §1.6, §12): the caller, started with the edge
    environment, calls with `invoke_method`, which is HTTPS to port 443 of its gateway host."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="spool-methods-")
        spool_identity(self.dir, "add", "edge/caller")
        added = spool_identity(self.dir, "add", "edge/callee")
        self.callee_string = re.search(r"connection string: (\S+)", added).group(1)
        env = spool_identity(self.dir, "env", "edge/caller")
        self.env = dict(line.split("=", 1) for line in env.strip().splitlines())
        self.spool = Spool(self.dir, tls_bind="127.0.0.1:8883",
                           extra_args=["--https-bind", "127.0.0.1:443"])
        os.environ.update(self.env)
        try:
            self.caller = ModuleClient.create_from_edge_environment()
        finally:
            for name in self.env:
                del os.environ[name]

    def tearDown(self):
        self.caller.shutdown()
        self.spool.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def callee(self, answer):
        """Module edge/callee, connected, whose method handler is `answer(client, request)`."""
        with open(self.env["EdgeModuleCACertificateFile"]) as ca:
            client = ModuleClient.create_from_connection_string(
                self.callee_string, server_verification_cert=ca.read())
        client.on_method_request_received = lambda request: answer(client, request)
        client.connect()
        return client

    def call(self, name, timeout=10, connect_timeout=0):
        return self.caller.invoke_method(
            {"methodName": name, "payload": {"x": 1}, "responseTimeoutInSeconds": timeout,
             "connectTimeoutInSeconds": connect_timeout},
            "edge", "callee")

    def test_a_module_calls_another_modules_method_and_gets_its_answer(self):
        def echo(client, request):
            answer = {"method": request.name, "echo": request.payload}
            client.send_method_response(
                MethodResponse.create_from_method_request(request, 200, answer))
        callee = self.callee(echo)
        try:
            # The SDK subscribes to methods as the handler is set: the call waits up to 5 s.
            result = self.call("echo", connect_timeout=5)
        finally:
            callee.shutdown()
        self.assertEqual(result, {"status": 200, "payload": {"method": "echo", "echo": {"x": 1}}})

    def failed_call(self, name, **timeouts):
        """The HTTP status a call failed with, as the SDK reports it: a ClientError caused by a
        ServiceError that names the status."""
        with self.assertRaises(ClientError) as failed:
            self.call(name, **timeouts)
        cause = failed.exception.__cause__
        self.assertIsInstance(cause, ServiceError)
        return re.search(r"HTTP operation returned: (\d+)", str(cause)).group(1)

    def test_a_call_to_a_disconnected_module_is_404_and_to_a_silent_one_504(self):
        self.assertEqual(self.failed_call("echo"), "404")
        callee = self.callee(lambda client, request: None)
        started = time.monotonic()
        try:
            # Within 5 s the SDK has subscribed; then the response timeout runs.
            status = self.failed_call("echo", timeout=2, connect_timeout=5)
        finally:
            callee.shutdown()
        took = time.monotonic() - started
        self.assertEqual(status, "504")
        self.assertGreaterEqual(took, 2)
        self.assertLess(took, 8)


# A route from one module's output to another's input (contract §3).
DEPLOYMENT = {"modulesContent": {"$edgeHub": {"properties.desired": {
    "schemaVersion": "1.1",
    "routes": {
        "toSink": 'FROM /messages/modules/filter/outputs/out1 '
                  'INTO BrokeredEndpoint("/modules/sink/inputs/in1")',
        "severe": {"route": "FROM /messages/modules/filter/outputs/alerts "
                            "WHERE $body.severity = 'high' "
                            'INTO BrokeredEndpoint("/modules/sink/inputs/alerts")',
                   "priority": 0},
        "hot": 'FROM /messages/modules/filter/outputs/readings WHERE as_number(temp) > 30 '
               'INTO BrokeredEndpoint("/modules/sink/inputs/hot")',
    },
    "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}}}}}


class ModuleInputs(unittest.TestCase):
    """Two SDK modules: `filter` sends to its output `out1`, a route takes that to `sink`'s
    input `in1`, and `sink` gets it through `on_message_received`."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="spool-sdk-")
        self.connection_strings = {}
        for module in ("filter", "sink"):
            added = spool_identity(self.dir, "add", f"edge/{module}")
            self.connection_strings[module] = re.search(
                r"connection string: (\S+)", added).group(1)
        env = spool_identity(self.dir, "env", "edge/sink")
        self.ca = dict(line.split("=", 1) for line in env.strip().splitlines())[
            "EdgeModuleCACertificateFile"]
        self.deployment = os.path.join(self.dir, "deployment.json")
        with open(self.deployment, "w") as manifest:
            json.dump(DEPLOYMENT, manifest)
        self.spool = self.start()

    def start(self):
        return Spool(self.dir, tls_bind="127.0.0.1:8883",
                     extra_args=["--deployment", self.deployment])

    def tearDown(self):
        self.spool.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def receive(self, count):
        """The sink connects and gets `count` messages through its input handler, then nothing
        more within a second."""
        received = queue.Queue()
        sink = self.client("sink")
        sink.on_message_received = received.put
        sink.connect()
        try:
            messages = [received.get(timeout=20) for _ in range(count)]
            with self.assertRaises(queue.Empty):
                received.get(timeout=1)
        finally:
            sink.shutdown()
        return messages

    def client(self, module):
        with open(self.ca) as ca:
            return ModuleClient.create_from_connection_string(
                self.connection_strings[module], server_verification_cert=ca.read(),
                connection_retry_interval=1)

    def test_a_sigkill_while_modules_send_and_receive_loses_and_reorders_nothing(self):
        # Goal: the sink gets every message the SDK saw acknowledged to the filter, in order
        # (a message may come twice: at least once), although spool is SIGKILLed and restarted
        # while both modules are at work and the SDKs reconnect by themselves.
        count, kill_after = 4000, 1500
        received = []
        sink = self.client("sink")
        sink.on_message_received = lambda m: received.append(int(m.custom_properties["seq"]))
        sink.connect()
        acknowledged = []
        sender = self.client("filter")
        sender.connect()

        def send_all():
            for i in range(count):
                message = Message(f"reading {i}")
                message.custom_properties["seq"] = str(i)
                sender.send_message_to_output(message, "out1")
                acknowledged.append(i)

        sending = threading.Thread(target=send_all)
        sending.start()
        while len(acknowledged) < kill_after and sending.is_alive():
            time.sleep(0.01)
        self.spool.kill()
        self.spool = self.start()
        sending.join(timeout=120)
        self.assertFalse(sending.is_alive(), "the sender finished after the restart")
        deadline = time.monotonic() + 60
        while set(acknowledged) - set(received) and time.monotonic() < deadline:
            time.sleep(0.1)
        sender.shutdown()
        sink.shutdown()
        self.assertEqual(set(acknowledged) - set(received), set(), "acknowledged, never received")
        firsts = list(dict.fromkeys(received))
        self.assertEqual(firsts, sorted(firsts), "in order")
        self.assertGreater(len(acknowledged), kill_after)
        print(f"sent {len(acknowledged)}, received {len(received)} ({len(received) - len(firsts)} again)", file=sys.stderr)

    def test_routed_messages_wait_for_the_sink_across_a_kill_and_arrive_in_order(self):
        # Goal: what the filter sends is kept for the sink, which has never connected, across
        # a SIGKILL of spool; the sink then gets every message in order on its input, with the
        # custom properties and the sender's ids, through the SDK's own handler.
        sender = self.client("filter")
        sender.connect()
        for i in range(20):
            message = Message(f"reading {i}")
            message.custom_properties["seq"] = str(i)
            sender.send_message_to_output(message, "out1")
        sender.shutdown()
        self.spool.kill()
        self.spool = self.start()

        messages = self.receive(20)
        self.assertEqual([m.input_name for m in messages], ["in1"] * 20)
        self.assertEqual([m.data for m in messages], [f"reading {i}".encode() for i in range(20)])
        self.assertEqual([m.custom_properties["seq"] for m in messages],
                         [str(i) for i in range(20)])
        self.assertEqual(messages[0].custom_properties["$.cdid"], "edge")
        self.assertEqual(messages[0].custom_properties["$.cmid"], "filter")

    def test_conditions_on_properties_and_json_bodies_filter_and_priorities_order(self):
        # Goal: a WHERE on a custom property and one on a JSON body let through only what
        # they should, and the priority 0 route's messages, sent last while the sink was away,
        # arrive first.
        sender = self.client("filter")
        sender.connect()
        for temp in (12, 31, 29, 45):
            message = Message(f"temp {temp}")
            message.custom_properties["temp"] = str(temp)
            sender.send_message_to_output(message, "readings")
        for severity in ("low", "high", "high"):
            message = Message(json.dumps({"severity": severity}))
            message.content_type = "application/json"
            message.content_encoding = "utf-8"
            sender.send_message_to_output(message, "alerts")
        sender.shutdown()

        messages = self.receive(4)
        self.assertEqual([(m.input_name, m.data) for m in messages], [
            ("alerts", b'{"severity": "high"}'),
            ("alerts", b'{"severity": "high"}'),
            ("hot", b"temp 31"),
            ("hot", b"temp 45"),
        ])
        self.assertEqual(messages[0].content_type, "application/json")


if __name__ == "__main__":
    unittest.main()
