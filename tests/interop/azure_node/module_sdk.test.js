// The Azure IoT Node SDK (azure-iot-device with azure-iot-device-mqtt) against a real
// `spool serve`, unchanged. scripts/test.sh installs it (npm ci) and runs:
//
//     SPOOL_BIN=target/debug/spool node --test tests/interop/azure_node/module_sdk.test.js
//
// The SDK connects to port 8883 of its gateway host (and calls methods on port 443), so spool
// listens there and these scenarios run one at a time (and after the Python SDK's).
'use strict';

const { test } = require('node:test');
const assert = require('node:assert');
const { spawn, execFileSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const readline = require('node:readline');
const mqtt = require('mqtt');
const { ModuleClient, Message } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');

const SPOOL_BIN = path.resolve(process.env.SPOOL_BIN || 'target/debug/spool');

function identity(dataDir, ...args) {
  return execFileSync(SPOOL_BIN, ['identity', ...args, '--data-dir', dataDir], { encoding: 'utf8' });
}

// Starts `spool serve` with MQTTS on 8883, plain MQTT on a free port and `extraArgs`;
// resolves to the child and the plain port once spool has printed its data directory.
function startSpool(dataDir, extraArgs = []) {
  const child = spawn(SPOOL_BIN, ['serve', '--data-dir', dataDir,
    '--mqtt-bind', '127.0.0.1:0', '--mqtts-bind', '127.0.0.1:8883', '--admin-bind', '127.0.0.1:0',
    ...extraArgs],
  { env: { ...process.env, SPOOL_LOG: 'warn' }, stdio: ['ignore', 'pipe', 'inherit'] });
  return new Promise((resolve, reject) => {
    let port = null;
    const lines = readline.createInterface({ input: child.stdout });
    lines.on('line', (line) => {
      const listening = line.match(/^spool: MQTT listening on .*:(\d+)$/);
      if (listening) port = Number(listening[1]);
      if (line.startsWith('spool: data in')) resolve({ child, port });
    });
    child.on('exit', (code) => reject(new Error(`spool exited with ${code}`)));
  });
}

// A plain client on spool's anonymous port that sees what the module publishes.
function watch(port, topic) {
  const client = mqtt.connect(`mqtt://127.0.0.1:${port}`, { clientId: 'node-watcher' });
  const seen = [];
  const waiting = [];
  client.on('message', (topicName, payload) => {
    const message = { topic: topicName, payload: payload.toString() };
    const next = waiting.shift();
    if (next) next(message);
    else seen.push(message);
  });
  const subscribed = new Promise((resolve, reject) => {
    client.on('connect', () => client.subscribe(topic, { qos: 1 }, (e) => (e ? reject(e) : resolve())));
  });
  const next = () => (seen.length ? Promise.resolve(seen.shift()) : new Promise((r) => waiting.push(r)));
  return { subscribed, next, stop: () => client.end(true) };
}

async function withSpool(scenario) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'spool-node-sdk-'));
  const added = identity(dir, 'add', 'edge/nodesender');
  const connectionString = added.match(/connection string: (\S+)/)[1];
  const env = Object.fromEntries(identity(dir, 'env', 'edge/nodesender').trim().split('\n')
    .map((line) => [line.slice(0, line.indexOf('=')), line.slice(line.indexOf('=') + 1)]));
  const { child, port } = await startSpool(dir);
  const watcher = watch(port, 'devices/edge/modules/nodesender/#');
  try {
    await watcher.subscribed;
    await scenario({ connectionString, env, watcher });
  } finally {
    watcher.stop();
    child.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

// Adds modules `edge/{name}` to the registry of `dir`; returns their connection strings by
// name, and the CA file they trust (written by spool's first start).
function addModules(dir, names) {
  const strings = Object.fromEntries(names.map((name) => [
    name, identity(dir, 'add', `edge/${name}`).match(/connection string: (\S+)/)[1]]));
  const caFile = identity(dir, 'env', `edge/${names[0]}`).match(/EdgeModuleCACertificateFile=(\S+)/)[1];
  return { strings, caFile };
}

// A module's client from its connection string, trusting `caFile`.
async function moduleClient(connectionString, caFile) {
  const client = ModuleClient.fromConnectionString(connectionString, Mqtt);
  await client.setOptions({ ca: fs.readFileSync(caFile, 'utf8') });
  return client;
}

async function sendAndSee(client, watcher) {
  await client.open();
  const message = new Message('hello from the Node SDK');
  message.properties.add('kind', 'a&b=c/d');
  await client.sendOutputEvent('out1', message);
  await client.close();
  const { topic, payload } = await watcher.next();
  assert.strictEqual(payload, 'hello from the Node SDK');
  assert.ok(topic.startsWith('devices/edge/modules/nodesender/messages/events/'), topic);
  assert.ok(topic.includes('%24.on=out1'), topic);
  assert.ok(topic.includes('kind=a%26b%3Dc%2Fd'), topic);
}

test('a module connects with a connection string and the CA, and sends', () => withSpool(
  async ({ connectionString, env, watcher }) => {
    const client = ModuleClient.fromConnectionString(connectionString, Mqtt);
    await client.setOptions({ ca: fs.readFileSync(env.EdgeModuleCACertificateFile, 'utf8') });
    await sendAndSee(client, watcher);
  },
));

test('a module started with the edge environment sends', () => withSpool(
  async ({ env, watcher }) => {
    Object.assign(process.env, env);
    try {
      const client = await ModuleClient.fromEnvironment(Mqtt);
      await sendAndSee(client, watcher);
    } finally {
      for (const name of Object.keys(env)) delete process.env[name];
    }
  },
));

test('a wrong key is refused', () => withSpool(
  async ({ connectionString, env }) => {
    const wrong = connectionString.replace(/SharedAccessKey=[^;]+/, `SharedAccessKey=${'A'.repeat(43)}=`);
    const client = ModuleClient.fromConnectionString(wrong, Mqtt);
    await client.setOptions({ ca: fs.readFileSync(env.EdgeModuleCACertificateFile, 'utf8') });
    await assert.rejects(client.open(), (e) => e.constructor.name === 'UnauthorizedError');
    await client.close().catch(() => {});
  },
));

// A route from one module's output to another's input (contract §3).
const DEPLOYMENT = {
  modulesContent: {
    $edgeHub: {
      'properties.desired': {
        schemaVersion: '1.1',
        routes: { toSink: 'FROM /messages/modules/filter/outputs/out1 INTO BrokeredEndpoint("/modules/sink/inputs/in1")' },
        storeAndForwardConfiguration: { timeToLiveSecs: 7200 },
      },
    },
  },
};

test('routed messages wait for a module that never connected and arrive in order on its input', async () => {
  // Goal: what `filter` sends to its output while `sink` has never connected is kept for
  // `sink`, which then gets every message in order through the SDK's inputMessage event.
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'spool-node-sdk-'));
  const { strings, caFile } = addModules(dir, ['filter', 'sink']);
  const deployment = path.join(dir, 'deployment.json');
  fs.writeFileSync(deployment, JSON.stringify(DEPLOYMENT));
  const { child } = await startSpool(dir, ['--deployment', deployment]);
  const client = (module) => moduleClient(strings[module], caFile);
  try {
    const filter = await client('filter');
    await filter.open();
    for (let i = 0; i < 10; i += 1) {
      const message = new Message(`reading ${i}`);
      message.properties.add('seq', String(i));
      await filter.sendOutputEvent('out1', message);
    }
    await filter.close();
    const sink = await client('sink');
    const received = [];
    const all = new Promise((resolve) => {
      sink.on('inputMessage', (inputName, message) => {
        received.push({ inputName, data: message.data.toString(), seq: message.properties.getValue('seq') });
        sink.complete(message, () => {});
        if (received.length === 10) resolve();
      });
    });
    await sink.open();
    await all;
    await sink.close();
    assert.deepStrictEqual(received, [...Array(10).keys()].map((i) => (
      { inputName: 'in1', data: `reading ${i}`, seq: String(i) })));
  } finally {
    child.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

// A deployment that gives module `nodetwin` the desired property `rate`.
const twinDeployment = (rate) => ({
  modulesContent: {
    $edgeHub: {
      'properties.desired': {
        schemaVersion: '1.1', routes: {}, storeAndForwardConfiguration: { timeToLiveSecs: 7200 },
      },
    },
    nodetwin: { 'properties.desired': { rate } },
  },
});

test('a module reads its desired properties, gets their changes and reports what survives a kill', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'spool-node-sdk-'));
  const { strings, caFile } = addModules(dir, ['nodetwin']);
  const deployment = path.join(dir, 'deployment.json');
  fs.writeFileSync(deployment, JSON.stringify(twinDeployment(5)));
  let { child } = await startSpool(dir, ['--deployment', deployment]);
  const open = async () => {
    const client = await moduleClient(strings.nodetwin, caFile);
    await client.open();
    return client;
  };
  try {
    let client = await open();
    let twin = await client.getTwin();
    assert.strictEqual(twin.properties.desired.rate, 5, 'from the manifest at the first GET');
    const changes = [];
    const changed = new Promise((resolve) => {
      twin.on('properties.desired', (delta) => {
        changes.push(delta);
        if (delta.rate === 7) resolve();
      });
    });
    await new Promise((resolve, reject) => twin.properties.reported.update(
      { temp: 20 }, (e) => (e ? reject(e) : resolve()),
    ));
    fs.writeFileSync(deployment, JSON.stringify(twinDeployment(7)));
    await changed;
    assert.strictEqual(changes[changes.length - 1].$version, 3);
    await client.close();

    child.kill('SIGKILL');
    ({ child } = await startSpool(dir, ['--deployment', deployment]));
    client = await open();
    twin = await client.getTwin();
    await client.close();
    assert.strictEqual(twin.properties.reported.temp, 20, 'the reported patch survived the kill');
    assert.strictEqual(twin.properties.desired.rate, 7);
  } finally {
    child.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a module calls another module\'s method over HTTPS, and gets 404 and 504 when it cannot answer', async () => {
  // Goal: `invokeMethod` (HTTPS to port 443 of the gateway host, with the caller's own SAS
  // token) reaches the callee's `onMethod` handler and brings its answer back; a callee
  // that is not connected fails with 404, one that never answers with 504 at its timeout.
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'spool-node-sdk-'));
  const { strings, caFile } = addModules(dir, ['nodecaller', 'nodecallee']);
  const { child } = await startSpool(dir, ['--https-bind', '127.0.0.1:443']);
  const call = (caller, methodName, responseTimeoutInSeconds, connectTimeoutInSeconds) => caller.invokeMethod(
    'edge', 'nodecallee', { methodName, payload: { x: 1 }, responseTimeoutInSeconds, connectTimeoutInSeconds },
  );
  const caller = await moduleClient(strings.nodecaller, caFile);
  await caller.open(); // as a module runs; closing it then stops its token renewal timer
  try {
    await assert.rejects(call(caller, 'echo', 10, 0), (e) => e.response.statusCode === 404);
    const callee = await moduleClient(strings.nodecallee, caFile);
    await callee.open();
    callee.onMethod('echo', (request, response) => {
      response.send(200, { method: request.methodName, echo: request.payload }, () => {});
    });
    callee.onMethod('silent', () => {});
    // The SDK subscribes to methods as the handler is set: the call waits up to 5 s for that.
    const result = await call(caller, 'echo', 10, 5);
    assert.deepStrictEqual(result, { status: 200, payload: { method: 'echo', echo: { x: 1 } } });
    const started = Date.now();
    await assert.rejects(call(caller, 'silent', 2, 0), (e) => e.constructor.name === 'GatewayTimeoutError');
    const took = Date.now() - started;
    assert.ok(took >= 2000 && took < 8000, `${took} ms`);
    await callee.close();
  } finally {
    await caller.close();
    child.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
