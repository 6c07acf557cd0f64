// Verify an Agentry callback (Standard Webhooks): `verify(secret, headers, body)`.
//
// Run as a script (as the tests do): CALLBACK_SECRET=... node verify_callback.mjs BODY_FILE
// WEBHOOK_ID WEBHOOK_TIMESTAMP WEBHOOK_SIGNATURE; exits 0 when the callback is genuine.
import { createHmac, timingSafeEqual } from "node:crypto";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

// True when `body` (a Buffer of the raw bytes received) was signed with `secret` within
// `toleranceS` seconds. `headers` are the request's, by lower-case name.
export function verify(secret, headers, body, toleranceS = 300) {
  const id = headers["webhook-id"];
  const timestamp = headers["webhook-timestamp"];
  if (Math.abs(Date.now() / 1000 - Number(timestamp)) > toleranceS) return false;
  const key = secret.startsWith("whsec_")
    ? Buffer.from(secret.slice("whsec_".length), "base64")
    : Buffer.from(secret);
  const expected = createHmac("sha256", key)
    .update(`${id}.${timestamp}.`)
    .update(body)
    .digest();
  return headers["webhook-signature"]
    .split(" ")
    .filter((s) => s.startsWith("v1,"))
    .map((s) => Buffer.from(s.slice(3), "base64"))
    .some((sig) => sig.length === expected.length && timingSafeEqual(sig, expected));
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const [bodyFile, id, timestamp, signature] = process.argv.slice(2);
  const headers = {
    "webhook-id": id,
    "webhook-timestamp": timestamp,
    "webhook-signature": signature,
  };
  process.exit(verify(process.env.CALLBACK_SECRET, headers, readFileSync(bodyFile)) ? 0 : 1);
}
