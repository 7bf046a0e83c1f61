// A cart backend's round trip with inventory-svc from Node.js: the .proto files of protos/ are
// loaded at run time (@grpc/proto-loader), so nothing is generated or copied.
//
//   cd examples/node && npm install
//   node reserve_cart.js --target 127.0.0.1:50051 --sku SKU-000001 --location WH-WAW
//
// It reads availability, shows what a refusal carries (the google.rpc details in the
// grpc-status-details-bin trailer), reserves a cart under an idempotency key (retrying with the
// SAME key when the outcome is unknown or the service asks for a retry) and commits it.
"use strict";

const path = require("path");
const crypto = require("crypto");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const PROTOS = process.env.INVENTORY_PROTOS || path.resolve(__dirname, "../../protos");

// keepCase: fields keep the names of the .proto files (idempotency_key, not idempotencyKey);
// longs as strings: int64 quantities do not lose precision in a JS number.
const definition = protoLoader.loadSync(
  ["inventory/v1/inventory_service.proto", "inventory/v1/routing_service.proto"],
  { includeDirs: [PROTOS], keepCase: true, longs: String, enums: String, defaults: true });
const inventory = grpc.loadPackageDefinition(definition).inventory.v1;

// The google.rpc messages the service puts in its error details (field numbers as in
// google/rpc/status.proto and error_details.proto), and the service's own InsufficientStock.
const rpcRoot = protobuf.parse(`
  syntax = "proto3";
  package google.rpc;
  message Any { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
  message Duration { int64 seconds = 1; int32 nanos = 2; }
  message RetryInfo { Duration retry_delay = 1; }
  message BadRequest {
    message FieldViolation { string field = 1; string description = 2; }
    repeated FieldViolation field_violations = 1;
  }
  message PreconditionFailure {
    message Violation { string type = 1; string subject = 2; string description = 3; }
    repeated Violation violations = 1;
  }
  message QuotaFailure {
    message Violation { string subject = 1; string description = 2; }
    repeated Violation violations = 1;
  }
  message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
  message ResourceInfo {
    string resource_type = 1; string resource_name = 2; string owner = 3; string description = 4;
  }
`, { keepCase: true }).root;
const commonRoot = new protobuf.Root().loadSync(path.join(PROTOS, "inventory/v1/common.proto"),
  { keepCase: true });
const DETAIL_TYPES = {
  "type.googleapis.com/google.rpc.RetryInfo": rpcRoot.lookupType("google.rpc.RetryInfo"),
  "type.googleapis.com/google.rpc.BadRequest": rpcRoot.lookupType("google.rpc.BadRequest"),
  "type.googleapis.com/google.rpc.PreconditionFailure":
    rpcRoot.lookupType("google.rpc.PreconditionFailure"),
  "type.googleapis.com/google.rpc.QuotaFailure": rpcRoot.lookupType("google.rpc.QuotaFailure"),
  "type.googleapis.com/google.rpc.ErrorInfo": rpcRoot.lookupType("google.rpc.ErrorInfo"),
  "type.googleapis.com/google.rpc.ResourceInfo": rpcRoot.lookupType("google.rpc.ResourceInfo"),
  "type.googleapis.com/inventory.v1.InsufficientStock":
    commonRoot.lookupType("inventory.v1.InsufficientStock"),
};
const Status = rpcRoot.lookupType("google.rpc.Status");

/** The decoded details of a failed call: [{type: "BadRequest", ...fields}, ...]. */
function errorDetails(err) {
  const raw = err.metadata && err.metadata.get("grpc-status-details-bin")[0];
  if (!raw) return [];
  const status = Status.decode(raw);
  return status.details.map((any) => {
    const type = DETAIL_TYPES[any.type_url];
    if (!type) return { type: any.type_url };
    const msg = type.toObject(type.decode(any.value), { longs: String, defaults: true });
    return { type: type.name, ...msg };
  });
}

function retryAfterSeconds(details) {
  const info = details.find((d) => d.type === "RetryInfo");
  if (!info || !info.retry_delay) return null;
  return Number(info.retry_delay.seconds) + info.retry_delay.nanos / 1e9;
}

// UNAVAILABLE: nothing was confirmed; DEADLINE_EXCEEDED: the outcome is unknown; ABORTED: the
// same key is still running; CANCELLED (this client cancels nothing): a replica stopped as the
// call reached it, and it never ran. Each is retried with the same idempotency key (the service
// runs a call once and answers a repeat with the first answer); RESOURCE_EXHAUSTED only with
// RetryInfo.
const RETRYABLE = new Set([grpc.status.UNAVAILABLE, grpc.status.DEADLINE_EXCEEDED,
  grpc.status.ABORTED, grpc.status.CANCELLED]);

function call(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: Date.now() + 5000 },
      (err, response) => (err ? reject(err) : resolve(response)));
  });
}

async function withRetries(send, attempts = 5, baseSeconds = 0.1) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await send();
    } catch (err) {
      const details = errorDetails(err);
      const after = retryAfterSeconds(details);
      const retry = RETRYABLE.has(err.code) ||
        (err.code === grpc.status.RESOURCE_EXHAUSTED && after !== null);
      if (!retry || attempt >= attempts) throw err;
      const wait = after !== null ? after : baseSeconds * 2 ** (attempt - 1) * (0.5 + Math.random());
      console.log(`attempt ${attempt}: code ${err.code}, retrying with the same key in ${wait.toFixed(2)} s`);
      await new Promise((r) => setTimeout(r, wait * 1000));
    }
  }
}

function describe(err) {
  const name = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code);
  return `${name}: ${err.details}\n` +
    errorDetails(err).map((d) => "  " + JSON.stringify(d)).join("\n");
}

function args(argv) {
  const out = { target: "127.0.0.1:50051", sku: "SKU-000001", location: "WH-WAW",
    quantity: "1", "api-key": "" };
  for (let i = 0; i < argv.length; i += 2) out[argv[i].replace(/^--/, "")] = argv[i + 1];
  return out;
}

async function main() {
  const a = args(process.argv.slice(2));
  const client = new inventory.InventoryService(a.target, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  if (a["api-key"]) metadata.set("x-api-key", a["api-key"]);
  const line = (quantity) => ({ sku: a.sku, location_id: a.location, quantity: String(quantity) });
  try {
    const got = await call(client, "GetAvailability",
      { skus: [a.sku], location_ids: [a.location], channel: "CHANNEL_WEB" }, metadata);
    const level = got.items.length && got.items[0].levels[0];
    console.log(`available ${a.sku}@${a.location}: ${level ? level.available : 0}`);

    try {
      await call(client, "Reserve", { lines: [line(1e9)] }, metadata);
    } catch (err) {
      console.log(`refused as expected:\n${describe(err)}`);
    }

    const key = `cart-${crypto.randomUUID()}`;
    const request = { lines: [line(a.quantity)], ttl_seconds: 600, channel: "CHANNEL_WEB",
      idempotency_key: key };
    const first = (await withRetries(() => call(client, "Reserve", request, metadata))).reservation;
    console.log(`reserved ${first.id} (${first.status}) under key ${key}`);
    const again = (await withRetries(() => call(client, "Reserve", request, metadata))).reservation;
    console.log(`the same key again: ${again.id} (same reservation: ${again.id === first.id})`);

    try {
      await call(client, "Reserve", { ...request, lines: [line(Number(a.quantity) + 1)] }, metadata);
    } catch (err) {
      console.log(`key reused for another cart:\n${describe(err)}`);
    }

    const done = await withRetries(() => call(client, "CommitReservation",
      { reservation_id: first.id, idempotency_key: `${key}/commit` }, metadata));
    console.log(`committed ${done.reservation.id}: ` +
      done.movements.map((m) => `${m.sku}@${m.location_id} ${m.delta}`).join(", "));
  } catch (err) {
    console.error(`failed:\n${describe(err)}`);
    process.exitCode = 1;
  } finally {
    client.close();
  }
}

main();
