// Drives the npm package `shamir-secret-sharing` for tessera's interop test.
//   node interop.js split SECRET_HEX N K   -> one share (hex) per line
//   node interop.js combine SHARE_HEX...   -> the secret (hex)
const { split, combine } = require("shamir-secret-sharing");

const hex = (b) => Buffer.from(b).toString("hex");
const bytes = (h) => new Uint8Array(Buffer.from(h, "hex"));

async function main() {
  const [mode, ...args] = process.argv.slice(2);
  if (mode === "split") {
    const [secret, n, k] = args;
    const shares = await split(bytes(secret), Number(n), Number(k));
    for (const s of shares) console.log(hex(s));
  } else if (mode === "combine") {
    console.log(hex(await combine(args.map(bytes))));
  } else {
    throw new Error("usage: interop.js split|combine ...");
  }
}

main().catch((e) => {
  console.error(e.message);
  process.exit(2);
});
