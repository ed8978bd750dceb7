// One @grpc/grpc-js channel to a gateway, driven by the integration tests (a second gRPC
// client stack beside Debian's python3-grpcio): one JSON command per stdin line, one JSON
// answer per stdout line, in order. Messages travel as base64 bytes, so the tests build and
// parse them with their own protobuf stubs and this file knows no .proto.
//
//   node client.js HOST:PORT TOKEN
//
// Commands ({"op": ...}):
//   unary        path, request, metadata, timeout_ms -> code, details, response
//   open_stream  path, request, metadata, timeout_ms -> stream (a handle) and first (the
//                first message), or code/details if the call ended before one arrived
//   active       stream -> active (no status received yet)
//   drain        stream -> messages (every one after the first), code, details
//   cancel       stream -> code, details (the call's status: CANCELLED unless it had ended)
//   close        closes the channel and exits
// metadata: [[key, value], ...]; a "-bin" key's value is base64 and sent as bytes. Every call
// also carries authorization: Bearer TOKEN.
'use strict';

const grpc = require('@grpc/grpc-js');
const readline = require('readline');

const [address, token] = process.argv.slice(2);
const client = new grpc.Client(address, grpc.credentials.createInsecure());
const streams = new Map();
let nextStream = 1;

const identity = (b) => b;

function metadataOf(pairs) {
  const md = new grpc.Metadata();
  md.add('authorization', `Bearer ${token}`);
  for (const [k, v] of pairs || []) {
    md.add(k, k.endsWith('-bin') ? Buffer.from(v, 'base64') : v);
  }
  return md;
}

function options(cmd) {
  return {deadline: Date.now() + (cmd.timeout_ms || 15000)};
}

function unary(cmd) {
  return new Promise((resolve) => {
    client.makeUnaryRequest(cmd.path, identity, identity, Buffer.from(cmd.request || '', 'base64'),
        metadataOf(cmd.metadata), options(cmd), (err, rep) => {
          if (err) {
            resolve({code: err.code, details: err.details});
          } else {
            resolve({code: grpc.status.OK, details: '', response: rep.toString('base64')});
          }
        });
  });
}

// A server stream read one message at a time: paused after each, so HTTP/2 flow control
// holds what the server has not sent yet.
function openStream(cmd) {
  return new Promise((resolve) => {
    const call = client.makeServerStreamRequest(cmd.path, identity, identity,
        Buffer.from(cmd.request || '', 'base64'), metadataOf(cmd.metadata), options(cmd));
    // status: the call's status; ended: every message has been read ('end' or 'error').
    const s = {call, messages: [], status: null, ended: false, waiters: []};
    const wake = () => {
      for (const w of s.waiters.splice(0)) w();
    };
    call.on('data', (m) => {
      s.messages.push(m.toString('base64'));
      call.pause();
      wake();
    });
    call.on('status', (st) => {
      s.status = {code: st.code, details: st.details};
      wake();
    });
    call.on('end', () => {
      s.ended = true;
      wake();
    });
    call.on('error', () => { // the status event carries the code and details
      s.ended = true;
      wake();
    });
    const id = nextStream++;
    streams.set(id, s);
    const first = () => {
      if (s.messages.length) {
        resolve({stream: id, first: s.messages.shift()});
      } else if (s.status) {
        resolve(Object.assign({stream: id}, s.status));
      } else {
        s.waiters.push(first);
      }
    };
    first();
  });
}

function drain(s) {
  return new Promise((resolve) => {
    const step = () => {
      if (s.status && s.ended) {
        resolve(Object.assign({messages: s.messages.splice(0)}, s.status));
        return;
      }
      s.waiters.push(step);
      s.call.resume();
    };
    step();
  });
}

function cancel(s) {
  return new Promise((resolve) => {
    const step = () => {
      if (s.status) {
        resolve(s.status);
      } else {
        s.waiters.push(step);
      }
    };
    step();
    s.call.cancel();
  });
}

async function run(cmd) {
  const s = streams.get(cmd.stream);
  switch (cmd.op) {
    case 'unary':
      return unary(cmd);
    case 'open_stream':
      return openStream(cmd);
    case 'active':
      return {active: s.status === null};
    case 'drain':
      return drain(s);
    case 'cancel':
      return cancel(s);
    case 'close':
      client.close();
      return {closed: true};
    default:
      return {error: `unknown op ${cmd.op}`};
  }
}

(async () => {
  const lines = readline.createInterface({input: process.stdin, crlfDelay: Infinity});
  for await (const line of lines) {
    if (!line.trim()) continue;
    const cmd = JSON.parse(line);
    const out = await run(cmd);
    process.stdout.write(JSON.stringify(out) + '\n');
    if (cmd.op === 'close') break;
  }
  process.exit(0);
})();
