// Sends the shared test vectors (../vectors/cases.json) to a simserve server with
// @grpc/grpc-js, the .proto loaded at runtime by @grpc/proto-loader, by unary Compute and by
// ComputeStream; compares each result with the reference within the case's tolerance
// (top-k indices exactly). Galleries: each case's B is registered (RegisterGallery client
// stream: header, then the bytes in two pieces) and queried by name with Compute,
// ComputeStream and ComputeUpload (header naming the gallery, then only A); the server's
// --gallery_dir holds each case's B as dir-<case>.npy (run_interop.py); then GetGallery,
// DeleteGallery and their error codes. Exit code 1 on any failure.
// With CA_PEM and TOKEN (run_interop.py --security tls_token): TLS (credentials.createSsl)
// combined with call credentials from a metadata generator that sends
// `authorization: Bearer <token>`; a wrong and a missing token must get UNAUTHENTICATED.
//
// Usage: NODE_PATH=<dir with node_modules> node interop.js ADDR CASES_JSON PROTO_DIR [CA_PEM TOKEN]
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [addr, casesPath, protoDir, caPath, token] = process.argv.slice(2);
const def = protoLoader.loadSync(path.join(protoDir, 'simserve/v1/similarity.proto'), {
  includeDirs: [protoDir], keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true,
});
const simserve = grpc.loadPackageDefinition(def).simserve.v1;

// Plaintext without a CA; else TLS trusting it, with `bearer` (if given) on every call.
function credentials(bearer) {
  if (!caPath) return grpc.credentials.createInsecure();
  const tls = grpc.credentials.createSsl(fs.readFileSync(caPath));
  if (!bearer) return tls;
  const perCall = grpc.credentials.createFromMetadataGenerator((params, callback) => {
    const md = new grpc.Metadata();
    md.add('authorization', `Bearer ${bearer}`);
    callback(null, md);
  });
  return grpc.credentials.combineChannelCredentials(tls, perCall);
}

const client = new simserve.Similarity(addr, credentials(token));

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

function galleryRequest(c, gallery) {
  const req = request(c);
  delete req.b;
  req.gallery = gallery;
  return req;
}

function unaryReq(req) {
  return new Promise((resolve, reject) => {
    client.Compute(req, {deadline: deadline()}, (err, resp) => {
      if (err) return reject(err);
      resolve({shape: resp.shape, values: decode(resp.values_raw, Buffer.prototype.readFloatLE),
               indices: decode(resp.indices_raw, Buffer.prototype.readInt32LE)});
    });
  });
}

// Reassembles the chunks of a ComputeStream / ComputeUpload call.
function collect(call) {
  return new Promise((resolve, reject) => {
    const r = {shape: null, values: [], indices: []};
    call.on('data', (chunk) => {
      if (r.shape === null) r.shape = chunk.shape;
      r.values.push(...decode(chunk.values_raw, Buffer.prototype.readFloatLE));
      r.indices.push(...decode(chunk.indices_raw, Buffer.prototype.readInt32LE));
    });
    call.on('error', reject);
    call.on('end', () => resolve(r));
  });
}

function registerGallery(c, name) {
  return new Promise((resolve, reject) => {
    const call = client.RegisterGallery({deadline: deadline()}, (err, info) => {
      if (err) return reject(err);
      resolve(info);
    });
    call.write({header: {name, shape: c.b.shape, dtype: 'FLOAT32'}});
    const raw = rawFloat32(c.b.values);
    call.write({data: raw.subarray(0, raw.length / 2)});
    call.write({data: raw.subarray(raw.length / 2)});
    call.end();
  });
}

function galleryUpload(c, gallery) {
  const call = client.ComputeUpload({deadline: deadline()});
  const req = galleryRequest(c, gallery);
  const raw = req.a.raw;
  delete req.a.raw;
  call.write({header: {request: req}});
  for (let off = 0; off < raw.length; off += 40) call.write({a_data: raw.subarray(off, off + 40)});
  call.end();
  return collect(call);
}

function unaryCall(method, req) {
  return new Promise((resolve, reject) => {
    client[method](req, {deadline: deadline()}, (err, resp) => (err ? reject(err) : resolve(resp)));
  });
}

// Resolves to null if `promise` fails with gRPC status `code`, else to what went wrong.
async function expectCode(promise, code) {
  try {
    await promise;
    return `succeeded, want ${code}`;
  } catch (e) {
    return e.code === grpc.status[code] ? null : `${e.code} ${e.details || e.message}, want ${code}`;
  }
}

async function galleryChecks(cases, report) {
  for (const c of cases) {
    const name = `node-${c.name}`;
    let info;
    try {
      info = await registerGallery(c, name);
      const ok = info.name === name && JSON.stringify(info.shape) === JSON.stringify(c.b.shape) &&
          info.version >= 1 && info.source === 'UPLOADED';
      report(`gallery register ${c.name}`, ok ? null : `answered ${JSON.stringify(info)}`);
    } catch (e) {
      report(`gallery register ${c.name}`, `${e.code} ${e.details || e.message}`);
      continue;
    }
    const pinned = galleryRequest(c, name);
    pinned.gallery_version = info.version;
    const calls = [
      ['unary', () => unaryReq(galleryRequest(c, name))],
      ['stream', () => collect(client.ComputeStream(galleryRequest(c, name), {deadline: deadline()}))],
      ['upload', () => galleryUpload(c, name)],
      ['pinned', () => unaryReq(pinned)],
      ['directory', () => unaryReq(galleryRequest(c, `dir-${c.name}`))],
    ];
    for (const [mode, call] of calls) {
      let err;
      try {
        err = compare(c, await call());
      } catch (e) {
        err = `${e.code} ${e.details || e.message}`;
      }
      report(`gallery ${mode} ${c.name}`, err);
    }
    const wrong = galleryRequest(c, name);
    wrong.gallery_version = info.version + 1;
    report(`gallery wrong version ${c.name}`,
           await expectCode(unaryReq(wrong), 'FAILED_PRECONDITION'));
  }
  const first = cases[0];
  try {
    const dir = await unaryCall('GetGallery', {name: `dir-${first.name}`});
    report('gallery get directory', dir.source === 'DIRECTORY' && dir.path.endsWith('.npy')
        ? null : `answered ${JSON.stringify(dir)}`);
  } catch (e) {
    report('gallery get directory', `${e.code} ${e.details || e.message}`);
  }
  for (const c of cases) {
    try {
      const deleted = await unaryCall('DeleteGallery', {name: `node-${c.name}`});
      report(`gallery delete ${c.name}`,
             deleted.deleted.name === `node-${c.name}` ? null : JSON.stringify(deleted));
    } catch (e) {
      report(`gallery delete ${c.name}`, `${e.code} ${e.details || e.message}`);
    }
  }
  report('gallery get deleted',
         await expectCode(unaryCall('GetGallery', {name: `node-${first.name}`}), 'NOT_FOUND'));
  report('gallery compute unknown',
         await expectCode(unaryReq(galleryRequest(first, 'node-never-registered')), 'NOT_FOUND'));
  report('gallery delete directory',
         await expectCode(unaryCall('DeleteGallery', {name: `dir-${first.name}`}),
                          'FAILED_PRECONDITION'));
  report('gallery bad name', await expectCode(registerGallery(first, 'bad name'),
                                              'INVALID_ARGUMENT'));
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

// A wrong token and none: a unary call and a stream must both be UNAUTHENTICATED.
async function refusalChecks(c, report) {
  for (const [label, bearer] of [['wrong token', `wrong-${token}`], ['no token', null]]) {
    const other = new simserve.Similarity(addr, credentials(bearer));
    report(`${label} unary`, await expectCode(new Promise((resolve, reject) => {
      other.Compute(request(c), {deadline: deadline()}, (err, r) => (err ? reject(err) : resolve(r)));
    }), 'UNAUTHENTICATED'));
    report(`${label} stream`, await expectCode(
        collect(other.ComputeStream(request(c), {deadline: deadline()})), 'UNAUTHENTICATED'));
    other.close();
  }
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
  const report = (name, err) => {
    if (err) {
      failed++;
      console.log(`FAIL node ${name}: ${err}`);
    } else {
      passed++;
      console.log(`ok   node ${name}`);
    }
  };
  await galleryChecks(cases, report);
  if (token) await refusalChecks(cases[0], report);
  client.close();
  console.log(`node: ${passed} passed, ${failed} failed`);
  process.exit(failed > 0 || passed === 0 ? 1 : 0);
}

main();
