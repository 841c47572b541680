// A Paletta client in Node.js: the contracts are plain proto3, so any gRPC library works.
//
//   npm ci --prefix examples/node
//   node examples/node/client.mjs 127.0.0.1:50051 [OUT_DIR]      (PALETTA_TOKEN is sent if set)
//
// It streams a GenerateService.Generate job, downloads its output through
// AssetService.DownloadAsset, then sends a request the server refuses and prints the
// google.rpc.BadRequest field violations decoded from the `grpc-status-details-bin` trailer.
// The protos load at run time from ../../proto and ../../third_party/googleapis (the same
// include paths as `protoc -I proto -I third_party/googleapis`).

import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const includeDirs = [path.join(here, "../../proto"), path.join(here, "../../third_party/googleapis")];

const address = process.argv[2] ?? "127.0.0.1:50051";
const outDir = process.argv[3] ?? ".";

// Services, through proto-loader: plain objects in, plain objects out.
const definition = protoLoader.loadSync(
  ["paletta/v1/generate_service.proto", "paletta/v1/asset_service.proto"],
  { includeDirs, keepCase: true, longs: String, enums: String, defaults: false, oneofs: true },
);
const paletta = grpc.loadPackageDefinition(definition).paletta.v1;

// Error details, through protobufjs: google.rpc.Status and the detail messages it packs.
const rpcTypes = new protobuf.Root();
rpcTypes.resolvePath = (_origin, target) => {
  for (const dir of includeDirs) {
    const candidate = path.join(dir, target);
    if (existsSync(candidate)) return candidate;
  }
  return target;
};
rpcTypes.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], { keepCase: true });
const Status = rpcTypes.lookupType("google.rpc.Status");

const metadata = new grpc.Metadata();
if (process.env.PALETTA_TOKEN) metadata.set("authorization", `Bearer ${process.env.PALETTA_TOKEN}`);
const credentials = grpc.credentials.createInsecure();
const generator = new paletta.GenerateService(address, credentials);
const assets = new paletta.AssetService(address, credentials);

/** Stream a Generate job; resolve with the outputs it stored. */
function generate(request) {
  return new Promise((resolve, reject) => {
    const outputs = [];
    const call = generator.Generate(request, metadata);
    call.on("data", (event) => {
      const kind = event.kind;
      if (kind === "progress") {
        const p = event.progress;
        console.log(`event progress ${p.stage} ${p.step ?? 0}/${p.total_steps ?? 0}`);
      } else if (kind === "output") {
        outputs.push(event.output);
        console.log(`event output ${event.output.asset.name} seed ${event.output.seed}`);
      } else if (kind === "finished") {
        console.log(`event finished ${event.finished.job.name} ${event.finished.job.state}`);
      } else {
        console.log(`event ${kind}`);
      }
    });
    call.on("error", reject);
    call.on("end", () => resolve(outputs));
  });
}

/** Download an asset's chunks into one Buffer. */
function download(name) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    const call = assets.DownloadAsset({ name }, metadata);
    call.on("data", (chunk) => chunks.push(chunk.data));
    call.on("error", reject);
    call.on("end", () => resolve(Buffer.concat(chunks)));
  });
}

/** The BadRequest field violations packed in an error's google.rpc.Status, decoded. */
function fieldViolations(error) {
  const [raw] = error.metadata?.get("grpc-status-details-bin") ?? [];
  if (!raw) return [];
  const status = Status.decode(raw);
  const violations = [];
  for (const detail of status.details) {
    const typeName = detail.type_url.slice(detail.type_url.lastIndexOf("/") + 1);
    if (typeName !== "google.rpc.BadRequest") continue;
    const bad = rpcTypes.lookupType(typeName).decode(detail.value);
    violations.push(...bad.field_violations);
  }
  return violations;
}

const outputs = await generate({ prompt: "a lighthouse at dusk", width: 64, height: 48, steps: 2, seed: 11 });
mkdirSync(outDir, { recursive: true });
for (const output of outputs) {
  const bytes = await download(output.asset.name);
  const file = path.join(outDir, `lighthouse-${output.index ?? 0}.png`);
  writeFileSync(file, bytes);
  console.log(`downloaded ${output.asset.name} ${bytes.length} bytes to ${file}`);
}

try {
  await generate({ prompt: "", width: 17, steps: 0 });
  console.log("unexpected: the bad request was accepted");
  process.exitCode = 1;
} catch (error) {
  console.log(`bad request ${grpc.status[error.code]} ${error.details}`);
  for (const v of fieldViolations(error)) console.log(`violation ${v.field}: ${v.description}`);
}

generator.close();
assets.close();
