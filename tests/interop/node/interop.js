// Sends the shared test vectors (../vectors/cases.json) to a simserve server with
// @grpc/grpc-js, the .proto loaded at runtime by @grpc/proto-loader, by unary Compute and by
// ComputeStream; compares each result with the reference within the case's tolerance
// (top-k indices exactly). Exit code 1 on any failure.
//
// Usage: NODE_PATH=<dir with node_modules> node interop.js ADDR CASES_JSON PROTO_DIR
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [addr, casesPath, protoDir] = process.argv.slice(2);
const def = protoLoader.loadSync(path.join(protoDir, 'simserve/v1/similarity.proto'), {
  includeDirs: [protoDir], keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true,
});
const simserve = grpc.loadPackageDefinition(def).simserve.v1;
const client = new simserve.Similarity(addr, grpc.credentials.createInsecure());

function rawFloat32(values) {
  const buf = Buffer.alloc(4 * values.length);
  values.forEach((v, i) => buf.writeFloatLE(v, 4 * i));
  return buf;
}

function request(c) {
  return {
    a: {shape: c.a.shape, dtype: 'FLOAT32', raw: rawFloat32(c.a.values)},
    b: {shape: c.b.shape, dtype: 'FLOAT32', raw: rawFloat32(c.b.values)},
    metric: c.metric, top_k: c.top_k, epsilon: c.epsilon,
    max_chunk_bytes: 64,  // several tiles even for these tiny results
  };
}

function decode(buf, reader) {
  const out = [];
  for (let i = 0; i + 4 <= buf.length; i += 4) out.push(reader.call(buf, i));
  return out;
}

function deadline() { return new Date(Date.now() + 30000); }

function unary(c) {
  return new Promise((resolve, reject) => {
    client.Compute(request(c), {deadline: deadline()}, (err, resp) => {
      if (err) return reject(err);
      try {
        resolve({shape: resp.shape, values: decode(resp.values_raw, Buffer.prototype.readFloatLE),
                 indices: decode(resp.indices_raw, Buffer.prototype.readInt32LE)});
      } catch (e) {
        reject(e);
      }
    });
  });
}

function stream(c) {
  return new Promise((resolve, reject) => {
    const r = {shape: null, values: [], indices: []};
    const call = client.ComputeStream(request(c), {deadline: deadline()});
    call.on('data', (chunk) => {
      try {
        if (r.shape === null) r.shape = chunk.shape;
        // Tiles arrive in (batch, row) order and cover the output once: appending reassembles.
        r.values.push(...decode(chunk.values_raw, Buffer.prototype.readFloatLE));
        r.indices.push(...decode(chunk.indices_raw, Buffer.prototype.readInt32LE));
      } catch (e) {
        call.cancel();
        reject(e);
      }
    });
    call.on('error', reject);
    call.on('end', () => resolve(r));
  });
}

function compare(c, r) {
  if (JSON.stringify(r.shape) !== JSON.stringify(c.expected.shape)) {
    return `shape ${JSON.stringify(r.shape)}, expected ${JSON.stringify(c.expected.shape)}`;
  }
  if (r.values.length !== c.expected.values.length) {
    return `${r.values.length} values, expected ${c.expected.values.length}`;
  }
  for (let i = 0; i < r.values.length; i++) {
    const want = c.expected.values[i];
    if (!(Math.abs(r.values[i] - want) <= c.atol + 1e-5 * Math.abs(want))) {
      return `value[${i}] = ${r.values[i]}, expected ${want} (atol ${c.atol})`;
    }
  }
  if (c.top_k > 0) {
    if (JSON.stringify(r.indices) !== JSON.stringify(c.expected.indices)) {
      return `indices ${JSON.stringify(r.indices)}, expected ${JSON.stringify(c.expected.indices)}`;
    }
  }
  return null;
}

async function main() {
  const cases = JSON.parse(fs.readFileSync(casesPath, 'utf8')).cases;
  let passed = 0;
  let failed = 0;
  for (const c of cases) {
    for (const [mode, call] of [['unary', unary], ['stream', stream]]) {
      let err;
      try {
        err = compare(c, await call(c));
      } catch (e) {
        err = `${e.code} ${e.details || e.message}`;
      }
      if (err) {
        failed++;
        console.log(`FAIL node ${mode} ${c.name}: ${err}`);
      } else {
        passed++;
        console.log(`ok   node ${mode} ${c.name}`);
      }
    }
  }
  client.close();
  console.log(`node: ${passed} passed, ${failed} failed`);
  process.exit(failed > 0 || passed === 0 ? 1 : 0);
}

main();
